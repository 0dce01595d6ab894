"""Run reports and run comparisons: a run folder's report.md and plots, and a comparison of runs in markdown.

Runs are read with npo.analysis.runs.load_run (main line, superseded rows, counters: see that module); the plots are
drawn by npo.analysis.plots.

    write_report("runs/npo_seed0")                                  # PNGs + report.md in the run folder
    table, md = compare_runs(["runs/grpo_seed0", "runs/npo_seed0"], "runs/compare")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npo.analysis.markdown import fmt_cell, markdown_table
from npo.analysis.plots import plot_accuracy, plot_accuracy_compute, plot_metric, plot_overlay
from npo.analysis.runs import (
    RunData,
    accuracy_auc,
    best_accuracy,
    final_accuracy,
    first_reaching,
    load_run,
    number,
    run_summary,
    series,
)

# ----------------------------------------------------------------------------------------------------------------
# Report of one run.

REPORT_PLOTS = {
    "reward.png": "training reward vs step",
    "accuracy.png": "held-out accuracy vs step",
    "entropy.png": "policy entropy vs step",
    "accuracy_compute.png": "held-out accuracy vs optimizer steps (compute)",
}
"""PNG files write_report puts in the run folder, with their captions."""


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary table of report.md (one field per line)."""
    wall = summary["wall_time"]
    rows = [
        ("method", fmt_cell(summary["method"])),
        ("seed", fmt_cell(summary["seed"])),
        ("steps (main line)", fmt_cell(summary["steps"])),
        ("final eval_acc", fmt_cell(summary["final_eval_acc"])),
        ("best eval_acc (step)", f"{fmt_cell(summary['best_eval_acc'])} ({fmt_cell(summary['best_eval_step'])})"),
        ("final eval_greedy_acc", fmt_cell(summary["final_eval_greedy_acc"])),
        ("optimizer steps (incl. scouts / replays)", fmt_cell(summary["optimizer_steps"])),
        ("samples generated", fmt_cell(summary["samples_total"])),
        ("wall time (s)", fmt_cell(float(wall), 1) if wall is not None else "n/a"),
        ("interventions (rollbacks)", fmt_cell(summary["interventions"])),
        ("AutoNPO probes", fmt_cell(summary["probes"])),
        ("guide slots used (main line)", fmt_cell(summary["guide_slots"])),
        ("guide slots used (all rows)", fmt_cell(summary["guide_slots_spent"])),
        ("superseded rows", fmt_cell(summary["superseded_rows"])),
        ("reward errors (scored 0)", fmt_cell(summary.get("reward_errors"))),
        ("bad data rows skipped", fmt_cell(summary.get("skipped_rows"))),
    ]
    return markdown_table(["field", "value"], rows)


def interventions_markdown(run: RunData) -> str:
    """One table line per intervention event (kind, event, step, to_step, optimizer steps)."""
    if not run.interventions:
        return "No interventions."
    rows = [
        [
            str(e.get("kind", "")),
            str(e.get("event", "")),
            fmt_cell(e.get("step")),
            fmt_cell(e.get("to_step"), missing=""),
            fmt_cell(e.get("optimizer_steps"), missing=""),
        ]
        for e in run.interventions
    ]
    return markdown_table(["kind", "event", "step", "to_step", "optimizer_steps"], rows)


def write_report(folder: str | Path) -> Path:
    """Write the plots of REPORT_PLOTS and report.md (summary table, interventions, images) into the run folder.

    Returns the path of report.md. Raises FileNotFoundError when the folder has no metrics.jsonl.
    """
    run = load_run(folder)
    plot_metric(run, "reward_mean", run.folder / "reward.png", "training reward (mean)")
    plot_accuracy(run, run.folder / "accuracy.png")
    plot_metric(run, "entropy", run.folder / "entropy.png", "policy entropy (nats / token)")
    plot_accuracy_compute(run, run.folder / "accuracy_compute.png")
    images = "\n\n".join(f"![{caption}]({name})" for name, caption in REPORT_PLOTS.items())
    text = (
        f"# Run report: {run.label}\n\n{summary_markdown(run_summary(run))}\n\n"
        "Main line = the run's history after its rollbacks (last row per step); counters include superseded "
        "rows (the compute spent on scouts and replayed segments).\n\n"
        f"## Interventions\n\n{interventions_markdown(run)}\n\n## Plots\n\n{images}\n"
    )
    path = run.folder / "report.md"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Comparison of runs.

COMPARE_HEADER = [
    "run",
    "final acc",
    "best acc",
    "AUC",
    "steps to ref",
    "opt. steps to ref",
    "optimizer steps",
    "wall time (s)",
]
"""Columns of compare_runs' table; "ref" is the first run's final accuracy."""


def comparison_rows(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Per run: final / best accuracy, AUC over steps, the step and the optimizer steps at which it first reached
    the FIRST run's final accuracy (None if never or no reference), total optimizer steps and wall time."""
    reference = final_accuracy(runs[0]) if runs else None
    out = []
    for run in runs:
        reached = first_reaching(run.evals, reference)
        out.append(
            {
                "run": run.label,
                "reference_acc": reference,
                "final_eval_acc": final_accuracy(run),
                "best_eval_acc": best_accuracy(run),
                "auc": accuracy_auc(run.evals),
                "steps_to_reference": reached.step if reached else None,
                "optimizer_steps_to_reference": reached.optimizer_steps if reached else None,
                "optimizer_steps": run.last.get("optimizer_steps"),
                "wall_time": number(run.last.get("wall_time")),
            }
        )
    return out


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """comparison_rows as a markdown/text table ("never" where a run with evaluations did not reach the reference,
    "n/a" where the run or the reference run has no evaluation)."""
    cells = []
    for r in rows:
        never = "never" if r["final_eval_acc"] is not None and r["reference_acc"] is not None else "n/a"
        cells.append(
            [
                r["run"],
                fmt_cell(r["final_eval_acc"]),
                fmt_cell(r["best_eval_acc"]),
                fmt_cell(r["auc"]),
                fmt_cell(r["steps_to_reference"], missing=never),
                fmt_cell(r["optimizer_steps_to_reference"], missing=never),
                fmt_cell(r["optimizer_steps"]),
                fmt_cell(r["wall_time"], 1),
            ]
        )
    return markdown_table(COMPARE_HEADER, cells)


COMPARE_PLOTS = {
    "compare_accuracy.png": "held-out accuracy vs step",
    "compare_accuracy_compute.png": "held-out accuracy vs optimizer steps (compute)",
    "compare_reward.png": "training reward vs step",
    "compare_entropy.png": "policy entropy vs step",
}
"""PNG files compare_runs puts in out_dir, with their captions."""


def compare_runs(folders: Sequence[str | Path], out_dir: str | Path) -> tuple[str, Path]:
    """Compare runs (the first is the reference): a table (see COMPARE_HEADER), overlay plots (COMPARE_PLOTS) and
    compare.md in out_dir. Returns (table text, path of compare.md). Runs without evaluations get n/a cells.

    Raises ValueError for an empty list, FileNotFoundError for a folder without metrics.jsonl.
    """
    if not folders:
        raise ValueError("folders: need at least one run folder")
    runs = [load_run(f) for f in folders]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(comparison_rows(runs))
    plot_overlay(
        runs,
        out / "compare_accuracy.png",
        "step",
        "held-out accuracy",
        "accuracy vs step",
        lambda r: ([p.step for p in r.evals], [p.acc for p in r.evals]),
    )
    plot_overlay(
        runs,
        out / "compare_accuracy_compute.png",
        "optimizer steps spent (compute)",
        "held-out accuracy",
        "accuracy at equal compute",
        lambda r: ([p.optimizer_steps for p in r.evals], [p.acc for p in r.evals]),
    )
    plot_overlay(
        runs,
        out / "compare_reward.png",
        "step",
        "training reward (mean)",
        "reward vs step",
        lambda r: series(r.train_rows, "reward_mean"),
    )
    plot_overlay(
        runs,
        out / "compare_entropy.png",
        "step",
        "policy entropy (nats / token)",
        "entropy vs step",
        lambda r: series(r.train_rows, "entropy"),
    )
    reference = runs[0]
    images = "\n\n".join(f"![{caption}]({name})" for name, caption in COMPARE_PLOTS.items())
    text = (
        f'# Run comparison\n\nReference ("ref"): final eval_acc of {reference.label} = '
        f"{fmt_cell(final_accuracy(reference))}. AUC = area under the accuracy curve over steps divided by the step "
        "span. Steps are main-line steps; optimizer steps count scouts and replays (compute).\n\n"
        f"{table}\n\nRuns:\n\n" + "\n".join(f"- {r.label}: `{r.folder}`" for r in runs) + f"\n\n{images}\n"
    )
    path = out / "compare.md"
    path.write_text(text)
    return table, path
