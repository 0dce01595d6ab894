"""Offline Q / V / S analysis of a run's checkpoints (docs/method.md, row "Q / V / S").

For an anchor step t and a distance Delta >= 0 with checkpoints pi^(t) and pi^(t+Delta), on a fixed set P of
training prompts (the first num_prompts of a seeded shuffle of the train split), `samples` responses each:

    F(t)      = {x in P : every sample of pi^(t) on x is wrong}                      (pi^(t) fails x)
    Q(Delta)  = |{x in F(t) : pi^(t+Delta) solves x (>= 1 sample verified correct)}| / |F(t)|
    KL(Delta) = mean over every token of pi^(t+Delta)'s samples on P of a per-token estimate of
                KL(pi^(t+Delta) || pi^(t)), from teacher-forced log-probs under both checkpoints:
                    d = log pi^(t)(tok) - log pi^(t+Delta)(tok);   k1 = -d;   k3 = exp(d) - d - 1
    L         = mean length (tokens, EOS included) of pi^(t+Delta)'s samples
    V(Delta)  = exp(L * KL_k3(Delta))        (the growth of the trajectory importance weight)
    S(Delta)  = Q(Delta) / V(Delta)

Delta = 0 is always measured: pi^(t) resampled with a different seed. Q(0) is the noise floor of Q (a prompt failed
in one draw of `samples` is solved in another by luck); a near future is only useful where Q(Delta) is clearly above
Q(0). Seeds: every checkpoint samples the anchor draw with one seed and the future draw with another (common random
numbers across checkpoints and Deltas); both derive from `seed` only.

Each checkpoint is loaded once (steps in descending order, so the future samples exist before the anchor that
scores them). Log-probs are computed in float32 at the run's rollout temperature.

analyze_sources measures the same quantities for other guide sources than the near future (a resample, the past,
a model folder) against the same anchors.

    rows = analyze_run("runs/grpo_seed0", deltas=[10, 20, 40], anchors=[0, 40], num_prompts=256, samples=8, seed=0)
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npo.analysis.plots import plot_analysis
from npo.core.autonpo import mean_token_kl, v_hat
from npo.core.seeds import derive_seed
from npo.core.types import Problem
from npo.runtime.checkpoint import CheckpointManager
from npo.runtime.engine import SamplingParams, TransformersEngine
from npo.runtime.models import ModelConfig, load_policy
from npo.runtime.run_config import load_run_config
from npo.runtime.runner import PolicyLike, TaskLike
from npo.runtime.tasks import load_task
from npo.runtime.verify import Rewards, verify_groups


@dataclass
class Draw:
    """`samples` responses per prompt from one checkpoint, verified, with their teacher-forced log-probs."""

    prompt_ids: list[list[int]]
    """Per response (prompt-major, len = prompts * samples): the prompt's token ids."""
    responses: list[list[int]]
    """Per response: generated token ids (EOS included when finished)."""
    logprobs: list[list[float]]
    """Per response, per token: teacher-forced log-prob under the checkpoint that sampled it."""
    solved: list[bool]
    """Per prompt: at least one response verified correct."""
    pass_rate: float
    """Fraction of all responses verified correct."""

    @property
    def mean_length(self) -> float:
        """L: mean response length in tokens."""
        return float(np.mean([len(r) for r in self.responses])) if self.responses else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces.


def analysis_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed that depends only on (seed, purpose): npo.core.seeds.derive_seed(seed, "analysis", purpose)."""
    return derive_seed(seed, "analysis", purpose)


def pick_prompts(train: Sequence[Problem], num_prompts: int, seed: int) -> list[Problem]:
    """The first num_prompts problems of a permutation of `train` seeded by `seed`."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts: must be >= 1, got {num_prompts}")
    if num_prompts > len(train):
        raise ValueError(f"num_prompts: {num_prompts} exceeds the train split's {len(train)} problems")
    order = np.random.default_rng(seed).permutation(len(train))[:num_prompts]
    return [train[i] for i in order]


def plan_pairs(available: Sequence[int], deltas: Sequence[int], anchors: Sequence[int] | None) -> dict[int, list[int]]:
    """anchor t -> the Deltas (0 always included) whose checkpoint t + Delta exists.

    anchors None: every checkpoint with a partner at some Delta > 0 (or every checkpoint when no Delta > 0 has one).
    Raises ValueError for a negative Delta or an anchor that is not a checkpoint.
    """
    for d in deltas:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"deltas: must be integers >= 0, got {d!r}")
    have = set(available)
    all_deltas = sorted({0, *deltas})
    if anchors is None:
        anchors = [t for t in sorted(have) if any(t + d in have for d in all_deltas if d > 0)] or sorted(have)
    missing = [t for t in anchors if t not in have]
    if missing:
        raise ValueError(f"anchors: no checkpoint at steps {missing} (checkpoints: {sorted(have)})")
    return {t: [d for d in all_deltas if t + d in have] for t in sorted(set(anchors))}


def q_value(anchor_solved: Sequence[bool], future_solved: Sequence[bool]) -> tuple[float | None, int, int]:
    """Q = fraction of the prompts the anchor fails that the future solves; returns (Q, |F|, solved of F).
    Q is None when the anchor fails no prompt."""
    if len(anchor_solved) != len(future_solved):
        raise ValueError(f"future_solved: {len(future_solved)} prompts, anchor_solved has {len(anchor_solved)}")
    failed = [i for i, ok in enumerate(anchor_solved) if not ok]
    solved = sum(bool(future_solved[i]) for i in failed)
    return (solved / len(failed) if failed else None), len(failed), solved


def signal_value(q: float | None, kl: float, mean_length: float) -> tuple[float, float | None]:
    """V = exp(L * KL) (+inf past float range) and S = Q / V (None when Q is None)."""
    v = v_hat(kl, mean_length)
    return v, (None if q is None else q / v)


# ----------------------------------------------------------------------------------------------------------------
# Sampling and scoring.


def draw(
    policy: PolicyLike,
    engine: TransformersEngine,
    reward: Rewards,
    problems: Sequence[Problem],
    samples: int,
    params: SamplingParams,
    seed: int,
    correct_threshold: float,
) -> Draw:
    """Sample `samples` responses per problem, verify them (npo.runtime.verify: reward 0 when unfinished), score
    them teacher-forced."""
    prompts = [policy.encode_prompt(p) for p in problems]
    generations = engine.generate(prompts, samples, params, seed=seed)
    decode = functools.partial(policy.tokenizer.decode, skip_special_tokens=True)
    groups = verify_groups(problems, generations, decode, reward, policy_step=-1)
    rows_prompt, rows_response, solved, correct = [], [], [], 0
    for prompt, group in zip(prompts, groups, strict=True):
        oks = [s.finished and s.reward >= correct_threshold for s in group]
        correct += sum(oks)
        solved.append(any(oks))
        rows_prompt += [prompt] * len(group)
        rows_response += [list(s.response_ids) for s in group]
    logprobs = engine.score(rows_prompt, rows_response, temperature=params.temperature)
    return Draw(rows_prompt, rows_response, logprobs, solved, correct / max(len(rows_response), 1))


def load_checkpoint_policy(folder: Path, device: str = "cpu") -> PolicyLike:
    """A checkpoint folder as an npo.runtime.models.Policy in float32 (prompt encoding as in training: tiny preset ->
    [bos] + characters of compact_prompt; chat tokenizer -> chat template)."""
    policy = load_policy(ModelConfig(preset=str(folder), dtype="float32"), seed=0)
    policy.model.to(device)
    return policy


@dataclass(frozen=True)
class Sampler:
    """What every draw of one analysis shares: the task's reward, the prompts, samples per prompt, sampling params,
    the analysis seed and the correct threshold."""

    reward: Rewards
    problems: list[Problem]
    samples: int
    params: SamplingParams
    seed: int
    threshold: float

    def draw(self, policy: PolicyLike, engine: TransformersEngine, purpose: str) -> Draw:
        """draw() of the policy with the seed analysis_seed(seed, purpose): "anchor" or "future"."""
        seed = analysis_seed(self.seed, purpose)
        return draw(policy, engine, self.reward, self.problems, self.samples, self.params, seed, self.threshold)


def engine_for(policy: PolicyLike) -> TransformersEngine:
    """A TransformersEngine over the policy's model (its EOS and padding ids)."""
    return TransformersEngine(policy.model, eos_id=policy.eos_id, pad_id=policy.pad_id)


def run_settings(
    folder: Path, task: TaskLike | None, params: SamplingParams | None, threshold: float | None
) -> tuple[TaskLike, SamplingParams, float]:
    """Task, sampling params and correct threshold: the given ones, else rebuilt from the run's config.yaml.

    Raises FileNotFoundError when one is missing and the folder has no config.yaml, ValueError for a temperature
    <= 0 (log-probs are scored at the rollout temperature).
    """
    if task is None or params is None or threshold is None:
        config_path = folder / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"folder: {folder} has no config.yaml (pass task, params and correct_threshold)")
        cfg = load_run_config(config_path)
        if task is None:
            task = load_task(cfg.task)
        params = params or cfg.rollout
        threshold = cfg.algo.correct_threshold if threshold is None else threshold
    if not params.temperature > 0:
        raise ValueError(f"params.temperature: must be > 0 to score samples, got {params.temperature}")
    return task, params, threshold


def sample_kl(engine: TransformersEngine, other: Draw, temperature: float) -> tuple[float, float]:
    """(k3, k1): per-token KL(other's policy || the engine's policy) on other's samples (module docstring), the
    samples scored teacher-forced by the engine."""
    under_anchor = engine.score(other.prompt_ids, other.responses, temperature=temperature)
    k3, k1 = (mean_token_kl(other.logprobs, under_anchor, e) for e in ("k3", "k1"))
    return k3, k1


def measure(anchor: Draw, other: Draw, q0: float | None, kl: tuple[float, float], samples: int) -> dict[str, Any]:
    """The Q / KL / V / S fields of one row (anchor pi^(t), `other` the source's draw, kl = sample_kl):
    prompts, samples, failed, solved, q, q0, kl_k3, kl_k1, mean_len, v, s."""
    q, failed, solved = q_value(anchor.solved, other.solved)
    k3, k1 = kl
    v, s = signal_value(q, k3, other.mean_length)
    return {
        "prompts": len(anchor.solved),
        "samples": samples,
        "failed": failed,
        "solved": solved,
        "q": q,
        "q0": q0,
        "kl_k3": k3,
        "kl_k1": k1,
        "mean_len": other.mean_length,
        "v": v,
        "s": s,
    }


# ----------------------------------------------------------------------------------------------------------------
# The analysis of one run's near futures.


def draw_checkpoints(
    ckpt: CheckpointManager, load: Callable[[Path], PolicyLike], pairs: dict[int, list[int]], sampler: Sampler
) -> tuple[dict[int, Draw], dict[int, Draw], dict[tuple[int, int], tuple[float, float]]]:
    """Load each checkpoint once, latest first: the future draw of every t + Delta, the anchor draw of every t, and
    the (k3, k1) KL of each pair (t, Delta) (the future's samples scored by the anchor)."""
    futures = {t + d for t, ds in pairs.items() for d in ds}
    future_draws: dict[int, Draw] = {}
    anchor_draws: dict[int, Draw] = {}
    kls: dict[tuple[int, int], tuple[float, float]] = {}
    for step in sorted(futures | set(pairs), reverse=True):
        ckpt.verify(step)
        policy = load(ckpt.path(step))
        engine = engine_for(policy)
        if step in futures:
            future_draws[step] = sampler.draw(policy, engine, "future")
        if step in pairs:
            anchor_draws[step] = sampler.draw(policy, engine, "anchor")
            for d in pairs[step]:
                kls[(step, d)] = sample_kl(engine, future_draws[step + d], sampler.params.temperature)
        del policy, engine
    return future_draws, anchor_draws, kls


def analyze_run(
    folder: str | Path,
    *,
    deltas: Sequence[int],
    anchors: Sequence[int] | None = None,
    num_prompts: int = 128,
    samples: int = 8,
    seed: int = 0,
    out: str | Path | None = None,
    task: TaskLike | None = None,
    params: SamplingParams | None = None,
    correct_threshold: float | None = None,
    load_checkpoint: Callable[[Path], PolicyLike] | None = None,
) -> list[dict[str, Any]]:
    """Measure Q, KL, V, S (module docstring) for every (anchor t, Delta) whose checkpoints exist.

    Args:
        folder: the run folder (checkpoints/ and config.yaml).
        deltas: distances Delta > 0 to measure; Delta = 0 is always added.
        anchors: steps t (checkpoints); None = every checkpoint with a partner at some Delta > 0.
        num_prompts: prompts from the train split (first num_prompts of a permutation seeded by `seed`).
        samples: responses per prompt and checkpoint (a prompt is solved when >= 1 is correct).
        seed: analysis seed (prompt choice and sampling).
        out: folder for analysis.json / analysis.md / analysis.png (default: the run folder).
        task, params, correct_threshold: default to the run's config.yaml (task, rollout, algo.correct_threshold).
        load_checkpoint: checkpoint folder -> policy (default load_checkpoint_policy).
    Returns:
        one dict per (anchor, Delta), anchors ascending then Delta ascending, with keys anchor, delta, future_step,
        prompts, samples, failed, solved, q, q0, kl_k3, kl_k1, mean_len, v, s, pass_rate_anchor, pass_rate_future.
    """
    folder = Path(folder)
    if samples < 1:
        raise ValueError(f"samples: must be >= 1, got {samples}")
    task, params, threshold = run_settings(folder, task, params, correct_threshold)
    ckpt = CheckpointManager(folder / "checkpoints")
    pairs = plan_pairs(ckpt.steps(), deltas, anchors)
    if not pairs:
        raise ValueError(f"folder: {folder} has no checkpoints to analyse")
    problems = pick_prompts(task.train, num_prompts, seed)
    sampler = Sampler(task.rewards, problems, samples, params, seed, threshold)
    future_draws, anchor_draws, kls = draw_checkpoints(ckpt, load_checkpoint or load_checkpoint_policy, pairs, sampler)
    rows = []
    for t, ds in pairs.items():
        anchor = anchor_draws[t]
        q0 = q_value(anchor.solved, future_draws[t].solved)[0]
        for d in ds:
            future = future_draws[t + d]
            rows.append(
                {"anchor": t, "delta": d, "future_step": t + d, **measure(anchor, future, q0, kls[(t, d)], samples)}
                | {"pass_rate_anchor": anchor.pass_rate, "pass_rate_future": future.pass_rate}
            )
    settings = {
        "run": str(folder),
        "deltas": sorted({0, *deltas}),
        "anchors": sorted(pairs),
        "num_prompts": num_prompts,
        "samples": samples,
        "seed": seed,
        "params": {"temperature": params.temperature, "top_p": params.top_p, "max_new_tokens": params.max_new_tokens},
        "correct_threshold": threshold,
    }
    write_analysis(rows, settings, Path(out) if out is not None else folder)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Guide sources against one run's anchors.

Source = tuple[str, int | None, tuple[str, Any]]
"""(source name, delta or None, policy key): key ("step", t) is checkpoint t of the run, ("model", path) a folder."""


def source_plan(
    anchors: Sequence[int], deltas: Sequence[int], have: set[int], models: dict[str, Path] | None
) -> dict[int, list[Source]]:
    """anchor t -> its sources: resample (pi^(t), delta 0), near_future (pi^(t + Delta), delta +Delta) and past
    (pi^(t - Delta), delta -Delta) where that checkpoint exists, then each of `models` by name (delta None)."""
    plan: dict[int, list[Source]] = {}
    for t in anchors:
        entries: list[Source] = [("resample", 0, ("step", t))]
        for d in sorted(deltas):
            if t + d in have:
                entries.append(("near_future", d, ("step", t + d)))
            if t - d in have:
                entries.append(("past", -d, ("step", t - d)))
        for name, path in sorted((models or {}).items()):
            entries.append((name, None, ("model", str(path))))
        plan[t] = entries
    return plan


def analyze_sources(
    folder: str | Path,
    *,
    anchors: Sequence[int],
    deltas: Sequence[int],
    models: dict[str, Path] | None = None,
    num_prompts: int = 128,
    samples: int = 8,
    seed: int = 0,
    task: TaskLike | None = None,
    params: SamplingParams | None = None,
    correct_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Q, KL, V, S of every guide source against the anchor policies pi^(t) of one run (module docstring):

        resample     pi^(t) itself, another draw (Delta = 0: the noise floor Q(0))
        near_future  pi^(t + Delta)       (NPO)                      delta = +Delta
        past         pi^(t - Delta)       (replay of the run's own earlier trajectories)  delta = -Delta
        <name>       a model folder of `models`, e.g. far_future (a finished run's final checkpoint) or external
                     (another model); delta = None

    A source is skipped where its checkpoint does not exist. Each policy is loaded once to sample; each anchor is
    loaded once more to score every source's samples. Returns one dict per (anchor, source, delta) with keys anchor,
    source, delta, prompts, samples, failed, solved, q, q0, kl_k3, kl_k1, mean_len, v, s, pass_rate_source.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per loaded checkpoint would drown the log
    folder = Path(folder)
    task, params, threshold = run_settings(folder, task, params, correct_threshold)
    for d in deltas:
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ValueError(f"deltas: must be integers > 0, got {d!r}")
    ckpt = CheckpointManager(folder / "checkpoints")
    have = set(ckpt.steps())
    anchors = sorted({t for t in anchors if t in have})
    if not anchors:
        raise ValueError(f"anchors: none of them is a checkpoint of {folder} (checkpoints: {sorted(have)})")
    sampler = Sampler(task.rewards, pick_prompts(task.train, num_prompts, seed), samples, params, seed, threshold)
    plan = source_plan(anchors, deltas, have, models)

    def load(key: tuple[str, Any]) -> PolicyLike:
        if key[0] == "step":
            ckpt.verify(key[1])
            return load_checkpoint_policy(ckpt.path(key[1]))
        return load_checkpoint_policy(Path(key[1]))

    draws: dict[tuple[str, Any], Draw] = {}
    for key in sorted({k for entries in plan.values() for _, _, k in entries}, key=str):
        policy = load(key)
        engine = engine_for(policy)
        draws[key] = sampler.draw(policy, engine, "future")
        del policy, engine
    rows = []
    for t, entries in plan.items():
        policy = load(("step", t))
        engine = engine_for(policy)
        anchor = sampler.draw(policy, engine, "anchor")
        q0 = q_value(anchor.solved, draws[("step", t)].solved)[0]
        for source, delta, key in entries:
            other = draws[key]
            kl = sample_kl(engine, other, params.temperature)
            row = {"anchor": t, "source": source, "delta": delta, **measure(anchor, other, q0, kl, samples)}
            rows.append(row | {"pass_rate_source": other.pass_rate})
        del policy, engine
    return [{k: jsonable(v) for k, v in row.items()} for row in rows]


# ----------------------------------------------------------------------------------------------------------------
# Output.


def jsonable(value: Any) -> Any:
    """Non-finite floats as None (JSON has no inf / nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cell(value: Any, digits: int = 3) -> str:
    """An analysis.md cell: floats with `digits` decimals, infinity as "inf", None as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


ANALYSIS_COLUMNS = [
    ("t", "anchor", 0),
    ("Delta", "delta", 0),
    ("t+Delta", "future_step", 0),
    ("failed", "failed", 0),
    ("Q(Delta)", "q", 3),
    ("Q(0)", "q0", 3),
    ("KL k3", "kl_k3", 4),
    ("KL k1", "kl_k1", 4),
    ("L", "mean_len", 2),
    ("V", "v", 3),
    ("S", "s", 4),
    ("pass(t)", "pass_rate_anchor", 3),
    ("pass(t+Delta)", "pass_rate_future", 3),
]
"""(header, row key, decimals) of the analysis.md table."""


def analysis_markdown(rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The analysis.md text: settings, then one table line per (anchor, Delta) with Q(0) beside Q(Delta)."""
    header = "| " + " | ".join(h for h, _, _ in ANALYSIS_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in ANALYSIS_COLUMNS) + "|"
    lines = ["| " + " | ".join(_cell(r[k], n) for _, k, n in ANALYSIS_COLUMNS) + " |" for r in rows]
    return (
        f"# Q / V / S analysis: {settings['run']}\n\n"
        f"{settings['num_prompts']} train prompts x {settings['samples']} samples per checkpoint, seed "
        f"{settings['seed']}, temperature {settings['params']['temperature']}.\n"
        "Q(Delta): of the prompts pi(t) fails (all samples wrong), the fraction pi(t+Delta) solves; Q(0) (pi(t) "
        "resampled) is the noise floor. KL: per token, KL(pi(t+Delta) || pi(t)) on pi(t+Delta)'s samples. "
        "V = exp(L * KL_k3), S = Q / V.\n\n" + "\n".join([header, rule, *lines]) + "\n"
    )


def write_analysis(rows: Sequence[dict[str, Any]], settings: dict[str, Any], out: Path) -> Path:
    """Write analysis.json ({settings, rows}; non-finite numbers as null), analysis.md and analysis.png into out;
    returns out."""
    out.mkdir(parents=True, exist_ok=True)
    data = {**settings, "rows": [{k: jsonable(v) for k, v in r.items()} for r in rows]}
    (out / "analysis.json").write_text(json.dumps(data, indent=1))
    (out / "analysis.md").write_text(analysis_markdown(rows, settings))
    plot_analysis(rows, out / "analysis.png")
    return out
