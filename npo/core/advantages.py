"""Group-relative advantages (GRPO) over a possibly mixed group (docs/method.md: group advantages)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, *, scale_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages for G groups of n samples each.

        A_i = (R_i - mean_j R_j) / (std_j R_j + eps)     (scale_std=True)
        A_i =  R_i - mean_j R_j                          (scale_std=False)

    mean and std are over the whole group, the guide slot included when the group is mixed (NPO counts the guide in
    the group statistics). std is the population std (divisor n). A group whose rewards are all equal carries no
    signal and gets A_i = 0 exactly; the result is never NaN.

    Args:
        rewards: (G, n) float rewards; must be finite.
        scale_std: divide by the group's std.
        eps: added to the std before dividing (>= 0).
    Returns:
        (G, n) advantages, same dtype as `rewards` (float32 if rewards are integers).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected shape (G, n), got {tuple(rewards.shape)}")
    if rewards.shape[1] < 1:
        raise ValueError("rewards: groups must have at least one sample")
    if eps < 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards: contains NaN or infinite values")
    mean = rewards.mean(dim=1, keepdim=True)  # (G, 1)
    centred = rewards - mean  # (G, n)
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # (G, 1): no signal in this group
    if scale_std:
        std = rewards.std(dim=1, unbiased=False, keepdim=True)  # (G, 1)
        centred = centred / torch.where(constant, torch.ones_like(std), std + eps)
    return torch.where(constant, torch.zeros_like(centred), centred)


def pass_rates(rewards: torch.Tensor, correct_threshold: float = 1.0) -> torch.Tensor:
    """p_hat(x) = fraction of the group with reward >= correct_threshold.

    Args:
        rewards: (G, n) rewards.
    Returns:
        (G,) pass rates in [0, 1].
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected shape (G, n), got {tuple(rewards.shape)}")
    if rewards.is_floating_point() and not torch.isfinite(rewards).all():
        raise ValueError("rewards: contains NaN or infinite values")
    return (rewards >= correct_threshold).float().mean(dim=1)
