"""Every plot of npo.analysis: one run's curves, run comparisons, an experiment grid's mean ± s.e. curves, the S
analysis by guide source and the Q / V / S curves of one run's checkpoints.

matplotlib is loaded on the first plot (pyplot(), Agg backend: no display needed), so importing npo.analysis costs
no matplotlib import. Each function draws one PNG (100 dpi) and returns its path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from npo.analysis.runs import RunData, number, series
from npo.analysis.stats import compute_units, mean_se

ENTROPY_SMOOTHING = 10
"""Steps of the trailing moving average of the grid's entropy plot."""


@functools.cache
def pyplot():
    """matplotlib.pyplot with the Agg backend, chosen once, on the first call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------------------------
# Axes and figures.


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


def save_figure(fig, path: Path) -> Path:
    """Tight layout, save as PNG (100 dpi), close; returns path."""
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    pyplot().close(fig)
    return path


def finish_figure(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """finish_axes on the figure's one axes, then save_figure; returns path."""
    finish_axes(ax, xlabel, ylabel, title)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# One run.


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


def plot_metric(run: RunData, key: str, path: Path, ylabel: str) -> Path:
    """`key` vs step: the main line as a line, superseded rows as grey dots, rollbacks marked."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    steps, values = series(run.superseded, key)
    if steps:
        ax.scatter(steps, values, s=8, color="grey", alpha=0.5, label="superseded (scout / before rollback)")
    steps, values = series(run.train_rows, key)
    if steps:
        ax.plot(steps, values, color="tab:blue", linewidth=1.2, label="main line")
    _mark_rollbacks_by_step(ax, run)
    return finish_figure(fig, ax, path, "step", ylabel, f"{run.label}: {ylabel}")


def plot_accuracy(run: RunData, path: Path) -> Path:
    """Held-out accuracy (sampled, and greedy when present) vs step, rollbacks marked."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    if run.evals:
        ax.plot([p.step for p in run.evals], [p.acc for p in run.evals], "o-", ms=3, label="eval_acc (sampled)")
        greedy = [p for p in run.evals if p.greedy_acc is not None]
        if greedy:
            ax.plot([p.step for p in greedy], [p.greedy_acc for p in greedy], "s--", ms=3, label="eval_greedy_acc")
    _mark_rollbacks_by_step(ax, run)
    return finish_figure(fig, ax, path, "step", "held-out accuracy", f"{run.label}: held-out accuracy")


def plot_accuracy_compute(run: RunData, path: Path) -> Path:
    """Held-out accuracy of the main line vs optimizer steps spent (scouts and replays counted)."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    if run.evals:
        ax.plot([p.optimizer_steps for p in run.evals], [p.acc for p in run.evals], "o-", ms=3, label="eval_acc")
    _mark_rollbacks_by_compute(ax, run)
    return finish_figure(
        fig, ax, path, "optimizer steps spent (compute)", "held-out accuracy", f"{run.label}: accuracy at equal compute"
    )


# ----------------------------------------------------------------------------------------------------------------
# Run comparison.


def plot_overlay(
    runs: Sequence[RunData],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str,
    curve: Callable[[RunData], tuple[Sequence[float], Sequence[float]]],
) -> Path:
    """One line per run from curve(run) -> (xs, ys); runs with no points are listed in the legend as such."""
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for run in runs:
        xs, ys = curve(run)
        if xs:
            ax.plot(xs, ys, "-", marker="o" if len(xs) < 40 else None, ms=3, linewidth=1.2, label=run.label)
        else:
            ax.plot([], [], " ", label=f"{run.label} (no data)")
    return finish_figure(fig, ax, path, xlabel, ylabel, title)


# ----------------------------------------------------------------------------------------------------------------
# Experiment grid: grid[arm][seed] -> RunData or None (a missing run), one line per arm.


def _band(ax, xs: Sequence[float], values: Sequence[Sequence[float]], label: str) -> None:
    """Mean line and mean ± s.e. band of per-x value lists (accuracy fractions plotted as points)."""
    means, ses = [], []
    for v in values:
        m, s = mean_se(v)
        means.append(100 * m)  # type: ignore[operator]
        ses.append(100 * (s or 0.0))
    xs_a, m_a, s_a = np.array(xs, dtype=float), np.array(means), np.array(ses)
    line = ax.plot(xs_a, m_a, "-", linewidth=1.3, label=label)[0]
    ax.fill_between(xs_a, m_a - s_a, m_a + s_a, color=line.get_color(), alpha=0.2)


def plot_arms_accuracy_steps(grid, arms, labels, horizon: int, path: Path) -> Path:
    """Mean ± s.e. over seeds of eval_acc vs main-line step, one line per arm; T marked."""
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for arm in arms:
        by_step: dict[int, list[float]] = {}
        for run in grid[arm].values():
            if run is not None:
                for p in run.evals:
                    by_step.setdefault(p.step, []).append(p.acc)
        if by_step:
            steps = sorted(by_step)
            _band(ax, steps, [by_step[s] for s in steps], labels[arm])
    ax.axvline(horizon, color="grey", linestyle=":", linewidth=1)
    return finish_figure(fig, ax, path, "main-line step", "held-out accuracy (points)", "accuracy vs step")


def plot_arms_accuracy_compute(grid, arms, labels, samples_per_step: int, c_gen: float, path: Path) -> Path:
    """Mean ± s.e. over seeds of eval_acc vs compute units: each seed interpolated linearly onto the union of the
    seeds' compute points, within the range all seeds cover."""
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for arm in arms:
        curves = []
        for run in grid[arm].values():
            if run is not None and run.evals:
                xs = np.array([compute_units(p, samples_per_step, c_gen) for p in run.evals])
                curves.append((xs, np.array([p.acc for p in run.evals])))
        if not curves:
            continue
        lo, hi = max(c[0].min() for c in curves), min(c[0].max() for c in curves)
        grid_x = sorted({float(x) for c in curves for x in c[0] if lo - 1e-9 <= x <= hi + 1e-9})
        if not grid_x:
            continue
        values = [[float(np.interp(x, xs, ys)) for xs, ys in curves] for x in grid_x]
        _band(ax, grid_x, values, labels[arm])
    return finish_figure(
        fig, ax, path, "compute units (baseline steps)", "held-out accuracy (points)", "accuracy vs compute"
    )


def moving_average(values: Sequence[float], width: int) -> list[float]:
    """Trailing moving average: element i is the mean of values[max(0, i - width + 1) : i + 1]."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def plot_arms_entropy(grid, arms, labels, path: Path) -> Path:
    """Mean over seeds of main-line training entropy vs step, trailing moving average of ENTROPY_SMOOTHING steps."""
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for arm in arms:
        by_step: dict[int, list[float]] = {}
        for run in grid[arm].values():
            if run is not None:
                for r in run.train_rows:
                    e = number(r.get("entropy"))
                    if e is not None:
                        by_step.setdefault(int(r["step"]), []).append(e)
        if by_step:
            steps = sorted(by_step)
            means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            ax.plot(steps, moving_average(means, ENTROPY_SMOOTHING), linewidth=1.3, label=labels[arm])
    return finish_figure(fig, ax, path, "main-line step", "entropy (nats / token)", "policy entropy vs step")


def plot_s(table: Sequence[dict[str, Any]], path: Path) -> Path:
    """S and Q vs Delta from the S table (npo.analysis.stats.s_table): past (negative Delta), resample (0) and
    near_future on one line; far_future and external as horizontal lines."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for ax, field, name in ((axes[0], "s", "S = Q / V"), (axes[1], "q", "Q")):
        line = [r for r in table if r["source"] in ("past", "resample", "near_future") and r[field] is not None]
        if line:
            ax.plot([r["delta"] for r in line], [r[field] for r in line], "o-", ms=4, label="past / resample / near")
        if field == "q":
            q0 = [r for r in line if r["q0"] is not None]
            if q0:
                ax.plot([r["delta"] for r in q0], [r["q0"] for r in q0], "x:", ms=4, color="grey", label="Q0 (anchor)")
        for source, style in (("far_future", "--"), ("external", "-.")):
            for r in table:
                if r["source"] == source and r[field] is not None and math.isfinite(r[field]):
                    ax.axhline(
                        r[field],
                        linestyle=style,
                        linewidth=1,
                        color="tab:red" if source == "external" else "tab:green",
                        label=source,
                    )
        ax.axvline(0, color="grey", linewidth=0.8)
        finish_axes(ax, "Delta (steps)", name, f"{name} vs Delta")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Q / V / S of one run's checkpoints.


def plot_analysis(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Q, V (log scale once it exceeds 10) and S vs Delta from npo.analysis.qvs rows, one line per anchor t; Q(0)
    of each anchor dotted."""
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 4))
    for i, t in enumerate(sorted({r["anchor"] for r in rows})):
        color = f"C{i % 10}"
        mine = [r for r in rows if r["anchor"] == t]
        deltas = [r["delta"] for r in mine]
        for ax, key in zip(axes, ("q", "v", "s"), strict=True):
            values = [np.nan if r[key] is None or not math.isfinite(r[key]) else r[key] for r in mine]
            ax.plot(deltas, values, "o-", color=color, ms=4, label=f"t = {t}")
        if mine[0]["q0"] is not None:
            axes[0].axhline(mine[0]["q0"], color=color, linestyle=":", linewidth=1)
    for ax, title in zip(
        axes, ("Q(Delta)  (dotted: Q(0) floor)", "V(Delta) = exp(L KL)", "S(Delta) = Q / V"), strict=True
    ):
        ax.set_xlabel("Delta (steps)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    finite_v = [r["v"] for r in rows if math.isfinite(r["v"])]
    if finite_v and max(finite_v) > 10.0:
        axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# The regime screen.


def plot_screen(regimes: Sequence[dict[str, Any]], path: Path) -> Path:
    """Headroom H(Delta) (left) and H/prompt = |U| / P * H(Delta) (right) vs Delta, one line per regime, from the
    regimes' pooled per-Delta rows (npo.analysis.screen)."""
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.5))
    for i, regime in enumerate(regimes):
        rows = [r for r in regime.get("deltas", []) if r.get("h") is not None]
        if not rows:
            continue
        style = "o-" if i < 10 else "s--"
        for ax, key in zip(axes, ("h", "h_per_prompt"), strict=True):
            ax.plot([r["delta"] for r in rows], [100 * r[key] for r in rows], style, ms=4, label=regime["name"])
    finish_axes(axes[0], "Delta (steps)", "H (points of U)", "H(Delta): share of U that pi(t+Delta) solves")
    finish_axes(axes[1], "Delta (steps)", "H / prompt (points of P)", "|U|/P * H(Delta)")
    return save_figure(fig, path)
