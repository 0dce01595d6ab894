"""Sample <-> npo.v1.Sample protobuf conversion, shared by the gRPC services and the Redis guide store.

It imports the protobuf messages only (no grpc), so storage code can use it without the transport.
"""

from __future__ import annotations

from npo.core.types import Sample
from services.proto.npo.v1 import common_pb2

SAMPLE_FIELDS = ("prompt_id", "response_ids", "logprobs", "reward", "text", "policy_step", "finished")
"""The fields of npo.core.types.Sample, which npo.v1.Sample has under the same names, in order."""


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
