"""LearnerClient: the controller's side of npo.v1.LearnerService (services/learner/server.py).

    with LearnerClient("learner:50053") as learner:
        started = learner.run_segment(from_step=0, length=10, mode="grpo")
        status = learner.wait_segment(started.segment_id, timeout_s=600)
        learner.rollback(5)
        learner.run_segment(5, 5, mode="npo", guide_step=10, tau_gate=0.6, label="npo_replay")

Errors come back as builtin exceptions (services.grpc_common.error_from_rpc): INVALID_ARGUMENT -> ValueError,
NOT_FOUND (rollback to a step without a checkpoint) -> LookupError; FAILED_PRECONDITION (a segment runs or is
paused, from_step is not the current step) -> LearnerBusyError with the server's message naming the segment.
Rollback, SaveCheckpoint, ListCheckpoints, Status, Pause and Resume are retried on UNAVAILABLE; RunSegment is not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from services.grpc_common import ServiceClient
from services.proto.npo.v1 import common_pb2
from services.proto.npo.v1 import learner_pb2 as pb
from services.proto.npo.v1 import learner_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 60.0
"""Deadline of one learner call (Pause waits for the step in progress within it)."""

_MODES = {"grpo": pb.TRAINING_MODE_GRPO, "npo": pb.TRAINING_MODE_NPO}
_MODE_NAMES = {pb.TRAINING_MODE_UNSPECIFIED: "", pb.TRAINING_MODE_GRPO: "grpo", pb.TRAINING_MODE_NPO: "npo"}
_STATE_NAMES = {
    pb.LEARNER_STATE_UNSPECIFIED: "unknown",
    pb.LEARNER_STATE_IDLE: "idle",
    pb.LEARNER_STATE_RUNNING: "running",
    pb.LEARNER_STATE_PAUSED: "paused",
    pb.LEARNER_STATE_FAILED: "failed",
}


class LearnerBusyError(RuntimeError):
    """The learner refused the call with FAILED_PRECONDITION (a segment runs or is paused, or from_step is not its
    current step); the message is the server's."""


@dataclass(frozen=True)
class SegmentStarted:
    """RunSegment's answer."""

    segment_id: str
    """Id of the accepted segment, as Status reports it."""
    end_step: int
    """Step at which it will end."""


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint of the run (npo.v1.CheckpointInfo)."""

    step: int
    """Step of the policy it holds."""
    path: str
    """Its folder on the learner's storage."""
    version: str
    """Opaque version tag of the weights."""
    created_unix_ms: int
    """When it was completed (ms since the epoch)."""


@dataclass(frozen=True)
class LearnerStatus:
    """Status's answer."""

    state: str
    """idle | running | paused | failed | unknown"""
    step: int
    """The learner's current step."""
    segment_id: str = ""
    """The running, paused or last segment; empty before the first."""
    mode: str = ""
    """grpo | npo of that segment (empty before the first)."""
    guide_step: int = -1
    """Its guide step (NPO), -1 otherwise."""
    segment_end_step: int = 0
    """Step at which it ends."""
    error: str = ""
    """Why the last segment failed (state failed only)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Numeric metrics of the last completed step."""
    run: str = ""
    """Name of the run."""
    run_steps: int = 0
    """The run's length (train.steps); a segment reaching it finishes the run."""
    run_dir: str = ""
    """The run folder on the learner's storage."""
    finished: bool = False
    """True once the run's final checkpoint and evaluation were written."""


def checkpoint_from_message(message: common_pb2.CheckpointInfo) -> CheckpointRecord:
    """CheckpointRecord of a CheckpointInfo message."""
    return CheckpointRecord(message.step, message.path, message.version, message.created_unix_ms)


def status_from_reply(reply: pb.StatusResponse) -> LearnerStatus:
    """LearnerStatus of a StatusResponse."""
    return LearnerStatus(
        state=_STATE_NAMES.get(reply.state, "unknown"),
        step=reply.step,
        segment_id=reply.segment_id,
        mode=_MODE_NAMES.get(reply.mode, ""),
        guide_step=reply.guide_step,
        segment_end_step=reply.segment_end_step,
        error=reply.error,
        metrics=dict(reply.metrics),
        run=reply.run,
        run_steps=reply.run_steps,
        run_dir=reply.run_dir,
        finished=reply.finished,
    )


def segment_request(
    from_step: int,
    length: int,
    mode: str,
    guide_step: int,
    tau_gate: float | None,
    is_correction: bool | None,
    label: str,
) -> pb.RunSegmentRequest:
    """RunSegmentRequest of the arguments; ValueError naming `mode` when it is not grpo or npo (values are checked
    by the server)."""
    if mode not in _MODES:
        raise ValueError(f"mode: expected 'grpo' or 'npo', got {mode!r}")
    request = pb.RunSegmentRequest(
        from_step=from_step, length=length, mode=_MODES[mode], guide_step=guide_step, label=label
    )
    if tau_gate is not None:
        request.tau_gate = tau_gate
    if is_correction is not None:
        request.is_correction = is_correction
    return request


class LearnerClient(ServiceClient):
    """Calls the LearnerService at `address` ("host:port"). Keyword arguments: timeout_s (default DEFAULT_TIMEOUT_S),
    retry, max_message_bytes, credentials (services.grpc_common.ServiceClient)."""

    service = pb.DESCRIPTOR.services_by_name["LearnerService"]
    stub_class = pb_grpc.LearnerServiceStub
    default_timeout_s = DEFAULT_TIMEOUT_S

    def _error(self, error: grpc.RpcError, method: str, target: str) -> Exception:
        """FAILED_PRECONDITION -> LearnerBusyError with the server's message; other failures -> error_from_rpc."""
        if isinstance(error, grpc.Call) and error.code() is grpc.StatusCode.FAILED_PRECONDITION:
            return LearnerBusyError(error.details())
        return super()._error(error, method, target)

    def run_segment(
        self,
        from_step: int,
        length: int,
        mode: str = "grpo",
        *,
        guide_step: int = -1,
        tau_gate: float | None = None,
        is_correction: bool | None = None,
        label: str = "",
    ) -> SegmentStarted:
        """Start `length` steps of `mode` (grpo | npo) from `from_step` (the learner's current step) in the
        background; NPO reads guides of `guide_step`, with this segment's `tau_gate` / `is_correction` when given."""
        request = segment_request(from_step, length, mode, guide_step, tau_gate, is_correction, label)
        reply = self._call("RunSegment", request)
        return SegmentStarted(reply.segment_id, reply.end_step)

    def rollback(self, to_step: int) -> int:
        """Restore checkpoint `to_step`; returns the learner's step (LookupError when there is no such checkpoint)."""
        return self._call("Rollback", pb.RollbackRequest(to_step=to_step)).step

    def save_checkpoint(self) -> CheckpointRecord:
        """Checkpoint the current step."""
        return checkpoint_from_message(self._call("SaveCheckpoint", pb.SaveCheckpointRequest()).checkpoint)

    def list_checkpoints(self) -> list[CheckpointRecord]:
        """Complete checkpoints, ascending by step."""
        reply = self._call("ListCheckpoints", pb.ListCheckpointsRequest())
        return [checkpoint_from_message(m) for m in reply.checkpoints]

    def status(self) -> LearnerStatus:
        """What the learner is doing now."""
        return status_from_reply(self._call("Status", pb.StatusRequest()))

    def pause(self) -> tuple[str, int]:
        """Stop after the step in progress (waiting for it within the deadline); returns (state, step)."""
        reply = self._call("Pause", pb.PauseRequest())
        return _STATE_NAMES.get(reply.state, "unknown"), reply.step

    def resume(self) -> tuple[str, int]:
        """Continue a paused segment; returns (state, step)."""
        reply = self._call("Resume", pb.ResumeRequest())
        return _STATE_NAMES.get(reply.state, "unknown"), reply.step

    def wait_segment(self, segment_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.05) -> LearnerStatus:
        """Poll Status until segment `segment_id` no longer runs; returns that status (state idle, paused or
        failed). TimeoutError after `timeout_s`; RuntimeError when it failed, with the server's reason."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status.segment_id != segment_id or status.state != "running":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"segment {segment_id}: still running after {timeout_s:g} s (step {status.step})")
            time.sleep(poll_s)
        if status.segment_id == segment_id and status.state == "failed":
            raise RuntimeError(f"segment {segment_id} failed: {status.error}")
        return status
