"""Tests for npo.runtime.batch and npo.runtime.engine: batch layout, teacher-forced log-probs, and the sampling
engine on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from reference import BOS, EOS, PAD, VOCAB
from reference import tiny_llama as _tiny_llama
from transformers import LlamaForCausalLM

from npo.core.config import ConfigError
from npo.runtime.batch import build_batch, gather_responses, left_pad, scatter_responses, token_logprobs
from npo.runtime.engine import Generation, SamplingParams, TransformersEngine, sample_top_p

PROMPTS = [[BOS, 5, 6, 7, 8], [BOS, 9], [BOS, 3, 4, 10]]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """reference.tiny_llama with 128 positions."""
    return _tiny_llama(seed, max_positions=128)


def with_output_bias(model: LlamaForCausalLM, bias: torch.Tensor, *, flat: bool = False) -> LlamaForCausalLM:
    """Replace the LM head by one with a bias (and zero weights when flat, so the distribution is softmax(bias))."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.zeros_like(head.weight) if flat else model.lm_head.weight)
        head.bias.copy_(bias)
    model.lm_head = head
    return model


def reference_logprobs(model: LlamaForCausalLM, prompt: list[int], response: list[int], temperature: float) -> list:
    """log-probs of the response from one unpadded row, computed with a plain full log_softmax."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(response)]


# ----------------------------------------------------------------------------------------------------------------
# Batch helpers


def test_left_pad_places_tokens_at_the_right_edge():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_id=PAD)
    assert ids.tolist() == [[4, 5, 6], [PAD, PAD, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_build_batch_layout():
    batch = build_batch([[11, 12, 13], [14]], [[15, 16], [17, 18, 19]], pad_id=PAD)
    assert batch.input_ids.tolist() == [[11, 12, 13, 15, 16, PAD], [PAD, PAD, 14, 17, 18, 19]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch.targets.tolist() == [[12, 13, 15, 16, PAD], [PAD, 14, 17, 18, 19]]
    # Every marked target is a response token, in order.
    marked = [batch.targets[r][batch.response_mask[r].bool()].tolist() for r in range(2)]
    assert marked == [[15, 16], [17, 18, 19]]
    assert batch.prompt_width == 3 and batch.response_lengths == [2, 3]


def test_build_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="response_ids"):
        build_batch([[1]], [[2], [3]], pad_id=PAD)
    with pytest.raises(ValueError, match="prompt_ids"):
        build_batch([[1], []], [[2], [3]], pad_id=PAD)


def test_scatter_and_gather_responses_round_trip():
    batch = build_batch([[11, 12, 13], [14]], [[15, 16], []], pad_id=PAD)
    values = [[-0.5, -1.5], []]
    dense = scatter_responses(values, batch, fill=7.0)
    assert dense.shape == batch.response_mask.shape
    assert dense.tolist() == [[7.0, 7.0, -0.5, -1.5], [7.0, 7.0, 7.0, 7.0]]
    assert gather_responses(dense, batch) == values
    with pytest.raises(ValueError, match="values"):
        scatter_responses([[-0.5], []], batch)


# ----------------------------------------------------------------------------------------------------------------
# Teacher-forced log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_unpadded_rows(temperature):
    model = tiny_llama().eval()
    responses = [[3, 4, 5], [6], [7, 8, 9, 10, 11]]
    batch = build_batch(PROMPTS, responses, pad_id=PAD)
    with torch.no_grad():
        logprobs, entropy = token_logprobs(model, batch, temperature=temperature)
    assert entropy is None
    assert logprobs.shape == batch.response_mask.shape
    assert torch.all(logprobs[batch.response_mask == 0] == 0.0)
    got = gather_responses(logprobs, batch)
    for prompt, response, row in zip(PROMPTS, responses, got, strict=True):
        torch.testing.assert_close(
            torch.tensor(row), torch.tensor(reference_logprobs(model, prompt, response, temperature)), atol=1e-5, rtol=0
        )


def test_token_logprobs_full_width_equals_response_window():
    model = tiny_llama().eval()
    batch = build_batch(PROMPTS, [[3, 4], [5, 6, 7], [8]], pad_id=PAD)
    full = build_batch(PROMPTS, [[3, 4], [5, 6, 7], [8]], pad_id=PAD)
    full.prompt_width = 1  # compute every position
    with torch.no_grad():
        windowed, _ = token_logprobs(model, batch, temperature=0.9, with_entropy=True)
        everything, _ = token_logprobs(model, full, temperature=0.9, with_entropy=True)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(windowed[mask], everything[mask], atol=1e-6, rtol=0)
    assert torch.isfinite(everything).all()


def test_token_logprobs_has_finite_grad_with_padding():
    model = tiny_llama().train()
    batch = build_batch(PROMPTS, [[3, 4], [5, 6, 7], [8]], pad_id=PAD)
    logprobs, entropy = token_logprobs(model, batch, with_entropy=True)
    assert logprobs.requires_grad and entropy.requires_grad
    (logprobs.sum() + 0.1 * entropy.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_entropy_of_uniform_distribution_is_log_vocab():
    model = with_output_bias(tiny_llama(), torch.zeros(VOCAB), flat=True).eval()
    batch = build_batch(PROMPTS, [[3, 4], [5], [6, 7, 8]], pad_id=PAD)
    with torch.no_grad():
        logprobs, entropy = token_logprobs(model, batch, temperature=0.7, with_entropy=True)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(entropy[mask], torch.full((6,), math.log(VOCAB)), atol=1e-5, rtol=0)
    torch.testing.assert_close(logprobs[mask], torch.full((6,), -math.log(VOCAB)), atol=1e-5, rtol=0)


def test_length_one_responses():
    model = tiny_llama().eval()
    batch = build_batch(PROMPTS, [[3], [4], [5]], pad_id=PAD)
    assert batch.response_mask.sum().item() == 3
    with torch.no_grad():
        logprobs, entropy = token_logprobs(model, batch, with_entropy=True)
    for prompt, tok, row in zip(PROMPTS, [3, 4, 5], gather_responses(logprobs, batch), strict=True):
        assert row == pytest.approx(reference_logprobs(model, prompt, [tok], 1.0), abs=1e-5)
    assert (entropy[batch.response_mask.bool()] > 0).all()


def test_token_logprobs_rejects_zero_temperature():
    batch = build_batch([[1, 2]], [[3]], pad_id=PAD)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(tiny_llama(), batch, temperature=0.0)


# ----------------------------------------------------------------------------------------------------------------
# The engine


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_score_and_token_logprobs(temperature):
    model = tiny_llama(1)
    engine = TransformersEngine(model, eos_id=EOS, pad_id=PAD, batch_size=5)  # 12 rows -> chunks 5, 5, 2
    params = SamplingParams(temperature=temperature, max_new_tokens=6)
    groups = engine.generate(PROMPTS, 4, params, seed=3)
    assert [len(g) for g in groups] == [4, 4, 4]
    prompts = [p for p, g in zip(PROMPTS, groups, strict=True) for _ in g]
    gens = [gen for g in groups for gen in g]
    responses = [gen.token_ids for gen in gens]
    scored = engine.score(prompts, responses, temperature=temperature)
    batch = build_batch(prompts, responses, pad_id=PAD)
    with torch.no_grad():
        recomputed, _ = token_logprobs(model, batch, temperature=temperature)
    sampled = scatter_responses([gen.logprobs for gen in gens], batch)
    torch.testing.assert_close(recomputed, sampled, atol=1e-4, rtol=0)
    for gen, row in zip(gens, scored, strict=True):
        assert len(gen.logprobs) == len(gen.token_ids) == len(row)
        assert row == pytest.approx(gen.logprobs, abs=1e-4)


def test_same_seed_same_tokens_different_seed_different_tokens():
    engine = TransformersEngine(tiny_llama(), eos_id=EOS, pad_id=PAD)
    params = SamplingParams(max_new_tokens=8)
    first = engine.generate(PROMPTS, 8, params, seed=11)
    again = engine.generate(PROMPTS, 8, params, seed=11)
    other = engine.generate(PROMPTS, 8, params, seed=12)
    assert first == again  # tokens, log-probs (bit for bit) and flags
    assert [[g.token_ids for g in grp] for grp in first] != [[g.token_ids for g in grp] for grp in other]


def test_generate_and_score_leave_global_rng_and_train_mode_untouched():
    model = tiny_llama().train()
    engine = TransformersEngine(model, eos_id=EOS, pad_id=PAD)
    state = torch.random.get_rng_state()
    groups = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=5), seed=0)
    engine.score(PROMPTS, [groups[i][0].token_ids for i in range(3)], temperature=1.0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training


def test_eos_stops_rows_and_nothing_follows_it():
    bias = torch.zeros(VOCAB)
    bias[EOS] = 2.5
    engine = TransformersEngine(with_output_bias(tiny_llama(), bias), eos_id=EOS, pad_id=PAD)
    gens = [g for grp in engine.generate(PROMPTS, 16, SamplingParams(max_new_tokens=6), seed=5) for g in grp]
    finished = [g for g in gens if g.finished]
    unfinished = [g for g in gens if not g.finished]
    assert finished and unfinished  # both kinds occur at this bias
    assert len({len(g.token_ids) for g in finished}) > 1
    for g in finished:
        assert g.token_ids[-1] == EOS and EOS not in g.token_ids[:-1]
        assert len(g.token_ids) == len(g.logprobs) <= 6
    for g in unfinished:
        assert EOS not in g.token_ids and len(g.token_ids) == 6


def test_generation_stops_early_when_every_row_finished():
    bias = torch.zeros(VOCAB)
    bias[EOS] = 50.0  # EOS certain
    model = with_output_bias(tiny_llama(), bias)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    engine = TransformersEngine(model, eos_id=EOS, pad_id=PAD)
    groups = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=50), seed=0)
    assert all(
        g == Generation(token_ids=[EOS], logprobs=[pytest.approx(0.0, abs=1e-6)], finished=True)
        for grp in groups
        for g in grp
    )
    assert len(calls) == 1  # the prompt pass only: no decoding step after every row finished


def test_max_new_tokens_respected_and_stop_on_eos_off():
    bias = torch.zeros(VOCAB)
    bias[EOS] = 2.5
    engine = TransformersEngine(with_output_bias(tiny_llama(), bias), eos_id=EOS, pad_id=PAD)
    params = SamplingParams(max_new_tokens=7, stop_on_eos=False)
    gens = [g for grp in engine.generate(PROMPTS, 8, params, seed=2) for g in grp]
    assert all(len(g.token_ids) == len(g.logprobs) == 7 and not g.finished for g in gens)
    assert any(EOS in g.token_ids[:-1] for g in gens)  # EOS did not stop the row
    one = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=1), seed=2)
    assert all(len(g.token_ids) == 1 and g.finished == (g.token_ids[0] == EOS) for grp in one for g in grp)


def test_top_p_one_reaches_every_token_of_a_flat_distribution():
    engine = TransformersEngine(with_output_bias(tiny_llama(), torch.zeros(VOCAB), flat=True), eos_id=EOS, pad_id=PAD)
    params = SamplingParams(max_new_tokens=8, stop_on_eos=False)
    gens = [g for grp in engine.generate(PROMPTS, 24, params, seed=0) for g in grp]  # 576 draws
    assert {t for g in gens for t in g.token_ids} == set(range(VOCAB))
    assert all(lp == pytest.approx(-math.log(VOCAB), abs=1e-5) for g in gens for lp in g.logprobs)


def test_small_top_p_keeps_only_the_top_tokens():
    bias = -0.4 * torch.arange(VOCAB, dtype=torch.float32)  # token 0 most likely, then 1, 2, ...
    bias = bias[torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))]
    probs = torch.softmax(bias, dim=0)
    order = probs.argsort(descending=True).tolist()
    top_p = 0.6
    kept, mass = set(), 0.0
    for tok in order:  # smallest most-likely set with mass >= top_p
        kept.add(tok)
        mass += float(probs[tok])
        if mass >= top_p:
            break
    assert 1 < len(kept) < VOCAB
    engine = TransformersEngine(with_output_bias(tiny_llama(), bias, flat=True), eos_id=EOS, pad_id=PAD)
    params = SamplingParams(top_p=top_p, max_new_tokens=8, stop_on_eos=False)
    gens = [g for grp in engine.generate(PROMPTS, 16, params, seed=0) for g in grp]
    assert {t for g in gens for t in g.token_ids} == kept
    log_probs = torch.log(probs)
    # Reported log-probs are those of the untruncated distribution.
    assert all(
        lp == pytest.approx(float(log_probs[t]), abs=1e-5)
        for g in gens
        for t, lp in zip(g.token_ids, g.logprobs, strict=True)
    )


def test_sample_top_p_always_keeps_the_most_likely_token():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
    tokens = sample_top_p(probs, 0.05, torch.Generator().manual_seed(0))
    assert tokens.tolist() == [1, 0]


def test_greedy_takes_the_argmax_regardless_of_seed():
    model = tiny_llama()
    engine = TransformersEngine(model, eos_id=EOS, pad_id=PAD)
    params = SamplingParams(temperature=0.0, max_new_tokens=5, stop_on_eos=False)
    a = engine.generate(PROMPTS, 2, params, seed=0)
    b = engine.generate(PROMPTS, 2, params, seed=99)
    assert a == b
    for prompt, grp in zip(PROMPTS, a, strict=True):
        ids = list(prompt)
        for tok in grp[0].token_ids:
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            assert ids[-1] == tok


def test_load_state_dict_changes_outputs():
    model = tiny_llama(0)
    new_model = tiny_llama(7)
    engine = TransformersEngine(model, eos_id=EOS, pad_id=PAD)
    params = SamplingParams(max_new_tokens=6, stop_on_eos=False)
    responses = [[3, 4, 5], [6, 7], [8]]
    before_tokens = engine.generate(PROMPTS, 4, params, seed=1)
    before = engine.score(PROMPTS, responses, temperature=1.0)
    engine.load_state_dict(new_model.state_dict())
    after_tokens = engine.generate(PROMPTS, 4, params, seed=1)
    after = engine.score(PROMPTS, responses, temperature=1.0)
    assert before_tokens != after_tokens
    assert before != after
    for prompt, response, row in zip(PROMPTS, responses, after, strict=True):
        assert row == pytest.approx(reference_logprobs(new_model.eval(), prompt, response, 1.0), abs=1e-5)


def test_invalid_arguments_are_named():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    engine = TransformersEngine(tiny_llama(), eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="prompts"):
        engine.generate([[1], []], 2, SamplingParams(), seed=0)
    with pytest.raises(ValueError, match="n:"):
        engine.generate([[1]], 0, SamplingParams(), seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        TransformersEngine(tiny_llama(), eos_id=EOS, pad_id=PAD, batch_size=0)
