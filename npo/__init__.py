"""Near-Future Policy Optimization (NPO) and AutoNPO on top of GRPO.

The method and the embedded runtime. This package never imports grpc, redis, fastapi, ray, vllm or deepspeed:
production transports and engines live in `services/`.
"""

__version__ = "0.1.0"
