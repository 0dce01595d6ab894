"""`npo train --connect`: drive the run of a learner started by `npo up` to its end, with a progress display.

    npo up --config configs/tiny.yaml --out runs/svc
    npo train --connect runs/svc          # or the learner's host:port

The learner's run config applies. Ctrl-C pauses the learner (a checkpoint is saved); the same command continues it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from services.ops.state import learner_address

IDLE_GRACE_S = 5.0
"""`npo train --connect` continues the main line itself when the learner stays idle this long before the end."""


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


def _continue_main_line(learner, status) -> None:
    """One GRPO segment from the learner's step to the end of its run."""
    learner.run_segment(status.step, status.run_steps - status.step, "grpo")


def _follow(learner, progress: Progress, timeout_s: float):
    """Poll the learner until its run finishes, fails or `timeout_s` passes; returns its last status. Idle before
    the end (a controller's intervention is between two commands, or it ended without continuing the main line):
    after IDLE_GRACE_S the main line continues from here."""
    from services.learner.client import LearnerBusyError

    deadline = time.monotonic() + timeout_s
    idle_since: float | None = None
    while True:
        status = learner.status()
        progress.show(status)
        if status.finished or status.state == "failed" or time.monotonic() > deadline:
            return status
        idle_since = (idle_since or time.monotonic()) if status.state == "idle" else None
        if idle_since is not None and time.monotonic() - idle_since > IDLE_GRACE_S:
            with contextlib.suppress(LearnerBusyError):
                _continue_main_line(learner, status)
            idle_since = None
        time.sleep(0.5)


def train_connected(target: str, *, progress: bool = True, timeout_s: float = 7 * 24 * 3600.0) -> str:
    """Drive the run of the learner at `target` to its end: one segment from its current step to train.steps (its
    config's interventions run inside), with a progress bar from Status. Ctrl-C pauses the learner (a checkpoint is
    saved; `npo train --connect` again continues). Returns the learner's run folder."""
    from services.learner.client import LearnerClient

    address = learner_address(target)
    with LearnerClient(address, timeout_s=120.0) as learner:
        status = learner.status()
        if status.finished:
            print(f"run {status.run} already finished at step {status.step} ({status.run_dir})")
            return status.run_dir
        if status.state == "paused":
            learner.resume()
        elif status.state != "running":
            _continue_main_line(learner, status)
        bar = Progress(status, address, progress)
        try:
            status = _follow(learner, bar, timeout_s)
        except KeyboardInterrupt:
            state, step = learner.pause()
            print(f"\npaused the learner at step {step} ({state}); continue with: npo train --connect {target}")
            raise
        finally:
            bar.close()
        if status.state == "failed":
            raise RuntimeError(f"the learner's segment failed: {status.error}")
        if not status.finished:
            raise TimeoutError(f"the run is still running after {timeout_s:g} s (step {status.step})")
        return status.run_dir


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
