"""Run folders: read one as written by npo.runtime.runner, and the run-level summary numbers.

A run folder holds `metrics.jsonl` (one row per training step, plus a last row with `segment: "final"`),
`interventions.jsonl` and `config.yaml`; usually also `metrics.csv`, the same rows as a flat table
(npo.runtime.logsinks). metrics.jsonl is read when present; a folder with only metrics.csv, or the path of a
metrics file itself (.jsonl or .csv), loads too.

After a rollback the runner writes the replayed steps again, so the file holds superseded rows (a scout's steps
0..19 followed by the replay's steps 0..19):

- the **main line** is the run's history as it stands: reading the rows in order, a row for step t drops every
  earlier row for steps >= t (it follows a rollback to t). For a run that finished this is exactly "the last row
  written for each step"; for a run cut off in the middle of a replay it also drops the scout's rows past the
  replay's last step.
- superseded rows are still compute that was spent: `optimizer_steps`, `samples_total` and `wall_time` are
  cumulative counters over every row, the x-axes of an equal-compute comparison.

Row t's `eval_acc` is pi^(t)'s accuracy, while its counters already include the update to pi^(t+1); an EvalPoint
therefore carries the counters of the row written just before it (what had been spent when pi^(t) existed).

    run = load_run("runs/npo_seed0")
    run_summary(run)["final_eval_acc"], accuracy_auc(run.evals)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from npo.runtime.logsinks import METRICS_CSV, read_jsonl_rows, read_metrics_csv

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
        """method + folder name, e.g. "npo npo_seed0"; the folder name alone when it already says the method
        ("grpo", "autonpo-300")."""
        name = self.folder.name
        return name if name == self.method or name.startswith(f"{self.method}-") else f"{self.method} {name}"

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
    """JSON objects of an existing .jsonl file (npo.runtime.logsinks.read_jsonl_rows: blank lines and a truncated
    last line skipped, ValueError naming the file and line for a bad line elsewhere)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return read_jsonl_rows(path)


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
        if number(row.get("eval_acc")) is None:
            continue
        spent = before[id(row)]
        points.append(
            EvalPoint(
                step=int(row["step"]),
                acc=float(row["eval_acc"]),
                greedy_acc=number(row.get("eval_greedy_acc")),
                optimizer_steps=int(spent.get("optimizer_steps", 0)),
                samples_total=int(spent.get("samples_total", 0)),
                wall_time=float(spent.get("wall_time", 0.0)),
            )
        )
    return points


def metrics_file(path: str | Path) -> Path:
    """The metrics file of a run: `path` itself when it is a .jsonl or .csv file, else the folder's metrics.jsonl,
    else its metrics.csv. Raises FileNotFoundError when there is none."""
    path = Path(path)
    if path.is_file() and path.suffix in (".jsonl", ".csv"):
        return path
    for name in ("metrics.jsonl", METRICS_CSV):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"folder: {path} has no metrics.jsonl or metrics.csv (is it a run folder written by `npo train`?)"
    )


def load_run(folder: str | Path) -> RunData:
    """Parse a run folder, or a run's metrics.jsonl / metrics.csv path (the folder is then the file's parent).
    Raises FileNotFoundError when there are no metrics (see metrics_file), ValueError for a bad row."""
    metrics = metrics_file(folder)
    folder = metrics.parent if Path(folder).is_file() else Path(folder)
    rows = read_metrics_csv(metrics) if metrics.suffix == ".csv" else read_jsonl(metrics)
    for index, row in enumerate(rows, start=1):
        if not isinstance(row.get("step"), int):
            raise ValueError(f"{metrics}: row {index} has no integer 'step'")
    events_path = folder / "interventions.jsonl"
    events = read_jsonl(events_path) if events_path.is_file() else []
    config_path = folder / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    main = main_line(rows)
    return RunData(folder, rows, main, eval_points(rows, main), events, config)


# ----------------------------------------------------------------------------------------------------------------
# Summary numbers (pure).


def number(value: Any) -> float | None:
    """value as a float when it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows whose `key` is a finite number."""
    pairs = [(int(r["step"]), number(r.get(key))) for r in rows]
    pairs = [(s, v) for s, v in pairs if v is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def guide_slots(rows: Sequence[dict[str, Any]]) -> int:
    """Guide slots summed over the rows (a row without the field counts 0)."""
    return int(sum(r.get("guide_slots", 0) or 0 for r in rows))


def probes(run: RunData) -> int:
    """AutoNPO probe events of the run."""
    return sum(e.get("event") == "probe" for e in run.interventions)


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
        "probes": probes(run),
        "guide_slots": guide_slots(run.train_rows),
        "guide_slots_spent": guide_slots(run.rows),
        "superseded_rows": len(run.superseded),
        "reward_errors": run.last.get("reward_errors"),
        "skipped_rows": run.last.get("skipped_rows"),
    }
