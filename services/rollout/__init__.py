"""The rollout role: an inference engine holding one policy version, behind gRPC (npo.v1.RolloutService).

- `server.RolloutServicer` / `server.serve` / `server.main`: sample and verify, load a policy version in place
  (weight sync), score given sequences under a checkpoint; the engine is an npo.runtime.engine.RolloutEngine
  (TransformersEngine today).
- `client.RolloutClient`: npo.runtime.engine.RolloutEngine over one or several replicas, plus `load_policy` and
  `generate_verified`.

    python -m services.rollout --config configs/demo.yaml --address 0.0.0.0:50052
"""
