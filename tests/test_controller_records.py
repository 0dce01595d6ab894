"""InterventionRecords: durable, one running intervention at a time, state that survives a SIGKILL."""

import os
import subprocess
import sys
import threading

import pytest

from services.controller.errors import Busy
from services.controller.records import InterventionRecords


def test_round_trip_order_and_one_running_at_a_time(tmp_path):
    records = InterventionRecords(tmp_path / "c.db")
    first = records.start("rollback", {"step": 3})
    assert first.id == "iv-000001" and first.state == "running" and records.running().id == first.id
    with pytest.raises(Busy) as busy:
        records.start("autonpo", {})
    assert busy.value.running_id == first.id
    records.update(first.id, readings={"reward_ema": 0.5}, candidates=[{"delta": 10, "s_hat": 0.2}])
    records.add_command(first.id, "Learner.Rollback", {"to_step": 3}, 3)
    done = records.finish(first.id, "succeeded", outcome={"step": 3})
    assert done.state == "succeeded" and records.running() is None
    second = records.start("early_bootstrap", {"scout_steps": 2})
    records.finish(second.id, "failed", error="boom")
    assert [iv.id for iv in records.list()] == [second.id, first.id]
    assert [iv.id for iv in records.list(kind="rollback")] == [first.id]
    again = InterventionRecords(tmp_path / "c.db").get(first.id)
    assert again.readings == {"reward_ema": 0.5} and again.commands[0]["call"] == "Learner.Rollback"
    assert again.commands[0]["result"] == 3 and again.outcome == {"step": 3}
    with pytest.raises(ValueError, match="kind"):
        records.start("reboot", {})
    with pytest.raises(ValueError, match="state"):
        records.finish(second.id, "running")
    records.set_state("autonpo", {"cooldown_until": 40})
    assert InterventionRecords(tmp_path / "c.db").get_state("autonpo") == {"cooldown_until": 40}
    assert records.get_state("missing", 7) == 7


def test_concurrent_starts_have_exactly_one_winner(tmp_path):
    path = tmp_path / "c.db"
    InterventionRecords(path)
    wins, losses = [], []

    def attempt():
        try:
            wins.append(InterventionRecords(path).start("rollback", {}).id)
        except Busy:
            losses.append(1)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7


def test_a_committed_write_survives_sigkill(tmp_path):
    path = tmp_path / "c.db"
    code = (
        "import os, signal, sys\n"
        "from services.controller.records import InterventionRecords\n"
        f"r = InterventionRecords({str(path)!r})\n"
        "iv = r.start('autonpo', {'step': 9})\n"
        "r.add_command(iv.id, 'Learner.Pause', {}, {'state': 'paused'})\n"
        "r.set_state('autonpo', {'cooldown_until': 19})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd(), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    records = InterventionRecords(path)
    running = records.running()
    assert running is not None and running.request == {"step": 9} and running.commands[0]["call"] == "Learner.Pause"
    assert records.get_state("autonpo") == {"cooldown_until": 19}
