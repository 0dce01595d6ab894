"""Tests for npo.analysis.stats and npo.analysis.results on synthetic run folders written the way npo.runtime.runner
writes them (a rollback included).

The grid (samples_per_step 4, T = 4, window 2, c_gen = 1 / (1 + 3) = 0.25):
- grpo (baseline), seeds 0 and 1: steps 0..5 then a final row at 6; eval_acc of pi^(t) = 0.1 t + 0.02 seed, so its
  accuracy is linear in compute units (one unit per step, no extra samples).
- npo seed 0: step 0, a scout over steps 1..2, 8 guide samples, a rollback to 1 and a replay of steps 1..2, step 3,
  final at 4. npo seed 1: the baseline's seed 1 plus 0.05, final at 4.
- late: seed 0 only (seed 1 missing).
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from npo.analysis.results import write_results
from npo.analysis.runs import load_run
from npo.analysis.stats import (
    acc_at,
    activity,
    arm_stats,
    compute_units,
    crn_prefix,
    crossing,
    gen_share,
    mean_se,
    paired_speed,
    paired_windows,
    reach_summary,
    s_checks,
    s_table,
    targets,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPS = 4
T = 4
WINDOW = 2


def row(step, segment, opt, samples, acc=None, entropy=0.9):
    """A metrics row: cumulative counters, 1 s of generation and 3 s of training per training row."""
    out = {"step": step, "segment": segment, "optimizer_steps": opt, "samples_total": samples, "wall_time": 2.0 * opt}
    if segment != "final":
        out.update(reward_mean=0.5, pass_rate=0.5, entropy=entropy, gen_seconds=1.0, train_seconds=3.0, guide_slots=0)
    if acc is not None:
        out["eval_acc"] = acc
    return out


def write_run(folder, rows, method="grpo", seed=0, events=()):
    """A run folder with metrics.jsonl, interventions.jsonl and config.yaml; returns load_run of it."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "interventions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": method, "seed": seed}))
    return load_run(folder)


def baseline_rows(seed, last=6, offset=0.0):
    """Steps 0..last-1 and a final row at `last`: acc 0.1 t + 0.02 seed + offset, entropy 1 - 0.1 t."""
    acc = lambda t: round(0.1 * t + 0.02 * seed + offset, 10)  # noqa: E731
    rows = [row(t, "grpo", t + 1, SPS * (t + 1), acc(t), entropy=1.0 - 0.1 * t) for t in range(last)]
    return rows + [row(last, "final", last, SPS * last, acc(last))]


def npo_seed0_rows():
    """Step 0, scout 1..2, rollback to 1 with 8 guide samples, replay 1..2, step 3, final 4."""
    return [
        row(0, "npo", 1, 4, 0.0),
        row(1, "scout", 2, 8, 0.1),
        row(2, "scout", 3, 12, 0.2),
        row(1, "npo_replay", 4, 24, 0.3),  # 8 guide samples + 4 rollouts since the scout
        row(2, "npo_replay", 5, 28, 0.5),
        row(3, "npo", 6, 32, 0.5),
        row(4, "final", 6, 32, 0.6),
    ]


@pytest.fixture
def grid(tmp_path):
    out = tmp_path / "out"
    return {
        "grpo": {s: write_run(out / "grpo" / f"seed{s}", baseline_rows(s), seed=s) for s in (0, 1)},
        "npo": {
            0: write_run(
                out / "npo" / "seed0",
                npo_seed0_rows(),
                method="npo",
                events=[{"event": "rollback", "kind": "early", "step": 2, "to_step": 1, "optimizer_steps": 3}],
            ),
            1: write_run(out / "npo" / "seed1", baseline_rows(1, last=4, offset=0.05), method="npo", seed=1),
        },
        "late": {0: write_run(out / "late" / "seed0", baseline_rows(0, last=4), method="npo")},
    }


SPEC = {
    "arms": [
        {"name": "grpo", "label": "GRPO", "description": "baseline, 1.5 T"},
        {"name": "npo", "label": "NPO early", "description": "early bootstrapping"},
        {"name": "late", "label": "NPO early + late", "description": "one seed missing"},
    ],
    "baseline": "grpo",
    "horizon": T,
    "roles": {"npo_early": "npo", "autonpo": "npo", "npo_early_late": "late", "is_on": "npo", "is_off": "grpo"},
    "window": WINDOW,
    "samples_per_step": SPS,
    "eval_samples": 100,
}

ANALYSIS = [
    {"seed": 0, "anchor": 10, "source": "resample", "delta": 0, "q": 0.2, "q0": 0.2, "kl_k3": 0.0, "mean_len": 3.0}
    | {"v": 1.0, "s": 0.2, "failed": 10},
    {"seed": 1, "anchor": 10, "source": "resample", "delta": 0, "q": 0.1, "q0": 0.1, "kl_k3": 0.0, "mean_len": 3.0}
    | {"v": 1.0, "s": 0.1, "failed": 20},
    {"seed": 0, "anchor": 10, "source": "near_future", "delta": 10, "q": 0.3, "q0": 0.2, "kl_k3": 0.01}
    | {"mean_len": 3.0, "v": 1.0, "s": 0.25, "failed": 10},
    {"seed": 0, "anchor": 10, "source": "near_future", "delta": 20, "q": 0.5, "q0": 0.2, "kl_k3": 0.02}
    | {"mean_len": 3.0, "v": 1.0, "s": 0.4, "failed": 10},
    {"seed": 0, "anchor": 10, "source": "near_future", "delta": 40, "q": 0.5, "q0": 0.2, "kl_k3": 0.3}
    | {"mean_len": 3.0, "v": 2.0, "s": 0.3, "failed": 10},
    {"seed": 0, "anchor": 10, "source": "past", "delta": -10, "q": 0.1, "q0": 0.2, "kl_k3": 0.01, "mean_len": 3.0}
    | {"v": 1.0, "s": 0.05, "failed": 10},
    {"seed": 0, "anchor": 10, "source": "external", "delta": None, "q": 0.9, "q0": 0.2, "kl_k3": 9.0}
    | {"mean_len": 3.0, "v": math.inf, "s": 0.0, "failed": 10},
    {"seed": 0, "anchor": 30, "source": "far_future", "delta": None, "q": None, "q0": None, "kl_k3": 0.5}
    | {"mean_len": 3.0, "v": 4.5, "s": None, "failed": 0},
]

META = {
    "command": "npo experiment grid.yaml",
    "machine": "test",
    "wall_seconds": 1.5,
    "started": "t0",
    "finished": "t1",
    "commit": "abc123",
    "versions": {"torch": "2.13.0", "python": "3.11"},
}


def table_rows(text):
    """The cells of every markdown table line of text (stripped)."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]


def test_mean_se():
    mean, se = mean_se([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and se == pytest.approx(1.0 / math.sqrt(3.0))
    assert mean_se([None, 2.0, 4.0]) == (pytest.approx(3.0), pytest.approx(1.0))
    assert mean_se([5.0]) == (5.0, None)
    assert mean_se([]) == (None, None)


def test_rollback_main_line_and_acc_at(grid):
    npo = grid["npo"][0]
    assert [p.step for p in npo.evals] == [0, 1, 2, 3, 4]
    assert acc_at(npo, 1) == pytest.approx(0.3)  # the replay supersedes the scout's 0.1
    assert acc_at(npo, 2) == pytest.approx(0.5)
    assert acc_at(npo, T) == pytest.approx(0.6)
    assert acc_at(npo, 100) == pytest.approx(0.6)
    assert acc_at(npo, -1) is None
    assert acc_at(None, T) is None
    assert acc_at(grid["grpo"][1], T) == pytest.approx(0.42)


def test_compute_units_counts_guide_samples(grid):
    assert gen_share(grid["grpo"].values()) == pytest.approx(0.25)
    assert gen_share([None]) is None
    # 4 optimizer steps whose own rollouts are 16 samples, 8 more (guides): 4 + 0.25 * 8 / 4.
    assert compute_units({"optimizer_steps": 4, "samples_total": 24}, SPS, 0.25) == pytest.approx(4.5)
    assert compute_units({"optimizer_steps": 4, "samples_total": 10}, SPS, 0.25) == pytest.approx(4.0)
    units = [compute_units(p, SPS, 0.25) for p in grid["npo"][0].evals]
    assert units == pytest.approx([0.0, 3.0, 4.5, 5.5, 6.5])
    with pytest.raises(ValueError, match="samples_per_step"):
        compute_units({"optimizer_steps": 1, "samples_total": 4}, 0, 0.25)


def test_arm_stats_and_steps_to_target(grid):
    common = dict(horizon=T, window=WINDOW, target=0.41, samples_per_step=SPS, c_gen=0.25)
    base = arm_stats(grid["grpo"], [0, 1], **common)
    npo = arm_stats(grid["npo"], [0, 1], **common)
    late = arm_stats(grid["late"], [0, 1], **common)
    assert base["final"] == {0: pytest.approx(0.4), 1: pytest.approx(0.42)}
    assert base["best"][1] == pytest.approx(0.42)
    assert base["auc"][0] == pytest.approx(0.2)  # mean of the linear curve 0..0.4
    assert base["entropy"][0] == pytest.approx(0.75)  # steps 2, 3: 0.8, 0.7
    assert base["compute_total"][0] == pytest.approx(4.0)  # spent when pi^(4) existed, not the 6 of the whole run
    assert npo["compute_total"][0] == pytest.approx(6.5)
    assert npo["wall_total"][0] == pytest.approx(12.0)
    # Target 0.41: baseline seed 0 ends at 0.40 (never), seed 1 reaches it at step 4.
    assert base["reach"][0] is None
    assert reach_summary(base, "step") == (1, 2, pytest.approx(4.0))
    assert npo["reach"][0] == {"step": 2.0, "optimizer_steps": 4.0, "compute": pytest.approx(4.5), "wall_time": 8.0}
    assert reach_summary(npo, "step") == (2, 2, pytest.approx(3.0))
    assert reach_summary(npo, "compute") == (2, 2, pytest.approx(4.25))
    assert late["missing"] == [1] and late["final"][1] is None and late["incomplete"] == {}


def test_paired_differences_at_equal_steps(grid):
    windows = paired_windows(grid["npo"], grid["grpo"], window=WINDOW, horizon=T, by="step")
    assert [(w["lo"], w["hi"]) for w in windows] == [(0.0, 2.0), (2.0, 4.0)]
    # seed 0: (0.3 + 0.5) / 2 - (0.1 + 0.2) / 2 = 0.25; seed 1: 0.05 everywhere.
    assert windows[0]["diffs"] == {0: pytest.approx(0.25), 1: pytest.approx(0.05)}
    assert windows[0]["mean"] == pytest.approx(0.15) and windows[0]["se"] == pytest.approx(0.1)
    assert windows[1]["mean"] == pytest.approx(0.125) and windows[1]["se"] == pytest.approx(0.075)
    assert (windows[1]["positive"], windows[1]["n"]) == (2, 2)
    with pytest.raises(ValueError, match="by"):
        paired_windows(grid["npo"], grid["grpo"], window=WINDOW, horizon=T, by="wall")


def test_paired_differences_at_equal_compute(grid):
    windows = paired_windows(
        grid["npo"], grid["grpo"], window=WINDOW, horizon=T, by="compute", samples_per_step=SPS, c_gen=0.25
    )
    # The baseline's accuracy is 0.1 * units + 0.02 seed over units 0..6; npo seed 0's point at 6.5 units lies past
    # the baseline's range and is left out, so the windows end at 5.5.
    assert [(w["lo"], w["hi"]) for w in windows] == [(0.0, 2.0), (2.0, 4.0), (4.0, 5.5)]
    assert windows[0]["diffs"] == {1: pytest.approx(0.05)}
    assert windows[0]["se"] is None
    # seed 0 at 3 units: 0.3 - 0.3; seed 1 at 3 and 4 units: +0.05.
    assert windows[1]["diffs"] == {0: pytest.approx(0.0, abs=1e-12), 1: pytest.approx(0.05)}
    assert windows[1]["mean"] == pytest.approx(0.025) and windows[1]["positive"] == 1
    # seed 0 at 4.5 units: 0.5 - 0.45 (interpolated); at 5.5: 0.5 - 0.55.
    assert windows[2]["diffs"] == {0: pytest.approx(0.0, abs=1e-12)}


def test_crn_prefix_and_activity(grid):
    # npo seed 0's first row (step 0) has entropy 0.9, the baseline's step 0 has 1.0: they differ at once
    assert crn_prefix(grid["npo"][0], grid["grpo"][0]) == (0, 0)
    assert crn_prefix(grid["grpo"][1], grid["grpo"][1]) == (6, None)  # a run is its own twin for every row
    same_start = grid["late"][0]  # the baseline's rows for steps 0..3
    assert crn_prefix(same_start, grid["grpo"][0]) == (4, None)
    act = activity(grid["npo"][0])
    assert act == {"guide_slots": 0, "guide_slots_spent": 0, "rollbacks": 1, "probes": 0, "optimizer_steps": 6,
                   "samples_total": 32}  # fmt: skip


def test_crossing_and_paired_speed(grid):
    base = grid["grpo"][0]  # acc 0.1 t: reaches 0.25 half-way between the evaluations at steps 2 and 3
    assert crossing(base, 0.25, T) == pytest.approx(2.5)
    assert crossing(base, 0.0, T) == 0.0
    assert crossing(base, 0.45, T) is None  # 0.4 at T = 4
    assert crossing(base, 0.25, T, by="compute", samples_per_step=SPS, c_gen=0.25) == pytest.approx(2.5)
    # npo seed 1 is the baseline's seed 1 + 0.05: it reaches the twin's final (0.42 at T) at t = 3.5 instead of 4
    speed = paired_speed(grid["npo"], grid["grpo"], T)
    assert speed[1] == pytest.approx(3.5 / 4.0)
    assert speed[0] is not None
    assert paired_speed(grid["late"], grid["grpo"], T)[1] is None  # missing run


def test_s_table_and_checks():
    table = s_table(ANALYSIS)
    assert [(r["source"], r["delta"]) for r in table] == [
        ("past", -10),
        ("resample", 0),
        ("near_future", 10),
        ("near_future", 20),
        ("near_future", 40),
        ("far_future", None),
        ("external", None),
    ]
    resample = table[1]
    assert (resample["rows"], resample["failed"]) == (2, 30)
    assert resample["q"] == pytest.approx(0.15) and resample["s"] == pytest.approx(0.15)
    assert table[5]["q"] is None and table[5]["v"] == pytest.approx(4.5)
    assert table[6]["v"] == math.inf
    checks = s_checks(table)
    assert checks["interior"][0] is True and "Delta=20" in checks["interior"][1]
    assert checks["near_beats"][0] is True
    edge = [dict(r, s=0.5) if r["delta"] == 40 else r for r in table]
    assert s_checks(edge)["interior"][0] is False
    assert s_checks([r for r in table if r["delta"] != 40])["interior"][0] is None
    with pytest.raises(ValueError, match="source"):
        s_table([{"source": "teacher", "delta": None}])


def test_targets(grid):
    common = dict(horizon=T, window=WINDOW, target=0.41, samples_per_step=SPS, c_gen=0.25)
    stats = {a: arm_stats(grid[a], [0, 1], **common) for a in grid}
    verdicts = targets(stats, SPEC, s_checks(s_table(ANALYSIS)))
    met = {v["name"][:3]: v["met"] for v in verdicts}
    assert met == {
        "(a)": True,  # 53.5 >= 41.0 + 5
        "(b)": False,  # 3.0 / 4.0 steps = 0.75
        "(c)": False,  # 4.25 / 4.0 compute units
        "(d)": False,
        "(e)": False,  # late 40.0 (one seed) vs 53.5
        "(f)": True,
        "(g)": True,
        "(h)": True,
        "(i)": False,  # npo - grpo = +12.5 +- 7.5 points
        "(j)": True,  # (0.9 + 0.75) / 2 vs 0.75
    }
    assert "+12.5 ± 7.5" in verdicts[8]["detail"]
    assert "ratio 0.75" in verdicts[1]["detail"]
    # A lower target: baseline reaches 0.25 at step 3 on both seeds, npo at steps 1 and 2: ratio 0.5.
    low = {a: arm_stats(grid[a], [0, 1], **(common | {"target": 0.25})) for a in grid}
    assert targets(low, SPEC, {})[1]["met"] is True
    roles_missing = targets(stats, SPEC | {"roles": {}}, {})
    assert all(v["met"] is None for v in roles_missing)


def test_write_results(grid, tmp_path):
    out_md = tmp_path / "docs" / "results.md"
    fig_dir = tmp_path / "docs" / "figures"
    text = write_results(grid, SPEC, ANALYSIS, META, out_md, fig_dir)
    assert out_md.read_text() == text
    assert "- command: `npo experiment grid.yaml`" in text and "- versions: python 3.11, torch 2.13.0" in text
    assert "c_gen (generation's share of a baseline step, measured) = 0.250" in text
    assert "Target (baseline's mean final at T) = 41.0" in text
    rows = table_rows(text)
    assert ["late", "1", "MISSING", "n/a", "n/a", "n/a", "n/a"] in rows and "late seed 1: run missing" in text
    assert ["0", "40.0", "60.0", "40.0"] in rows and ["1", "42.0", "47.0", "missing"] in rows  # finals per seed
    assert ["grpo", "41.0 ± 1.0", "41.0 ± 1.0", "21.0 ± 1.0", "0.750 ± 0.000", "4.0 ± 0.0", "8.0 ± 0.0"] in rows
    assert ["npo", "2/2", "3.0 (x0.75)", "4.0 (x1.00)", "4.2 (x1.06)", "8.0 (x1.00)"] in rows  # time to target
    assert ["late", "0/2", "never", "never", "never", "never"] in rows
    assert "+15.0 ± 10.0 (2/2 > 0)" in text and "+12.5 ± 7.5 (2/2 > 0)" in text
    assert "+5.0 ± n/a (1/1 > 0)" in text  # equal compute, first window
    assert "## Targets" in text and "(a) autonpo final >= baseline final + 5 points: **MET**" in text
    assert "(b) autonpo reaches the target in <= 50% of the baseline's steps: **NOT MET**" in text
    for name in ("accuracy_steps.png", "accuracy_compute.png", "entropy.png", "s_analysis.png"):
        assert f"(figures/{name})" in text
        assert (fig_dir / name).read_bytes()[:8] == PNG_MAGIC
    assert write_results(grid, SPEC, ANALYSIS, META, out_md, fig_dir) == text  # deterministic


def test_write_results_without_analysis_and_bad_baseline(grid, tmp_path):
    text = write_results(grid, SPEC, [], {}, tmp_path / "r.md", tmp_path / "figs")
    assert "No analysis rows." in text and "(g) S(Delta) has an interior maximum above S(0): **n/a**" in text
    assert "(figs/entropy.png)" in text and not (tmp_path / "figs" / "s_analysis.png").exists()
    with pytest.raises(ValueError, match="baseline"):
        write_results(grid, SPEC | {"baseline": "nope"}, [], {}, tmp_path / "r.md", tmp_path / "figs")


def test_paired_final_and_console_summary(grid, tmp_path):
    from npo.analysis.results import compute_results, paired_final, summary_lines

    res = compute_results(grid, SPEC, [])
    # finals at T: grpo 0.40, 0.42; npo 0.60, 0.47 -> differences +0.20, +0.05: mean 0.125, s.e. 0.075
    mean, se, positive, paired = paired_final(res, "npo")
    assert (round(mean, 10), round(se, 10), positive, paired) == (0.125, 0.075, 2, 2)
    assert paired_final(res, "late")[2:] == (0, 1)  # seed 1 missing; seed 0 equal to its twin
    text = write_results(grid, SPEC, [], {}, tmp_path / "r.md", tmp_path / "figs")
    assert ["npo", "53.5 ± 6.5", "+12.5 ± 7.5", "2/2", "+1.7"] in table_rows(text)
    lines = summary_lines(res)
    assert "at step 4, 2 seeds" in lines[0]
    npo_line = next(line for line in lines if line.strip().startswith("NPO early "))
    assert "paired vs grpo: +12.5 ± 7.5 (2/2 seeds > 0)" in npo_line and "rollbacks 0.5 ± 0.5" in npo_line
    windows = lines[lines.index(npo_line) + 1]  # the equal-steps table's cells, one per window
    assert windows == "    paired by window of steps: (0, 2] +15.0 ± 10.0 (2/2 > 0), (2, 4] +12.5 ± 7.5 (2/2 > 0)"


def test_first_probe_replays_the_trigger_on_a_twin(grid):
    from npo.analysis.stats import first_probe
    from npo.core.config import AutoNPOConfig

    # With ema_decay 0 the EMAs are the raw values: reward 0.5 throughout (gain 0 < 0.01, stagnant), entropy
    # 1 - 0.1 t, so over a window of 2 the relative drop at step t >= 2 is 0.2 / (1 - 0.1 (t - 2)): the readings of
    # steps 2..5 warn. The trainer probes before step t on the reading of step t - 1.
    twin = grid["grpo"][0]
    cfg = AutoNPOConfig(ema_decay=0.0, window=2, reward_gain_min=0.01, entropy_drop_frac=0.1, min_step=0)
    assert first_probe(twin, cfg, T) == 3  # the reading of step 2 (the first full window): drop 0.2 >= 0.1
    assert first_probe(twin, AutoNPOConfig(**{**vars(cfg), "min_step": 3}), T) == 4
    steep = AutoNPOConfig(**{**vars(cfg), "entropy_drop_frac": 0.3})  # needs 1 - 0.1 (t - 2) <= 2/3: t >= 6
    assert first_probe(twin, steep, horizon=10) is None  # the rows end at step 5
    assert first_probe(twin, AutoNPOConfig(**{**vars(steep), "require_entropy_drop": False}), T) == 3
    assert first_probe(twin, cfg, horizon=2) is None  # step 3 is past the horizon
    assert first_probe(twin, cfg, T, every=2) == 4  # checkpoint steps only: the reading of step 3


def test_trigger_section_of_an_autonpo_arm(grid, tmp_path):
    events = [
        {"kind": "autonpo", "event": "probe", "step": 2, "probed": 8, "solved": 0, "decision": None},
        {"kind": "autonpo", "event": "probe", "step": 4, "probed": 8, "solved": 3, "decision": {"delta": 2}},
        {"kind": "autonpo", "event": "rollback", "step": 4, "to_step": 2, "delta": 2},
    ]
    runs = {s: write_run(tmp_path / "auto" / f"seed{s}", baseline_rows(s), seed=s) for s in (0, 1)}
    settings = {"ema_decay": 0.0, "window": 2, "entropy_drop_frac": 0.1, "min_step": 0}
    for s, run in runs.items():
        config = {"method": "autonpo", "seed": s, "autonpo": settings, "checkpoint": {"every": 2}}
        (run.folder / "config.yaml").write_text(yaml.safe_dump(config))
        (run.folder / "interventions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events[: 3 * (s == 0)]))
    auto = {s: load_run(runs[s].folder) for s in (0, 1)}
    spec = SPEC | {"arms": [*SPEC["arms"], {"name": "auto", "label": "AutoNPO", "description": "trigger"}]}
    text = write_results({**grid, "auto": auto}, spec, [], {}, tmp_path / "r.md", tmp_path / "figs")
    assert "## AutoNPO's trigger" in text
    rows = table_rows(text)
    assert ["auto", "0", "4", "2 (0/8 solved, declined); 4 (3/8 solved, Delta* 2)", "4→2"] in rows
    assert ["auto", "1", "4", "-", "-"] in rows  # checkpoint.every 2: the reading of step 3
    assert "- auto: intervened on 1/2 seeds." in text
    assert "## AutoNPO's trigger" not in write_results(grid, SPEC, [], {}, tmp_path / "g.md", tmp_path / "figs")
