"""InterventionRecords: durable, one running intervention at a time, state that survives a SIGKILL."""

import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.controller.errors import Busy, Conflict, NotFound
from services.controller.records import InterventionRecords

REPO = Path(__file__).resolve().parents[1]


def test_round_trip_order_and_one_running_at_a_time(tmp_path):
    records = InterventionRecords(tmp_path / "c.db")
    first = records.start("rollback", {"step": 3})
    assert first.id == "iv-000001" and first.state == "running" and records.running().id == first.id
    with pytest.raises(Busy) as busy:
        records.start("autonpo", {})
    assert busy.value.running_id == first.id
    records.update(first.id, readings={"reward_ema": 0.5, "entropy_ema": math.nan}, candidates=[{"delta": 10}])
    records.add_command(first.id, "Learner.Rollback", {"to_step": 3}, 3)
    done = records.finish(first.id, "succeeded", outcome={"step": 3})
    assert done.state == "succeeded" and records.running() is None and done.updated_unix_ms >= done.created_unix_ms
    with pytest.raises(Conflict, match="ended"):
        records.finish(first.id, "abandoned")
    second = records.start("early_bootstrap", {"scout_steps": 2})
    assert second.id == "iv-000002"
    records.finish(second.id, "failed", error="boom")
    assert [iv.id for iv in records.list()] == [second.id, first.id]
    assert [iv.id for iv in records.list(limit=1, offset=1)] == [first.id]
    assert [iv.id for iv in records.list(kind="rollback")] == [first.id]
    records.close()

    reopened = InterventionRecords(tmp_path / "c.db")
    again = reopened.get(first.id)
    assert again.to_dict() == done.to_dict() and again.state == "succeeded"
    assert again.readings == {"reward_ema": 0.5, "entropy_ema": None}  # NaN is stored as null, never as 0
    assert again.candidates == [{"delta": 10}] and again.outcome == {"step": 3}
    assert again.commands[0]["call"] == "Learner.Rollback" and again.commands[0]["result"] == 3
    assert reopened.get(second.id).error == "boom" and reopened.get("iv-999999") is None
    assert reopened.start("autonpo", {}).id == "iv-000003"  # ids keep increasing after a reopen

    with pytest.raises(ValueError, match="kind"):
        reopened.start("reboot", {})
    with pytest.raises(ValueError, match="state"):
        reopened.finish("iv-000003", "running")
    with pytest.raises(ValueError, match="request"):
        reopened.update("iv-000003", request={})
    with pytest.raises(NotFound):
        reopened.add_command("iv-999999", "Learner.Pause", {}, None)
    reopened.set_state("autonpo", {"cooldown_until": 40, "enabled": True})
    assert InterventionRecords(tmp_path / "c.db").get_state("autonpo") == {"cooldown_until": 40, "enabled": True}
    assert reopened.get_state("missing", 7) == 7


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    records = InterventionRecords(tmp_path / "c.db")
    looped: dict = {}
    looped["self"] = looped  # not serialisable: the insert fails inside its transaction
    with pytest.raises(RecursionError):
        records.start("rollback", looped)
    assert records.running() is None and records.list() == []
    assert records.start("rollback", {"step": 1}).id == "iv-000001"


@pytest.mark.parametrize("shared", [True, False], ids=["one-instance", "one-instance-per-thread"])
def test_concurrent_starts_have_exactly_one_winner(tmp_path, shared):
    path = tmp_path / "c.db"
    common = InterventionRecords(path)
    barrier = threading.Barrier(8)
    wins, losers = [], []

    def attempt():
        records = common if shared else InterventionRecords(path)
        barrier.wait()
        try:
            wins.append(records.start("rollback", {}).id)
        except Busy as busy:
            losers.append(busy.running_id)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins == ["iv-000001"] and losers == ["iv-000001"] * 7
    assert [iv.id for iv in common.list()] == ["iv-000001"]


def test_a_committed_write_survives_sigkill_and_an_uncommitted_one_is_not_visible(tmp_path):
    path = tmp_path / "c.db"
    code = (
        "import os, signal\n"
        "from services.controller.records import InterventionRecords\n"
        f"r = InterventionRecords({str(path)!r})\n"
        "iv = r.start('autonpo', {'step': 9})\n"
        "r.add_command(iv.id, 'Learner.Pause', {}, {'state': 'paused'})\n"
        "r.set_state('autonpo', {'cooldown_until': 19})\n"
        "def half(cur):\n"  # a transaction killed before its COMMIT
        "    cur.execute(\"UPDATE interventions SET state = 'succeeded'\")\n"
        "    cur.execute('DELETE FROM state')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "r._tx(half)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    records = InterventionRecords(path)
    running = records.running()
    assert running is not None and running.request == {"step": 9} and running.commands[0]["call"] == "Learner.Pause"
    assert running.commands[0]["result"] == {"state": "paused"}
    assert records.get_state("autonpo") == {"cooldown_until": 19}
    with pytest.raises(Busy):  # the recovered running intervention still blocks a second one
        records.start("rollback", {})
