"""Sample <-> npo.v1.Sample protobuf conversion, shared by the gRPC services and the Redis guide store, and the one
check of a guide's values (`check_guide`) that every write of the guidance cache passes through.

It imports the protobuf messages only (no grpc), so storage code can use it without the transport.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from npo.core.types import Sample
from services.proto.npo.v1 import common_pb2

SAMPLE_FIELDS = ("prompt_id", "response_ids", "logprobs", "reward", "text", "policy_step", "finished")
"""The fields of npo.core.types.Sample, which npo.v1.Sample has under the same names, in order."""
LOGPROB_TOLERANCE = 1e-6
"""Largest log-prob a guide may carry: a probability is at most 1, so a log-prob is <= 0; values up to this much above
0 are accepted as rounding (a softmax in float32 can give log(1) = +6e-8), anything larger is refused."""


def sample_to_message(sample: Sample) -> common_pb2.Sample:
    """npo.core.types.Sample -> npo.v1.Sample (floats travel as doubles, so they come back bit-exact)."""
    return common_pb2.Sample(**{name: getattr(sample, name) for name in SAMPLE_FIELDS})


def sample_from_message(message: common_pb2.Sample, name: str = "sample") -> Sample:
    """npo.v1.Sample -> npo.core.types.Sample; raises ValueError naming `name` when logprobs and response_ids differ in
    length."""
    if len(message.logprobs) != len(message.response_ids):
        raise ValueError(
            f"{name}.logprobs: expected one log-prob per response token ({len(message.response_ids)}), "
            f"got {len(message.logprobs)}"
        )
    ids, logprobs = message.response_ids[:], message.logprobs[:]  # a slice is a new list, ~1.5x faster than list()
    return Sample(message.prompt_id, ids, logprobs, message.reward, message.text, message.policy_step, message.finished)


def _first(values: Sequence, bad: Callable[[Any], bool]) -> int:
    """Index of the first value for which `bad(value)` is true (the caller knows there is one)."""
    return next(i for i, value in enumerate(values) if bad(value))


def guide_problem(guide: Sample | common_pb2.Sample) -> tuple[str, str] | None:
    """(field, what is wrong) for the first value of `guide` the learner could not train on, else None: an empty
    prompt id; an empty response; not one log-prob per response token; a negative token id; a log-prob that is NaN,
    infinite or > LOGPROB_TOLERANCE; a reward that is NaN or infinite.

    A valid guide costs a few C-level passes over its lists (all/map, min, max); the index is looked for only then."""
    ids, logprobs = guide.response_ids, guide.logprobs
    if not isinstance(guide.prompt_id, str) or not guide.prompt_id:
        return "prompt_id", f"expected a non-empty prompt id, got {guide.prompt_id!r}"
    if len(ids) == 0:
        return "response_ids", "empty response (a guide needs at least one token)"
    if len(logprobs) != len(ids):
        return "logprobs", f"expected one log-prob per response token ({len(ids)}), got {len(logprobs)}"
    if min(ids) < 0:
        i = _first(ids, lambda token: token < 0)
        return f"response_ids[{i}]", f"token id {ids[i]} is negative"
    if not all(map(math.isfinite, logprobs)):
        i = _first(logprobs, lambda x: not math.isfinite(x))
        return f"logprobs[{i}]", f"{logprobs[i]} is not a finite log-prob"
    if max(logprobs) > LOGPROB_TOLERANCE:
        i = _first(logprobs, lambda x: x > LOGPROB_TOLERANCE)
        return f"logprobs[{i}]", f"{logprobs[i]!r} > 0 is not a log-prob (tolerance {LOGPROB_TOLERANCE:g})"
    if not math.isfinite(guide.reward):
        return "reward", f"{guide.reward} is not a finite reward"
    return None


def check_guide(guide: Sample | common_pb2.Sample, name: str = "guide") -> None:
    """ValueError "`name`.FIELD: PROBLEM (prompt 'ID')" when `guide_problem` finds one (a Sample or an npo.v1.Sample;
    `name` says which guide, e.g. "guides[3]"). Every write of the guidance cache calls it, so nothing the learner
    cannot train on (a NaN loss) reaches Redis."""
    problem = guide_problem(guide)
    if problem is not None:
        field, what = problem
        raise ValueError(f"{name}.{field}: {what}" + (f" (prompt {guide.prompt_id!r})" if field != "prompt_id" else ""))


def _varint(value: int) -> bytes:
    """A non-negative int as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def frame_samples(serialized: Sequence[bytes]) -> bytes:
    """Serialized npo.v1.Sample messages as repeated field 1 of a message (tag 0x0a, length, bytes each): the wire
    form of GetGuidesResponse.guides, built without parsing anything."""
    return b"".join(b"\x0a" + _varint(len(s)) + s for s in serialized)


def split_samples(framed: bytes) -> list[bytes]:
    """Inverse of `frame_samples`: the serialized messages, in order; ValueError when `framed` is not that form."""
    out, i = [], 0
    while i < len(framed):
        if framed[i] != 0x0A:
            raise ValueError(f"framed samples: expected field 1 at byte {i}, got tag {framed[i]:#04x}")
        i, length, shift = i + 1, 0, 0
        while True:
            if i >= len(framed) or shift > 63:
                raise ValueError("framed samples: truncated length")
            byte = framed[i]
            length, i, shift = length | (byte & 0x7F) << shift, i + 1, shift + 7
            if not byte & 0x80:
                break
        if i + length > len(framed):
            raise ValueError("framed samples: truncated message")
        out.append(framed[i : i + length])
        i += length
    return out
