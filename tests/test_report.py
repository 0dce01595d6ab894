"""Tests for npo.analysis.runs and npo.analysis.report on synthetic run folders written the way npo.runtime.runner
writes them (rollbacks included)."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
import yaml

from npo.analysis.report import compare_runs, comparison_rows, write_report
from npo.analysis.runs import (
    EvalPoint,
    accuracy_auc,
    first_reaching,
    load_run,
    main_line,
    read_jsonl,
    run_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_row(step, segment, opt, reward, *, guide_slots=0, eval_acc=None, greedy=None):
    """A metrics row as the runner writes it (counters cumulative, eval of pi^(step) when given)."""
    row = {
        "step": step,
        "segment": segment,
        "reward_mean": reward,
        "pass_rate": reward,
        "entropy": 1.0 - reward,
        "guide_slots": guide_slots,
        "loss": 0.0,
        "clip_frac": 0.0,
        "clip_frac_guide": 0.0,
        "approx_kl": 0.0,
        "grad_norm": 1.0,
        "zero_groups": 0.5,
        "response_len": 3.0,
        "optimizer_steps": opt,
        "samples_total": 16 * opt,
        "wall_time": 1.5 * opt,
    }
    if eval_acc is not None:
        row["eval_acc"] = eval_acc
    if greedy is not None:
        row["eval_greedy_acc"] = greedy
    return row


def final_row(step, opt, eval_acc=None):
    row = {"step": step, "segment": "final", "optimizer_steps": opt, "samples_total": 16 * opt, "wall_time": 1.5 * opt}
    if eval_acc is not None:
        row["eval_acc"] = eval_acc
    return row


def write_run(folder, rows, events=(), method="grpo", seed=0):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "interventions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": method, "seed": seed, "train": {"steps": 4}}))
    return folder


def npo_run(tmp_path):
    """Early bootstrap: scout 0..1, rollback to 0, NPO replay 0..1, GRPO 2..3, final at 4.

    Main-line evals: pi(0) 0.1 (replay row), pi(2) 0.3, pi(4) 0.5; AUC = (2*0.2 + 2*0.4) / 4 = 0.3.
    """
    rows = [
        train_row(0, "scout", 1, 0.1, eval_acc=0.1, greedy=0.15),
        train_row(1, "scout", 2, 0.2),
        train_row(0, "npo_replay", 3, 0.3, guide_slots=5, eval_acc=0.1, greedy=0.2),
        train_row(1, "npo_replay", 4, 0.4, guide_slots=3),
        train_row(2, "grpo", 5, 0.5, eval_acc=0.3),
        train_row(3, "grpo", 6, 0.6),
        final_row(4, 6, eval_acc=0.5),
    ]
    events = [
        {"kind": "early_bootstrap", "event": "scout_start", "step": 0, "optimizer_steps": 0, "wall_time": 0.0},
        {"kind": "early_bootstrap", "event": "guides", "step": 2, "guides": 7, "optimizer_steps": 2, "wall_time": 3},
        {"kind": "early_bootstrap", "event": "rollback", "step": 2, "to_step": 0, "optimizer_steps": 2, "wall_time": 3},
    ]
    return write_run(tmp_path / "npo_seed1", rows, events, method="npo", seed=1)


def grpo_run(tmp_path):
    """Plain GRPO: evals pi(0) 0.1, pi(2) 0.5, pi(4) 0.4; AUC = (2*0.3 + 2*0.45) / 4 = 0.375."""
    rows = [
        train_row(0, "grpo", 1, 0.1, eval_acc=0.1),
        train_row(1, "grpo", 2, 0.2),
        train_row(2, "grpo", 3, 0.3, eval_acc=0.5),
        train_row(3, "grpo", 4, 0.4),
        final_row(4, 4, eval_acc=0.4),
    ]
    return write_run(tmp_path / "grpo_seed1", rows, method="grpo", seed=1)


def no_eval_run(tmp_path):
    rows = [train_row(0, "grpo", 1, 0.1), train_row(1, "grpo", 2, 0.2), final_row(2, 2)]
    return write_run(tmp_path / "noeval", rows, method="autonpo")


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# ----------------------------------------------------------------------------------------------------------------
# Loading and the main line


def test_main_line_takes_the_last_row_of_each_step(tmp_path):
    run = load_run(npo_run(tmp_path))
    assert [r["step"] for r in run.main] == [0, 1, 2, 3, 4]
    assert [r["segment"] for r in run.main] == ["npo_replay", "npo_replay", "grpo", "grpo", "final"]
    assert [r["reward_mean"] for r in run.train_rows] == [0.3, 0.4, 0.5, 0.6]
    assert [(r["step"], r["segment"]) for r in run.superseded] == [(0, "scout"), (1, "scout")]
    assert run.method == "npo" and run.seed == 1 and run.label == "npo npo_seed1"
    assert len(run.rollbacks) == 1 and len(run.interventions) == 3


def test_main_line_of_a_run_cut_off_during_a_replay_drops_the_scouts_later_steps():
    rows = [{"step": s, "segment": "scout"} for s in range(4)] + [{"step": s, "segment": "npo_replay"} for s in (0, 1)]
    main = main_line(rows)
    assert [(r["step"], r["segment"]) for r in main] == [(0, "npo_replay"), (1, "npo_replay")]


def test_main_line_of_a_finished_run_equals_last_row_per_step():
    # AutoNPO-like: 0..5, rollback to 2, replay 2..5, then 6 and the final row.
    steps = [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    rows = [{"step": s, "order": i} for i, s in enumerate(steps)]
    last = {}
    for r in rows:
        last[r["step"]] = r
    assert main_line(rows) == [last[s] for s in sorted(last)]


def test_eval_points_carry_the_compute_spent_before_the_evaluation(tmp_path):
    run = load_run(npo_run(tmp_path))
    assert run.evals == [
        EvalPoint(step=0, acc=0.1, greedy_acc=0.2, optimizer_steps=2, samples_total=32, wall_time=3.0),
        EvalPoint(step=2, acc=0.3, greedy_acc=None, optimizer_steps=4, samples_total=64, wall_time=6.0),
        EvalPoint(step=4, acc=0.5, greedy_acc=None, optimizer_steps=6, samples_total=96, wall_time=9.0),
    ]
    # A plain run: pi(0) was evaluated before any optimizer step.
    assert load_run(grpo_run(tmp_path)).evals[0].optimizer_steps == 0


def test_load_run_without_metrics_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        load_run(tmp_path)


def test_read_jsonl_skips_a_truncated_last_line_but_not_a_bad_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n\n{"step": 1}\n{"step": 2, "rew')
    assert read_jsonl(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"step": 1, "rew\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


# ----------------------------------------------------------------------------------------------------------------
# Summary numbers


def test_accuracy_auc_is_the_mean_of_the_piecewise_linear_curve():
    points = [EvalPoint(s, a, None, 0, 0, 0.0) for s, a in [(0, 0.1), (2, 0.3), (4, 0.5)]]
    assert accuracy_auc(points) == pytest.approx(0.3)
    uneven = [EvalPoint(s, a, None, 0, 0, 0.0) for s, a in [(0, 0.0), (10, 1.0), (40, 1.0)]]
    assert accuracy_auc(uneven) == pytest.approx((10 * 0.5 + 30 * 1.0) / 40)
    assert accuracy_auc(points[:1]) == 0.1
    assert accuracy_auc([]) is None


def test_first_reaching_returns_the_earliest_point_at_or_above_the_target():
    points = [EvalPoint(s, a, None, 10 * s, 0, 0.0) for s, a in [(0, 0.1), (2, 0.5), (4, 0.4)]]
    assert first_reaching(points, 0.4).step == 2
    assert first_reaching(points, 0.6) is None
    assert first_reaching(points, None) is None


def test_run_summary_by_hand(tmp_path):
    summary = run_summary(load_run(npo_run(tmp_path)))
    assert summary["steps"] == 4
    assert summary["final_eval_acc"] == 0.5 and summary["best_eval_acc"] == 0.5 and summary["best_eval_step"] == 4
    assert summary["optimizer_steps"] == 6 and summary["samples_total"] == 96 and summary["wall_time"] == 9.0
    assert summary["interventions"] == 1 and summary["probes"] == 0
    assert summary["guide_slots"] == 8 and summary["guide_slots_spent"] == 8
    assert summary["superseded_rows"] == 2


# ----------------------------------------------------------------------------------------------------------------
# Report and comparison files


def test_write_report_writes_valid_pngs_and_the_summary(tmp_path):
    folder = npo_run(tmp_path)
    path = write_report(folder)
    assert path == folder / "report.md"
    for name in ("reward.png", "accuracy.png", "entropy.png", "accuracy_compute.png"):
        assert_png(folder / name)
        assert f"]({name})" in path.read_text()
    text = path.read_text()
    assert "| final eval_acc" in text and "0.500" in text
    assert "| optimizer steps (incl. scouts / replays) | 6" in text
    assert "| guide slots used (main line)" in text and "| rollback" in text


def test_write_report_of_a_run_without_evaluations(tmp_path):
    folder = no_eval_run(tmp_path)
    text = write_report(folder).read_text()
    assert "| final eval_acc" in text and "n/a" in text
    assert_png(folder / "accuracy.png")


def test_compare_runs_table_by_hand(tmp_path):
    folders = [npo_run(tmp_path), grpo_run(tmp_path), no_eval_run(tmp_path)]
    rows = comparison_rows([load_run(f) for f in folders])
    npo, grpo, noeval = rows
    # Reference = the first run's final accuracy, 0.5.
    assert (npo["final_eval_acc"], npo["best_eval_acc"], npo["auc"]) == (0.5, 0.5, pytest.approx(0.3))
    assert (npo["steps_to_reference"], npo["optimizer_steps_to_reference"]) == (4, 6)
    assert (grpo["final_eval_acc"], grpo["best_eval_acc"], grpo["auc"]) == (0.4, 0.5, pytest.approx(0.375))
    assert (grpo["steps_to_reference"], grpo["optimizer_steps_to_reference"]) == (2, 2)
    assert (npo["optimizer_steps"], grpo["optimizer_steps"], npo["wall_time"]) == (6, 4, 9.0)
    assert noeval["final_eval_acc"] is None and noeval["auc"] is None and noeval["steps_to_reference"] is None

    out = tmp_path / "compare"
    table, md = compare_runs(folders, out)
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == [
        "npo npo_seed1",
        "0.500",
        "0.500",
        "0.300",
        "4",
        "6",
        "6",
        "9.0",
    ]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == [
        "grpo grpo_seed1",
        "0.400",
        "0.500",
        "0.375",
        "2",
        "2",
        "4",
        "6.0",
    ]
    assert [c.strip() for c in lines[4].split("|")[1:-1]] == [
        "autonpo noeval",
        "n/a",
        "n/a",
        "n/a",
        "n/a",
        "n/a",
        "2",
        "3.0",
    ]
    assert md == out / "compare.md" and table in md.read_text()
    for name in ("compare_accuracy.png", "compare_accuracy_compute.png", "compare_reward.png", "compare_entropy.png"):
        assert_png(out / name)


def test_compare_runs_with_a_reference_without_evaluations(tmp_path):
    table, _ = compare_runs([no_eval_run(tmp_path), grpo_run(tmp_path)], tmp_path / "cmp")
    grpo_line = [c.strip() for c in table.splitlines()[3].split("|")[1:-1]]
    assert grpo_line[:5] == ["grpo grpo_seed1", "0.400", "0.500", "0.375", "n/a"]


def test_compare_runs_rejects_an_empty_list(tmp_path):
    with pytest.raises(ValueError, match="folders"):
        compare_runs([], tmp_path)


def test_a_folder_named_after_its_method_is_labelled_once(tmp_path):
    """The demo's folders are runs/demo/grpo and runs/demo/autonpo: "grpo", not "grpo grpo"."""
    rows = [train_row(0, "grpo", 1, 0.1, eval_acc=0.1), final_row(1, 1, eval_acc=0.2)]
    assert load_run(write_run(tmp_path / "grpo", rows, method="grpo", seed=0)).label == "grpo"
    assert load_run(write_run(tmp_path / "autonpo-300", rows, method="autonpo", seed=0)).label == "autonpo-300"
    assert load_run(write_run(tmp_path / "seed0", rows, method="autonpo", seed=0)).label == "autonpo seed0"
