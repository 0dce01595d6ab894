"""The method's open choices as options (npo.core.config: GateMode, GuideShaping, GuideSelect): hand-computed
examples of the gate mode, the guide selection rule and LUFFY-style shaping of the guide slot, and their config errors.
"""

import math

import pytest
import torch

from npo.core.advantages import group_advantages
from npo.core.config import AlgoConfig, ConfigError, GateMode, GuideSelect, GuideShaping
from npo.core.gate import build_mixed_groups, first_correct, guide_lists, select_guides, should_replace
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


def test_select_two_guides_by_hand():
    # the groups of test_select_guides_by_hand; k = 2 takes each group's first two in the rule's order
    g1 = [
        sample("x", 0.0, [-0.1]),
        sample("x", 1.0, [-1.0, -1.0, -1.0]),  # 3 tokens, mean -1.0
        sample("x", 1.0, [-0.5, -0.7]),  # 2 tokens, mean -0.6
        sample("x", 1.0, [-0.2, -0.2]),  # 2 tokens, mean -0.2
    ]
    g2 = [sample("y", 0.0, [-0.1]), sample("y", 0.0, [-0.1])]
    g3 = [sample("z", 1.0, [-0.3, -0.3]), sample("z", 1.0, [-0.6, -0.0])]  # same length, same mean: sampling order
    groups = [g1, g2, g3]
    assert select_guides(groups, 1.0, "first", k=2) == [g1[1], g1[2], g3[0], g3[1]]
    assert select_guides(groups, 1.0, "shortest", k=2) == [g1[2], g1[3], g3[0], g3[1]]  # 2, 2 (tie: earliest first)
    assert select_guides(groups, 1.0, "likely", k=2) == [g1[3], g1[2], g3[0], g3[1]]  # -0.2, -0.6
    assert select_guides(groups, 1.0, "likely", k=9) == [g1[3], g1[2], g1[1], g3[0], g3[1]]  # all there are
    for rule in GuideSelect:  # k = 1 is the single guide of before
        assert select_guides(groups, 1.0, rule, k=1) == select_guides(groups, 1.0, rule)
    assert guide_lists(select_guides(groups, 1.0, "first", k=2)) == {"x": [g1[1], g1[2]], "z": [g3[0], g3[1]]}
    with pytest.raises(ValueError, match="^k: "):
        select_guides(groups, 1.0, "first", k=0)


# ---------------------------------------------------------------------------------------------------------------
# Several guide slots per group (algo.guide_slots)


def test_two_guide_slots_by_hand():
    # n = 4, p_hat = 1/4 <= 0.6; k = 2 of the prompt's three guides replace slots 3 and 4, in the guides' order
    group = [sample("a", 0.0, [-1.0]), sample("a", 1.0, [-1.5]), sample("a", 0.0, [-2.0]), sample("a", 0.0, [-2.5])]
    g1, g2, g3 = sample("a", 1.0, [-0.1, -0.2]), sample("a", 1.0, [-0.3]), sample("a", 1.0, [-0.4])
    kw = {"tau_gate": 0.6, "correct_threshold": 1.0, "is_correction": True}
    [m] = build_mixed_groups([group], {"a": [g1, g2, g3]}, **kw, guide_slots=2)
    assert m.samples == [group[0], group[1], g1, g2] and m.samples[2] is g1 and m.samples[3] is g2
    assert m.is_guide == [False, False, True, True] and m.guides == 2 and m.replaced
    assert m.pass_rate == 0.25  # of the on-policy group, before the replacement
    # q_i: pi^(t) for the on-policy slots, pi^(t+Delta) stored with each guide for the guide slots
    assert m.behaviour_logprobs == [[-1.0], [-1.5], [-0.1, -0.2], [-0.3]]
    # advantages of the mixed group: rewards (0, 1, 1, 1), mean 3/4, population std sqrt(3)/4
    # -> A = (0 - 3/4) / (sqrt(3)/4) = -sqrt(3) and (1 - 3/4) / (sqrt(3)/4) = 1/sqrt(3)
    adv = group_advantages(torch.tensor([m.rewards], dtype=torch.float64))[0]
    expected = [-math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)

    # IS off: both guide slots take pi^(t)'s log-probs of their tokens, scored in slot order
    scored = []

    def rollout_logprobs(samples):
        scored.append(samples)
        return [[-5.0 - i] * len(s.response_ids) for i, s in enumerate(samples)]

    [off] = build_mixed_groups(
        [group], {"a": [g1, g2]}, **{**kw, "is_correction": False}, rollout_logprobs=rollout_logprobs, guide_slots=2
    )
    assert scored == [[g1, g2]] and off.behaviour_logprobs == [[-1.0], [-1.5], [-5.0, -5.0], [-6.0]]


def test_guide_slots_take_what_is_verified_and_one_guide_is_as_before():
    group = [sample("a", 0.0, [-1.0]) for _ in range(4)]
    wrong, right = sample("a", 0.0, [-0.1]), sample("a", 1.0, [-0.3])
    kw = {"tau_gate": 0.6, "correct_threshold": 1.0, "is_correction": True}
    # m = min(k, verified guides): an unverified guide is skipped, so one slot (the last) is replaced
    [m] = build_mixed_groups([group], {"a": [wrong, right]}, **kw, guide_slots=3)
    assert m.samples == group[:3] + [right] and m.is_guide == [False] * 3 + [True] and m.guides == 1
    # k = 1 with a list uses its first verified guide, like a single Sample
    [one] = build_mixed_groups([group], {"a": [right, sample("a", 1.0, [-0.2])]}, **kw)
    [single] = build_mixed_groups([group], {"a": right}, **kw)
    assert one.samples == single.samples == group[:3] + [right] and one.guides == single.guides == 1
    # a group above the gate keeps every slot whatever k
    passing = [sample("b", 1.0, [-1.0]) for _ in range(4)]
    [kept] = build_mixed_groups([passing], {"b": [right]}, **kw, guide_slots=2)
    assert kept.guides == 0 and not kept.replaced and kept.samples == passing
    with pytest.raises(ValueError, match="guide_slots"):
        build_mixed_groups([group], {}, **kw, guide_slots=4)  # k <= n - 1: one on-policy slot stays


def test_every_guide_slot_gets_luffy_shaping():
    # rows: on-policy (ratio 1, A = -1: loss 1), two guide slots with p = 0.3 and 0.6, A = 2 each
    # LUFFY: -(0.3 / 0.4) * 2 = -1.5 and -(0.6 / 0.7) * 2 = -12/7; mean over the three sequences
    logprobs = torch.tensor([[-0.5], [math.log(0.3)], [math.log(0.6)]], dtype=torch.float64)
    behaviour = torch.tensor([[-0.5], [-3.0], [-3.0]], dtype=torch.float64)
    adv = torch.tensor([-1.0, 2.0, 2.0], dtype=torch.float64)
    is_guide = torch.tensor([False, True, True])
    loss, _ = policy_loss(logprobs, behaviour, adv, torch.ones(3, 1), is_guide=is_guide, guide_shaping="luffy")
    assert float(loss) == pytest.approx((1 - 1.5 - 12 / 7) / 3, abs=1e-12)


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
        ("algo.guide_slots=0", "algo.guide_slots"),
        ("algo.guide_slots=8", "algo.guide_slots"),  # group_size 8: k <= 7
    ],
)
def test_bad_option_is_a_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_run_config(None, overrides=[override]).validate()


def test_guide_slots_range_follows_the_group_size():
    assert AlgoConfig().guide_slots == 1  # the paper
    load_run_config(None, overrides=["algo.group_size=4", "algo.guide_slots=3"]).validate()
    with pytest.raises(ConfigError, match=r"^algo.guide_slots: must be <= algo.group_size - 1 = 3, got 4$"):
        load_run_config(None, overrides=["algo.group_size=4", "algo.guide_slots=4"]).validate()
    with pytest.raises(ConfigError, match=r"^algo.guide_slots: must be >= 1, got 0$"):
        load_run_config(None, overrides=["algo.guide_slots=0"]).validate()


def test_overlapping_repeats_are_a_config_error():
    overrides = ["method=npo", "npo.early.enabled=false", "npo.late.enabled=true", "npo.late.at_step=10"]
    overrides += ["npo.late.delta=20", "npo.late.repeat_every=10", "train.steps=100"]
    with pytest.raises(ConfigError, match="npo.late.repeat_every: .*before plan 0 ends"):
        load_run_config(None, overrides=overrides).validate()
