"""`npo experiment FILE`: a grid of arms x seeds of `npo train` runs, the Q/V/S analysis, and docs/results.md.

    npo experiment configs/experiments/paper_claims.yaml              # run (resumes), analyse, write the report
    npo experiment configs/experiments/paper_claims.yaml --background # the same, detached; log in OUT/experiment.log
    npo experiment configs/experiments/paper_claims.yaml --report-only

The experiment file (YAML) names a base run config, the seeds, the arms (overrides of the base config) and what to
analyse; see configs/experiments/paper_claims.yaml. Every (arm, seed) is one `npo train` subprocess in
OUT/<arm>/seed<k> with `train.threads` = `threads`; `workers` of them run at once. A run that finished has
OUT/<arm>/seed<k>/done.json and is skipped when the command runs again; a run that was interrupted continues from its
latest checkpoint (`npo train --resume`). An arm may use another arm's finished run of the same seed (`needs`) through
placeholders in its overrides:

    {final:ARM}   the final checkpoint folder of ARM's run of this seed (an HF model folder)
    {model:NAME}  the folder of a model built once by the `models` section (e.g. an external guide model)
    {seed}        the seed

Everything in the report regenerates from the one command: finished runs are reused, the analysis is cached in
OUT/analysis.json (delete it to measure again), and the report is rewritten from the run folders.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from npo.core.config import ConfigError

PLACEHOLDER = re.compile(r"\{(final|model):([A-Za-z0-9_.-]+)\}|\{seed\}")


@dataclass
class Arm:
    """One method of the grid: overrides of the base config."""

    name: str
    label: str
    description: str = ""
    set: dict[str, Any] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)


@dataclass
class ModelSpec:
    """A model built once before the grid (a guide model for guide.source external): the base config's tiny model
    with these overrides, warmed up with `seed`, saved as an HF folder OUT/models/<name>."""

    name: str
    set: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class AnalysisSpec:
    """Q/V/S of guide sources measured on checkpoints of `arm`'s runs (npo.analysis.qvs.analyze_sources)."""

    arm: str = ""
    seeds: list[int] = field(default_factory=list)
    anchors: list[int] = field(default_factory=list)
    deltas: list[int] = field(default_factory=list)
    prompts: int = 256
    samples: int = 8
    models: dict[str, str] = field(default_factory=dict)


@dataclass
class Experiment:
    """A parsed experiment file."""

    path: Path
    name: str
    base: Path
    set: dict[str, Any]
    out: Path
    report: Path
    figures: Path
    seeds: list[int]
    workers: int
    threads: int
    horizon: int
    window: int
    baseline: str
    roles: dict[str, str]
    arms: list[Arm]
    models: list[ModelSpec]
    analysis: AnalysisSpec | None
    discussion: Path | None = None
    """A markdown file placed at the top of the report (the reading of the numbers; written by hand)."""


def _require(data: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where}{key}: missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ConfigError(f"{where}{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


KNOWN_KEYS = {"name", "base", "set", "out", "report", "figures", "seeds", "workers", "threads", "horizon", "window",
              "baseline", "roles", "arms", "models", "analysis", "discussion"}  # fmt: skip
"""The keys of an experiment file."""


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"experiment: no such file {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"experiment: {path} must hold a mapping")
    for key in data:
        if key not in KNOWN_KEYS:
            raise ConfigError(f"{key}: unknown key of an experiment file (known: {', '.join(sorted(KNOWN_KEYS))})")
    return data


def _load_seeds(data: dict) -> list[int]:
    seeds = _require(data, "seeds", list, "")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds: expected a non-empty list of integers, got {seeds!r}")
    return seeds


def _load_arm(i: int, raw: Any) -> Arm:
    where = f"arms[{i}]."
    if not isinstance(raw, dict):
        raise ConfigError(f"arms[{i}]: expected a mapping")
    name = _require(raw, "name", str, where)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{where}name: letters, digits, '_', '.', '-' only, got {name!r}")
    needs = raw.get("needs", [])
    return Arm(
        name,
        str(raw.get("label", name)),
        str(raw.get("description", "")),
        dict(raw.get("set") or {}),
        [needs] if isinstance(needs, str) else list(needs),
    )


def _load_arms(data: dict) -> list[Arm]:
    """The arms, with unique names, each needing only arms listed before it."""
    arms = [_load_arm(i, raw) for i, raw in enumerate(_require(data, "arms", list, ""))]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"arms: names must be unique, got {names}")
    for arm in arms:
        for need in arm.needs:
            if need not in names or names.index(need) >= names.index(arm.name):
                raise ConfigError(f"arms.{arm.name}.needs: {need!r} is not an arm listed before it")
    return arms


def _load_analysis(data: dict, seeds: list[int], names: list[str]) -> AnalysisSpec | None:
    if not data.get("analysis"):
        return None
    a = data["analysis"]
    analysis = AnalysisSpec(
        arm=_require(a, "arm", str, "analysis."),
        seeds=list(a.get("seeds", seeds[:1])),
        anchors=list(_require(a, "anchors", list, "analysis.")),
        deltas=list(_require(a, "deltas", list, "analysis.")),
        prompts=int(a.get("prompts", 256)),
        samples=int(a.get("samples", 8)),
        models=dict(a.get("models") or {}),
    )
    if analysis.arm not in names:
        raise ConfigError(f"analysis.arm: {analysis.arm!r} is not an arm")
    return analysis


def _load_roles(data: dict, names: list[str]) -> tuple[str, dict[str, str]]:
    """(baseline arm, {role: arm}), each naming an arm."""
    baseline = str(data.get("baseline", names[0] if names else ""))
    if baseline not in names:
        raise ConfigError(f"baseline: {baseline!r} is not an arm")
    roles = dict(data.get("roles") or {})
    for role, arm_name in roles.items():
        if arm_name not in names:
            raise ConfigError(f"roles.{role}: {arm_name!r} is not an arm")
    return baseline, roles


def _check(exp: Experiment) -> None:
    if exp.discussion is not None and not exp.discussion.is_file():
        raise ConfigError(f"discussion: no such file {exp.discussion}")
    if not exp.base.is_file():
        raise ConfigError(f"base: no such run config {exp.base}")
    if exp.workers < 1:
        raise ConfigError(f"workers: must be >= 1, got {exp.workers}")
    for arm in exp.arms:  # every arm's config must load (placeholders filled with stand-ins)
        _check_arm_config(exp, arm)


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment file; ConfigError names the bad key. Relative paths are relative to the
    current directory (run it from the repository root)."""
    path = Path(path)
    data = _read_mapping(path)
    seeds = _load_seeds(data)
    arms = _load_arms(data)
    names = [a.name for a in arms]
    models = [
        ModelSpec(name, dict(spec.get("set") or {}), int(spec.get("seed", 0)))
        for name, spec in (data.get("models") or {}).items()
    ]
    analysis = _load_analysis(data, seeds, names)
    baseline, roles = _load_roles(data, names)
    out = Path(data.get("out", f"runs/{path.stem}"))
    report = Path(data.get("report", out / "results.md"))
    exp = Experiment(
        path=path,
        name=str(data.get("name", path.stem)),
        base=Path(_require(data, "base", str, "")),
        set=dict(data.get("set") or {}),
        out=out,
        report=report,
        figures=Path(data.get("figures", report.parent / report.stem)),
        seeds=seeds,
        workers=int(data.get("workers", 2)),
        threads=int(data.get("threads", 1)),
        horizon=int(_require(data, "horizon", int, "")),
        window=int(data.get("window", 20)),
        baseline=baseline,
        roles=roles,
        arms=arms,
        models=models,
        analysis=analysis,
        discussion=Path(data["discussion"]) if data.get("discussion") else None,
    )
    _check(exp)
    return exp


def stand_in(exp: Experiment, key: str, value: Any) -> Any:
    """A value that loads in place of a placeholder (to check a config before the runs exist): model.preset becomes
    the tiny preset (the model is built from the base config), a {final:...} / {model:...} folder elsewhere the
    base config's folder, {seed} 0."""
    if not isinstance(value, str) or not PLACEHOLDER.search(value):
        return value
    if key == "model.preset":
        return "tiny"
    return PLACEHOLDER.sub(lambda m: str(exp.base.parent) if m.group(1) else "0", value)


def _check_arm_config(exp: Experiment, arm: Arm) -> None:
    from npo.runtime.run_config import load_run_config

    checked = {k: stand_in(exp, k, v) for k, v in {**exp.set, **arm.set}.items()}
    try:
        cfg = load_run_config(exp.base, overrides_for(exp, checked, threads=exp.threads))
    except ConfigError as exc:
        raise ConfigError(f"arms.{arm.name}: {exc}") from None
    if cfg.train.steps < exp.horizon:
        raise ConfigError(f"arms.{arm.name}: train.steps {cfg.train.steps} is below the horizon {exp.horizon}")


def overrides_for(exp: Experiment, arm_set: dict[str, Any], threads: int) -> list[str]:
    """`key=value` overrides: the experiment's common `set`, then the arm's, then train.threads."""
    merged = {**exp.set, **arm_set, "train.threads": threads}
    return [f"{k}={_value(v)}" for k, v in merged.items()]


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ----------------------------------------------------------------------------------------------------------------
# Runs.


def run_dir(exp: Experiment, arm: str, seed: int) -> Path:
    return exp.out / arm / f"seed{seed}"


def is_done(folder: Path) -> bool:
    return (folder / "done.json").is_file()


def final_checkpoint(folder: Path) -> Path:
    """The newest checkpoint folder of a finished run."""
    from npo.runtime.checkpoint import CheckpointManager

    ckpt = CheckpointManager(folder / "checkpoints")
    step = ckpt.latest()
    if step is None:
        raise FileNotFoundError(f"{folder}: no checkpoint")
    return ckpt.path(step)


def resolve(exp: Experiment, value: Any, seed: int) -> Any:
    """Fill {final:ARM}, {model:NAME} and {seed} in a string value."""
    if not isinstance(value, str):
        return value

    def fill(m: re.Match) -> str:
        if m.group(0) == "{seed}":
            return str(seed)
        if m.group(1) == "final":
            return str(final_checkpoint(run_dir(exp, m.group(2), seed)).resolve())
        return str((exp.out / "models" / m.group(2)).resolve())

    return PLACEHOLDER.sub(fill, value)


def train_command(exp: Experiment, arm: Arm, seed: int) -> list[str]:
    from services.ops.embedded import has_checkpoint

    folder = run_dir(exp, arm.name, seed)
    command = [sys.executable, "-m", "services.cli", "train", "--no-progress"]
    if has_checkpoint(folder):  # a run stopped before its first complete checkpoint starts anew
        return [*command, "--resume", str(folder)]
    arm_set = {k: resolve(exp, v, seed) for k, v in {**exp.set, **arm.set}.items()}  # the common set too
    overrides = overrides_for(exp, {**arm_set, "seed": seed, "run_name": f"{exp.name}-{arm.name}-seed{seed}"},
                              exp.threads)  # fmt: skip
    command += ["--config", str(exp.base), "--out", str(folder)]
    for o in overrides:
        command += ["--set", o]
    return command


def build_models(exp: Experiment, log) -> None:
    """The `models` section: each built once into OUT/models/<name> (skipped when present), from the base config,
    the experiment's common `set` (but its placeholders) and the model's own `set`."""
    from npo.runtime.models import choose_threads, save_policy
    from npo.runtime.run_config import load_run_config
    from services.wiring import build_policy_and_task

    for spec in exp.models:
        folder = exp.out / "models" / spec.name
        if (folder / "config.json").is_file():
            continue
        log(f"building model {spec.name} ({spec.set})")
        started = time.perf_counter()
        common = {k: v for k, v in exp.set.items() if not PLACEHOLDER.search(str(v))}  # e.g. not its own folder
        merged = {**common, **spec.set, "seed": spec.seed, "train.threads": max(exp.threads * exp.workers, 1)}
        cfg = load_run_config(exp.base, [f"{k}={_value(v)}" for k, v in merged.items()])
        import torch

        torch.set_num_threads(choose_threads(cfg.train.threads))
        policy, _ = build_policy_and_task(cfg)
        tmp = folder.with_name(folder.name + ".tmp")
        save_policy(policy, tmp)
        tmp.rename(folder)
        log(f"model {spec.name}: {folder} ({time.perf_counter() - started:.0f} s)")


def run_grid(exp: Experiment, log=print) -> dict[tuple[str, int], str]:
    """Run every (arm, seed) not done yet, `workers` at a time, respecting `needs`. Returns {(arm, seed): status}
    with status done | failed | blocked."""
    exp.out.mkdir(parents=True, exist_ok=True)
    build_models(exp, log)
    jobs = [(arm, seed) for arm in exp.arms for seed in exp.seeds]  # arm-major: the baseline's runs come first
    status = {(a.name, s): "done" if is_done(run_dir(exp, a.name, s)) else "pending" for a, s in jobs}
    running: dict[tuple[str, int], tuple[subprocess.Popen, float, Any]] = {}
    total = len(jobs)
    try:
        while True:
            for key, (proc, started, logfile) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                logfile.close()
                del running[key]
                folder = run_dir(exp, *key)
                if rc == 0:
                    seconds = time.perf_counter() - started
                    (folder / "done.json").write_text(json.dumps({"rc": rc, "seconds": seconds}) + "\n")
                    status[key] = "done"
                else:
                    status[key] = "failed"
                    log(f"FAILED {key[0]} seed {key[1]} (exit {rc}); see {folder / 'train.log'}")
                finished = sum(v in ("done", "failed", "blocked") for v in status.values())
                log(f"[{finished}/{total}] {key[0]} seed {key[1]}: {status[key]}")
            for arm, seed in jobs:
                key = (arm.name, seed)
                if status[key] != "pending":
                    continue
                needs = [status[(n, seed)] for n in arm.needs]
                if any(s in ("failed", "blocked") for s in needs):
                    status[key] = "blocked"
                    log(f"blocked {arm.name} seed {seed}: needs {arm.needs}")
                    continue
                if len(running) >= exp.workers or any(s != "done" for s in needs):
                    continue
                folder = run_dir(exp, arm.name, seed)
                folder.mkdir(parents=True, exist_ok=True)
                command = train_command(exp, arm, seed)
                logfile = open(folder / "train.log", "a")
                logfile.write(f"$ {shlex.join(command)}\n")
                logfile.flush()
                env = {**os.environ, "OMP_NUM_THREADS": str(exp.threads), "MKL_NUM_THREADS": str(exp.threads)}
                proc = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT, env=env)
                running[key] = (proc, time.perf_counter(), logfile)
                status[key] = "running"
                log(f"start {arm.name} seed {seed}")
            if not running and not any(v == "pending" for v in status.values()):
                return status
            time.sleep(1.0)
    finally:
        for proc, _, logfile in running.values():
            proc.terminate()
            proc.wait()
            logfile.close()


# ----------------------------------------------------------------------------------------------------------------
# Analysis and report.


def run_analysis(exp: Experiment, log=print) -> list[dict[str, Any]]:
    """Q/V/S per source on the analysed arm's runs; cached in OUT/analysis.json."""
    cache = exp.out / "analysis.json"
    if exp.analysis is None:
        return []
    if cache.is_file():
        return json.loads(cache.read_text())
    from npo.analysis.qvs import analyze_sources

    a = exp.analysis
    rows: list[dict[str, Any]] = []
    for seed in a.seeds:
        folder = run_dir(exp, a.arm, seed)
        if not is_done(folder):
            log(f"analysis: {a.arm} seed {seed} did not finish; skipped")
            continue
        models = {name: Path(resolve(exp, value, seed)) for name, value in a.models.items()}
        log(f"analysis: {a.arm} seed {seed}")
        for row in analyze_sources(
            folder,
            anchors=a.anchors,
            deltas=a.deltas,
            models=models,
            num_prompts=a.prompts,
            samples=a.samples,
            seed=seed,
        ):
            rows.append({"seed": seed, **row})
    cache.write_text(json.dumps(rows, indent=1, default=lambda v: None) + "\n")
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    python = platform.python_version()
    return f"{os.cpu_count()} CPU cores ({cpu}){memory}, no GPU used; Python {python}, torch {torch.__version__}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(exp: Experiment, analysis: list[dict[str, Any]], meta: dict[str, Any], log=print) -> Path:
    """The report of the finished runs (exp.report, figures in exp.figures); logs the paired summary."""
    from npo.analysis.results import compute_results, summary_lines, write_results
    from npo.analysis.runs import load_run
    from npo.runtime.run_config import load_run_config

    grid: dict[str, dict[int, Any]] = {}
    for arm in exp.arms:
        grid[arm.name] = {}
        for seed in exp.seeds:
            folder = run_dir(exp, arm.name, seed)
            if is_done(folder):
                grid[arm.name][seed] = load_run(folder)
    common = {k: stand_in(exp, k, v) for k, v in exp.set.items()}  # only sizes are read from it
    base = load_run_config(exp.base, overrides_for(exp, common, exp.threads))
    spec = {
        "arms": [{"name": a.name, "label": a.label, "description": a.description} for a in exp.arms],
        "baseline": exp.baseline,
        "horizon": exp.horizon,
        "roles": exp.roles,
        "window": exp.window,
        "samples_per_step": base.train.prompts_per_step * base.algo.group_size,
        "eval_samples": base.eval.num_prompts * base.eval.samples_per_prompt,
        "seeds": exp.seeds,
        "discussion": exp.discussion.read_text() if exp.discussion is not None else "",
    }
    exp.report.parent.mkdir(parents=True, exist_ok=True)
    write_results(grid, spec, analysis, meta, exp.report, exp.figures)
    for line in summary_lines(compute_results(grid, spec, analysis)):
        log(line)
    return exp.report


def run_experiment(path: str | Path, *, report_only: bool = False, log=print) -> Path:
    """Run (or resume) the grid, the analysis, and write the report. Returns the report's path."""
    exp = load_experiment(path)
    exp.out.mkdir(parents=True, exist_ok=True)
    state_file = exp.out / "experiment.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    started = time.perf_counter()
    if not report_only:
        state.setdefault("started", _now())
        status = run_grid(exp, log)
        bad = {f"{a}/seed{s}": v for (a, s), v in status.items() if v != "done"}
        if bad:
            log(f"not finished: {bad}")
        run_analysis(exp, log)
        state["wall_seconds"] = state.get("wall_seconds", 0.0) + time.perf_counter() - started
        state["finished"] = _now()
        state_file.write_text(json.dumps(state, indent=1) + "\n")
    command = f"npo experiment {exp.path}"
    meta = {
        "command": command,
        "machine": machine(),
        "wall_seconds": state.get("wall_seconds"),
        "started": state.get("started"),
        "finished": state.get("finished"),
        "commit": git_commit(),
        "versions": f"python {platform.python_version()}",
    }
    analysis = run_analysis(exp, log) if exp.analysis is not None and (exp.out / "analysis.json").is_file() else []
    report = write_report(exp, analysis, meta, log)
    log(f"report: {report}")
    return report


def start_background(path: str | Path) -> tuple[int, Path]:
    """Run the experiment in a detached process (its own session); returns (pid, log file)."""
    exp = load_experiment(path)
    exp.out.mkdir(parents=True, exist_ok=True)
    log_path = exp.out / "experiment.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "experiment", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (exp.out / "experiment.pid").write_text(f"{proc.pid}\n")
    return proc.pid, log_path


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
