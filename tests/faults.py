"""A harness for fault tests of service mode: real processes of `npo up` on 127.0.0.1, one of them SIGKILLed mid-run.

    run = ServiceRun(tmp_path / "svc", FAULT_RUN, replicas=2)
    run.up()
    driver = run.drive()                         # `npo train --connect DIR` in the background
    run.wait_for_step(12)
    run.kill("rollout-1")                        # SIGKILL, as the kernel's OOM killer would
    run.restart("rollout-1")                     # `npo restart DIR rollout-1` (or let it recover by itself)
    assert run.finish(driver) == 0
    assert_same_main_line(run.main_line(), reference.main_line())

The reference is an uninterrupted run of the same config and replica count (`reference_run`), made once per test
session and shared by every fault test that asks for the same (overrides, replicas).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rows import TIMING_KEYS, assert_rows_close

from services.ops.state import read_state

ROOT = Path(__file__).resolve().parents[1]

FAULT_RUN = (
    "train.steps=30", "train.prompts_per_step=8", "train.threads=1",
    "eval.every=10", "eval.num_prompts=32", "checkpoint.every=5",
    "method=npo", "npo.early={enabled: true, at_step: 5, delta: 5}",
    "npo.late={enabled: true, at_step: 15, delta: 5}",
)  # fmt: skip
"""A seeded NPO run of 30 steps with checkpoints every 5: an early bootstrap at step 5 (scout 5 -> 10, roll back,
replay 5 -> 10 with guides) and a plateau breakthrough at 15 (15 -> 20, roll back, replay)."""

RUN_KEYS_IGNORED = TIMING_KEYS | {"samples_total", "optimizer_steps"}
"""Keys of a main-line row that count work done rather than the result (a redone step adds to them)."""


def npo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`npo ARGS` in a subprocess from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def main_line(rows: list[dict]) -> list[dict]:
    """The last row written for each step, in step order (rows of rolled-back segments are superseded)."""
    last: dict[int, dict] = {}
    for row in rows:
        last[row["step"]] = row
    return [last[step] for step in sorted(last)]


def assert_same_main_line(got: list[dict], expected: list[dict], ignore=RUN_KEYS_IGNORED) -> None:
    """Every main-line step once, with the same metrics (floats within rel 1e-6) as the uninterrupted run."""
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert_rows_close(got, expected, ignore=ignore)


class ServiceRun:
    """One `npo up` run folder and the commands a user would type against it."""

    def __init__(self, folder: Path, overrides=FAULT_RUN, replicas: int = 1, config: str = "configs/tiny.yaml"):
        self.folder, self.overrides, self.replicas, self.config = Path(folder), tuple(overrides), replicas, config

    def up(self, *extra: str) -> None:
        sets = [arg for item in self.overrides for arg in ("--set", item)]
        done = npo(
            "up", "--config", self.config, *sets, "--out", str(self.folder), "--replicas", str(self.replicas), *extra
        )
        assert done.returncode == 0, done.stderr[-3000:]

    def drive(self) -> subprocess.Popen:
        """`npo train --connect DIR --no-progress` in the background (stdout/stderr to DIR/driver.log)."""
        log = open(self.folder / "driver.log", "w")  # noqa: SIM115 - closed by finish()
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "train", "--connect", str(self.folder), "--no-progress"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def finish(self, driver: subprocess.Popen, timeout: float = 900) -> int:
        """Wait for the driver to end; its exit status."""
        try:
            return driver.wait(timeout)
        finally:
            if driver.poll() is None:
                driver.kill()

    def driver_log(self) -> str:
        return (self.folder / "driver.log").read_text(errors="replace")

    def rows(self) -> list[dict]:
        path = self.folder / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def main_line(self) -> list[dict]:
        return main_line(self.rows())

    def events(self) -> list[dict]:
        path = self.folder / "interventions.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_for_step(self, step: int, timeout: float = 600) -> None:
        """Until a metrics row of `step` or later is written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(r.get("step", -1) >= step for r in self.rows()):
                return
            time.sleep(0.05)
        pytest.fail(f"no row of step {step} within {timeout} s; driver log:\n{self.driver_log()[-2000:]}")

    def service(self, name: str):
        return next(s for s in read_state(self.folder) if s.name == name)

    def kill(self, name: str) -> int:
        """SIGKILL the service `name` (its pid from services.json); the pid killed."""
        pid = self.service(name).pid
        os.kill(pid, signal.SIGKILL)
        return pid

    def restart(self, name: str) -> subprocess.CompletedProcess:
        done = npo("restart", str(self.folder), name)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    def down(self) -> None:
        npo("down", str(self.folder))


_REFERENCES: dict[tuple, ServiceRun] = {}


def reference_run(tmp_path_factory, overrides=FAULT_RUN, replicas: int = 1) -> ServiceRun:
    """An uninterrupted service-mode run of (overrides, replicas), made once per test session."""
    key = (tuple(overrides), replicas)
    if key not in _REFERENCES:
        run = ServiceRun(tmp_path_factory.mktemp("reference") / "svc", overrides, replicas)
        run.up()
        try:
            driver = run.drive()
            assert run.finish(driver) == 0, run.driver_log()[-3000:]
        finally:
            run.down()
        _REFERENCES[key] = run
    return _REFERENCES[key]
