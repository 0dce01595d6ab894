"""The `npo` command: wires the method (npo/) to its engines and runs it.

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

Embedded default: every role runs in this process; the guidance cache is a real Redis-protocol server started
here (cache.url empty) and stopped on exit. This module is the composition root, so it may import services.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from npo.core.config import ConfigError
from services.wiring import build_learner, build_policy_and_task, open_store


def train(
    config: str | None,
    overrides: list[str],
    out: str | None,
    resume: str | None,
    progress: bool = True,
    metrics_port: int | None = None,
    metrics_address: str = "127.0.0.1",
) -> Path:
    from npo.runtime.run_config import load_run_config
    from npo.runtime.runner import Runner

    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: {run_dir} has no config.yaml (is it a run folder?)")
        cfg = load_run_config(config or run_dir / "config.yaml", overrides)
    else:
        cfg = load_run_config(config, overrides)
        run_dir = Path(out or f"runs/{cfg.method.value}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    started = time.perf_counter()
    policy, task = build_policy_and_task(cfg)
    with open_store(cfg.cache.url, cfg.cache.prefix) as store:
        learner = build_learner(cfg, policy)
        runner = Runner(cfg, run_dir, policy=policy, task=task, store=store, learner=learner, progress=progress)
        if metrics_port is not None:
            from services.learner.prometheus import LearnerMetrics

            metrics = LearnerMetrics(runner.run)
            port = metrics.serve(metrics_port, metrics_address)
            runner.after_step = metrics.after_step
            print(f"metrics: http://{metrics_address}:{port}/metrics")
        try:
            runner.train(resume=bool(resume))
        finally:
            if metrics_port is not None:
                metrics.stop()
            if not cfg.cache.url:
                store.clear_run(runner.run)
    from npo.analysis.report import write_report

    report = write_report(run_dir)
    print(f"run finished in {time.perf_counter() - started:.0f} s; report: {report}")
    return run_dir


def connect(args: argparse.Namespace) -> Path:
    """`npo train --connect`: run the learner's configured run to its end, then write the report."""
    from npo.analysis.report import write_report
    from services.ops.launcher import train_connected

    if args.config or args.overrides or args.resume or args.out or args.metrics_port is not None:
        raise ConfigError(
            "--connect: the learner's run config applies; give --config/--set/--out to `npo up` "
            "(and --metrics-port is the learner's, set by `npo up`)"
        )
    started = time.perf_counter()
    run_dir = Path(train_connected(args.connect, progress=not args.no_progress))
    if (run_dir / "metrics.jsonl").is_file():
        report = write_report(run_dir)
        print(f"run finished in {time.perf_counter() - started:.0f} s; report: {report}")
    else:
        print(f"run finished in {time.perf_counter() - started:.0f} s; run folder (on the learner): {run_dir}")
    return run_dir


def format_status(status: dict, recent: list[dict]) -> str:
    """`npo status` as text: metrics (or why they are missing), learner, AutoNPO, recent interventions."""
    import json

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


def controller_command(args: argparse.Namespace) -> int:
    """`npo status`, `npo intervene ...`, `npo autonpo on|off`: thin clients of the controller's REST API."""
    import json

    import yaml

    from services.controller.client import ControllerClient, ControllerError

    with ControllerClient.for_target(args.target) as client:
        try:
            if args.command == "status":
                status = client.status()
                recent = client.interventions(limit=10)
                if args.json:
                    print(json.dumps({"status": status, "interventions": recent}, indent=2))
                    return 0
                print(format_status(status, recent))
                return 0
            if args.command == "autonpo":
                overrides = {}
                for item in args.overrides:
                    key, sep, value = item.partition("=")
                    if not sep:
                        raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
                    overrides[key.removeprefix("autonpo.")] = yaml.safe_load(value)
                print(yaml.safe_dump(client.set_autonpo(args.switch == "on", overrides), sort_keys=False), end="")
                return 0
            if args.kind == "early":
                record = client.early_bootstrap(args.scout_steps)
            elif args.kind == "plateau":
                record = client.plateau_breakthrough(args.start, args.lookahead)
            else:
                record = client.rollback(args.step)
            print(f"started {record['id']} ({record['kind']})")
            while args.wait and record["state"] == "running":
                time.sleep(1.0)
                record = client.intervention(record["id"])
            if args.wait:
                print(json.dumps(record, indent=2))
                return 0 if record["state"] == "succeeded" else 1
            return 0
        except ControllerError as exc:
            print(f"npo: controller: {exc}", file=sys.stderr)
            return 2 if 400 <= exc.status_code < 500 else 1


def demo(config: str | None, overrides: list[str], out: str) -> None:
    from npo.analysis.report import compare_runs

    out_dir = Path(out)
    runs = []
    for method in ("grpo", "autonpo"):
        print(f"== {method} ==")
        runs.append(train(config, [*overrides, f"method={method}"], str(out_dir / method), None))
    table, path = compare_runs(runs, out_dir)
    print(table)
    print(f"comparison report: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npo", description="GRPO with Near-Future Policy Optimization (NPO/AutoNPO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="train a policy (embedded runtime)")
    p_train.add_argument("--config", help="YAML run config (see configs/)")
    p_train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=50 (repeatable)",
    )
    p_train.add_argument("--out", help="run folder (default runs/<method>-seed<seed>-<time>)")
    p_train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_train.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0 = any free port)")
    p_train.add_argument("--metrics-address", default="127.0.0.1", help="address of the /metrics endpoint")
    p_train.add_argument(
        "--connect",
        metavar="DIR|HOST:PORT",
        help="run against services: the folder of `npo up`, or the learner's address (its run config applies)",
    )

    p_up = sub.add_parser("up", help="start the run's services (cache, rollout replicas, learner) as local processes")
    p_up.add_argument("--config", help="YAML run config (see configs/)")
    p_up.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p_up.add_argument("--out", required=True, help="run folder (state, logs, checkpoints, metrics)")
    p_up.add_argument("--replicas", type=int, default=1, help="rollout replicas (default 1)")
    p_up.add_argument("--host", default="127.0.0.1", help="address every service listens on")
    p_up.add_argument("--learner-port", type=int, default=0, help="the learner's gRPC port (0: a free one)")
    p_up.add_argument("--metrics-port", type=int, default=0, help="the learner's /metrics port (0: a free one)")
    p_up.add_argument("--api-port", type=int, default=0, help="the controller's REST API port (0: a free one)")
    p_up.add_argument("--no-controller", action="store_true", help="start no controller (AutoNPO then runs inside "
                      "the learner when method=autonpo)")  # fmt: skip
    p_up.add_argument("--prometheus", action="store_true", help="also start a Prometheus server (needs the "
                      "`prometheus` binary) and let the controller read the metrics from it with PromQL")  # fmt: skip
    ray_help = "place the roles on a Ray cluster (default: auto, the `ray start --head` cluster)"
    p_up.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS", help=ray_help)
    p_up.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray: GPUs per rollout replica")
    p_up.add_argument("--learner-gpus", type=float, default=0.0, help="Ray: GPUs of the learner")
    p_up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every service to be healthy")

    p_down = sub.add_parser("down", help="stop the services `npo up` started in a run folder")
    p_down.add_argument("run", help="the run folder given to `npo up --out`")

    p_restart = sub.add_parser("restart", help="restart one service of `npo up` with its recorded command")
    p_restart.add_argument("run", help="the run folder given to `npo up --out`")
    p_restart.add_argument("service", help="controller, prometheus, ... (see services.json)")

    target_help = "the folder of `npo up` or the controller's http://host:port (default: runs/svc)"
    p_status = sub.add_parser("status", help="the controller's status and its recent interventions")
    p_status.add_argument("target", nargs="?", default="runs/svc", help=target_help)
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
        p.add_argument("target", nargs="?", default="runs/svc", help=target_help)
        p.add_argument("--wait", action="store_true", help="wait until the intervention ends and print its record")

    p_auto = sub.add_parser("autonpo", help="switch AutoNPO on or off in the controller")
    p_auto.add_argument("switch", choices=["on", "off"])
    p_auto.add_argument("target", nargs="?", default="runs/svc", help=target_help)
    p_auto.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="autonpo.KEY override"
    )

    p_demo = sub.add_parser("demo", help="GRPO and AutoNPO side by side on the same seed, then compare")
    p_demo.add_argument("--config", default="configs/demo.yaml")
    p_demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
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

    p_cfg = sub.add_parser("config", help="print every config option with its default and documentation")
    p_cfg.add_argument("--config", help="print this file resolved instead")
    p_cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    args = parser.parse_args(argv)
    try:
        if args.command == "train" and args.connect:
            connect(args)
        elif args.command == "up" and args.ray:
            from services.ops.ray_backend import up_ray

            if args.prometheus:
                raise ConfigError("--prometheus: not with --ray (point prometheus.url at the cluster's Prometheus)")
            started, _ = up_ray(
                args.config,
                args.overrides,
                args.out,
                ray_address=args.ray,
                replicas=args.replicas,
                gpus_per_replica=args.gpus_per_replica,
                learner_gpus=args.learner_gpus,
                controller=not args.no_controller,
                timeout_s=args.timeout,
            )
            for entry in started:
                print(f"{entry.name:16s} {entry.address:22s} (Ray actor) log {entry.log}")
            print(f"up on Ray. next: npo train --connect {args.out}; stop with: npo down {args.out}")
        elif args.command == "up":
            from services.ops.launcher import up

            started = up(
                args.config,
                args.overrides,
                args.out,
                replicas=args.replicas,
                host=args.host,
                learner_port=args.learner_port,
                metrics_port=args.metrics_port,
                api_port=args.api_port,
                controller=not args.no_controller,
                prometheus=args.prometheus,
                timeout_s=args.timeout,
            )
            for entry in started:
                label = "metrics" if entry.name == "learner" else "url"
                extra = f"  {label} {entry.metrics_url}" if entry.metrics_url else ""
                print(f"{entry.name:16s} {entry.address:22s} pid {entry.pid:<8d} log {entry.log}{extra}")
            print(f"up. next: npo train --connect {args.out}; stop with: npo down {args.out}")
        elif args.command in ("status", "intervene", "autonpo"):
            return controller_command(args)
        elif args.command == "restart":
            from services.ops.launcher import restart

            entry = restart(args.run, args.service)
            print(f"{entry.name} restarted: {entry.address} pid {entry.pid}")
        elif args.command == "down":
            import json

            from services.ops.launcher import STATE_FILE, down

            state_file = Path(args.run) / STATE_FILE
            if state_file.is_file() and json.loads(state_file.read_text()).get("backend") == "ray":
                from services.ops.ray_backend import down_ray

                stopped = down_ray(args.run)
            else:
                stopped = down(args.run)
            print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
        elif args.command == "train":
            train(
                args.config,
                args.overrides,
                args.out,
                args.resume,
                progress=not args.no_progress,
                metrics_port=args.metrics_port,
                metrics_address=args.metrics_address,
            )
        elif args.command == "demo":
            demo(args.config, args.overrides, args.out)
        elif args.command == "compare":
            from npo.analysis.report import compare_runs

            out = Path(args.out) if args.out else Path(args.runs[0]).resolve().parent
            table, path = compare_runs([Path(r) for r in args.runs], out)
            print(table)
            print(f"comparison report: {path}")
        elif args.command == "analyze":
            from npo.analysis.qvs import analyze_run

            deltas = [int(x) for x in args.deltas.split(",") if x.strip()]
            anchors = [int(x) for x in args.anchors.split(",") if x.strip()] or None
            analyze_run(
                Path(args.run),
                deltas=deltas,
                anchors=anchors,
                num_prompts=args.prompts,
                samples=args.samples,
                seed=args.seed,
            )
        elif args.command == "experiment":
            from services.ops import experiment

            if args.background:
                pid, log_path = experiment.start_background(args.file)
                print(f"experiment running in the background (pid {pid}); follow it with: tail -f {log_path}")
                print("run the same command again to resume it after an interruption")
            else:

                def log(message: str) -> None:
                    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

                experiment.run_experiment(args.file, report_only=args.report_only, log=log)
        elif args.command == "config":
            import yaml

            from npo.runtime.run_config import describe_config, load_run_config, run_config_to_dict

            if args.config or args.overrides:
                print(yaml.safe_dump(run_config_to_dict(load_run_config(args.config, args.overrides)), sort_keys=False))
            else:
                print("\n".join(describe_config()))
    except ConfigError as exc:
        print(f"npo: config error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"npo: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, TimeoutError) as exc:
        print(f"npo: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        service_commands = ("up", "down", "restart", "status", "intervene", "autonpo")
        if args.command not in service_commands and not getattr(args, "connect", None):
            raise
        print(f"npo: {exc}", file=sys.stderr)  # a service that failed to start, a failed or refused segment
        return 1
    except KeyboardInterrupt:
        print("npo: aborted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - Interrupted and checkpoint errors get a one-line message
        from npo.runtime.checkpoint import CheckpointError
        from npo.runtime.runner import Interrupted

        if isinstance(exc, Interrupted):
            print(f"npo: {exc}; continue with: npo train --resume {exc.path.parent.parent}", file=sys.stderr)
            return 130
        if isinstance(exc, CheckpointError):
            print(f"npo: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
