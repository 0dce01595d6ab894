"""Where a run's metrics rows go besides metrics.jsonl: TensorBoard, metrics.csv, Weights & Biases; and run_info.json.

metrics.jsonl (written by npo.runtime.runner) stays the primary record; every sink here receives the same rows, in
the same order, through `Sinks.log(row, step)`:

    sinks = open_sinks(cfg.logging, out_dir, run_config_to_dict(cfg), resume=resume)
    sinks.log(row, row["step"])        # after the row was appended to metrics.jsonl
    sinks.close()                      # end of the run

- TensorBoard (`logging.tensorboard`, on by default): <run>/tensorboard/, one scalar per top-level number of the row
  (ints, floats and bools; `step` is the x-axis, not a scalar). Skipped silently when tensorboard is not installed.
- CSV (`logging.csv`, on by default): <run>/metrics.csv mirrors metrics.jsonl row for row, flat: nested mappings
  become `outer/inner` columns, lists a JSON cell, None an empty cell. Opening the sink rewrites the file from the
  metrics.jsonl already in the folder (nothing for a fresh run; a resumed run's rows up to its checkpoint); each row
  is then appended, and a row that brings new columns rewrites the file whole (atomically) with the grown header:
  `step` and `segment` first, then the other columns sorted. Superseded rows (scouts, replayed steps) are kept, as
  in metrics.jsonl; npo.analysis.runs.load_run reads the file back (`read_metrics_csv`) and `pandas.read_csv` too.
- Weights & Biases (`logging.wandb`, opt-in; the `wandb` extra): one W&B run per run folder, offline by default
  (nothing leaves the machine; `wandb sync <dir>/wandb/offline-run-*` uploads later). Its config is the resolved run
  config plus run_info. The row's `step` is logged as a metric and is the x-axis of every other metric
  (`define_metric`), so the rows replayed after a rollback are kept (W&B drops a `log(step=...)` that goes back).
  The W&B run id is kept in <run>/wandb_run.json, so a resumed run continues the same W&B run.

run_info.json (`write_run_info`) records how the run was started: git commit and dirty flag of the checkout the code
runs from (absent outside a git checkout or without git), package / python / torch versions, host, start time and
command line; a resume appends its own record under `resumes`. The resolved config is config.yaml (runner).
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
import secrets
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from npo.core.config import ConfigError

METRICS_CSV = "metrics.csv"
"""The CSV mirror of metrics.jsonl in a run folder."""
RUN_INFO = "run_info.json"
"""How the run was started (git commit, versions, host, command line)."""
WANDB_RUN = "wandb_run.json"
"""The W&B run id of a run folder (a resume continues that W&B run)."""
WANDB_MODES = ("offline", "online", "disabled")
SEPARATOR = "/"
"""Joins the keys of a nested mapping into one column name (TensorBoard and W&B group charts by it)."""
LEADING_COLUMNS = ("step", "segment")


@dataclass
class LoggingConfig:
    """Where metrics rows go besides metrics.jsonl (npo.runtime.logsinks)."""

    tensorboard: bool = True
    """TensorBoard event files in <run>/tensorboard (one scalar per top-level number of a row)."""
    csv: bool = True
    """<run>/metrics.csv: metrics.jsonl as a flat table (nested keys joined with '/'), for pandas and spreadsheets."""
    wandb: bool = False
    """Log to Weights & Biases (needs the `wandb` extra: pip install 'npo[wandb]')."""
    wandb_project: str = "npo"
    """W&B project."""
    wandb_entity: str = ""
    """W&B entity (user or team); empty = the account's default."""
    wandb_run_name: str = ""
    """W&B run name; empty = run_name, else the run folder's name."""
    wandb_group: str = ""
    """W&B group (e.g. one experiment's arms and seeds); empty = none."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags."""
    wandb_mode: str = "offline"
    """offline (files only, upload later with `wandb sync`), online (streams to the W&B server) or disabled."""
    wandb_dir: str = ""
    """Folder that receives W&B's `wandb/` files; empty = $WANDB_DIR when set, else the run folder."""

    def validate(self) -> None:
        """Raise ConfigError naming the key (`logging.<field>`)."""
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb_mode: must be one of {list(WANDB_MODES)}, got {self.wandb_mode!r}")
        if self.wandb and not self.wandb_project.strip():
            raise ConfigError("logging.wandb_project: must not be empty when logging.wandb is on")
        if not all(isinstance(tag, str) and tag.strip() for tag in self.wandb_tags):
            raise ConfigError(f"logging.wandb_tags: expected non-empty strings, got {self.wandb_tags!r}")


# ----------------------------------------------------------------------------------------------------------------
# Rows.


def flatten_row(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """One level of keys: a nested mapping's keys are joined with '/' ({"a": {"b": 1}} -> {"a/b": 1})."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_row(value, name + SEPARATOR))
        else:
            flat[name] = value
    return flat


def csv_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The header of flat rows: `step` and `segment` first (when present), then every other key sorted."""
    keys: set[str] = set()
    for row in rows:
        keys.update(row)
    return [k for k in LEADING_COLUMNS if k in keys] + sorted(keys - set(LEADING_COLUMNS))


def csv_cell(value: Any) -> str:
    """A flat value as a CSV cell: None -> "", numbers and bools as Python prints them (floats round-trip exactly,
    nan / inf as `nan` / `inf`), lists as JSON, strings unchanged."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, set, frozenset)):
        return json.dumps(list(value), default=str)
    return str(value)


def parse_cell(text: str) -> Any:
    """A CSV cell back as a value: "" -> None, int, float (nan / inf included), True / False, else the string."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.csv (as written by CsvSink), empty cells left out, values parsed with parse_cell."""
    with open(path, newline="") as f:
        return [{k: parse_cell(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file ([] when it does not exist); blank lines and a truncated LAST line (a run
    still writing) are skipped. Raises ValueError naming the file and line for a bad line elsewhere."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for index, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if index == len(lines):
                break
            raise ValueError(f"{path}: line {index} is not valid JSON ({exc})") from None
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Sinks.


class Sink(Protocol):
    """Receives every metrics row of a run."""

    def log(self, row: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """<run>/tensorboard: one scalar per top-level int / float / bool of a row (other keys are not logged)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError when tensorboard is not installed

        self.writer = SummaryWriter(str(log_dir))

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class CsvSink:
    """metrics.csv: the rows as a flat table (see the module docstring for how the header grows)."""

    def __init__(self, path: Path, rows: Sequence[Mapping[str, Any]] = ()) -> None:
        """`rows`: the rows already in metrics.jsonl (a resumed run); the file is rewritten from them."""
        self.path = path
        self.rows = [flatten_row(r) for r in rows]
        self.columns = csv_columns(self.rows)
        self._rewrite()

    def log(self, row: dict[str, Any], step: int) -> None:
        flat = {"step": step, **flatten_row(row)}
        self.rows.append(flat)
        if set(flat) <= set(self.columns):
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([csv_cell(flat.get(c)) for c in self.columns])
        else:
            self.columns = csv_columns(self.rows)
            self._rewrite()

    def _rewrite(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            writer.writerows([csv_cell(row.get(c)) for c in self.columns] for row in self.rows)
        os.replace(partial, self.path)

    def close(self) -> None:
        """Nothing to do: every row is on disk when log returns."""


class WandbSink:
    """One W&B run: the row's numbers and strings, flattened, with `step` as every metric's x-axis."""

    def __init__(self, run: Any) -> None:
        self.run = run
        run.define_metric("step")
        run.define_metric("*", step_metric="step")

    def log(self, row: dict[str, Any], step: int) -> None:
        flat = {k: v for k, v in flatten_row(row).items() if isinstance(v, (int, float, str))}
        self.run.log({**flat, "step": step})

    def close(self) -> None:
        self.run.finish()


@dataclass
class Sinks:
    """The open sinks of a run: `log` fans a row out to each, `close` closes each (also as a context manager)."""

    sinks: list[Sink] = field(default_factory=list)
    """The sinks, in the order they were opened."""

    def log(self, row: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(row, step)

    def close(self) -> None:
        """Close every sink (all of them even if one fails; the first failure is raised after)."""
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - close the others first
                errors.append(exc)
        self.sinks = []
        if errors:
            raise errors[0]

    def __enter__(self) -> Sinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def require_wandb(cfg: LoggingConfig) -> None:
    """ConfigError (one line) when logging.wandb is on and the wandb package cannot be imported."""
    if not cfg.wandb:
        return
    try:
        import wandb  # noqa: F401 - imported here, on first use only
    except ImportError:
        raise ConfigError(
            "logging.wandb: the wandb package is not installed (pip install 'npo[wandb]', or set logging.wandb=false)"
        ) from None


def open_sinks(
    cfg: LoggingConfig,
    out_dir: str | Path,
    run_config: Mapping[str, Any],
    *,
    resume: bool = False,
    run_info: Mapping[str, Any] | None = None,
) -> Sinks:
    """Open the sinks `cfg` turns on for run folder `out_dir` (see the module docstring).

    `run_config`: the resolved run config as a plain dict (W&B's config, with `run_info` under "run_info").
    `resume`: continue the W&B run recorded in the folder. metrics.csv is rebuilt from the folder's metrics.jsonl, so
    open the sinks after metrics.jsonl was emptied (fresh run) or truncated (resume), before the next row is written.
    Raises ConfigError when W&B is on but not installed (before anything is opened).
    """
    require_wandb(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sinks = Sinks()
    try:
        if cfg.tensorboard:
            try:
                sinks.sinks.append(TensorBoardSink(out / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                pass
        if cfg.csv:
            sinks.sinks.append(CsvSink(out / METRICS_CSV, read_jsonl_rows(out / "metrics.jsonl")))
        if cfg.wandb:
            config = {**run_config, "run_info": dict(run_info or {})}
            sinks.sinks.append(WandbSink(_wandb_run(cfg, out, config, resume)))
    except BaseException:
        sinks.close()  # what was opened before the failure (e.g. wandb.init refused)
        raise
    return sinks


def resolve_wandb_dir(cfg: LoggingConfig, out: Path) -> Path:
    """Where W&B writes its `wandb/` folder: logging.wandb_dir, else $WANDB_DIR, else the run folder `out`."""
    return Path(cfg.wandb_dir or os.environ.get("WANDB_DIR") or out)


def _wandb_run(cfg: LoggingConfig, out: Path, config: dict[str, Any], resume: bool) -> Any:
    """wandb.init for run folder `out`; the run id is kept in out/wandb_run.json (reused when resuming)."""
    import wandb

    record_path = out / WANDB_RUN
    previous = json.loads(record_path.read_text()) if resume and record_path.is_file() else {}
    run_id = previous.get("id") or secrets.token_hex(4)
    wandb_dir = resolve_wandb_dir(cfg, out)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity or None,
        name=cfg.wandb_run_name or str(config.get("run_name") or "") or out.resolve().name,
        group=cfg.wandb_group or None,
        tags=list(cfg.wandb_tags) or None,
        mode=cfg.wandb_mode,
        dir=str(wandb_dir),
        config=config,
        id=run_id,
        resume="allow",
    )
    record = {"id": run_id, "project": cfg.wandb_project, "mode": cfg.wandb_mode, "dir": str(wandb_dir)}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return run


# ----------------------------------------------------------------------------------------------------------------
# run_info.json.


def git_state(folder: str | Path) -> dict[str, Any]:
    """{"commit": sha, "dirty": bool} of the git checkout holding `folder`; {} without git or outside a checkout.

    Read-only: `git --no-optional-locks` never touches the index; tracked files only decide `dirty`."""
    base = ["git", "--no-optional-locks", "-C", str(folder)]
    try:
        commit = subprocess.run([*base, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {}
        status = subprocess.run(
            [*base, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    state: dict[str, Any] = {"commit": commit.stdout.strip()}
    if status.returncode == 0:
        state["dirty"] = bool(status.stdout.strip())
    return state


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_info(argv: Sequence[str] | None = None, code_dir: str | Path | None = None) -> dict[str, Any]:
    """How this process runs: git state of `code_dir` (default: the checkout holding the npo package), versions of
    npo / python / torch / transformers, host, start time (UTC, ISO 8601), pid, working folder and command line."""
    argv = list(sys.argv if argv is None else argv)
    code = Path(code_dir) if code_dir is not None else Path(__file__).resolve().parents[2]
    return {
        "git": git_state(code),
        "npo_version": _version("npo"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "argv": argv,
        "command": shlex.join(argv),
        "config": "config.yaml",
    }


def write_run_info(out_dir: str | Path, *, resume: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Write <run>/run_info.json (run_info(**kwargs)) and return what this process recorded. When resuming a run
    that has one, its first record is kept and this one is appended to its `resumes` list."""
    path = Path(out_dir) / RUN_INFO
    info = run_info(**kwargs)
    if resume and path.is_file():
        data = json.loads(path.read_text())
        data.setdefault("resumes", []).append(info)
    else:
        data = info
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return info
