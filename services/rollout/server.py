"""The rollout server: RolloutService (services/rollout/servicer.py) on a rollout engine, and its command line.

`serve` starts the service on an engine, with grpc.health.v1 reporting SERVING once it returns (after the model was
loaded); `main` is `python -m services.rollout`, on the embedded TransformersEngine or, with --engine vllm, on
services.rollout.vllm_engine.VLLMEngine (imported only then).

    python -m services.rollout --config configs/demo.yaml --address 0.0.0.0:50052
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch

from npo.runtime.engine import RolloutEngine, TransformersEngine
from services.grpc_common import DEFAULT_MAX_MESSAGE_BYTES, host_of, serve_forever, start_server
from services.proto.npo.v1 import rollout_pb2_grpc as pb_grpc
from services.rollout.servicer import SERVICE_NAME, RolloutServicer, VLLMRolloutServicer

__all__ = ["SERVICE_NAME", "RolloutServicer", "VLLMRolloutServicer", "main", "parse_args", "serve"]


def serve(
    engine: RolloutEngine,
    tokenizer,
    task,
    address: str = "127.0.0.1:0",
    *,
    policy_step: int = 0,
    max_scorers: int = 2,
    max_workers: int = 4,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    servicer_class: type[RolloutServicer] = RolloutServicer,
) -> tuple[grpc.Server, int]:
    """Start RolloutService on `engine` (policy at `policy_step`) at `address` (port 0: a free one), with
    grpc.health.v1 reporting SERVING. Returns the started server and its port; stop it with `server.stop(grace)`.
    `servicer_class`: VLLMRolloutServicer for a VLLMEngine."""
    servicer = servicer_class(engine, tokenizer, task, policy_step=policy_step, max_scorers=max_scorers)
    add = pb_grpc.add_RolloutServiceServicer_to_server
    return start_server(
        servicer, add, SERVICE_NAME, address, max_workers=max_workers, max_message_bytes=max_message_bytes
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m services.rollout` (see --help)."""
    parser = argparse.ArgumentParser(
        prog="python -m services.rollout",
        description="Serve rollouts (npo.v1.RolloutService) of a run config's policy (transformers or vLLM engine).",
    )
    parser.add_argument("--config", required=True, help="YAML run config: its model, task and seed give the policy")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    parser.add_argument("--address", default="127.0.0.1:50052", help="host:port to listen on (port 0: a free one)")
    parser.add_argument("--batch-size", type=int, default=512, help="rows per forward pass of the engine")
    parser.add_argument("--max-scorers", type=int, default=2, help="checkpoint copies kept for Score")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_BYTES // 2**20)
    parser.add_argument("--workers", type=int, default=4, help="threads serving calls (the model runs one at a time)")
    parser.add_argument(
        "--engine",
        choices=["transformers", "vllm"],
        default="transformers",
        help="rollout engine: transformers (embedded) or vllm (services.rollout.vllm_engine; needs the vllm "
        "environment of scripts/setup_vllm_venv.sh)",
    )
    return parser.parse_args(argv)


def vllm_policy_engine(policy, dtype: str):
    """The VLLMEngine of `policy` (--engine vllm): the policy is written as an HF folder into a temporary directory
    (removed at exit), which vLLM loads."""
    import atexit
    import shutil
    import tempfile

    from npo.runtime.models import save_policy
    from services.rollout.vllm_engine import VLLMEngine

    folder = Path(tempfile.mkdtemp(prefix="npo-vllm-policy-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    save_policy(policy, folder)
    return VLLMEngine(folder, eos_id=policy.eos_id, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> int:
    """Load the policy and task of the run config (as `npo train` does), then serve until SIGTERM or Ctrl-C;
    prints `serving on HOST:PORT` once ready."""
    from npo.runtime.models import choose_threads
    from npo.runtime.run_config import load_run_config
    from services.wiring import build_policy_and_task

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.threads < 0:
            raise ValueError(f"--threads: must be >= 0, got {args.threads}")
        cfg = load_run_config(args.config, args.overrides)
        torch.set_num_threads(choose_threads(args.threads))  # 0: the cores this process may use
        policy, task = build_policy_and_task(cfg)
        options = {"max_workers": args.workers, "max_message_bytes": args.max_message_mb * 2**20}
        if args.engine == "vllm":
            engine = vllm_policy_engine(policy, cfg.model.dtype)
            server, port = serve(
                engine, policy.tokenizer, task, args.address, servicer_class=VLLMRolloutServicer, **options
            )
        else:
            engine = TransformersEngine(
                policy.model, eos_id=policy.eos_id, pad_id=policy.pad_id, batch_size=args.batch_size
            )
            server, port = serve(engine, policy.tokenizer, task, args.address, max_scorers=args.max_scorers, **options)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    detail = f"model {cfg.model.preset}, task {task.name}, policy step 0"
    serve_forever(server, f"rollout: serving on {host_of(args.address)}:{port} ({detail})")
    return 0
