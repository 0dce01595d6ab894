"""The clipped surrogate, its aggregations and the KL/entropy helpers (npo/core/loss.py)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import aggregate_ref, policy_loss_ref

from npo.core.config import LossAggregation
from npo.core.loss import aggregate, entropy_from_logits, kl_k1, kl_k3, policy_loss

MODES = [m.value for m in LossAggregation]
LN = math.log


# ---------------------------------------------------------------------------------------------------------------
# Hand examples


def hand_batch():
    """Two sequences, eps_low = 0.2, eps_high = 0.28 (clip range [0.8, 1.28]).

    seq 0: A = +1, ratios [1, 1.5, 0.5], 3 valid tokens
        min(r A, clip(r) A): r=1 -> 1;  r=1.5 -> min(1.5, 1.28) = 1.28 (CLIPPED, upper side);
                             r=0.5 -> min(0.5, 0.8) = 0.5
        per-token loss [-1, -1.28, -0.5]: sum -2.78, mean -0.926667
    seq 1: A = -1, ratios [0.5, 1.5], 2 valid tokens (third is padding)
        r=0.5 -> min(-0.5, -0.8) = -0.8 (CLIPPED, lower side);  r=1.5 -> min(-1.5, -1.28) = -1.5
        per-token loss [0.8, 1.5]: sum 2.3, mean 1.15
    """
    behaviour = torch.full((2, 3), -1.0, dtype=torch.float64)
    logprobs = behaviour + torch.tensor([[0.0, LN(1.5), LN(0.5)], [LN(0.5), LN(1.5), 7.0]], dtype=torch.float64)
    logprobs.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return logprobs, behaviour, advantages, mask


@pytest.mark.parametrize(
    ("aggregation", "max_len", "expected"),
    [
        # (1/2) * (-2.78/3 + 2.3/2) = (1/2) * (-0.926667 + 1.15) = 0.1116667
        ("seq_mean_token_mean", None, 0.5 * (-2.78 / 3 + 2.3 / 2)),
        # (-2.78 + 2.3) / 5 = -0.096
        ("token_mean", None, -0.096),
        # (1/2) * (-2.78/3 + 2.3/3) = -0.08   (max_len defaults to T = 3)
        ("seq_mean_token_sum_norm", None, -0.08),
        # (1/2) * (-2.78/4 + 2.3/4) = (1/2) * (-0.695 + 0.575) = -0.06
        ("seq_mean_token_sum_norm", 4, -0.06),
    ],
)
def test_clipped_surrogate_by_hand(aggregation, max_len, expected):
    logprobs, behaviour, advantages, mask = hand_batch()
    loss, metrics = policy_loss(
        logprobs,
        behaviour,
        advantages,
        mask,
        is_guide=torch.tensor([False, True]),
        aggregation=aggregation,
        max_len=max_len,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["pg_loss"] == pytest.approx(expected, abs=1e-12)
    # 2 of 5 valid tokens clipped; on-policy seq 0: 1 of 3; guide seq 1: 1 of 2; 1 of 2 sequences is a guide
    assert metrics["clip_frac"] == pytest.approx(0.4)
    assert metrics["clip_frac_onpolicy"] == pytest.approx(1 / 3)
    assert metrics["clip_frac_guide"] == pytest.approx(0.5)
    assert metrics["guide_share"] == 0.5
    # ratio_mean = (1 + 1.5 + 0.5 + 0.5 + 1.5) / 5 = 1.0
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    # approx_kl = mean k3(q || pi) = mean(r - 1 - ln r): r=1 -> 0; r=1.5 -> 0.0945349; r=0.5 -> 0.1931472
    #           = (0 + 0.0945349 + 0.1931472 + 0.1931472 + 0.0945349) / 5 = 0.1150728
    assert metrics["approx_kl"] == pytest.approx(0.1150728, abs=1e-7)


def test_clipped_tokens_get_no_gradient_by_hand():
    logprobs, behaviour, advantages, mask = hand_batch()
    loss, _ = policy_loss(logprobs, behaviour, advantages, mask)  # seq_mean_token_mean
    loss.backward()
    # d loss / d logp_it = -(1/B) (1/|o_i|) A_i r_it on unclipped tokens, 0 on clipped tokens and padding
    #   [0,0]: -(1/2)(1/3)(1)(1)   = -1/6        [0,1]: clipped -> 0      [0,2]: -(1/2)(1/3)(1)(0.5) = -1/12
    #   [1,0]: clipped -> 0                       [1,1]: -(1/2)(1/2)(-1)(1.5) = 0.375   [1,2]: padding -> 0
    expected = [[-1 / 6, 0.0, -1 / 12], [0.0, 0.375, 0.0]]
    for got_row, want_row in zip(logprobs.grad.tolist(), expected, strict=True):
        assert got_row == pytest.approx(want_row, abs=1e-12)


def test_aggregation_modes_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # third sequence has no valid token
    # seq_mean_token_mean: sequences with tokens only: ((1+2+3)/3 + 4/1) / 2 = (2 + 4) / 2 = 3
    assert aggregate(values, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)
    # token_mean: (1+2+3+4) / 4 = 2.5
    assert aggregate(values, mask, LossAggregation.TOKEN_MEAN).item() == pytest.approx(2.5)
    # seq_mean_token_sum_norm, max_len = T = 3: (6/3 + 4/3 + 0/3) / 3 = 1.1111111 (the empty sequence counts in B)
    assert aggregate(values, mask, "seq_mean_token_sum_norm").item() == pytest.approx(10 / 9)
    # ... with max_len = 5: (6/5 + 4/5 + 0) / 3 = 0.6666667
    assert aggregate(values, mask, "seq_mean_token_sum_norm", max_len=5).item() == pytest.approx(2 / 3)


def test_kl_estimators_by_hand():
    # p = 0.5, q = 0.25 for the sampled token:  k1 = ln p - ln q = ln 2 = 0.6931472
    # k3: d = ln q - ln p = ln 0.5 = -0.6931472;  exp(d) - d - 1 = 0.5 + 0.6931472 - 1 = 0.1931472
    logp, logq = torch.tensor([LN(0.5), LN(0.3)]), torch.tensor([LN(0.25), LN(0.3)])
    assert kl_k1(logp, logq).tolist() == pytest.approx([0.6931472, 0.0], abs=1e-6)
    assert kl_k3(logp, logq).tolist() == pytest.approx([0.1931472, 0.0], abs=1e-6)
    # the other direction: d = ln 2 -> 2 - 0.6931472 - 1 = 0.3068528; k1 = -0.6931472 (k1 can be negative)
    assert kl_k3(logq[:1], logp[:1]).item() == pytest.approx(0.3068528, abs=1e-6)
    assert kl_k1(logq[:1], logp[:1]).item() == pytest.approx(-0.6931472, abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 0, allow_nan=False), min_size=2, max_size=2))
def test_k3_is_non_negative_and_zero_only_on_equal_logprobs(pair):
    logp, logq = torch.tensor([pair[0]], dtype=torch.float64), torch.tensor([pair[1]], dtype=torch.float64)
    k3 = kl_k3(logp, logq).item()
    assert k3 >= 0.0
    if pair[0] == pair[1]:
        assert k3 == 0.0


def test_entropy_from_logits_by_hand():
    # uniform over 2: H = ln 2 = 0.6931472
    # logits [0, ln 3]: p = [0.25, 0.75]; H = 0.25 ln 4 + 0.75 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    # one-hot-ish logits [0, 100]: H ~ 0;  shape (..., V) -> (...)
    logits = torch.tensor([[[0.0, 0.0], [0.0, LN(3.0)], [0.0, 100.0]]])  # (1, 3, 2)
    h = entropy_from_logits(logits)
    assert h.shape == (1, 3)
    assert h[0].tolist() == pytest.approx([0.6931472, 0.5623351, 0.0], abs=1e-6)
    assert entropy_from_logits(torch.zeros(5, 7)).tolist() == pytest.approx([LN(7)] * 5)  # uniform over V = 7


def test_entropy_from_logits_with_masked_vocabulary():
    # logits [0, 0, -inf]: p = [0.5, 0.5, 0] -> H = ln 2
    h = entropy_from_logits(torch.tensor([[0.0, 0.0, float("-inf")]]))
    assert h.item() == pytest.approx(LN(2.0))


def test_entropy_bonus_and_kl_penalty_by_hand():
    # one token: r = 1, A = 2 -> pg_loss = -2
    # entropy bonus: -0.1 * 0.7 = -0.07
    # KL penalty: k3(pi || ref) with ln pi = ln 0.5, ln ref = ln 0.25: d = ln 0.5 -> 0.5 + 0.6931472 - 1 = 0.1931472
    #             0.5 * 0.1931472 = 0.0965736
    # L = -2 - 0.07 + 0.0965736 = -1.9734264
    lp = torch.tensor([[LN(0.5)]], requires_grad=True)
    loss, metrics = policy_loss(
        lp,
        lp.detach().clone(),
        torch.tensor([2.0]),
        torch.ones(1, 1),
        entropy=torch.tensor([[0.7]]),
        entropy_coef=0.1,
        ref_logprobs=torch.tensor([[LN(0.25)]]),
        kl_coef=0.5,
    )
    assert loss.item() == pytest.approx(-1.9734264, abs=1e-6)
    assert metrics["pg_loss"] == pytest.approx(-2.0)
    assert metrics["entropy"] == pytest.approx(0.7)
    assert metrics["ref_kl"] == pytest.approx(0.1931472, abs=1e-6)


def test_behaviour_logprobs_are_detached():
    logprobs, behaviour, advantages, mask = hand_batch()
    behaviour.requires_grad_(True)
    loss, _ = policy_loss(logprobs, behaviour, advantages, mask)
    loss.backward()
    assert behaviour.grad is None
    assert logprobs.grad is not None and logprobs.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Loop reference on random inputs (empty masks, length-1 sequences included)


@st.composite
def loss_inputs(draw):
    batch = draw(st.integers(0, 5))
    width = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["prefix", "random", "length_one", "none"]))
    if kind == "prefix":
        lengths = draw(st.lists(st.integers(0, width), min_size=batch, max_size=batch))
        mask = [[int(t < n) for t in range(width)] for n in lengths]
    elif kind == "random":
        mask = draw(
            st.lists(st.lists(st.sampled_from([0, 1]), min_size=width, max_size=width), min_size=batch, max_size=batch)
        )
    elif kind == "length_one":
        mask = [[int(t == 0) for t in range(width)] for _ in range(batch)]
    else:
        mask = [[0] * width for _ in range(batch)]
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(batch, width, generator=gen, dtype=torch.float64)  # (B, T)
    behaviour = logprobs + 0.6 * torch.randn(batch, width, generator=gen, dtype=torch.float64)  # ratios around 1
    advantages = torch.randn(batch, generator=gen, dtype=torch.float64)  # (B,)
    if batch:
        advantages[0] = 0.0 if draw(st.booleans()) else advantages[0]
    is_guide = torch.rand(batch, generator=gen) < 0.3  # (B,)
    return logprobs, behaviour, advantages, torch.tensor(mask).reshape(batch, width), is_guide


@settings(max_examples=100, deadline=None)
@given(
    inputs=loss_inputs(),
    aggregation=st.sampled_from(MODES),
    max_len=st.sampled_from([None, 8]),
    eps=st.sampled_from([(0.2, 0.28), (0.1, 0.1), (0.0, 0.0)]),
)
def test_policy_loss_matches_loop_reference(inputs, aggregation, max_len, eps):
    logprobs, behaviour, advantages, mask, is_guide = inputs
    loss, metrics = policy_loss(
        logprobs,
        behaviour,
        advantages,
        mask,
        is_guide=is_guide,
        eps_low=eps[0],
        eps_high=eps[1],
        aggregation=aggregation,
        max_len=max_len,
    )
    ref_loss, ref_metrics = policy_loss_ref(
        logprobs.tolist(),
        behaviour.tolist(),
        advantages.tolist(),
        mask.tolist(),
        is_guide=is_guide.tolist(),
        eps_low=eps[0],
        eps_high=eps[1],
        aggregation=aggregation,
        max_len=max_len,
        width=logprobs.shape[1],
    )
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@settings(max_examples=60, deadline=None)
@given(inputs=loss_inputs(), aggregation=st.sampled_from(MODES), max_len=st.sampled_from([None, 3]))
def test_aggregate_matches_loop_reference(inputs, aggregation, max_len):
    values, _, _, mask, _ = inputs
    got = aggregate(values, mask, aggregation, max_len=max_len).item()
    ref = aggregate_ref(values.tolist(), mask.tolist(), aggregation, max_len=max_len, width=values.shape[1])
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("aggregation", MODES)
def test_batch_without_valid_tokens_gives_zero_loss_and_zero_gradient(aggregation):
    logprobs = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(
        logprobs, torch.zeros(3, 4), torch.tensor([1.0, -1.0, 0.5]), torch.zeros(3, 4), aggregation=aggregation
    )
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(3, 4, dtype=torch.float64))
    assert metrics["clip_frac"] == 0.0 and metrics["approx_kl"] == 0.0 and metrics["ratio_mean"] == 0.0


@pytest.mark.parametrize("aggregation", MODES)
def test_empty_batch_gives_zero_loss(aggregation):
    logprobs = torch.zeros(0, 4, requires_grad=True)
    loss, metrics = policy_loss(logprobs, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 4), aggregation=aggregation)
    loss.backward()
    assert loss.item() == 0.0
    assert metrics["guide_share"] == 0.0


def test_sequence_without_tokens_is_left_out_of_seq_mean():
    # seq_mean_token_mean averages over sequences with >= 1 token: an empty row does not dilute the mean
    lp = torch.zeros(2, 2)
    loss, _ = policy_loss(lp, lp, torch.tensor([3.0, 5.0]), torch.tensor([[1, 1], [0, 0]]))
    assert loss.item() == pytest.approx(-3.0)  # r = 1: -A_0 over the one non-empty sequence


@pytest.mark.parametrize("aggregation", MODES)
def test_non_finite_padding_does_not_leak_into_loss_or_gradient(aggregation):
    logprobs = torch.tensor([[-1.0, float("-inf")], [-0.5, -0.7]], requires_grad=True)
    behaviour = torch.tensor([[-1.2, float("nan")], [-0.4, float("-inf")]])
    mask = torch.tensor([[1, 0], [1, 0]])
    loss, metrics = policy_loss(logprobs, behaviour, torch.tensor([1.0, -1.0]), mask, aggregation=aggregation)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[:, 1].tolist() == [0.0, 0.0]
    assert all(math.isfinite(v) for v in metrics.values())


def test_non_finite_padding_does_not_leak_into_kl_penalty_gradient():
    logprobs = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    ref = torch.tensor([[-1.1, -1.0]])
    loss, _ = policy_loss(
        logprobs, logprobs.detach(), torch.tensor([1.0]), torch.tensor([[1, 0]]), ref_logprobs=ref, kl_coef=0.1
    )
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()


def test_zero_width_batch_reduces_to_zero_in_every_mode():
    for mode in MODES:
        assert aggregate(torch.zeros(2, 0), torch.zeros(2, 0), mode).item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Gradient properties


@st.composite
def policy_inputs(draw):
    batch, width, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(2, 6))
    lengths = draw(st.lists(st.integers(1, width), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, width, vocab, generator=gen, dtype=torch.float64, requires_grad=True)  # (B, T, V)
    tokens = torch.randint(0, vocab, (batch, width), generator=gen)  # (B, T)
    advantages = torch.randn(batch, generator=gen, dtype=torch.float64)  # (B,)
    return logits, tokens, advantages, lengths


def token_logprobs(logits, tokens):
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


@settings(max_examples=40, deadline=None)
@given(inputs=policy_inputs())
def test_on_policy_gradient_equals_policy_gradient_estimate(inputs):
    logits, tokens, advantages, lengths = inputs
    batch, width = tokens.shape
    mask = torch.tensor([[int(t < n) for t in range(width)] for n in lengths])
    logp = token_logprobs(logits, tokens)
    loss, metrics = policy_loss(logp, logp.detach(), advantages, mask)  # identical behaviour and current log-probs
    (grad_loss,) = torch.autograd.grad(loss, logits, retain_graph=True)
    # the estimate -(1/B) sum_i A_i / |o_i| sum_t grad log pi(o_it), written as explicit loops
    estimate = 0.0
    for i in range(batch):
        for t in range(lengths[i]):
            estimate = estimate - advantages[i].item() / lengths[i] * logp[i, t] / batch
    (grad_pg,) = torch.autograd.grad(estimate, logits)
    assert torch.allclose(grad_loss, grad_pg, rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-12)  # r = 1 everywhere
    assert metrics["clip_frac"] == 0.0 and metrics["ratio_mean"] == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(inputs=loss_inputs(), aggregation=st.sampled_from(MODES), zero_rows=st.lists(st.booleans(), max_size=5))
def test_zero_advantage_sample_contributes_no_gradient(inputs, aggregation, zero_rows):
    logprobs, behaviour, advantages, mask, is_guide = inputs
    zero = torch.tensor((zero_rows + [False] * 5)[: advantages.shape[0]], dtype=torch.bool)
    advantages = torch.where(zero, torch.zeros_like(advantages), advantages)
    logprobs.requires_grad_(True)
    loss, _ = policy_loss(logprobs, behaviour, advantages, mask, is_guide=is_guide, aggregation=aggregation)
    loss.backward()
    assert torch.equal(logprobs.grad[advantages == 0], torch.zeros_like(logprobs.grad[advantages == 0]))


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_policy_loss_rejects_bad_input():
    lp, mask, adv = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    cases = [
        ("logprobs", dict(logprobs=torch.zeros(6), behaviour_logprobs=torch.zeros(6), advantages=adv, mask=mask)),
        ("behaviour_logprobs", dict(logprobs=lp, behaviour_logprobs=torch.zeros(2, 4), advantages=adv, mask=mask)),
        ("mask", dict(logprobs=lp, behaviour_logprobs=lp, advantages=adv, mask=torch.ones(3, 3))),
        ("advantages", dict(logprobs=lp, behaviour_logprobs=lp, advantages=torch.zeros(3), mask=mask)),
        ("advantages", dict(logprobs=lp, behaviour_logprobs=lp, advantages=torch.zeros(2, 1), mask=mask)),
        ("advantages", dict(logprobs=lp, behaviour_logprobs=lp, advantages=torch.tensor([0.0, math.nan]), mask=mask)),
        ("is_guide", dict(logprobs=lp, behaviour_logprobs=lp, advantages=adv, mask=mask, is_guide=torch.ones(3) > 0)),
        ("eps_low", dict(logprobs=lp, behaviour_logprobs=lp, advantages=adv, mask=mask, eps_low=-0.1)),
        ("eps_high", dict(logprobs=lp, behaviour_logprobs=lp, advantages=adv, mask=mask, eps_high=-0.1)),
        ("entropy", dict(logprobs=lp, behaviour_logprobs=lp, advantages=adv, mask=mask, entropy_coef=0.1)),
        (
            "entropy",
            dict(
                logprobs=lp,
                behaviour_logprobs=lp,
                advantages=adv,
                mask=mask,
                entropy_coef=0.1,
                entropy=torch.zeros(2, 2),
            ),
        ),
        ("ref_logprobs", dict(logprobs=lp, behaviour_logprobs=lp, advantages=adv, mask=mask, kl_coef=0.1)),
        (
            "ref_logprobs",
            dict(
                logprobs=lp,
                behaviour_logprobs=lp,
                advantages=adv,
                mask=mask,
                kl_coef=0.1,
                ref_logprobs=torch.zeros(1, 3),
            ),
        ),
    ]
    for argument, kwargs in cases:
        with pytest.raises(ValueError, match=argument):
            policy_loss(**kwargs)


def test_kl_and_aggregate_reject_bad_input():
    with pytest.raises(ValueError, match="logq"):
        kl_k1(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="logq"):
        kl_k3(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="max_len"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "seq_mean_token_sum_norm", max_len=0)
    with pytest.raises(ValueError, match="LossAggregation"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "token_sum")
