"""The run-state files of `npo up` in a run folder: services.json (what was started) and api-token (the
controller's token), and the addresses other commands resolve from them (`npo train --connect`, `npo status`).

services.json holds each service's pid, address, log and command line, and `ports` (name -> port, the learner's
/metrics as `learner-metrics`) as `npo up` chose them once: a service restarted with `npo restart` keeps its address,
so what was resolved from this file stays valid; `replace_service` records the new pid.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from npo.core.config import ConfigError

STATE_FILE = "services.json"
"""What `npo up` started, in the run folder."""
TOKEN_FILE = "api-token"
"""The controller's API token written by `npo up` (mode 0600)."""


@dataclass
class Started:
    """One process started by `npo up`."""

    name: str
    """guidance_cache | rollout-<i> | learner | prometheus | controller"""
    pid: int
    """Its process id (the leader of its own process group)."""
    address: str
    """host:port it serves on (gRPC; HTTP for the controller and Prometheus), fixed by `npo up`."""
    log: str
    """Its log file (stdout and stderr)."""
    metrics_url: str = ""
    """Its HTTP endpoint, when it has one (the learner's /metrics, Prometheus, the controller's API)."""
    argv: list[str] = field(default_factory=list)
    """The command that started it (`npo restart` runs it again)."""


def load_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """run_dir/services.json as written (FileNotFoundError when `npo up` started nothing there)."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {STATE_FILE} (nothing started there by `npo up`)")
    return json.loads(path.read_text())


def save_state(run_dir: str | os.PathLike, state: dict[str, Any]) -> None:
    (Path(run_dir) / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def read_state(run_dir: str | os.PathLike) -> list[Started]:
    """The processes recorded by `npo up` in run_dir (FileNotFoundError when there are none)."""
    return [Started(**entry) for entry in load_state(run_dir)["services"]]


def write_state(run_dir: Path, config_file: Path, started: list[Started], **extra) -> None:
    """Record what was started in run_dir/services.json (what `npo down` and `npo restart` read)."""
    state = {"config": str(config_file), "run_dir": str(run_dir.resolve()), **extra,
             "services": [asdict(s) for s in started]}  # fmt: skip
    save_state(run_dir, state)


def replace_service(run_dir: str | os.PathLike, fresh: Started) -> None:
    """Record `fresh` in place of the service of the same name (after `npo restart`)."""
    state = load_state(run_dir)
    state["services"] = [asdict(fresh) if s["name"] == fresh.name else s for s in state["services"]]
    save_state(run_dir, state)


def remove_state(run_dir: str | os.PathLike) -> None:
    (Path(run_dir) / STATE_FILE).unlink(missing_ok=True)


def backend(run_dir: str | os.PathLike) -> str:
    """The backend of the run's services: "ray" after `npo up --ray`, else "" (also when nothing was started)."""
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()).get("backend", "") if path.is_file() else ""


def api_token_file(run_dir: Path) -> Path:
    """The controller's API token: NPO_API_TOKEN when set, else a random one; written to run_dir/api-token (mode
    0600), where `npo status` / `npo intervene` find it."""
    path = run_dir / TOKEN_FILE
    token = os.environ.get("NPO_API_TOKEN") or (path.read_text().strip() if path.exists() else "")
    token = token or secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def learner_address(target: str) -> str:
    """The learner's host:port from `target`: a folder of `npo up`, or host:port itself."""
    if Path(target).is_dir():
        return next(s.address for s in read_state(target) if s.name == "learner")
    if not re.fullmatch(r"\S+:\d+", target):
        raise ConfigError(f"--connect: expected a folder of `npo up` or the learner's host:port, got {target!r}")
    return target


def controller_target(target: str) -> tuple[str, str | None]:
    """(url, token) of the controller named by `target`: a folder of `npo up` (its controller and token file) or an
    http(s):// URL. The token is NPO_API_TOKEN when set, else the folder's api-token file (None: neither)."""
    token = os.environ.get("NPO_API_TOKEN")
    if target.startswith(("http://", "https://")):
        return target, token
    if not Path(target).is_dir():
        raise ConfigError(f"expected a folder of `npo up` or the controller's http://host:port, got {target!r}")
    entry = next((s for s in read_state(target) if s.name == "controller"), None)
    if entry is None:
        raise ConfigError(f"{target}: no controller was started there (npo up --no-controller?)")
    token_file = Path(target) / TOKEN_FILE
    if token is None and token_file.is_file():
        token = token_file.read_text().strip()
    return f"http://{entry.address}", token
