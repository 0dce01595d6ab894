"""RolloutService (proto/npo/v1/rollout.proto) over a rollout engine: sample and verify, weight sync, scoring.

The engine is an npo.runtime.engine.RolloutEngine (generate, score): the embedded TransformersEngine today, vLLM later.
Loading a weights folder in place and scoring under another checkpoint need the engine's torch model, which only
TransformersEngine exposes; another engine answers those calls with UNIMPLEMENTED.

- Generate: n samples per prompt with their behaviour log-probs, then verification. A prompt with a prompt_id is
  the problem of that id in the server's task (train or test split); its reward is
  task.reward(problem, tokenizer.decode(ids, skip_special_tokens=True)) when the sample finished (EOS within
  max_new_tokens) and 0.0 when it did not. A prompt with an empty prompt_id is not verified (reward 0.0): that is
  how RolloutClient.generate, the plain RolloutEngine call, samples. A given `answer` must equal the task's answer
  of that prompt_id (it catches a rollout server configured with another task); `metadata_json` is not read, the
  task's problem carries its metadata. `task` must be empty or the server's task name.
- LoadPolicy: the weights of a folder (`checkpoint.path` on the server's file system) are copied into the engine's
  model in place (npo.runtime.learner.load_weights; the engine is not rebuilt). A checkpoint folder of
  npo.runtime.checkpoint
  (`step_NNNNNN` with meta.json) has every checksum verified first, and its step is the checkpoint's
  (`checkpoint.step` -1 takes it, another value must equal it); a plain HF folder (model.save_pretrained) takes
  `checkpoint.step` as given (-1: unknown). Loading what is already loaded (same folder, step, version tag and
  weights file) is a no-op with load_seconds 0. A load that fails half way leaves no usable policy: Generate and
  Score on the current policy then answer FAILED_PRECONDITION until a LoadPolicy succeeds.
- Score: teacher-forced log-probs under `checkpoint.path` (a second model copy, kept in a small LRU cache keyed
  by folder and weights content; the path and step rules of LoadPolicy), or under the current policy when the
  checkpoint is unset, its path empty, or it names the folder currently loaded.

Status codes (services.grpc_common.status_for, plus two set here): a bad argument (unknown prompt_id, empty prompt,
token id outside the vocabulary, n < 1, temperature < 0, ...) -> INVALID_ARGUMENT naming the field; a checkpoint
path that does not exist -> NOT_FOUND; a corrupted checkpoint -> DATA_LOSS; `expected_policy_step` other than the
loaded policy's step -> FAILED_PRECONDITION. Health (grpc.health.v1) reports SERVING once `serve` returns, which is
after the model was loaded.

Concurrency: one lock serialises every use of the model (generate, score, load), so a weight sync never overlaps a
generation; run several replicas for parallelism (RolloutClient spreads a call across them).

    python -m services.rollout --config configs/demo.yaml --address 0.0.0.0:50052
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from npo.core.types import Problem
from npo.runtime.checkpoint import CheckpointError, CheckpointManager
from npo.runtime.engine import RolloutEngine, SamplingParams, TransformersEngine
from npo.runtime.learner import load_weights
from npo.runtime.verify import verified_sample
from services.grpc_common import DEFAULT_MAX_MESSAGE_BYTES, add_health, bind, make_server, sample_to_message
from services.proto.npo.v1 import common_pb2
from services.proto.npo.v1 import rollout_pb2 as pb
from services.proto.npo.v1 import rollout_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RolloutService"].full_name
"""Full name of the service ("npo.v1.RolloutService"), as health checks and service configs name it."""
WEIGHTS_FILE = "model.safetensors"
"""The weights file of a policy folder (what npo.runtime.learner.load_weights reads)."""
UNKNOWN_STEP = -1
"""Policy step of weights whose training step is not known."""


@dataclass(frozen=True)
class PolicyFolder:
    """A weights folder named by a CheckpointInfo, resolved on this server's file system."""

    path: Path
    """The folder, absolute."""
    step: int
    """Training step of its weights (UNKNOWN_STEP when not known)."""
    version: str
    """The caller's version tag, or for a checkpoint folder the sha256 of its weights file."""
    fingerprint: str
    """Identifies the weights' content: the checkpoint's recorded sha256, else size and mtime of the weights file."""
    created_unix_ms: int
    """When the folder was completed (the caller's value, else the mtime of meta.json or of the weights file)."""
    checkpoint: bool
    """True for a checkpoint folder of npo.runtime.checkpoint (verified before its weights are loaded)."""


# ----------------------------------------------------------------------------------------------------------------
# Requests to the engine's types (each raises ValueError naming the bad field).


def check_token_ids(name: str, ids: Sequence[int], vocab_size: int, *, allow_empty: bool = False) -> list[int]:
    """`ids` as a list, or ValueError naming `name` when empty (unless allowed) or an id is outside [0, vocab)."""
    ids = list(ids)
    if not ids and not allow_empty:
        raise ValueError(f"{name}: empty (a prompt needs at least one token)")
    bad = next((token for token in ids if not 0 <= token < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids


def sampling_from_message(message: common_pb2.SamplingParams) -> tuple[SamplingParams, int]:
    """npo.v1.SamplingParams -> (npo.runtime.engine.SamplingParams, seed); top_p 0 (unset) is read as 1.0."""
    if not (math.isfinite(message.temperature) and message.temperature >= 0.0):
        raise ValueError(f"sampling.temperature: must be >= 0 (0 = greedy), got {message.temperature}")
    top_p = message.top_p or 1.0
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sampling.top_p: must be in (0, 1] (0 = unset = 1.0), got {message.top_p}")
    if message.max_new_tokens < 1:
        raise ValueError(f"sampling.max_new_tokens: must be >= 1, got {message.max_new_tokens}")
    params = SamplingParams(
        temperature=message.temperature,
        top_p=top_p,
        max_new_tokens=message.max_new_tokens,
        stop_on_eos=message.stop_on_eos,
    )
    return params, message.seed


def problem_for_prompt(index: int, prompt: pb.Prompt, problems: dict[str, Problem], task_name: str) -> Problem | None:
    """The task's problem that verifies prompts[index], or None for a prompt without a prompt_id (not verified)."""
    if not prompt.prompt_id:
        if prompt.answer:
            raise ValueError(
                f"prompts[{index}].answer: given without a prompt_id; the server verifies against the problems of "
                f"its task {task_name!r}, identified by prompt_id"
            )
        return None
    problem = problems.get(prompt.prompt_id)
    if problem is None:
        raise ValueError(
            f"prompts[{index}].prompt_id: unknown prompt id {prompt.prompt_id!r} (not in the train or test split of "
            f"task {task_name!r})"
        )
    if prompt.answer and prompt.answer != problem.answer:
        raise ValueError(
            f"prompts[{index}].answer: {prompt.answer!r} differs from the answer of {prompt.prompt_id!r} in task "
            f"{task_name!r} ({problem.answer!r}); is this server configured with the caller's task?"
        )
    return problem


def generate_inputs(
    request: pb.GenerateRequest, problems: dict[str, Problem], task_name: str, vocab_size: int
) -> tuple[list[list[int]], list[Problem | None], SamplingParams, int]:
    """The checked inputs of a GenerateRequest: prompt token ids, the problem verifying each prompt (None: not
    verified), the sampling params and the seed."""
    if request.task and request.task != task_name:
        raise ValueError(f"task: this server verifies task {task_name!r}, got {request.task!r}")
    if not request.prompts:
        raise ValueError("prompts: need at least one prompt")
    if request.n < 1:
        raise ValueError(f"n: must be >= 1, got {request.n}")
    if request.expected_policy_step < UNKNOWN_STEP:
        raise ValueError(f"expected_policy_step: must be >= 0, or -1 for any, got {request.expected_policy_step}")
    params, seed = sampling_from_message(request.sampling)
    verifying = [problem_for_prompt(i, prompt, problems, task_name) for i, prompt in enumerate(request.prompts)]
    prompts = [
        check_token_ids(f"prompts[{i}].token_ids", prompt.token_ids, vocab_size)
        for i, prompt in enumerate(request.prompts)
    ]
    return prompts, verifying, params, seed


def score_temperature(value: float) -> float:
    """ScoreRequest.temperature: 0 (unset) is read as 1.0; otherwise it must be > 0."""
    if value == 0.0:
        return 1.0
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"temperature: must be > 0 (0 = unset = 1.0), got {value}")
    return value


def sequences_from_request(request: pb.ScoreRequest, vocab_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The (prompts, responses) token id lists of a ScoreRequest, checked."""
    prompts, responses = [], []
    for i, sequence in enumerate(request.sequences):
        prompts.append(check_token_ids(f"sequences[{i}].prompt_ids", sequence.prompt_ids, vocab_size))
        responses.append(
            check_token_ids(f"sequences[{i}].response_ids", sequence.response_ids, vocab_size, allow_empty=True)
        )
    return prompts, responses


def checkpoint_step_of(folder: Path) -> int | None:
    """The step of `folder` when it is a complete checkpoint folder of npo.runtime.checkpoint, else None."""
    manager = CheckpointManager(folder.parent)
    return next((step for step in manager.steps() if manager.path(step) == folder), None)


def resolve_folder(info: common_pb2.CheckpointInfo, name: str = "checkpoint") -> PolicyFolder:
    """The PolicyFolder a CheckpointInfo names (see the module docstring for the step rules).

    Raises FileNotFoundError when the path does not exist, ValueError for anything else wrong with it.
    """
    if not info.path:
        raise ValueError(f"{name}.path: required (the folder of the weights to load)")
    if info.step < UNKNOWN_STEP:
        raise ValueError(f"{name}.step: must be >= 0, or -1 for the checkpoint's own step, got {info.step}")
    folder = Path(info.path).expanduser().resolve()
    if not folder.exists():
        raise FileNotFoundError(f"{name}.path: no such folder {info.path!r} on the rollout server")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{name}.path: {info.path!r} has no {WEIGHTS_FILE} (not an HF model folder)")
    stat = weights.stat()
    fingerprint, completed, step = f"{stat.st_size}-{stat.st_mtime_ns}", stat.st_mtime, info.step
    checkpoint_step = checkpoint_step_of(folder)
    if checkpoint_step is not None:
        if info.step not in (UNKNOWN_STEP, checkpoint_step):
            raise ValueError(f"{name}.step: {info.step}, but {info.path!r} is the checkpoint of step {checkpoint_step}")
        step = checkpoint_step
        meta_file = folder / "meta.json"
        try:
            recorded = json.loads(meta_file.read_text()).get("sha256", {}).get(WEIGHTS_FILE)
        except (json.JSONDecodeError, AttributeError):
            recorded = None  # verification at load time reports the unreadable meta.json
        fingerprint = recorded or fingerprint
        completed = meta_file.stat().st_mtime
    return PolicyFolder(
        path=folder,
        step=step,
        version=info.version or (fingerprint if checkpoint_step is not None else ""),
        fingerprint=fingerprint,
        created_unix_ms=info.created_unix_ms or int(completed * 1000),
        checkpoint=checkpoint_step is not None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Engine results to replies.


def checkpoint_info(folder: PolicyFolder) -> common_pb2.CheckpointInfo:
    """The CheckpointInfo reporting a loaded folder."""
    return common_pb2.CheckpointInfo(
        step=folder.step, path=str(folder.path), version=folder.version, created_unix_ms=folder.created_unix_ms
    )


# ----------------------------------------------------------------------------------------------------------------
# Weights folders into models (TransformersEngine only).


def engine_model(engine: RolloutEngine, operation: str) -> torch.nn.Module:
    """The torch model of a TransformersEngine; NotImplementedError (UNIMPLEMENTED) for any other engine."""
    if not isinstance(engine, TransformersEngine):
        raise NotImplementedError(
            f"{operation}: the {type(engine).__name__} engine cannot load a weights folder in place "
            "(only TransformersEngine can)"
        )
    return engine.model


def verify_folder(folder: PolicyFolder) -> None:
    """Check every checksum of a checkpoint folder (CheckpointError naming the bad file); nothing for a plain one."""
    if folder.checkpoint:
        CheckpointManager(folder.path.parent).verify(folder.step)


def load_folder_weights(model: torch.nn.Module, folder: PolicyFolder) -> None:
    """npo.runtime.learner.load_weights, with weights that do not fit the model (names or shapes) as a ValueError naming
    the folder. A failure can leave `model` partly overwritten."""
    try:
        load_weights(model, folder.path)
    except (ValueError, RuntimeError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[-1].strip()[:300]
        raise ValueError(
            f"checkpoint.path: the weights of {folder.path} do not fit the policy model ({detail})"
        ) from None


def scorer_engine(engine: TransformersEngine, folder: PolicyFolder) -> TransformersEngine:
    """A TransformersEngine over a copy of `engine`'s model holding the weights of `folder` (verified first)."""
    verify_folder(folder)
    model = copy.deepcopy(engine.model).eval()
    load_folder_weights(model, folder)
    return TransformersEngine(model, eos_id=engine.eos_ids, pad_id=engine.pad_id, batch_size=engine.batch_size)


@contextlib.contextmanager
def corrupted_checkpoint_is_data_loss(context: grpc.ServicerContext) -> Iterator[None]:
    """Answer a CheckpointError raised inside the block with DATA_LOSS and its message."""
    try:
        yield
    except CheckpointError as exc:
        context.abort(grpc.StatusCode.DATA_LOSS, str(exc))


# ----------------------------------------------------------------------------------------------------------------


class RolloutServicer(pb_grpc.RolloutServiceServicer):
    """npo.v1.RolloutService on `engine` (holding the policy at `policy_step`), verifying with `task`'s reward.

    `tokenizer` decodes responses (skip_special_tokens=True) and bounds token ids (len(tokenizer)); `task` is an
    npo.runtime.tasks.Task whose train and test problems are looked up by prompt_id; at most `max_scorers` checkpoint
    copies are kept for Score.
    """

    def __init__(self, engine: RolloutEngine, tokenizer, task, *, policy_step: int = 0, max_scorers: int = 2) -> None:
        if isinstance(max_scorers, bool) or not isinstance(max_scorers, int) or max_scorers < 1:
            raise ValueError(f"max_scorers: expected a positive integer, got {max_scorers!r}")
        if isinstance(policy_step, bool) or not isinstance(policy_step, int) or policy_step < UNKNOWN_STEP:
            raise ValueError(f"policy_step: expected an integer >= -1, got {policy_step!r}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.task = task
        self.problems = {problem.prompt_id: problem for problem in [*task.train, *task.test]}
        self.vocab_size = len(tokenizer)
        self.max_scorers = max_scorers
        self.policy_step = policy_step
        self.loaded: PolicyFolder | None = None  # None: the policy the server started with
        self.broken = ""  # why the current weights are unusable (a load failed half way); "" when they are fine
        self._scorers: collections.OrderedDict[tuple[Path, str], TransformersEngine] = collections.OrderedDict()
        self._lock = threading.Lock()

    def decode(self, token_ids: list[int]) -> str:
        """Response text as the verifier sees it."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        prompts, problems, params, seed = generate_inputs(request, self.problems, self.task.name, self.vocab_size)
        with self._lock:
            self._check_current_policy(context, request.expected_policy_step)
            generations = self.engine.generate(prompts, request.n, params, seed=seed)
            step = self.policy_step
        samples = [
            verified_sample(prompt.prompt_id, problem, generation, self.decode, self.task.reward, step)
            for prompt, problem, group in zip(request.prompts, problems, generations, strict=True)
            for generation in group
        ]
        return pb.GenerateResponse(samples=[sample_to_message(s) for s in samples], policy_step=step)

    def LoadPolicy(self, request: pb.LoadPolicyRequest, context: grpc.ServicerContext) -> pb.LoadPolicyResponse:
        if not request.HasField("checkpoint"):
            raise ValueError("checkpoint: required (the folder of the weights to load)")
        folder = resolve_folder(request.checkpoint)
        model = engine_model(self.engine, "LoadPolicy")
        with self._lock, corrupted_checkpoint_is_data_loss(context):
            seconds = self._load(model, folder)
        return pb.LoadPolicyResponse(loaded=checkpoint_info(folder), load_seconds=seconds)

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        temperature = score_temperature(request.temperature)
        prompts, responses = sequences_from_request(request, self.vocab_size)
        folder = resolve_folder(request.checkpoint) if request.checkpoint.path else None
        with self._lock, corrupted_checkpoint_is_data_loss(context):
            engine = self._engine_for(context, folder)
            logprobs = engine.score(prompts, responses, temperature=temperature)
        return pb.ScoreResponse(sequences=[pb.TokenLogprobs(logprobs=values) for values in logprobs])

    # -- under the lock -------------------------------------------------------------------------------------------

    def _check_current_policy(self, context: grpc.ServicerContext, expected_step: int = UNKNOWN_STEP) -> None:
        """Abort with FAILED_PRECONDITION when the weights are unusable or not those of `expected_step`."""
        if self.broken:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no usable policy: {self.broken}; load one first")
        if expected_step != UNKNOWN_STEP and expected_step != self.policy_step:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"expected_policy_step: {expected_step}, but the loaded policy is of step {self.policy_step}",
            )

    def _load(self, model: torch.nn.Module, folder: PolicyFolder) -> float:
        """Copy the weights of `folder` into `model`; returns the seconds spent (0.0 when already loaded)."""
        if folder == self.loaded and not self.broken:
            return 0.0
        started = time.perf_counter()
        verify_folder(folder)
        try:
            load_folder_weights(model, folder)
        except Exception as exc:
            self.broken = f"loading {folder.path} failed ({type(exc).__name__})"
            self.loaded, self.policy_step = None, UNKNOWN_STEP
            raise
        self.loaded, self.policy_step, self.broken = folder, folder.step, ""
        log.info("loaded policy of step %d from %s", folder.step, folder.path)
        return time.perf_counter() - started

    def _engine_for(self, context: grpc.ServicerContext, folder: PolicyFolder | None) -> RolloutEngine:
        """The engine scoring under `folder`: the current one (None or the loaded folder) or a cached copy."""
        if folder is None or (
            self.loaded is not None and (folder.path, folder.fingerprint) == (self.loaded.path, self.loaded.fingerprint)
        ):
            self._check_current_policy(context)
            return self.engine
        key = (folder.path, folder.fingerprint)
        if key not in self._scorers:
            engine_model(self.engine, "Score")
            self._scorers[key] = scorer_engine(self.engine, folder)
            while len(self._scorers) > self.max_scorers:
                self._scorers.popitem(last=False)
        self._scorers.move_to_end(key)
        return self._scorers[key]


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
) -> tuple[grpc.Server, int]:
    """Start RolloutService on `engine` (policy at `policy_step`) at `address` (port 0: a free one), with
    grpc.health.v1 reporting SERVING. Returns the started server and its port; stop it with `server.stop(grace)`."""
    servicer = RolloutServicer(engine, tokenizer, task, policy_step=policy_step, max_scorers=max_scorers)
    server = make_server(max_workers=max_workers, max_message_bytes=max_message_bytes)
    pb_grpc.add_RolloutServiceServicer_to_server(servicer, server)
    add_health(server, [SERVICE_NAME])
    port = bind(server, address)
    server.start()
    return server, port


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


def serve_vllm_policy(policy, task, dtype: str, args: argparse.Namespace) -> tuple[grpc.Server, int]:
    """Serve `policy` with the vLLM engine (--engine vllm): the policy is written as an HF folder into a temporary
    directory (removed at exit), which vLLM loads."""
    import atexit
    import shutil
    import tempfile

    from npo.runtime.models import save_policy
    from services.rollout.vllm_engine import VLLMEngine, serve_vllm

    folder = Path(tempfile.mkdtemp(prefix="npo-vllm-policy-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    save_policy(policy, folder)
    engine = VLLMEngine(folder, eos_id=policy.eos_id, dtype=dtype)
    return serve_vllm(
        engine,
        policy.tokenizer,
        task,
        args.address,
        max_workers=args.workers,
        max_message_bytes=args.max_message_mb * 2**20,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Load the policy and task of the run config (as `npo train` does), then serve until SIGTERM or Ctrl-C;
    prints `serving on HOST:PORT` once ready."""
    from npo.runtime.run_config import load_run_config
    from services.wiring import build_policy_and_task

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.threads < 0:
            raise ValueError(f"--threads: must be >= 0, got {args.threads}")
        cfg = load_run_config(args.config, args.overrides)
        if args.threads:
            torch.set_num_threads(args.threads)
        policy, task = build_policy_and_task(cfg)
        if args.engine == "vllm":
            server, port = serve_vllm_policy(policy, task, cfg.model.dtype, args)
        else:
            engine = TransformersEngine(
                policy.model, eos_id=policy.eos_id, pad_id=policy.pad_id, batch_size=args.batch_size
            )
            server, port = serve(
                engine,
                policy.tokenizer,
                task,
                args.address,
                max_scorers=args.max_scorers,
                max_workers=args.workers,
                max_message_bytes=args.max_message_mb * 2**20,
            )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop(grace=5.0))
    host = args.address.rsplit(":", 1)[0]
    print(f"rollout: serving on {host}:{port} (model {cfg.model.preset}, task {task.name}, policy step 0)", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=1.0).wait()
    return 0
