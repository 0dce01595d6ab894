"""`npo up` / `npo train --connect` / `npo down` as a user runs them: real processes on 127.0.0.1 ports."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.ops.state import STATE_FILE, read_state

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--set", "train.steps=4", "--set", "train.prompts_per_step=8", "--set", "train.threads=1",
    "--set", "eval.every=2", "--set", "eval.num_prompts=16", "--set", "checkpoint.every=2",
    "--set", "method=npo", "--set", "npo.early={enabled: true, at_step: 0, delta: 2}",
]  # fmt: skip


def npo(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of nobody here is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_up_train_connect_down(tmp_path):
    run = tmp_path / "svc"
    up = npo("up", "--config", "configs/tiny.yaml", *SMALL, "--out", str(run), "--replicas", "2")
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        state = read_state(run)
        assert [s.name for s in state] == ["guidance_cache", "rollout-0", "rollout-1", "learner", "controller"]
        assert all(s.address.startswith("127.0.0.1:") and alive(s.pid) for s in state)
        assert "learner" in up.stdout and "npo train --connect" in up.stdout
        again = npo("up", "--config", "configs/tiny.yaml", "--out", str(run))
        assert again.returncode == 2 and "already up" in again.stderr

        train = npo("train", "--connect", str(run), "--no-progress")
        assert train.returncode == 0, train.stderr[-3000:]
        assert "report:" in train.stdout
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["segment"] for r in rows] == ["scout", "scout", "npo_replay", "npo_replay", "grpo", "grpo", "final"]
        assert all(r["weight_sync_seconds"] > 0 for r in rows[:-1])  # the weights went to the replicas each step
        assert (run / "report.md").is_file()
        events = [json.loads(line)["event"] for line in (run / "interventions.jsonl").read_text().splitlines()]
        assert events == ["scout_start", "guides", "rollback"]

        finished = npo("train", "--connect", str(run), "--no-progress")
        assert finished.returncode == 0 and "already finished" in finished.stdout
        misuse = npo("train", "--connect", str(run), "--set", "train.steps=9")
        assert misuse.returncode == 2 and "learner's run config applies" in misuse.stderr
    finally:
        down = npo("down", str(run))
    assert down.returncode == 0 and "learner" in down.stdout
    deadline = time.monotonic() + 10
    while any(alive(s.pid) for s in state) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(s.pid) for s in state)
    assert not (run / STATE_FILE).exists()


def test_connect_and_down_without_services_are_clear_errors(tmp_path):
    missing = npo("down", str(tmp_path))
    assert missing.returncode == 2 and "nothing started there" in missing.stderr
    bad = npo("train", "--connect", "not-an-address")
    assert bad.returncode == 2 and "expected a folder of `npo up`" in bad.stderr
    nobody = npo("train", "--connect", "127.0.0.1:9", "--no-progress")
    assert nobody.returncode == 1 and "127.0.0.1:9" in nobody.stderr and "Traceback" not in nobody.stderr


@pytest.mark.slow
def test_a_service_that_fails_to_start_stops_the_others(tmp_path):
    run = tmp_path / "bad"
    # A Redis URL nobody answers on: the cache service exits; `up` reports its log and leaves nothing running.
    failed = npo("up", "--config", "configs/tiny.yaml", "--set", "cache.url=redis://127.0.0.1:9/0", "--out", str(run))
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "guidance_cache exited" in failed.stderr and "Traceback" not in failed.stderr.split("its log")[0]
    assert not (run / STATE_FILE).exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run / "service-config.yaml") not in ps


@pytest.mark.slow
def test_controller_reads_prometheus_and_survives_sigkill(tmp_path):
    """`npo up --prometheus`: the controller reads PromQL; killed with SIGKILL during an intervention and restarted,
    it knows that intervention (re-attached and finished, or abandoned) and its history; the run still ends."""
    import shutil

    from services.ops.control import open_controller

    if shutil.which("prometheus") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the prometheus binary is not installed; CI must run this test (.ci/run installs it)")
        pytest.skip("the prometheus binary is not installed")
    run = tmp_path / "ctl"
    sets = ["--set", "train.steps=24", "--set", "train.threads=1", "--set", "eval.every=0", "--set", "method=grpo",
            "--set", "checkpoint.every=2", "--set", "train.prompts_per_step=8"]  # fmt: skip
    up = npo("up", "--config", "configs/tiny.yaml", *sets, "--out", str(run), "--prometheus")
    assert up.returncode == 0, up.stderr[-3000:]
    train = None
    try:
        command = [sys.executable, "-m", "services.cli", "train", "--connect", str(run), "--no-progress"]
        train = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = open_controller(str(run))
        deadline = time.monotonic() + 180
        while True:
            status = client.status()
            if status["metrics"]["ok"] and status["step"] >= 3:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status["metrics"]["source"].startswith("prometheus http://127.0.0.1:")
        assert status["reward"] is not None and status["entropy"] is not None
        first = client.early_bootstrap(scout_steps=4)
        controller = next(s for s in read_state(run) if s.name == "controller")
        os.kill(controller.pid, 9)
        restarted = npo("restart", str(run), "controller")
        assert restarted.returncode == 0, restarted.stderr[-2000:]
        client = open_controller(str(run))
        record = client.intervention(first["id"])
        if any(c["call"] == "Controller.Reattach" for c in record["commands"]):  # killed during its scout segment
            while record["state"] == "running":
                time.sleep(0.5)
                record = client.intervention(first["id"])
            assert record["state"] == "succeeded", record
        else:  # killed before its scout segment was accepted: what never reached the learner is abandoned
            assert record["state"] == "abandoned" and "restarted" in record["error"]
        assert [iv["id"] for iv in client.interventions()] == [first["id"]]
        assert client.status()["running_intervention"] is None
        out, err = train.communicate(timeout=400)
        assert train.returncode == 0, err[-3000:]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["segment"] == "final" and rows[-1]["step"] == 24
    finally:
        if train is not None and train.poll() is None:
            train.kill()
        npo("down", str(run))


def test_controller_target_reads_the_run_folder(tmp_path, monkeypatch):
    from npo.core.config import ConfigError
    from services.ops.state import Started, controller_target, write_state

    monkeypatch.delenv("NPO_API_TOKEN", raising=False)
    assert controller_target("http://127.0.0.1:8080") == ("http://127.0.0.1:8080", None)
    with pytest.raises(ConfigError, match="expected a folder of `npo up`"):
        controller_target(str(tmp_path / "missing"))
    write_state(tmp_path, tmp_path / "service-config.yaml", [Started("learner", 1, "127.0.0.1:5", "log")])
    with pytest.raises(ConfigError, match="no controller was started there"):
        controller_target(str(tmp_path))
    write_state(tmp_path, tmp_path / "service-config.yaml", [Started("controller", 1, "127.0.0.1:7", "log")])
    (tmp_path / "api-token").write_text("secret\n")
    assert controller_target(str(tmp_path)) == ("http://127.0.0.1:7", "secret")
    monkeypatch.setenv("NPO_API_TOKEN", "from-env")
    assert controller_target(str(tmp_path)) == ("http://127.0.0.1:7", "from-env")


def test_up_chooses_every_port_once_and_a_port_is_free_again_after_its_socket_closes():
    import socket

    from services.ops.launcher import plan_ports, port_free, wait_port_free

    names = ["guidance_cache", "rollout-0", "rollout-1", "learner", "learner-metrics", "controller", "prometheus"]
    ports = plan_ports("127.0.0.1", names, {"learner": 0, "controller": 0, "learner-metrics": 0})
    assert set(ports) == set(names) and len(set(ports.values())) == len(names)
    given = plan_ports("127.0.0.1", ["learner", "controller"], {"learner": ports["learner"], "controller": 0})
    assert given["learner"] == ports["learner"] and given["controller"] != ports["learner"]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        address = f"127.0.0.1:{held.getsockname()[1]}"
        assert not port_free(address) and not wait_port_free(address, 0.3)
    assert wait_port_free(address, 5.0)


def test_the_cache_keeps_its_data_in_the_run_folder_when_it_can(tmp_path, monkeypatch):
    from npo.runtime.run_config import load_run_config
    from services.ops import launcher

    cfg = load_run_config(None, [])
    monkeypatch.setattr(launcher, "cache_data_supported", lambda: True)
    assert launcher.cache_args(cfg, "127.0.0.1", 5, tmp_path)[-2:] == ["--data-dir", str(tmp_path)]
    assert "--data-dir" not in launcher.cache_args(load_run_config(None, ["cache.url=redis://h:1/0"]), "h", 5, tmp_path)
    monkeypatch.setattr(launcher, "cache_data_supported", lambda: False)
    assert "--data-dir" not in launcher.cache_args(cfg, "127.0.0.1", 5, tmp_path)


def test_status_names_dead_and_recovering_services_even_without_a_controller(tmp_path, capsys):
    from services.controller.client import ControllerClient
    from services.grpc_common import add_health, bind, make_server
    from services.ops.control import show_status
    from services.ops.launcher import free_ports
    from services.ops.state import Started, write_state

    sleeper = [sys.executable, "-c", "import time; time.sleep(120)", "services.rollout"]  # looks like a service
    live = subprocess.Popen(sleeper)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    server = make_server(max_workers=2)
    add_health(server, [])
    port = bind(server, "127.0.0.1:0")
    server.start()
    nobody, api = free_ports("127.0.0.1", 2)
    try:
        write_state(tmp_path, tmp_path / "service-config.yaml", [
            Started("guidance_cache", live.pid, f"127.0.0.1:{port}", "log"),
            Started("rollout-1", gone.pid, f"127.0.0.1:{nobody}", "log"),
            Started("learner", live.pid, f"127.0.0.1:{nobody}", "log"),
            Started("controller", gone.pid, f"127.0.0.1:{api}", "log", f"http://127.0.0.1:{api}"),
        ])  # fmt: skip
        client = ControllerClient(f"http://127.0.0.1:{api}", timeout_s=2)
        client.run_dir = str(tmp_path)
        code = show_status(client)
    finally:
        server.stop(None)
        live.kill()
        live.wait()
    out = capsys.readouterr().out
    assert code == 1 and "controller: unreachable (" in out
    assert f"guidance_cache: serving (pid {live.pid}, 127.0.0.1:{port})" in out
    assert f"rollout-1: dead (pid {gone.pid} gone)" in out and f"controller: dead (pid {gone.pid} gone)" in out
    assert "learner: recovering (not serving yet: unavailable)" in out and "Traceback" not in out
