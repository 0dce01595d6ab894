"""The NPO gate and slot replacement (npo/core/gate.py): hand examples, properties, IS switch, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npo.core.advantages import group_advantages
from npo.core.gate import MixedGroup, build_mixed_groups, group_pass_rate, is_verified_guide, should_replace
from npo.core.loss import policy_loss
from npo.core.types import Sample


def sample(prompt_id: str, reward: float, n_tokens: int = 3, logprob: float = -1.0, step: int = 0) -> Sample:
    return Sample(prompt_id, list(range(1, n_tokens + 1)), [logprob] * n_tokens, reward=reward, policy_step=step)


def group(prompt_id: str, rewards: list[float]) -> list[Sample]:
    return [sample(prompt_id, r, n_tokens=2 + i % 3, logprob=-0.5 - 0.1 * i) for i, r in enumerate(rewards)]


def guide(prompt_id: str, reward: float = 1.0, n_tokens: int = 4, logprob: float = -0.2) -> Sample:
    return sample(prompt_id, reward, n_tokens=n_tokens, logprob=logprob, step=50)


def to_batch(mixed: list[MixedGroup], seed: int = 0) -> dict[str, torch.Tensor]:
    """Padded tensors for policy_loss: current log-probs drawn from a seeded generator, behaviour from the groups."""
    rows = [(s, m.behaviour_logprobs[i], m.is_guide[i]) for m in mixed for i, s in enumerate(m.samples)]
    width = max(len(s.response_ids) for s, _, _ in rows)
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(len(rows), width, generator=gen, dtype=torch.float64) * 2  # (B, T)
    behaviour = torch.zeros(len(rows), width, dtype=torch.float64)  # (B, T)
    mask = torch.zeros(len(rows), width)  # (B, T)
    for b, (_, lp, _) in enumerate(rows):
        behaviour[b, : len(lp)] = torch.tensor(lp, dtype=torch.float64)
        mask[b, : len(lp)] = 1
    rewards = torch.tensor([m.rewards for m in mixed], dtype=torch.float64)  # (G, n)
    return {
        "logprobs": logprobs,
        "behaviour_logprobs": behaviour,
        "advantages": group_advantages(rewards).reshape(-1),  # (B,)
        "mask": mask,
        "is_guide": torch.tensor([g for _, _, g in rows]),
    }


# ---------------------------------------------------------------------------------------------------------------
# Hand examples


def test_gate_by_hand():
    # p_hat = 2/8 = 0.25 <= 0.6 -> replace;  p_hat = 5/8 = 0.625 > 0.6 -> keep;  p_hat = 3/5 = 0.6 <= 0.6 -> replace
    assert group_pass_rate(group("a", [1, 1, 0, 0, 0, 0, 0, 0]), 1.0) == 0.25
    assert group_pass_rate(group("b", [1, 1, 1, 1, 1, 0, 0, 0]), 1.0) == 0.625
    assert group_pass_rate(group("c", [1, 1, 1, 0, 0]), 1.0) == 0.6
    assert should_replace(0.25, 0.6) is True
    assert should_replace(0.625, 0.6) is False
    assert should_replace(0.6, 0.6) is True
    # tau = 0 gates only all-failed groups; tau = 1 gates every group
    assert should_replace(0.0, 0.0) and not should_replace(0.125, 0.0)
    assert should_replace(1.0, 1.0)


def test_failed_group_gets_guide_in_last_slot_with_guide_logprobs():
    on_policy = group("a", [0, 0, 1, 0])  # p_hat = 1/4
    g = guide("a")
    [mixed] = build_mixed_groups([on_policy], {"a": g}, tau_gate=0.6, correct_threshold=1.0, is_correction=True)
    assert mixed.replaced
    assert mixed.pass_rate == 0.25  # the on-policy pass rate, before the replacement
    assert mixed.samples[:3] == on_policy[:3]
    assert mixed.samples[3] is g
    assert mixed.is_guide == [False, False, False, True]
    assert mixed.rewards == [0, 0, 1, 1.0]
    # q_i: pi^(t) for on-policy slots, pi^(t+Delta) (stored with the guide) for the guide slot
    assert mixed.behaviour_logprobs[:3] == [s.logprobs for s in on_policy[:3]]
    assert mixed.behaviour_logprobs[3] == [-0.2] * 4


def test_group_above_gate_and_group_without_guide_are_unchanged():
    above = group("a", [1, 1, 1, 0])  # p_hat = 0.75 > 0.6
    no_guide = group("b", [0, 0, 0, 0])  # gated, but the cache has no guide for b
    mixed = build_mixed_groups(
        [above, no_guide], {"a": guide("a")}, tau_gate=0.6, correct_threshold=1.0, is_correction=True
    )
    for m, original in zip(mixed, [above, no_guide], strict=True):
        assert not m.replaced
        assert m.samples == original
        assert m.is_guide == [False] * 4
        assert m.behaviour_logprobs == [s.logprobs for s in original]
    assert [m.prompt_id for m in mixed] == ["a", "b"]


def test_is_correction_off_scores_guides_under_rollout_policy():
    groups = [group("a", [0, 0, 0, 0]), group("b", [1, 1, 1, 1]), group("c", [0, 1, 0, 0])]
    guides = {"a": guide("a", n_tokens=2), "b": guide("b"), "c": guide("c", n_tokens=3)}
    calls = []

    def rollout_logprobs(samples: list[Sample]) -> list[list[float]]:
        calls.append([s.prompt_id for s in samples])
        return [[-3.0] * len(s.response_ids) for s in samples]

    mixed = build_mixed_groups(
        groups, guides, tau_gate=0.6, correct_threshold=1.0, is_correction=False, rollout_logprobs=rollout_logprobs
    )
    assert calls == [["a", "c"]]  # one batched call, only the inserted guides, in group order
    assert mixed[0].behaviour_logprobs[-1] == [-3.0, -3.0]
    assert mixed[2].behaviour_logprobs[-1] == [-3.0, -3.0, -3.0]
    assert mixed[0].samples[-1].logprobs == [-0.2, -0.2]  # the cached guide itself is not modified
    assert not mixed[1].replaced and mixed[1].behaviour_logprobs == [s.logprobs for s in groups[1]]


def test_is_correction_off_without_inserted_guide_needs_no_scorer():
    mixed = build_mixed_groups(
        [group("a", [1, 1, 1, 1])], {"a": guide("a")}, tau_gate=0.6, correct_threshold=1.0, is_correction=False
    )
    assert not mixed[0].replaced


@pytest.mark.parametrize(
    ("candidate", "why"),
    [
        (guide("a", reward=0.0), "reward below threshold"),
        (guide("a", reward=0.99), "reward just below threshold"),
        (guide("other"), "answers another prompt"),
        (Sample("a", [], [], reward=1.0), "empty response"),
        (guide("a", reward=math.nan), "NaN reward"),
        (guide("a", reward=math.inf), "infinite reward"),
        (None, "no guide"),
    ],
)
def test_unverified_guide_is_rejected(candidate, why):
    assert not is_verified_guide(candidate, "a", 1.0), why
    guides = {"a": candidate} if candidate is not None else {}
    [m] = build_mixed_groups([group("a", [0, 0, 0])], guides, tau_gate=1.0, correct_threshold=1.0, is_correction=True)
    assert not m.replaced and m.is_guide == [False] * 3


def test_graded_reward_guide_verified_against_threshold():
    assert is_verified_guide(guide("a", reward=0.7), "a", 0.5)
    assert not is_verified_guide(guide("a", reward=0.4), "a", 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Properties

REWARD = st.sampled_from([0.0, 1.0, 0.5])
AGGREGATIONS = ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]


@st.composite
def gated_batches(draw):
    n = draw(st.integers(2, 6))
    n_groups = draw(st.integers(1, 5))
    groups = [group(f"p{g}", draw(st.lists(REWARD, min_size=n, max_size=n))) for g in range(n_groups)]
    tau = draw(st.sampled_from([0.0, 0.25, 0.5, 0.6, 1.0]))
    return groups, tau


@settings(max_examples=80, deadline=None)
@given(batch=gated_batches(), threshold=st.sampled_from([0.5, 1.0]))
def test_groups_above_gate_are_never_modified(batch, threshold):
    groups, tau = batch
    guides = {g[0].prompt_id: guide(g[0].prompt_id) for g in groups}  # every prompt has a verified guide
    mixed = build_mixed_groups(groups, guides, tau_gate=tau, correct_threshold=threshold, is_correction=True)
    for m, original in zip(mixed, groups, strict=True):
        p_hat = sum(s.reward >= threshold for s in original) / len(original)
        assert m.pass_rate == pytest.approx(p_hat)
        if p_hat > tau:
            assert not m.replaced
            assert all(a is b for a, b in zip(m.samples, original, strict=True))
            assert m.behaviour_logprobs == [s.logprobs for s in original]
        else:
            assert m.replaced and m.samples[-1] is guides[m.prompt_id]  # gated + verified guide -> inserted
        assert len(m.samples) == len(original)


@st.composite
def bad_guides(draw, prompt_id: str):
    kind = draw(st.sampled_from(["low_reward", "wrong_prompt", "empty", "nan_reward"]))
    if kind == "low_reward":
        return guide(prompt_id, reward=draw(st.floats(-10, 1.0, exclude_max=True, allow_nan=False)))
    if kind == "wrong_prompt":
        return guide(draw(st.text(min_size=1, max_size=4).filter(lambda p: p != prompt_id)))
    if kind == "empty":
        return Sample(prompt_id, [], [], reward=1.0)
    return guide(prompt_id, reward=math.nan)


@settings(max_examples=80, deadline=None)
@given(batch=gated_batches(), data=st.data())
def test_unverified_guide_is_never_inserted(batch, data):
    groups, _ = batch
    guides = {g[0].prompt_id: data.draw(bad_guides(g[0].prompt_id)) for g in groups}
    # tau = 1: every group is gated, so only verification can keep a guide out
    mixed = build_mixed_groups(groups, guides, tau_gate=1.0, correct_threshold=1.0, is_correction=True)
    for m, original in zip(mixed, groups, strict=True):
        assert not m.replaced
        assert not any(m.is_guide)
        assert all(a is b for a, b in zip(m.samples, original, strict=True))


@settings(max_examples=50, deadline=None)
@given(batch=gated_batches(), seed=st.integers(0, 2**16), aggregation=st.sampled_from(AGGREGATIONS))
def test_is_on_and_off_give_same_loss_when_guide_logprobs_equal_rollout_policys(batch, seed, aggregation):
    groups, tau = batch
    guides = {g[0].prompt_id: guide(g[0].prompt_id, n_tokens=1 + i % 4) for i, g in enumerate(groups)}

    def rollout_logprobs(samples: list[Sample]) -> list[list[float]]:
        return [list(s.logprobs) for s in samples]  # pi^(t) and pi^(t+Delta) agree on the guide tokens

    on = build_mixed_groups(groups, guides, tau_gate=tau, correct_threshold=1.0, is_correction=True)
    off = build_mixed_groups(
        groups, guides, tau_gate=tau, correct_threshold=1.0, is_correction=False, rollout_logprobs=rollout_logprobs
    )
    loss_on, metrics_on = policy_loss(**to_batch(on, seed), aggregation=aggregation)
    loss_off, metrics_off = policy_loss(**to_batch(off, seed), aggregation=aggregation)
    assert loss_on.item() == loss_off.item()
    assert metrics_on == metrics_off


def test_is_on_and_off_differ_when_guide_logprobs_differ():
    groups = [group("a", [0, 0, 0, 0])]
    guides = {"a": guide("a", n_tokens=3, logprob=-0.2)}
    on = build_mixed_groups(groups, guides, tau_gate=0.6, correct_threshold=1.0, is_correction=True)
    off = build_mixed_groups(
        groups,
        guides,
        tau_gate=0.6,
        correct_threshold=1.0,
        is_correction=False,
        rollout_logprobs=lambda samples: [[-0.3] * len(s.response_ids) for s in samples],
    )
    batch_on, batch_off = to_batch(on), to_batch(off)
    # the guide row's behaviour log-probs differ (-0.2 vs -0.3), everything else is identical
    assert torch.equal(batch_on["behaviour_logprobs"][:3], batch_off["behaviour_logprobs"][:3])
    assert batch_on["behaviour_logprobs"][3, :3].tolist() == [-0.2] * 3
    assert batch_off["behaviour_logprobs"][3, :3].tolist() == [-0.3] * 3
    # wide clip range: no token is clipped, so the ratio difference reaches the loss
    loss_on, _ = policy_loss(**batch_on, eps_low=1.0, eps_high=100.0)
    loss_off, _ = policy_loss(**batch_off, eps_low=1.0, eps_high=100.0)
    assert loss_on.item() != pytest.approx(loss_off.item())


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_mismatched_group_sizes_raise():
    with pytest.raises(ValueError, match="groups"):
        build_mixed_groups(
            [group("a", [0, 0, 0]), group("b", [0, 0])], {}, tau_gate=0.6, correct_threshold=1.0, is_correction=True
        )


def test_group_of_one_raises():
    with pytest.raises(ValueError, match="groups"):
        build_mixed_groups([group("a", [0])], {}, tau_gate=0.6, correct_threshold=1.0, is_correction=True)


def test_group_mixing_prompts_raises():
    mixed_prompts = group("a", [0, 0]) + group("b", [0])
    with pytest.raises(ValueError, match="groups\\[0\\]"):
        build_mixed_groups([mixed_prompts], {}, tau_gate=0.6, correct_threshold=1.0, is_correction=True)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_raises(bad):
    with pytest.raises(ValueError, match="reward"):
        build_mixed_groups([group("a", [0, bad])], {}, tau_gate=0.6, correct_threshold=1.0, is_correction=True)


@pytest.mark.parametrize("tau", [-0.1, 1.1, math.nan])
def test_tau_outside_unit_interval_raises(tau):
    with pytest.raises(ValueError, match="tau_gate"):
        build_mixed_groups([group("a", [0, 0])], {}, tau_gate=tau, correct_threshold=1.0, is_correction=True)
    with pytest.raises(ValueError, match="tau_gate"):
        should_replace(0.5, tau)


def test_empty_group_raises_naming_samples():
    with pytest.raises(ValueError, match="samples"):
        group_pass_rate([], 1.0)


def test_is_correction_off_scorer_errors():
    groups, guides = [group("a", [0, 0, 0])], {"a": guide("a", n_tokens=3)}
    kwargs = {"tau_gate": 0.6, "correct_threshold": 1.0, "is_correction": False}
    with pytest.raises(ValueError, match="rollout_logprobs"):
        build_mixed_groups(groups, guides, **kwargs)  # no scorer but a guide is inserted
    with pytest.raises(ValueError, match="rollout_logprobs"):
        build_mixed_groups(groups, guides, rollout_logprobs=lambda s: [], **kwargs)  # wrong number of sequences
    with pytest.raises(ValueError, match="rollout_logprobs"):
        build_mixed_groups(groups, guides, rollout_logprobs=lambda s: [[-1.0]], **kwargs)  # wrong length
