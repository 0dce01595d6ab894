"""Evidence of a finished experiment grid: arms x seeds of run folders turned into docs/results.md and PNG plots.

Pure functions over parsed run folders (npo.analysis.report.load_run); nothing here trains or reads anything but
its inputs.

    grid = {"grpo": {0: load_run("out/grpo/seed0"), ...}, "npo_early": {...}}
    text = write_results(grid, spec, analysis_rows, meta, Path("docs/results.md"), Path("docs/figures"))

Definitions (written into the markdown too):

- acc_at(run, t): eval_acc of the last main-line evaluation with step <= t; final(run) = acc_at(run, T).
- compute units: one unit = one baseline step (generate samples_per_step rollouts and train on them). A point's
  compute = optimizer_steps + c_gen * max(0, samples_total - optimizer_steps * samples_per_step) / samples_per_step,
  with c_gen = generation's share of a step measured on the baseline's training rows (gen_share).
- target: the mean over seeds of the baseline's final(T); time to target = the first main-line evaluation (step <= T)
  with acc >= target.
- paired differences: arm minus baseline on the same seed (common random numbers), averaged per window, then
  mean +- standard error over seeds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot is imported
import numpy as np  # noqa: E402

from npo.analysis.report import (  # noqa: E402
    FINAL,
    EvalPoint,
    RunData,
    _finish_figure,
    _number,
    accuracy_auc,
    finish_axes,
    first_reaching,
    markdown_table,
)

SOURCES = ("past", "resample", "near_future", "far_future", "external")
"""Guide sources of the S analysis, in table order."""
ENTROPY_SMOOTHING = 10
"""Steps of the trailing moving average of the entropy plot."""
FIGURES = {
    "accuracy_steps.png": "held-out accuracy vs main-line step (mean ± s.e. over seeds)",
    "accuracy_compute.png": "held-out accuracy vs compute units (mean ± s.e. over seeds)",
    "entropy.png": f"policy entropy vs step (mean over seeds, moving average of {ENTROPY_SMOOTHING} steps)",
    "s_analysis.png": "S and Q vs Delta by guide source",
}
"""PNG files write_results puts in fig_dir, with their captions."""
ROLES = ("npo_early", "npo_early_late", "autonpo", "is_on", "is_off")
"""Roles an arm may play in the targets."""

# ----------------------------------------------------------------------------------------------------------------
# Numbers (pure).


def mean_se(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """(mean, standard error) of the values that are not None: s.e. = sample std (n - 1) / sqrt(n).

    (None, None) without values; (mean, None) with one value or an infinite one.
    """
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    if any(math.isinf(x) for x in xs):
        return mean, None
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var / len(xs))


def acc_at(run: RunData | None, t: int) -> float | None:
    """eval_acc of the last main-line evaluation with step <= t (pi^(step)'s accuracy); None if there is none."""
    if run is None:
        return None
    points = [p for p in run.evals if p.step <= t]
    return points[-1].acc if points else None


def _get(point_or_row: EvalPoint | dict[str, Any], key: str) -> Any:
    """A counter of an EvalPoint or of a metrics row."""
    if isinstance(point_or_row, dict):
        return point_or_row.get(key, 0) or 0
    return getattr(point_or_row, key)


def compute_units(point_or_row: EvalPoint | dict[str, Any], samples_per_step: int, c_gen: float) -> float:
    """Compute spent, in baseline steps:

        units = optimizer_steps + c_gen * max(0, samples_total - optimizer_steps * samples_per_step) / samples_per_step

    i.e. each optimizer step counts one (its own rollouts included) and samples generated beyond the optimizer
    steps' own rollouts (guides, probes) count c_gen per samples_per_step. Raises ValueError for
    samples_per_step <= 0.
    """
    if samples_per_step <= 0:
        raise ValueError(f"samples_per_step: must be > 0, got {samples_per_step}")
    opt = float(_get(point_or_row, "optimizer_steps"))
    samples = float(_get(point_or_row, "samples_total"))
    extra = max(0.0, samples - opt * samples_per_step)
    return opt + c_gen * extra / samples_per_step


def gen_share(runs: Iterable[RunData | None]) -> float | None:
    """c_gen = sum(gen_seconds) / sum(gen_seconds + train_seconds) over every training row (final rows excluded)
    of the runs; None when the rows carry no timing."""
    gen = train = 0.0
    for run in runs:
        if run is None:
            continue
        for row in run.rows:
            if row.get("segment") == FINAL:
                continue
            g, tr = _number(row.get("gen_seconds")), _number(row.get("train_seconds"))
            if g is not None and tr is not None:
                gen += g
                train += tr
    return gen / (gen + train) if gen + train > 0 else None


def spent_at(run: RunData, t: int) -> dict[str, Any]:
    """Counters (optimizer_steps, samples_total, wall_time) spent when pi^(t) existed: those of the row written just
    before the main-line row of step t; the last row's when the main line has no step t."""
    row = next((r for r in run.main if int(r["step"]) == t), None)
    if row is None:
        return dict(run.last)
    previous: dict[str, Any] = {}
    for r in run.rows:
        if r is row:
            return dict(previous)
        previous = r
    return dict(run.last)


def _points_upto(run: RunData, t: int) -> list[EvalPoint]:
    """Main-line evaluations with step <= t."""
    return [p for p in run.evals if p.step <= t]


def mean_entropy(run: RunData, horizon: int, window: int) -> float | None:
    """Mean training entropy of the main-line rows with horizon - window <= step < horizon (None if none)."""
    values = [_number(r.get("entropy")) for r in run.train_rows if horizon - window <= int(r["step"]) < horizon]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def arm_stats(
    runs: dict[int, RunData | None],
    seeds: Sequence[int],
    *,
    horizon: int,
    window: int,
    target: float | None,
    samples_per_step: int,
    c_gen: float,
) -> dict[str, Any]:
    """Per-seed numbers of one arm (dicts seed -> value, None where the run is missing or has no such data):
    final (acc at T), best (max acc up to T), auc (accuracy_auc over steps <= T), entropy (mean_entropy),
    compute_total / wall_total (spent_at T), reach (first evaluation <= T reaching target: step, optimizer_steps,
    compute, wall_time; None if never), plus missing (seeds without a run) and incomplete (seed -> last main-line
    step for runs whose main line stops before T)."""
    out: dict[str, Any] = {
        "seeds": list(seeds),
        "missing": [],
        "incomplete": {},
        **{k: {} for k in ("final", "best", "auc", "entropy", "compute_total", "wall_total", "reach")},
    }
    for seed in seeds:
        run = runs.get(seed)
        if run is None:
            out["missing"].append(seed)
            for key in ("final", "best", "auc", "entropy", "compute_total", "wall_total", "reach"):
                out[key][seed] = None
            continue
        last_step = int(run.main[-1]["step"]) if run.main else -1
        if last_step < horizon:
            out["incomplete"][seed] = last_step
        points = _points_upto(run, horizon)
        out["final"][seed] = acc_at(run, horizon)
        out["best"][seed] = max(p.acc for p in points) if points else None
        out["auc"][seed] = accuracy_auc(points)
        out["entropy"][seed] = mean_entropy(run, horizon, window)
        spent = spent_at(run, horizon) if run.rows else {}
        out["compute_total"][seed] = compute_units(spent, samples_per_step, c_gen) if run.rows else None
        out["wall_total"][seed] = _number(spent.get("wall_time"))
        hit = first_reaching(points, target)
        out["reach"][seed] = (
            None
            if hit is None
            else {
                "step": float(hit.step),
                "optimizer_steps": float(hit.optimizer_steps),
                "compute": compute_units(hit, samples_per_step, c_gen),
                "wall_time": float(hit.wall_time),
            }
        )
    return out


CRN_KEYS = ("reward_mean", "pass_rate", "loss", "entropy")
"""Row values compared by crn_prefix (everything a step computes from its rollouts and update)."""


def crn_prefix(arm: RunData, base: RunData) -> tuple[int, int | None]:
    """Common random numbers, checked: (k, s) where the first k rows the arm wrote equal the baseline's rows of the
    same steps on CRN_KEYS, and s is the step of the first row that differs (None if none differs). An NPO run's
    scout is its GRPO twin's first steps, so k >= the scout length and the first difference is a guided step."""
    by_step = {int(r["step"]): r for r in base.rows if r.get("segment") != FINAL}
    k = 0
    for row in arm.rows:
        if row.get("segment") == FINAL:
            break
        twin = by_step.get(int(row["step"]))
        if twin is None or any(row.get(key) != twin.get(key) for key in CRN_KEYS):
            return k, int(row["step"])
        k += 1
    return k, None


def activity(run: RunData) -> dict[str, int]:
    """What an arm did besides plain steps: guide slots on the main line, guide slots spent in total (scouts and
    superseded replays included), rollbacks, AutoNPO probes, optimizer steps and samples of the whole run."""
    return {
        "guide_slots": int(sum(r.get("guide_slots", 0) or 0 for r in run.main if r.get("segment") != FINAL)),
        "guide_slots_spent": int(sum(r.get("guide_slots", 0) or 0 for r in run.rows)),
        "rollbacks": len(run.rollbacks),
        "probes": sum(e.get("event") == "probe" for e in run.interventions),
        "optimizer_steps": int(run.last.get("optimizer_steps", 0) or 0),
        "samples_total": int(run.last.get("samples_total", 0) or 0),
    }


def crossing(
    run: RunData, target: float, horizon: int, *, by: str = "step", samples_per_step: int = 1, c_gen: float = 0.0
) -> float | None:
    """The first x (main-line step, or compute units with by="compute") where the run's accuracy curve, linear
    between its evaluations with step <= horizon, reaches `target`; None if it does not by the horizon."""
    previous: tuple[float, float] | None = None
    for p in _points_upto(run, horizon):
        x = float(p.step) if by == "step" else compute_units(p, samples_per_step, c_gen)
        if p.acc >= target - 1e-12:
            if previous is None or p.acc == previous[1]:
                return x
            x0, a0 = previous
            return x0 + (target - a0) / (p.acc - a0) * (x - x0)
        previous = (x, p.acc)
    return None


def paired_speed(
    arm: dict[int, RunData | None],
    base: dict[int, RunData | None],
    horizon: int,
    *,
    by: str = "step",
    samples_per_step: int = 1,
    c_gen: float = 0.0,
) -> dict[int, float | None]:
    """Per seed: the arm's crossing of its baseline twin's final accuracy (at the horizon) divided by the twin's own
    crossing of it (<= the horizon); None where the arm does not reach it by the horizon or a run is missing."""
    out: dict[int, float | None] = {}
    for seed, b in base.items():
        a = arm.get(seed)
        target = acc_at(b, horizon) if b is not None else None
        if a is None or b is None or target is None:
            out[seed] = None
            continue
        kw = {"by": by, "samples_per_step": samples_per_step, "c_gen": c_gen}
        xa, xb = crossing(a, target, horizon, **kw), crossing(b, target, horizon, **kw)
        out[seed] = xa / xb if xa is not None and xb else None
    return out


def reach_summary(stats: dict[str, Any], key: str) -> tuple[int, int, float | None]:
    """(seeds that reached the target, seeds, mean of reach[key] over the seeds that reached it)."""
    hits = [r[key] for r in stats["reach"].values() if r is not None]
    return len(hits), len(stats["seeds"]), (sum(hits) / len(hits) if hits else None)


def _windows(end: float, window: float) -> list[tuple[float, float]]:
    """Consecutive windows (lo, hi] of width `window` covering (0, end] (the last clipped to end)."""
    if window <= 0:
        raise ValueError(f"window: must be > 0, got {window}")
    out, lo = [], 0.0
    while lo < end - 1e-9:
        out.append((lo, min(lo + window, end)))
        lo += window
    return out


def step_differences(arm: RunData, base: RunData, lo: float, hi: float) -> float | None:
    """mean(arm eval_acc over its evaluations with lo < step <= hi) - mean(baseline's over the same window);
    None if either has no evaluation there."""
    a = [p.acc for p in arm.evals if lo < p.step <= hi]
    b = [p.acc for p in base.evals if lo < p.step <= hi]
    if not a or not b:
        return None
    return sum(a) / len(a) - sum(b) / len(b)


def compute_differences(
    arm: RunData, base: RunData, horizon: int, samples_per_step: int, c_gen: float
) -> list[tuple[float, float]]:
    """(arm compute units, arm acc - baseline acc at the same compute) for each arm evaluation with step <= T; the
    baseline's accuracy is interpolated linearly in compute units over its whole run (no extrapolation: points
    outside the baseline's compute range are left out)."""
    xs = np.array([compute_units(p, samples_per_step, c_gen) for p in base.evals], dtype=float)
    ys = np.array([p.acc for p in base.evals], dtype=float)
    if len(xs) == 0:
        return []
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    out = []
    for p in _points_upto(arm, horizon):
        x = compute_units(p, samples_per_step, c_gen)
        if xs[0] - 1e-9 <= x <= xs[-1] + 1e-9:
            out.append((x, p.acc - float(np.interp(x, xs, ys))))
    return out


def paired_windows(
    arm: dict[int, RunData | None],
    base: dict[int, RunData | None],
    *,
    window: int,
    horizon: int,
    by: str = "step",
    samples_per_step: int = 1,
    c_gen: float = 0.0,
) -> list[dict[str, Any]]:
    """Paired per-seed differences arm - baseline of eval accuracy, per window (lo, hi] of width `window`.

    by="step": windows over main-line steps in (0, T]; per seed, step_differences.
    by="compute": windows over the arm's compute units, covering its evaluations up to T; per seed, the mean of
    compute_differences of the arm's evaluations in the window (baseline interpolated at equal compute).
    Returns one dict per window: lo, hi, diffs (seed -> difference, seeds with a value only), mean, se, positive
    (seeds with a difference > 0), n. Raises ValueError for another `by` or window <= 0.
    """
    seeds = sorted(s for s in arm if arm[s] is not None and base.get(s) is not None)
    if by == "step":
        windows = _windows(float(horizon), float(window))
        per_seed = {
            s: [step_differences(arm[s], base[s], lo, hi) for lo, hi in windows]
            for s in seeds  # type: ignore[arg-type]
        }
    elif by == "compute":
        pairs = {s: compute_differences(arm[s], base[s], horizon, samples_per_step, c_gen) for s in seeds}  # type: ignore[arg-type]
        end = max((x for ps in pairs.values() for x, _ in ps), default=0.0)
        windows = _windows(end, float(window)) if end > 0 else []
        per_seed = {}
        for s in seeds:
            values = []
            for lo, hi in windows:
                ds = [d for x, d in pairs[s] if lo < x <= hi]
                values.append(sum(ds) / len(ds) if ds else None)
            per_seed[s] = values
    else:
        raise ValueError(f"by: must be 'step' or 'compute', got {by!r}")
    out = []
    for i, (lo, hi) in enumerate(windows):
        diffs = {s: per_seed[s][i] for s in seeds if per_seed[s][i] is not None}
        mean, se = mean_se(diffs.values())
        out.append(
            {
                "lo": lo,
                "hi": hi,
                "diffs": diffs,
                "mean": mean,
                "se": se,
                "positive": sum(d > 0 for d in diffs.values()),
                "n": len(diffs),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# S analysis (pure).


def s_table(analysis: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (source, delta): means over anchors and seeds of q, q0, kl_k3, mean_len, v, s (None values
    skipped), rows (count) and failed (sum). Sorted by SOURCES order, then delta."""
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for row in analysis:
        source = str(row.get("source"))
        if source not in SOURCES:
            raise ValueError(f"analysis: unknown source {source!r} (expected one of {', '.join(SOURCES)})")
        delta = row.get("delta")
        groups.setdefault((source, None if delta is None else int(delta)), []).append(row)

    def order(key: tuple[str, int | None]) -> tuple[int, int]:
        return SOURCES.index(key[0]), key[1] if key[1] is not None else 0

    out = []
    for key in sorted(groups, key=order):
        rows = groups[key]
        entry: dict[str, Any] = {"source": key[0], "delta": key[1], "rows": len(rows)}
        for field in ("q", "q0", "kl_k3", "mean_len", "v", "s"):
            values = [float(r[field]) for r in rows if r.get(field) is not None and not math.isnan(float(r[field]))]
            entry[field] = sum(values) / len(values) if values else None
        entry["failed"] = int(sum(int(r.get("failed") or 0) for r in rows))
        out.append(entry)
    return out


def s_checks(table: Sequence[dict[str, Any]]) -> dict[str, tuple[bool | None, str]]:
    """Verdicts on the S table: "interior" = S(Delta) over near_future deltas is largest at neither the smallest
    nor the largest Delta and above S at Delta = 0 (resample); "near_beats" = near_future's best S exceeds the
    best S of past, far_future and external. Each: (met or None when not decidable, detail)."""
    near = [r for r in table if r["source"] == "near_future" and r["s"] is not None]
    resample = next((r for r in table if r["source"] == "resample" and r["s"] is not None), None)
    others = [r for r in table if r["source"] in ("past", "far_future", "external") and r["s"] is not None]
    out: dict[str, tuple[bool | None, str]] = {}
    if len(near) < 3 or resample is None:
        out["interior"] = (None, f"needs >= 3 near-future deltas and the resample point ({len(near)} deltas)")
    else:
        best = max(range(len(near)), key=lambda i: near[i]["s"])
        interior = 0 < best < len(near) - 1
        above = near[best]["s"] > resample["s"]
        curve = ", ".join(f"S({r['delta']})={r['s']:.3f}" for r in near)
        out["interior"] = (
            interior and above,
            f"max at Delta={near[best]['delta']} ({'interior' if interior else 'edge'}); S(0)={resample['s']:.3f}; "
            f"{curve}",
        )
    if not near or not others:
        out["near_beats"] = (None, "needs near_future and at least one of past, far_future, external")
    else:
        best_near = max(near, key=lambda r: r["s"])
        best_other = max(others, key=lambda r: r["s"])
        out["near_beats"] = (
            best_near["s"] > best_other["s"],
            f"near_future best S={best_near['s']:.3f} (Delta={best_near['delta']}) vs {best_other['source']} "
            f"best S={best_other['s']:.3f}"
            + (f" (Delta={best_other['delta']})" if best_other["delta"] is not None else ""),
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Targets (pure).


def _pts(value: float | None, signed: bool = False) -> str:
    """An accuracy (fraction) as percentage points with one decimal ("n/a" for None)."""
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    """A number with `digits` decimals ("n/a" for None, "inf" for infinity)."""
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _final_mean(stats: dict[str, Any]) -> float | None:
    return mean_se(stats["final"].values())[0]


def targets(
    stats: dict[str, dict[str, Any]], spec: dict[str, Any], checks: dict[str, tuple[bool | None, str]]
) -> list[dict[str, Any]]:
    """Verdicts of the issue's targets (a)-(j): dicts name, met (True / False / None = n/a), detail.

    stats: arm -> arm_stats; spec: baseline and roles (see write_results); checks: s_checks of the S table.
    Time-to-target comparisons use the mean over the seeds that reached the target and require the arm to reach
    it on at least as many seeds as the baseline.
    """
    roles = spec.get("roles", {}) or {}
    base_name = spec["baseline"]
    base = stats[base_name]

    def role(name: str) -> dict[str, Any] | None:
        arm = roles.get(name)
        return stats.get(arm) if arm is not None else None

    out: list[dict[str, Any]] = []

    def add(name: str, met: bool | None, detail: str) -> None:
        out.append({"name": name, "met": met, "detail": detail})

    def final_cmp(name: str, a_role: str, b: dict[str, Any] | None, b_name: str | None, margin: float, strict: bool):
        a = role(a_role)
        fa, fb = (_final_mean(a) if a else None), (_final_mean(b) if b else None)
        if fa is None or fb is None:
            add(name, None, "n/a (arm missing or without evaluations)")
            return
        met = fa > fb + margin if strict else fa >= fb + margin - 1e-12
        need = f"; need {'>' if strict else '>='} {_pts(margin, signed=True)}" if margin else ""
        add(name, met, f"{roles[a_role]} {_pts(fa)} vs {b_name} {_pts(fb)}: {_pts(fa - fb, signed=True)} points{need}")

    def reach_cmp(name: str, a_role: str, key: str, factor: float, strict: bool):
        a = role(a_role)
        if a is None:
            add(name, None, "n/a (role missing)")
            return
        ka, n, ma = reach_summary(a, key)
        kb, nb, mb = reach_summary(base, key)
        if ma is None or mb is None:
            add(name, False if mb is not None else None, f"{roles[a_role]} reached {ka}/{n}, {base_name} {kb}/{nb}")
            return
        ratio = ma / mb if mb > 0 else math.inf
        ok = ka >= kb and (ratio < factor if strict else ratio <= factor + 1e-12)
        add(
            name,
            ok,
            f"{roles[a_role]} {_num(ma)} ({ka}/{n} seeds) vs {base_name} {_num(mb)} ({kb}/{nb} seeds): "
            f"ratio {_num(ratio, 2)} (need {'<' if strict else '<='} {factor:.2f}, reached on >= as many seeds)",
        )

    final_cmp("(a) autonpo final >= baseline final + 5 points", "autonpo", base, base_name, 0.05, False)
    reach_cmp("(b) autonpo reaches the target in <= 50% of the baseline's steps", "autonpo", "step", 0.5, False)
    reach_cmp("(c) autonpo reaches the target in less compute than the baseline", "autonpo", "compute", 1.0, True)
    reach_cmp("(d) npo_early reaches the target in <= 50% of the baseline's steps", "npo_early", "step", 0.5, False)
    final_cmp(
        "(e) npo_early_late final > npo_early final",
        "npo_early_late",
        role("npo_early"),
        roles.get("npo_early"),
        0.0,
        True,
    )
    final_cmp(
        "(f) autonpo final >= npo_early_late final",
        "autonpo",
        role("npo_early_late"),
        roles.get("npo_early_late"),
        0.0,
        False,
    )
    add("(g) S(Delta) has an interior maximum above S(0)", *checks.get("interior", (None, "n/a (no analysis)")))
    add("(h) near-future guides have the best S of all sources", *checks.get("near_beats", (None, "n/a (no analysis)")))

    on, off = role("is_on"), role("is_off")
    if on is None or off is None:
        add("(i) IS correction on/off: |final difference| < its paired s.e.", None, "n/a (role missing)")
    else:
        diffs = [
            on["final"][s] - off["final"][s]
            for s in sorted(on["final"])
            if on["final"].get(s) is not None and off["final"].get(s) is not None
        ]
        mean, se = mean_se(diffs)
        met = None if mean is None or se is None else abs(mean) < se
        add(
            "(i) IS correction on/off: |final difference| < its paired s.e.",
            met,
            f"{roles['is_on']} - {roles['is_off']} = {_pts(mean, signed=True)} ± {_pts(se)} points over {len(diffs)} "
            "paired seeds",
        )

    base_entropy = mean_se(base["entropy"].values())[0]
    parts, verdicts = [], []
    for r in ("npo_early", "autonpo"):
        s = role(r)
        if s is None:
            continue
        e = mean_se(s["entropy"].values())[0]
        if e is None or base_entropy is None:
            verdicts.append(None)
        else:
            verdicts.append(e > base_entropy)
        parts.append(f"{r} ({roles[r]}) {_num(e, 3)}")
    if not parts:
        add("(j) npo_early / autonpo entropy over the last window > baseline's", None, "n/a (roles missing)")
    else:
        met = None if any(v is None for v in verdicts) else all(verdicts)
        add(
            "(j) npo_early / autonpo entropy over the last window > baseline's",
            met,
            ", ".join(parts) + f" vs {base_name} {_num(base_entropy, 3)}",
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Plots.


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


def plot_accuracy_steps(grid, arms, labels, horizon: int, path: Path) -> Path:
    """Mean ± s.e. over seeds of eval_acc vs main-line step, one line per arm; T marked."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
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
    return _finish_figure(fig, ax, path, "main-line step", "held-out accuracy (points)", "accuracy vs step")


def plot_accuracy_compute(grid, arms, labels, samples_per_step: int, c_gen: float, path: Path) -> Path:
    """Mean ± s.e. over seeds of eval_acc vs compute units: each seed interpolated linearly onto the union of the
    seeds' compute points, within the range all seeds cover."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
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
    return _finish_figure(
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


def plot_entropy(grid, arms, labels, path: Path) -> Path:
    """Mean over seeds of main-line training entropy vs step, trailing moving average of ENTROPY_SMOOTHING steps."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in arms:
        by_step: dict[int, list[float]] = {}
        for run in grid[arm].values():
            if run is not None:
                for r in run.train_rows:
                    e = _number(r.get("entropy"))
                    if e is not None:
                        by_step.setdefault(int(r["step"]), []).append(e)
        if by_step:
            steps = sorted(by_step)
            means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            ax.plot(steps, moving_average(means, ENTROPY_SMOOTHING), linewidth=1.3, label=labels[arm])
    return _finish_figure(fig, ax, path, "main-line step", "entropy (nats / token)", "policy entropy vs step")


def plot_s(table: Sequence[dict[str, Any]], path: Path) -> Path:
    """S and Q vs Delta: past (negative Delta), resample (0) and near_future on one line; far_future and external
    as horizontal lines."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
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
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Markdown.


def _pm(values: Iterable[float | None], scale: float = 100.0, digits: int = 1) -> str:
    """ "mean ± s.e." of the values (scaled), "mean ± n/a" with one value, "n/a" without."""
    mean, se = mean_se(values)
    if mean is None:
        return "n/a"
    fmt = lambda x: _num(x * scale if x is not None and math.isfinite(x) else x, digits)  # noqa: E731
    return f"{fmt(mean)} ± {fmt(se)}"


def _paired_cell(window: dict[str, Any]) -> str:
    """ "+2.1 ± 0.8 (4/5 > 0)" in points."""
    if window["mean"] is None:
        return "n/a"
    return f"{_pts(window['mean'], signed=True)} ± {_pts(window['se'])} ({window['positive']}/{window['n']} > 0)"


def _meta_lines(meta: dict[str, Any]) -> str:
    keys = ["command", "machine", "wall_seconds", "started", "finished", "commit", "versions"]
    keys += sorted(k for k in meta if k not in keys)
    lines = []
    for key in keys:
        value = meta.get(key)
        if isinstance(value, dict):
            value = ", ".join(f"{k} {value[k]}" for k in sorted(value))
        elif isinstance(value, float):
            value = f"{value:.1f}"
        lines.append(
            f"- {key}: {'n/a' if value is None or value == '' else f'`{value}`' if key == 'command' else value}"
        )
    return "\n".join(lines)


DEFINITIONS = """\
- **final** = acc_at(run, T): eval_acc (held-out, sampled) of the last main-line evaluation with step <= T (pi^(step)).
- **compute units**: one unit = one baseline step (generating samples_per_step rollouts and training on them).
  units = optimizer_steps + c_gen * max(0, samples_total - optimizer_steps * samples_per_step) / samples_per_step;
  scout and replayed steps count (optimizer_steps is cumulative over superseded rows) and extra samples (guides,
  probes) count their generation cost. c_gen = sum(gen_seconds) / sum(gen_seconds + train_seconds) over the
  baseline's training rows. Wall seconds are reported beside it.
- **mean ± s.e.**: over seeds; s.e. = sample standard deviation (n - 1) / sqrt(n); "n/a" with one seed.
- **AUC**: mean accuracy of the piecewise-linear accuracy curve over the evaluations with step <= T.
- **target** = mean over seeds of the baseline's final; **time to target** = first main-line evaluation with step
  <= T whose accuracy >= target, reported as k/n seeds reached and the mean over the seeds that reached it; the
  ratio is that mean divided by the baseline's. Counters of a point are those spent when pi^(step) was evaluated.
- **entropy**: mean training entropy of the main-line rows with T - window <= step < T.
- **total compute / wall** at T: counters spent when pi^(T) existed (row written just before the main-line row T).
- **paired differences**: arm minus baseline on the same seed (common random numbers: the runs are identical until
  the first guide). Equal steps: mean eval_acc over the evaluations in each window (lo, hi] of main-line steps,
  arm minus baseline. Equal compute: at each arm evaluation (step <= T), the baseline's accuracy interpolated
  linearly in compute units over its whole (longer) run, no extrapolation; averaged per window of the arm's
  compute. Cells: mean ± s.e. over seeds (count of seeds with a positive difference)."""


def write_results(
    grid: dict[str, dict[int, RunData]],
    spec: dict[str, Any],
    analysis: list[dict[str, Any]],
    meta: dict[str, Any],
    out_md: Path,
    fig_dir: Path,
) -> str:
    """Write the results markdown to out_md and FIGURES to fig_dir (referenced relative to out_md's folder);
    returns the markdown.

    grid: arm -> seed -> RunData (a seed absent or None is a missing run, reported as such).
    spec: arms [{name, label, description}], baseline, horizon T, roles {npo_early, npo_early_late, autonpo,
    is_on, is_off} (any may be absent), window, samples_per_step, eval_samples.
    analysis: S-analysis rows {seed, anchor, source, delta, q, q0, kl_k3, mean_len, v, s, failed}.
    meta: command, machine, wall_seconds, started, finished, commit, versions.
    Raises ValueError when the baseline arm is not in the grid.
    """
    out_md, fig_dir = Path(out_md), Path(fig_dir)
    base_name = spec["baseline"]
    if base_name not in grid:
        raise ValueError(f"spec: baseline arm {base_name!r} is not in the grid ({', '.join(sorted(grid))})")
    horizon, window, sps = int(spec["horizon"]), int(spec["window"]), int(spec["samples_per_step"])
    spec_arms = {a["name"]: a for a in spec.get("arms", [])}
    arms = [a for a in spec_arms if a in grid] + sorted(a for a in grid if a not in spec_arms)
    labels = {a: str(spec_arms.get(a, {}).get("label", a)) for a in arms}
    seeds = sorted({s for runs in grid.values() for s in runs})
    grid = {a: {s: grid[a].get(s) for s in seeds} for a in arms}

    measured = gen_share(grid[base_name].values())
    c_gen = measured if measured is not None else 1.0
    base_finals = [acc_at(grid[base_name][s], horizon) for s in seeds]
    target = mean_se(base_finals)[0]
    common = dict(horizon=horizon, window=window, target=target, samples_per_step=sps, c_gen=c_gen)
    stats = {a: arm_stats(grid[a], seeds, **common) for a in arms}
    table = s_table(analysis)
    checks = s_checks(table)
    verdicts = targets(stats, spec, checks)

    fig_dir.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(fig_dir, out_md.parent)).as_posix()
    plot_accuracy_steps(grid, arms, labels, horizon, fig_dir / "accuracy_steps.png")
    plot_accuracy_compute(grid, arms, labels, sps, c_gen, fig_dir / "accuracy_compute.png")
    plot_entropy(grid, arms, labels, fig_dir / "entropy.png")
    figures = ["accuracy_steps.png", "accuracy_compute.png", "entropy.png"]
    if table:
        plot_s(table, fig_dir / "s_analysis.png")
        figures.append("s_analysis.png")

    def img(name: str) -> str:
        return f"![{FIGURES[name]}]({rel}/{name})"

    parts = ["# Results", "", _meta_lines(meta), ""]
    if spec.get("discussion"):
        parts += [str(spec["discussion"]).rstrip(), ""]
    parts += [
        f"Arms x seeds: {len(arms)} x {len(seeds)} (seeds {', '.join(map(str, seeds))}); baseline `{base_name}`; "
        f"T = {horizon}; window = {window} steps; samples_per_step = {sps}; held-out samples per evaluation = "
        f"{spec.get('eval_samples', 'n/a')}.",
        "",
        f"c_gen (generation's share of a baseline step, measured) = {_num(measured, 3)}"
        + ("" if measured is not None else " (no timing in the baseline's rows: 1.0 used)")
        + f". Target (baseline's mean final at T) = {_pts(target)}.",
        "",
        "## Definitions",
        "",
        DEFINITIONS,
        "",
        "## Arms",
        "",
        markdown_table(
            ["arm", "label", "description"],
            [[a, labels[a], str(spec_arms.get(a, {}).get("description", ""))] for a in arms],
        ),
        "",
    ]

    # Runs: status of every (arm, seed).
    run_rows, warnings = [], []
    for a in arms:
        for s in seeds:
            run = grid[a][s]
            if run is None:
                run_rows.append([a, str(s), "MISSING", "n/a", "n/a", "n/a", "n/a"])
                warnings.append(f"- {a} seed {s}: run missing.")
                continue
            last_step = int(run.main[-1]["step"]) if run.main else -1
            status = "ok" if last_step >= horizon else f"incomplete (last step {last_step})"
            if last_step < horizon:
                warnings.append(f"- {a} seed {s}: main line stops at step {last_step} < T; its values are read there.")
            run_rows.append(
                [a, str(s), status, str(last_step), str(len(run.evals)), str(len(run.rollbacks)), str(run.folder)]
            )
    parts += [
        "## Runs",
        "",
        markdown_table(["arm", "seed", "status", "last step", "evals", "rollbacks", "folder"], run_rows),
        "",
    ]
    if warnings:
        parts += ["Warnings:", "", *warnings, ""]

    # Per-arm summary.
    summary_rows = []
    for a in arms:
        st = stats[a]
        summary_rows.append(
            [
                a,
                _pm(st["final"].values()),
                _pm(st["best"].values()),
                _pm(st["auc"].values()),
                _pm(st["entropy"].values(), scale=1.0, digits=3),
                _pm(st["compute_total"].values(), scale=1.0),
                _pm(st["wall_total"].values(), scale=1.0),
            ]
        )
    parts += [
        "## Per-arm summary (mean ± s.e. over seeds, accuracies in points)",
        "",
        markdown_table(
            [
                "arm",
                "final at T",
                "best up to T",
                "AUC 0..T",
                "entropy (last window)",
                "compute units at T",
                "wall s at T",
            ],
            summary_rows,
        ),
        "",
    ]

    # Time to target.
    reach_rows = []
    for a in arms:
        cells = [a]
        for key in ("step", "optimizer_steps", "compute", "wall_time"):
            k, n, m = reach_summary(stats[a], key)
            _, _, mb = reach_summary(stats[base_name], key)
            ratio = m / mb if m is not None and mb else None
            if key == "step":
                cells.append(f"{k}/{n}")
            cells.append(f"{_num(m)} (x{_num(ratio, 2)})" if m is not None else "never")
        reach_rows.append(cells)
    parts += [
        f"## Time to target ({_pts(target)})",
        "",
        "Mean over the seeds that reached the target; in brackets the ratio to the baseline's mean.",
        "",
        markdown_table(["arm", "seeds reached", "steps", "optimizer steps", "compute units", "wall s"], reach_rows),
        "",
    ]

    # Paired speed: the twin's own final accuracy as the target.
    speed_rows = []
    for a in arms:
        cells = [a]
        for by in ("step", "compute"):
            ratios = paired_speed(grid[a], grid[base_name], horizon, by=by, samples_per_step=sps, c_gen=c_gen)
            hit = [r for r in ratios.values() if r is not None]
            cells.append(f"{len(hit)}/{len(ratios)}")
            cells.append(_pm(hit, scale=1.0, digits=2) if hit else "never")
            cells.append(", ".join("-" if r is None else f"{r:.2f}" for r in ratios.values()))
        speed_rows.append(cells)
    parts += [
        f"## Speed to the baseline's final accuracy, paired by seed (target per seed: its {base_name} twin at T)",
        "",
        "Ratio = the step (or compute) at which the arm's accuracy curve (linear between evaluations) first reaches "
        f"its {base_name} twin's accuracy at T, divided by where the twin's own curve first reaches it; below 1 is "
        "faster. Seeds that do not reach it by T are counted as not reached and left out of the mean.",
        "",
        markdown_table(
            ["arm", "reached (steps)", "step ratio", "per seed", "reached (compute)", "compute ratio", "per seed"],
            speed_rows,
        ),
        "",
    ]

    # Final accuracy per seed.
    seed_rows = [
        [str(s)] + [_pts(stats[a]["final"][s]) if grid[a][s] is not None else "missing" for a in arms] for s in seeds
    ]
    parts += ["## Final accuracy at T per seed (points)", "", markdown_table(["seed", *arms], seed_rows), ""]

    # What each arm did, and the common-random-numbers check.
    act_rows = []
    for a in arms:
        acts = [activity(grid[a][s]) for s in seeds if grid[a][s] is not None]
        crn = [
            crn_prefix(grid[a][s], grid[base_name][s])
            for s in seeds
            if a != base_name and grid[a][s] is not None and grid[base_name][s] is not None
        ]
        keys = ("guide_slots", "guide_slots_spent", "rollbacks", "probes", "optimizer_steps", "samples_total")
        cells = [a] + [_pm([x[k] for x in acts], scale=1.0) for k in keys]
        cells.append(", ".join(f"{k}" + (f"→{d}" if d is not None else "") for k, d in crn) if crn else "-")
        act_rows.append(cells)
    parts += [
        "## What each arm did (mean ± s.e. over seeds)",
        "",
        "guide slots: guides inserted on the main line / in every step written (scouts and superseded replays "
        "included). CRN: per seed, the number of rows the arm wrote that equal its baseline twin's rows of the same "
        "steps (reward, pass rate, loss, entropy), then →the step of the first row that differs (the first guided "
        "step, or the replay after a rollback).",
        "",
        markdown_table(
            [
                "arm",
                "guide slots (main)",
                "guide slots (all)",
                "rollbacks",
                "probes",
                "optimizer steps",
                "samples",
                "CRN: identical rows→first difference",
            ],  # fmt: skip
            act_rows,
        ),
        "",
    ]

    # Paired differences.
    others = [a for a in arms if a != base_name]
    for by, title in (("step", "equal main-line steps"), ("compute", "equal compute")):
        parts += [f"## Paired differences vs {base_name} at {title} (points)", ""]
        if not others:
            parts += ["No arm besides the baseline.", ""]
            continue
        results = {
            a: paired_windows(
                grid[a], grid[base_name], window=window, horizon=horizon, by=by, samples_per_step=sps, c_gen=c_gen
            )
            for a in others
        }
        unit = "steps" if by == "step" else "compute units"
        header = [f"window ({unit})", *others]
        if by == "step":
            rows = []
            for i, w in enumerate(results[others[0]]):
                rows.append([f"({w['lo']:.0f}, {w['hi']:.0f}]"] + [_paired_cell(results[a][i]) for a in others])
            parts += [markdown_table(header, rows), ""]
        else:
            # Windows depend on each arm's compute range: one small table per arm.
            for a in others:
                rows = [[f"({w['lo']:.0f}, {w['hi']:.0f}]", _paired_cell(w)] for w in results[a]]
                parts += [
                    f"{a}:",
                    "",
                    markdown_table([f"window ({unit})", a], rows)
                    if rows
                    else "no overlap with the baseline's compute range",
                    "",
                ]

    # Curves.
    parts += ["## Curves", "", *(img(n) + "\n" for n in figures[:3])]

    # S analysis.
    parts += ["## S analysis (Q, V, S by guide source and Delta)", ""]
    if not table:
        parts += ["No analysis rows.", ""]
    else:
        s_rows = [
            [
                r["source"],
                _num(r["delta"], 0) if r["delta"] is not None else "-",
                _num(r["q"], 3),
                _num(r["q0"], 3),
                _num(r["kl_k3"], 4),
                _num(r["mean_len"], 1),
                _num(r["v"], 3),
                _num(r["s"], 3),
                str(r["rows"]),
                str(r["failed"]),
            ]
            for r in table
        ]
        parts += [
            "Means over anchors and seeds. Q: fraction of the anchor's failed prompts the source solves; "
            "Q0: the same for pi^(t) resampled (Delta = 0, the noise floor); kl_k3: per-token KL estimate (k3); "
            "V = exp(mean_len * KL); S = Q / V; rows: (anchor, seed) rows; failed: anchors' failed prompts, summed.",
            "",
            markdown_table(["source", "Delta", "Q", "Q0", "kl_k3", "mean len", "V", "S", "rows", "failed"], s_rows),
            "",
            img("s_analysis.png"),
            "",
        ]
        for key, name in (
            ("interior", "Interior maximum of S(Delta)"),
            ("near_beats", "Near future beats other sources"),
        ):
            met, detail = checks[key]
            parts.append(f"- {name}: {_verdict(met)} — {detail}")
        parts.append("")

    # Targets.
    parts += [
        "## Targets",
        "",
        "(i) uses the per-seed paired difference is_on - is_off: with common random numbers its s.e. is the noise of "
        "the comparison itself, so a difference smaller than one s.e. is indistinguishable from zero.",
        "",
    ]
    parts += [f"- {t['name']}: **{_verdict(t['met'])}** — {t['detail']}" for t in verdicts]
    parts.append("")
    text = "\n".join(parts)
    out_md.write_text(text)
    return text


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else "MET" if met else "NOT MET"
