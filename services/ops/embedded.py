"""`npo train` and `npo demo`: a run with every role in this process.

The guidance cache is a real Redis-protocol server started here (cache.url empty) and stopped on exit; with
`metrics_port`, the learner's Prometheus /metrics is served while the run trains. The run's report is written at the
end.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

from npo.core.config import ConfigError
from services.wiring import build_learner, build_policy_and_task, open_store


def _is_checkpoint(folder: Path) -> bool:
    """A complete checkpoint folder as npo.runtime.checkpoint lists it (without importing torch)."""
    return re.fullmatch(r"step_\d{6,}", folder.name) is not None and (folder / "meta.json").is_file()


def has_checkpoint(run_dir: Path) -> bool:
    """Whether `run_dir` holds a complete checkpoint that `npo train --resume` can continue from (a folder left
    half-written by a kill during the first save does not count)."""
    return any(_is_checkpoint(p) for p in (Path(run_dir) / "checkpoints").glob("step_*"))


def resolve_run(config: str | None, overrides: list[str], out: str | None, resume: str | None):
    """(run config, run folder): a new run's (default folder runs/<method>-seed<seed>-<time>), or with `resume` the
    run in that folder (its config.yaml unless `config` is given). Imports no torch: a config error or a folder that
    cannot be resumed is reported before the runtime is imported."""
    from npo.runtime.run_config import load_run_config

    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: {run_dir} has no config.yaml (is it a run folder?)")
        cfg = load_run_config(config or run_dir / "config.yaml", overrides)
        if not has_checkpoint(run_dir):
            raise FileNotFoundError(
                f"--resume: {run_dir} has no checkpoint to resume from (checkpoints/step_NNNNNN); start it anew: "
                f"npo train --config {run_dir / 'config.yaml'} --out DIR"
            )
        return cfg, run_dir
    cfg = load_run_config(config, overrides)
    return cfg, Path(out or f"runs/{cfg.method.value}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")


@contextlib.contextmanager
def serve_metrics(runner, port: int | None, address: str) -> Iterator[None]:
    """The runner's Prometheus /metrics on `address`:`port` (0: any free port) while the block runs; None: none."""
    if port is None:
        yield
        return
    from services.learner.prometheus import LearnerMetrics

    metrics = LearnerMetrics(runner.run)
    bound = metrics.serve(port, address)
    runner.after_step = metrics.after_step
    print(f"metrics: http://{address}:{bound}/metrics")
    try:
        yield
    finally:
        metrics.stop()


def train(
    config: str | None,
    overrides: list[str],
    out: str | None,
    resume: str | None,
    progress: bool = True,
    metrics_port: int | None = None,
    metrics_address: str = "127.0.0.1",
) -> Path:
    """Train a run (or continue `resume` from its latest checkpoint), then write its report; returns the run folder."""
    cfg, run_dir = resolve_run(config, overrides, out, resume)  # before the runtime's import: config errors are fast
    from npo.runtime.runner import Runner

    started = time.perf_counter()
    policy, task = build_policy_and_task(cfg)
    with open_store(cfg.cache.url, cfg.cache.prefix) as store:
        learner = build_learner(cfg, policy)
        runner = Runner(cfg, run_dir, policy=policy, task=task, store=store, learner=learner, progress=progress)
        try:
            with serve_metrics(runner, metrics_port, metrics_address):
                runner.train(resume=bool(resume))
        finally:
            if not cfg.cache.url:
                store.clear_run(runner.run)
    from npo.analysis.report import write_report

    report = write_report(run_dir)
    print(f"run finished in {time.perf_counter() - started:.0f} s; report: {report}")
    return run_dir


def demo(config: str | None, overrides: list[str], out: str) -> None:
    """GRPO and AutoNPO on the same seed in out/grpo and out/autonpo, then their comparison report."""
    out_dir = Path(out)
    methods = ("grpo", "autonpo")
    for method in methods:  # both configs are checked before the first run starts
        resolve_run(config, [*overrides, f"method={method}"], str(out_dir / method), None)
    runs = []
    for method in methods:
        print(f"== {method} ==")
        runs.append(train(config, [*overrides, f"method={method}"], str(out_dir / method), None))
    from npo.analysis.report import compare_runs

    table, path = compare_runs(runs, out_dir)
    print(table)
    print(f"comparison report: {path}")
