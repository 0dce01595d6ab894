"""The method's open choices as options (npo.core.config: GateMode, GuideShaping, GuideSelect): hand-computed
examples of the gate mode, the guide selection rule and LUFFY-style shaping of the guide slot, and their config errors.
"""

import math

import pytest
import torch

from npo.core.config import AlgoConfig, ConfigError, GateMode, GuideSelect, GuideShaping
from npo.core.gate import build_mixed_groups, first_correct, select_guides, should_replace
from npo.core.interventions import repeated_plateau_plans
from npo.core.loss import policy_loss
from npo.core.types import Sample
from npo.runtime.run_config import load_run_config


def sample(prompt_id: str, reward: float, logprobs: list[float]) -> Sample:
    return Sample(prompt_id, list(range(1, len(logprobs) + 1)), logprobs, reward=reward, policy_step=7)


# ---------------------------------------------------------------------------------------------------------------
# The gate's mode


def test_all_failed_gate_opens_only_for_groups_with_no_correct_sample():
    # pass_rate: p_hat <= 0.6;  all_failed: p_hat = 0 whatever tau_gate
    assert should_replace(0.25, 0.6) and should_replace(0.0, 0.6)
    assert should_replace(0.0, 0.6, GateMode.ALL_FAILED)
    assert not should_replace(0.125, 0.6, "all_failed")
    assert should_replace(0.0, 0.0, "all_failed") and not should_replace(0.5, 1.0, "all_failed")


def test_all_failed_gate_in_mixed_groups():
    one_right = [sample("a", 1.0, [-1.0])] + [sample("a", 0.0, [-1.0]) for _ in range(3)]  # p_hat = 1/4
    none_right = [sample("b", 0.0, [-1.0]) for _ in range(4)]  # p_hat = 0
    guides = {"a": sample("a", 1.0, [-0.1, -0.2]), "b": sample("b", 1.0, [-0.3])}
    kw = {"tau_gate": 0.6, "correct_threshold": 1.0, "is_correction": True}
    paper = build_mixed_groups([one_right, none_right], guides, **kw)
    strict = build_mixed_groups([one_right, none_right], guides, **kw, gate_mode="all_failed")
    assert [m.replaced for m in paper] == [True, True]
    assert [m.replaced for m in strict] == [False, True]
    assert strict[1].samples[-1] is guides["b"] and strict[1].is_guide == [False, False, False, True]


# ---------------------------------------------------------------------------------------------------------------
# Which correct sample becomes the guide


def test_select_guides_by_hand():
    g1 = [
        sample("x", 0.0, [-0.1]),
        sample("x", 1.0, [-1.0, -1.0, -1.0]),  # first correct: 3 tokens, mean log-prob -1.0
        sample("x", 1.0, [-0.5, -0.7]),  # shortest correct... tied in length with the next one
        sample("x", 1.0, [-0.2, -0.2]),  # most likely: mean -0.2
    ]
    g2 = [sample("y", 0.0, [-0.1]), sample("y", 0.0, [-0.1])]  # no correct sample: no guide
    g3 = [sample("z", 1.0, [-0.3, -0.3]), sample("z", 1.0, [-0.6, -0.0])]  # equal means -0.3: tie -> first
    assert select_guides([g1, g2, g3], 1.0) == first_correct([g1, g2, g3], 1.0)
    assert select_guides([g1, g2, g3], 1.0, "first") == [g1[1], g3[0]]
    assert select_guides([g1, g2, g3], 1.0, GuideSelect.SHORTEST) == [g1[2], g3[0]]
    assert select_guides([g1, g2, g3], 1.0, "likely") == [g1[3], g3[0]]
    with pytest.raises(ValueError):
        select_guides([g1], 1.0, "longest")


# ---------------------------------------------------------------------------------------------------------------
# LUFFY-style shaping of the guide slot


def _two_rows(guide_logprob: float):
    # row 0: on-policy, one token, ratio 1 (logprob = behaviour), A = -1   -> l = -min(1 * -1, clip(1) * -1) = 1
    # row 1: guide, one token, behaviour -3 (pi^(t+Delta)), A = 2
    logprobs = torch.tensor([[-0.5], [guide_logprob]], dtype=torch.float64, requires_grad=True)
    behaviour = torch.tensor([[-0.5], [-3.0]], dtype=torch.float64)
    advantages = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    mask = torch.ones(2, 1)
    return logprobs, behaviour, advantages, mask, torch.tensor([False, True])


def test_luffy_shaping_by_hand():
    p = 0.3
    logprobs, behaviour, adv, mask, is_guide = _two_rows(math.log(p))
    loss, metrics = policy_loss(
        logprobs, behaviour, adv, mask, is_guide=is_guide, guide_shaping="luffy", shaping_gamma=0.1
    )
    # guide: -f(p) * A = -(0.3 / 0.4) * 2 = -1.5 ; on-policy: 1 ; mean over the two sequences = -0.25
    assert float(loss.detach()) == pytest.approx(-0.25, abs=1e-12)
    loss.backward()
    # d/dlogp of -(p / (p + g)) * A / 2 = -A g p / (p + g)^2 / 2 = -2 * 0.1 * 0.3 / 0.16 / 2 = -0.1875
    assert float(logprobs.grad[1, 0]) == pytest.approx(-0.1875, abs=1e-12)
    # the on-policy row keeps the clipped surrogate: d/dlogp of -r * A / 2 at r = 1 = 0.5
    assert float(logprobs.grad[0, 0]) == pytest.approx(0.5, abs=1e-12)
    assert metrics["clip_frac_guide"] == 0.0


def test_clip_shaping_is_the_paper_surrogate():
    logprobs, behaviour, adv, mask, is_guide = _two_rows(math.log(0.3))
    clip, _ = policy_loss(logprobs.detach(), behaviour, adv, mask, is_guide=is_guide)
    same, _ = policy_loss(logprobs.detach(), behaviour, adv, mask, is_guide=is_guide, guide_shaping=GuideShaping.CLIP)
    # guide: r = 0.3 / e^-3 = 6.03 > 1.28, A > 0 -> clipped: -1.28 * 2 ; on-policy 1 ; mean = (1 - 2.56) / 2
    assert float(clip) == pytest.approx((1 - 2.56) / 2, abs=1e-12) and float(same) == float(clip)


def test_luffy_without_guides_equals_grpo():
    logprobs, behaviour, adv, mask, _ = _two_rows(math.log(0.3))
    none = torch.tensor([False, False])
    a, _ = policy_loss(logprobs, behaviour, adv, mask, is_guide=none)
    b, _ = policy_loss(logprobs, behaviour, adv, mask, is_guide=none, guide_shaping="luffy")
    assert float(a.detach()) == float(b.detach())


# ---------------------------------------------------------------------------------------------------------------
# The Delta schedule of repeated late interventions


def test_repeated_plateau_plans_by_hand():
    # t_k = 60 + 30 k, Delta_k = round(10 * 2^k): (60, 10), (90, 20); (120, 40) would end at 160 > 150
    plans = repeated_plateau_plans(60, 10, None, 30, 2.0, 150)
    assert [(p.rollback_step, p.delta, p.replay_steps) for p in plans] == [(60, 10, 10), (90, 20, 20)]
    assert [(p.scout_from, p.guide_step) for p in plans] == [(60, 70), (90, 110)]
    # every = 0: the single plan of the paper; growth 1 and a fixed replay: (10, 5, 8), (20, 5, 8), (30, 5, 8)
    assert len(repeated_plateau_plans(10, 5, None, 0, 1.0, 1000)) == 1
    fixed = repeated_plateau_plans(10, 5, 8, 10, 1.0, 40)
    assert [(p.rollback_step, p.delta, p.replay_steps) for p in fixed] == [(10, 5, 8), (20, 5, 8), (30, 5, 8)]
    with pytest.raises(ValueError, match="before plan 0 ends"):
        repeated_plateau_plans(10, 5, 12, 10, 1.0, 100)  # replay 12 > every 10


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_defaults_are_the_papers():
    algo = AlgoConfig()
    assert (algo.gate_mode, algo.guide_shaping, algo.guide_select) == ("pass_rate", "clip", "first")


@pytest.mark.parametrize(
    "override, key",
    [
        ("algo.gate_mode=some_failed", "algo.gate_mode"),
        ("algo.guide_shaping=luffyy", "algo.guide_shaping"),
        ("algo.guide_select=longest", "algo.guide_select"),
        ("algo.shaping_gamma=0", "algo.shaping_gamma"),
        ("algo.shaping_gamma=-1", "algo.shaping_gamma"),
        ("npo.early.repeat_every=5", "npo.early.repeat_every"),
        ("npo.late.delta_growth=0", "npo.late.delta_growth"),
        ("npo.late.repeat_every=-1", "npo.late.repeat_every"),
    ],
)
def test_bad_option_is_a_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_run_config(None, overrides=[override]).validate()


def test_overlapping_repeats_are_a_config_error():
    overrides = ["method=npo", "npo.early.enabled=false", "npo.late.enabled=true", "npo.late.at_step=10"]
    overrides += ["npo.late.delta=20", "npo.late.repeat_every=10", "train.steps=100"]
    with pytest.raises(ConfigError, match="npo.late.repeat_every: .*before plan 0 ends"):
        load_run_config(None, overrides=overrides).validate()
