"""`npo status`, `npo intervene ...`, `npo autonpo on|off`: thin clients of the controller's REST API.

Each command names its controller by a run folder of `npo up` or an http://host:port (services/ops/state.py:
controller_target) and returns the command's exit code; an error status of the API is one line on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from npo.core.config import ConfigError
from services.controller.client import ControllerClient, ControllerError
from services.ops.state import controller_target


def open_controller(target: str) -> ControllerClient:
    """A client of the controller of `target` (a folder of `npo up`, or an http(s):// URL) with its token."""
    return ControllerClient(*controller_target(target))


def run_command(target: str, command: Callable[[ControllerClient], int]) -> int:
    """`command` with a client of `target`'s controller; an API error: its message, exit code 2 (4xx) or 1."""
    with open_controller(target) as client:
        try:
            return command(client)
        except ControllerError as exc:
            print(f"npo: controller: {exc}", file=sys.stderr)
            return 2 if 400 <= exc.status_code < 500 else 1


def format_status(status: dict, recent: list[dict]) -> str:
    """`npo status` as text: metrics (or why they are missing), learner, AutoNPO, recent interventions."""
    metrics = status["metrics"]
    if metrics.get("ok"):
        shown = f"step {status['step']}, reward {status['reward']:.4f}, entropy {status['entropy']:.4f}"
    else:
        shown = f"missing ({metrics.get('error', '')})"
    learner, auto = status["learner"], status["autonpo"]
    lines = [
        f"metrics: {shown} [{metrics.get('source', '')}]",
        f"learner: {learner['state']} at step {learner['step']}/{learner['run_steps']}, "
        f"segment {learner['segment_id'] or '-'} ({learner['mode'] or '-'})",
        f"autonpo: {'on' if auto['enabled'] else 'off'}, cool-down until step {auto['cooldown_until']}",
        f"running intervention: {status['running_intervention'] or 'none'}",
    ]
    lines += [f"  {iv['id']}  {iv['kind']:22s} {iv['state']:10s} {json.dumps(iv['outcome'])[:80]}" for iv in recent]
    return "\n".join(lines)


def show_status(client: ControllerClient, as_json: bool = False) -> int:
    """Print the controller's status and its ten most recent interventions (as text or raw JSON)."""
    status = client.status()
    recent = client.interventions(limit=10)
    if as_json:
        print(json.dumps({"status": status, "interventions": recent}, indent=2))
    else:
        print(format_status(status, recent))
    return 0


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
