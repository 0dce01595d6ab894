"""The `npo` command: config errors before any compute, an embedded run with its own Redis server, Ctrl-C."""

import json
import os
import shutil
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


CONFIG_ERRORS = [
    ("train.stepz=3", "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ("algo.tau_gate=1.5", "algo.tau_gate: must be <= 1.0, got 1.5"),
    ("task.name=chain_summ", "did you mean 'chain_sum'"),
    ("model.preset=/nonexistent/model", "model.preset: no such preset or folder '/nonexistent/model'"),
    ("method=ppo", "method: 'ppo' is not one of ['grpo', 'npo', 'autonpo']"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("autonpo.candidate_deltas=[15]", "autonpo.candidate_deltas: 15 is not a multiple of checkpoint.every (10)"),
    ("task.options={min_terms: 2", "override 'task.options': cannot parse value"),
]


@pytest.mark.parametrize("override, message", CONFIG_ERRORS)
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


HEAVY = ("torch", "transformers", "ray")
"""Modules that no config error may wait for (each takes seconds to import)."""
PROBE = """
import contextlib, io, json, sys
from services.cli import main
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
    print("RESULT", json.dumps({"argv": argv, "code": code, "err": err.getvalue(), "heavy": heavy}), flush=True)
"""


def test_config_errors_come_before_the_heavy_imports(tmp_path):
    """Each command reads and validates its config before torch, transformers (or Ray) is imported: the one-line
    message and the exit code are those of test_config_errors_name_the_key_before_compute, printed by a fresh
    process in which none of them has been imported."""
    tiny = str(ROOT / "configs/tiny.yaml")
    cases = [(["train", "--config", tiny, "--set", o, "--out", str(tmp_path / "r")], m) for o, m in CONFIG_ERRORS]
    tau, tau_message = ["--set", "algo.tau_gate=1.5"], "algo.tau_gate: must be <= 1.0, got 1.5"
    empty_run = tmp_path / "empty_run"  # a run folder that stopped before its first checkpoint
    (empty_run / "checkpoints").mkdir(parents=True)
    (empty_run / "config.yaml").write_text("method: grpo\n")
    cases += [
        (["train", "--config", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
        (["up", "--config", tiny, *tau, "--out", str(tmp_path / "up")], tau_message),
        (["up", "--ray", "--config", tiny, *tau, "--out", str(tmp_path / "up")], tau_message),
        (["config", "--config", tiny, *tau], tau_message),
        (["demo", "--config", tiny, "--set", "autonpo.candidate_deltas=[15]", "--out", str(tmp_path / "d")],
         "autonpo.candidate_deltas: 15 is not a multiple of checkpoint.every (10)"),
        (["train", "--resume", str(tmp_path / "no_run")], f"--resume: {tmp_path / 'no_run'} has no config.yaml"),
        (["train", "--resume", str(empty_run)], f"--resume: {empty_run} has no checkpoint"),
    ]  # fmt: skip
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([argv for argv, _ in cases]), json.dumps(HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = [json.loads(line[7:]) for line in probe.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(cases), probe.stderr
    for (_, message), result in zip(cases, results, strict=True):
        assert result["code"] == 2, result
        assert result["err"].startswith("npo: ") and result["err"].count("\n") == 1, result  # one line
        assert message in result["err"], result
        assert result["heavy"] == [], result
    assert not any((tmp_path / name).exists() for name in ("r", "up", "d"))  # nothing was computed or written


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


def test_resume_from_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = small(tmp_path / "models", "method=grpo", "train.steps=2", "eval.every=0", "model.warmup_steps=0")
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "--out", str(out), "--no-progress", *args]) == 0
    checkpoints = sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    for older in checkpoints[:-1]:  # the run's only checkpoint is the corrupt one: nothing to fall back to
        shutil.rmtree(older)
    weights = checkpoints[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    code = main(["train", "--resume", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("npo: checkpoint error: ") and err.count("\n") == 1, err
    assert checkpoints[-1].name in err and str(out) in err and "Traceback" not in err
    if not any(p.name.startswith("step_") and p.name[5:].isdigit() for p in (out / "checkpoints").iterdir()):
        # the corrupt checkpoint was set aside: a second try finds nothing to resume, before loading the model
        assert main(["train", "--resume", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"npo: --resume: {out} has no checkpoint to resume from") and err.count("\n") == 1


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
