"""Intervention plans (npo/core/interventions.py): the steps of early bootstrap, plateau breakthrough, AutoNPO,
rollback."""

import pytest

from npo.core.autonpo import AutoNPO
from npo.core.config import AutoNPOConfig
from npo.core.interventions import (
    InterventionKind,
    InterventionPlan,
    autonpo_plan,
    early_bootstrap_plan,
    plateau_breakthrough_plan,
    rollback_plan,
)


def test_early_bootstrap_plan_by_hand():
    # t0 = 30, Delta = 20: scout GRPO 30 -> 50, guide pi^(50), roll back to 30, replay steps 30..49 with NPO
    plan = early_bootstrap_plan(30, 20)
    assert plan.kind is InterventionKind.EARLY_BOOTSTRAP
    assert (plan.scout_from, plan.guide_step, plan.rollback_step, plan.replay_steps) == (30, 50, 30, 20)
    assert plan.scout_steps == 20
    assert plan.delta == 20
    assert plan.replay_end == 50
    assert list(plan.replay_range()) == list(range(30, 50))
    assert plan.checkpoints_needed() == frozenset({30, 50})


def test_early_bootstrap_from_step_zero_with_longer_replay():
    # t0 = 0, Delta = 10, replay 25 steps: scout 0 -> 10, roll back to 0, replay 0..24
    plan = early_bootstrap_plan(0, 10, replay_steps=25)
    assert (plan.scout_from, plan.guide_step, plan.rollback_step) == (0, 10, 0)
    assert plan.replay_end == 25
    assert plan.delta == 10


def test_plateau_breakthrough_plan_by_hand():
    # t_p = 200, Delta = 70: keep training 200 -> 270, guide pi^(270), roll back to 200, replay 200..269
    plan = plateau_breakthrough_plan(200, 70)
    assert plan.kind is InterventionKind.PLATEAU_BREAKTHROUGH
    assert (plan.scout_from, plan.guide_step, plan.rollback_step, plan.replay_steps) == (200, 270, 200, 70)
    assert plan.scout_steps == 70
    assert plan.replay_range() == range(200, 270)
    assert plan.checkpoints_needed() == frozenset({200, 270})


def test_autonpo_plan_by_hand():
    # t = 100, Delta* = 20: no scout (pi^(100) exists), guide pi^(100), roll back to 80, replay 80..99
    plan = autonpo_plan(100, 20)
    assert plan.kind is InterventionKind.AUTONPO
    assert (plan.scout_from, plan.guide_step, plan.rollback_step, plan.replay_steps) == (None, 100, 80, 20)
    assert plan.scout_steps == 0
    assert plan.delta == 20
    assert plan.replay_end == 100  # the replay ends where the trigger happened
    assert plan.checkpoints_needed() == frozenset({80, 100})


def test_autonpo_decision_and_plan_agree():
    auto = AutoNPO(AutoNPOConfig(beta=100.0, candidate_deltas=[10, 20, 40]))
    mistakes = {"a": 95, "b": 92, "c": 85, "d": 70}
    solved = {"a": True, "b": False, "c": True, "d": True}
    decision = auto.decide(100, mistakes, solved, {10: 0.001, 20: 0.002, 40: 0.004}, mean_response_length=7.0)
    plan = autonpo_plan(decision.trigger_step, decision.delta)
    assert (plan.rollback_step, plan.guide_step, plan.replay_steps) == (
        decision.rollback_step,
        decision.guide_step,
        decision.segment_length,
    )
    # cool-down starts where the replay ends: no trigger before replay_end + Delta*
    assert auto.cooldown_until == plan.replay_end + plan.delta


def test_rollback_plan_by_hand():
    # current step 50, back to 30: no guides, no replay
    plan = rollback_plan(50, 30)
    assert plan.kind is InterventionKind.ROLLBACK
    assert (plan.scout_from, plan.guide_step, plan.rollback_step, plan.replay_steps) == (None, 30, 30, 0)
    assert plan.delta == 0 and plan.scout_steps == 0
    assert list(plan.replay_range()) == []
    assert rollback_plan(50, 50).rollback_step == 50  # rolling back to the current step is allowed


def test_plan_to_dict():
    assert early_bootstrap_plan(0, 5).to_dict() == {
        "kind": InterventionKind.EARLY_BOOTSTRAP,
        "scout_from": 0,
        "guide_step": 5,
        "rollback_step": 0,
        "replay_steps": 5,
    }


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: early_bootstrap_plan(-1, 10), "start_step"),
        (lambda: early_bootstrap_plan(0, 0), "delta"),
        (lambda: early_bootstrap_plan(0, 10, replay_steps=0), "replay_steps"),
        (lambda: plateau_breakthrough_plan(-5, 10), "plateau_step"),
        (lambda: plateau_breakthrough_plan(100, -1), "delta"),
        (lambda: plateau_breakthrough_plan(100, 10, replay_steps=0), "replay_steps"),
        (lambda: autonpo_plan(100, 0), "delta"),
        (lambda: autonpo_plan(15, 20), "trigger_step"),  # cannot roll back before step 0
        (lambda: rollback_plan(50, -1), "to_step"),
        (lambda: rollback_plan(50, 60), "to_step"),  # no rolling forward
        (lambda: InterventionPlan(InterventionKind.AUTONPO, None, 10, -1, 5), "rollback_step"),
        (lambda: InterventionPlan(InterventionKind.AUTONPO, None, 10, 10, 5), "guide_step"),
        (lambda: InterventionPlan(InterventionKind.EARLY_BOOTSTRAP, 20, 10, 5, 5), "scout_from"),
        (lambda: InterventionPlan(InterventionKind.EARLY_BOOTSTRAP, 0, 10, 5, -1), "replay_steps"),
    ],
)
def test_bad_plans_raise_naming_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_autonpo_plan_rejects_empty_replay():
    with pytest.raises(ValueError, match="replay_steps"):
        autonpo_plan(100, 20, replay_steps=0)
