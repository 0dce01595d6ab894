"""The regime screen: how much real headroom the near future offers in one GRPO run (`npo screen FILE`).

A failed prompt (every one of `samples` responses of pi^(t) wrong) is either bad luck (pi^(t) solves it when sampled
again) or missing capability. Only the second kind is what a guide from pi^(t + Delta) can add; this module measures
it per anchor step t of one GRPO run, on P prompts of the train split (the first P of a permutation seeded by `seed`,
npo.analysis.qvs.pick_prompts), `samples` = 8 responses per prompt unless told otherwise:

    F(t)         = {x in P : all 8 samples of pi^(t) on x are wrong}                          (the anchor draw)
    Q0@8         = |{x in F : pi^(t) solves x in 8 fresh samples}| / |F|             (the resample of qvs: Q(0))
    Q0@8+R       = |{x in F : pi^(t) solves x in 8 + R fresh samples}| / |F|  (R more samples on F's unsolved part)
    U(t)         = {x in F : none of the 8 + R fresh samples of pi^(t) is correct}        (capability, not luck)
    Q(Delta)     = |{x in F : pi^(t+Delta) solves x in 8 samples}| / |F|
    H(Delta)     = |{x in U : pi^(t+Delta) solves x in 8 samples}| / |U|         (the near future's real headroom)
    H/prompt     = |U| / |P| * H(Delta)      (share of all prompts where the near future adds what resampling cannot)
    KL(Delta)    = per-token k3 estimate of KL(pi^(t+Delta) || pi^(t)) on pi^(t+Delta)'s samples (qvs.sample_kl)
    V(Delta)     = exp(L * KL(Delta)), L the mean response length of pi^(t+Delta);   S(Delta) = Q(Delta) / V(Delta)
    zero groups  = mean `zero_groups` (share of all-wrong training groups) of the main-line rows with |step - t| <=
                   window / 2
    GRPO gain    = acc(t + Delta) - acc(t), acc the held-out eval_acc of the main line, linear between evaluations
                   (None past the last one)

Across anchors (pooled per Delta over the anchors that have a checkpoint t + Delta): Q, Q0, H and |U|/P are ratios
of summed counts (sum of solved / sum of |F|, |U| or |P|); KL and L are means over anchors and V = exp(mean L *
mean KL), S = Q / V; gain and zero groups are means. A regime's best Delta maximises the pooled H (the smaller Delta
on ties); regimes are ranked by the pooled H/prompt at their best Delta (H alone is noisy when U is small).

Seeds: every draw derives from (seed, purpose) through npo.core.seeds.derive_seed (qvs.analysis_seed): the anchor
and future draws are those of npo.analysis.qvs (common random numbers across checkpoints), the extra R samples of
anchor t use purpose "resample/t" (generated and verified only, not scored). A regime's measurement is
reproducible from its run folder and these settings.

    result = measure_regime("runs/screens/regimes/base/seed0", anchors=[10, 30], deltas=[10, 20], resample=48)
    result["summary"]["h"], result["summary"]["best_delta"]
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from npo.analysis.markdown import fmt_number, fmt_points, markdown_table
from npo.analysis.qvs import (
    Sampler,
    analysis_seed,
    draw_checkpoints,
    engine_for,
    load_checkpoint_policy,
    measure,
    pick_prompts,
    plan_pairs,
    run_settings,
    signal_value,
)
from npo.analysis.runs import EvalPoint, RunData, load_run, number
from npo.runtime.checkpoint import CheckpointManager
from npo.runtime.verify import verify_groups

PER_DELTA_SUMS = ("prompts", "failed", "solved8", "solved_r", "unsolved", "solved_f", "solved_u")
"""Counts summed over the anchors of one Delta before the pooled ratios are taken."""

# ----------------------------------------------------------------------------------------------------------------
# The hand-computable core (pure: boolean arrays in, counts and shares out).


def solved_mask(solved: Any) -> np.ndarray:
    """Per prompt: solved (>= 1 correct sample). A (prompts,) array is taken as is; a (prompts, samples) array of
    per-sample correctness is reduced with any() over samples."""
    array = np.asarray(solved, dtype=bool)
    if array.ndim == 2:
        return array.any(axis=1)
    if array.ndim != 1:
        raise ValueError(f"solved: expected a (prompts,) or (prompts, samples) array, got shape {array.shape}")
    return array


def share(count: int, total: int) -> float | None:
    """count / total, None when total is 0."""
    return count / total if total else None


def anchor_counts(anchor: Any, resample: Any, extra: Any) -> dict[str, Any]:
    """F, Q0@8, Q0@8+R and U of one anchor from the solved arrays (module docstring):

    anchor: pi^(t)'s anchor draw (defines F); resample: pi^(t)'s 8 fresh samples; extra: pi^(t)'s R more samples
    (False for prompts not drawn). Returns prompts, failed, solved8, solved_r (solved by the 8 + R), unsolved (|U|),
    q0_8, q0_r, u_share (|U| / P) and the masks f and u (numpy, not JSON).
    """
    a, r, e = solved_mask(anchor), solved_mask(resample), solved_mask(extra)
    if not len(a) == len(r) == len(e):
        raise ValueError(f"solved arrays: prompts differ (anchor {len(a)}, resample {len(r)}, extra {len(e)})")
    f = ~a
    u = f & ~(r | e)
    failed, solved8, unsolved = int(f.sum()), int((f & r).sum()), int(u.sum())
    solved_r = failed - unsolved
    return {
        "prompts": len(a),
        "failed": failed,
        "solved8": solved8,
        "solved_r": solved_r,
        "unsolved": unsolved,
        "q0_8": share(solved8, failed),
        "q0_r": share(solved_r, failed),
        "u_share": share(unsolved, len(a)),
        "f": f,
        "u": u,
    }


def future_counts(counts: Mapping[str, Any], future: Any) -> dict[str, Any]:
    """Q(Delta), H(Delta) and H/prompt of pi^(t+Delta)'s solved array against one anchor's anchor_counts:
    solved_f, solved_u, q, h, h_per_prompt."""
    fut = solved_mask(future)
    if len(fut) != counts["prompts"]:
        raise ValueError(f"future: {len(fut)} prompts, the anchor has {counts['prompts']}")
    solved_f, solved_u = int((counts["f"] & fut).sum()), int((counts["u"] & fut).sum())
    return {
        "solved_f": solved_f,
        "solved_u": solved_u,
        "q": share(solved_f, counts["failed"]),
        "h": share(solved_u, counts["unsolved"]),
        "h_per_prompt": share(solved_u, counts["prompts"]),
    }


def zero_group_share(rows: Sequence[Mapping[str, Any]], step: int, window: int) -> float | None:
    """Mean `zero_groups` of the main-line rows with |row step - step| <= window / 2 (None when none has it)."""
    values = [number(r.get("zero_groups")) for r in rows if abs(int(r["step"]) - step) <= window / 2]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def accuracy_at(evals: Sequence[EvalPoint], step: float) -> float | None:
    """Held-out eval_acc at `step`, linear between the nearest evaluations; None outside the evaluated range."""
    if not evals or not evals[0].step <= step <= evals[-1].step:
        return None
    return float(np.interp(step, [p.step for p in evals], [p.acc for p in evals]))


def grpo_gain(evals: Sequence[EvalPoint], step: int, delta: int) -> float | None:
    """acc(step + delta) - acc(step) (accuracy_at); None when either is outside the evaluated range."""
    now, later = accuracy_at(evals, step), accuracy_at(evals, step + delta)
    return None if now is None or later is None else later - now


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def pool_delta(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The pooled numbers of one Delta from its (anchor, Delta) rows (module docstring): summed counts, then
    q0_8, q0_r, u_share, q, h, h_per_prompt as ratios of sums; kl (k3), mean_len, zero_groups, gain as means;
    v = exp(mean_len * kl), s = q / v."""
    sums = {k: int(sum(r[k] for r in rows)) for k in PER_DELTA_SUMS}
    kl, mean_len = _mean([r["kl_k3"] for r in rows]), _mean([r["mean_len"] for r in rows])
    q = share(sums["solved_f"], sums["failed"])
    v, s = signal_value(q, kl, mean_len) if kl is not None and mean_len is not None else (None, None)
    return {
        "delta": rows[0]["delta"],
        "anchors": [r["anchor"] for r in rows],
        **sums,
        "q0_8": share(sums["solved8"], sums["failed"]),
        "q0_r": share(sums["solved_r"], sums["failed"]),
        "u_share": share(sums["unsolved"], sums["prompts"]),
        "q": q,
        "h": share(sums["solved_u"], sums["unsolved"]),
        "h_per_prompt": share(sums["solved_u"], sums["prompts"]),
        "kl": kl,
        "mean_len": mean_len,
        "v": v,
        "s": s,
        "gain": _mean([r["gain"] for r in rows]),
        "zero_groups": _mean([r["zero_groups"] for r in rows]),
    }


def pool_deltas(pairs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """pool_delta for every Delta of the (anchor, Delta) rows, Delta ascending."""
    return [pool_delta([r for r in pairs if r["delta"] == d]) for d in sorted({r["delta"] for r in pairs})]


def best_delta(pooled: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The pooled row with the largest H (the smaller Delta on ties); None when no Delta has an H."""
    with_h = [r for r in pooled if r["h"] is not None]
    return max(with_h, key=lambda r: (r["h"], -r["delta"])) if with_h else None


# ----------------------------------------------------------------------------------------------------------------
# Measuring one regime's run folder.


def solved_only(policy: Any, sampler: Sampler, problems: Sequence[Any], samples: int, purpose: str) -> list[bool]:
    """Per problem: >= 1 of `samples` responses of the policy verified correct (npo.runtime.verify), seed
    qvs.analysis_seed(sampler.seed, purpose); unlike Sampler.draw nothing is scored teacher-forced."""
    prompts = [policy.encode_prompt(p) for p in problems]
    seed = analysis_seed(sampler.seed, purpose)
    generations = engine_for(policy).generate(prompts, samples, sampler.params, seed=seed)
    decode = functools.partial(policy.tokenizer.decode, skip_special_tokens=True)
    groups = verify_groups(problems, generations, decode, sampler.reward, policy_step=-1)
    return [any(s.finished and s.reward >= sampler.threshold for s in group) for group in groups]


def _draw_extra(
    ckpt, load: Callable[[Path], Any], sampler, anchor_draws, future_draws, resample: int
) -> dict[int, np.ndarray]:
    """Per anchor t: the solved array (over P) of R more samples of pi^(t) on the prompts of F that pi^(t)'s 8
    fresh samples did not solve (False elsewhere)."""
    extra = {}
    for t, anchor in anchor_draws.items():
        todo = [i for i, (a, r) in enumerate(zip(anchor.solved, future_draws[t].solved, strict=True)) if not (a or r)]
        solved = np.zeros(len(anchor.solved), dtype=bool)
        if todo:
            policy = load(ckpt.path(t))
            problems = [sampler.problems[i] for i in todo]
            solved[todo] = solved_only(policy, sampler, problems, resample, f"resample/{t}")
            del policy
        extra[t] = solved
    return extra


def anchor_rows(
    t: int, deltas: Sequence[int], draws: Mapping[str, Any], run: RunData, window: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The anchor row of t and its (anchor, Delta > 0) rows from the draws (keys anchor, futures, extra, kls and
    samples; see measure_regime)."""
    anchor, futures = draws["anchor"][t], draws["futures"]
    counts = anchor_counts(anchor.solved, futures[t].solved, draws["extra"][t])
    head = {k: v for k, v in counts.items() if k not in ("f", "u")}
    zero = zero_group_share(run.train_rows, t, window)
    row = {"anchor": t, **head, "pass_rate": anchor.pass_rate, "zero_groups": zero}
    row["eval_acc"] = accuracy_at(run.evals, t)
    pairs = []
    for d in [d for d in deltas if d > 0]:
        future = futures[t + d]
        qvs_row = measure(anchor, future, counts["q0_8"], draws["kls"][(t, d)], draws["samples"])
        pairs.append(
            {"anchor": t, "delta": d, "future_step": t + d, **head, **future_counts(counts, future.solved)}
            | {k: qvs_row[k] for k in ("kl_k3", "kl_k1", "mean_len", "v", "s")}
            | {"zero_groups": zero, "gain": grpo_gain(run.evals, t, d), "pass_rate_future": future.pass_rate}
        )
    return row, pairs


def measure_regime(
    folder: str | Path,
    *,
    anchors: Sequence[int],
    deltas: Sequence[int],
    prompts: int = 256,
    samples: int = 8,
    resample: int = 48,
    seed: int = 0,
    window: int = 10,
    load_checkpoint: Callable[[Path], Any] | None = None,
) -> dict[str, Any]:
    """Measure one regime's finished GRPO run (module docstring) at the anchors that are checkpoints.

    Returns {"settings", "anchors": one row per anchor, "pairs": one row per (anchor, Delta > 0), "deltas": pooled
    per Delta, "summary": summarize(...)}. Raises ValueError when no anchor is a checkpoint of the run.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per loaded checkpoint would drown the log
    folder = Path(folder)
    if samples < 1 or resample < 1:
        raise ValueError(f"samples / resample: must be >= 1, got {samples} / {resample}")
    task, params, threshold = run_settings(folder, None, None, None)
    ckpt = CheckpointManager(folder / "checkpoints")
    have = ckpt.steps()
    pairs = plan_pairs(have, deltas, [t for t in anchors if t in have])
    if not pairs:
        raise ValueError(f"anchors: none of {list(anchors)} is a checkpoint of {folder} (checkpoints: {have})")
    load = load_checkpoint or load_checkpoint_policy
    sampler = Sampler(task.rewards, pick_prompts(task.train, prompts, seed), samples, params, seed, threshold)
    futures, anchor_draws, kls = draw_checkpoints(ckpt, load, pairs, sampler)
    draws = {"anchor": anchor_draws, "futures": futures, "kls": kls, "samples": samples}
    draws["extra"] = _draw_extra(ckpt, load, sampler, anchor_draws, futures, resample)
    run = load_run(folder)
    rows, pair_rows = [], []
    for t, ds in pairs.items():
        row, more = anchor_rows(t, ds, draws, run, window)
        rows.append(row)
        pair_rows += more
    settings = {"run": str(folder), "anchors": sorted(pairs), "deltas": sorted({d for d in deltas if d > 0}),
                "prompts": prompts, "samples": samples, "resample": resample, "seed": seed, "window": window,
                "temperature": params.temperature}  # fmt: skip
    pooled = pool_deltas(pair_rows)
    return {"settings": settings, "anchors": rows, "pairs": pair_rows, "deltas": pooled,
            "summary": summarize(rows, pooled, run)}  # fmt: skip


def summarize(rows: Sequence[Mapping[str, Any]], pooled: Sequence[Mapping[str, Any]], run: RunData) -> dict[str, Any]:
    """A regime's line of the ranked table: pooled over every anchor (zero_groups, q0_8, q0_r, u_share) and the
    pooled numbers of the best Delta (best_delta): delta, q, h, h_per_prompt, kl, v, s, gain; final_acc = the run's
    last main-line eval_acc."""
    failed = sum(r["failed"] for r in rows)
    best = best_delta(pooled)
    keys = ("q", "h", "h_per_prompt", "kl", "mean_len", "v", "s", "gain")
    return {
        "zero_groups": _mean([r["zero_groups"] for r in rows]),
        "q0_8": share(sum(r["solved8"] for r in rows), failed),
        "q0_r": share(sum(r["solved_r"] for r in rows), failed),
        "u_share": share(sum(r["unsolved"] for r in rows), sum(r["prompts"] for r in rows)),
        "best_delta": best["delta"] if best else None,
        **{k: (best[k] if best else None) for k in keys},
        "final_acc": run.evals[-1].acc if run.evals else None,
    }


# ----------------------------------------------------------------------------------------------------------------
# The ranked table, its markdown, the JSON and the plot.


def rank(regimes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Regime results (each with "summary") sorted by pooled H/prompt at the best Delta, best first; regimes
    without one last, in the given order."""

    def key(regime: Mapping[str, Any]) -> float:
        value = regime["summary"].get("h_per_prompt")
        return -value if value is not None else math.inf

    return sorted(regimes, key=key)


COLUMNS = ("rank", "regime", "description", "zero groups", "Q0@8", "Q0@8+R", "U/P", "H*", "Delta*", "H*/prompt",
           "Q(Delta*)", "KL", "V", "S", "GRPO gain", "final acc", "wall (min)")  # fmt: skip
"""The ranked table's columns (accuracies, shares and gains in points, KL in nats per token)."""


def table_row(index: int, regime: Mapping[str, Any]) -> list[str]:
    """One line of the ranked table (COLUMNS)."""
    s = regime["summary"]
    minutes = sum(regime.get("seconds", {}).values()) / 60 if regime.get("seconds") else None
    return [
        str(index),
        regime["name"],
        regime.get("description", ""),
        *(fmt_points(s[k]) for k in ("zero_groups", "q0_8", "q0_r", "u_share", "h")),
        fmt_number(s["best_delta"], 0) if s["best_delta"] is not None else "n/a",
        *(fmt_points(s[k]) for k in ("h_per_prompt", "q")),
        fmt_number(s["kl"], 4),
        fmt_number(s["v"], 2),
        fmt_number(s["s"], 3),
        fmt_points(s["gain"], signed=True),
        fmt_points(s["final_acc"]),
        fmt_number(minutes, 1),
    ]


def delta_table(regimes: Sequence[Mapping[str, Any]]) -> str:
    """Every regime's pooled numbers per Delta (markdown)."""
    header = ["regime", "Delta", "anchors", "F", "U", "Q0@8", "Q0@8+R", "Q(Delta)", "H(Delta)", "H/prompt", "KL",
              "V", "S", "GRPO gain"]  # fmt: skip
    rows = []
    for regime in regimes:
        for d in regime["deltas"]:
            anchors = ",".join(map(str, d["anchors"]))
            rows.append(
                [regime["name"], str(d["delta"]), anchors, str(d["failed"]), str(d["unsolved"])]
                + [fmt_points(d[k]) for k in ("q0_8", "q0_r", "q", "h", "h_per_prompt")]
                + [fmt_number(d["kl"], 4), fmt_number(d["v"], 2), fmt_number(d["s"], 3), fmt_points(d["gain"], True)]
            )
    return markdown_table(header, rows)


DEFINITIONS = """\
- **zero groups**: share of training groups with every sample wrong, main line, steps within window / 2 of each anchor.
- **F**: prompts (of P drawn from the train split) whose 8 samples from pi(t) all fail. **Q0@8** / **Q0@8+R**: share of
  F that pi(t) itself solves in 8 / 8 + R fresh samples (luck). **U**: F still unsolved after them (capability).
- **H(Delta)**: share of U that pi(t+Delta) solves in 8 samples (the near future's real headroom); **H/prompt** =
  |U| / P * H, the share of all prompts where a near-future guide adds what resampling cannot.
- **Q(Delta)**: share of F that pi(t+Delta) solves in 8 samples; **KL**: per-token k3 KL(pi(t+Delta) || pi(t)) on
  pi(t+Delta)'s samples; **V** = exp(L KL), L the mean response length; **S** = Q / V.
- **GRPO gain**: held-out eval_acc(t + Delta) - eval_acc(t) of the run itself (linear between evaluations).
- Pooled over anchors: ratios of summed counts; KL, L, gain, zero groups averaged. **Delta*** maximises H; regimes are
  ranked by H*/prompt. Shares, accuracies and gains in points."""


def screen_markdown(name: str, regimes: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], plot: str | None) -> str:
    """The screen's report: meta lines, the ranked table, the definitions, the per-Delta table and the plot link."""
    ranked = rank(regimes)
    lines = [f"# Regime screen: {name}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if v not in (None, "")]
    lines += ["", "## Ranked by the near future's real headroom", ""]
    lines += [markdown_table(COLUMNS, [table_row(i, r) for i, r in enumerate(ranked, start=1)]), ""]
    lines += ["## Definitions", "", DEFINITIONS, "", "## Per Delta (pooled over anchors)", "", delta_table(ranked), ""]
    if plot:
        lines += [f"![headroom H vs Delta]({plot})", ""]
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def write_screen(
    name: str, regimes: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], out: str | Path
) -> dict[str, Path]:
    """OUT/screen.json (every number; non-finite as null), OUT/screen.png (plots.plot_screen) and OUT/screen.md.
    Returns their paths by kind: markdown, json, plot."""
    from npo.analysis.plots import plot_screen

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ranked = rank(regimes)
    paths = {"markdown": out / "screen.md", "json": out / "screen.json", "plot": out / "screen.png"}
    payload = {"name": name, "meta": dict(meta), "ranking": [r["name"] for r in ranked], "regimes": list(ranked)}
    paths["json"].write_text(json.dumps(_json_value(payload), indent=1) + "\n")
    plot_screen(ranked, paths["plot"])
    paths["markdown"].write_text(screen_markdown(name, ranked, meta, paths["plot"].name))
    return paths
