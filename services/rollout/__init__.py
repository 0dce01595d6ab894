"""The rollout role: an inference engine holding one policy version, behind gRPC (npo.v1.RolloutService).

- `servicer.RolloutServicer` / `servicer.VLLMRolloutServicer`: sample and verify, load a policy version in place
  (weight sync), score given sequences under a checkpoint.
- `server.serve` / `server.main`: the service on an npo.runtime.engine.RolloutEngine (TransformersEngine, or with
  --engine vllm `vllm_engine.VLLMEngine`), and `python -m services.rollout`.
- `vllm_engine.VLLMEngine`: the RolloutEngine on vLLM (imports vllm only when built).
- `client.RolloutClient`: npo.runtime.engine.RolloutEngine over one or several replicas, plus `load_policy` and
  `generate_verified`.

    python -m services.rollout --config configs/demo.yaml --address 0.0.0.0:50052
"""
