"""Evidence statistics of an experiment grid (arms x seeds of run folders): accuracy at a horizon, compute units,
time to target, paired per-seed differences, the S table of the guide sources and the verdicts on the targets.

Pure functions over parsed run folders (npo.analysis.runs.load_run); nothing here trains, plots or writes.
npo.analysis.results turns these numbers into docs/results.md.

Definitions (written into the results markdown too):

- acc_at(run, t): eval_acc of the last main-line evaluation with step <= t; final(run) = acc_at(run, T).
- compute units: one unit = one baseline step (generate samples_per_step rollouts and train on them). A point's
  compute = optimizer_steps + c_gen * max(0, samples_total - optimizer_steps * samples_per_step) / samples_per_step,
  with c_gen = generation's share of a step measured on the baseline's training rows (gen_share).
- target: the mean over seeds of the baseline's final(T); time to target = the first main-line evaluation (step <= T)
  with acc >= target.
- paired differences: arm minus baseline on the same seed (common random numbers), averaged per window, then
  mean +- standard error over seeds.

    stats = {arm: arm_stats(grid[arm], seeds, horizon=T, window=w, target=target, samples_per_step=n, c_gen=c)
             for arm in grid}
    verdicts = targets(stats, spec, s_checks(s_table(analysis_rows)))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from npo.analysis.markdown import fmt_number, fmt_points
from npo.analysis.runs import FINAL, EvalPoint, RunData, accuracy_auc, first_reaching, guide_slots, number, probes
from npo.core.autonpo import PlateauDetector
from npo.core.config import AutoNPOConfig

SOURCES = ("past", "resample", "near_future", "far_future", "external")
"""Guide sources of the S analysis, in table order."""
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
            g, tr = number(row.get("gen_seconds")), number(row.get("train_seconds"))
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
    values = [number(r.get("entropy")) for r in run.train_rows if horizon - window <= int(r["step"]) < horizon]
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
        out["wall_total"][seed] = number(spent.get("wall_time"))
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
        "guide_slots": guide_slots(run.train_rows),
        "guide_slots_spent": guide_slots(run.rows),
        "rollbacks": len(run.rollbacks),
        "probes": probes(run),
        "optimizer_steps": int(run.last.get("optimizer_steps", 0) or 0),
        "samples_total": int(run.last.get("samples_total", 0) or 0),
    }


def autonpo_config(run: RunData) -> AutoNPOConfig | None:
    """The AutoNPO settings of an autonpo run (its config.yaml's `autonpo` section over the defaults); None for a run
    of another method."""
    if run.method != "autonpo":
        return None
    section = run.config.get("autonpo") or {}
    known = AutoNPOConfig.__dataclass_fields__
    return AutoNPOConfig(**{k: v for k, v in section.items() if k in known})


def first_probe(run: RunData, cfg: AutoNPOConfig, horizon: int, every: int = 1) -> int | None:
    """AutoNPO's stage (a) replayed on a run's main-line training rows (reward_mean and entropy, as the trainer feeds
    it): the first step t <= horizon at which the trainer would probe, None if there is none. The trainer looks before
    step t, only when t is a checkpoint step (t % every == 0, every = checkpoint.every), at the reading of step t - 1,
    and probes when that reading raises the warning and t - 1 >= cfg.min_step.

    On the GRPO twin of an AutoNPO run (same seed; the two are identical until the first intervention) this is the
    step where the AutoNPO run probes first, so it tells whether a trigger setting fires in a regime without running
    AutoNPO; what the probe decides is not replayed."""
    detector = PlateauDetector(cfg)
    for row in run.train_rows:
        step = int(row["step"])
        if step + 1 > horizon:
            break
        reading = detector.observe(step, float(row["reward_mean"]), float(row["entropy"]))
        if reading.warning and step >= cfg.min_step and (step + 1) % every == 0:
            return step + 1
    return None


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


def target_verdict(name: str, met: bool | None, detail: str) -> dict[str, Any]:
    """One target's verdict: name, met (True / False / None = n/a), detail."""
    return {"name": name, "met": met, "detail": detail}


def final_mean(stats: dict[str, Any]) -> float | None:
    """Mean over seeds of an arm's final accuracy at T (None without values)."""
    return mean_se(stats["final"].values())[0]


def final_target(
    name: str,
    a: dict[str, Any] | None,
    a_name: str | None,
    b: dict[str, Any] | None,
    b_name: str | None,
    margin: float,
    strict: bool,
) -> dict[str, Any]:
    """Arm a's mean final accuracy against arm b's plus `margin`: fa > fb + margin (strict) or fa >= fb + margin."""
    fa, fb = (final_mean(a) if a else None), (final_mean(b) if b else None)
    if fa is None or fb is None:
        return target_verdict(name, None, "n/a (arm missing or without evaluations)")
    met = fa > fb + margin if strict else fa >= fb + margin - 1e-12
    need = f"; need {'>' if strict else '>='} {fmt_points(margin, signed=True)}" if margin else ""
    detail = f"{a_name} {fmt_points(fa)} vs {b_name} {fmt_points(fb)}: {fmt_points(fa - fb, signed=True)} points{need}"
    return target_verdict(name, met, detail)


def reach_target(
    name: str,
    a: dict[str, Any] | None,
    a_name: str | None,
    base: dict[str, Any],
    base_name: str,
    key: str,
    factor: float,
    strict: bool,
) -> dict[str, Any]:
    """Time to target of arm a over the baseline's (means over the seeds that reached it, reach[key]):
    ratio < factor (strict) or <= factor, and a reached it on at least as many seeds as the baseline."""
    if a is None:
        return target_verdict(name, None, "n/a (role missing)")
    ka, n, ma = reach_summary(a, key)
    kb, nb, mb = reach_summary(base, key)
    if ma is None or mb is None:
        return target_verdict(
            name, False if mb is not None else None, f"{a_name} reached {ka}/{n}, {base_name} {kb}/{nb}"
        )
    ratio = ma / mb if mb > 0 else math.inf
    ok = ka >= kb and (ratio < factor if strict else ratio <= factor + 1e-12)
    return target_verdict(
        name,
        ok,
        f"{a_name} {fmt_number(ma)} ({ka}/{n} seeds) vs {base_name} {fmt_number(mb)} ({kb}/{nb} seeds): "
        f"ratio {fmt_number(ratio, 2)} (need {'<' if strict else '<='} {factor:.2f}, reached on >= as many seeds)",
    )


def is_target(on: dict[str, Any] | None, off: dict[str, Any] | None, roles: dict[str, str]) -> dict[str, Any]:
    """(i): the paired per-seed difference of final accuracy is_on - is_off is smaller than its s.e.:
    |mean_s (final_on(s) - final_off(s))| < s.e."""
    name = "(i) IS correction on/off: |final difference| < its paired s.e."
    if on is None or off is None:
        return target_verdict(name, None, "n/a (role missing)")
    diffs = [
        on["final"][s] - off["final"][s]
        for s in sorted(on["final"])
        if on["final"].get(s) is not None and off["final"].get(s) is not None
    ]
    mean, se = mean_se(diffs)
    met = None if mean is None or se is None else abs(mean) < se
    return target_verdict(
        name,
        met,
        f"{roles['is_on']} - {roles['is_off']} = {fmt_points(mean, signed=True)} ± {fmt_points(se)} points over "
        f"{len(diffs)} paired seeds",
    )


def entropy_target(stats: dict[str, dict[str, Any]], roles: dict[str, str], base_name: str) -> dict[str, Any]:
    """(j): the mean entropy over the last window of npo_early and of autonpo exceeds the baseline's."""
    name = "(j) npo_early / autonpo entropy over the last window > baseline's"
    base_entropy = mean_se(stats[base_name]["entropy"].values())[0]
    parts, verdicts = [], []
    for r in ("npo_early", "autonpo"):
        s = stats.get(roles[r]) if roles.get(r) is not None else None
        if s is None:
            continue
        e = mean_se(s["entropy"].values())[0]
        verdicts.append(None if e is None or base_entropy is None else e > base_entropy)
        parts.append(f"{r} ({roles[r]}) {fmt_number(e, 3)}")
    if not parts:
        return target_verdict(name, None, "n/a (roles missing)")
    met = None if any(v is None for v in verdicts) else all(verdicts)
    return target_verdict(name, met, ", ".join(parts) + f" vs {base_name} {fmt_number(base_entropy, 3)}")


def targets(
    stats: dict[str, dict[str, Any]], spec: dict[str, Any], checks: dict[str, tuple[bool | None, str]]
) -> list[dict[str, Any]]:
    """Verdicts of the evidence targets (a)-(j): dicts name, met (True / False / None = n/a), detail.

    stats: arm -> arm_stats; spec: baseline and roles (see npo.analysis.results.write_results); checks: s_checks of
    the S table. Time-to-target comparisons use the mean over the seeds that reached the target and require the arm
    to reach it on at least as many seeds as the baseline.
    """
    roles = spec.get("roles", {}) or {}
    base_name = spec["baseline"]
    base = stats[base_name]

    def role(name: str) -> dict[str, Any] | None:
        arm = roles.get(name)
        return stats.get(arm) if arm is not None else None

    def final(name: str, a_role: str, b: dict[str, Any] | None, b_name: str | None, margin: float, strict: bool):
        return final_target(name, role(a_role), roles.get(a_role), b, b_name, margin, strict)

    def reach(name: str, a_role: str, key: str, factor: float, strict: bool):
        return reach_target(name, role(a_role), roles.get(a_role), base, base_name, key, factor, strict)

    no_analysis = (None, "n/a (no analysis)")
    return [
        final("(a) autonpo final >= baseline final + 5 points", "autonpo", base, base_name, 0.05, False),
        reach("(b) autonpo reaches the target in <= 50% of the baseline's steps", "autonpo", "step", 0.5, False),
        reach("(c) autonpo reaches the target in less compute than the baseline", "autonpo", "compute", 1.0, True),
        reach("(d) npo_early reaches the target in <= 50% of the baseline's steps", "npo_early", "step", 0.5, False),
        final(
            "(e) npo_early_late final > npo_early final",
            "npo_early_late",
            role("npo_early"),
            roles.get("npo_early"),
            0.0,
            True,
        ),
        final(
            "(f) autonpo final >= npo_early_late final",
            "autonpo",
            role("npo_early_late"),
            roles.get("npo_early_late"),
            0.0,
            False,
        ),
        target_verdict("(g) S(Delta) has an interior maximum above S(0)", *checks.get("interior", no_analysis)),
        target_verdict("(h) near-future guides have the best S of all sources", *checks.get("near_beats", no_analysis)),
        is_target(role("is_on"), role("is_off"), roles),
        entropy_target(stats, roles, base_name),
    ]
