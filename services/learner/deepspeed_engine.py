"""DeepSpeed learner: the embedded learner's step (npo.runtime.learner.TorchLearner) on a DeepSpeed engine with ZeRO.

    rewards (G, n) -> group advantages -> rows (prompt + response, behaviour log-probs, A_i, is_guide)
    -> micro-batches k = 1..K: engine forward -> token_logprobs -> policy_loss * w_k -> engine.backward
       (ZeRO reduces and partitions the gradients; only micro-batch K is an accumulation boundary)
    -> engine.step(): ZeRO computes the gradient norm, clips it to grad_clip, runs AdamW once

Exactly one optimizer step per train_step whatever K is: the engine runs with gradient_accumulation_steps = 1 and
the accumulation boundary is set by hand (engine.set_gradient_accumulation_boundary), so K may change from step to
step. The micro-batch weights w_k are TorchLearner's (sum_k w_k L_k is the full batch's loss for every aggregation
mode), so the loss is never divided by K again (engine.backward(..., scale_wrt_gas=False)).

Optimizer: torch.optim.AdamW handed to deepspeed.initialize. ZeRO supports it natively (it partitions its state like
any other), it is the very update TorchLearner runs (one step of either learner gives the same weights), and it
needs no compiled op. DeepSpeed's own Adam variants do: FusedAdam needs CUDA, DeepSpeedCPUAdam a C++ op that is
JIT-compiled on first use (or prebuilt with DS_BUILD_CPU_ADAM=1); they only pay off with optimizer offload.

Precision: weights, gradients and optimizer state stay float32; dtype "bfloat16" runs the forward under autocast,
as TorchLearner does (DeepSpeed's "bf16" mode, bf16 weights with fp32 master copies, is a different numeric
recipe and is not used, so both learners train the same model).

Process group: when no launcher started one (RANK unset), a one-process world (rank 0 of 1) on 127.0.0.1 and a free
port; backend gloo on a CPU (DS_ACCELERATOR=cpu), the accelerator's (NCCL on CUDA) otherwise. Under a launcher
(deepspeed, torchrun) every rank runs this class on its share of the groups and DeepSpeed averages the gradients.

Device: DeepSpeed picks its accelerator once, when it is first imported (DS_ACCELERATOR, else CUDA when torch sees a
GPU, else the CPU); services/wiring.py (build_learner) sets DS_ACCELERATOR from train.device. deepspeed.initialize
moves the model to the accelerator's device (cuda:LOCAL_RANK on CUDA), so a policy loaded on the CPU follows it, and
the rollout engine, which shares the model, samples there too. A model already on a GPU with a CPU accelerator is
refused (DeepSpeed would silently move it back to the CPU).

ZeRO stages 0, 1 and 2. Stage 3 partitions the parameters themselves, so the runner's in-place weight loading
(npo.runtime.learner.load_weights) and save_pretrained would see empty tensors; it is refused until weights go
through the engine (GatheredParameters or engine.save_checkpoint).

A step whose loss or gradient norm is not finite is refused, as TorchLearner does: without ZeRO the engine steps
with a no-op optimizer step (its counters advance, the weights and AdamW's state do not); ZeRO 1-2 take their own
overflow path (gradients dropped, engine.skipped_steps + 1), which a non-finite gradient norm triggers by itself and
a non-finite loss forces. `nonfinite_skipped` counts them.

Checkpoint state (state_dict / load_state_dict) holds plain tensors and numbers only, so the runner's
torch.load(weights_only=True) reads it. The runner loads the weights into the module first, then calls
load_state_dict, which restores the optimizer state and re-derives ZeRO's fp32 master partition from those module
weights (ZeRO's own load path with load_from_fp32_weights=False): a rollback is exact.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from npo.core.gate import MixedGroup
from npo.runtime.learner import MicroBatchLearner, step_metrics

ZERO_STAGES = (0, 1, 2)
"""ZeRO stages this learner runs (3 is refused: see the module docstring)."""

_ZERO_STATE_KEYS = (
    "base_optimizer_state",
    "base_optimizer_state_step",
    "group_paddings",
    "partition_count",
    "clip_grad",
    "overflow",
    "dynamic_loss_scale",
    "ds_version",
)
"""Entries of the ZeRO-1/2 optimizer's state_dict kept in a checkpoint: those its load_state_dict reads when the
fp32 master weights are re-derived from the module. Left out: the loss-scaler object (a static scale of 1 without
fp16), the stage enum and the parameter-slice map (universal checkpoints only), which torch.load(weights_only=True)
could not read."""


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed plumbing.


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a one-process rendezvous)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group() -> None:
    """Initialise torch.distributed through DeepSpeed unless already done.

    Without a launcher (RANK unset) this is a one-process world: RANK=0, LOCAL_RANK=0, WORLD_SIZE=1,
    MASTER_ADDR=127.0.0.1 and a free MASTER_PORT are set in the environment where missing. Backend: gloo on the
    CPU accelerator, the accelerator's own (NCCL on CUDA) otherwise.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ["RANK"] = "0"
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        backend = "gloo"
    else:
        backend = accelerator.communication_backend_name()
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # NCCL binds this rank to its own GPU
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def deepspeed_config(*, micro_batch_size: int, grad_clip: float, zero_stage: int) -> dict[str, Any]:
    """The engine's config: one micro-batch per accumulation step (boundaries are set by hand), gradient clipping
    at grad_clip (0 = none), ZeRO `zero_stage`, fp32 weights (no fp16/bf16 section)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world,
        "gradient_clipping": float(grad_clip) if grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def _optimizer_step_skipped(optimizer: Any):
    """engine.step() inside the block keeps its bookkeeping (step counters, zeroing the gradients) but the optimizer
    changes neither the weights nor its state: a refused step without ZeRO (ZeRO 1-2 skip one by themselves)."""
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step


@contextlib.contextmanager
def _zero_overflow_forced(optimizer: Any):
    """engine.step() inside the block takes the ZeRO 1-2 optimizer's overflow path (gradients dropped, no update,
    engine.skipped_steps + 1), as when its gradient norm is not finite: a refused step whose loss is not finite."""
    saved = optimizer.check_grad_overflow
    optimizer.check_grad_overflow = True
    optimizer.has_overflow = lambda *args, **kwargs: True
    try:
        yield
    finally:
        del optimizer.has_overflow
        optimizer.check_grad_overflow = saved


class _EngineForward(torch.nn.Module):
    """The engine's forward with the causal LM's keyword signature, so token_logprobs can pass logits_to_keep (the
    LM head then runs on response positions only); DeepSpeedEngine.forward(*inputs, **kwargs) would hide it."""

    def __init__(self, engine: torch.nn.Module) -> None:
        super().__init__()
        self.engine = engine
        self._accepted = set(inspect.signature(engine.module.forward).parameters)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=None, use_cache=None):
        extra = {"logits_to_keep": logits_to_keep, "use_cache": use_cache}
        kwargs = {k: v for k, v in extra.items() if v is not None and k in self._accepted}
        return self.engine(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


class DeepSpeedLearner(MicroBatchLearner):
    """TorchLearner's interface on a DeepSpeed engine: AdamW, ZeRO stage 0-2, gradient clipping, micro-batches
    with accumulation and one optimizer step per train_step, fp32 or bf16 autocast."""

    def __init__(self, model: torch.nn.Module, *, zero_stage: int = 2, **settings: Any) -> None:
        """`settings`: MicroBatchLearner's keyword arguments (npo.runtime.runner.learner_kwargs)."""
        if zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage: must be one of {ZERO_STAGES}, got {zero_stage!r}")
        dtype = settings.get("dtype", "float32")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: must be 'float32' or 'bfloat16', got {dtype!r}")
        micro_batch_size = settings.get("micro_batch_size", 256)
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
        model_device = next(model.parameters()).device.type
        if model_device != "cpu" and model_device != accelerator:
            raise ValueError(
                f"model: is on {model_device} but DeepSpeed's accelerator is {accelerator}; set DS_ACCELERATOR "
                f"(or train.device) consistently before deepspeed is first imported"
            )
        init_process_group()
        super().__init__(model, **settings)
        self.zero_stage = zero_stage
        config = deepspeed_config(micro_batch_size=micro_batch_size, grad_clip=self.grad_clip, zero_stage=zero_stage)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        if self.reference is not None:
            self.reference.to(self.engine.device)
        self._forward = _EngineForward(self.engine)

    @property
    def device(self) -> torch.device:
        """Where the engine keeps the model and computes (cuda:LOCAL_RANK on CUDA, cpu on the CPU accelerator)."""
        return torch.device(self.engine.device)

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps the engine has applied (one per train_step)."""
        return int(self.engine.global_steps)

    def state_dict(self) -> dict:
        """Optimizer state for a checkpoint (plain tensors and numbers; this rank's partition under ZeRO).

        Stage 0: {"optimizer": AdamW.state_dict()}, the same entry as TorchLearner. Stages 1-2:
        {"zero_optimizer": the ZeRO optimizer's state_dict without its non-tensor objects}. Both add "engine":
        the engine's step counters. Tensors are the live ones: serialise (torch.save) or copy before training on.
        """
        engine = {"global_steps": int(self.engine.global_steps), "global_samples": int(self.engine.global_samples)}
        if self.zero_stage == 0:
            return {"optimizer": self.engine.optimizer.state_dict(), "engine": engine, **self.skip_counter_state()}
        full = self.engine.optimizer.state_dict()
        zero = {key: full[key] for key in _ZERO_STATE_KEYS if key in full}
        return {"zero_optimizer": zero, "engine": engine, **self.skip_counter_state()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the optimizer state of `state_dict()`. Load the model weights first: under ZeRO the fp32 master
        partition is re-derived from the module's weights here."""
        key = "optimizer" if self.zero_stage == 0 else "zero_optimizer"
        if key not in state:
            raise ValueError(
                f"state: no {key!r} entry (has {sorted(state)}); a ZeRO-{self.zero_stage} learner reads the state "
                "of a learner with the same ZeRO stage"
            )
        if self.zero_stage == 0:
            self.engine.optimizer.load_state_dict(state[key])
        else:
            self.engine.optimizer.load_state_dict(
                [dict(state[key])], load_optimizer_states=True, load_from_fp32_weights=False
            )
        self.load_skip_counter(state)
        counters = state.get("engine", {})
        self.engine.global_steps = int(counters.get("global_steps", self.engine.global_steps))
        self.engine.global_samples = int(counters.get("global_samples", self.engine.global_samples))

    def train_step(self, groups: Sequence[MixedGroup], prompt_ids: Mapping[str, list[int]]) -> dict[str, float]:
        """One optimizer step on G mixed groups; returns metrics (loss, clip fractions, entropy, grad_norm, ...)."""
        start = time.perf_counter()
        self.engine.train()
        acc = self.accumulate(
            self._forward,
            groups,
            prompt_ids,
            backward=lambda loss: self.engine.backward(loss, scale_wrt_gas=False),
            begin=self.engine.set_gradient_accumulation_boundary,
        )
        if self.zero_stage == 0:
            grad_norm = self._stage0_grad_norm()
            skip = self.refuses(acc.loss, grad_norm)
            with _optimizer_step_skipped(self.engine.optimizer) if skip else contextlib.nullcontext():
                self.engine.step()
        else:
            skipped_before = self.engine.skipped_steps
            # ZeRO 1-2 skip a step whose gradient norm is not finite themselves; a non-finite loss forces that path.
            with (
                _zero_overflow_forced(self.engine.optimizer)
                if not math.isfinite(acc.loss)
                else contextlib.nullcontext()
            ):
                self.engine.step()
            grad_norm = float(self.engine.get_global_grad_norm())
            if self.engine.skipped_steps > skipped_before:
                self.nonfinite_skipped += 1
        return step_metrics(acc, grad_norm, groups, time.perf_counter() - start, self.nonfinite_skipped)

    def _stage0_grad_norm(self) -> float:
        """Without ZeRO the engine clips but does not report the norm: the pre-clip 2-norm of all gradients."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
