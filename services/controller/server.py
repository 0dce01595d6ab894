"""`python -m services.controller`: the AutoNPO controller of one run, with its REST API.

    python -m services.controller --config run.yaml --learner 127.0.0.1:50053 --rollout 127.0.0.1:50052 \\
        --cache 127.0.0.1:50051 --metrics-url http://127.0.0.1:9400/metrics --state runs/x/controller \\
        --address 127.0.0.1:8080

Metrics come from the Prometheus server at `prometheus.url` of the run config when it is set (PromQL), else from
a direct scrape of `--metrics-url` (the learner's /metrics). Intervention records and the controller's state live in
`--state`/controller.db (SQLite), so a restart continues with its history. The API token comes from NPO_API_TOKEN
or --token-file; without one the mutating routes answer 503. Prints `serving on HOST:PORT` once the API listens.
A controller started while the learner is down waits up to LEARNER_WAIT_S for it; the API's port is taken even
when the old socket of a killed controller lingers (SO_REUSEADDR), so `npo restart` gets the same address.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from npo.core.config import ConfigError

log = logging.getLogger(__name__)

LEARNER_WAIT_S = 120.0
"""How long a starting controller waits for the learner to answer (it may be restarting too)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.controller", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML run config (the learner's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--learner", required=True, metavar="HOST:PORT", help="the LearnerService")
    parser.add_argument("--rollout", required=True, metavar="HOST:PORT[,...]", help="the rollout replicas")
    parser.add_argument("--cache", required=True, metavar="HOST:PORT", help="the GuidanceCacheService")
    parser.add_argument("--metrics-url", default="", help="the learner's /metrics (used without prometheus.url)")
    parser.add_argument("--state", required=True, help="folder of the controller's durable state (controller.db)")
    parser.add_argument("--address", default="127.0.0.1:8080", help="host:port of the REST API (port 0: a free one)")
    parser.add_argument("--token-file", help="file holding the API token (default: the NPO_API_TOKEN variable)")
    parser.add_argument("--read-auth", action="store_true", help="also require the token for GET /v1/...")
    return parser.parse_args(argv)


def metrics_source(cfg, metrics_url: str, run: str):
    """PrometheusSource when prometheus.url is set, else ScrapeSource of `metrics_url`."""
    from services.controller.metrics import PrometheusSource, ScrapeSource

    if cfg.prometheus.url:
        return PrometheusSource(cfg.prometheus.url, run, stale_after_s=cfg.controller.stale_after_seconds)
    if not metrics_url:
        raise ConfigError("--metrics-url: required when prometheus.url is not set (the learner's /metrics)")
    return ScrapeSource(metrics_url, run)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from npo.core.config import Method
        from npo.runtime.run_config import load_run_config
        from services.controller.api import create_app, load_token, serve_api
        from services.controller.engine import Controller, wait_for_learner
        from services.controller.records import InterventionRecords
        from services.grpc_common import wait_for_shutdown
        from services.guidance_cache.client import GuidanceCacheClient
        from services.learner.client import LearnerClient
        from services.rollout.client import RolloutClient
        from services.wiring import build_policy_and_task

        cfg = load_run_config(args.config, args.overrides)
        token = load_token(file=args.token_file)
        cfg.train.device = "cpu"  # the controller needs only the task and the tokenizer, on any node
        policy, task = build_policy_and_task(cfg)
        state = Path(args.state)
        state.mkdir(parents=True, exist_ok=True)
        host, _, port = args.address.rpartition(":")
        with contextlib.ExitStack() as stack:
            learner = stack.enter_context(LearnerClient(args.learner))
            rollout = stack.enter_context(RolloutClient([a for a in args.rollout.split(",") if a]))
            cache = stack.enter_context(GuidanceCacheClient(args.cache))
            run = wait_for_learner(learner, LEARNER_WAIT_S).run
            controller = Controller(
                cfg,
                learner=learner,
                rollout=rollout,
                cache=cache,
                source=metrics_source(cfg, args.metrics_url, run),
                records=InterventionRecords(state / "controller.db"),
                problems=task.train,
                encode=policy.encode_prompt,
                autonpo=cfg.method is Method.AUTONPO and cfg.controller.autonpo,
                poll_s=cfg.controller.poll_seconds,
            )
            app = create_app(controller, token, read_auth=args.read_auth)
            server, thread, bound = serve_api(app, host or "127.0.0.1", int(port))
            controller.start()
            autonpo = "on" if controller.autonpo_enabled else "off"
            detail = f"run {run}, metrics: {controller.source.describe()}, AutoNPO {autonpo}"
            wait_for_shutdown(f"controller: serving on {host or '127.0.0.1'}:{bound} ({detail})")
            controller.stop()
            server.should_exit = True
            thread.join(10)
    except (ConfigError, ValueError, OSError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
