"""Group-relative advantages and pass rates (npo/core/advantages.py): hand examples, properties, loop reference."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import group_advantages_ref

from npo.core.advantages import group_advantages, pass_rates
from npo.core.gate import group_pass_rate
from npo.core.types import Sample

FINITE = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def rewards_2d(min_groups: int = 1):
    """(G, n) nested lists of finite rewards, G >= min_groups, 1 <= n <= 8, often with repeated values."""
    return st.integers(1, 8).flatmap(
        lambda n: st.lists(
            st.lists(st.one_of(FINITE, st.sampled_from([0.0, 1.0, 0.5])), min_size=n, max_size=n),
            min_size=min_groups,
            max_size=6,
        )
    )


# ---------------------------------------------------------------------------------------------------------------
# Hand examples


def test_advantages_with_std_scaling_by_hand():
    # group [1, 0, 0, 0]: mean = 1/4 = 0.25; population std = sqrt(0.25 * 0.75) = 0.4330127
    # A_0 = (1 - 0.25) / (0.4330127 + 1e-6) = 0.75 / 0.4330137 = 1.7320468
    # A_j = (0 - 0.25) / 0.4330137 = -0.5773489
    # group [1, 0, 1, 0]: mean 0.5, std 0.5 -> A = +-0.5 / 0.500001 = +-0.999998
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    adv = group_advantages(rewards, scale_std=True, eps=1e-6)
    std = math.sqrt(0.25 * 0.75)
    expected = [
        [0.75 / (std + 1e-6), -0.25 / (std + 1e-6), -0.25 / (std + 1e-6), -0.25 / (std + 1e-6)],
        [0.5 / 0.500001, -0.5 / 0.500001, 0.5 / 0.500001, -0.5 / 0.500001],
    ]
    for got_row, want_row in zip(adv.tolist(), expected, strict=True):
        assert got_row == pytest.approx(want_row, rel=1e-12)
    assert adv[0, 0].item() == pytest.approx(1.7320468, abs=1e-6)
    assert adv[0, 1].item() == pytest.approx(-0.5773489, abs=1e-6)


def test_advantages_without_std_scaling_by_hand():
    # group [1, 0, 0, 0]: mean 0.25 -> A = [0.75, -0.25, -0.25, -0.25]
    # group [0.5, 1, 0, 0.5] (graded): mean 0.5 -> A = [0, 0.5, -0.5, 0]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 1.0, 0.0, 0.5]])
    adv = group_advantages(rewards, scale_std=False)
    assert adv.tolist() == [[0.75, -0.25, -0.25, -0.25], [0.0, 0.5, -0.5, 0.0]]


def test_mixed_group_counts_the_guide_in_mean_and_std():
    # NPO group: 7 wrong on-policy samples + 1 correct guide in slot n = [0]*7 + [1]
    # mean = 1/8 = 0.125; std = sqrt(0.125 * 0.875) = 0.3307189
    # A_guide = 0.875 / 0.3307199 = 2.6457434; A_wrong = -0.125 / 0.3307199 = -0.3779633
    rewards = torch.tensor([[0.0] * 7 + [1.0]], dtype=torch.float64)
    adv = group_advantages(rewards)
    std = math.sqrt(0.125 * 0.875)
    assert adv[0, -1].item() == pytest.approx(0.875 / (std + 1e-6), rel=1e-12)
    assert adv[0, 0].item() == pytest.approx(-0.125 / (std + 1e-6), rel=1e-12)
    assert adv[0, -1].item() == pytest.approx(2.6457434, abs=1e-6)


def test_equal_reward_groups_get_exact_zero_and_integer_rewards_become_float():
    # all-wrong [0,0,0], all-right [1,1,1]: no signal -> exactly 0 (not 0/eps noise)
    rewards = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0]])
    adv = group_advantages(rewards)
    assert adv.dtype == torch.float32
    assert adv[:2].tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert adv[2, 0].item() > 0 > adv[2, 1].item()


def test_pass_rate_by_hand():
    # [1, 0, 0, 1] -> 2/4 = 0.5;  [0.5, 1, 1, 1] -> 3/4 = 0.75 at threshold 1.0, 4/4 = 1.0 at threshold 0.5
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 1.0, 1.0, 1.0]])
    assert pass_rates(rewards).tolist() == [0.5, 0.75]
    assert pass_rates(rewards, correct_threshold=0.5).tolist() == [0.5, 1.0]


def test_tensor_and_sample_pass_rates_agree():
    rewards = [[1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    expected = pass_rates(torch.tensor(rewards)).tolist()  # [3/5, 0]
    got = [group_pass_rate([Sample("p", [1], [0.0], reward=r) for r in row], 1.0) for row in rewards]
    assert got == pytest.approx(expected)
    assert got == pytest.approx([0.6, 0.0])


# ---------------------------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=80, deadline=None)
@given(rewards=rewards_2d(), scale_std=st.booleans())
def test_advantages_sum_to_zero_and_are_never_nan(rewards, scale_std):
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), scale_std=scale_std)
    assert not torch.isnan(adv).any()
    assert torch.isfinite(adv).all()
    for row, group in zip(adv.tolist(), rewards, strict=True):
        scale = max(1.0, max(abs(r) for r in group)) if not scale_std else max(1.0, sum(abs(a) for a in row))
        assert abs(sum(row)) <= 1e-9 * scale * len(row)


@settings(max_examples=60, deadline=None)
@given(value=FINITE, n=st.integers(1, 8), scale_std=st.booleans(), eps=st.sampled_from([0.0, 1e-6, 0.1]))
def test_equal_reward_group_gets_exactly_zero(value, n, scale_std, eps):
    adv = group_advantages(torch.full((2, n), value), scale_std=scale_std, eps=eps)
    assert adv.tolist() == [[0.0] * n, [0.0] * n]


@settings(max_examples=60, deadline=None)
@given(rewards=rewards_2d(), scale_std=st.booleans(), eps=st.sampled_from([0.0, 1e-6, 1e-3]))
def test_advantages_match_loop_reference(rewards, scale_std, eps):
    # eps = 0 only where every non-constant group has a normal spread (a spread of 1e-185 underflows the variance)
    assume(eps > 0 or all(max(g) - min(g) > 1e-6 or max(g) == min(g) for g in rewards))
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), scale_std=scale_std, eps=eps)
    ref = group_advantages_ref(rewards, scale_std=scale_std, eps=eps)
    for got_row, ref_row in zip(adv.tolist(), ref, strict=True):
        assert got_row == pytest.approx(ref_row, rel=1e-9, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(rewards=rewards_2d())
def test_std_scaled_advantages_have_unit_population_std(rewards):
    # eps = 0: a non-constant group's scaled advantages have mean 0 and population std exactly 1
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), eps=0.0)
    for row, group in zip(adv.tolist(), rewards, strict=True):
        if max(group) - min(group) > 1e-6:
            var = sum(a * a for a in row) / len(row)
            assert var == pytest.approx(1.0, rel=1e-6)


@pytest.mark.filterwarnings("ignore:std\\(\\)")
def test_empty_batch_of_groups():
    assert group_advantages(torch.zeros(0, 4)).shape == (0, 4)
    assert pass_rates(torch.zeros(0, 4)).shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("rewards", "kwargs", "argument"),
    [
        (torch.zeros(4), {}, "rewards"),
        (torch.zeros(2, 3, 4), {}, "rewards"),
        (torch.zeros(2, 0), {}, "rewards"),
        (torch.tensor([[1.0, float("nan")]]), {}, "rewards"),
        (torch.tensor([[1.0, float("inf")]]), {}, "rewards"),
        (torch.tensor([[1.0, 0.0]]), {"eps": -1e-3}, "eps"),
    ],
)
def test_group_advantages_rejects_bad_input(rewards, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        group_advantages(rewards, **kwargs)


def test_pass_rates_rejects_wrong_shape():
    with pytest.raises(ValueError, match="rewards"):
        pass_rates(torch.zeros(8))


@pytest.mark.parametrize("which", ["tensor", "samples"])
def test_pass_rate_rejects_nan_reward(which):
    with pytest.raises(ValueError, match="reward"):
        if which == "tensor":
            pass_rates(torch.tensor([[1.0, float("nan")]]))
        else:
            group_pass_rate([Sample("p", [1], [0.0], reward=1.0), Sample("p", [1], [0.0], reward=math.nan)], 1.0)
