"""The rollout role: an inference engine holding one policy version, behind gRPC (npo.v1.RolloutService).

- `servicer.RolloutServicer` / `servicer.VLLMRolloutServicer`: sample and verify, load a policy version in place
  (weight sync), score given sequences under a checkpoint.
- `server.serve` / `server.main`: the service on an npo.runtime.engine.RolloutEngine (TransformersEngine, or with
  --engine vllm `vllm_engine.VLLMEngine`), and `python -m services.rollout`.
- `vllm_engine.VLLMEngine`: the RolloutEngine on vLLM (imports vllm only when built).
- `client.RolloutClient`: npo.runtime.engine.RolloutEngine over one or several replicas, plus `load_policy` and
  `generate_verified`; a call is split into one chunk per configured replica (seeds per chunk, so results do not
  depend on which replicas are live), a dead replica is dropped and its chunks served by the others, and it rejoins
  once healthy, after loading the current weights.

    python -m services.rollout --config configs/demo.yaml --address 0.0.0.0:50052
"""
