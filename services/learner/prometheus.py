"""The learner's Prometheus metrics: per-step training signals, labelled by run, served on /metrics.

    metrics = LearnerMetrics("my-run")
    port = metrics.serve(port=9400)                # http://127.0.0.1:9400/metrics
    Runner(..., after_step=metrics.after_step)    # observe every metrics row

A row's missing value leaves its metric untouched: an absent `eval_acc` is not a zero accuracy, and a metric that was
never observed is not exported at all, so a reader (the AutoNPO controller) can tell "missing" from "0".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STEP_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
SYNC_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_GAUGES = {
    # metric name: (row key, help)
    "npo_step": ("step", "Main-line training step t of the latest row"),
    "npo_reward_mean": ("reward_mean", "Mean verified reward of the step's on-policy rollouts"),
    "npo_pass_rate": ("pass_rate", "Mean group pass rate p_hat of the step"),
    "npo_entropy": ("entropy", "Mean per-token policy entropy on the step's on-policy tokens (nats)"),
    "npo_eval_acc": ("eval_acc", "Held-out accuracy of the latest evaluation"),
    "npo_optimizer_steps": ("optimizer_steps", "Optimizer steps so far, scouts and replays included"),
    "npo_nonfinite_skipped": (
        "nonfinite_skipped",
        "Optimizer steps refused so far for a non-finite loss or gradient norm (exported once one was)",
    ),
}


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class LearnerMetrics:
    """Prometheus metrics of one run (label `run`), in their own registry."""

    def __init__(self, run: str, registry: CollectorRegistry | None = None) -> None:
        if not run:
            raise ValueError("run: must not be empty")
        self.run = run
        self.registry = registry or CollectorRegistry()
        self._gauges = {name: Gauge(name, doc, ["run"], registry=self.registry) for name, (_, doc) in _GAUGES.items()}
        self._guide_slots = Counter(
            "npo_guide_slots", "Group slots filled by a guide trajectory", ["run"], registry=self.registry
        )
        self._step_seconds = self._histogram(
            "npo_step_seconds", "Wall time of one training step (generation + learning)", STEP_SECONDS_BUCKETS
        )
        self._sync_seconds = self._histogram(
            "npo_weight_sync_seconds",
            "Time to publish the learner's weights to the rollout engines",
            SYNC_SECONDS_BUCKETS,
        )
        self._server = None

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        """A histogram labelled by run, in this registry."""
        return Histogram(name, documentation, ["run"], buckets=buckets, registry=self.registry)

    def observe(self, row: Mapping[str, Any]) -> None:
        """Record one metrics row of the runner; keys that are absent or not finite are skipped."""
        for name, (key, _) in _GAUGES.items():
            value = _finite(row.get(key))
            if value is not None:
                self._gauges[name].labels(run=self.run).set(value)
        slots = _finite(row.get("guide_slots"))
        if slots is not None and slots >= 0:
            self._guide_slots.labels(run=self.run).inc(slots)
        seconds = [_finite(row.get(k)) for k in ("gen_seconds", "train_seconds")]
        if any(s is not None for s in seconds):
            self._step_seconds.labels(run=self.run).observe(sum(s for s in seconds if s is not None))

    def observe_weight_sync(self, seconds: float) -> None:
        """Record one weight publication (learner -> rollout replicas)."""
        value = _finite(seconds)
        if value is None or value < 0:
            raise ValueError(f"seconds: must be a finite number >= 0, got {seconds!r}")
        self._sync_seconds.labels(run=self.run).observe(value)

    def after_step(self, runner: Any, row: Mapping[str, Any]) -> None:
        """The Runner's after_step hook."""
        self.observe(row)

    def serve(self, port: int = 0, address: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP; returns the bound port (port 0 = a free one)."""
        if self._server is not None:
            raise RuntimeError("metrics: already serving")
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def stop(self) -> None:
        """Stop the HTTP endpoint (no-op when not serving)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
