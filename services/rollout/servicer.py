"""The servicers of RolloutService (proto/npo/v1/rollout.proto) over a rollout engine: sample and verify, weight
sync, scoring. services/rollout/server.py serves them; this module imports no engine beyond npo.runtime.engine.

The engine is an npo.runtime.engine.RolloutEngine (generate, score): the embedded TransformersEngine
(`RolloutServicer`) or services.rollout.vllm_engine.VLLMEngine (`VLLMRolloutServicer`). Loading a weights folder in
place needs the engine's torch model (TransformersEngine) or a VLLMEngine, which reloads its weights in place;
scoring under another checkpoint needs a TransformersEngine. Another engine answers those calls with UNIMPLEMENTED.

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
loaded policy's step -> FAILED_PRECONDITION.

Concurrency: one lock serialises every use of the model (generate, score, load), so a weight sync never overlaps a
generation; run several replicas for parallelism (RolloutClient spreads a call across them).

Every answer of Generate, Score and LoadPolicy carries the trailing metadata `npo-replica-instance`: an id drawn when
the servicer is made, so a client sees that a replica was restarted (and lost the weights it had loaded) even when it
comes back on the same address between two calls.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from npo.core.types import Problem, Sample
from npo.runtime.checkpoint import CheckpointError, CheckpointManager
from npo.runtime.engine import RolloutEngine, SamplingParams, TransformersEngine
from npo.runtime.learner import load_weights
from npo.runtime.verify import verified_sample, verify_groups
from services.codec import sample_to_message
from services.grpc_common import abort_on
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
INSTANCE_METADATA_KEY = "npo-replica-instance"
"""Trailing metadata key of every answer: the id of the servicer instance (new at each start of a replica)."""


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


def load_folder_weights(model: Any, folder: PolicyFolder) -> None:
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


def folder_to_load(request: pb.LoadPolicyRequest) -> PolicyFolder:
    """The PolicyFolder a LoadPolicyRequest names (resolve_folder); ValueError when it names none."""
    if not request.HasField("checkpoint"):
        raise ValueError("checkpoint: required (the folder of the weights to load)")
    return resolve_folder(request.checkpoint)


def corrupted_checkpoint_is_data_loss(context: grpc.ServicerContext) -> contextlib.AbstractContextManager[None]:
    """Answer a CheckpointError raised inside the block with DATA_LOSS and its message."""
    return abort_on(context, CheckpointError, grpc.StatusCode.DATA_LOSS)


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
        self.instance = uuid.uuid4().hex
        """Id of this servicer, sent with every answer (INSTANCE_METADATA_KEY)."""

    def _tag(self, context: grpc.ServicerContext) -> None:
        """Send this servicer's instance id with the answer."""
        context.set_trailing_metadata(((INSTANCE_METADATA_KEY, self.instance),))

    def decode(self, token_ids: list[int]) -> str:
        """Response text as the verifier sees it."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _verify(
        self, prompts: Sequence[pb.Prompt], problems: list[Problem | None], generations: list[list], step: int
    ) -> list[Sample]:
        """The verified Samples of `generations` (one group per prompt), prompt-major, sampled by policy `step`; the
        finished samples of known problems are scored in one Task.rewards batch, the others get 0."""
        known = [i for i, problem in enumerate(problems) if problem is not None]
        scored = verify_groups(
            [problems[i] for i in known], [generations[i] for i in known], self.decode, self.task.rewards, step
        )
        groups = dict(zip(known, scored, strict=True))
        return [
            sample
            for i, (prompt, group) in enumerate(zip(prompts, generations, strict=True))
            for sample in groups.get(i)
            or [verified_sample(prompt.prompt_id, None, g, self.decode, self.task.reward, step) for g in group]
        ]

    def _weights_target(self) -> torch.nn.Module:
        """What LoadPolicy loads weights into: the TransformersEngine's model (UNIMPLEMENTED for another engine)."""
        return engine_model(self.engine, "LoadPolicy")

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        self._tag(context)
        prompts, problems, params, seed = generate_inputs(request, self.problems, self.task.name, self.vocab_size)
        with self._lock:
            self._check_current_policy(context, request.expected_policy_step)
            generations, step = self.engine.generate(prompts, request.n, params, seed=seed), self.policy_step
        samples = self._verify(request.prompts, problems, generations, step)
        return pb.GenerateResponse(samples=[sample_to_message(s) for s in samples], policy_step=step)

    def LoadPolicy(self, request: pb.LoadPolicyRequest, context: grpc.ServicerContext) -> pb.LoadPolicyResponse:
        self._tag(context)
        folder = folder_to_load(request)
        target = self._weights_target()
        with self._lock, corrupted_checkpoint_is_data_loss(context):
            seconds = self._load(target, folder)
        return pb.LoadPolicyResponse(loaded=checkpoint_info(folder), load_seconds=seconds)

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        self._tag(context)
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

    def _load(self, model: Any, folder: PolicyFolder) -> float:
        """Copy the weights of `folder` into `model` (anything with torch's load_state_dict); returns the seconds
        spent (0.0 when already loaded)."""
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


class VLLMRolloutServicer(RolloutServicer):
    """RolloutServicer over a services.rollout.vllm_engine.VLLMEngine: LoadPolicy reloads the engine's weights in place
    (the engine has torch's load_state_dict, which npo.runtime.learner.load_weights fills from model.safetensors).
    Score under a checkpoint other than the loaded one stays UNIMPLEMENTED: vLLM holds one policy."""

    def _weights_target(self) -> Any:
        return self.engine
