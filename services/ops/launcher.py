"""`npo up` / `npo down` / `npo restart`: the roles of one run as local processes on loopback ports.

    npo up --config configs/tiny.yaml --out runs/svc --replicas 2     # cache (+ embedded Redis), 2 rollout, learner
    npo train --connect runs/svc                                      # drive the run through LearnerService
    npo down runs/svc                                                 # stop what `up` started

`up` resolves the run config once (written to DIR/service-config.yaml, which every process reads), warms the model
cache once (so the processes do not all build it), then starts the guidance cache service (with an embedded Redis
unless cache.url names one) and the rollout replicas side by side, and the learner last, pointed at them. Each
process listens on a free port (or the one asked for), prints `serving on HOST:PORT` to its log (DIR/logs/), and is
checked with grpc.health.v1 before `up` reports it. What was started goes to DIR/services.json (services/ops/state.py),
which `down` reads; a process that fails to start stops everything `up` started and its log's tail is shown.
`npo train --connect` is services/ops/connect.py.

The learner's run folder is DIR itself (checkpoints/, metrics.jsonl, interventions.jsonl, published/ weights).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from npo.core.config import ConfigError
from services.ops.state import (
    STATE_FILE,
    Started,
    api_token_file,
    read_state,
    remove_state,
    replace_service,
    write_state,
)

CONFIG_FILE = "service-config.yaml"
"""The resolved run config every process of `npo up` reads."""
SERVING = re.compile(r"serving on (\S+:\d+)")
"""The line each service prints once it listens."""
METRICS = re.compile(r"metrics on (http://\S+/metrics)")
"""The learner's line naming its /metrics endpoint."""


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def spawn(name: str, argv: Sequence[str], log_dir: Path) -> tuple[subprocess.Popen, Path]:
    """Start `argv` in its own session (Ctrl-C in this terminal does not reach it), output to log_dir/<name>.log."""
    log = log_dir / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
    return proc, log


def wait_serving(name: str, proc: subprocess.Popen, log: Path, deadline: float) -> tuple[str, str]:
    """Wait until the process printed its `serving on HOST:PORT` line; returns (address, metrics url or "").
    RuntimeError with the log's tail when it exits first or the deadline passes."""
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = SERVING.search(text)
        if found:
            metrics = METRICS.search(text)
            return found.group(1), metrics.group(1) if metrics else ""
        if proc.poll() is not None:
            tail = _log_tail(log)
            raise RuntimeError(f"{name} exited with code {proc.returncode} while starting; its log ({log}):\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start in time; its log ({log}):\n{_log_tail(log)}")
        time.sleep(0.1)


def wait_healthy(address: str, deadline: float) -> None:
    """Wait until grpc.health.v1 at `address` answers SERVING (RuntimeError at the deadline)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address}: not healthy in time")
            time.sleep(0.1)


def wait_http(url: str, deadline: float) -> None:
    """Wait until `url` answers 200 (RuntimeError at the deadline)."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as reply:  # noqa: S310 - our own loopback URL
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: not answering in time")
        time.sleep(0.1)


def start_prometheus(run_dir: Path, host: str, metrics_url: str, logs: Path, deadline: float) -> Started:
    """A Prometheus server scraping the learner every second (config and data under run_dir/prometheus)."""
    folder = run_dir / "prometheus"
    folder.mkdir(exist_ok=True)
    target = urllib.parse.urlparse(metrics_url).netloc
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: npo-learner\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    argv = [shutil.which("prometheus") or "prometheus", f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address={host}:{port}"]  # fmt: skip
    proc, log = spawn("prometheus", argv, logs)
    entry = Started("prometheus", proc.pid, f"{host}:{port}", str(log), f"http://{host}:{port}", argv)
    try:
        wait_http(f"http://{host}:{port}/-/ready", deadline)
    except RuntimeError:
        stop([entry])
        raise RuntimeError(f"prometheus did not start; its log ({log}):\n{_log_tail(log)}") from None
    return entry


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # a reused pid is not ours to stop
        try:
            data = cmdline.read_bytes()
            return b"services." in data or b"prometheus" in data
        except OSError:
            return False
    return True


def stop(processes: Sequence[Started], timeout_s: float = 15.0) -> list[str]:
    """SIGTERM each process group (in the given order), SIGKILL what is still alive after `timeout_s`; returns
    the names stopped."""
    stopped = []
    for entry in processes:
        if _alive(entry.pid):
            with _suppress_lookup():
                os.killpg(entry.pid, signal.SIGTERM)
            stopped.append(entry.name)
    deadline = time.monotonic() + timeout_s
    for entry in processes:
        while _alive(entry.pid) and time.monotonic() < deadline:
            _reap(entry.pid)
            time.sleep(0.1)
        if _alive(entry.pid):
            with _suppress_lookup():
                os.killpg(entry.pid, signal.SIGKILL)
        _reap(entry.pid)
    return stopped


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is ProcessLookupError


def module_argv(module: str, *args: str) -> list[str]:
    """`python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def cache_args(cfg, host: str) -> list[str]:
    """Arguments of `python -m services.guidance_cache` for the run (embedded Redis unless cache.url)."""
    redis = ["--redis-url", cfg.cache.url] if cfg.cache.url else []
    return ["--address", f"{host}:0", "--prefix", cfg.cache.prefix, *redis]


def rollout_args(cfg, config_file: Path, host: str) -> list[str]:
    """Arguments of one `python -m services.rollout` replica."""
    threads = ["--threads", str(cfg.train.threads)] if cfg.train.threads else []
    return ["--config", str(config_file), "--address", f"{host}:0", *threads]


def controller_runs_autonpo(cfg, controller: bool) -> bool:
    """With the controller running AutoNPO, the learner trains the plain main line it intervenes on."""
    return controller and cfg.method.value == "autonpo" and cfg.controller.autonpo


def learner_args(
    cfg, config_file: Path, run_dir: Path, host: str, port: int, rollout: str, cache: str, metrics_port: int,
    controller: bool,
) -> list[str]:  # fmt: skip
    """Arguments of `python -m services.learner` pointed at the rollout replicas and the cache."""
    method = ["--set", "method=grpo"] if controller_runs_autonpo(cfg, controller) else []
    args = ["--config", str(config_file), *method, "--out", str(run_dir), "--address", f"{host}:{port}"]
    args += ["--rollout", rollout, "--cache", cache]
    return args + ["--metrics-port", str(metrics_port), "--metrics-address", host]


def controller_args(
    config_file: Path, run_dir: Path, host: str, port: int, learner: str, rollout: str, cache: str, metrics_url: str,
    prometheus_url: str = "",
) -> list[str]:  # fmt: skip
    """Arguments of `python -m services.controller` (its token in run_dir/api-token)."""
    args = ["--config", str(config_file), "--learner", learner, "--rollout", rollout, "--cache", cache,
            "--metrics-url", metrics_url, "--state", str(run_dir / "controller"), "--address", f"{host}:{port}",
            "--token-file", str(api_token_file(run_dir))]  # fmt: skip
    return args + (["--set", f"prometheus.url={prometheus_url}"] if prometheus_url else [])


def prepare_run(config: str | None, overrides: list[str], out: str | os.PathLike, replicas: int):
    """Resolve the run config once, write it to run_dir/service-config.yaml (every process reads it) and warm the
    model cache here (so the processes do not all build it). Returns (cfg, run_dir, config_file)."""
    import yaml

    from npo.runtime.run_config import load_run_config, run_config_to_dict
    from services.wiring import build_policy_and_task

    if replicas < 1:
        raise ConfigError(f"--replicas: must be >= 1, got {replicas}")
    run_dir = Path(out)
    if (run_dir / STATE_FILE).exists():
        running = [s.name for s in read_state(run_dir) if _alive(s.pid)]
        if running:
            raise ConfigError(f"{run_dir}: services already up ({', '.join(running)}); `npo down {run_dir}` first")
    cfg = load_run_config(config, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    config_file = (run_dir / CONFIG_FILE).resolve()
    config_file.write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))
    build_policy_and_task(cfg)
    return cfg, run_dir, config_file


def up(
    config: str | None,
    overrides: list[str],
    out: str | os.PathLike,
    *,
    replicas: int = 1,
    host: str = "127.0.0.1",
    learner_port: int = 0,
    metrics_port: int = 0,
    api_port: int = 0,
    controller: bool = True,
    prometheus: bool = False,
    timeout_s: float = 300.0,
) -> list[Started]:
    """Start the run's services (see the module docstring); returns what was started, in start order."""
    if prometheus and not shutil.which("prometheus"):
        raise ConfigError("--prometheus: no `prometheus` binary on PATH (Debian: apt-get install prometheus)")
    cfg, run_dir, config_file = prepare_run(config, overrides, out, replicas)
    logs = run_dir / "logs"
    deadline = time.monotonic() + timeout_s
    started: list[Started] = []
    spawned: list[Started] = []  # everything started, recorded or not: stopped when `up` fails
    try:
        first = {"guidance_cache": module_argv("services.guidance_cache", *cache_args(cfg, host))}
        for i in range(replicas):
            first[f"rollout-{i}"] = module_argv("services.rollout", *rollout_args(cfg, config_file, host))
        procs = {name: spawn(name, argv, logs) for name, argv in first.items()}
        spawned += [Started(name, proc.pid, "", str(log)) for name, (proc, log) in procs.items()]
        for name, (proc, log) in procs.items():
            address, _ = wait_serving(name, proc, log, deadline)
            started.append(Started(name, proc.pid, address, str(log), argv=first[name]))
        rollout = ",".join(s.address for s in started if s.name.startswith("rollout-"))
        cache = next(s.address for s in started if s.name == "guidance_cache")
        args = learner_args(cfg, config_file, run_dir, host, learner_port, rollout, cache, metrics_port, controller)
        learner_argv = module_argv("services.learner", *args)
        proc, log = spawn("learner", learner_argv, logs)
        spawned.append(Started("learner", proc.pid, "", str(log)))
        address, metrics_url = wait_serving("learner", proc, log, deadline)
        started.append(Started("learner", proc.pid, address, str(log), metrics_url, learner_argv))
        for entry in started:
            wait_healthy(entry.address, deadline)
        prometheus_url = ""
        if prometheus:
            entry = start_prometheus(run_dir, host, metrics_url, logs, deadline)
            spawned.append(entry)
            started.append(entry)
            prometheus_url = f"http://{entry.address}"
        if controller:
            args = controller_args(config_file, run_dir, host, api_port, address, rollout, cache, metrics_url,
                                   prometheus_url)  # fmt: skip
            controller_argv = module_argv("services.controller", *args)
            proc, log = spawn("controller", controller_argv, logs)
            spawned.append(Started("controller", proc.pid, "", str(log)))
            api, _ = wait_serving("controller", proc, log, deadline)
            started.append(Started("controller", proc.pid, api, str(log), f"http://{api}", controller_argv))
            wait_http(f"http://{api}/healthz", deadline)
    except BaseException:
        stop(list(reversed(spawned)))
        raise
    write_state(run_dir, config_file, started)
    return started


def down(run_dir: str | os.PathLike, timeout_s: float = 15.0) -> list[str]:
    """Stop what `npo up` started in run_dir (learner first); returns the names that were still running."""
    processes = read_state(run_dir)
    stopped = stop(list(reversed(processes)), timeout_s)
    remove_state(run_dir)
    return stopped


def restart(run_dir: str | os.PathLike, name: str, timeout_s: float = 120.0) -> Started:
    """Start service `name` of run_dir again with its recorded command (stopping it first if it still runs); the
    other services keep running. A restarted service listens on a new port when it was given port 0 (the learner
    and the controller keep theirs only when --learner-port / --api-port fixed them)."""
    run_dir = Path(run_dir)
    processes = read_state(run_dir)
    entry = next((s for s in processes if s.name == name), None)
    if entry is None:
        raise ConfigError(f"{name}: not a service of {run_dir} (have: {', '.join(s.name for s in processes)})")
    stop([entry])
    proc, log = spawn(name, entry.argv, run_dir / "logs")
    deadline = time.monotonic() + timeout_s
    if name == "prometheus":
        wait_http(f"{entry.metrics_url}/-/ready", deadline)
        fresh = Started(name, proc.pid, entry.address, str(log), entry.metrics_url, entry.argv)
    else:
        address, url = wait_serving(name, proc, log, deadline)
        url = f"http://{address}" if name == "controller" else url
        fresh = Started(name, proc.pid, address, str(log), url, entry.argv)
        if name == "controller":
            wait_http(f"{url}/healthz", deadline)
    replace_service(run_dir, fresh)
    return fresh
