"""`npo status`, `npo intervene ...`, `npo autonpo on|off`: thin clients of the controller's REST API.

Each command names its controller by a run folder of `npo up` or an http://host:port (services/ops/state.py:
controller_target) and returns the command's exit code; an error status of the API is one line on stderr.

`npo status DIR` also checks every service of DIR/services.json itself: alive (its pid) and healthy (grpc.health.v1
for the gRPC services, /healthz for the controller, /-/ready for Prometheus), shown as `serving`, `dead (pid N
gone)` or `recovering (not serving yet: ...)`. It does so even when the controller is down (then it says so, with
exit code 1); a learner the controller cannot reach is shown as unreachable.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from npo.core.config import ConfigError
from services.controller.client import ControllerClient, ControllerError
from services.ops.state import Started, backend, controller_target, read_state

HEALTH_TIMEOUT_S = 2.0
"""How long `npo status` waits for one service's health answer."""


def open_controller(target: str) -> ControllerClient:
    """A client of the controller of `target` (a folder of `npo up`, or an http(s):// URL) with its token; a folder
    is kept as the client's run_dir (`npo status` lists its services)."""
    client = ControllerClient(*controller_target(target))
    client.run_dir = target if Path(target).is_dir() else None
    return client


def _grpc_serving(address: str) -> str:
    """Empty when grpc.health.v1 at `address` answers SERVING, else why not ("unavailable", "not_serving")."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    answer = health_pb2.HealthCheckResponse
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code().name.lower() if isinstance(exc, grpc.Call) else "no answer"
    return "" if reply.status == answer.SERVING else answer.ServingStatus.Name(reply.status).lower()


def _http_ok(url: str) -> str:
    """Empty when `url` answers 200, else why not."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as reply:  # noqa: S310 - our own service's URL
            return "" if reply.status == 200 else f"HTTP {reply.status}"
    except OSError as exc:
        return str(getattr(exc, "reason", exc))


def service_health(entry: Started, check_pid: bool = True) -> tuple[str, str]:
    """(state, detail) of one service of services.json: ("serving", "pid N, HOST:PORT"), ("dead", "pid N gone") or
    ("recovering", "not serving yet: WHY"). `check_pid` False: its pid is on another machine (Ray)."""
    from services.ops.launcher import alive

    if check_pid and not alive(entry.pid):
        return "dead", f"pid {entry.pid} gone"
    if entry.name == "controller":
        problem = _http_ok(f"http://{entry.address}/healthz")
    elif entry.name == "prometheus":
        problem = _http_ok(f"http://{entry.address}/-/ready")
    else:
        problem = _grpc_serving(entry.address)
    if problem:
        return "recovering", f"not serving yet: {problem}"
    return "serving", f"pid {entry.pid}, {entry.address}"


def services_report(run_dir: str) -> list[dict[str, str]]:
    """The health of every service of run_dir/services.json: [{name, address, state, detail}]."""
    check_pid = backend(run_dir) != "ray"
    report = []
    for entry in read_state(run_dir):
        state, detail = service_health(entry, check_pid)
        report.append({"name": entry.name, "address": entry.address, "state": state, "detail": detail})
    return report


def format_services(report: list[dict[str, str]]) -> str:
    """One line per service: `rollout-1: dead (pid 1234 gone)`."""
    return "\n".join(["services:"] + [f"  {s['name']}: {s['state']} ({s['detail']})" for s in report])


def run_command(target: str, command: Callable[[ControllerClient], int]) -> int:
    """`command` with a client of `target`'s controller; an API error: its message, exit code 2 (4xx) or 1."""
    with open_controller(target) as client:
        try:
            return command(client)
        except ControllerError as exc:
            print(f"npo: controller: {exc}", file=sys.stderr)
            return 2 if 400 <= exc.status_code < 500 else 1


def _learner_line(learner: dict) -> str:
    if not learner.get("reachable", True):
        return f"learner: unreachable ({learner.get('error', '')})"
    return (
        f"learner: {learner['state']} at step {learner['step']}/{learner['run_steps']}, "
        f"segment {learner['segment_id'] or '-'} ({learner['mode'] or '-'})"
    )


def format_status(status: dict, recent: list[dict]) -> str:
    """`npo status` as text: metrics (or why they are missing), learner (or why it is unreachable), AutoNPO,
    recent interventions."""
    metrics = status["metrics"]
    if metrics.get("ok"):
        shown = f"step {status['step']}, reward {status['reward']:.4f}, entropy {status['entropy']:.4f}"
    else:
        shown = f"missing ({metrics.get('error', '')})"
    auto = status["autonpo"]
    lines = [
        f"metrics: {shown} [{metrics.get('source', '')}]",
        _learner_line(status["learner"]),
        f"autonpo: {'on' if auto['enabled'] else 'off'}, cool-down until step {auto['cooldown_until']}",
        f"running intervention: {status['running_intervention'] or 'none'}",
    ]
    lines += [f"  {iv['id']}  {iv['kind']:22s} {iv['state']:10s} {json.dumps(iv['outcome'])[:80]}" for iv in recent]
    return "\n".join(lines)


def show_status(client: ControllerClient, as_json: bool = False) -> int:
    """Print the controller's status and its ten most recent interventions (as text or raw JSON), and, for a run
    folder, the health of each of its services. A controller that does not answer: said so, the services still
    listed, exit code 1."""
    run_dir = getattr(client, "run_dir", None)
    try:
        status, recent, error = client.status(), client.interventions(limit=10), ""
    except (ConnectionError, ControllerError) as exc:
        status, recent, error = None, [], str(exc)
    report = services_report(run_dir) if run_dir else []
    if as_json:
        shown = {"status": status, "interventions": recent, "controller_error": error or None}
        print(json.dumps({**shown, "services": report} if run_dir else shown, indent=2))
    else:
        print(format_status(status, recent) if status is not None else f"controller: unreachable ({error})")
        if run_dir:
            print(format_services(report))
    return 1 if error else 0


def autonpo_overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as {key without `autonpo.`: YAML value}."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        overrides[key.removeprefix("autonpo.")] = yaml.safe_load(value)
    return overrides


def switch_autonpo(client: ControllerClient, enabled: bool, items: list[str]) -> int:
    """Switch AutoNPO on or off with `--set` overrides; print the controller's AutoNPO settings."""
    import yaml

    overrides = autonpo_overrides(items)
    print(yaml.safe_dump(client.set_autonpo(enabled, overrides), sort_keys=False), end="")
    return 0


def intervene(client: ControllerClient, kind: str, params: dict[str, int], wait: bool = False) -> int:
    """Start an intervention (early | plateau | rollback); with `wait`, follow it to its end and print its record
    (exit code 1 unless it succeeded)."""
    if kind == "early":
        record = client.early_bootstrap(params["scout_steps"])
    elif kind == "plateau":
        record = client.plateau_breakthrough(params["start"], params["lookahead"])
    else:
        record = client.rollback(params["step"])
    print(f"started {record['id']} ({record['kind']})")
    if not wait:
        return 0
    while record["state"] == "running":
        time.sleep(1.0)
        record = client.intervention(record["id"])
    print(json.dumps(record, indent=2))
    return 0 if record["state"] == "succeeded" else 1
