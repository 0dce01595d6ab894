"""Fault tests of the guidance cache in service mode (slow: whole `npo up` runs on 127.0.0.1, see tests/faults.py).

(a) The cache service is SIGKILLed during an NPO replay (the replay of steps 5-10 reads the guides cached at step 10)
    and started again with `npo restart DIR guidance_cache`: the learner waits for it (GuidanceCacheClient retries),
    the restarted cache loads its append-only file, and the run's main line equals the uninterrupted reference.
(b) Only the cache's embedded Redis (its child process) is SIGKILLed: the cache restarts it by itself on the same
    socket and data folder, and the run's main line equals the reference.

Both need the cache to come back with its data at the same address: `npo up` passing `--data-dir DIR/cache-data` and
a fixed port. Until the launcher does so, `persistent_cache` restarts the cache once before the run starts with those
two arguments added to its recorded command (nothing is stored yet then).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time

import grpc
import pytest
from faults import FAULT_RUN, ServiceRun, assert_same_main_line, reference_run
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.guidance_cache.client import GuidanceCacheClient
from services.ops.state import replace_service

pytestmark = pytest.mark.slow

CACHE = "guidance_cache"


def persistent_cache(run: ServiceRun) -> None:
    """Make the cache of `run` keep its data in DIR/cache-data and listen on a fixed port (its current one), by
    restarting it with those arguments, unless its recorded command already has them."""
    entry = run.service(CACHE)
    argv = list(entry.argv)
    at = argv.index("--address") + 1
    if "--data-dir" in argv and not argv[at].endswith(":0"):
        return
    argv[at] = entry.address
    if "--data-dir" not in argv:
        argv += ["--data-dir", str(run.folder / "cache-data")]
    replace_service(run.folder, dataclasses.replace(entry, argv=argv))
    run.restart(CACHE)
    assert run.service(CACHE).address == entry.address


def wait_for_rows(run: ServiceRun, step: int, count: int, timeout: float = 900) -> None:
    """Until `count` metrics rows of `step` are written (the second one: the step redone in a replay)."""
    deadline = time.monotonic() + timeout
    while sum(r.get("step") == step for r in run.rows()) < count:
        assert time.monotonic() < deadline, f"no row {count} of step {step}; driver log:\n{run.driver_log()[-2000:]}"
        time.sleep(0.05)


def cache_contents(address: str, run_name: str) -> dict:
    with GuidanceCacheClient(address, timeout_s=5.0, retry_deadline_s=30.0) as client:
        stats = client.stats(run_name)
        return {"stats": stats, "mistakes": client.get_mistakes(run_name, 0, 10**9)}


def assert_nothing_lost(before: dict, after: dict) -> None:
    """Every guide step with at least its guides, every mistake record (no rollback between the two readings)."""
    for step, guides in before["stats"]["guide_steps"].items():
        assert after["stats"]["guide_steps"].get(step, 0) >= guides, (before, after)
    assert before["mistakes"].items() <= after["mistakes"].items(), (before, after)


def serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            request = health_pb2.HealthCheckRequest(service="npo.v1.GuidanceCacheService")
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1.0)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def learner_waits(run: ServiceRun) -> list[float]:
    """Seconds each learner call waited for the cache (from its `answered after` log lines)."""
    text = (run.folder / "logs" / "learner.log").read_text(errors="replace")
    return [float(s) for s in re.findall(r"GuidanceCache\.\w+ to \S+: answered after ([\d.]+) s", text)]


def report(name: str, **figures) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def start(tmp_path) -> tuple[ServiceRun, subprocess.Popen]:
    run = ServiceRun(tmp_path / "svc", FAULT_RUN)
    run.up()
    persistent_cache(run)
    return run, run.drive()


def test_cache_killed_during_a_replay_comes_back_with_every_guide(tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory)
    run, driver = start(tmp_path)
    try:
        wait_for_rows(run, 6, 2)  # replaying 5 -> 10 with the guides cached at step 10
        address = run.service(CACHE).address
        before = cache_contents(address, run.folder.name)
        killed = time.monotonic()
        run.kill(CACHE)
        time.sleep(1.0)  # the learner's calls meet a dead cache and wait
        run.restart(CACHE)
        restarted = time.monotonic()
        assert run.service(CACHE).address == address
        assert_nothing_lost(before, cache_contents(address, run.folder.name))
        assert run.finish(driver) == 0, run.driver_log()[-3000:]
        assert_same_main_line(run.main_line(), reference.main_line())
        report(
            "cache SIGKILLed in a replay",
            down_s=f"{restarted - killed:.2f}",
            learner_waits_s=learner_waits(run),
            rows_redone=len(run.rows()) - len(reference.rows()),
            guides=before["stats"]["guides"],
            mistakes=len(before["mistakes"]),
        )
    finally:
        run.down()


def test_cache_redis_killed_during_a_replay_is_restarted_by_the_cache(tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory)
    run, driver = start(tmp_path)
    try:
        wait_for_rows(run, 6, 2)
        entry = run.service(CACHE)
        before = cache_contents(entry.address, run.folder.name)
        children = subprocess.run(["pgrep", "-P", str(entry.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 1, children  # the embedded valkey-server
        killed = time.monotonic()
        os.kill(int(children[0]), signal.SIGKILL)
        while serving(entry.address):  # NOT_SERVING once the watch sees it (or already back)
            if time.monotonic() - killed > 1.0:
                break
            time.sleep(0.01)
        while not serving(entry.address):
            assert time.monotonic() - killed < 10.0, "the cache did not restart its Redis within 10 s"
            time.sleep(0.01)
        recovered = time.monotonic() - killed
        assert_nothing_lost(before, cache_contents(entry.address, run.folder.name))
        assert run.service(CACHE).pid == entry.pid  # the cache itself kept running
        assert run.finish(driver) == 0, run.driver_log()[-3000:]
        assert_same_main_line(run.main_line(), reference.main_line())
        log = (run.folder / "logs" / f"{CACHE}.log").read_text(errors="replace")
        assert "embedded Redis restarted in" in log, log[-2000:]
        report(
            "cache's Redis SIGKILLed in a replay",
            serving_again_s=f"{recovered:.2f}",
            restart_logged=re.findall(r"embedded Redis restarted in ([\d.]+) s", log),
            learner_waits_s=learner_waits(run),
            rows_redone=len(run.rows()) - len(reference.rows()),
        )
    finally:
        run.down()
