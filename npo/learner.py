"""The embedded learner: one optimizer step per training step over the (possibly mixed) groups.

    rewards (G, n) -> group advantages -> rows (prompt + response, behaviour log-probs, A_i, is_guide)
    -> micro-batches: token_logprobs (with grad) -> policy_loss * micro-batch weight -> backward
    -> clip grad norm -> AdamW step

Micro-batch weights make the accumulated gradient equal to the full-batch loss's gradient for every aggregation
mode (each micro-batch's loss is its share of the global reduction's denominator).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from npo.advantages import group_advantages
from npo.config import AlgoConfig, LossAggregation
from npo.gate import MixedGroup
from npo.loss import policy_loss
from npo.rollout import build_batch, scatter_responses, token_logprobs


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


class TorchLearner:
    """Plain-torch learner: AdamW, gradient clipping, micro-batches with accumulation, fp32 or bf16 autocast."""

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
        self.reference = None
        if algo.kl_coef > 0:
            self.reference = copy.deepcopy(model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def train_step(self, groups: Sequence[MixedGroup], prompt_ids: Mapping[str, list[int]]) -> dict[str, float]:
        """One optimizer step on G mixed groups; returns metrics (loss, clip fractions, entropy, grad_norm, ...)."""
        start = time.perf_counter()
        if not groups:
            raise ValueError("groups: need at least one group")
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)  # (G, n)
        adv = group_advantages(rewards, scale_std=self.algo.scale_std, eps=self.algo.adv_eps)  # (G, n)
        rows = [
            (prompt_ids[g.prompt_id], s.response_ids, g.behaviour_logprobs[i], float(adv[gi, i]), g.is_guide[i])
            for gi, g in enumerate(groups)
            for i, s in enumerate(g.samples)
        ]
        mode = LossAggregation(self.algo.loss_aggregation)
        lengths = [len(r[1]) for r in rows]
        total_tokens = max(sum(lengths), 1)
        total_seqs = max(sum(1 for n in lengths if n > 0), 1)

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        entropy_sum, entropy_tokens = 0.0, 0
        for lo in range(0, len(rows), self.micro_batch_size):
            chunk = rows[lo : lo + self.micro_batch_size]
            batch = build_batch([r[0] for r in chunk], [r[1] for r in chunk], self.pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                logprobs, entropy = token_logprobs(self.model, batch, temperature=self.temperature, with_entropy=True)
            behaviour = scatter_responses([r[2] for r in chunk], batch)  # (b, T - 1)
            advantages = torch.tensor([r[3] for r in chunk], dtype=torch.float32)  # (b,)
            is_guide = torch.tensor([r[4] for r in chunk], dtype=torch.bool)  # (b,)
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref, _ = token_logprobs(self.reference, batch, temperature=self.temperature)
            chunk_lengths = [len(r[1]) for r in chunk]
            if mode is LossAggregation.TOKEN_MEAN:
                weight = sum(chunk_lengths) / total_tokens
            elif mode is LossAggregation.SEQ_MEAN_TOKEN_MEAN:
                weight = sum(1 for n in chunk_lengths if n > 0) / total_seqs
            else:
                weight = len(chunk) / len(rows)
            loss, metrics = policy_loss(
                logprobs,
                behaviour,
                advantages,
                batch.response_mask,
                is_guide=is_guide,
                eps_low=self.algo.eps_low,
                eps_high=self.algo.eps_high,
                aggregation=mode,
                max_len=self.max_len,
                entropy=entropy,
                entropy_coef=self.algo.entropy_coef,
                ref_logprobs=ref,
                kl_coef=self.algo.kl_coef,
            )
            (loss * weight).backward()
            for key, value in metrics.items():
                if key != "entropy":
                    sums[key] = sums.get(key, 0.0) + value * weight
            onpolicy = batch.response_mask.bool() & ~is_guide.unsqueeze(-1)
            entropy_sum += float(entropy.detach()[onpolicy].sum())
            entropy_tokens += int(onpolicy.sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.grad_clip if self.grad_clip > 0 else float("inf")
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": sums.get("pg_loss", 0.0),
            "clip_frac": sums.get("clip_frac", 0.0),
            "clip_frac_guide": sums.get("clip_frac_guide", 0.0),
            "approx_kl": sums.get("approx_kl", 0.0),
            "entropy": entropy_sum / max(entropy_tokens, 1),
            "grad_norm": float(grad_norm),
            "guide_slots": int(sum(g.replaced for g in groups)),
            "train_seconds": time.perf_counter() - start,
        }
