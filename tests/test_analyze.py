"""Tests for npo.analysis.qvs: the pure Q / V / S pieces, and analyze_run on a fake run folder with two real checkpoints
of a tiny character-level Llama (config.yaml with a jsonl task, loaded the way the runner's run would be)."""

from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import pytest
import torch
import yaml

from npo.analysis.qvs import analyze_run, pick_prompts, plan_pairs, q_value, signal_value
from npo.core.types import Problem
from npo.runtime.checkpoint import CheckpointManager
from npo.runtime.models import ModelConfig, build_char_tokenizer, init_tiny_model, supervised_warmup

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=16)


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces


def test_q_value_by_hand():
    anchor = [True, False, False, False, True]
    future = [False, True, False, True, True]
    assert q_value(anchor, future) == (2 / 3, 3, 2)
    assert q_value([True, True], [False, True]) == (None, 0, 0)
    with pytest.raises(ValueError, match="future_solved"):
        q_value([True], [True, False])


def test_signal_value_is_q_over_exp_of_sequence_kl():
    v, s = signal_value(0.4, 0.05, 3.0)
    assert v == math.exp(0.15) and s == 0.4 / math.exp(0.15)
    assert signal_value(None, 0.1, 3.0) == (math.exp(0.3), None)
    v, s = signal_value(0.5, 10.0, 1000.0)
    assert v == math.inf and s == 0.0


def test_plan_pairs_adds_delta_zero_and_skips_missing_partners():
    assert plan_pairs([0, 10, 20, 40], [10, 20], None) == {0: [0, 10, 20], 10: [0, 10], 20: [0, 20]}
    assert plan_pairs([0, 10, 20], [10], [20]) == {20: [0]}
    assert plan_pairs([30], [10], None) == {30: [0]}
    with pytest.raises(ValueError, match="anchors"):
        plan_pairs([0, 10], [10], [5])
    with pytest.raises(ValueError, match="deltas"):
        plan_pairs([0, 10], [-10], None)


def test_pick_prompts_is_a_seeded_prefix_of_a_shuffle():
    train = [Problem(f"p{i}", f"q{i}", str(i)) for i in range(50)]
    first = pick_prompts(train, 10, seed=3)
    assert first == pick_prompts(train, 10, seed=3) and len({p.prompt_id for p in first}) == 10
    assert pick_prompts(train, 20, seed=3)[:10] == first
    assert first != pick_prompts(train, 10, seed=4)
    with pytest.raises(ValueError, match="num_prompts"):
        pick_prompts(train, 51, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# analyze_run on real checkpoints

DIGITS = "0123456789"


def fake_run(root, warmup_steps=(5, 30)):
    """A run folder: jsonl task 'ab=' -> 'a' (100 problems), checkpoints 0 and 10 of a tiny Llama warmed up for
    5 and 30 supervised steps (so pi(10) is better than pi(0) and the weights differ), config.yaml as the runner
    writes it."""
    from npo.runtime.run_config import load_run_config, run_config_to_dict

    run = root / "run"
    run.mkdir()
    pairs = [(f"{a}{b}=", str(a)) for a in range(10) for b in range(10)]
    lines = [
        {"id": f"echo/{p}", "prompt": f"first digit of {p[:2]}", "answer": a, "compact_prompt": p, "solution": a}
        for p, a in pairs
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tokenizer = build_char_tokenizer(DIGITS + "=")
    model = init_tiny_model(TINY, tokenizer, seed=0)
    ckpt = CheckpointManager(run / "checkpoints")
    done = 0
    for step, steps in zip((0, 10), warmup_steps, strict=True):
        supervised_warmup(model, tokenizer, pairs, steps=steps - done, lr=3e-3, batch_size=32, seed=step)
        done = steps

        def write(folder):
            model.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)

        ckpt.save(step, write, {"step": step})
    cfg = load_run_config(
        None,
        [
            "method=grpo",
            "seed=0",
            "task.name=jsonl",
            f"task.jsonl_train={root / 'train.jsonl'}",
            "rollout.max_new_tokens=3",
            "rollout.temperature=1.0",
        ],
    )
    (run / "config.yaml").write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))
    return run


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices: one thread is faster than two, and much faster when other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    run = fake_run(tmp_path_factory.mktemp("analyze"))
    rows = analyze_run(run, deltas=[10], anchors=None, num_prompts=24, samples=4, seed=0)
    return run, rows


def test_analyze_run_measures_every_existing_pair(analysed):
    _, rows = analysed
    assert [(r["anchor"], r["delta"], r["future_step"]) for r in rows] == [(0, 0, 0), (0, 10, 10)]
    for r in rows:
        assert r["prompts"] == 24 and r["samples"] == 4
        assert 0 < r["failed"] <= 24 and 0 <= r["solved"] <= r["failed"]
        assert 0.0 <= r["q"] <= 1.0 and r["q"] == r["solved"] / r["failed"]
        assert 1.0 <= r["mean_len"] <= 3.0
        assert 0.0 <= r["pass_rate_anchor"] <= 1.0 and 0.0 <= r["pass_rate_future"] <= 1.0
    assert rows[0]["q0"] == rows[1]["q0"] == rows[0]["q"]
    assert rows[0]["failed"] == rows[1]["failed"]  # the same anchor draw defines F(t) for every Delta


def test_kl_is_zero_for_the_same_weights_and_positive_for_different_ones(analysed):
    _, rows = analysed
    same, other = rows
    assert abs(same["kl_k3"]) < 1e-5 and abs(same["kl_k1"]) < 1e-5
    assert same["v"] == pytest.approx(1.0, abs=1e-4)
    assert other["kl_k3"] > 1e-3 and other["kl_k1"] > 1e-3


def test_s_is_q_over_exp_of_length_times_kl(analysed):
    _, rows = analysed
    for r in rows:
        assert r["v"] == math.exp(r["mean_len"] * r["kl_k3"])
        assert r["s"] == r["q"] / math.exp(r["mean_len"] * r["kl_k3"])


def test_analyze_run_writes_json_markdown_and_png(analysed):
    run, rows = analysed
    data = json.loads((run / "analysis.json").read_text())
    assert data["rows"] == rows and data["deltas"] == [0, 10] and data["anchors"] == [0]
    assert data["params"]["max_new_tokens"] == 3 and data["correct_threshold"] == 1.0
    text = (run / "analysis.md").read_text()
    assert "| Q(Delta) | Q(0) |" in text and text.count("\n| 0 | ") == 2
    png = run / "analysis.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plt.imread(png).ndim == 3


def test_analyze_run_with_explicit_anchors_and_out_folder(analysed, tmp_path):
    run, _ = analysed
    task_problems = [Problem(f"p{i}", "", str(i % 10), compact_prompt=f"{i % 10}{i // 10}=") for i in range(30)]

    class FirstDigit:
        """Reward 1 when the response is the prompt's first digit (the same task as the jsonl file)."""

        train = task_problems

        def reward(self, problem, response):
            return float(response == problem.answer)

        def rewards(self, problems, responses):
            return [self.reward(p, r) for p, r in zip(problems, responses)]

    from npo.runtime.engine import SamplingParams

    rows = analyze_run(
        run,
        deltas=[10, 20],
        anchors=[10],
        num_prompts=30,
        samples=2,
        seed=1,
        out=tmp_path,
        task=FirstDigit(),
        params=SamplingParams(max_new_tokens=3),
        correct_threshold=1.0,
    )
    assert [(r["anchor"], r["delta"]) for r in rows] == [(10, 0)]
    assert abs(rows[0]["kl_k3"]) < 1e-5 and rows[0]["prompts"] == 30
    assert (tmp_path / "analysis.json").is_file() and (tmp_path / "analysis.png").is_file()


def test_analyze_run_rejects_a_missing_anchor(analysed, tmp_path):
    run, _ = analysed
    with pytest.raises(ValueError, match="anchors"):
        analyze_run(run, deltas=[10], anchors=[5], num_prompts=4, samples=1, seed=0, out=tmp_path)


def test_weights_of_the_two_checkpoints_differ(analysed):
    """Guards the KL test: the fixture's checkpoints are really different policies."""
    from safetensors.torch import load_file

    run, _ = analysed
    a = load_file(str(run / "checkpoints" / "step_000000" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step_000010" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
