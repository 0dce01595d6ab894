"""The results writer: an experiment grid (arms x seeds of run folders) as docs/results.md and its PNG figures.

compute_results gathers every number (npo.analysis.stats); one function per section turns them into markdown;
write_results draws the figures (npo.analysis.plots) and writes the page. The definitions below are written into the
page too.

    grid = {"grpo": {0: load_run("out/grpo/seed0"), ...}, "npo_early": {...}}
    text = write_results(grid, spec, analysis_rows, meta, Path("docs/results.md"), Path("docs/figures"))
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npo.analysis.markdown import fmt_number, fmt_points, markdown_table
from npo.analysis.plots import (
    ENTROPY_SMOOTHING,
    plot_arms_accuracy_compute,
    plot_arms_accuracy_steps,
    plot_arms_entropy,
    plot_s,
)
from npo.analysis.runs import RunData
from npo.analysis.stats import (
    acc_at,
    activity,
    arm_stats,
    autonpo_config,
    crn_prefix,
    first_probe,
    gen_share,
    mean_se,
    paired_speed,
    paired_windows,
    reach_summary,
    s_checks,
    s_table,
    targets,
)

FIGURES = {
    "accuracy_steps.png": "held-out accuracy vs main-line step (mean ± s.e. over seeds)",
    "accuracy_compute.png": "held-out accuracy vs compute units (mean ± s.e. over seeds)",
    "entropy.png": f"policy entropy vs step (mean over seeds, moving average of {ENTROPY_SMOOTHING} steps)",
    "s_analysis.png": "S and Q vs Delta by guide source",
}
"""PNG files write_results puts in fig_dir, with their captions."""
REACH_KEYS = ("step", "optimizer_steps", "compute", "wall_time")
"""Counters of the time-to-target table (keys of arm_stats' reach)."""
ACTIVITY_KEYS = ("guide_slots", "guide_slots_spent", "rollbacks", "probes", "optimizer_steps", "samples_total")
"""Columns of the "what each arm did" table (keys of npo.analysis.stats.activity)."""
PAIRED_BY = (("step", "equal main-line steps"), ("compute", "equal compute"))
"""The x-axes of the paired differences, with their section titles."""

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


# ----------------------------------------------------------------------------------------------------------------
# Numbers.


@dataclass
class GridSetup:
    """The grid completed to every arm x seed and the settings read from the spec (grid_setup)."""

    spec: dict[str, Any]
    """The experiment spec (see write_results)."""
    grid: dict[str, dict[int, RunData | None]]
    """arm -> seed -> run for every arm x seed (None: a missing run), arms in `arms` order."""
    arms: list[str]
    """Arms in the spec's order, then arms of the grid the spec does not name (sorted)."""
    labels: dict[str, str]
    """arm -> label (the spec's, else the arm's name)."""
    seeds: list[int]
    """Every seed of any arm, ascending."""
    baseline: str
    """The baseline arm."""
    horizon: int
    """T."""
    window: int
    """Window width of the entropy and of the paired differences."""
    samples_per_step: int
    """Rollouts of one baseline step."""
    measured_c_gen: float | None
    """gen_share of the baseline's rows (None without timing)."""
    c_gen: float
    """measured_c_gen, 1.0 when None."""

    @property
    def others(self) -> list[str]:
        """Arms other than the baseline."""
        return [a for a in self.arms if a != self.baseline]


@dataclass
class Results(GridSetup):
    """Every number of the results page (compute_results)."""

    target: float | None
    """Mean over seeds of the baseline's final accuracy at T."""
    stats: dict[str, dict[str, Any]]
    """arm -> arm_stats."""
    reach: dict[str, dict[str, tuple[int, int, float | None]]]
    """arm -> REACH_KEYS key -> reach_summary."""
    speed: dict[str, dict[str, dict[int, float | None]]]
    """arm -> "step" / "compute" -> paired_speed (seed -> ratio)."""
    activity: dict[str, list[dict[str, int]]]
    """arm -> activity of each of its runs (missing runs left out)."""
    crn: dict[str, list[tuple[int, int | None]]]
    """arm -> crn_prefix against the baseline per seed where both runs exist ([] for the baseline)."""
    paired: dict[str, dict[str, list[dict[str, Any]]]]
    """"step" / "compute" -> arm (the baseline excluded) -> paired_windows."""
    s_table: list[dict[str, Any]]
    """s_table of the analysis rows."""
    s_checks: dict[str, tuple[bool | None, str]]
    """s_checks of s_table."""
    verdicts: list[dict[str, Any]]
    """targets: name, met, detail per target."""


def grid_setup(grid: dict[str, dict[int, RunData]], spec: dict[str, Any]) -> GridSetup:
    """The grid completed to every arm x seed, with the spec's settings and c_gen measured on the baseline.
    Raises ValueError when the baseline arm is not in the grid."""
    base_name = spec["baseline"]
    if base_name not in grid:
        raise ValueError(f"spec: baseline arm {base_name!r} is not in the grid ({', '.join(sorted(grid))})")
    horizon, window, sps = int(spec["horizon"]), int(spec["window"]), int(spec["samples_per_step"])
    spec_arms = {a["name"]: a for a in spec.get("arms", [])}
    arms = [a for a in spec_arms if a in grid] + sorted(a for a in grid if a not in spec_arms)
    labels = {a: str(spec_arms.get(a, {}).get("label", a)) for a in arms}
    seeds = sorted({s for runs in grid.values() for s in runs})
    full = {a: {s: grid[a].get(s) for s in seeds} for a in arms}
    measured = gen_share(full[base_name].values())
    c_gen = measured if measured is not None else 1.0
    return GridSetup(spec, full, arms, labels, seeds, base_name, horizon, window, sps, measured, c_gen)


def compute_results(
    grid: dict[str, dict[int, RunData]], spec: dict[str, Any], analysis: list[dict[str, Any]]
) -> Results:
    """Every number of the results page (arguments as for write_results). Raises ValueError when the baseline arm
    is not in the grid."""
    setup = grid_setup(grid, spec)
    grid, arms, seeds, base_name, horizon = setup.grid, setup.arms, setup.seeds, setup.baseline, setup.horizon
    base = grid[base_name]
    target = mean_se([acc_at(base[s], horizon) for s in seeds])[0]
    compute = dict(samples_per_step=setup.samples_per_step, c_gen=setup.c_gen)
    stats = {a: arm_stats(grid[a], seeds, horizon=horizon, window=setup.window, target=target, **compute) for a in arms}
    table = s_table(analysis)
    checks = s_checks(table)
    present = {a: [s for s in seeds if grid[a][s] is not None] for a in arms}
    return Results(
        **vars(setup),
        target=target,
        stats=stats,
        reach={a: {key: reach_summary(stats[a], key) for key in REACH_KEYS} for a in arms},
        speed={a: {by: paired_speed(grid[a], base, horizon, by=by, **compute) for by, _ in PAIRED_BY} for a in arms},
        activity={a: [activity(grid[a][s]) for s in present[a]] for a in arms},
        crn={
            a: [crn_prefix(grid[a][s], base[s]) for s in present[a] if a != base_name and base[s] is not None]
            for a in arms
        },
        paired={
            by: {
                a: paired_windows(grid[a], base, window=setup.window, horizon=horizon, by=by, **compute)
                for a in setup.others
            }
            for by, _ in PAIRED_BY
        },
        s_table=table,
        s_checks=checks,
        verdicts=targets(stats, spec, checks),
    )


# ----------------------------------------------------------------------------------------------------------------
# Cells.


def _pm(values: Iterable[float | None], scale: float = 100.0, digits: int = 1) -> str:
    """ "mean ± s.e." of the values (scaled), "mean ± n/a" with one value, "n/a" without."""
    mean, se = mean_se(values)
    if mean is None:
        return "n/a"
    fmt = lambda x: fmt_number(x * scale if x is not None and math.isfinite(x) else x, digits)  # noqa: E731
    return f"{fmt(mean)} ± {fmt(se)}"


def _paired_cell(window: dict[str, Any]) -> str:
    """ "+2.1 ± 0.8 (4/5 > 0)" in points."""
    if window["mean"] is None:
        return "n/a"
    return (
        f"{fmt_points(window['mean'], signed=True)} ± {fmt_points(window['se'])} "
        f"({window['positive']}/{window['n']} > 0)"
    )


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else "MET" if met else "NOT MET"


def _image(name: str, rel: str) -> str:
    """Markdown image of a FIGURES file, `rel` = the figure folder relative to the page's folder."""
    return f"![{FIGURES[name]}]({rel}/{name})"


# ----------------------------------------------------------------------------------------------------------------
# Sections: each returns the page's lines (tables as one item).


def meta_lines(meta: dict[str, Any]) -> str:
    """One "- key: value" line per meta entry: the usual keys first ("n/a" where absent), then any others sorted."""
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


def header_section(res: Results, meta: dict[str, Any]) -> list[str]:
    """Title, meta, the spec's discussion, the settings, Definitions and the Arms table."""
    spec, measured = res.spec, res.measured_c_gen
    spec_arms = {a["name"]: a for a in spec.get("arms", [])}
    parts = ["# Results", "", meta_lines(meta), ""]
    if spec.get("discussion"):
        parts += [str(spec["discussion"]).rstrip(), ""]
    return parts + [
        f"Arms x seeds: {len(res.arms)} x {len(res.seeds)} (seeds {', '.join(map(str, res.seeds))}); baseline "
        f"`{res.baseline}`; T = {res.horizon}; window = {res.window} steps; samples_per_step = {res.samples_per_step}; "
        f"held-out samples per evaluation = {spec.get('eval_samples', 'n/a')}.",
        "",
        f"c_gen (generation's share of a baseline step, measured) = {fmt_number(measured, 3)}"
        + ("" if measured is not None else " (no timing in the baseline's rows: 1.0 used)")
        + f". Target (baseline's mean final at T) = {fmt_points(res.target)}.",
        "",
        "## Definitions",
        "",
        DEFINITIONS,
        "",
        "## Arms",
        "",
        markdown_table(
            ["arm", "label", "description"],
            [[a, res.labels[a], str(spec_arms.get(a, {}).get("description", ""))] for a in res.arms],
        ),
        "",
    ]


def runs_section(res: Results) -> list[str]:
    """Status of every (arm, seed), and a warning per missing or incomplete run."""
    run_rows, warnings = [], []
    for a in res.arms:
        for s in res.seeds:
            run = res.grid[a][s]
            if run is None:
                run_rows.append([a, str(s), "MISSING", "n/a", "n/a", "n/a", "n/a"])
                warnings.append(f"- {a} seed {s}: run missing.")
                continue
            last_step = int(run.main[-1]["step"]) if run.main else -1
            status = "ok" if last_step >= res.horizon else f"incomplete (last step {last_step})"
            if last_step < res.horizon:
                warnings.append(f"- {a} seed {s}: main line stops at step {last_step} < T; its values are read there.")
            run_rows.append(
                [a, str(s), status, str(last_step), str(len(run.evals)), str(len(run.rollbacks)), str(run.folder)]
            )
    parts = [
        "## Runs",
        "",
        markdown_table(["arm", "seed", "status", "last step", "evals", "rollbacks", "folder"], run_rows),
        "",
    ]
    return parts + (["Warnings:", "", *warnings, ""] if warnings else [])


def summary_section(res: Results) -> list[str]:
    """Per arm: final, best, AUC, entropy, compute and wall at T (mean ± s.e. over seeds)."""
    summary_rows = []
    for a in res.arms:
        st = res.stats[a]
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
    header = ["arm", "final at T", "best up to T", "AUC 0..T", "entropy (last window)", "compute units at T"]
    return [
        "## Per-arm summary (mean ± s.e. over seeds, accuracies in points)",
        "",
        markdown_table([*header, "wall s at T"], summary_rows),
        "",
    ]


def reach_section(res: Results) -> list[str]:
    """Time to the target: seeds that reached it, mean steps / optimizer steps / compute / wall, ratio to the
    baseline's mean."""
    reach_rows = []
    for a in res.arms:
        cells = [a]
        for key in REACH_KEYS:
            k, n, m = res.reach[a][key]
            mb = res.reach[res.baseline][key][2]
            ratio = m / mb if m is not None and mb else None
            if key == "step":
                cells.append(f"{k}/{n}")
            cells.append(f"{fmt_number(m)} (x{fmt_number(ratio, 2)})" if m is not None else "never")
        reach_rows.append(cells)
    return [
        f"## Time to target ({fmt_points(res.target)})",
        "",
        "Mean over the seeds that reached the target; in brackets the ratio to the baseline's mean.",
        "",
        markdown_table(["arm", "seeds reached", "steps", "optimizer steps", "compute units", "wall s"], reach_rows),
        "",
    ]


def speed_section(res: Results) -> list[str]:
    """Paired speed: per seed, where the arm reaches its baseline twin's final accuracy over where the twin does."""
    base_name = res.baseline
    speed_rows = []
    for a in res.arms:
        cells = [a]
        for by in ("step", "compute"):
            ratios = res.speed[a][by]
            hit = [r for r in ratios.values() if r is not None]
            cells.append(f"{len(hit)}/{len(ratios)}")
            cells.append(_pm(hit, scale=1.0, digits=2) if hit else "never")
            cells.append(", ".join("-" if r is None else f"{r:.2f}" for r in ratios.values()))
        speed_rows.append(cells)
    return [
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


def seeds_section(res: Results) -> list[str]:
    """Final accuracy at T of every (seed, arm) in points."""
    seed_rows = [
        [str(s)] + [fmt_points(res.stats[a]["final"][s]) if res.grid[a][s] is not None else "missing" for a in res.arms]
        for s in res.seeds
    ]
    return ["## Final accuracy at T per seed (points)", "", markdown_table(["seed", *res.arms], seed_rows), ""]


def paired_final(res: Results, arm: str) -> tuple[float | None, float | None, int, int]:
    """Final accuracy at T, arm minus its baseline twin per seed: (mean, s.e., seeds with a positive difference,
    seeds paired). The s.e. is over seeds: with common random numbers it is the noise of the comparison itself."""
    diffs = [
        res.stats[arm]["final"][s] - res.stats[res.baseline]["final"][s]
        for s in res.seeds
        if res.stats[arm]["final"][s] is not None and res.stats[res.baseline]["final"][s] is not None
    ]
    mean, se = mean_se(diffs)
    return mean, se, sum(d > 0 for d in diffs), len(diffs)


def summary_lines(res: Results) -> list[str]:
    """A few lines for the console: per arm its final at T (mean ± s.e.), the paired difference with its twin
    and what it did (guide slots, rollbacks, probes), then the paired difference in each window of steps."""
    lines = [f"final held-out accuracy at step {res.horizon}, {len(res.seeds)} seeds, points (mean ± s.e.):"]
    for a in res.arms:
        line = f"  {res.labels[a]:<28} {_pm(res.stats[a]['final'].values()):>12}"
        if a != res.baseline:
            mean, se, pos, n = paired_final(res, a)
            diff = "n/a" if mean is None else f"{100 * mean:+.1f}" + ("" if se is None else f" ± {100 * se:.1f}")
            line += f"   paired vs {res.baseline}: {diff} ({pos}/{n} seeds > 0)"
            acts = res.activity[a]
            did = ", ".join(f"{k.replace('_', ' ')} {_pm([x[k] for x in acts], scale=1.0)}" for k in ACTIVITY_KEYS[2:4])
            line += f"; guide slots {_pm([x['guide_slots'] for x in acts], scale=1.0)}, {did}"
        lines.append(line)
        windows = [w for w in res.paired["step"].get(a, []) if w["mean"] is not None]
        if windows:
            cells = (f"({w['lo']:.0f}, {w['hi']:.0f}] {_paired_cell(w)}" for w in windows)
            lines.append("    paired by window of steps: " + ", ".join(cells))
    return lines


def paired_final_section(res: Results) -> list[str]:
    """The headline: final at T, paired by seed, with its uncertainty."""
    rows = []
    for a in res.others:
        mean, se, pos, n = paired_final(res, a)
        t = None if mean is None or not se else mean / se
        rows.append(
            [
                a,
                _pm(res.stats[a]["final"].values()),
                _pm([mean]) if se is None else f"{100 * mean:+.1f} ± {100 * se:.1f}",
                f"{pos}/{n}",
                "n/a" if t is None else f"{t:+.1f}",
            ]  # fmt: skip
        )
    header = ["arm", "final at T", f"paired difference vs {res.baseline}", "seeds > 0", "difference / s.e."]
    return [
        f"## Final accuracy at T = {res.horizon}, paired by seed (points; mean ± s.e. over seeds)",
        "",
        f"The baseline {res.baseline}: {_pm(res.stats[res.baseline]['final'].values())}. A difference beyond 2 s.e. "
        "is beyond the noise of the comparison.",
        "",
        markdown_table(header, rows) if rows else "No arm besides the baseline.",
        "",
    ]


def activity_section(res: Results) -> list[str]:
    """What each arm did (guide slots, rollbacks, probes, optimizer steps, samples) and the CRN check."""
    act_rows = []
    for a in res.arms:
        acts, crn = res.activity[a], res.crn[a]
        cells = [a] + [_pm([x[k] for x in acts], scale=1.0) for k in ACTIVITY_KEYS]
        cells.append(", ".join(f"{k}" + (f"→{d}" if d is not None else "") for k, d in crn) if crn else "-")
        act_rows.append(cells)
    header = ["arm", "guide slots (main)", "guide slots (all)", "rollbacks", "probes", "optimizer steps", "samples"]
    return [
        "## What each arm did (mean ± s.e. over seeds)",
        "",
        "guide slots: guides inserted on the main line / in every step written (scouts and superseded replays "
        "included). CRN: per seed, the number of rows the arm wrote that equal its baseline twin's rows of the same "
        "steps (reward, pass rate, loss, entropy), then →the step of the first row that differs (the first guided "
        "step, or the replay after a rollback).",
        "",
        markdown_table([*header, "CRN: identical rows→first difference"], act_rows),
        "",
    ]


def _probe_cell(event: dict[str, Any]) -> str:
    decision = event.get("decision")
    chosen = f"Delta* {decision['delta']}" if decision else "declined"
    return f"{event.get('step')} ({event.get('solved', 0)}/{event.get('probed', 0)} solved, {chosen})"


def trigger_section(res: Results) -> list[str]:
    """For each AutoNPO arm and seed: where its warning (stage a, the arm's own settings) first rises on the baseline
    twin's curve, the probes it ran and the interventions it made; and on how many seeds it intervened."""
    rows, totals = [], []
    for a in res.others:
        runs = {s: r for s, r in res.grid[a].items() if r is not None and autonpo_config(r) is not None}
        if not runs:
            continue
        fired = 0
        for seed, run in runs.items():
            twin = res.grid[res.baseline].get(seed)
            every = int((run.config.get("checkpoint") or {}).get("every", 1) or 1)
            warned = first_probe(twin, autonpo_config(run), res.horizon, every) if twin is not None else None
            probes = [e for e in run.interventions if e.get("event") == "probe"]
            rollbacks = [e for e in run.rollbacks if e.get("kind") == "autonpo"]
            fired += bool(rollbacks)
            rows.append(
                [
                    a,
                    str(seed),
                    "-" if warned is None else str(warned),
                    "; ".join(_probe_cell(e) for e in probes) or "-",
                    ", ".join(f"{e['step']}→{e['to_step']}" for e in rollbacks) or "-",
                ]
            )
        totals.append(f"- {a}: intervened on {fired}/{len(runs)} seeds.")
    if not rows:
        return []
    header = ["arm", "seed", "first probe, replayed on the baseline twin", "probes: step (Q: solved/probed, decision)"]
    return [
        "## AutoNPO's trigger",
        "",
        "first probe, replayed: AutoNPO's stage (a) (reward stagnation, and entropy decline unless "
        "autonpo.require_entropy_drop is false), with the arm's settings, replayed on its baseline twin's training "
        "rows and read as the trainer reads it (before each checkpoint step, the previous step's reading); the two "
        "runs are identical until the first intervention, so it should equal the arm's first probe. A probe is "
        "declined when no candidate Delta reaches autonpo.q_min; the next probe then waits a window.",
        "",
        markdown_table([*header, "interventions (step→rollback step)"], rows),
        "",
        *totals,
        "",
    ]


def paired_section(res: Results) -> list[str]:
    """Paired differences arm - baseline per window, at equal steps (one table) and at equal compute (one table per
    arm: the windows follow each arm's compute range)."""
    others, parts = res.others, []
    for by, title in PAIRED_BY:
        parts += [f"## Paired differences vs {res.baseline} at {title} (points)", ""]
        if not others:
            parts += ["No arm besides the baseline.", ""]
            continue
        results = res.paired[by]
        unit = "steps" if by == "step" else "compute units"
        if by == "step":
            rows = []
            for i, w in enumerate(results[others[0]]):
                rows.append([f"({w['lo']:.0f}, {w['hi']:.0f}]"] + [_paired_cell(results[a][i]) for a in others])
            parts += [markdown_table([f"window ({unit})", *others], rows), ""]
            continue
        for a in others:
            rows = [[f"({w['lo']:.0f}, {w['hi']:.0f}]", _paired_cell(w)] for w in results[a]]
            table = (
                markdown_table([f"window ({unit})", a], rows)
                if rows
                else "no overlap with the baseline's compute range"
            )
            parts += [f"{a}:", "", table, ""]
    return parts


def s_section(res: Results, rel: str) -> list[str]:
    """The S table by guide source and Delta, its figure and the two S checks."""
    parts = ["## S analysis (Q, V, S by guide source and Delta)", ""]
    if not res.s_table:
        return parts + ["No analysis rows.", ""]
    s_rows = [
        [
            r["source"],
            fmt_number(r["delta"], 0) if r["delta"] is not None else "-",
            fmt_number(r["q"], 3),
            fmt_number(r["q0"], 3),
            fmt_number(r["kl_k3"], 4),
            fmt_number(r["mean_len"], 1),
            fmt_number(r["v"], 3),
            fmt_number(r["s"], 3),
            str(r["rows"]),
            str(r["failed"]),
        ]
        for r in res.s_table
    ]
    parts += [
        "Means over anchors and seeds. Q: fraction of the anchor's failed prompts the source solves; "
        "Q0: the same for pi^(t) resampled (Delta = 0, the noise floor); kl_k3: per-token KL estimate (k3); "
        "V = exp(mean_len * KL); S = Q / V; rows: (anchor, seed) rows; failed: anchors' failed prompts, summed.",
        "",
        markdown_table(["source", "Delta", "Q", "Q0", "kl_k3", "mean len", "V", "S", "rows", "failed"], s_rows),
        "",
        _image("s_analysis.png", rel),
        "",
    ]
    for key, name in (("interior", "Interior maximum of S(Delta)"), ("near_beats", "Near future beats other sources")):
        met, detail = res.s_checks[key]
        parts.append(f"- {name}: {_verdict(met)} — {detail}")
    return parts + [""]


def targets_section(res: Results) -> list[str]:
    """One line per target: name, verdict, detail."""
    return [
        "## Targets",
        "",
        "(i) uses the per-seed paired difference is_on - is_off: with common random numbers its s.e. is the noise of "
        "the comparison itself, so a difference smaller than one s.e. is indistinguishable from zero.",
        "",
        *(f"- {t['name']}: **{_verdict(t['met'])}** — {t['detail']}" for t in res.verdicts),
        "",
    ]


# ----------------------------------------------------------------------------------------------------------------
# The page.


def write_figures(res: Results, fig_dir: Path) -> list[str]:
    """Draw the FIGURES into fig_dir (s_analysis.png only with analysis rows); returns the names drawn."""
    grid, arms, labels = res.grid, res.arms, res.labels
    plot_arms_accuracy_steps(grid, arms, labels, res.horizon, fig_dir / "accuracy_steps.png")
    plot_arms_accuracy_compute(grid, arms, labels, res.samples_per_step, res.c_gen, fig_dir / "accuracy_compute.png")
    plot_arms_entropy(grid, arms, labels, fig_dir / "entropy.png")
    figures = ["accuracy_steps.png", "accuracy_compute.png", "entropy.png"]
    if res.s_table:
        plot_s(res.s_table, fig_dir / "s_analysis.png")
        figures.append("s_analysis.png")
    return figures


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
    is_on, is_off} (any may be absent), window, samples_per_step, eval_samples, discussion (optional text).
    analysis: S-analysis rows {seed, anchor, source, delta, q, q0, kl_k3, mean_len, v, s, failed}.
    meta: command, machine, wall_seconds, started, finished, commit, versions.
    Raises ValueError when the baseline arm is not in the grid.
    """
    out_md, fig_dir = Path(out_md), Path(fig_dir)
    res = compute_results(grid, spec, analysis)
    fig_dir.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(fig_dir, out_md.parent)).as_posix()
    figures = write_figures(res, fig_dir)
    parts = [
        *header_section(res, meta),
        *runs_section(res),
        *summary_section(res),
        *paired_final_section(res),
        *reach_section(res),
        *speed_section(res),
        *seeds_section(res),
        *activity_section(res),
        *trigger_section(res),
        *paired_section(res),
        *["## Curves", "", *(_image(n, rel) + "\n" for n in figures[:3])],
        *s_section(res, rel),
        *targets_section(res),
    ]
    text = "\n".join(parts)
    out_md.write_text(text)
    return text
