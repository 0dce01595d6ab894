"""AutoNPO: when to intervene and how far to roll back (docs/method.md: trigger, Delta*).

Pure bookkeeping and decisions; the runtime (or the controller service) executes them:

1. Mistake pool B (kept by the caller's guide store): prompts whose on-policy pass rate was <= mistake_pass_rate,
   with the step they failed at.
   B_Delta = prompts failed in [t - Delta, t).
2. Trigger stage (a), warning: the EMA of training reward gained < reward_gain_min over the last `window` steps AND
   the entropy EMA fell by >= entropy_drop_frac over the same window.
   Stage (b), confirmation: one probe rollout of pi^(t) on (a bounded sample of) B; the decision below.
3. For each candidate Delta with a checkpoint pi^(t-Delta):
       Q_hat(Delta) = fraction of probed prompts in B_Delta that pi^(t) solves (a verified-correct probe sample);
       K_hat(Delta) = mean per-token KL(pi^(t) || pi^(t-Delta)) on the probe samples (teacher-forced log-probs);
       V_hat(Delta) = exp(beta * K_hat(Delta))      (beta default: mean probe response length);
       S_hat(Delta) = Q_hat(Delta) / V_hat(Delta).
   Delta* = argmax S_hat; intervene only if Q_hat(Delta*) >= q_min.
4. Execution (by the caller): roll back to t - Delta*, cache the probe's verified-correct responses on B_Delta* as
   guides with guide step t, replay Delta* steps with NPO; then no trigger before t + max(Delta*, cooldown_steps).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from npo.core.config import AutoNPOConfig
from npo.core.loss import kl_k1, kl_k3


@dataclass(frozen=True)
class TriggerReading:
    """Stage (a) of the trigger at one step."""

    step: int
    reward_ema: float
    entropy_ema: float
    reward_gain: float | None
    """reward EMA(t) - reward EMA(t - window); None until the window is filled."""
    entropy_drop: float | None
    """(entropy EMA(t - window) - entropy EMA(t)) / entropy EMA(t - window); None until the window is filled."""
    warning: bool


class PlateauDetector:
    """Stage (a): reward stagnation AND entropy decline, over EMAs of per-step training metrics.

    Keeps the raw per-step observations, so that a rollback can drop the steps after it and recompute the EMAs.
    """

    def __init__(self, cfg: AutoNPOConfig):
        self.cfg = cfg
        self._raw: list[tuple[int, float, float]] = []  # (step, reward, entropy)
        self._reward_ema: list[float] = []
        self._entropy_ema: list[float] = []

    def observe(self, step: int, reward: float, entropy: float) -> TriggerReading:
        if self._raw and step <= self._raw[-1][0]:
            raise ValueError(f"step: observations must increase (got {step} after {self._raw[-1][0]}); truncate first")
        if not (math.isfinite(reward) and math.isfinite(entropy)):
            raise ValueError(f"reward/entropy: must be finite, got {reward}/{entropy}")
        d = self.cfg.ema_decay
        prev_r = self._reward_ema[-1] if self._reward_ema else reward
        prev_h = self._entropy_ema[-1] if self._entropy_ema else entropy
        self._raw.append((step, reward, entropy))
        self._reward_ema.append(d * prev_r + (1 - d) * reward if len(self._raw) > 1 else reward)
        self._entropy_ema.append(d * prev_h + (1 - d) * entropy if len(self._raw) > 1 else entropy)
        return self.reading()

    def reading(self) -> TriggerReading:
        if not self._raw:
            raise ValueError("no observation yet")
        w = self.cfg.window
        r_now, h_now = self._reward_ema[-1], self._entropy_ema[-1]
        gain = drop = None
        warning = False
        if len(self._raw) > w:
            r_then, h_then = self._reward_ema[-1 - w], self._entropy_ema[-1 - w]
            gain = r_now - r_then
            drop = (h_then - h_now) / h_then if h_then > 0 else 0.0
            stagnant = gain < self.cfg.reward_gain_min
            declining = drop >= self.cfg.entropy_drop_frac or not self.cfg.require_entropy_drop
            warning = stagnant and declining
        return TriggerReading(self._raw[-1][0], r_now, h_now, gain, drop, warning)

    def truncate(self, from_step: int) -> None:
        """Forget observations at steps >= from_step (after a rollback to from_step)."""
        keep = [obs for obs in self._raw if obs[0] < from_step]
        self._raw, self._reward_ema, self._entropy_ema = [], [], []
        for step, reward, entropy in keep:
            self.observe(step, reward, entropy)

    def state_dict(self) -> dict:
        return {"raw": [list(o) for o in self._raw]}

    def load_state_dict(self, state: dict) -> None:
        self._raw, self._reward_ema, self._entropy_ema = [], [], []
        for step, reward, entropy in state["raw"]:
            self.observe(int(step), float(reward), float(entropy))


@dataclass(frozen=True)
class CandidateEstimate:
    """Q_hat, V_hat and S_hat of one rollback distance Delta."""

    delta: int
    rollback_step: int
    q_hat: float
    kl: float
    v_hat: float
    s_hat: float
    n_prompts: int
    """|B_Delta| among the probed prompts."""


def mean_token_kl(
    logp_current: Sequence[Sequence[float]], logp_past: Sequence[Sequence[float]], estimator: str = "k3"
) -> float:
    """K_hat = mean over all probe tokens of a per-token estimate of KL(pi^(t) || pi^(t-Delta)).

    Tokens are sampled from pi^(t); with d = log pi^(t-Delta) - log pi^(t):
        k1 = -d           k3 = exp(d) - d - 1
    per token by npo.core.loss.kl_k1 / kl_k3 (the loss's estimators), summed in token order.
    Args:
        logp_current: per sequence, per token log pi^(t).
        logp_past: the same tokens' log pi^(t-Delta).
    """
    if len(logp_current) != len(logp_past):
        raise ValueError(f"logp_past: {len(logp_past)} sequences for {len(logp_current)} in logp_current")
    if estimator not in ("k1", "k3"):
        raise ValueError(f"estimator: must be 'k1' or 'k3', got {estimator!r}")
    per_token = kl_k1 if estimator == "k1" else kl_k3
    total, count = 0.0, 0
    for i, (cur, past) in enumerate(zip(logp_current, logp_past)):
        if len(cur) != len(past):
            raise ValueError(f"logp_past[{i}]: {len(past)} tokens, logp_current[{i}] has {len(cur)}")
        for a, b in zip(cur, past):
            total += per_token(a, b)
            count += 1
    if count == 0:
        raise ValueError("logp_current: no tokens to estimate the KL from")
    return total / count


def q_hat(solved: Mapping[str, bool], prompt_ids: Iterable[str]) -> tuple[float, int]:
    """Q_hat = |{x in B_Delta : pi^(t) solves x}| / |B_Delta| over the probed prompts; (0.0, 0) for an empty set."""
    ids = [p for p in prompt_ids if p in solved]
    if not ids:
        return 0.0, 0
    return sum(bool(solved[p]) for p in ids) / len(ids), len(ids)


def v_hat(kl: float, beta: float) -> float:
    """V_hat = exp(beta * K_hat); saturates at +inf for huge exponents (then S_hat = 0)."""
    if beta < 0 or not math.isfinite(kl):
        raise ValueError(f"beta/kl: beta must be >= 0 and kl finite, got {beta}/{kl}")
    exponent = beta * kl
    return math.exp(exponent) if exponent < 700 else math.inf


def estimate_candidate(
    delta: int, step: int, solved: Mapping[str, bool], failed_at: Mapping[str, int], kl: float, beta: float
) -> CandidateEstimate:
    """Q_hat, V_hat, S_hat = Q_hat / V_hat for rollback distance `delta` at step t = `step`."""
    if delta < 1:
        raise ValueError(f"delta: must be >= 1, got {delta}")
    in_window = [p for p, s in failed_at.items() if step - delta <= s < step]
    q, n = q_hat(solved, in_window)
    v = v_hat(kl, beta)
    exponent = beta * kl
    s_hat = q * math.exp(-exponent) if exponent > -700 else (math.inf if q > 0 else 0.0)  # Q / V without 0 * inf
    return CandidateEstimate(delta, step - delta, q, kl, v, s_hat, n)


def choose_delta(candidates: Sequence[CandidateEstimate], q_min: float) -> CandidateEstimate | None:
    """Delta* = argmax_Delta S_hat(Delta) (ties: the smaller Delta); None when Q_hat(Delta*) < q_min."""
    if not candidates:
        raise ValueError("candidates: empty candidate set (no checkpoint at any candidate distance)")
    best = max(candidates, key=lambda c: (c.s_hat, -c.delta))
    return best if best.q_hat >= q_min and best.n_prompts > 0 else None


@dataclass(frozen=True)
class AutoNPODecision:
    """What to execute: roll back to `rollback_step`, guide with pi^(guide_step), replay `segment_length` steps."""

    trigger_step: int
    delta: int
    rollback_step: int
    guide_step: int
    segment_length: int
    prompt_ids: tuple[str, ...]
    """Prompts of B_Delta* with a verified-correct probe response (the guides to cache)."""
    candidates: tuple[CandidateEstimate, ...]
    reading: TriggerReading | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AutoNPO:
    """AutoNPO decision state: trigger, cool-down and Delta selection. Survives rollbacks (is not rolled back)."""

    cfg: AutoNPOConfig
    detector: PlateauDetector = field(init=False)
    cooldown_until: int = 0
    """No probe before this step."""
    last_candidates: tuple[CandidateEstimate, ...] = ()
    """The candidates scored by the latest decide(), also when it decided not to intervene."""

    def __post_init__(self) -> None:
        self.detector = PlateauDetector(self.cfg)

    def observe(self, step: int, reward: float, entropy: float) -> TriggerReading:
        return self.detector.observe(step, reward, entropy)

    def wants_probe(self, reading: TriggerReading) -> bool:
        """Stage (a) passed, outside the cool-down and after min_step."""
        return reading.warning and reading.step >= max(self.cfg.min_step, self.cooldown_until)

    def candidate_deltas(self, step: int, checkpoint_steps: Iterable[int]) -> list[int]:
        """The configured distances Delta whose rollback checkpoint pi^(step - Delta) exists."""
        available = set(checkpoint_steps)
        return sorted(d for d in self.cfg.candidate_deltas if step - d >= 0 and step - d in available)

    def probe_prompts(self, step: int, mistakes: Mapping[str, int], deltas: Sequence[int], seed: int) -> list[str]:
        """A bounded, seeded sample (probe_size) of B_maxDelta = prompts failed in [step - max Delta, step)."""
        if not deltas:
            raise ValueError("deltas: empty candidate set (no checkpoint at any candidate distance)")
        lo = step - max(deltas)
        pool = sorted(p for p, s in mistakes.items() if lo <= s < step)
        if len(pool) > self.cfg.probe_size:
            pool = sorted(random.Random(seed).sample(pool, self.cfg.probe_size))
        return pool

    def decide(
        self,
        step: int,
        mistakes: Mapping[str, int],
        solved: Mapping[str, bool],
        kl_by_delta: Mapping[int, float],
        mean_response_length: float,
        reading: TriggerReading | None = None,
    ) -> AutoNPODecision | None:
        """Stage (b): from one probe of pi^(step), choose Delta* and name the guides; None = no intervention.

        Args:
            step: t, the current step (the guide step).
            mistakes: prompt_id -> step failed (the pool, or at least the probed part of it).
            solved: probed prompt_id -> whether pi^(t) produced a verified-correct response.
            kl_by_delta: Delta -> K_hat(Delta) for every candidate scored.
            mean_response_length: of the probe samples; beta's default.
        """
        if not kl_by_delta:
            raise ValueError("kl_by_delta: empty candidate set (no checkpoint at any candidate distance)")
        beta = self.cfg.beta if self.cfg.beta is not None else mean_response_length
        cands = [estimate_candidate(d, step, solved, mistakes, kl, beta) for d, kl in sorted(kl_by_delta.items())]
        self.last_candidates = tuple(cands)
        best = choose_delta(cands, self.cfg.q_min)
        if best is None:
            self.cooldown_until = step + self.cfg.window  # confirmation failed: wait a window before probing again
            return None
        prompts = tuple(
            sorted(p for p, s in mistakes.items() if best.rollback_step <= s < step and solved.get(p, False))
        )
        self.cooldown_until = step + max(best.delta, self.cfg.cooldown_steps)
        return AutoNPODecision(step, best.delta, best.rollback_step, step, best.delta, prompts, tuple(cands), reading)

    def on_rollback(self, rollback_step: int) -> None:
        """The run went back to rollback_step: the trigger's history after it no longer exists."""
        self.detector.truncate(rollback_step)

    def state_dict(self) -> dict:
        return {"cooldown_until": self.cooldown_until, "detector": self.detector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.cooldown_until = int(state["cooldown_until"])
        self.detector.load_state_dict(state["detector"])
