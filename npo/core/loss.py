"""The policy loss over mixed groups: GRPO's clipped surrogate with per-slot behaviour log-probs.

docs/method.md, loss:

    L = -(1/n) sum_i (1/|o_i|) sum_t min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)
    r_it = pi_theta(o_it | x, o_i,<t) / q_i(o_it | x, o_i,<t)

q_i is pi^(t) for on-policy slots and, for the guide slot, pi^(t+Delta) (is_correction on) or pi^(t) (off); the
caller passes q_i as `behaviour_logprobs` (see npo.core.gate). All functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from npo.core.config import GuideShaping, LossAggregation


def _check_same_shape(**tensors: torch.Tensor) -> tuple[int, ...]:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first_name, first = next(iter(shapes.items()))
    for name, shape in shapes.items():
        if shape != first:
            raise ValueError(f"{name}: shape {shape} does not match {first_name}'s {first}")
    return first


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, mode: LossAggregation | str, *, max_len: int | None = None
) -> torch.Tensor:
    """Reduce per-token values (B, T) under a token mask (B, T) to a scalar.

    seq_mean_token_mean:      (1/B') sum_i (1/|o_i|) sum_t v_it    over the B' sequences with |o_i| >= 1
    token_mean:               (1/sum_i |o_i|) sum_i sum_t v_it
    seq_mean_token_sum_norm:  (1/B) sum_i (1/max_len) sum_t v_it   (max_len defaults to T)

    A batch with no valid token reduces to 0 (still connected to the graph, so backward() works and gives zeros).
    """
    mode = LossAggregation(mode)
    m = mask.to(values.dtype)
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))  # (B, T); masked entries may be inf/nan
    if mode is LossAggregation.TOKEN_MEAN:
        return masked.sum() / m.sum().clamp(min=1.0)
    lengths = m.sum(dim=-1)  # (B,)
    if mode is LossAggregation.SEQ_MEAN_TOKEN_MEAN:
        per_seq = masked.sum(dim=-1) / lengths.clamp(min=1.0)  # (B,)
        has_tokens = (lengths > 0).to(values.dtype)
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)
    if values.numel() == 0:
        return values.sum()
    norm = float(max_len if max_len is not None else values.shape[-1])
    if norm <= 0:
        raise ValueError(f"max_len: must be > 0, got {max_len}")
    return (masked.sum(dim=-1) / norm).mean() if values.shape[0] > 0 else masked.sum()


def kl_k1(logp: Any, logq: Any) -> Any:
    """Per-token k1 estimator of KL(p || q) from samples of p:  k1 = log p - log q.

    Shapes: (...) -> (...), or two floats -> a float (AutoNPO's K_hat sums it token by token)."""
    if isinstance(logp, torch.Tensor):
        _check_same_shape(logp=logp, logq=logq)
    return logp - logq


def kl_k3(logp: Any, logq: Any) -> Any:
    """Per-token k3 estimator of KL(p || q) from samples of p:  k3 = q/p - log(q/p) - 1  (>= 0, unbiased, low variance).

    Shapes: (...) -> (...), or two floats -> a float (AutoNPO's K_hat sums it token by token). Computed in log
    space: with d = log q - log p, k3 = exp(d) - d - 1 = expm1(d) - d.
    """
    if isinstance(logp, torch.Tensor):
        _check_same_shape(logp=logp, logq=logq)
    d = logq - logp
    return (torch.expm1(d) if isinstance(d, torch.Tensor) else math.expm1(d)) - d


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v with p = softmax(logits).  Shapes: (..., V) -> (...)."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.special.entr(probs).sum(dim=-1)  # entr(p) = -p log p, and 0 where p = 0


def _checked_inputs(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    is_guide: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
) -> torch.Tensor:
    """policy_loss's shape and range checks; returns is_guide (B,), all False when None."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs: expected shape (B, T), got {tuple(logprobs.shape)}")
    _check_same_shape(logprobs=logprobs, behaviour_logprobs=behaviour_logprobs, mask=mask)
    batch = logprobs.shape[0]
    if advantages.shape != (batch,):
        raise ValueError(f"advantages: expected shape ({batch},), got {tuple(advantages.shape)}")
    if is_guide is None:
        is_guide = torch.zeros(batch, dtype=torch.bool, device=logprobs.device)
    if is_guide.shape != (batch,):
        raise ValueError(f"is_guide: expected shape ({batch},), got {tuple(is_guide.shape)}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low/eps_high: must be >= 0, got {eps_low}/{eps_high}")
    if not torch.isfinite(advantages).all():
        raise ValueError("advantages: contains NaN or infinite values")
    return is_guide


def _ratio_metrics(
    valid: torch.Tensor,
    clipped: torch.Tensor,
    is_guide: torch.Tensor,
    ratio: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
) -> dict[str, float]:
    """Clip fractions (all, on-policy, guide tokens), guide share, approx_kl = mean k3(q, pi_theta) and the mean
    ratio over valid tokens. valid, clipped, ratio, logprobs: (B, T); is_guide: (B,)."""
    guide_tokens = valid & is_guide.unsqueeze(-1)
    onpolicy_tokens = valid & ~is_guide.unsqueeze(-1)
    n_valid = valid.sum().clamp(min=1)
    return {
        "clip_frac": float(clipped.sum() / n_valid),
        "clip_frac_onpolicy": float(clipped[onpolicy_tokens].float().mean()) if onpolicy_tokens.any() else 0.0,
        "clip_frac_guide": float(clipped[guide_tokens].float().mean()) if guide_tokens.any() else 0.0,
        "guide_share": float(is_guide.float().mean()) if is_guide.shape[0] else 0.0,
        "approx_kl": float(torch.where(valid, kl_k3(behaviour_logprobs, logprobs), 0.0).sum() / n_valid),
        "ratio_mean": float(torch.where(valid, ratio, 0.0).sum() / n_valid),
    }


def luffy_terms(logprobs: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """LUFFY's policy-shaped terms -f(p_it) * A_i, f(p) = p / (p + gamma), p = pi_theta(o_it) (no ratio, no clip).

    logprobs, valid: (B, T); adv: (B, 1). Returns (B, T) (padding entries are finite and masked by the caller)."""
    if not gamma > 0:
        raise ValueError(f"shaping_gamma: must be > 0, got {gamma}")
    p = torch.exp(torch.where(valid, logprobs, torch.zeros_like(logprobs)))  # (B, T)
    return -(p / (p + gamma)) * adv


def policy_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    is_guide: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    aggregation: LossAggregation | str = LossAggregation.SEQ_MEAN_TOKEN_MEAN,
    max_len: int | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    guide_shaping: GuideShaping | str = GuideShaping.CLIP,
    shaping_gamma: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate over a batch of (possibly mixed) group slots.

        r_it   = exp(log pi_theta(o_it) - log q_i(o_it))
        l_it   = -min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)
        L      = aggregate(l) - entropy_coef * aggregate(H) + kl_coef * aggregate(k3(pi_theta, pi_ref))

    guide_shaping luffy: guide slots' l_it = -f(p_it) A_i instead, p = pi_theta(o_it), f(p) = p / (p + gamma).

    Args:
        logprobs: (B, T) log pi_theta of the response tokens (with grad).
        behaviour_logprobs: (B, T) log q_i of the same tokens (no grad needed; detached here).
        advantages: (B,) one advantage per sequence (group-relative, see npo.core.advantages).
        mask: (B, T) 1 for response tokens, 0 for padding.
        is_guide: (B,) bool, True for guide slots (for the split metrics); None = no guide.
        eps_low, eps_high: clip range.
        aggregation: see `aggregate`.
        max_len: constant normaliser of seq_mean_token_sum_norm.
        entropy: (B, T) per-token policy entropy, required when entropy_coef > 0.
        ref_logprobs: (B, T) reference policy log-probs, required when kl_coef > 0.
        guide_shaping, shaping_gamma: clip (the surrogate for every slot) or luffy (f(p) for guides), gamma > 0.
    Returns:
        (loss scalar, metrics) with metrics: pg_loss, clip_frac, clip_frac_onpolicy, clip_frac_guide, guide_share
        (fraction of sequences that are guides), approx_kl (mean k3 of KL(q || pi_theta) over valid tokens),
        ratio_mean, and entropy / ref_kl when given.
    """
    is_guide = _checked_inputs(logprobs, behaviour_logprobs, advantages, mask, is_guide, eps_low, eps_high)
    valid = mask.bool()  # (B, T)
    log_ratio = torch.where(valid, logprobs - behaviour_logprobs.detach(), torch.zeros_like(logprobs))  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)  # (B, 1)
    surr_unclipped = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(surr_unclipped, surr_clipped)  # (B, T)
    shaped = is_guide.unsqueeze(-1) & valid if GuideShaping(guide_shaping) is GuideShaping.LUFFY else None  # (B, T)
    if shaped is not None:
        per_token = torch.where(shaped, luffy_terms(logprobs, adv, valid, shaping_gamma), per_token)
    pg_loss = aggregate(per_token, valid, aggregation, max_len=max_len)
    loss = pg_loss

    with torch.no_grad():
        clipped = (surr_clipped < surr_unclipped) & valid & (True if shaped is None else ~shaped)  # shaped: never
        metrics = _ratio_metrics(valid, clipped, is_guide, ratio, behaviour_logprobs, logprobs)

    if entropy_coef > 0.0:
        if entropy is None:
            raise ValueError("entropy: required when entropy_coef > 0")
        _check_same_shape(logprobs=logprobs, entropy=entropy)
        loss = loss - entropy_coef * aggregate(entropy, valid, aggregation, max_len=max_len)
    if entropy is not None:
        metrics["entropy"] = float(torch.where(valid, entropy.detach(), 0.0).sum() / valid.sum().clamp(min=1))
    if kl_coef > 0.0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs: required when kl_coef > 0")
        _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
        zeros = torch.zeros_like(logprobs)
        ref_kl = kl_k3(torch.where(valid, logprobs, zeros), torch.where(valid, ref_logprobs.detach(), zeros))  # (B, T)
        loss = loss + kl_coef * aggregate(ref_kl, valid, aggregation, max_len=max_len)
        metrics["ref_kl"] = float(torch.where(valid, ref_kl.detach(), 0.0).sum() / valid.sum().clamp(min=1))
    metrics["pg_loss"] = float(pg_loss.detach())
    return loss, metrics
