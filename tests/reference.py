"""Slow, loop-based reference implementations of the method's maths, for testing the vectorised code (and, at
the end, the small fixtures several test modules share).

Plain Python floats and explicit loops over groups, sequences and tokens, written straight from
docs/method.md (advantages, loss) without torch, so that a mistake in a vectorised expression cannot be repeated here.
Inputs are nested lists; `mask` entries are truthy for valid tokens.
"""

from __future__ import annotations

import math

SEQ_MEAN_TOKEN_MEAN = "seq_mean_token_mean"
TOKEN_MEAN = "token_mean"
SEQ_MEAN_TOKEN_SUM_NORM = "seq_mean_token_sum_norm"


def group_advantages_ref(rewards: list[list[float]], scale_std: bool = True, eps: float = 1e-6) -> list[list[float]]:
    """A_i = (R_i - mean) / (std + eps) (or R_i - mean), population std; a group of equal rewards gets zeros."""
    out = []
    for group in rewards:
        n = len(group)
        if all(r == group[0] for r in group):
            out.append([0.0] * n)
            continue
        mean = 0.0
        for r in group:
            mean += r
        mean /= n
        var = 0.0
        for r in group:
            var += (r - mean) ** 2
        std = math.sqrt(var / n)
        row = []
        for r in group:
            row.append((r - mean) / (std + eps) if scale_std else r - mean)
        out.append(row)
    return out


def aggregate_ref(
    values: list[list[float]], mask: list[list[int]], mode: str, max_len: int | None = None, width: int | None = None
) -> float:
    """Reduce per-token values to one number.

    seq_mean_token_mean: mean over sequences with >= 1 valid token of (mean of their valid tokens); 0 if none.
    token_mean: sum of valid tokens / number of valid tokens; 0 if none.
    seq_mean_token_sum_norm: mean over all sequences of (sum of valid tokens / max_len); max_len defaults to the
    padded width T (pass `width` when the batch is empty); 0 for an empty batch.
    """
    if mode == TOKEN_MEAN:
        total, count = 0.0, 0
        for row, row_mask in zip(values, mask, strict=True):
            for v, m in zip(row, row_mask, strict=True):
                if m:
                    total += v
                    count += 1
        return total / count if count else 0.0
    if mode == SEQ_MEAN_TOKEN_MEAN:
        seq_total, n_seqs = 0.0, 0
        for row, row_mask in zip(values, mask, strict=True):
            total, count = 0.0, 0
            for v, m in zip(row, row_mask, strict=True):
                if m:
                    total += v
                    count += 1
            if count:
                seq_total += total / count
                n_seqs += 1
        return seq_total / n_seqs if n_seqs else 0.0
    if mode == SEQ_MEAN_TOKEN_SUM_NORM:
        if not values:
            return 0.0
        norm = max_len if max_len is not None else (width if width is not None else len(values[0]))
        seq_total = 0.0
        for row, row_mask in zip(values, mask, strict=True):
            total = 0.0
            for v, m in zip(row, row_mask, strict=True):
                if m:
                    total += v
            seq_total += total / norm
        return seq_total / len(values)
    raise ValueError(f"mode: unknown aggregation {mode!r}")


def clip_ratio(r: float, eps_low: float, eps_high: float) -> float:
    """clip(r, 1 - eps_low, 1 + eps_high)."""
    return min(max(r, 1.0 - eps_low), 1.0 + eps_high)


def policy_loss_ref(
    logprobs: list[list[float]],
    behaviour_logprobs: list[list[float]],
    advantages: list[float],
    mask: list[list[int]],
    is_guide: list[bool] | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    aggregation: str = SEQ_MEAN_TOKEN_MEAN,
    max_len: int | None = None,
    width: int | None = None,
) -> tuple[float, dict[str, float]]:
    """The clipped surrogate token by token, then `aggregate_ref`; metrics as npo.core.loss.policy_loss reports them.

    r_it = exp(logprobs_it - behaviour_it);  l_it = -min(r_it A_i, clip(r_it) A_i)
    a token is clipped when A_i > 0 and r_it > 1 + eps_high, or A_i < 0 and r_it < 1 - eps_low
    approx_kl = mean over valid tokens of k3(q || pi) = r - 1 - log r
    """
    batch = len(logprobs)
    if is_guide is None:
        is_guide = [False] * batch
    per_token: list[list[float]] = []
    n_valid = n_clipped = 0
    on_valid = on_clipped = guide_valid = guide_clipped = 0
    ratio_sum = kl_sum = 0.0
    for i in range(batch):
        a = advantages[i]
        row = []
        for t in range(len(logprobs[i])):
            if not mask[i][t]:
                row.append(0.0)
                continue
            log_r = logprobs[i][t] - behaviour_logprobs[i][t]
            r = math.exp(log_r)
            row.append(-min(r * a, clip_ratio(r, eps_low, eps_high) * a))
            clipped = (a > 0 and r > 1.0 + eps_high) or (a < 0 and r < 1.0 - eps_low)
            n_valid += 1
            n_clipped += clipped
            if is_guide[i]:
                guide_valid += 1
                guide_clipped += clipped
            else:
                on_valid += 1
                on_clipped += clipped
            ratio_sum += r
            kl_sum += math.expm1(log_r) - log_r
        per_token.append(row)
    loss = aggregate_ref(per_token, mask, aggregation, max_len=max_len, width=width)
    metrics = {
        "pg_loss": loss,
        "clip_frac": n_clipped / n_valid if n_valid else 0.0,
        "clip_frac_onpolicy": on_clipped / on_valid if on_valid else 0.0,
        "clip_frac_guide": guide_clipped / guide_valid if guide_valid else 0.0,
        "guide_share": sum(bool(g) for g in is_guide) / batch if batch else 0.0,
        "approx_kl": kl_sum / n_valid if n_valid else 0.0,
        "ratio_mean": ratio_sum / n_valid if n_valid else 0.0,
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# Shared fixtures (not references): the tiny random Llama several test modules run on, and a tiny training run.

VOCAB = 20
PAD, BOS, EOS = 0, 1, 2

TINY_CHAIN_SUM = [
    "task.name=chain_sum",
    "task.options={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}",
    "task.train_size=60",
    "task.test_size=20",
    "train.prompts_per_step=6",
    "train.lr=3e-4",
    "algo.group_size=4",
    "rollout.max_new_tokens=4",
]
"""Run-config overrides of a tiny chain_sum run (60 train prompts, 6 per step, groups of 4, 4 new tokens)."""

EARLY_BOOTSTRAP_NPO = ["method=npo", "train.steps=5", "npo.early.at_step=1"]
"""A 5-step NPO run whose early bootstrap starts scouting at step 1 (add npo.early.delta)."""

EARLY_BOOTSTRAP_SEGMENTS = [
    (0, "grpo"),
    (1, "scout"),
    (2, "scout"),
    (1, "npo_replay"),
    (2, "npo_replay"),
    (3, "grpo"),
    (4, "grpo"),
    (5, "final"),
]
"""(step, segment) of the metrics rows of EARLY_BOOTSTRAP_NPO with npo.early.delta=2: scout 1-2, roll back to 1,
replay 1-2 with NPO, continue."""


def tiny_llama(seed: int = 0, max_positions: int = 64):
    """A random 2-layer Llama (vocab 20, hidden 32), float32, on the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).float()


GROUP_PROMPTS = {"a": [BOS, 5, 6, 7], "b": [BOS, 9], "c": [BOS, 3, 4, 10, 11]}
"""Prompt token ids of mixed_groups' three prompts."""


def scored_samples(model, prompt_id: str, responses: list[list[int]], rewards: list[float], shift: float) -> list:
    """Samples whose behaviour log-probs are the model's own plus `shift` (importance ratios away from 1)."""
    import torch

    from npo.core.types import Sample
    from npo.runtime.batch import build_batch, gather_responses, token_logprobs

    batch = build_batch([GROUP_PROMPTS[prompt_id]] * len(responses), responses, PAD)
    with torch.no_grad():
        logprobs, _ = token_logprobs(model, batch)
    rows = gather_responses(logprobs, batch)
    return [Sample(prompt_id, r, [v + shift for v in lp], reward=w) for r, lp, w in zip(responses, rows, rewards)]


def mixed_groups(model, seed: int, tau_gate: float = 0.6) -> list:
    """Three NPO groups of 4 scored under `model`: 'a' all wrong (gated: its last slot becomes the guide), 'b' half
    right, 'c' all right (above the gate: its guide is not inserted). Responses are random strings of 1-6 tokens."""
    import torch

    from npo.core.gate import build_mixed_groups

    gen = torch.Generator().manual_seed(seed)

    def response() -> list[int]:
        n = int(torch.randint(1, 7, (1,), generator=gen))
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    rewards = {"a": [0.0, 0.0, 0.0, 0.0], "b": [1.0, 0.0, 1.0, 0.0], "c": [1.0, 1.0, 1.0, 1.0]}
    groups = [scored_samples(model, p, [response() for _ in range(4)], rewards[p], -0.05) for p in GROUP_PROMPTS]
    guides = {p: scored_samples(model, p, [response() + [EOS]], [1.0], -0.3)[0] for p in ("a", "c")}
    return build_mixed_groups(groups, guides, tau_gate=tau_gate, correct_threshold=1.0, is_correction=True)
