"""The embedded rollout engine (TransformersEngine) and the RolloutEngine Protocol.

The engine knows nothing about tokenization: it takes and returns token id sequences. It samples with its own
loop over a KV cache (not transformers' `generate`, whose default top-k of 50 would make the recorded behaviour
log-probs differ from the distribution actually sampled), so the log-probs it returns are exactly those of the
temperature-scaled distribution the sampler drew from. Batch layout: npo.runtime.batch. SamplingParams (the
`rollout:` section) is defined in npo.core.config, without torch, and imported here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from npo.core.config import SamplingParams
from npo.runtime.batch import (
    accepts,
    build_batch,
    eval_mode,
    gather_responses,
    left_pad,
    position_ids_from_mask,
    token_logprobs,
)


@dataclass
class Generation:
    """One sampled response."""

    token_ids: list[int]
    """Generated token ids, including the EOS when the response finished."""
    logprobs: list[float]
    """One per token: log of the temperature-scaled sampling distribution softmax(logits / T) at the token, taken
    BEFORE top-p truncation (equal to the sampler's log-prob when top_p = 1; with top_p < 1 the truncated
    distribution's log-prob is this plus -log(kept mass)). With temperature 0 (greedy) it is of softmax(logits)."""
    finished: bool
    """True when the response ended with EOS within max_new_tokens."""


# ----------------------------------------------------------------------------------------------------------------
# The engine.


class RolloutEngine(Protocol):
    """An inference engine holding one policy version (embedded: TransformersEngine; production: vLLM)."""

    def generate(
        self, prompts: list[list[int]], n: int, params: SamplingParams, *, seed: int
    ) -> list[list[Generation]]:
        """n generations per prompt, in prompt order; the same call with the same seed gives the same tokens."""
        ...

    def score(self, prompts: list[list[int]], responses: list[list[int]], *, temperature: float) -> list[list[float]]:
        """Teacher-forced log pi(token | prefix) of every response token under softmax(logits / temperature)."""
        ...

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the policy weights (weight sync from the learner)."""
        ...


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per row from probs (B, V), restricted to the smallest top set of mass >= top_p (the most
    likely token is always kept).  Returns (B,) long."""
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V): mass of strictly more likely tokens
    sorted_probs = torch.where(mass_before < top_p, sorted_probs, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1), multinomial renormalises
    return order.gather(-1, choice).squeeze(-1)


class TransformersEngine:
    """RolloutEngine over a transformers causal LM, sampling with its own KV-cache loop (no hidden top-k)."""

    def __init__(
        self, model: torch.nn.Module, *, eos_id: int | Iterable[int], pad_id: int, batch_size: int = 512
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.model = model
        self.eos_ids = [eos_id] if isinstance(eos_id, int) else [int(e) for e in eos_id]
        if not self.eos_ids:
            raise ValueError("eos_id: needs at least one token id")
        self.pad_id = pad_id
        self.batch_size = batch_size
        self._cache_arg = "cache" if accepts(model, "cache") else "past_key_values"
        self._keep_arg = accepts(model, "logits_to_keep")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy the given weights into the model (strict: every key must match)."""
        self.model.load_state_dict(state_dict)

    def generate(
        self, prompts: list[list[int]], n: int, params: SamplingParams, *, seed: int
    ) -> list[list[Generation]]:
        """Sample n responses per prompt; returns one list of n Generations per prompt, in order.

        Rows (prompt-major, B * n of them) run in chunks of batch_size from one torch.Generator seeded with
        `seed`, so the same call is bit-reproducible and torch's global RNG is not touched.
        """
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompts: prompt {i} is empty (needs at least one token)")
        params.validate()
        rows = [prompt for prompt in prompts for _ in range(n)]
        generator = torch.Generator(device=self.device).manual_seed(seed)
        results: list[Generation] = []
        with eval_mode(self.model), torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                results.extend(self._generate_chunk(rows[start : start + self.batch_size], params, generator))
        return [results[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _forward_last(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any):
        """One forward pass; returns float32 logits of the last position (B, V) and the updated cache."""
        kwargs: dict[str, Any] = {self._cache_arg: cache, "use_cache": True}
        if self._keep_arg:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[:, -1].float(), new_cache

    def _generate_chunk(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> list[Generation]:
        device = self.device
        ids, mask = left_pad(prompts, self.pad_id)  # (B, P)
        ids, mask = ids.to(device), mask.to(device)
        positions = position_ids_from_mask(mask)  # (B, P)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        batch_size = ids.shape[0]
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)  # (B,)
        tokens, logprobs, active = [], [], []
        logits, cache = self._forward_last(ids, mask, positions, None)  # (B, V)
        next_position = positions[:, -1:] + 1  # (B, 1)
        for step in range(params.max_new_tokens):
            if params.temperature > 0.0:
                log_dist = torch.log_softmax(logits / params.temperature, dim=-1)  # (B, V)
                token = sample_top_p(log_dist.exp(), params.top_p, generator)  # (B,)
            else:
                log_dist = torch.log_softmax(logits, dim=-1)  # (B, V)
                token = logits.argmax(dim=-1)  # (B,)
            token = torch.where(finished, self.pad_id, token)
            active.append(~finished)
            tokens.append(token)
            logprobs.append(log_dist.gather(-1, token.unsqueeze(-1)).squeeze(-1))
            if params.stop_on_eos:
                finished = finished | torch.isin(token, eos)
            if step + 1 == params.max_new_tokens or bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones((batch_size, 1), dtype=mask.dtype, device=device)], dim=1)
            logits, cache = self._forward_last(token.unsqueeze(-1), mask, next_position, cache)
            next_position = next_position + 1
        token_rows = torch.stack(tokens, dim=1).tolist()  # (B, L)
        logprob_rows = torch.stack(logprobs, dim=1).tolist()  # (B, L)
        lengths = torch.stack(active, dim=1).sum(dim=1).tolist()  # (B,)
        done = finished.tolist()
        return [
            Generation(token_ids=token_rows[b][: lengths[b]], logprobs=logprob_rows[b][: lengths[b]], finished=done[b])
            for b in range(batch_size)
        ]

    def score(self, prompts: list[list[int]], responses: list[list[int]], *, temperature: float) -> list[list[float]]:
        """Teacher-forced log pi(response token | prompt, earlier response tokens) under softmax(logits / T), one
        list per response (empty for an empty response), in chunks of batch_size rows."""
        if len(prompts) != len(responses):
            raise ValueError(f"responses: expected one per prompt ({len(prompts)}), got {len(responses)}")
        out: list[list[float]] = []
        with eval_mode(self.model), torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                end = start + self.batch_size
                batch = build_batch(prompts[start:end], responses[start:end], self.pad_id)
                logprobs, _ = token_logprobs(self.model, batch, temperature=temperature)
                out.extend(gather_responses(logprobs, batch))
        return out
