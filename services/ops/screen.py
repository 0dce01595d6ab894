"""`npo screen FILE`: one GRPO run per candidate regime, then the near future's real headroom in each, ranked.

    npo screen configs/screens/regimes.yaml                 # train (resumes), measure, write OUT/screen.md/.json/.png
    npo screen configs/screens/regimes.yaml --background    # the same, detached; log in OUT/screen.log
    npo screen configs/screens/regimes.yaml --report-only   # only rewrite the report from cached measurements
    python -m services.ops.screen FILE [--report-only]      # the same without the CLI

A screen is an experiment (services/ops/experiment.py) whose arms are the regimes, every one method grpo, one seed:
each regime's run is an `npo train` subprocess in OUT/<regime>/seed<k> (`workers` at once, `threads` each); a
finished run (done.json) is skipped when the command runs again, an interrupted one resumes from its latest
checkpoint. Each finished run is then measured (npo.analysis.screen.measure_regime: F, Q0@8, Q0@8+R, U, H(Delta),
Q, KL, V, S, GRPO's own gain) and the measurement cached in OUT/<regime>/screen.json; it is measured again only when
the measurement settings change. The report ranks the regimes by the near future's headroom per prompt.

The screen file (YAML; see configs/screens/regimes.yaml):

    name: regimes                       # title (default: the file's stem)
    base: configs/evidence.yaml         # the run config every regime overrides
    out: runs/screens/regimes           # default runs/screens/<stem>
    docs: PATH.md                       # optional: the markdown is written there too, the plot beside it (.png)
    seed: 0                             # the run seed of every regime and the measurement's seed
    workers: 2                          # runs at once
    threads: 1                          # train.threads of each run
    set: {train.steps: 120}             # overrides common to every regime
    models: {NAME: {seed: 0, set: {}}}  # models built once into OUT/models/NAME; a regime names one as
                                        # model.preset: "{model:NAME}" (e.g. a warm-up on the easy part only)
    measure: {anchors: [10, 30], deltas: [10, 20], prompts: 256, samples: 8, resample: 48, window: 10}
    regimes:                            # at least one; the first is the reference
      - name: base
        description: one line
        set: {}                         # overrides of this regime (method is always grpo)
        measure: {anchors: [100]}       # optional: this regime's measurement settings over the common ones

A bad file raises npo.core.config.ConfigError naming the key (regimes.<name>.<key> for a regime).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from npo.core.config import ConfigError
from services.ops import experiment as ex

SCREEN_KEYS = ("name", "base", "out", "docs", "seed", "workers", "threads", "set", "models", "measure", "regimes")
"""The keys of a screen file."""
REGIME_KEYS = ("name", "description", "set", "measure")
"""The keys of one regime."""
MEASURE_DEFAULTS: dict[str, Any] = {
    "anchors": [10, 30, 50],
    "deltas": [10, 20, 40],
    "prompts": 256,
    "samples": 8,
    "resample": 48,
    "window": 10,
}
"""Measurement settings (npo.analysis.screen.measure_regime) when the file leaves them out."""


@dataclass
class Regime:
    """One candidate regime: overrides of the base config and its measurement settings."""

    name: str
    description: str
    set: dict[str, Any]
    measure: dict[str, Any]


@dataclass
class Screen:
    """A parsed screen file."""

    path: Path
    name: str
    base: Path
    out: Path
    docs: Path | None
    seed: int
    workers: int
    threads: int
    set: dict[str, Any]
    models: list[ex.ModelSpec]
    measure: dict[str, Any] = field(default_factory=dict)
    """The common measurement settings (a regime's `measure` overrides them)."""
    regimes: list[Regime] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# The screen file.


def _get(data: dict, key: str, kind: type, where: str, default: Any = None) -> Any:
    """data[key] checked against kind (bool is no int); `default` when absent (None: the key is required)."""
    if key not in data or data[key] is None:
        if default is None:
            raise ConfigError(f"{where}{key}: missing")
        return default
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}{key}: expected {kind.__name__}, got {value!r}")
    return value


def _unknown(data: dict, known: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}{key}: unknown key (known: {', '.join(known)})")


def _measure(raw: dict, over: dict[str, Any], where: str) -> dict[str, Any]:
    """MEASURE_DEFAULTS updated with `over`, then `raw`, each value checked."""
    _unknown(raw, tuple(MEASURE_DEFAULTS), where)
    merged = {**MEASURE_DEFAULTS, **over, **raw}
    for key in ("anchors", "deltas"):
        values = merged[key]
        low = 0 if key == "anchors" else 1
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}{key}: expected a non-empty list of integers, got {values!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
            raise ConfigError(f"{where}{key}: every value must be an integer >= {low}, got {values!r}")
    for key in ("prompts", "samples", "resample", "window"):
        value = merged[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}{key}: must be an integer >= 1, got {value!r}")
    return merged


def _regime(i: int, raw: Any, measure: dict[str, Any]) -> Regime:
    if not isinstance(raw, dict):
        raise ConfigError(f"regimes[{i}]: expected a mapping")
    name = _get(raw, "name", str, f"regimes[{i}].")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"regimes[{i}].name: letters, digits, '_', '.', '-' only, got {name!r}")
    where = f"regimes.{name}."
    _unknown(raw, REGIME_KEYS, where)
    description = _get(raw, "description", str, where).strip()
    overrides = dict(_get(raw, "set", dict, where, {}))
    if overrides.get("method", "grpo") != "grpo":
        raise ConfigError(f"{where}set.method: a screen runs grpo only, got {overrides['method']!r}")
    return Regime(name, description, overrides, _measure(_get(raw, "measure", dict, where, {}), measure, where))


def _models(data: dict) -> list[ex.ModelSpec]:
    specs = []
    for name, spec in _get(data, "models", dict, "", {}).items():
        if not isinstance(spec, dict):
            raise ConfigError(f"models.{name}: expected a mapping with seed and set")
        _unknown(spec, ("seed", "set"), f"models.{name}.")
        where = f"models.{name}."
        specs.append(
            ex.ModelSpec(str(name), dict(_get(spec, "set", dict, where, {})), _get(spec, "seed", int, where, 0))
        )
    return specs


def load_screen(path: str | Path) -> Screen:
    """Read and check a screen file: every regime's run config must load; ConfigError names the bad key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"screen: no such file {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"screen: {path} must hold a mapping")
    _unknown(data, SCREEN_KEYS, "")
    measure = _measure(_get(data, "measure", dict, "", {}), {}, "measure.")
    raw_regimes = _get(data, "regimes", list, "")
    if not raw_regimes:
        raise ConfigError("regimes: expected at least one regime")
    regimes = [_regime(i, raw, measure) for i, raw in enumerate(raw_regimes)]
    names = [r.name for r in regimes]
    if len(set(names)) != len(names):
        raise ConfigError(f"regimes: names must be unique, got {names}")
    docs = _get(data, "docs", str, "", "")
    screen = Screen(
        path=path,
        name=str(_get(data, "name", str, "", path.stem)),
        base=Path(_get(data, "base", str, "")),
        out=Path(_get(data, "out", str, "", f"runs/screens/{path.stem}")),
        docs=Path(docs) if docs else None,
        seed=_get(data, "seed", int, "", 0),
        workers=_get(data, "workers", int, "", 2),
        threads=_get(data, "threads", int, "", 1),
        set=dict(_get(data, "set", dict, "", {})),
        models=_models(data),
        measure=measure,
        regimes=regimes,
    )
    _check(screen)
    return screen


def _check(screen: Screen) -> None:
    if not screen.base.is_file():
        raise ConfigError(f"base: no such run config {screen.base}")
    if screen.workers < 1 or screen.threads < 1:
        raise ConfigError(f"workers / threads: must be >= 1, got {screen.workers} / {screen.threads}")
    for regime in screen.regimes:
        _check_regime(screen, regime)


def _stand_in(screen: Screen, key: str, value: Any, where: str) -> Any:
    """A value to check a regime's config with: a "{model:NAME}" model.preset becomes the tiny preset (the model is
    built from the base config), other placeholders a plain stand-in."""
    if not isinstance(value, str) or not ex.PLACEHOLDER.search(value):
        return value
    for match in ex.PLACEHOLDER.finditer(value):
        if match.group(1) == "model" and match.group(2) not in {m.name for m in screen.models}:
            raise ConfigError(f"{where}set.{key}: {match.group(0)} names no model of `models`")
        if match.group(1) == "final":
            raise ConfigError(f"{where}set.{key}: {{final:...}} needs another run; a screen has none")
    return "tiny" if key == "model.preset" else ex.PLACEHOLDER.sub("0", value)


def _check_regime(screen: Screen, regime: Regime) -> None:
    """The regime's run config loads; its anchors are checkpoint steps within train.steps; prompts fit the train
    split."""
    from npo.runtime.run_config import load_run_config

    where = f"regimes.{regime.name}."
    checked = {k: _stand_in(screen, k, v, where) for k, v in regime.set.items()}
    try:
        cfg = load_run_config(screen.base, ex.overrides_for(_experiment(screen), checked, screen.threads))
    except ConfigError as exc:
        raise ConfigError(f"{where[:-1]}: {exc}") from None
    every, steps = cfg.checkpoint.every, cfg.train.steps
    for t in regime.measure["anchors"]:
        if t > steps or (every and t % every):
            raise ConfigError(
                f"{where}measure.anchors: {t} is no checkpoint step (checkpoint.every {every}, train.steps {steps})"
            )
    if regime.measure["prompts"] > cfg.task.train_size:
        raise ConfigError(f"{where}measure.prompts: {regime.measure['prompts']} exceeds task.train_size")


def _experiment(screen: Screen) -> ex.Experiment:
    """The screen as an experiment: one arm per regime (method grpo), the screen's seed."""
    arms = [ex.Arm(r.name, r.name, r.description, {**r.set, "method": "grpo"}) for r in screen.regimes]
    return ex.Experiment(
        path=screen.path,
        name=screen.name,
        base=screen.base,
        set=screen.set,
        out=screen.out,
        report=screen.out / "screen.md",
        figures=screen.out,
        seeds=[screen.seed],
        workers=screen.workers,
        threads=screen.threads,
        horizon=0,
        window=MEASURE_DEFAULTS["window"],
        baseline=screen.regimes[0].name,
        roles={},
        arms=arms,
        models=screen.models,
        analysis=None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Measuring and reporting.


def measurement_settings(screen: Screen, regime: Regime) -> dict[str, Any]:
    """What a cached measurement must match to be reused."""
    return {**regime.measure, "seed": screen.seed}


def measure(screen: Screen, regime: Regime, log=print) -> dict[str, Any] | None:
    """The regime's measurement: OUT/<regime>/screen.json when its settings match, else measured now (and cached);
    None when the regime's run did not finish."""
    exp = _experiment(screen)
    folder = ex.run_dir(exp, regime.name, screen.seed)
    cache = screen.out / regime.name / "screen.json"
    wanted = measurement_settings(screen, regime)
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("requested") == wanted:
            return cached
    if not ex.is_done(folder):
        log(f"measure {regime.name}: the run did not finish; skipped")
        return None
    from npo.analysis.screen import measure_regime

    log(f"measure {regime.name}")
    started = time.perf_counter()
    result = measure_regime(folder, **{k: wanted[k] for k in MEASURE_DEFAULTS}, seed=screen.seed)
    train_seconds = json.loads((folder / "done.json").read_text()).get("seconds")
    result |= {"name": regime.name, "requested": wanted}
    result["seconds"] = {"train": train_seconds or 0.0, "measure": time.perf_counter() - started}
    cache.write_text(json.dumps(result, indent=1, default=lambda v: None) + "\n")
    return result


def write_report(screen: Screen, results: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """OUT/screen.md, .json, .png (npo.analysis.screen.write_screen); with `docs`, the markdown there and the plot
    beside it. Returns OUT/screen.md."""
    from npo.analysis.screen import screen_markdown, write_screen

    described = {r.name: r.description for r in screen.regimes}
    results = [{**r, "description": described[r["name"]]} for r in results]
    paths = write_screen(screen.name, results, meta, screen.out)
    if screen.docs is not None:
        plot = screen.docs.with_suffix(".png")
        screen.docs.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths["plot"], plot)
        screen.docs.write_text(screen_markdown(screen.name, results, meta, plot.name))
    return paths["markdown"]


def run_screen(path: str | Path, background: bool = False, report_only: bool = False, log=print) -> Path:
    """Run (or resume) every regime's GRPO run, measure each, write the report. Returns OUT/screen.md, or with
    `background` the log file of a detached process doing it (start_background)."""
    if background:
        pid, log_path = start_background(path, report_only=report_only)
        log(f"screen running in the background (pid {pid}); log: {log_path}")
        return log_path
    screen = load_screen(path)
    screen.out.mkdir(parents=True, exist_ok=True)
    began, started_at = time.perf_counter(), _now()
    if not report_only:
        _train(screen, log)
    results = []
    for regime in screen.regimes:
        result = _cached(screen, regime) if report_only else measure(screen, regime, log)
        if result is not None:
            results.append(result)
    state = _state(screen.out / "screen-state.json", None if report_only else (started_at, began))
    report = write_report(screen, results, _meta(screen, state))
    log(f"report: {report}")
    return report


def _train(screen: Screen, log) -> None:
    """Every regime's GRPO run through the experiment grid (finished runs skipped, interrupted ones resumed); then
    the measurement's torch threads (every core the grid used)."""
    unfinished = [name for (name, _), value in ex.run_grid(_experiment(screen), log).items() if value != "done"]
    if unfinished:
        log(f"not finished: {unfinished}")
    import torch

    from npo.runtime.models import choose_threads

    torch.set_num_threads(choose_threads(max(1, screen.threads * screen.workers)))


def _state(path: Path, this_run: tuple[str, float] | None) -> dict[str, Any]:
    """The screen's timing record (started, finished, wall_seconds summed over the commands that trained); this_run
    = (start time, perf_counter at start) adds the command now ending, None only reads it."""
    state = json.loads(path.read_text()) if path.is_file() else {}
    if this_run is not None:
        state = {"started": state.get("started", this_run[0]), "finished": _now(),
                 "wall_seconds": state.get("wall_seconds", 0.0) + time.perf_counter() - this_run[1]}  # fmt: skip
        path.write_text(json.dumps(state, indent=1) + "\n")
    return state


def _cached(screen: Screen, regime: Regime) -> dict[str, Any] | None:
    cache = screen.out / regime.name / "screen.json"
    return json.loads(cache.read_text()) if cache.is_file() else None


def _meta(screen: Screen, state: dict[str, Any]) -> dict[str, Any]:
    wall = state.get("wall_seconds")
    return {
        "command": f"npo screen {screen.path}",
        "base": f"{screen.base} with {json.dumps(screen.set)}",
        "measure": json.dumps(screen.measure),
        "seed": screen.seed,
        "machine": ex.machine(),
        "wall": f"{wall / 60:.1f} min" if wall is not None else None,
        "started": state.get("started"),
        "finished": state.get("finished"),
        "commit": ex.git_commit(),
    }


def start_background(path: str | Path, report_only: bool = False) -> tuple[int, Path]:
    """run_screen in a detached process (its own session), logging to OUT/screen.log; returns (pid, log file)."""
    screen = load_screen(path)
    screen.out.mkdir(parents=True, exist_ok=True)
    log_path = screen.out / "screen.log"
    command = [sys.executable, "-m", "services.ops.screen", str(path), *(["--report-only"] if report_only else [])]
    with open(log_path, "a") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    (screen.out / "screen.pid").write_text(f"{proc.pid}\n")
    return proc.pid, log_path


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def main(argv: list[str]) -> int:
    """python -m services.ops.screen FILE [--report-only]"""
    args = [a for a in argv if a != "--report-only"]
    if len(args) != 1:
        print("usage: python -m services.ops.screen FILE [--report-only]", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    run_screen(args[0], report_only="--report-only" in argv, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
