"""Teacher-forced batch maths shared by the rollout engine and the learner.

The engine knows nothing about tokenization: it takes and returns token id sequences. It samples with its own
loop over a KV cache (not transformers' `generate`, whose default top-k of 50 would make the recorded behaviour
log-probs differ from the distribution actually sampled), so the log-probs it returns are exactly those of the
temperature-scaled distribution the sampler drew from.

Layout of a teacher-forced batch (`build_batch`), prompt width P, response width R, T = P + R:

    input_ids      [pad pad p0 p1 p2 | r0 r1 r2 pad]     prompts left-padded, responses right-padded
    position_ids   [ 0   0  0  1  2  |  3  4  5  5 ]     cumsum(attention_mask) - 1, clamped at 0
    response_mask  [ 0   0  0  0  1  |  1  1  0 ]        (T - 1 entries) position t predicts a response token
    targets        [ 0   0 p1 p2 r0  | r1 r2 pad]        input_ids[:, 1:]

The sampler left-pads prompts the same way and uses the same position ids, so `token_logprobs` on a batch built
from its outputs reproduces the sampler's log-probs up to floating-point rounding.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Batch:
    """A teacher-forced batch of prompt + response rows (see the module docstring for the layout)."""

    input_ids: torch.Tensor
    """(B, T) long: left-padded prompt followed by right-padded response."""
    attention_mask: torch.Tensor
    """(B, T) long: 1 on prompt and response tokens, 0 on padding."""
    position_ids: torch.Tensor
    """(B, T) long: cumsum(attention_mask) - 1, clamped at 0."""
    response_mask: torch.Tensor
    """(B, T - 1) long: 1 where the NEXT token (targets[:, t]) is a response token."""
    targets: torch.Tensor
    """(B, T - 1) long: input_ids[:, 1:], the token predicted at each position."""
    response_lengths: list[int] = field(default_factory=list)
    """Number of response tokens of each row."""
    prompt_width: int = 1
    """P, the padded prompt width: response_mask is 0 before column P - 1, so token_logprobs runs the LM head only
    on the last T - P + 1 positions (the default 1 computes every position)."""

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on `device`."""
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            response_mask=self.response_mask.to(device),
            targets=self.targets.to(device),
            response_lengths=list(self.response_lengths),
            prompt_width=self.prompt_width,
        )


# ----------------------------------------------------------------------------------------------------------------
# Batch helpers (pure).


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token sequences to a common length.

    Returns ids (B, T) long and mask (B, T) long (1 on real tokens), T = the longest sequence (0 for no tokens).
    """
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions of the tokens of a padded batch: cumsum(mask) - 1 clamped at 0.  (B, T) -> (B, T) long."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def build_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> Batch:
    """Teacher-forced batch of prompt + response rows: prompts left-padded to width P, responses right-padded
    to width R, T = P + R. Every prompt needs at least one token; responses may be empty.

    Returns a Batch with input_ids, attention_mask, position_ids (B, T) and response_mask, targets (B, T - 1).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"response_ids: expected one response per prompt ({len(prompt_ids)}), got {len(response_ids)}")
    if not prompt_ids:
        raise ValueError("prompt_ids: needs at least one row")
    for row, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt_ids: prompt {row} is empty (needs at least one token)")
    prompt_part, prompt_mask = left_pad(prompt_ids, pad_id)  # (B, P)
    batch_size, prompt_width = prompt_part.shape
    response_width = max((len(r) for r in response_ids), default=0)
    response_part = torch.full((batch_size, response_width), pad_id, dtype=torch.long)  # (B, R)
    response_valid = torch.zeros((batch_size, response_width), dtype=torch.long)  # (B, R)
    for row, response in enumerate(response_ids):
        if response:
            response_part[row, : len(response)] = torch.as_tensor(response, dtype=torch.long)
            response_valid[row, : len(response)] = 1
    input_ids = torch.cat([prompt_part, response_part], dim=1)  # (B, T)
    attention_mask = torch.cat([prompt_mask, response_valid], dim=1)  # (B, T)
    # Position t predicts token t + 1; response token j sits at P + j, so it is predicted at P - 1 + j.
    response_mask = torch.cat([torch.zeros((batch_size, prompt_width - 1), dtype=torch.long), response_valid], 1)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        response_mask=response_mask,  # (B, T - 1)
        targets=input_ids[:, 1:].clone(),  # (B, T - 1)
        response_lengths=[len(r) for r in response_ids],
        prompt_width=prompt_width,
    )


def scatter_responses(values: Sequence[Sequence[float]], batch: Batch, fill: float = 0.0) -> torch.Tensor:
    """Place per-response values (one list per row, one value per response token, e.g. behaviour log-probs) at
    the batch's response positions.  Returns (B, T - 1) float32, `fill` elsewhere."""
    if len(values) != batch.response_mask.shape[0]:
        raise ValueError(f"values: expected {batch.response_mask.shape[0]} rows, got {len(values)}")
    for row, (vals, length) in enumerate(zip(values, batch.response_lengths, strict=True)):
        if len(vals) != length:
            raise ValueError(f"values: row {row} has {len(vals)} values for {length} response tokens")
    out = torch.full(batch.response_mask.shape, fill, dtype=torch.float32)  # (B, T - 1)
    flat = [float(v) for vals in values for v in vals]
    out[batch.response_mask.cpu().bool()] = torch.tensor(flat, dtype=torch.float32)
    return out.to(batch.response_mask.device)


def gather_responses(values: torch.Tensor, batch: Batch) -> list[list[float]]:
    """Inverse of scatter_responses: the values (B, T - 1) at each row's response positions, as lists."""
    rows = values.detach().float().cpu()
    mask = batch.response_mask.cpu().bool()
    return [rows[row][mask[row]].tolist() for row in range(rows.shape[0])]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """model.eval() inside the block; the previous train/eval mode is restored after (the learner may share the
    model object with the engine)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def token_logprobs(
    model: torch.nn.Module, batch: Batch, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log-probs of the targets under softmax(logits / temperature), and optionally the entropy.

        logprobs[b, t] = z[b, t, targets[b, t]] - logsumexp_v z[b, t, v],   z = logits / temperature
        entropy[b, t]  = logsumexp_v z[b, t, v] - sum_v softmax(z)[b, t, v] z[b, t, v]

    Only the response positions are computed (the LM head runs on the last R + 1 positions when the model accepts
    `logits_to_keep`); entries where response_mask is 0 are 0.0. Computed in float32, with grad when grad is
    enabled (the learner's loss). Returns logprobs (B, T - 1) and entropy (B, T - 1) or None.
    """
    if not temperature > 0.0:
        raise ValueError(f"temperature: must be > 0 for log-probs, got {temperature}")
    device = next(model.parameters()).device
    batch = batch.to(device)
    batch_size, width = batch.input_ids.shape
    steps = width - 1
    if not 1 <= batch.prompt_width <= width:
        raise ValueError(f"batch.prompt_width: must be in [1, {width}], got {batch.prompt_width}")
    response_width = width - batch.prompt_width  # R
    keep = response_width + 1  # logits of positions P - 1 .. T - 1
    kwargs: dict[str, Any] = {}
    if accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    if accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, **kwargs
    ).logits
    logits = logits[:, -keep:-1].float()  # (B, R, V): positions P - 1 .. T - 2
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch.targets[:, steps - response_width :]  # (B, R)
    log_norm = torch.logsumexp(logits, dim=-1)  # (B, R)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, R)
    valid = batch.response_mask[:, steps - response_width :].bool()  # (B, R)
    head = torch.zeros((batch_size, steps - response_width), dtype=torch.float32, device=device)  # (B, P - 1)
    logprobs = torch.cat([head, torch.where(valid, picked - log_norm, 0.0)], dim=1)  # (B, T - 1)
    if not with_entropy:
        return logprobs, None
    expected = (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)  # (B, R)
    entropy = torch.cat([head, torch.where(valid, log_norm - expected, 0.0)], dim=1)  # (B, T - 1)
    return logprobs, entropy
