"""The embedded learner: one optimizer step per training step over the (possibly mixed) groups.

    rewards (G, n) -> group advantages -> rows (prompt + response, behaviour log-probs, A_i, is_guide)
    -> micro-batches: token_logprobs (with grad) -> policy_loss * micro-batch weight -> backward
    -> clip grad norm -> AdamW step (refused when the loss or the gradient norm is not finite)

Micro-batch weights make the accumulated gradient equal to the full-batch loss's gradient for every aggregation
mode (each micro-batch's loss is its share of the global reduction's denominator).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from npo.core.advantages import group_advantages
from npo.core.config import AlgoConfig, LossAggregation
from npo.core.gate import MixedGroup
from npo.core.loss import policy_loss
from npo.runtime.batch import build_batch, scatter_responses, token_logprobs

# ----------------------------------------------------------------------------------------------------------------
# The step's maths, engine-independent: TorchLearner and services/learner's DeepSpeedLearner share it.


@dataclass(frozen=True)
class TrainingRow:
    """One slot of one group, ready to be batched."""

    prompt_ids: list[int]
    """Prompt token ids."""
    response_ids: list[int]
    """Response token ids (on-policy sample or guide)."""
    behaviour_logprobs: list[float]
    """q_i per response token: the denominator of the importance ratio."""
    advantage: float
    """A_i, the group-relative advantage of the slot."""
    is_guide: bool
    """True for a guide slot."""


def training_rows(
    groups: Sequence[MixedGroup], prompt_ids: Mapping[str, list[int]], algo: AlgoConfig
) -> list[TrainingRow]:
    """One row per slot, groups in order: A = group_advantages(rewards (G, n)) with the algo's std scaling."""
    if not groups:
        raise ValueError("groups: need at least one group")
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)  # (G, n)
    adv = group_advantages(rewards, scale_std=algo.scale_std, eps=algo.adv_eps)  # (G, n)
    return [
        TrainingRow(prompt_ids[g.prompt_id], s.response_ids, g.behaviour_logprobs[i], float(adv[gi, i]), g.is_guide[i])
        for gi, g in enumerate(groups)
        for i, s in enumerate(g.samples)
    ]


def micro_batches(
    rows: Sequence[TrainingRow], micro_batch_size: int, mode: LossAggregation
) -> list[tuple[list[TrainingRow], float]]:
    """Split rows into consecutive micro-batches with weights w_k such that sum_k w_k L_k equals the loss of the
    whole batch under `mode`:

        token_mean                w_k = tokens in k / tokens in the batch
        seq_mean_token_mean       w_k = non-empty responses in k / non-empty responses in the batch
        seq_mean_token_sum_norm   w_k = rows in k / rows in the batch
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
    lengths = [len(r.response_ids) for r in rows]
    total_tokens = max(sum(lengths), 1)
    total_seqs = max(sum(1 for n in lengths if n > 0), 1)
    out = []
    for lo in range(0, len(rows), micro_batch_size):
        chunk = list(rows[lo : lo + micro_batch_size])
        chunk_lengths = lengths[lo : lo + micro_batch_size]
        if mode is LossAggregation.TOKEN_MEAN:
            weight = sum(chunk_lengths) / total_tokens
        elif mode is LossAggregation.SEQ_MEAN_TOKEN_MEAN:
            weight = sum(1 for n in chunk_lengths if n > 0) / total_seqs
        else:
            weight = len(chunk) / len(rows)
        out.append((chunk, weight))
    return out


@dataclass
class MicroBatchLoss:
    """The loss of one micro-batch and what the step's metrics need from it."""

    loss: torch.Tensor
    """Scalar with grad: policy_loss of the micro-batch (not yet multiplied by its weight)."""
    metrics: dict[str, float]
    """policy_loss's metrics for this micro-batch."""
    entropy_sum: float
    """Sum of the per-token entropy over on-policy response tokens."""
    entropy_tokens: int
    """Number of on-policy response tokens."""


def micro_batch_loss(
    model: torch.nn.Module,
    rows: Sequence[TrainingRow],
    *,
    pad_id: int,
    algo: AlgoConfig,
    temperature: float,
    max_len: int | None,
    autocast: bool = False,
    reference: torch.nn.Module | None = None,
) -> MicroBatchLoss:
    """Teacher-forced log-probs of the rows under `model` (with grad) and the clipped surrogate over them.

    The batch (B rows, width T) is built on the model's device; logprobs, entropy, behaviour log-probs (B, T - 1),
    advantages and is_guide (B,) go to npo.core.loss.policy_loss with the algo's clip range, aggregation and
    entropy/KL terms. `autocast` runs the policy forward in bfloat16 autocast; the reference model (KL term) runs
    without grad and without autocast.
    """
    device = next(model.parameters()).device
    batch = build_batch([r.prompt_ids for r in rows], [r.response_ids for r in rows], pad_id).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logprobs, entropy = token_logprobs(model, batch, temperature=temperature, with_entropy=True)  # (B, T - 1)
    behaviour = scatter_responses([r.behaviour_logprobs for r in rows], batch)  # (B, T - 1)
    advantages = torch.tensor([r.advantage for r in rows], dtype=torch.float32, device=device)  # (B,)
    is_guide = torch.tensor([r.is_guide for r in rows], dtype=torch.bool, device=device)  # (B,)
    ref = None
    if reference is not None:
        with torch.no_grad():
            ref, _ = token_logprobs(reference, batch, temperature=temperature)  # (B, T - 1)
    loss, metrics = policy_loss(
        logprobs,
        behaviour,
        advantages,
        batch.response_mask,
        is_guide=is_guide,
        eps_low=algo.eps_low,
        eps_high=algo.eps_high,
        aggregation=LossAggregation(algo.loss_aggregation),
        max_len=max_len,
        entropy=entropy,
        entropy_coef=algo.entropy_coef,
        ref_logprobs=ref,
        kl_coef=algo.kl_coef,
        guide_shaping=algo.guide_shaping,
        shaping_gamma=algo.shaping_gamma,
    )
    onpolicy = batch.response_mask.bool() & ~is_guide.unsqueeze(-1)  # (B, T - 1)
    return MicroBatchLoss(loss, metrics, float(entropy.detach()[onpolicy].sum()), int(onpolicy.sum()))


@dataclass
class Accumulated:
    """One step's micro-batches after their backward passes: what the step's metrics need."""

    weighted: dict[str, float]
    """sum_k w_k * metric_k of policy_loss's metrics (entropy excepted): the full batch's values."""
    entropy_sum: float
    """Sum of the per-token entropy over on-policy response tokens."""
    entropy_tokens: int
    """Number of on-policy response tokens."""
    loss: float = 0.0
    """sum_k w_k * L_k: the full batch's loss (entropy and KL terms included), the value backpropagated."""


def step_metrics(
    acc: Accumulated, grad_norm: float, groups: Sequence[MixedGroup], seconds: float, nonfinite_skipped: int = 0
) -> dict[str, float]:
    """The learner's metrics row: weighted sums of the micro-batch metrics (= full-batch values), on-policy token
    entropy, pre-clip gradient norm, guide slots used and wall time; the same keys for every learner engine. Once a
    step was refused for a non-finite loss or gradient norm, `nonfinite_skipped` counts them (absent before)."""
    weighted = acc.weighted
    extra = {"nonfinite_skipped": nonfinite_skipped} if nonfinite_skipped else {}
    return {
        "loss": weighted.get("pg_loss", 0.0),
        "clip_frac": weighted.get("clip_frac", 0.0),
        "clip_frac_guide": weighted.get("clip_frac_guide", 0.0),
        "approx_kl": weighted.get("approx_kl", 0.0),
        "entropy": acc.entropy_sum / max(acc.entropy_tokens, 1),
        "grad_norm": float(grad_norm),
        "guide_slots": int(sum(g.guides for g in groups)),
        "train_seconds": seconds,
        **extra,
    }


def load_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Load an HF safetensors folder's weights into `model` in place (tied weights may be absent from the file)."""
    state = load_file(str(Path(folder) / "model.safetensors"))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        tied |= {"lm_head.weight"}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {folder}: weights do not match the model (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )


class MicroBatchLearner:
    """What every learner engine shares: the step's settings, AdamW over the model's parameters, the frozen reference
    model of the KL term (kl_coef > 0), and the micro-batch accumulation of one step (`accumulate`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_id: int,
        algo: AlgoConfig,
        lr: float,
        betas: Sequence[float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        micro_batch_size: int = 256,
        dtype: str = "float32",
        temperature: float = 1.0,
        max_len: int | None = None,
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.algo = algo
        self.grad_clip = grad_clip
        self.micro_batch_size = micro_batch_size
        self.autocast = dtype == "bfloat16"
        self.temperature = temperature
        self.max_len = max_len
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=(float(betas[0]), float(betas[1])), weight_decay=weight_decay
        )
        self.nonfinite_skipped = 0
        """Optimizer steps refused so far for a non-finite loss or gradient norm (kept in checkpoints)."""
        self.reference = None
        if algo.kl_coef > 0:
            self.reference = copy.deepcopy(model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)

    def accumulate(
        self,
        forward: torch.nn.Module,
        groups: Sequence[MixedGroup],
        prompt_ids: Mapping[str, list[int]],
        backward: Callable[[torch.Tensor], None],
        begin: Callable[[bool], None] | None = None,
    ) -> Accumulated:
        """Gradients of the whole batch's loss, micro-batch by micro-batch: for k = 1..K, begin(k == K) (the engine's
        accumulation boundary), L_k = micro_batch_loss under `forward`, backward(w_k * L_k)."""
        rows = training_rows(groups, prompt_ids, self.algo)
        chunks = micro_batches(rows, self.micro_batch_size, LossAggregation(self.algo.loss_aggregation))
        acc = Accumulated({}, 0.0, 0)
        for index, (chunk, weight) in enumerate(chunks):
            if begin is not None:
                begin(index == len(chunks) - 1)
            part = micro_batch_loss(
                forward,
                chunk,
                pad_id=self.pad_id,
                algo=self.algo,
                temperature=self.temperature,
                max_len=self.max_len,
                autocast=self.autocast,
                reference=self.reference,
            )
            backward(part.loss * weight)
            acc.loss += float(part.loss.detach()) * weight
            for key, value in part.metrics.items():
                if key != "entropy":
                    acc.weighted[key] = acc.weighted.get(key, 0.0) + value * weight
            acc.entropy_sum += part.entropy_sum
            acc.entropy_tokens += part.entropy_tokens
        return acc

    def refuses(self, loss: float, grad_norm: float) -> bool:
        """True, counting it in `nonfinite_skipped`, when the step's loss or gradient norm is NaN or infinite: the
        optimizer step must then be skipped (the weights and the optimizer state stay as they are)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return False
        self.nonfinite_skipped += 1
        return True

    def skip_counter_state(self) -> dict:
        """The refused-step counter as checkpoint state (nothing while it is 0, so older checkpoints read the same)."""
        return {"nonfinite_skipped": self.nonfinite_skipped} if self.nonfinite_skipped else {}

    def load_skip_counter(self, state: Mapping) -> None:
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))


class TorchLearner(MicroBatchLearner):
    """Plain-torch learner: AdamW, gradient clipping, micro-batches with accumulation, fp32 or bf16 autocast. A step
    whose loss or gradient norm is not finite is refused (no optimizer step; `nonfinite_skipped` counts it)."""

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), **self.skip_counter_state()}

    def load_state_dict(self, state: Mapping) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_skip_counter(state)

    def train_step(self, groups: Sequence[MixedGroup], prompt_ids: Mapping[str, list[int]]) -> dict[str, float]:
        """One optimizer step on G mixed groups; returns metrics (loss, clip fractions, entropy, grad_norm, ...)."""
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        acc = self.accumulate(self.model, groups, prompt_ids, backward=lambda loss: loss.backward())
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if not self.refuses(acc.loss, grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_metrics(acc, grad_norm, groups, time.perf_counter() - start, self.nonfinite_skipped)
