"""The `npo` command: its argument parser and a table of handlers, one per command.

    npo train   --config FILE [--set key=value ...] [--out DIR] [--resume DIR]
    npo train   --connect DIR|HOST:PORT               drive the run of services started by `npo up`
    npo up      --config FILE --out DIR [--replicas N] guidance cache, rollout replicas and learner as processes
    npo down    DIR                                   stop what `npo up` started
    npo restart DIR SERVICE                           restart one service with its recorded command
    npo status  [DIR|URL]                             the controller's view: step, reward, entropy, interventions
    npo intervene early|plateau|rollback ... [DIR|URL] a manual intervention through the controller's REST API
    npo autonpo on|off [--set k=v ...] [DIR|URL]      switch AutoNPO in the controller (with autonpo overrides)
    npo demo    --config FILE [--out DIR]            GRPO and AutoNPO side by side, same seed, then a comparison
    npo compare DIR [DIR ...] [--out DIR]           table + overlay plots
    npo analyze DIR [--deltas 0,10,20,40]           Q(Delta), V(Delta), S(Delta) across a run's checkpoints
    npo config  [--config FILE]                     every option with its default and documentation
    npo experiment FILE [--background|--report-only] a grid of arms x seeds, Q/V/S analysis, a results report
    npo screen FILE [--background|--report-only]     one GRPO run per regime, the near future's headroom, ranked

Embedded default: every role runs in this process (services/ops/embedded.py). What a command does lives in
services/ops (operating a run) and npo.analysis (reports); a handler here only passes the arguments on and prints.
Errors a user can act on are one line on stderr with the exit code 2 (config, a missing file, a damaged checkpoint),
1 (a service, a connection) or 130 (interrupted). A run config is loaded and validated before torch, transformers or
the runtime is imported, so a config error takes well under two seconds. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from npo.core.config import ConfigError

SERVICE_COMMANDS = ("up", "down", "restart", "status", "intervene", "autonpo")
"""Commands whose RuntimeError (a service that failed to start, a failed or refused segment) is one line."""
TARGET_HELP = "the folder of `npo up` or the controller's http://host:port (default: runs/svc)"


# ----------------------------------------------------------------------------------------------------------------
# The parser.


def _add_set(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a policy (embedded runtime)")
    p.add_argument("--config", help="YAML run config (see configs/)")
    _add_set(p, "override a config value, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--out", help="run folder (default runs/<method>-seed<seed>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0 = any free port)")
    p.add_argument("--metrics-address", default="127.0.0.1", help="address of the /metrics endpoint")
    connect_help = "run against services: the folder of `npo up`, or the learner's address (its run config applies)"
    p.add_argument("--connect", metavar="DIR|HOST:PORT", help=connect_help)


def _add_up(sub) -> None:
    p = sub.add_parser("up", help="start the run's services (cache, rollout replicas, learner) as local processes")
    p.add_argument("--config", help="YAML run config (see configs/)")
    _add_set(p)
    p.add_argument("--out", required=True, help="run folder (state, logs, checkpoints, metrics)")
    p.add_argument("--replicas", type=int, default=1, help="rollout replicas (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="address every service listens on")
    p.add_argument("--learner-port", type=int, default=0, help="the learner's gRPC port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=0, help="the learner's /metrics port (0: a free one)")
    p.add_argument("--api-port", type=int, default=0, help="the controller's REST API port (0: a free one)")
    p.add_argument("--no-controller", action="store_true", help="start no controller (AutoNPO then runs inside "
                   "the learner when method=autonpo)")  # fmt: skip
    p.add_argument("--prometheus", action="store_true", help="also start a Prometheus server (needs the "
                   "`prometheus` binary) and let the controller read the metrics from it with PromQL")  # fmt: skip
    ray_help = "place the roles on a Ray cluster (default: auto, the `ray start --head` cluster)"
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS", help=ray_help)
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray: GPUs per rollout replica")
    p.add_argument("--learner-gpus", type=float, default=0.0, help="Ray: GPUs of the learner")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every service to be healthy")


def _add_down_restart(sub) -> None:
    p_down = sub.add_parser("down", help="stop the services `npo up` started in a run folder")
    p_down.add_argument("run", help="the run folder given to `npo up --out`")
    p_restart = sub.add_parser("restart", help="restart one service of `npo up` with its recorded command")
    p_restart.add_argument("run", help="the run folder given to `npo up --out`")
    p_restart.add_argument("service", help="controller, prometheus, ... (see services.json)")


def _add_controller(sub) -> None:
    p_status = sub.add_parser("status", help="the controller's status and its recent interventions")
    p_status.add_argument("target", nargs="?", default="runs/svc", help=TARGET_HELP)
    p_status.add_argument("--json", action="store_true", help="print the raw JSON")

    p_iv = sub.add_parser("intervene", help="start a manual intervention through the controller")
    iv_sub = p_iv.add_subparsers(dest="kind", required=True)
    p_early = iv_sub.add_parser("early", help="early bootstrap: scout ahead, roll back, replay with guidance")
    p_early.add_argument("--scout-steps", type=int, required=True)
    p_plateau = iv_sub.add_parser("plateau", help="plateau breakthrough from plateau_start with a lookahead")
    p_plateau.add_argument("--start", type=int, required=True, help="plateau_start t_p")
    p_plateau.add_argument("--lookahead", type=int, required=True, help="lookahead_steps Delta")
    p_rb = iv_sub.add_parser("rollback", help="roll back to a checkpoint and continue from there")
    p_rb.add_argument("--step", type=int, required=True)
    for p in (p_early, p_plateau, p_rb):
        p.add_argument("target", nargs="?", default="runs/svc", help=TARGET_HELP)
        p.add_argument("--wait", action="store_true", help="wait until the intervention ends and print its record")

    p_auto = sub.add_parser("autonpo", help="switch AutoNPO on or off in the controller")
    p_auto.add_argument("switch", choices=["on", "off"])
    p_auto.add_argument("target", nargs="?", default="runs/svc", help=TARGET_HELP)
    _add_set(p_auto, "autonpo.KEY override")


def _add_results(sub) -> None:
    p_demo = sub.add_parser("demo", help="GRPO and AutoNPO side by side on the same seed, then compare")
    p_demo.add_argument("--config", default="configs/demo.yaml")
    _add_set(p_demo)
    p_demo.add_argument("--out", default="runs/demo")

    p_cmp = sub.add_parser("compare", help="compare finished runs: table and overlay plots")
    p_cmp.add_argument("runs", nargs="+")
    p_cmp.add_argument("--out", help="where to write compare.md and plots (default: the first run's parent)")

    p_an = sub.add_parser("analyze", help="measure Q(Delta), V(Delta), S(Delta) across a run's checkpoints")
    p_an.add_argument("run")
    p_an.add_argument("--deltas", default="0,10,20,40", help="comma-separated Delta values (0 = the noise floor)")
    p_an.add_argument("--anchors", default="", help="comma-separated anchor steps t (default: every checkpoint)")
    p_an.add_argument("--prompts", type=int, default=256, help="train prompts probed per anchor")
    p_an.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p_an.add_argument("--seed", type=int, default=0)

    p_exp = sub.add_parser("experiment", help="run a grid of arms x seeds (resumable), analyse, write the report")
    p_exp.add_argument("file", help="experiment file, e.g. configs/experiments/paper_claims.yaml")
    p_exp.add_argument("--background", action="store_true", help="run detached; the log goes to OUT/experiment.log")
    p_exp.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    p_scr = sub.add_parser("screen", help="one GRPO run per regime, then the near future's real headroom, ranked")
    p_scr.add_argument("file", help="screen file, e.g. configs/screens/regimes.yaml")
    p_scr.add_argument("--background", action="store_true", help="run detached; the log goes to OUT/screen.log")
    p_scr.add_argument("--report-only", action="store_true", help="only rewrite the report from cached measurements")

    p_cfg = sub.add_parser("config", help="print every config option with its default and documentation")
    p_cfg.add_argument("--config", help="print this file resolved instead")
    _add_set(p_cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npo", description="GRPO with Near-Future Policy Optimization (NPO/AutoNPO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_up, _add_down_restart, _add_controller, _add_results):
        add(sub)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# The handlers: each returns the exit code.


def _check_config(config: str | None, overrides: list[str]) -> None:
    """Load and validate a run config (ConfigError naming the key); imports no torch, transformers or service."""
    from npo.runtime.run_config import load_run_config

    load_run_config(config, overrides)


def _train(args: argparse.Namespace) -> int:
    if args.connect:
        return _train_connected(args)
    from services.ops.embedded import train

    train(args.config, args.overrides, args.out, args.resume, progress=not args.no_progress,
          metrics_port=args.metrics_port, metrics_address=args.metrics_address)  # fmt: skip
    return 0


def _train_connected(args: argparse.Namespace) -> int:
    if args.config or args.overrides or args.resume or args.out or args.metrics_port is not None:
        raise ConfigError(
            "--connect: the learner's run config applies; give --config/--set/--out to `npo up` "
            "(and --metrics-port is the learner's, set by `npo up`)"
        )
    from services.ops.connect import run_connected

    run_connected(args.connect, progress=not args.no_progress)
    return 0


def _up(args: argparse.Namespace) -> int:
    if args.ray:
        return _up_ray(args)
    from services.ops.launcher import up

    started = up(args.config, args.overrides, args.out, replicas=args.replicas, host=args.host,
                 learner_port=args.learner_port, metrics_port=args.metrics_port, api_port=args.api_port,
                 controller=not args.no_controller, prometheus=args.prometheus, timeout_s=args.timeout)  # fmt: skip
    for entry in started:
        label = "metrics" if entry.name == "learner" else "url"
        extra = f"  {label} {entry.metrics_url}" if entry.metrics_url else ""
        print(f"{entry.name:16s} {entry.address:22s} pid {entry.pid:<8d} log {entry.log}{extra}")
    print(f"up. next: npo train --connect {args.out}; stop with: npo down {args.out}")
    return 0


def _up_ray(args: argparse.Namespace) -> int:
    if args.prometheus:
        raise ConfigError("--prometheus: not with --ray (point prometheus.url at the cluster's Prometheus)")
    _check_config(args.config, args.overrides)  # before importing Ray and joining its cluster
    from services.ops.ray_backend import up_ray

    started, _ = up_ray(args.config, args.overrides, args.out, ray_address=args.ray, replicas=args.replicas,
                        gpus_per_replica=args.gpus_per_replica, learner_gpus=args.learner_gpus,
                        controller=not args.no_controller, timeout_s=args.timeout)  # fmt: skip
    for entry in started:
        print(f"{entry.name:16s} {entry.address:22s} (Ray actor) log {entry.log}")
    print(f"up on Ray. next: npo train --connect {args.out}; stop with: npo down {args.out}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from services.ops.state import backend

    if backend(args.run) == "ray":
        from services.ops.ray_backend import down_ray

        stopped = down_ray(args.run)
    else:
        from services.ops.launcher import down

        stopped = down(args.run)
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0


def _restart(args: argparse.Namespace) -> int:
    from services.ops.launcher import restart

    entry = restart(args.run, args.service)
    print(f"{entry.name} restarted: {entry.address} pid {entry.pid}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from services.ops import control

    return control.run_command(args.target, lambda client: control.show_status(client, args.json))


def _intervene(args: argparse.Namespace) -> int:
    from services.ops import control

    params = {k: getattr(args, k) for k in ("scout_steps", "start", "lookahead", "step") if hasattr(args, k)}
    return control.run_command(args.target, lambda client: control.intervene(client, args.kind, params, args.wait))


def _autonpo(args: argparse.Namespace) -> int:
    from services.ops import control

    on = args.switch == "on"
    return control.run_command(args.target, lambda client: control.switch_autonpo(client, on, args.overrides))


def _demo(args: argparse.Namespace) -> int:
    from services.ops.embedded import demo

    demo(args.config, args.overrides, args.out)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from npo.analysis.report import compare_runs

    out = Path(args.out) if args.out else Path(args.runs[0]).resolve().parent
    table, path = compare_runs([Path(r) for r in args.runs], out)
    print(table)
    print(f"comparison report: {path}")
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _analyze(args: argparse.Namespace) -> int:
    from npo.analysis.qvs import analyze_run

    analyze_run(Path(args.run), deltas=_ints(args.deltas), anchors=_ints(args.anchors) or None,
                num_prompts=args.prompts, samples=args.samples, seed=args.seed)  # fmt: skip
    return 0


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _experiment(args: argparse.Namespace) -> int:
    from services.ops import experiment

    if args.background:
        pid, log_path = experiment.start_background(args.file)
        print(f"experiment running in the background (pid {pid}); follow it with: tail -f {log_path}")
        print("run the same command again to resume it after an interruption")
    else:
        experiment.run_experiment(args.file, report_only=args.report_only, log=_log)
    return 0


def _config(args: argparse.Namespace) -> int:
    from npo.runtime.run_config import describe_config, load_run_config, run_config_to_dict

    if args.config or args.overrides:
        import yaml

        print(yaml.safe_dump(run_config_to_dict(load_run_config(args.config, args.overrides)), sort_keys=False))
    else:
        print("\n".join(describe_config()))
    return 0


def _screen(args: argparse.Namespace) -> int:
    from services.ops.screen import run_screen

    run_screen(args.file, background=args.background, report_only=args.report_only, log=_log)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train,
    "up": _up,
    "down": _down,
    "restart": _restart,
    "status": _status,
    "intervene": _intervene,
    "autonpo": _autonpo,
    "demo": _demo,
    "compare": _compare,
    "analyze": _analyze,
    "experiment": _experiment,
    "screen": _screen,
    "config": _config,
}


# ----------------------------------------------------------------------------------------------------------------
# Errors and the entry point.


def _raised_by(exc: Exception, module: str, name: str) -> bool:
    """Whether `exc` is `module`.`name`, without importing `module` (if it was never imported, it raised nothing)."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(exc, getattr(loaded, name))


def _checkpoint_message(args: argparse.Namespace, exc: Exception) -> str:
    """One line: the checkpoint problem (it names the checkpoint folder) and, unless it gives one, a hint."""
    message = " ".join(str(exc).split("\n"))
    if "hint:" in message:
        return message
    resume = getattr(args, "resume", None)
    where = f"the run in {resume} cannot resume from it: " if resume else ""
    return f"{message}; hint: {where}restore that checkpoint folder from a backup, or start a new run"


def _error_code(args: argparse.Namespace, exc: Exception) -> int | None:
    """Print a one-line message for an error a user can act on and return its exit code; None: not such an error
    (it propagates with its traceback). Runtime exceptions are recognised without importing the runtime."""
    if isinstance(exc, ConfigError):
        print(f"npo: config error: {exc}", file=sys.stderr)
        return 2
    if _raised_by(exc, "npo.runtime.checkpoint", "CheckpointError"):  # a RuntimeError, but the user's to fix
        print(f"npo: checkpoint error: {_checkpoint_message(args, exc)}", file=sys.stderr)
        return 2
    service = args.command in SERVICE_COMMANDS or getattr(args, "connect", None)
    if isinstance(exc, FileNotFoundError | ConnectionError | TimeoutError) or service and isinstance(exc, RuntimeError):
        print(f"npo: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, FileNotFoundError) else 1
    if _raised_by(exc, "npo.runtime.runner", "Interrupted"):
        print(f"npo: {exc}; continue with: npo train --resume {exc.path.parent.parent}", file=sys.stderr)
        return 130
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except KeyboardInterrupt:
        print("npo: aborted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the errors a user can act on get a one-line message
        code = _error_code(args, exc)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
