"""`npo up` / `npo down` / `npo restart`: the roles of one run as local processes on fixed loopback ports.

    npo up --config configs/tiny.yaml --out runs/svc --replicas 2     # cache (+ embedded Redis), 2 rollout, learner
    npo train --connect runs/svc                                      # drive the run through LearnerService
    npo restart runs/svc rollout-1                                    # the same service again, on the same address
    npo down runs/svc                                                 # stop what `up` started

`up` resolves the run config once (written to DIR/service-config.yaml, which every process reads), warms the model
cache once (so the processes do not all build it), then starts the guidance cache service (with an embedded Redis
unless cache.url names one; its append-only file in DIR/cache-data) and the rollout replicas side by side, and the
learner last, pointed at them. Each process prints `serving on HOST:PORT` to its log (DIR/logs/) and is checked with
grpc.health.v1 before `up` reports it. What was started goes to DIR/services.json (services/ops/state.py), which
`down`, `restart` and `npo status` read; a process that fails to start stops everything `up` started and its log's
tail is shown. `npo train --connect` is services/ops/connect.py.

Stable addresses: `up` chooses every port once (the ones not given: the cache, each rollout replica, the learner's
gRPC and /metrics ports, the controller's API, Prometheus) and passes them explicitly, so each command line in
services.json names its address. `restart` runs that command again, after waiting (up to BIND_RETRY_S) for the old
socket to be released and retrying a start that failed to bind; the service comes back on the same address, where
the clients' gRPC channels reconnect by themselves and Prometheus scrapes the same target.

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
    backend,
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
BIND_RETRY_S = 10.0
"""How long `npo restart` waits for a service's old port to be free again (and retries a start that failed to
bind)."""
CACHE_DATA = "cache-data"
"""The run folder's subfolder holding the embedded Redis's append-only file."""


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


def start_prometheus(run_dir: Path, host: str, metrics_url: str, logs: Path, deadline: float, port: int = 0) -> Started:
    """A Prometheus server on host:port (0: a free one) scraping the learner every second (config and data under
    run_dir/prometheus)."""
    folder = run_dir / "prometheus"
    folder.mkdir(exist_ok=True)
    target = urllib.parse.urlparse(metrics_url).netloc
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: npo-learner\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = port or free_ports(host, 1)[0]
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


def _bindable_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the services bind: TIME_WAIT does not block
    return sock


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports free on `host` now (all held open together while they are chosen)."""
    socks = [_bindable_socket(host) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def port_free(address: str) -> bool:
    """True when `address` (host:port) can be bound now."""
    host, _, port = address.rpartition(":")
    with _bindable_socket(host) as sock:
        try:
            sock.bind((host, int(port)))
        except OSError:
            return False
    return True


def wait_port_free(address: str, timeout_s: float = BIND_RETRY_S) -> bool:
    """Wait up to `timeout_s` for `address` to be bindable (an old socket lingering); True when it is."""
    deadline = time.monotonic() + timeout_s
    while not port_free(address):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def alive(pid: int) -> bool:
    """True when `pid` runs and is one of ours (a service or Prometheus): not gone, not a zombie, not a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.exists():  # a reused pid is not ours to stop
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            data = proc.joinpath("cmdline").read_bytes()
            return b"services." in data or b"prometheus" in data
        except (OSError, IndexError):
            return False
    return True


def stop(processes: Sequence[Started], timeout_s: float = 15.0) -> list[str]:
    """SIGTERM each process group (in the given order), SIGKILL what is still alive after `timeout_s`; returns
    the names stopped."""
    stopped = []
    for entry in processes:
        if alive(entry.pid):
            with _suppress_lookup():
                os.killpg(entry.pid, signal.SIGTERM)
            stopped.append(entry.name)
    deadline = time.monotonic() + timeout_s
    for entry in processes:
        while alive(entry.pid) and time.monotonic() < deadline:
            _reap(entry.pid)
            time.sleep(0.1)
        if alive(entry.pid):
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


def cache_data_supported() -> bool:
    """Whether `python -m services.guidance_cache` takes --data-dir (read from its --help, in this process)."""
    import contextlib
    import io

    from services.guidance_cache.server import parse_args

    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), contextlib.suppress(SystemExit):
        parse_args(["--help"])
    return "--data-dir" in shown.getvalue()


def cache_args(cfg, host: str, port: int = 0, data_dir: Path | None = None) -> list[str]:
    """Arguments of `python -m services.guidance_cache` for the run: an embedded Redis unless cache.url, keeping its
    append-only file in `data_dir` (when given and the service takes --data-dir)."""
    redis = ["--redis-url", cfg.cache.url] if cfg.cache.url else []
    if not cfg.cache.url and data_dir is not None and cache_data_supported():
        redis = ["--data-dir", str(data_dir)]
    return ["--address", f"{host}:{port}", "--prefix", cfg.cache.prefix, *redis]


def rollout_args(cfg, config_file: Path, host: str, port: int = 0) -> list[str]:
    """Arguments of one `python -m services.rollout` replica."""
    threads = ["--threads", str(cfg.train.threads)] if cfg.train.threads else []
    return ["--config", str(config_file), "--address", f"{host}:{port}", *threads]


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
        running = [s.name for s in read_state(run_dir) if alive(s.pid)]
        if running:
            raise ConfigError(f"{run_dir}: services already up ({', '.join(running)}); `npo down {run_dir}` first")
    cfg = load_run_config(config, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    config_file = (run_dir / CONFIG_FILE).resolve()
    config_file.write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))
    build_policy_and_task(cfg)
    return cfg, run_dir, config_file


def plan_ports(host: str, names: Sequence[str], given: dict[str, int]) -> dict[str, int]:
    """A port for each of `names`: the one in `given` when set (non-zero), else a distinct free one."""
    wanted = [n for n in names if not given.get(n)]
    taken = {p for p in given.values() if p}
    free = [p for p in free_ports(host, len(wanted) + len(taken)) if p not in taken][: len(wanted)]
    return {**{n: given[n] for n in names if given.get(n)}, **dict(zip(wanted, free, strict=True))}


def _start_first(cfg, config_file: Path, run_dir: Path, host: str, ports: dict[str, int], replicas: int,
                 spawned: list[Started], deadline: float) -> list[Started]:  # fmt: skip
    """The guidance cache and the rollout replicas, side by side; returns them once each serves."""
    data_dir = (run_dir / CACHE_DATA).resolve()
    first = {"guidance_cache": module_argv(
        "services.guidance_cache", *cache_args(cfg, host, ports["guidance_cache"], data_dir))}  # fmt: skip
    for i in range(replicas):
        name = f"rollout-{i}"
        first[name] = module_argv("services.rollout", *rollout_args(cfg, config_file, host, ports[name]))
    procs = {name: spawn(name, argv, run_dir / "logs") for name, argv in first.items()}
    spawned += [Started(name, proc.pid, "", str(log)) for name, (proc, log) in procs.items()]
    started = []
    for name, (proc, log) in procs.items():
        address, _ = wait_serving(name, proc, log, deadline)
        started.append(Started(name, proc.pid, address, str(log), argv=first[name]))
    return started


def _start_one(name: str, module: str, args: list[str], logs: Path, spawned: list[Started],
               deadline: float) -> Started:  # fmt: skip
    """Start one service and wait for its `serving on` line; its Started (the controller's url: its API)."""
    argv = module_argv(module, *args)
    proc, log = spawn(name, argv, logs)
    spawned.append(Started(name, proc.pid, "", str(log)))
    address, url = wait_serving(name, proc, log, deadline)
    return Started(name, proc.pid, address, str(log), f"http://{address}" if name == "controller" else url, argv)


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
    names = ["guidance_cache", *(f"rollout-{i}" for i in range(replicas)), "learner", "learner-metrics",
             *(["prometheus"] if prometheus else []), *(["controller"] if controller else [])]  # fmt: skip
    ports = plan_ports(host, names, {"learner": learner_port, "learner-metrics": metrics_port, "controller": api_port})
    deadline = time.monotonic() + timeout_s
    spawned: list[Started] = []  # everything started, recorded or not: stopped when `up` fails
    try:
        started = _start_first(cfg, config_file, run_dir, host, ports, replicas, spawned, deadline)
        rollout = ",".join(s.address for s in started if s.name.startswith("rollout-"))
        cache = next(s.address for s in started if s.name == "guidance_cache")
        args = learner_args(cfg, config_file, run_dir, host, ports["learner"], rollout, cache,
                            ports["learner-metrics"], controller)  # fmt: skip
        learner = _start_one("learner", "services.learner", args, logs, spawned, deadline)
        started.append(learner)
        for entry in started:
            wait_healthy(entry.address, deadline)
        prometheus_url = ""
        if prometheus:
            entry = start_prometheus(run_dir, host, learner.metrics_url, logs, deadline, ports["prometheus"])
            spawned.append(entry)
            started.append(entry)
            prometheus_url = f"http://{entry.address}"
        if controller:
            args = controller_args(config_file, run_dir, host, ports["controller"], learner.address, rollout, cache,
                                   learner.metrics_url, prometheus_url)  # fmt: skip
            started.append(_start_one("controller", "services.controller", args, logs, spawned, deadline))
            wait_http(f"{started[-1].metrics_url}/healthz", deadline)
    except BaseException:
        stop(list(reversed(spawned)))
        raise
    write_state(run_dir, config_file, started, ports=ports)
    return started


def down(run_dir: str | os.PathLike, timeout_s: float = 15.0) -> list[str]:
    """Stop what `npo up` started in run_dir (learner first); returns the names that were still running."""
    processes = read_state(run_dir)
    stopped = stop(list(reversed(processes)), timeout_s)
    remove_state(run_dir)
    return stopped


BIND_FAILURE = re.compile(r"in use|cannot listen|bind", re.IGNORECASE)
"""A log line of a service that could not listen on its address."""


def _spawn_bound(name: str, argv: list[str], address: str, logs: Path, deadline: float) -> tuple[str, str, int, Path]:
    """Spawn `argv` (after its address is free) until it serves, retrying a start that failed to bind for up to
    BIND_RETRY_S; returns (address, url, pid, log)."""
    bind_deadline = time.monotonic() + BIND_RETRY_S
    while True:
        wait_port_free(address, max(0.0, bind_deadline - time.monotonic()))
        proc, log = spawn(name, argv, logs)
        try:
            if name == "prometheus":
                wait_http(f"http://{address}/-/ready", deadline)
                return address, f"http://{address}", proc.pid, log
            served, url = wait_serving(name, proc, log, deadline)
            return served, f"http://{served}" if name == "controller" else url, proc.pid, log
        except RuntimeError:
            bind_failed = proc.poll() is not None and BIND_FAILURE.search(_log_tail(log))
            if not bind_failed or time.monotonic() > bind_deadline:
                stop([Started(name, proc.pid, address, str(log))])
                raise


def restart(run_dir: str | os.PathLike, name: str, timeout_s: float = 120.0) -> Started:
    """Start service `name` of run_dir again with its recorded command (stopping it first if it still runs), on
    the address it had: the other services keep running and reconnect to it by themselves. Its previous log is
    kept as logs/<name>.prev.log."""
    run_dir = Path(run_dir)
    if backend(run_dir) == "ray":
        raise ConfigError(f"{run_dir}: `npo restart` restarts local processes; this run's roles are Ray actors")
    processes = read_state(run_dir)
    entry = next((s for s in processes if s.name == name), None)
    if entry is None:
        raise ConfigError(f"{name}: not a service of {run_dir} (have: {', '.join(s.name for s in processes)})")
    stop([entry])
    logs = run_dir / "logs"
    old_log = logs / f"{name}.log"
    if old_log.exists():
        old_log.replace(logs / f"{name}.prev.log")
    deadline = time.monotonic() + timeout_s
    address, url, pid, log = _spawn_bound(name, entry.argv, entry.address, logs, deadline)
    fresh = Started(name, pid, address, str(log), url or entry.metrics_url, entry.argv)
    if name == "controller":
        wait_http(f"{url}/healthz", deadline)
    elif name != "prometheus":
        wait_healthy(address, deadline)
    replace_service(run_dir, fresh)
    return fresh
