"""Fault tests of the controller and of stable addresses, with real processes of `npo up` on 127.0.0.1.

- The controller SIGKILLed while an intervention's scout segment runs, restarted with `npo restart DIR controller`:
  it re-attaches (services/controller/engine.py, module docstring), the intervention ends as it would have, no
  record is lost, and the run's main line equals that of the same run without the kill. While it is down,
  `npo status DIR` says so and still lists the other services.
- The learner SIGKILLed and restarted with `npo restart DIR learner`: it keeps its gRPC and /metrics addresses, the
  controller shows it unreachable meanwhile (no HTTP 500), and a real Prometheus scraping the same target has its
  series again after the restart.

Each test prints its recovery figures (kill -> serving again, kill -> next metrics row, steps redone).
"""

import json
import time
import urllib.parse
import urllib.request

import pytest
from faults import ServiceRun, assert_same_main_line, npo

from services.ops.control import open_controller

INTERVENED_RUN = (
    "method=grpo", "train.steps=16", "train.prompts_per_step=8", "train.threads=1", "eval.every=8",
    "eval.num_prompts=16", "checkpoint.every=2", "npo.guide_samples=4",
)  # fmt: skip
"""A GRPO main line of 16 steps on which an early bootstrap (scout 6 from step 0, replay 0 -> 6) is started over
REST before the driver runs: every command lands at a known step, so two such runs give the same rows."""
SCOUT_STEPS = 6


def wait_until(predicate, timeout_s=300.0, what="a condition", poll_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


def last_call(record):
    return record["commands"][-1] if record["commands"] else {}


def intervened_run(folder, kill_controller: bool) -> tuple[ServiceRun, dict]:
    """`npo up`, an early bootstrap at step 0 (killing and restarting the controller during its scout segment when
    asked), then `npo train --connect` to the end. Returns the run and what was measured."""
    run, measured = ServiceRun(folder, INTERVENED_RUN), {}
    run.up()
    try:
        client = open_controller(str(run.folder))
        iv = client.early_bootstrap(scout_steps=SCOUT_STEPS)["id"]
        if kill_controller:
            scouting = lambda: last_call(client.intervention(iv)).get("args", {}).get("label") == "scout"  # noqa: E731
            wait_until(scouting, what="the scout segment")
            killed_pid = run.kill("controller")
            killed = time.monotonic()
            down = npo("status", str(run.folder))
            measured["status_while_down"] = (down.returncode, down.stdout, down.stderr)
            run.restart("controller")
            measured["serving_again_s"] = time.monotonic() - killed
            measured["killed_pid"] = killed_pid
            client = open_controller(str(run.folder))
        record = wait_until(lambda: (r := client.intervention(iv))["state"] != "running" and r, what="its end")
        measured.update(record=record, interventions=client.interventions())
        driver = run.drive()
        assert run.finish(driver) == 0, run.driver_log()[-3000:]
    finally:
        run.down()
    return run, measured


@pytest.mark.slow
def test_a_controller_killed_mid_intervention_reattaches_and_the_run_equals_an_uninterrupted_one(tmp_path):
    reference, expected = intervened_run(tmp_path / "reference", kill_controller=False)
    assert expected["record"]["state"] == "succeeded", expected["record"]
    run, got = intervened_run(tmp_path / "killed", kill_controller=True)

    code, out, err = got["status_while_down"]
    assert code == 1 and "controller: unreachable (" in out and "Traceback" not in out + err
    assert f"controller: dead (pid {got['killed_pid']} gone)" in out and "learner: serving" in out
    record = got["record"]
    assert record["state"] == "succeeded", record
    calls = [c["call"] for c in record["commands"]]
    assert "Controller.Reattach" in calls and calls.count("Learner.RunSegment") == 2  # scout, replay: none redone
    assert [iv["id"] for iv in got["interventions"]] == [record["id"]]  # no record lost, none added
    assert record["outcome"]["guides"] == expected["record"]["outcome"]["guides"]
    assert_same_main_line(run.main_line(), reference.main_line())
    redone = len(run.rows()) - len(reference.rows())
    assert redone == 0
    print(f"\ncontroller SIGKILL mid-scout: serving again after {got['serving_again_s']:.1f} s, steps redone "
          f"{redone}, main line equal: yes")  # fmt: skip


def _prometheus_query(url: str, expr: str) -> list:
    query = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(query, timeout=5) as reply:  # noqa: S310 - the run's own Prometheus on loopback
        return json.loads(reply.read())["data"]["result"]


def _scraped_since(url: str, since_unix: float) -> bool:
    """True when Prometheus has an npo_step sample taken after `since_unix` and the learner's target is up."""
    try:
        stamps = _prometheus_query(url, "timestamp(npo_step)")
        up = _prometheus_query(url, 'up{job="npo-learner"}')
    except OSError:
        return False
    fresh = any(float(s["value"][1]) > since_unix for s in stamps)
    return fresh and any(float(s["value"][1]) == 1.0 for s in up)


@pytest.mark.slow
def test_a_restarted_learner_keeps_its_addresses_and_prometheus_scrapes_it_again(tmp_path):
    import shutil

    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus binary is not installed (Debian's prometheus package)")
    overrides = ("method=grpo", "train.steps=40", "train.prompts_per_step=8", "train.threads=1", "eval.every=0",
                 "checkpoint.every=5")  # fmt: skip
    run = ServiceRun(tmp_path / "svc", overrides)
    run.up("--prometheus")
    driver = None
    try:
        before = run.service("learner")
        prometheus = run.service("prometheus").metrics_url
        driver = run.drive()
        run.wait_for_step(7)
        wait_until(lambda: _scraped_since(prometheus, 0.0), 60, "Prometheus scraping the learner")
        last_step = max(r["step"] for r in run.rows())
        rows_at_kill = len(run.rows())
        run.kill("learner")
        killed, killed_unix = time.monotonic(), time.time()
        status = npo("status", str(run.folder))
        assert status.returncode == 0 and "learner: unreachable" in status.stdout, status.stdout + status.stderr
        assert "learner: dead (pid" in status.stdout and "HTTP 500" not in status.stdout + status.stderr
        run.restart("learner")
        serving_again = time.monotonic() - killed
        after = run.service("learner")
        assert (after.address, after.metrics_url) == (before.address, before.metrics_url)
        assert after.pid != before.pid
        if driver.poll() is not None:  # a driver that gave up on the learner: drive it again
            driver = run.drive()
        wait_until(lambda: len(run.rows()) > rows_at_kill, 300, "a metrics row after the restart")
        next_row = time.monotonic() - killed
        wait_until(lambda: _scraped_since(prometheus, killed_unix), 120, "a sample scraped after the restart")
        scraped = time.monotonic() - killed
        new_steps = [r["step"] for r in run.rows()[rows_at_kill:]]
        redone = sum(1 for s in new_steps if s <= last_step)
        status = npo("status", str(run.folder))
        assert status.returncode == 0 and "learner: serving" in status.stdout, status.stdout + status.stderr
        print(f"\nlearner SIGKILL at step {last_step}: serving again after {serving_again:.1f} s, next row after "
              f"{next_row:.1f} s (step {new_steps[0]}), scraped by Prometheus after {scraped:.1f} s, steps redone "
              f"so far {redone}")  # fmt: skip
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        run.down()
