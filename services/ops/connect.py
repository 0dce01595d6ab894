"""`npo train --connect`: drive the run of a learner started by `npo up` to its end, with a progress display.

    npo up --config configs/tiny.yaml --out runs/svc
    npo train --connect runs/svc          # or the learner's host:port

The learner's run config applies. Ctrl-C pauses the learner (a checkpoint is saved); the same command continues it.

The driver outlives a learner restart (`npo restart DIR learner` after a crash): while the learner is unreachable it
waits (up to UNREACHABLE_WAIT_S, one line printed), reconnecting to the address DIR/services.json records; the
restarted learner resumes from its newest checkpoint and the driver continues the main line from there. The run is
over when the main line is finished and the controller runs no intervention (AutoNPO may roll back a finished run:
the main line is then driven again).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.ops.state import learner_address

IDLE_GRACE_S = 5.0
"""`npo train --connect` continues the main line itself when the learner stays idle this long before the end and no
controller answers (at once when the controller says no intervention runs)."""

UNREACHABLE_WAIT_S = 600.0
"""How long `npo train --connect` waits for an unreachable learner (or controller) to answer again."""

RETRY_S = 1.0
"""Pause between two attempts to reach a service that did not answer."""


class Progress:
    """A tqdm bar of the learner's step with its reward and entropy (nothing when disabled)."""

    def __init__(self, status, address: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=status.run_steps, initial=status.step, desc=f"{status.run} @ {address}", unit="step")

    def show(self, status) -> None:
        if self.bar is None:
            return
        self.bar.n = status.step
        if "reward_mean" in status.metrics:
            reward, entropy = status.metrics["reward_mean"], status.metrics.get("entropy", float("nan"))
            self.bar.set_postfix(reward=f"{reward:.3f}", entropy=f"{entropy:.3f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class ReconnectingLearner:
    """The learner of `target` across its restarts: once it answered, calls that find it unreachable wait and retry
    (one line printed, up to `wait_s`), reconnecting to the address `target` names now (a restart may move it). A
    learner that never answered is an error at once (a wrong address, a run not started)."""

    def __init__(self, target: str, wait_s: float = UNREACHABLE_WAIT_S) -> None:
        from services.learner.client import LearnerClient

        self.target, self.wait_s = target, wait_s
        self.address = learner_address(target)
        self._make = lambda address: LearnerClient(address, timeout_s=120.0)
        self.client = self._make(self.address)
        self._answered = False

    def close(self) -> None:
        self.client.close()

    def _reconnect(self) -> None:
        with contextlib.suppress(Exception):  # services.json may be mid-rewrite by `npo restart`: keep the old one
            self.address = learner_address(self.target)
        self.client.close()
        self.client = self._make(self.address)

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """fn(client), waiting while the learner is unreachable; ConnectionError after `wait_s` of that."""
        since = None
        while True:
            try:
                result = fn(self.client)
            except (ConnectionError, TimeoutError) as exc:
                if not self._answered:
                    raise
                now = time.monotonic()
                if since is None:
                    since = now
                    print(
                        f"the learner at {self.address} is unreachable ({_first_line(exc)}); waiting up to "
                        f"{self.wait_s:g} s for it to come back (npo restart DIR learner)",
                        flush=True,
                    )
                elif now - since > self.wait_s:
                    raise ConnectionError(
                        f"the learner at {self.address} stayed unreachable for {self.wait_s:g} s: {_first_line(exc)}"
                    ) from None
                time.sleep(RETRY_S)
                self._reconnect()
                continue
            if since is not None:
                print(f"the learner at {self.address} answers again ({time.monotonic() - since:.0f} s)", flush=True)
            self._answered = True
            return result

    def status(self):
        return self.call(lambda client: client.status())


class InterventionWatch:
    """Whether the run's controller runs an intervention (REST /v1/status, `running_intervention`). `pending()` is
    None when there is no controller to ask (a host:port target, `npo up --no-controller`, or one unreachable for
    `wait_s`); an unreachable controller counts as running one until then. `answers` says whether the last answer
    came from the controller itself."""

    def __init__(self, target: str, wait_s: float = UNREACHABLE_WAIT_S) -> None:
        from npo.core.config import ConfigError
        from services.ops.control import open_controller

        self.client, self.wait_s, self._since, self.answers = None, wait_s, None, False
        if Path(target).is_dir():
            with contextlib.suppress(ConfigError, FileNotFoundError, StopIteration):
                self.client = open_controller(target)

    def pending(self) -> bool | None:
        if self.client is None:
            return None
        try:
            running = self.client.status().get("running_intervention")
        except Exception as exc:  # noqa: BLE001 - down, restarting, or unable to reach the learner: ask again later
            self.answers, now = False, time.monotonic()
            if self._since is None:
                self._since = now
                print(f"the controller does not answer ({_first_line(exc)}); waiting for it", flush=True)
            elif now - self._since > self.wait_s:
                print(f"the controller did not answer for {self.wait_s:g} s; no longer waiting for it", flush=True)
                self.close()
                return None
            return True
        self._since, self.answers = None, True
        return running is not None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _continue_main_line(learner: ReconnectingLearner, status) -> None:
    """One GRPO segment from the learner's step to the end of its run (none when it is there already). A refusal
    (the learner moved on, a controller's command came first) or a learner that died meanwhile is left to the next
    poll."""
    from services.learner.client import LearnerBusyError

    if status.step >= status.run_steps:
        return
    with contextlib.suppress(LearnerBusyError, ConnectionError, TimeoutError):
        learner.client.run_segment(status.step, status.run_steps - status.step, "grpo")


def _follow(learner: ReconnectingLearner, watch: InterventionWatch, progress: Progress, timeout_s: float):
    """Poll the learner until its main line is finished with no intervention running, its segment fails or
    `timeout_s` passes; returns its last status. Idle before the end (after a restart, or an intervention that ended
    without continuing the main line): the main line continues from there, at once when the controller says no
    intervention runs, never while it says one runs (it is between two commands), after IDLE_GRACE_S when there is
    no controller's word."""
    deadline = time.monotonic() + timeout_s
    idle_since: float | None = None
    while True:
        status = learner.status()
        progress.show(status)
        if status.state == "failed" or time.monotonic() > deadline:
            return status
        if status.finished:
            idle_since = None
            if not watch.pending():
                return status
        elif status.state == "idle":
            idle_since = idle_since or time.monotonic()
            pending, waited = watch.pending(), time.monotonic() - idle_since
            if pending is False or (not watch.answers and waited > IDLE_GRACE_S):
                _continue_main_line(learner, status)
                idle_since = None
        else:
            idle_since = None
        time.sleep(0.5)


def train_connected(target: str, *, progress: bool = True, timeout_s: float = 7 * 24 * 3600.0) -> str:
    """Drive the run of the learner at `target` to its end: one segment from its current step to train.steps (its
    config's interventions run inside), with a progress bar from Status, through learner restarts. Ctrl-C pauses
    the learner (a checkpoint is saved; `npo train --connect` again continues). Returns the learner's run folder."""
    learner, watch = ReconnectingLearner(target), InterventionWatch(target)
    try:
        status = learner.status()
        if status.finished and not watch.pending():
            print(f"run {status.run} already finished at step {status.step} ({status.run_dir})")
            return status.run_dir
        if status.state == "paused":
            learner.call(lambda client: client.resume())
        elif status.state != "running" and not status.finished:
            _continue_main_line(learner, status)
        bar = Progress(status, learner.address, progress)
        try:
            status = _follow(learner, watch, bar, timeout_s)
        except KeyboardInterrupt:
            state, step = learner.client.pause()
            print(f"\npaused the learner at step {step} ({state}); continue with: npo train --connect {target}")
            raise
        finally:
            bar.close()
        if status.state == "failed":
            raise RuntimeError(f"the learner's segment failed: {status.error}")
        if not status.finished:
            raise TimeoutError(f"the run is still running after {timeout_s:g} s (step {status.step})")
        return status.run_dir
    finally:
        learner.close()
        watch.close()


def run_connected(target: str, *, progress: bool = True) -> Path:
    """`npo train --connect`: run the learner's configured run to its end, then write the report (when the run
    folder is on this machine)."""
    from npo.analysis.report import write_report

    started = time.perf_counter()
    run_dir = Path(train_connected(target, progress=progress))
    if (run_dir / "metrics.jsonl").is_file():
        report = write_report(run_dir)
        print(f"run finished in {time.perf_counter() - started:.0f} s; report: {report}")
    else:
        print(f"run finished in {time.perf_counter() - started:.0f} s; run folder (on the learner): {run_dir}")
    return run_dir
