"""The learner role: one run's training loop behind gRPC (npo.v1.LearnerService).

- `server.LearnerServicer` / `server.serve` / `server.main`: the service around an npo.runtime.runner.Runner, and
  `python -m services.learner`.
- `client.LearnerClient`: the controller's side of the service.
- `publish.WeightPublisher`: the learner's weights to every rollout replica after each change.
- `prometheus.LearnerMetrics`: the learner's Prometheus /metrics.
- `deepspeed_engine.DeepSpeedLearner`: the embedded learner's step on a DeepSpeed engine with ZeRO (design card:
  docs/architecture.md, roles table). Import it explicitly: this package imports nothing heavy.
"""
