"""Run reports and run comparisons: read a run folder, plot it, summarise it in markdown.

A run folder (written by npo.runtime.runner) holds `metrics.jsonl` (one row per training step, plus a last row with
`segment: "final"`), `interventions.jsonl` and `config.yaml`. After a rollback the runner writes the replayed steps
again, so the file holds superseded rows (a scout's steps 0..19 followed by the replay's steps 0..19):

- the **main line** is the run's history as it stands: reading the rows in order, a row for step t drops every
  earlier row for steps >= t (it follows a rollback to t). For a run that finished this is exactly "the last row
  written for each step"; for a run cut off in the middle of a replay it also drops the scout's rows past the
  replay's last step.
- superseded rows are still compute that was spent: `optimizer_steps`, `samples_total` and `wall_time` are
  cumulative counters over every row, the x-axes of an equal-compute comparison.

Row t's `eval_acc` is pi^(t)'s accuracy, while its counters already include the update to pi^(t+1); an EvalPoint
therefore carries the counters of the row written just before it (what had been spent when pi^(t) existed).

    run = load_run("runs/npo_seed0")
    write_report("runs/npo_seed0")                                  # PNGs + report.md in the run folder
    table, md = compare_runs(["runs/grpo_seed0", "runs/npo_seed0"], "runs/compare")
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot is imported
import numpy as np  # noqa: E402
import yaml  # noqa: E402

FINAL = "final"
"""`segment` of the last metrics row (evaluation of the final policy, no training)."""
COUNTERS = ("optimizer_steps", "samples_total", "wall_time")
"""Cumulative compute counters of a metrics row (superseded rows included)."""


@dataclass(frozen=True)
class EvalPoint:
    """Held-out accuracy of the main-line policy pi^(step) and the compute spent when it was evaluated."""

    step: int
    """t: the policy evaluated is pi^(t)."""
    acc: float
    """eval_acc: mean verified reward of sampled responses on the held-out prompts."""
    greedy_acc: float | None
    """eval_greedy_acc when the run evaluated greedily, else None."""
    optimizer_steps: int
    """Optimizer steps spent before pi^(t) was evaluated (scouts and replays included)."""
    samples_total: int
    """Generated samples before pi^(t) was evaluated (probes and guides included)."""
    wall_time: float
    """Seconds of training before pi^(t) was evaluated."""


@dataclass
class RunData:
    """One run folder, parsed."""

    folder: Path
    """The run folder."""
    rows: list[dict[str, Any]]
    """Every metrics row in the order written (superseded rows included)."""
    main: list[dict[str, Any]]
    """Main-line rows in step order, the final row last (see the module docstring)."""
    evals: list[EvalPoint]
    """Main-line evaluations in step order."""
    interventions: list[dict[str, Any]]
    """Events of interventions.jsonl in the order written."""
    config: dict[str, Any] = field(default_factory=dict)
    """config.yaml as a plain dict ({} if the folder has none)."""

    @property
    def method(self) -> str:
        """`method` of config.yaml ("?" if unknown)."""
        return str(self.config.get("method", "?"))

    @property
    def seed(self) -> int | None:
        """`seed` of config.yaml (None if unknown)."""
        return self.config.get("seed")

    @property
    def label(self) -> str:
        """method + folder name, e.g. "npo npo_seed0"."""
        return f"{self.method} {self.folder.name}"

    @property
    def train_rows(self) -> list[dict[str, Any]]:
        """Main-line training rows (the final row excluded)."""
        return [r for r in self.main if r.get("segment") != FINAL]

    @property
    def superseded(self) -> list[dict[str, Any]]:
        """Rows written but no longer on the main line (scouts, steps replayed after a rollback)."""
        kept = {id(r) for r in self.main}
        return [r for r in self.rows if id(r) not in kept]

    @property
    def rollbacks(self) -> list[dict[str, Any]]:
        """Rollback events: one per executed intervention."""
        return [e for e in self.interventions if e.get("event") == "rollback"]

    @property
    def last(self) -> dict[str, Any]:
        """The last row written ({} for an empty run): its counters are the run's total compute."""
        return self.rows[-1] if self.rows else {}


# ----------------------------------------------------------------------------------------------------------------
# Loading.


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON objects of a .jsonl file; blank lines and a truncated LAST line (a run still writing) are skipped.

    Raises ValueError naming the file and line for a bad line elsewhere.
    """
    lines = path.read_text().splitlines()
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({exc})") from None
    return out


def main_line(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the run as it stands, in step order: a row for step t supersedes every earlier row for a step
    >= t (a rollback to t). For a finished run this is the last row written for each step."""
    kept: dict[int, dict[str, Any]] = {}
    for row in rows:
        step = int(row["step"])
        for later in [s for s in kept if s >= step]:
            del kept[later]
        kept[step] = row
    return [kept[s] for s in sorted(kept)]


def eval_points(rows: Sequence[dict[str, Any]], main: Sequence[dict[str, Any]]) -> list[EvalPoint]:
    """EvalPoints of the main-line rows that carry eval_acc; counters are those of the row written before each
    (zeros for the first row), i.e. the compute spent when pi^(t) was evaluated."""
    before: dict[int, dict[str, Any]] = {}
    previous: dict[str, Any] = {}
    for row in rows:
        before[id(row)] = previous
        previous = row
    points = []
    for row in main:
        if _number(row.get("eval_acc")) is None:
            continue
        spent = before[id(row)]
        points.append(
            EvalPoint(
                step=int(row["step"]),
                acc=float(row["eval_acc"]),
                greedy_acc=_number(row.get("eval_greedy_acc")),
                optimizer_steps=int(spent.get("optimizer_steps", 0)),
                samples_total=int(spent.get("samples_total", 0)),
                wall_time=float(spent.get("wall_time", 0.0)),
            )
        )
    return points


def load_run(folder: str | Path) -> RunData:
    """Parse a run folder. Raises FileNotFoundError when it has no metrics.jsonl, ValueError for a bad row."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"folder: {folder} has no metrics.jsonl (is it a run folder written by `npo train`?)")
    rows = read_jsonl(metrics)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("step"), int):
            raise ValueError(f"{metrics}: row {number} has no integer 'step'")
    events_path = folder / "interventions.jsonl"
    events = read_jsonl(events_path) if events_path.is_file() else []
    config_path = folder / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    main = main_line(rows)
    return RunData(folder, rows, main, eval_points(rows, main), events, config)


# ----------------------------------------------------------------------------------------------------------------
# Summary numbers (pure).


def _number(value: Any) -> float | None:
    """value as a float when it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def final_accuracy(run: RunData) -> float | None:
    """eval_acc of the last main-line evaluation (the final row's when the run finished); None without evals."""
    return run.evals[-1].acc if run.evals else None


def best_accuracy(run: RunData) -> float | None:
    """Highest main-line eval_acc; None without evals."""
    return max(p.acc for p in run.evals) if run.evals else None


def accuracy_auc(points: Sequence[EvalPoint]) -> float | None:
    """Area under the accuracy curve over steps, normalised by the step span:

        AUC = (1 / (t_last - t_first)) * sum_k (t_{k+1} - t_k) * (acc_k + acc_{k+1}) / 2

    (the mean accuracy of the piecewise-linear curve). One point: its accuracy. None without points.
    """
    if not points:
        return None
    steps = np.array([p.step for p in points], dtype=float)
    acc = np.array([p.acc for p in points], dtype=float)
    span = steps[-1] - steps[0]
    if span <= 0:
        return float(acc[-1])
    return float(np.sum(np.diff(steps) * (acc[1:] + acc[:-1]) / 2.0) / span)


def first_reaching(points: Sequence[EvalPoint], target: float | None) -> EvalPoint | None:
    """The earliest main-line evaluation with acc >= target; None if never (or no target)."""
    if target is None:
        return None
    return next((p for p in points if p.acc >= target - 1e-12), None)


def run_summary(run: RunData) -> dict[str, Any]:
    """The numbers of a run's report table (None where the run has no such data)."""
    train = run.train_rows
    steps = run.main[-1]["step"] if run.main else 0
    return {
        "run": run.label,
        "method": run.method,
        "seed": run.seed,
        "steps": int(steps),
        "final_eval_acc": final_accuracy(run),
        "best_eval_acc": best_accuracy(run),
        "best_eval_step": max(run.evals, key=lambda p: p.acc).step if run.evals else None,
        "final_eval_greedy_acc": run.evals[-1].greedy_acc if run.evals else None,
        "optimizer_steps": run.last.get("optimizer_steps"),
        "samples_total": run.last.get("samples_total"),
        "wall_time": run.last.get("wall_time"),
        "interventions": len(run.rollbacks),
        "probes": sum(e.get("event") == "probe" for e in run.interventions),
        "guide_slots": int(sum(r.get("guide_slots", 0) or 0 for r in train)),
        "guide_slots_spent": int(sum(r.get("guide_slots", 0) or 0 for r in run.rows)),
        "superseded_rows": len(run.superseded),
    }


def _fmt(value: Any, digits: int = 3, missing: str = "n/a") -> str:
    """A table cell: floats with `digits` decimals, None as `missing`."""
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table (also readable as plain text), columns padded to equal width."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# ----------------------------------------------------------------------------------------------------------------
# Plots.


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows whose `key` is a finite number."""
    pairs = [(int(r["step"]), _number(r.get(key))) for r in rows]
    pairs = [(s, v) for s, v in pairs if v is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _mark_rollbacks_by_step(ax, run: RunData) -> None:
    """Shade each replayed segment [to_step, step] and draw a dashed line at the step rolled back to."""
    for i, event in enumerate(run.rollbacks):
        to_step, at = event.get("to_step"), event.get("step")
        if to_step is None or at is None:
            continue
        ax.axvspan(to_step, at, color="tab:red", alpha=0.08)
        ax.axvline(to_step, color="tab:red", linestyle="--", linewidth=1, label="rollback" if i == 0 else None)
        ax.annotate(
            str(event.get("kind", "")),
            (to_step, 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="tab:red",
            rotation=90,
            va="top",
            ha="left",
        )


def _mark_rollbacks_by_compute(ax, run: RunData) -> None:
    """A dashed line at the optimizer step count where each rollback happened."""
    for i, event in enumerate(run.rollbacks):
        if event.get("optimizer_steps") is not None:
            ax.axvline(
                event["optimizer_steps"],
                color="tab:red",
                linestyle="--",
                linewidth=1,
                label="rollback" if i == 0 else None,
            )


def finish_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, title, grid, a "no data" mark on empty axes, and a legend when something is labelled."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if not ax.has_data():
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _finish_figure(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, legend (when something is labelled), save as PNG, close; returns path."""
    finish_axes(ax, xlabel, ylabel, title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def plot_metric(run: RunData, key: str, path: Path, ylabel: str) -> Path:
    """`key` vs step: the main line as a line, superseded rows as grey dots, rollbacks marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, values = _series(run.superseded, key)
    if steps:
        ax.scatter(steps, values, s=8, color="grey", alpha=0.5, label="superseded (scout / before rollback)")
    steps, values = _series(run.train_rows, key)
    if steps:
        ax.plot(steps, values, color="tab:blue", linewidth=1.2, label="main line")
    _mark_rollbacks_by_step(ax, run)
    return _finish_figure(fig, ax, path, "step", ylabel, f"{run.label}: {ylabel}")


def plot_accuracy(run: RunData, path: Path) -> Path:
    """Held-out accuracy (sampled, and greedy when present) vs step, rollbacks marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if run.evals:
        ax.plot([p.step for p in run.evals], [p.acc for p in run.evals], "o-", ms=3, label="eval_acc (sampled)")
        greedy = [p for p in run.evals if p.greedy_acc is not None]
        if greedy:
            ax.plot([p.step for p in greedy], [p.greedy_acc for p in greedy], "s--", ms=3, label="eval_greedy_acc")
    _mark_rollbacks_by_step(ax, run)
    return _finish_figure(fig, ax, path, "step", "held-out accuracy", f"{run.label}: held-out accuracy")


def plot_accuracy_compute(run: RunData, path: Path) -> Path:
    """Held-out accuracy of the main line vs optimizer steps spent (scouts and replays counted)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if run.evals:
        ax.plot([p.optimizer_steps for p in run.evals], [p.acc for p in run.evals], "o-", ms=3, label="eval_acc")
    _mark_rollbacks_by_compute(ax, run)
    return _finish_figure(
        fig, ax, path, "optimizer steps spent (compute)", "held-out accuracy", f"{run.label}: accuracy at equal compute"
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
        ("method", _fmt(summary["method"])),
        ("seed", _fmt(summary["seed"])),
        ("steps (main line)", _fmt(summary["steps"])),
        ("final eval_acc", _fmt(summary["final_eval_acc"])),
        ("best eval_acc (step)", f"{_fmt(summary['best_eval_acc'])} ({_fmt(summary['best_eval_step'])})"),
        ("final eval_greedy_acc", _fmt(summary["final_eval_greedy_acc"])),
        ("optimizer steps (incl. scouts / replays)", _fmt(summary["optimizer_steps"])),
        ("samples generated", _fmt(summary["samples_total"])),
        ("wall time (s)", _fmt(float(wall), 1) if wall is not None else "n/a"),
        ("interventions (rollbacks)", _fmt(summary["interventions"])),
        ("AutoNPO probes", _fmt(summary["probes"])),
        ("guide slots used (main line)", _fmt(summary["guide_slots"])),
        ("guide slots used (all rows)", _fmt(summary["guide_slots_spent"])),
        ("superseded rows", _fmt(summary["superseded_rows"])),
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
            _fmt(e.get("step")),
            _fmt(e.get("to_step"), missing=""),
            _fmt(e.get("optimizer_steps"), missing=""),
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
                "wall_time": _number(run.last.get("wall_time")),
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
                _fmt(r["final_eval_acc"]),
                _fmt(r["best_eval_acc"]),
                _fmt(r["auc"]),
                _fmt(r["steps_to_reference"], missing=never),
                _fmt(r["optimizer_steps_to_reference"], missing=never),
                _fmt(r["optimizer_steps"]),
                _fmt(r["wall_time"], 1),
            ]
        )
    return markdown_table(COMPARE_HEADER, cells)


def _overlay(runs: Sequence[RunData], path: Path, xlabel: str, ylabel: str, title: str, series) -> Path:
    """One line per run from series(run) -> (xs, ys); runs with no points are listed in the legend as such."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        xs, ys = series(run)
        if xs:
            ax.plot(xs, ys, "-", marker="o" if len(xs) < 40 else None, ms=3, linewidth=1.2, label=run.label)
        else:
            ax.plot([], [], " ", label=f"{run.label} (no data)")
    return _finish_figure(fig, ax, path, xlabel, ylabel, title)


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
    _overlay(
        runs,
        out / "compare_accuracy.png",
        "step",
        "held-out accuracy",
        "accuracy vs step",
        lambda r: ([p.step for p in r.evals], [p.acc for p in r.evals]),
    )
    _overlay(
        runs,
        out / "compare_accuracy_compute.png",
        "optimizer steps spent (compute)",
        "held-out accuracy",
        "accuracy at equal compute",
        lambda r: ([p.optimizer_steps for p in r.evals], [p.acc for p in r.evals]),
    )
    _overlay(
        runs,
        out / "compare_reward.png",
        "step",
        "training reward (mean)",
        "reward vs step",
        lambda r: _series(r.train_rows, "reward_mean"),
    )
    _overlay(
        runs,
        out / "compare_entropy.png",
        "step",
        "policy entropy (nats / token)",
        "entropy vs step",
        lambda r: _series(r.train_rows, "entropy"),
    )
    reference = runs[0]
    images = "\n\n".join(f"![{caption}]({name})" for name, caption in COMPARE_PLOTS.items())
    text = (
        f'# Run comparison\n\nReference ("ref"): final eval_acc of {reference.label} = '
        f"{_fmt(final_accuracy(reference))}. AUC = area under the accuracy curve over steps divided by the step "
        "span. Steps are main-line steps; optimizer steps count scouts and replays (compute).\n\n"
        f"{table}\n\nRuns:\n\n" + "\n".join(f"- {r.label}: `{r.folder}`" for r in runs) + f"\n\n{images}\n"
    )
    path = out / "compare.md"
    path.write_text(text)
    return table, path
