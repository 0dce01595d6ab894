"""`npo experiment`: a CI-sized grid (1 seed, a few steps) through the real runner, analysis and report, so the
evidence pipeline cannot rot; plus the experiment file's checks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from npo.analysis.runs import load_run
from npo.core.config import ConfigError
from services.ops.experiment import load_experiment, run_dir, run_experiment, start_background, train_command

ROOT = Path(__file__).resolve().parents[1]


def write_files(tmp_path: Path, model_cache: Path, steps: int = 8) -> Path:
    base = {
        "method": "grpo",
        "model": {"preset": "tiny", "warmup_steps": 40, "cache_dir": str(model_cache)},
        "task": {
            "name": "chain_sum",
            "options": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
            "train_size": 96,
            "test_size": 40,
        },
        "rollout": {"max_new_tokens": 6},
        "train": {"steps": steps, "prompts_per_step": 8, "lr": 3e-4},
        "algo": {"group_size": 4},
        "autonpo": {
            "candidate_deltas": [2, 4],
            "window": 2,
            "min_step": 2,
            "entropy_drop_frac": 0.0,
            "require_entropy_drop": False,
            "reward_gain_min": 1.0,
        },  # fmt: skip
        "npo": {"early": {"enabled": False, "at_step": 0, "delta": 2}, "guide_samples": 4},
        "eval": {"every": 2, "num_prompts": 40, "samples_per_prompt": 2},
        "checkpoint": {"every": 2},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    experiment = {
        "name": "ci",
        "base": str(tmp_path / "base.yaml"),
        "out": str(tmp_path / "runs"),
        "report": str(tmp_path / "docs" / "results.md"),
        "seeds": [0],
        "workers": 2,
        "threads": 1,
        "horizon": steps,
        "window": 4,
        "baseline": "grpo",
        "roles": {"npo_early": "npo_early", "autonpo": "autonpo", "is_on": "npo_early", "is_off": "is_off"},
        "models": {"external": {"seed": 7, "set": {"model.warmup_steps": 60}}},
        "arms": [
            {"name": "grpo", "set": {"method": "grpo", "train.steps": steps + 4}},
            {"name": "npo_early", "set": {"method": "npo", "npo.early.enabled": True}},
            {"name": "is_off", "set": {"method": "npo", "npo.early.enabled": True, "algo.is_correction": False}},
            {"name": "autonpo", "set": {"method": "autonpo"}},
            {"name": "past", "set": {"guide.source": "past"}},
            {
                "name": "far_future",
                "needs": "grpo",
                "set": {"guide.source": "far_future", "guide.model": "{final:grpo}"},
            },
            {"name": "external", "set": {"guide.source": "external", "guide.model": "{model:external}"}},
        ],
        "analysis": {
            "arm": "grpo",
            "seeds": [0],
            "anchors": [2, 4],
            "deltas": [2],
            "prompts": 32,
            "samples": 4,
            "models": {"far_future": "{final:grpo}", "external": "{model:external}"},
        },
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


def test_experiment_file_errors_name_the_key(tmp_path):
    path = write_files(tmp_path, tmp_path / "models")
    data = yaml.safe_load(path.read_text())
    for change, match in (
        ({"seeds": []}, "seeds"),
        ({"surprise": 1}, "surprise: unknown key"),
        ({"baseline": "nope"}, "baseline"),
        ({"horizon": 99}, "below the horizon"),
    ):
        path.write_text(yaml.safe_dump({**data, **change}))
        with pytest.raises(ConfigError, match=match):
            load_experiment(path)
    bad_arm = {**data, "arms": [*data["arms"], {"name": "bad", "set": {"train.lr": -1}}]}
    path.write_text(yaml.safe_dump(bad_arm))
    with pytest.raises(ConfigError, match="arms.bad: train.lr"):
        load_experiment(path)
    late_need = {**data, "arms": [{"name": "x", "needs": "grpo", "set": {}}, *data["arms"]]}
    path.write_text(yaml.safe_dump(late_need))
    with pytest.raises(ConfigError, match="arms.x.needs"):
        load_experiment(path)


def test_a_run_killed_before_its_first_complete_checkpoint_starts_anew(tmp_path):
    exp = load_experiment(write_files(tmp_path, tmp_path / "models"))
    arm = exp.arms[0]
    checkpoints = run_dir(exp, arm.name, 0) / "checkpoints"
    (checkpoints / ".step_000000.x1y2").mkdir(parents=True)  # a save's temporary folder, left by a kill
    (checkpoints / "step_000000").mkdir()  # a step folder without its meta.json is not complete either
    fresh = train_command(exp, arm, 0)
    assert "--resume" not in fresh and "--config" in fresh and "seed=0" in fresh
    (checkpoints / "step_000000" / "meta.json").write_text("{}")
    assert train_command(exp, arm, 0)[-2:] == ["--resume", str(run_dir(exp, arm.name, 0))]


@pytest.mark.slow
def test_ci_sized_grid_runs_resumes_and_reports(tmp_path):
    path = write_files(tmp_path, tmp_path / "models")
    exp = load_experiment(path)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the train subprocesses run `python -m services.cli` from the repository
    try:
        # start in the background, interrupt the whole experiment once a run has checkpoints, then resume it
        pid, log_path = start_background(path)
        first = exp.out / "grpo" / "seed0" / "checkpoints"
        deadline = time.monotonic() + 900  # a loaded machine builds the external model slowly
        while time.monotonic() < deadline and not (first.is_dir() and len(list(first.iterdir())) >= 2):
            time.sleep(0.5)
        assert first.is_dir(), log_path.read_text()[-3000:]
        os.killpg(pid, signal.SIGTERM)
        time.sleep(1.0)
        assert not (exp.out / "grpo" / "seed0" / "done.json").is_file()
        report = run_experiment(path, log=lambda m: None)
    finally:
        os.chdir(cwd)
    for arm in exp.arms:
        folder = exp.out / arm.name / "seed0"
        assert (folder / "done.json").is_file(), (folder / "train.log").read_text()[-3000:]
        run = load_run(folder)
        assert [r["step"] for r in run.main][-1] == (12 if arm.name == "grpo" else 8)
        assert sum(r.get("segment") == "final" for r in run.rows) == 1  # the resumed run finished once
    grpo = load_run(exp.out / "grpo" / "seed0")
    assert [r["step"] for r in grpo.main] == list(range(13))  # resumed without a gap or a repeated step
    far = yaml.safe_load((exp.out / "far_future" / "seed0" / "config.yaml").read_text())
    assert far["guide"]["model"].endswith("grpo/seed0/checkpoints/step_000012")
    assert json.loads((exp.out / "npo_early" / "seed0" / "interventions.jsonl").read_text().splitlines()[0])
    analysis = json.loads((exp.out / "analysis.json").read_text())
    sources = {r["source"] for r in analysis}
    assert {"resample", "near_future", "past", "far_future", "external"} <= sources
    text = report.read_text()
    for heading in ("Targets", "paired", "S(", "far_future", "external", "past"):
        assert heading in text
    pngs = list((report.parent / "results").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    for png in pngs:
        assert f"results/{png.name}" in text
    # running again reuses every finished run and rewrites the same report
    stamp = {a.name: (exp.out / a.name / "seed0" / "done.json").stat().st_mtime for a in exp.arms}
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "experiment", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert stamp == {a.name: (exp.out / a.name / "seed0" / "done.json").stat().st_mtime for a in exp.arms}
    assert "report:" in out.stdout


def test_committed_experiment_files_load(monkeypatch):
    monkeypatch.chdir(ROOT)  # their paths are relative to the repository root
    files = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
    assert files
    for path in files:
        exp = load_experiment(path.relative_to(ROOT))
        assert len(exp.seeds) >= (3 if exp.name == "demo" else 5)  # the demo (make run) fits 15 minutes
        assert exp.baseline in {a.name for a in exp.arms}
