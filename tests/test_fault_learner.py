"""Fault test of a learner crash: a seeded service-mode run (FAULT_RUN) with the learner SIGKILLed during the NPO
replay of steps 15-20, restarted with `npo restart DIR learner`, finishes with the rows of an uninterrupted run.

The restarted learner finds checkpoints in its run folder and resumes like `npo train --resume` (from the one saved
last: step 15 of the replay, after the rollback), inside the replay segment its plan was in; the driver (`npo train
--connect`) waits for it and continues the main line; the rows written after the checkpoint are dropped and redone.
The recovery figures (kill -> first new row, steps redone) are printed (`pytest -s`).
"""

from __future__ import annotations

import time

import pytest
from faults import FAULT_RUN, RUN_KEYS_IGNORED, ServiceRun, assert_same_main_line, reference_run
from rows import assert_rows_close

KILL_AFTER_REPLAY_STEP = 17


def seconds_until(predicate, timeout: float, what: str) -> float:
    """Seconds until `predicate` holds, polled every 50 ms (pytest.fail after `timeout`)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def common_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def checkpoint_folders(run: ServiceRun) -> set[str]:
    return {p.name for p in (run.folder / "checkpoints").iterdir() if p.name.startswith("step_")}


@pytest.mark.slow
def test_a_killed_learner_resumes_its_replay_and_the_run_is_unchanged(tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory, FAULT_RUN)
    run = ServiceRun(tmp_path / "svc", FAULT_RUN)
    run.up()
    try:
        driver = run.drive()

        def in_late_replay() -> bool:
            return any(r["step"] >= KILL_AFTER_REPLAY_STEP and r["segment"] == "npo_replay" for r in run.rows())

        seconds_until(in_late_replay, 900, f"a replay row of step {KILL_AFTER_REPLAY_STEP}")
        run.kill("learner")
        killed = time.monotonic()
        at_kill, folders_at_kill = run.rows(), checkpoint_folders(run)
        run.restart("learner")
        restarted = time.monotonic() - killed

        def new_row() -> bool:
            rows = run.rows()
            return len(rows) > 0 and rows != at_kill[: len(rows)]

        recovery = seconds_until(new_row, 600, "a metrics row of the restarted learner") + restarted
        assert run.finish(driver) == 0, run.driver_log()[-3000:]
    finally:
        run.down()
    log = run.driver_log()
    assert "is unreachable" in log and "answers again" in log and "run finished" in log
    assert_same_main_line(run.main_line(), reference.main_line())
    assert_rows_close(run.rows(), reference.rows(), ignore=RUN_KEYS_IGNORED)  # row for row, the superseded too
    untimed = [[(e["event"], e["step"]) for e in r.events()] for r in (run, reference)]
    assert untimed[0] == untimed[1]
    assert folders_at_kill <= checkpoint_folders(run)  # no checkpoint lost
    kept = common_prefix(run.rows(), at_kill)
    redone = [r["step"] for r in at_kill[kept:]]
    print(
        f"\nlearner SIGKILLed after the replay row of step {at_kill[-1]['step']}: `npo restart` returned "
        f"{restarted:.1f} s later, first new row {recovery:.1f} s after the kill; steps redone: {len(redone)} "
        f"({redone}); rows and main line equal to the uninterrupted run"
    )
