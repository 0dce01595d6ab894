"""Interventions as pure plans (docs/method.md: manual plans, AutoNPO timing). The runtime only executes plans.

Every intervention has the same shape:

    [scout]    train plain GRPO from `scout_from` up to `guide_step`          (skipped when scout_from is None)
    [guides]   generate + verify guide trajectories with pi^(guide_step) for the prompts of the replay segment
    [rollback] restore weights, optimizer, RNG and data cursor of step `rollback_step`
    [replay]   train `replay_steps` steps with NPO (gate on), guides from pi^(guide_step)

- early bootstrap at t0 with Delta:  scout t0 -> t0 + Delta, guide t0 + Delta, roll back to t0, replay.
- plateau breakthrough at t_p:      scout t_p -> t_p + Delta, guide t_p + Delta, roll back to t_p, replay.
- AutoNPO at t with Delta*:          no scout (the run got there itself), guide t, roll back to t - Delta*, replay.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass


class InterventionKind(enum.StrEnum):
    EARLY_BOOTSTRAP = "early_bootstrap"
    PLATEAU_BREAKTHROUGH = "plateau_breakthrough"
    AUTONPO = "autonpo"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class InterventionPlan:
    kind: InterventionKind
    scout_from: int | None
    """Step at which plain-GRPO scouting starts; None when the guide checkpoint already exists."""
    guide_step: int
    """Step of the checkpoint whose verified responses are the guides (t + Delta)."""
    rollback_step: int
    """Step the run returns to before the replay."""
    replay_steps: int
    """Length of the NPO segment after the rollback."""

    def __post_init__(self) -> None:
        if self.rollback_step < 0:
            raise ValueError(f"rollback_step: must be >= 0, got {self.rollback_step}")
        if self.guide_step <= self.rollback_step and self.kind is not InterventionKind.ROLLBACK:
            raise ValueError(f"guide_step: must be after rollback_step ({self.guide_step} <= {self.rollback_step})")
        if self.scout_from is not None and not 0 <= self.scout_from <= self.guide_step:
            raise ValueError(f"scout_from: must lie in [0, guide_step], got {self.scout_from}")
        if self.replay_steps < 0:
            raise ValueError(f"replay_steps: must be >= 0, got {self.replay_steps}")

    @property
    def delta(self) -> int:
        """Delta: how far ahead of the rollback point the guide policy is."""
        return self.guide_step - self.rollback_step

    @property
    def scout_steps(self) -> int:
        return 0 if self.scout_from is None else self.guide_step - self.scout_from

    @property
    def replay_end(self) -> int:
        return self.rollback_step + self.replay_steps

    def replay_range(self) -> range:
        """Steps trained with NPO after the rollback; their prompts need guides."""
        return range(self.rollback_step, self.replay_end)

    def checkpoints_needed(self) -> frozenset[int]:
        """Checkpoints retention must keep until the plan is done: the rollback point and the guide."""
        return frozenset({self.rollback_step, self.guide_step})

    def to_dict(self) -> dict:
        return asdict(self)


def _check(name: str, value: int, lo: int) -> None:
    if value < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {value}")


def early_bootstrap_plan(start_step: int, delta: int, replay_steps: int | None = None) -> InterventionPlan:
    """Scout Delta steps from t0, guide with pi^(t0+Delta), roll back to t0, replay (default Delta steps) with NPO."""
    _check("start_step", start_step, 0)
    _check("delta", delta, 1)
    replay = delta if replay_steps is None else replay_steps
    _check("replay_steps", replay, 1)
    return InterventionPlan(InterventionKind.EARLY_BOOTSTRAP, start_step, start_step + delta, start_step, replay)


def plateau_breakthrough_plan(plateau_step: int, delta: int, replay_steps: int | None = None) -> InterventionPlan:
    """Train on to t_p+Delta, guide with pi^(t_p+Delta), roll back to t_p, replay (default Delta steps) with NPO."""
    _check("plateau_step", plateau_step, 0)
    _check("delta", delta, 1)
    replay = delta if replay_steps is None else replay_steps
    _check("replay_steps", replay, 1)
    return InterventionPlan(
        InterventionKind.PLATEAU_BREAKTHROUGH, plateau_step, plateau_step + delta, plateau_step, replay
    )


def repeated_plateau_plans(
    first_step: int, delta: int, replay_steps: int | None, every: int, growth: float, last_step: int
) -> list[InterventionPlan]:
    """Plateau breakthroughs repeated every `every` steps, Delta growing geometrically (the Delta schedule):

        t_k = first_step + k * every,   Delta_k = max(1, round(delta * growth^k)),   replay_k = replay_steps or Delta_k

    for k = 0, 1, ... while t_k + max(Delta_k, replay_k) <= last_step (the first plan is always kept); every = 0
    gives the single plan at first_step. Raises ValueError when a plan would start before the previous one ends
    (t_k + max(Delta_k, replay_k) > t_(k+1))."""
    _check("every", every, 0)
    if not growth > 0:
        raise ValueError(f"growth: must be > 0, got {growth}")
    plans = [plateau_breakthrough_plan(first_step, delta, replay_steps)]
    while every > 0:
        k = len(plans)
        d = max(1, round(delta * growth**k))
        start, prev = first_step + k * every, plans[-1]
        prev_end = prev.rollback_step + max(prev.delta, prev.replay_steps)
        if start + max(d, replay_steps or d) > last_step:
            break
        if prev_end > start:
            raise ValueError(f"every: plan {k} starts at step {start}, before plan {k - 1} ends (step {prev_end})")
        plans.append(plateau_breakthrough_plan(start, d, replay_steps))
    return plans


def autonpo_plan(trigger_step: int, delta: int, replay_steps: int | None = None) -> InterventionPlan:
    """AutoNPO's execution: guide pi^(t) (exists), roll back to t - Delta*, replay Delta* steps with NPO."""
    _check("delta", delta, 1)
    _check("trigger_step", trigger_step, delta)
    replay = delta if replay_steps is None else replay_steps
    _check("replay_steps", replay, 1)
    return InterventionPlan(InterventionKind.AUTONPO, None, trigger_step, trigger_step - delta, replay)


def rollback_plan(current_step: int, to_step: int) -> InterventionPlan:
    """A plain rollback (manual): no guides, no replay."""
    _check("to_step", to_step, 0)
    if to_step > current_step:
        raise ValueError(f"to_step: cannot roll forward ({to_step} > current step {current_step})")
    return InterventionPlan(InterventionKind.ROLLBACK, None, to_step, to_step, 0)
