"""The regime screen (`npo screen`): the headroom core on hand-computed numbers, the screen file's checks, and a
CI-sized screen of two regimes through real `npo train` runs, measured, reported and reused on a rerun."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from npo.analysis.runs import EvalPoint
from npo.analysis.screen import (
    accuracy_at,
    anchor_counts,
    best_delta,
    future_counts,
    grpo_gain,
    pool_delta,
    rank,
    solved_mask,
    write_screen,
    zero_group_share,
)
from npo.core.config import ConfigError
from services.ops.screen import load_screen, run_screen

ROOT = Path(__file__).resolve().parents[1]

# Six prompts. The anchor draw (2 samples each) fails prompts 1-4: F = {1, 2, 3, 4}. pi(t)'s 8 fresh samples solve
# prompts 0, 1, 5 (of F: {1}); its R more samples solve prompt 2: U = {3, 4}. pi(t+Delta) solves prompts 1 and 3.
ANCHOR = [[1, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 1]]
RESAMPLE = [True, True, False, False, False, True]
EXTRA = [False, False, True, False, False, False]
FUTURE = [False, True, False, True, False, False]


def test_anchor_counts_by_hand():
    counts = anchor_counts(ANCHOR, RESAMPLE, EXTRA)
    assert counts["prompts"] == 6 and counts["failed"] == 4
    assert counts["solved8"] == 1 and counts["q0_8"] == 0.25  # prompt 1 of F
    assert counts["solved_r"] == 2 and counts["q0_r"] == 0.5  # prompts 1, 2 of F after 8 + R samples
    assert counts["unsolved"] == 2 and counts["u_share"] == pytest.approx(2 / 6)  # U = {3, 4}
    assert list(np.flatnonzero(counts["u"])) == [3, 4]
    future = future_counts(counts, FUTURE)
    assert future == {"solved_f": 2, "solved_u": 1, "q": 0.5, "h": 0.5, "h_per_prompt": pytest.approx(1 / 6)}


def test_empty_failures_and_shapes():
    counts = anchor_counts([True, True], [False, False], [False, False])
    assert counts["failed"] == 0 and counts["q0_8"] is None and counts["q0_r"] is None and counts["u_share"] == 0
    assert future_counts(counts, [True, False])["h"] is None
    assert list(solved_mask([[0, 0, 1], [0, 0, 0]])) == [True, False]
    with pytest.raises(ValueError, match="prompts differ"):
        anchor_counts([True], [True, False], [False])


def test_pool_delta_by_hand():
    common = {"delta": 10, "anchor": 0}
    a = {**common, "prompts": 6, "failed": 4, "solved8": 1, "solved_r": 2, "unsolved": 2, "solved_f": 2,
         "solved_u": 1, "kl_k3": 0.1, "mean_len": 2.0, "gain": 0.02, "zero_groups": 0.5}  # fmt: skip
    b = {**common, "anchor": 20, "prompts": 6, "failed": 2, "solved8": 0, "solved_r": 1, "unsolved": 1,
         "solved_f": 0, "solved_u": 1, "kl_k3": 0.3, "mean_len": 4.0, "gain": None, "zero_groups": 0.3}  # fmt: skip
    pooled = pool_delta([a, b])
    assert pooled["anchors"] == [0, 20] and pooled["failed"] == 6 and pooled["unsolved"] == 3
    assert pooled["q0_8"] == pytest.approx(1 / 6) and pooled["q0_r"] == pytest.approx(3 / 6)
    assert pooled["u_share"] == pytest.approx(3 / 12)
    assert pooled["q"] == pytest.approx(2 / 6) and pooled["h"] == pytest.approx(2 / 3)
    assert pooled["h_per_prompt"] == pytest.approx(2 / 12)
    assert pooled["kl"] == pytest.approx(0.2) and pooled["mean_len"] == pytest.approx(3.0)
    assert pooled["v"] == pytest.approx(math.exp(0.6)) and pooled["s"] == pytest.approx((1 / 3) / math.exp(0.6))
    assert pooled["gain"] == pytest.approx(0.02) and pooled["zero_groups"] == pytest.approx(0.4)
    rows = [{"delta": 10, "h": 0.5}, {"delta": 20, "h": 0.7}, {"delta": 40, "h": 0.7}, {"delta": 5, "h": None}]
    assert best_delta(rows)["delta"] == 20  # the smaller Delta on a tie
    assert best_delta([{"delta": 5, "h": None}]) is None


def test_zero_groups_accuracy_and_gain():
    rows = [{"step": s, "zero_groups": z} for s, z in enumerate([0.9, 0.6, 0.3, 0.0, 0.9])]
    assert zero_group_share(rows, 2, 2) == pytest.approx(0.3)  # steps 1, 2, 3
    assert zero_group_share(rows, 9, 2) is None
    evals = [EvalPoint(s, a, None, 0, 0, 0.0) for s, a in ((0, 0.1), (10, 0.2), (20, 0.4))]
    assert accuracy_at(evals, 5) == pytest.approx(0.15) and accuracy_at(evals, 25) is None
    assert grpo_gain(evals, 5, 10) == pytest.approx(0.15)  # 0.3 - 0.15
    assert grpo_gain(evals, 15, 10) is None


def _result(name: str, h_per_prompt: float | None) -> dict:
    delta = {"delta": 10, "anchors": [10], "failed": 4, "unsolved": 2, "q0_8": 0.25, "q0_r": 0.5, "q": 0.5,
             "h": None if h_per_prompt is None else 0.5, "h_per_prompt": h_per_prompt, "kl": 0.1, "v": 1.2,
             "s": 0.4, "gain": 0.01}  # fmt: skip
    summary = {"zero_groups": 0.3, "q0_8": 0.25, "q0_r": 0.5, "u_share": 0.1, "best_delta": 10, "q": 0.5,
               "h": delta["h"], "h_per_prompt": h_per_prompt, "kl": 0.1, "mean_len": 2.0, "v": math.inf, "s": 0.0,
               "gain": 0.01, "final_acc": 0.2}  # fmt: skip
    return {"name": name, "description": f"{name} regime", "deltas": [delta], "summary": summary,
            "seconds": {"train": 60.0, "measure": 30.0}}  # fmt: skip


def test_rank_and_write_screen(tmp_path):
    regimes = [_result("low", 0.01), _result("none", None), _result("high", 0.05)]
    assert [r["name"] for r in rank(regimes)] == ["high", "low", "none"]
    paths = write_screen("t", regimes, {"command": "npo screen x"}, tmp_path)
    text = paths["markdown"].read_text()
    assert text.index("| high") < text.index("| low") < text.index("| none") and "screen.png" in text
    data = json.loads(paths["json"].read_text())
    assert data["ranking"] == ["high", "low", "none"] and data["regimes"][0]["summary"]["v"] is None  # inf -> null
    assert paths["plot"].stat().st_size > 1000


def _write_screen_file(tmp_path: Path) -> Path:
    """A screen of two CI-sized regimes over configs/evidence.yaml (8 steps of 8 prompts x 4, a 40-step warm-up)."""
    small = {"model.warmup_steps": 40, "model.cache_dir": str(tmp_path / "models"), "task.train_size": 96,
             "task.test_size": 40, "train.steps": 8, "train.prompts_per_step": 8, "train.lr": 3e-4,
             "algo.group_size": 4, "eval.every": 2, "eval.num_prompts": 40, "eval.samples_per_prompt": 2,
             "eval.greedy": False, "checkpoint.every": 2}  # fmt: skip
    screen = {
        "name": "ci",
        "base": str(ROOT / "configs" / "evidence.yaml"),
        "set": small,
        "out": str(tmp_path / "runs"),
        "docs": str(tmp_path / "docs" / "screen-ci.md"),
        "seed": 0,
        "workers": 2,
        "threads": 1,
        "models": {"warm": {"seed": 3, "set": {"model.warmup_steps": 60}}},
        "measure": {"anchors": [2, 4], "deltas": [2, 4], "prompts": 32, "samples": 8, "resample": 8, "window": 2},
        "regimes": [
            {"name": "base", "description": "the CI base", "set": {}},
            {
                "name": "mix",
                "description": "warm model, longer chains",
                "set": {"model.preset": "{model:warm}", "task.options": {"min_terms": 2, "max_terms": 4}},
                "measure": {"anchors": [2]},
            },
        ],
    }
    path = tmp_path / "screen.yaml"
    path.write_text(yaml.safe_dump(screen, sort_keys=False))
    return path


def test_screen_file_errors_name_the_key(tmp_path):
    path = _write_screen_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    assert [r.name for r in load_screen(path).regimes] == ["base", "mix"]
    regime = data["regimes"][0]
    for change, match in (
        ({"surprise": 1}, "surprise: unknown key"),
        ({"regimes": []}, "regimes: expected at least one"),
        ({"measure": {**data["measure"], "resample": 0}}, "measure.resample"),
        ({"regimes": [{"name": "a", "set": {}}]}, "regimes.a.description: missing"),
        ({"regimes": [{**regime, "set": {"train.lr": -1}}]}, "regimes.base: train.lr"),
        ({"regimes": [{**regime, "set": {"method": "npo"}}]}, "regimes.base.set.method"),
        ({"regimes": [{**regime, "measure": {"anchors": [3]}}]}, "regimes.base.measure.anchors"),
        ({"regimes": [{**regime, "measure": {"prompts": 500}}]}, "regimes.base.measure.prompts"),
        ({"regimes": [{**regime, "set": {"model.preset": "{model:nope}"}}]}, "regimes.base.set.model.preset"),
        ({"regimes": [regime, regime]}, "names must be unique"),
    ):
        path.write_text(yaml.safe_dump({**data, **change}))
        with pytest.raises(ConfigError, match=match):
            load_screen(path)


@pytest.mark.slow
def test_ci_sized_screen_runs_reports_and_reuses(tmp_path):
    path = _write_screen_file(tmp_path)
    messages: list[str] = []
    cwd = os.getcwd()
    os.chdir(ROOT)  # the train subprocesses run `python -m services.cli` from the repository
    try:
        report = run_screen(path, log=messages.append)
        kept = ("done.json", "screen.json", "metrics.jsonl")
        before = {
            p: p.stat().st_mtime_ns
            for r in ("base", "mix")
            for p in (tmp_path / "runs" / r).rglob("*")
            if p.name in kept
        }
        again: list[str] = []
        run_screen(path, log=again.append)
    finally:
        os.chdir(cwd)
    data = json.loads((tmp_path / "runs" / "screen.json").read_text())
    assert sorted(data["ranking"]) == ["base", "mix"]
    for regime in data["regimes"]:
        folder = tmp_path / "runs" / regime["name"] / "seed0"
        assert (folder / "done.json").is_file(), (folder / "train.log").read_text()[-3000:]
        s = regime["summary"]
        for key in ("zero_groups", "q0_8", "q0_r", "u_share", "q", "kl", "v", "s", "final_acc"):
            assert s[key] is not None and math.isfinite(s[key]), (regime["name"], key, s)
        assert s["best_delta"] in (2, 4) and regime["settings"]["resample"] == 8
    mix = next(r for r in data["regimes"] if r["name"] == "mix")
    assert [a["anchor"] for a in mix["anchors"]] == [2]  # the regime's own anchors
    assert yaml.safe_load((tmp_path / "runs" / "mix" / "seed0" / "config.yaml").read_text())["model"][
        "preset"
    ].endswith("models/warm")
    text = report.read_text()
    assert "| base" in text and "| mix" in text and "warm model, longer chains" in text
    docs = tmp_path / "docs" / "screen-ci.md"
    assert "screen-ci.png" in docs.read_text() and docs.with_suffix(".png").stat().st_size > 1000
    # the rerun trains and measures nothing: no run started, no measurement, no run file rewritten
    assert not [m for m in again if m.startswith(("start", "measure", "building"))], again
    assert {p: p.stat().st_mtime_ns for p in before} == before
