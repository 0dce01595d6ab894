"""The AutoNPO probe: stage (b) of the trigger, run at step t on pi^(t) (docs/method.md, Delta*).

    candidates {Delta : checkpoint t - Delta exists} -> mistakes B = failures in [t - max Delta, t)
    -> probe prompts (a seeded sample of B) -> generate probe_samples responses with pi^(t) -> verify
    -> K_hat(Delta) = mean over probe tokens of k(log pi^(t), log pi^(t-Delta)) for every candidate
    -> AutoNPO.decide: Delta* = argmax Q_hat / exp(beta K_hat) -> guides = the first verified-correct response(s) of
       each chosen prompt (up to algo.guide_slots, in sampling order)

The embedded runner (npo.runtime.runner) and the service-mode controller (services/controller/engine.py) both run
this function; they differ only in their ports: where the mistakes are read, how pi^(t) samples, how a checkpoint
scores. Executing the decision (caching the guides, rolling back, replaying) stays with the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field

import numpy as np

from npo.core.autonpo import AutoNPO, AutoNPODecision, CandidateEstimate, TriggerReading, mean_token_kl
from npo.core.config import GuideSelect
from npo.core.gate import select_guides
from npo.core.seeds import derive_seed
from npo.core.types import Problem, Sample


@dataclass(frozen=True)
class ProbePorts:
    """What the probe needs from the system around it."""

    mistakes: Callable[[int, int], Mapping[str, int]]
    """(from_step, to_step) -> prompt_id -> step it failed at, for failures in [from_step, to_step)."""
    sample: Callable[[list[Problem], int, int], list[list[Sample]]]
    """(problems, n, step) -> one verified group of n responses of pi^(step) per problem, in order, sampled with the
    seed (run seed, 'probe', step)."""
    score: Callable[[int, list[list[int]], list[list[int]]], list[list[float]]]
    """(step, prompt token ids, response token ids) -> teacher-forced log-probs of the responses under pi^(step)."""
    encode: Callable[[Problem], list[int]]
    """A problem's prompt token ids."""


@dataclass
class ProbeResult:
    """What one probe found; `decision` None = no intervention (see `reason` when nothing was probed)."""

    step: int
    reason: str | None = None
    """Why nothing was probed ('no_candidates', 'empty_pool'); None when the probe ran."""
    problems: list[Problem] = field(default_factory=list)
    groups: list[list[Sample]] = field(default_factory=list)
    solved: dict[str, bool] = field(default_factory=dict)
    candidates: tuple[CandidateEstimate, ...] = ()
    decision: AutoNPODecision | None = None
    guides: list[Sample] = field(default_factory=list)
    """The first verified-correct probe responses (up to guide_slots) of each prompt of decision.prompt_ids, in
    sampling order, a prompt's consecutive (the guides of step t)."""


def run_probe(
    guarded: Callable[[], ContextManager[AutoNPO]],
    step: int,
    checkpoint_steps: Iterable[int],
    ports: ProbePorts,
    *,
    problems: Mapping[str, Problem],
    seed: int,
    correct_threshold: float,
    reading: TriggerReading | None,
    guide_slots: int = 1,
) -> ProbeResult:
    """Probe pi^(step) on the mistake pool and let AutoNPO decide; an empty probe set starts a window's cool-down.

    `guarded()` yields the AutoNPO state to use (under the caller's lock when other threads share it); it is
    entered around each use, never around a port call.
    """
    with guarded() as autonpo:
        deltas = autonpo.candidate_deltas(step, checkpoint_steps)
    if not deltas:
        return ProbeResult(step, reason="no_candidates")
    mistakes = ports.mistakes(step - max(deltas), step)
    with guarded() as autonpo:
        probe_ids = autonpo.probe_prompts(step, mistakes, deltas, derive_seed(seed, "probe-pick", step))
        probe_samples = autonpo.cfg.probe_samples
    picked = [problems[p] for p in probe_ids if p in problems]
    if not picked:
        with guarded() as autonpo:
            autonpo.cooldown_until = step + autonpo.cfg.window
        return ProbeResult(step, reason="empty_pool")
    groups = ports.sample(picked, probe_samples, step)
    solved = {g[0].prompt_id: any(s.reward >= correct_threshold for s in g) for g in groups}
    flat = [(ports.encode(p), s) for p, g in zip(picked, groups) for s in g if s.response_ids]
    with guarded() as autonpo:
        estimator = autonpo.cfg.kl_estimator
    kl_by_delta = {d: _mean_kl(ports, step - d, flat, estimator) for d in deltas}
    mean_len = float(np.mean([len(s.response_ids) for _, s in flat])) if flat else 0.0
    with guarded() as autonpo:
        decision = autonpo.decide(step, mistakes, solved, kl_by_delta, mean_len, reading)
        candidates = autonpo.last_candidates
    guides = [] if decision is None else _guides(groups, decision.prompt_ids, correct_threshold, guide_slots)
    return ProbeResult(step, None, picked, groups, solved, candidates, decision, guides)


def unguarded(autonpo: AutoNPO) -> Callable[[], ContextManager[AutoNPO]]:
    """`guarded` for a caller that is the AutoNPO state's only user."""
    return lambda: contextlib.nullcontext(autonpo)


def _mean_kl(ports: ProbePorts, past_step: int, flat: list[tuple[list[int], Sample]], estimator: str) -> float:
    """K_hat(Delta): the probe tokens' log-probs under pi^(t) (sampled) against pi^(past_step) (scored)."""
    past = ports.score(past_step, [p for p, _ in flat], [s.response_ids for _, s in flat])
    return mean_token_kl([s.logprobs for _, s in flat], past, estimator)


def _guides(groups: list[list[Sample]], prompt_ids: Sequence[str], correct_threshold: float, k: int) -> list[Sample]:
    by_prompt = {g[0].prompt_id: g for g in groups}
    return select_guides([by_prompt[p] for p in prompt_ids], correct_threshold, GuideSelect.FIRST, k)
