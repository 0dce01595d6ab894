"""LearnerService (proto/npo/v1/learner.proto) around one in-process npo.runtime.runner.Runner.

The controller drives the learner: RunSegment starts a segment of GRPO or NPO steps in a background thread and
returns once accepted (Status reports progress), Rollback restores a checkpoint, SaveCheckpoint / ListCheckpoints
manage checkpoints, Pause stops after the step in progress (the runner saves a checkpoint there) and Resume continues
the paused segment. `LearnerControl` holds that state machine without any gRPC; `LearnerServicer` only converts
messages. Errors: bad arguments -> INVALID_ARGUMENT (ValueError), a rollback to a step without a checkpoint ->
NOT_FOUND (KeyError), a call that conflicts with the running or paused segment -> FAILED_PRECONDITION (`LearnerBusy`,
whose message names that segment's id).

A learner started on a run folder that holds a checkpoint (`npo restart DIR learner` after a crash) resumes the run
as `npo train --resume` does (`start_or_resume`); the first main-line RunSegment then continues the segment the run
was in (a scout or an NPO replay of the config's plans) instead of replacing it.

    python -m services.learner --config configs/demo.yaml --out runs/learner --address 0.0.0.0:50053
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import secrets
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from npo.core.config import ConfigError
from npo.core.gate import check_tau_gate
from npo.runtime.checkpoint import CheckpointError
from npo.runtime.runner import Interrupted, Runner, Segment
from services.grpc_common import DEFAULT_MAX_MESSAGE_BYTES, abort_on, host_of, serve_forever, start_server
from services.proto.npo.v1 import common_pb2
from services.proto.npo.v1 import learner_pb2 as pb
from services.proto.npo.v1 import learner_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LearnerService"].full_name
"""Full name of the service ("npo.v1.LearnerService"), as health checks and service configs name it."""

IDLE, RUNNING, PAUSED, FAILED = "idle", "running", "paused", "failed"
"""The learner's states (LearnerState without the prefix)."""


class LearnerBusy(Exception):
    """A call conflicts with the running or paused segment (answered with FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class SegmentSpec:
    """What RunSegment asks for, validated."""

    from_step: int
    """Step the segment starts at (must be the learner's current step)."""
    length: int
    """Optimiser steps to run (>= 1)."""
    npo: bool
    """True: NPO steps with guides of guide_step; False: plain GRPO."""
    guide_step: int = -1
    """NPO only: step of the guide policy whose guides are read from the store; -1 for GRPO."""
    tau_gate: float | None = None
    """NPO only: gate threshold for this segment; None keeps the run config's."""
    is_correction: bool | None = None
    """NPO only: importance correction of the guide slot for this segment; None keeps the run config's."""
    label: str = ""
    """Segment name in metrics rows; empty means "grpo" or "npo"."""

    @property
    def end_step(self) -> int:
        return self.from_step + self.length

    @property
    def name(self) -> str:
        return self.label or ("npo" if self.npo else "grpo")


@dataclass
class SegmentRun:
    """A segment accepted by the learner and how far it got."""

    segment_id: str
    """Id reported by RunSegment and Status."""
    spec: SegmentSpec
    """What it runs."""


def segment_spec_from_request(request: pb.RunSegmentRequest) -> SegmentSpec:
    """The SegmentSpec of a RunSegmentRequest; ValueError naming the bad field."""
    if request.from_step < 0:
        raise ValueError(f"from_step: must be >= 0, got {request.from_step}")
    if request.length < 1:
        raise ValueError(f"length: must be >= 1, got {request.length}")
    if request.mode == pb.TRAINING_MODE_GRPO:
        return SegmentSpec(request.from_step, request.length, False, label=request.label)
    if request.mode != pb.TRAINING_MODE_NPO:
        raise ValueError(f"mode: expected TRAINING_MODE_GRPO or TRAINING_MODE_NPO, got {request.mode}")
    if request.guide_step < 0:
        raise ValueError(f"guide_step: must be >= 0 for an NPO segment, got {request.guide_step}")
    tau = check_tau_gate(request.tau_gate) if request.HasField("tau_gate") else None
    is_correction = request.is_correction if request.HasField("is_correction") else None
    return SegmentSpec(request.from_step, request.length, True, request.guide_step, tau, is_correction, request.label)


def numeric_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row as floats (strings such as `segment` are left out)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}


def checkpoint_info(runner: Runner, step: int) -> common_pb2.CheckpointInfo:
    """CheckpointInfo of the runner's complete checkpoint `step`: version = first 16 hex digits of the sha256 of its
    meta.json (which lists every file's checksum), created = meta.json's modification time."""
    path = runner.ckpt.path(step)
    meta = path / "meta.json"
    version = hashlib.sha256(meta.read_bytes()).hexdigest()[:16]
    created_ms = int(meta.stat().st_mtime * 1000)
    return common_pb2.CheckpointInfo(step=step, path=str(path.resolve()), version=version, created_unix_ms=created_ms)


def _is_plan_segment(segment: Segment) -> bool:
    """True for a segment other than the plain main line (a scout, an NPO replay, a labelled segment)."""
    return segment.npo or segment.name != "grpo"


def _unfinished(segment: Segment, step: int) -> bool:
    """True while `segment` has steps left at `step` (a scout without an end runs until its plan ends it)."""
    return segment.end < 0 or segment.end > step


def _until(segment: Segment) -> str:
    return f"until step {segment.end}" if segment.end >= 0 else "until its plan moves on"


# ----------------------------------------------------------------------------------------------------------------


class LearnerControl:
    """The learner's state machine around `runner`: one segment at a time, run in a background thread."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.state = IDLE
        self.error = ""
        self.current: SegmentRun | None = None
        self.last_metrics: dict[str, float] = {}
        self.finished = runner.step >= runner.cfg.train.steps
        self._restored = runner.segment if _is_plan_segment(runner.segment) else None
        """A segment the runner resumed inside (from its checkpoint); the next main-line RunSegment continues it."""
        self._count = 0
        self._epoch = secrets.token_hex(3)  # a restarted learner never reports a segment id of its predecessor
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._previous_after_step = runner.after_step
        runner.after_step = self._after_step

    def _after_step(self, runner: Runner, row: dict[str, Any]) -> None:
        self.last_metrics = numeric_metrics(row)
        if self._previous_after_step is not None:
            self._previous_after_step(runner, row)

    def _busy(self, action: str) -> LearnerBusy:
        seg = self.current.segment_id if self.current else ""
        return LearnerBusy(f"cannot {action}: segment {seg} is {self.state} (step {self.runner.step})")

    def run_segment(self, spec: SegmentSpec) -> SegmentRun:
        """Accept `spec` and start it in the background; LearnerBusy while a segment runs or is paused, or when
        from_step is not the current step."""
        with self._lock:
            if self.state in (RUNNING, PAUSED):
                raise self._busy("start a segment")
            if spec.from_step != self.runner.step:
                raise LearnerBusy(
                    f"from_step: {spec.from_step} is not the learner's current step {self.runner.step}; "
                    "roll back to it first"
                )
            self._count += 1
            self.finished = False
            self.current = SegmentRun(f"seg-{self._epoch}-{self._count:06d}", spec)
            restored, self._restored = self._restored, None
            if not spec.npo and restored is self.runner.segment and _unfinished(restored, self.runner.step):
                log.info("main line: the resumed segment %s continues first (%s)", restored.name, _until(restored))
            else:
                guide_step = spec.guide_step if spec.npo else -1
                self.runner.segment = Segment(
                    spec.name, spec.npo, guide_step, spec.end_step, spec.tau_gate, spec.is_correction
                )
            self._start()
            return self.current

    def _start(self) -> None:
        """Run the current segment from the runner's step (lock held)."""
        self.state, self.error = RUNNING, ""
        self._thread = threading.Thread(target=self._work, args=(self.current,), name="learner-segment", daemon=True)
        self._thread.start()

    def _work(self, run: SegmentRun) -> None:
        outcome, error = IDLE, ""
        try:
            self.runner.run_until(run.spec.end_step)  # the segment carries its own gate settings
            if self.runner.step >= self.runner.cfg.train.steps:
                self.runner.finish()
                self.finished = True
        except Interrupted:
            outcome = PAUSED
        except Exception as exc:  # noqa: BLE001 - reported through Status
            log.error("segment %s failed", run.segment_id, exc_info=exc)
            outcome, error = FAILED, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        with self._lock:
            self.runner.clear_stop()  # a pause that came after the last step is void
            if outcome != PAUSED:
                self.runner.segment = Segment("grpo")
            self.state, self.error = outcome, error

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the background thread to stop (segment done, paused or failed); True when it did."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            return not thread.is_alive()
        return True

    def pause(self, timeout_s: float | None = None) -> str:
        """Stop after the step in progress (the runner saves a checkpoint there) and wait up to `timeout_s` for it;
        returns the state then. Pausing a paused or idle learner changes nothing."""
        with self._lock:
            if self.state != RUNNING:
                return self.state
            self.runner.request_stop()
        self.wait(timeout_s)
        return self.state

    def resume(self) -> str:
        """Continue a paused segment; returns the state. Resuming a running or idle learner changes nothing."""
        with self._lock:
            if self.state == PAUSED:
                self._start()
            return self.state

    def rollback(self, to_step: int) -> int:
        """Restore checkpoint `to_step` (abandoning a paused segment); returns the step. ValueError for a negative or
        future step, KeyError when no checkpoint of it exists, LearnerBusy while a segment runs."""
        if to_step < 0:
            raise ValueError(f"to_step: must be >= 0, got {to_step}")
        with self._lock:
            if self.state == RUNNING:
                raise self._busy("roll back")
            if to_step not in self.runner.ckpt.steps():
                raise KeyError(f"to_step: no checkpoint of step {to_step} (have: {self.runner.ckpt.steps()})")
            self.runner.rollback(to_step)
            self.runner.segment, self._restored = Segment("grpo"), None
            self.state, self.error, self.finished = IDLE, "", False
            return self.runner.step

    def save_checkpoint(self) -> int:
        """Checkpoint the current step; LearnerBusy while a segment runs. Returns the step."""
        with self._lock:
            if self.state == RUNNING:
                raise self._busy("save a checkpoint")
            self.runner.save_checkpoint()
            return self.runner.step


# ----------------------------------------------------------------------------------------------------------------

_STATES = {
    IDLE: pb.LEARNER_STATE_IDLE,
    RUNNING: pb.LEARNER_STATE_RUNNING,
    PAUSED: pb.LEARNER_STATE_PAUSED,
    FAILED: pb.LEARNER_STATE_FAILED,
}


def status_reply(control: LearnerControl) -> pb.StatusResponse:
    """StatusResponse of the learner now."""
    reply = pb.StatusResponse(
        state=_STATES[control.state],
        step=control.runner.step,
        guide_step=-1,
        error=control.error if control.state == FAILED else "",
        metrics=control.last_metrics,
        run=control.runner.run,
        run_steps=control.runner.cfg.train.steps,
        run_dir=str(control.runner.out.resolve()),
        finished=control.finished,
    )
    run = control.current
    if run is not None:
        reply.segment_id = run.segment_id
        reply.mode = pb.TRAINING_MODE_NPO if run.spec.npo else pb.TRAINING_MODE_GRPO
        reply.guide_step = run.spec.guide_step if run.spec.npo else -1
        reply.segment_end_step = run.spec.end_step
    return reply


def precondition(context: grpc.ServicerContext) -> contextlib.AbstractContextManager[None]:
    """Answer LearnerBusy raised inside the block with FAILED_PRECONDITION and its message."""
    return abort_on(context, LearnerBusy, grpc.StatusCode.FAILED_PRECONDITION)


def _remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the call's deadline, minus a margin for the answer; None without a deadline."""
    left = context.time_remaining()
    return None if left is None else max(0.0, left - 0.5)


class LearnerServicer(pb_grpc.LearnerServiceServicer):
    """npo.v1.LearnerService on a LearnerControl."""

    def __init__(self, control: LearnerControl) -> None:
        self.control = control

    def RunSegment(self, request: pb.RunSegmentRequest, context: grpc.ServicerContext) -> pb.RunSegmentResponse:
        spec = segment_spec_from_request(request)
        with precondition(context):
            run = self.control.run_segment(spec)
        return pb.RunSegmentResponse(segment_id=run.segment_id, end_step=run.spec.end_step)

    def Rollback(self, request: pb.RollbackRequest, context: grpc.ServicerContext) -> pb.RollbackResponse:
        with precondition(context):
            return pb.RollbackResponse(step=self.control.rollback(request.to_step))

    def SaveCheckpoint(
        self, request: pb.SaveCheckpointRequest, context: grpc.ServicerContext
    ) -> pb.SaveCheckpointResponse:
        with precondition(context):
            step = self.control.save_checkpoint()
        return pb.SaveCheckpointResponse(checkpoint=checkpoint_info(self.control.runner, step))

    def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: grpc.ServicerContext
    ) -> pb.ListCheckpointsResponse:
        runner = self.control.runner
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_info(runner, s) for s in runner.ckpt.steps()])

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        return status_reply(self.control)

    def Pause(self, request: pb.PauseRequest, context: grpc.ServicerContext) -> pb.PauseResponse:
        state = self.control.pause(_remaining(context))
        return pb.PauseResponse(state=_STATES[state], step=self.control.runner.step)

    def Resume(self, request: pb.ResumeRequest, context: grpc.ServicerContext) -> pb.ResumeResponse:
        state = self.control.resume()
        return pb.ResumeResponse(state=_STATES[state], step=self.control.runner.step)


def serve(
    runner: Runner,
    address: str = "127.0.0.1:0",
    *,
    max_workers: int = 8,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[grpc.Server, int]:
    """Start LearnerService on `runner` at `address` (port 0: a free one), with grpc.health.v1 reporting SERVING.
    Returns the started server and its port; stop it with `server.stop(grace)` (pause a running segment first)."""
    servicer = LearnerServicer(LearnerControl(runner))
    add = pb_grpc.add_LearnerServiceServicer_to_server
    return start_server(
        servicer, add, SERVICE_NAME, address, max_workers=max_workers, max_message_bytes=max_message_bytes
    )


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m services.learner` (see --help)."""
    parser = argparse.ArgumentParser(
        prog="python -m services.learner", description="Serve the learner (npo.v1.LearnerService) of one run."
    )
    parser.add_argument("--config", help="YAML run config (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    parser.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl)")
    parser.add_argument("--address", default="127.0.0.1:50053", help="host:port to listen on (port 0: a free one)")
    parser.add_argument(
        "--rollout",
        default="",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="rollout replicas to sample with (weights are published to them after every change); "
        "empty: an in-process transformers engine",
    )
    parser.add_argument(
        "--cache", default="", metavar="HOST:PORT", help="guidance cache service; empty: the run config's cache.url"
    )
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: a free one)")
    parser.add_argument("--metrics-address", default="127.0.0.1", help="address of the /metrics endpoint")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_BYTES // 2**20)
    parser.add_argument("--workers", type=int, default=8, help="threads serving calls")
    return parser.parse_args(argv)


def prepare_run_dir(runner: Runner, *, fresh: bool = True) -> None:
    """Write the run's config.yaml and (`fresh`) start empty metrics.jsonl / interventions.jsonl (what Runner.train
    does)."""
    import yaml

    from npo.runtime.run_config import run_config_to_dict

    (runner.out / "config.yaml").write_text(yaml.safe_dump(run_config_to_dict(runner.cfg), sort_keys=False))
    for name in ("metrics.jsonl", "interventions.jsonl") if fresh else ():
        (runner.out / name).write_text("")


def start_or_resume(runner: Runner) -> int | None:
    """A fresh run folder starts empty (prepare_run_dir); one that holds a checkpoint (a restarted learner) resumes
    like `npo train --resume`: from its newest valid checkpoint (a corrupted one is set aside with a warning), the
    rows written after it dropped, inside the segment and plan it was in. A run resumed at its end is finished again
    (final checkpoint and row). Returns the resumed step, None for a fresh run; CheckpointError when no checkpoint
    is valid."""
    if not runner.ckpt.steps():
        prepare_run_dir(runner)
        return None
    prepare_run_dir(runner, fresh=False)
    step = runner.resume()
    where = f"segment {runner.segment.name}, {_until(runner.segment)}"
    print(f"learner: resumed {runner.out} at step {step} ({where})", flush=True)
    if runner.step >= runner.cfg.train.steps:
        runner.finish()
    return step


def remote_roles(
    stack: contextlib.ExitStack, policy: Any, out: Path, rollout: str, cache: str, metrics: Any = None
) -> dict[str, Any]:
    """The Runner's keyword arguments for roles in other processes: `engine` + `publish` for the rollout replicas
    at `rollout` (comma-separated host:port), `store` for the guidance cache service at `cache`; the clients are
    closed by `stack`. Empty addresses give nothing (the in-process defaults)."""
    roles: dict[str, Any] = {}
    if rollout:
        from services.learner.publish import WeightPublisher
        from services.rollout.client import RolloutClient

        addresses = [a.strip() for a in rollout.split(",") if a.strip()]
        engine = stack.enter_context(RolloutClient(addresses))
        roles["engine"] = engine
        roles["publish"] = WeightPublisher(policy.model, engine, out / "published", metrics)
    if cache:
        from services.guidance_cache.client import GuidanceCacheClient

        roles["store"] = stack.enter_context(GuidanceCacheClient(cache))
    return roles


def main(argv: Sequence[str] | None = None) -> int:
    """Build the runner of the config (like `npo train`), serve it until SIGTERM or Ctrl-C; prints `serving on
    HOST:PORT` once ready."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import torch

        from npo.runtime.models import choose_threads
        from npo.runtime.run_config import load_run_config
        from services.wiring import build_learner, build_policy_and_task, open_store

        cfg = load_run_config(args.config, args.overrides)
        torch.set_num_threads(choose_threads(cfg.train.threads))  # 0: the cores this process may use
        policy, task = build_policy_and_task(cfg)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            metrics = None
            if args.metrics_port is not None:
                from services.learner.prometheus import LearnerMetrics

                metrics = LearnerMetrics(cfg.run_name or out.resolve().name)
                metrics_port = metrics.serve(args.metrics_port, args.metrics_address)
                stack.callback(metrics.stop)
            roles = remote_roles(stack, policy, out, args.rollout, args.cache, metrics)
            if "store" not in roles:
                roles["store"] = stack.enter_context(open_store(cfg.cache.url, cfg.cache.prefix))
            learner = build_learner(cfg, policy)
            runner = Runner(cfg, out, policy=policy, task=task, learner=learner, progress=False, **roles)
            if metrics is not None:
                runner.after_step = metrics.after_step
            start_or_resume(runner)
            server, port = serve(
                runner, args.address, max_workers=args.workers, max_message_bytes=args.max_message_mb * 2**20
            )
            if metrics is not None:
                print(f"learner: metrics on http://{args.metrics_address}:{metrics_port}/metrics", flush=True)
            serve_forever(server, f"learner: serving on {host_of(args.address)}:{port} (run folder {runner.out})")
            if not cfg.cache.url and not args.cache:
                roles["store"].clear_run(runner.run)
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
