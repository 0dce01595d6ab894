"""The `npo` command: config errors before any compute, an embedded run with its own Redis server, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.cli import main

ROOT = Path(__file__).resolve().parents[1]


def small(cache_dir, *extra):
    args = [
        "--set", f"model.cache_dir={cache_dir}",
        "--set", "model.warmup_steps=40",
        "--set", "task.train_size=80",
        "--set", "task.test_size=20",
        "--set", "train.prompts_per_step=8",
        "--set", "algo.group_size=4",
        "--set", "eval.num_prompts=16",
        "--set", "eval.every=2",
        "--set", "checkpoint.every=2",
        "--set", "autonpo.candidate_deltas=[2]",
    ]  # fmt: skip
    for e in extra:
        args += ["--set", e]
    return args


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
        ("algo.tau_gate=1.5", "algo.tau_gate: must be <= 1.0, got 1.5"),
        ("task.name=chain_summ", "did you mean 'chain_sum'"),
        ("model.preset=/nonexistent/model", "model.preset: no such preset or folder '/nonexistent/model'"),
        ("method=ppo", "method: 'ppo' is not one of ['grpo', 'npo', 'autonpo']"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("autonpo.candidate_deltas=[15]", "autonpo.candidate_deltas: 15 is not a multiple of checkpoint.every (10)"),
        ("task.options={min_terms: 2", "override 'task.options': cannot parse value"),
    ],
)
def test_config_errors_name_the_key_before_compute(tmp_path, capsys, override, message):
    code = main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "--set", override, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing was computed or written


def test_missing_config_file_is_a_clear_error(capsys):
    assert main(["train", "--config", "/nonexistent.yaml"]) == 2
    assert "config file not found: /nonexistent.yaml" in capsys.readouterr().err


def test_config_command_documents_every_option(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "algo.tau_gate = 0.6  # Gate:" in out
    assert "autonpo.q_min = 0.1" in out and "train.steps = 300" in out


def test_train_embedded_redis_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--out",
            str(out),
            "--no-progress",
            "--metrics-port",
            "0",
        ]
        + small(tmp_path / "models", "method=npo", "train.steps=4", "npo.early.delta=2")
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "metrics: http://127.0.0.1:" in printed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["segment"] == "final" and rows[-1]["step"] == 4
    assert [e["event"] for e in map(json.loads, (out / "interventions.jsonl").read_text().splitlines())] == [
        "scout_start",
        "guides",
        "rollback",
    ]
    for name in ("config.yaml", "report.md", "accuracy.png", "reward.png", "entropy.png"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    # The last checkpoint is a plain HF folder.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = out / "checkpoints" / "step_000004"
    AutoModelForCausalLM.from_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).decode([5, 6]) != ""


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = small(tmp_path / "models", "method=grpo", "train.steps=400", "eval.every=0")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "services.cli", "train", "--config", str(ROOT / "configs/tiny.yaml")]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--no-progress", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the embedded Redis server runs as a child process"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with: npo train --resume" in err and "Traceback" not in err
    for pid in children:  # the cache server is gone with the run
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    interrupted_at = int(steps[-1].split("_")[1])
    assert interrupted_at >= 2
    done = subprocess.run(
        [*cmd[:4], "--resume", str(out), "--no-progress", "--set", f"train.steps={interrupted_at + 2}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(interrupted_at + 2)) + [interrupted_at + 2]


@pytest.mark.slow
def test_train_with_the_deepspeed_learner(tmp_path, capsys):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    out = tmp_path / "run"
    code = main(
        ["train", "--config", str(ROOT / "configs/tiny.yaml"), "--out", str(out), "--no-progress"]
        + small(tmp_path / "models", "method=npo", "train.steps=4", "npo.early.delta=2", "train.engine=deepspeed")
    )
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["segment"] for r in rows] == ["scout", "scout", "npo_replay", "npo_replay", "grpo", "grpo", "final"]
    # Rollback through the DeepSpeed learner is exact: the replay's first step sees the scout's first rollouts.
    assert rows[2]["reward_mean"] == rows[0]["reward_mean"]
    assert all(r["grad_norm"] >= 0 for r in rows[:-1])
