"""RolloutClient: npo.runtime.engine.RolloutEngine over one or several RolloutService replicas.

    with RolloutClient(["rollout-0:50052", "rollout-1:50052"]) as engine:
        engine.load_policy("/shared/run/checkpoints/step_000040")          # every replica
        samples = engine.generate_verified(prompt_ids, prompts, 8, params, seed=7)   # list[list[Sample]]
        generations = engine.generate(prompts, 8, params, seed=7)        # the RolloutEngine call, no rewards
        logprobs = engine.score(prompts, responses, temperature=1.0, checkpoint="/shared/.../step_000020")

Several replicas: one generate (or score) call is split into contiguous chunks of its prompts, chunk c going to
replica c (`split_contiguous`), sent in parallel and put back in input order. Seeds: when the call is split into
k > 1 chunks, chunk c samples with `chunk_seed(seed, c, k)`, a seed derived from the call's seed and c; a call
that is not split (one replica, or one prompt) uses the seed as given. Sampled tokens therefore depend on the
number of replicas: the same call with the same seed is reproducible only with the same replica list (a chunk
equals TransformersEngine.generate(chunk prompts, n, params, seed=chunk_seed(seed, c, k))). Scores have no seed;
they equal a single engine's up to floating-point rounding (chunks pad to different widths).

The server checks values; its INVALID_ARGUMENT comes back as ValueError with its message, NOT_FOUND as
LookupError (services.grpc_common.error_from_rpc). Only what cannot travel (a token id that is not an int32, a
seed outside uint64, ...) is rejected here, with a ValueError naming the argument. Every call has a deadline
(`timeout_s`); Generate and Score (no side effects) and LoadPolicy (idempotent) are retried on UNAVAILABLE with
exponential backoff. A failed chunk fails the whole call (no fail-over to another replica).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from npo.core.seeds import derive_seed
from npo.core.types import Sample
from npo.runtime.engine import Generation, SamplingParams
from services.codec import sample_from_message
from services.grpc_common import ServiceClient
from services.proto.npo.v1 import common_pb2
from services.proto.npo.v1 import rollout_pb2 as pb
from services.proto.npo.v1 import rollout_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 300.0
"""Deadline of one rollout call (retries included): generation of a large batch on a CPU takes minutes."""
CHUNK_SEED_PURPOSE = "rollout-replica-chunk"
"""Purpose string of npo.core.seeds.derive_seed for the seed of chunk c of a split call."""


@dataclass(frozen=True)
class LoadedPolicy:
    """What one replica reports after LoadPolicy."""

    address: str
    """The replica."""
    step: int
    """Training step of the loaded weights (-1: unknown)."""
    path: str
    """The folder loaded, as the replica resolved it."""
    version: str
    """Version tag of the weights (for a checkpoint folder, the sha256 of its weights file by default)."""
    load_seconds: float
    """Seconds the replica spent loading (0.0 when it already held this version)."""


# ----------------------------------------------------------------------------------------------------------------
# Spreading a call across replicas (pure).


def split_contiguous(count: int, parts: int) -> list[range]:
    """Contiguous, non-empty ranges covering range(count) in order, min(count, parts) of them, whose lengths differ
    by at most one (the first count % k are the longer ones)."""
    if count < 0 or parts < 1:
        raise ValueError(f"count, parts: need count >= 0 and parts >= 1, got {count}, {parts}")
    k = min(count, parts)
    if k == 0:
        return []
    base, extra = divmod(count, k)
    bounds = [0]
    for c in range(k):
        bounds.append(bounds[-1] + base + (1 if c < extra else 0))
    return [range(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def chunk_seed(seed: int, index: int, chunks: int) -> int:
    """Seed of chunk `index` of a call split into `chunks`: `seed` itself when chunks == 1, else
    derive_seed(seed, CHUNK_SEED_PURPOSE, index), a 63-bit seed (so results depend on the number of chunks)."""
    if not 0 <= index < chunks:
        raise ValueError(f"index: must be in [0, {chunks}), got {index}")
    return seed if chunks == 1 else derive_seed(seed, CHUNK_SEED_PURPOSE, index)


# ----------------------------------------------------------------------------------------------------------------
# What cannot travel is rejected before sending.


def wire_token_ids(name: str, ids: Sequence[int]) -> list[int]:
    """`ids` as a list of ints that fit int32 (values are checked by the server), else ValueError naming `name`."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{name}: expected a sequence of token ids, got {type(ids).__name__}")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not -(2**31) <= token < 2**31:
            raise ValueError(f"{name}: token id {token!r} is not an int32")
    return list(ids)


def wire_sampling(params: SamplingParams, seed: int) -> common_pb2.SamplingParams:
    """npo.runtime.engine.SamplingParams + seed -> npo.v1.SamplingParams; ValueError naming `params` or `seed`."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params: expected npo.runtime.engine.SamplingParams, got {type(params).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    if isinstance(params.max_new_tokens, bool) or not isinstance(params.max_new_tokens, int):
        raise ValueError(f"params.max_new_tokens: expected an integer, got {params.max_new_tokens!r}")
    return common_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
        stop_on_eos=params.stop_on_eos,
        seed=seed,
    )


def wire_step(name: str, step: int) -> int:
    """`step` if it is an int >= -1 that fits int64 (-1: any / unknown), else ValueError naming `name`."""
    if isinstance(step, bool) or not isinstance(step, int) or not -1 <= step < 2**63:
        raise ValueError(f"{name}: expected a step >= 0, or -1, got {step!r}")
    return step


def wire_folder(name: str, folder: str | os.PathLike) -> str:
    """A folder path as text (resolved on the server), else ValueError naming `name`."""
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise ValueError(f"{name}: expected a folder path, got {folder!r}")
    return str(folder)


def generation_from_sample(sample: Sample) -> Generation:
    """The Generation part of a verified Sample."""
    return Generation(token_ids=sample.response_ids, logprobs=sample.logprobs, finished=sample.finished)


# ----------------------------------------------------------------------------------------------------------------


class RolloutClient(ServiceClient):
    """npo.runtime.engine.RolloutEngine whose policy lives in the RolloutService replicas at `addresses`
    ("host:port", or a list of them); see the module docstring for how a call is spread across replicas.

    Keyword arguments: timeout_s (default DEFAULT_TIMEOUT_S), retry, max_message_bytes, credentials
    (services.grpc_common.ServiceClient)."""

    service = pb.DESCRIPTOR.services_by_name["RolloutService"]
    stub_class = pb_grpc.RolloutServiceStub
    default_timeout_s = DEFAULT_TIMEOUT_S
    replicated = True

    def _spread(self, count: int, call: Callable[[int, range, int], list]) -> list:
        """call(replica, rows, chunks) for each contiguous chunk of range(count), in parallel; results concatenated
        in input order. The first failing chunk's exception is raised."""
        chunks = split_contiguous(count, len(self.addresses))
        if len(chunks) == 1:
            return call(0, chunks[0], 1)
        pending = [self._pool.submit(call, c, rows, len(chunks)) for c, rows in enumerate(chunks)]
        return [item for future in pending for item in future.result()]

    # -- sampling --------------------------------------------------------------------------------------------------

    def generate_verified(
        self,
        prompt_ids: Sequence[str],
        prompts: Sequence[Sequence[int]],
        n: int,
        params: SamplingParams,
        *,
        seed: int,
        expected_policy_step: int = -1,
    ) -> list[list[Sample]]:
        """n verified Samples per prompt, in prompt order: token ids, behaviour log-probs, decoded text, reward
        (the server's task.reward for the problem `prompt_ids[i]`, 0.0 for an unfinished sample), policy step.

        An empty prompt id means no verification (reward 0.0). With `expected_policy_step` >= 0 a replica holding
        another policy step fails the call (RuntimeError, FAILED_PRECONDITION).
        """
        if isinstance(prompt_ids, str) or len(prompt_ids) != len(prompts):
            raise ValueError(f"prompt_ids: expected one prompt id per prompt ({len(prompts)}), got {prompt_ids!r}")
        for i, prompt_id in enumerate(prompt_ids):
            if not isinstance(prompt_id, str):
                raise ValueError(f"prompt_ids[{i}]: expected a str, got {prompt_id!r}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < 2**31:
            raise ValueError(f"n: expected an integer >= 1, got {n!r}")
        wire = [
            pb.Prompt(prompt_id=prompt_id, token_ids=wire_token_ids(f"prompts[{i}]", prompt))
            for i, (prompt_id, prompt) in enumerate(zip(prompt_ids, prompts))
        ]
        wire_sampling(params, seed)
        expected = wire_step("expected_policy_step", expected_policy_step)

        def call(replica: int, rows: range, chunks: int) -> list[list[Sample]]:
            request = pb.GenerateRequest(
                prompts=wire[rows.start : rows.stop],
                n=n,
                sampling=wire_sampling(params, chunk_seed(seed, replica, chunks)),
                expected_policy_step=expected,
            )
            reply = self._call("Generate", request, replica)
            if len(reply.samples) != len(rows) * n:
                raise RuntimeError(
                    f"Rollout.Generate to {self.addresses[replica]}: expected {len(rows) * n} samples, "
                    f"got {len(reply.samples)}"
                )
            samples = [sample_from_message(m, f"samples[{i}]") for i, m in enumerate(reply.samples)]
            return [samples[i * n : (i + 1) * n] for i in range(len(rows))]

        return self._spread(len(wire), call)

    def generate(
        self, prompts: list[list[int]], n: int, params: SamplingParams, *, seed: int
    ) -> list[list[Generation]]:
        """npo.runtime.engine.RolloutEngine.generate: n Generations per prompt, in prompt order (not verified)."""
        groups = self.generate_verified([""] * len(prompts), prompts, n, params, seed=seed)
        return [[generation_from_sample(sample) for sample in group] for group in groups]

    # -- scoring ---------------------------------------------------------------------------------------------------

    def score(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        *,
        temperature: float,
        checkpoint: str | os.PathLike = "",
        step: int = -1,
    ) -> list[list[float]]:
        """npo.runtime.engine.RolloutEngine.score: teacher-forced log pi(token | prefix) of every response token under
        softmax(logits / temperature), one list per response; under the checkpoint folder `checkpoint` (its
        `step`, -1: the checkpoint's own) when given, else the loaded policy."""
        if len(prompts) != len(responses):
            raise ValueError(f"responses: expected one per prompt ({len(prompts)}), got {len(responses)}")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {temperature!r}")
        info = None
        if checkpoint:
            info = common_pb2.CheckpointInfo(path=wire_folder("checkpoint", checkpoint), step=wire_step("step", step))
        sequences = [
            pb.ScoredSequence(
                prompt_ids=wire_token_ids(f"prompts[{i}]", prompt),
                response_ids=wire_token_ids(f"responses[{i}]", response),
            )
            for i, (prompt, response) in enumerate(zip(prompts, responses))
        ]

        def call(replica: int, rows: range, chunks: int) -> list[list[float]]:
            request = pb.ScoreRequest(
                checkpoint=info, sequences=sequences[rows.start : rows.stop], temperature=float(temperature)
            )
            reply = self._call("Score", request, replica)
            if len(reply.sequences) != len(rows):
                raise RuntimeError(
                    f"Rollout.Score to {self.addresses[replica]}: expected {len(rows)} sequences, "
                    f"got {len(reply.sequences)}"
                )
            return [list(entry.logprobs) for entry in reply.sequences]

        return self._spread(len(sequences), call) if sequences else []

    # -- weights ---------------------------------------------------------------------------------------------------

    def load_policy(self, folder: str | os.PathLike, *, step: int = -1, version: str = "") -> list[LoadedPolicy]:
        """Load the weights of `folder` (a checkpoint folder or an HF model folder, as the replicas see it) into
        every replica, in parallel; `step` -1 takes a checkpoint folder's own step. Returns each replica's report,
        in address order."""
        if not isinstance(version, str):
            raise ValueError(f"version: expected a str, got {version!r}")
        info = common_pb2.CheckpointInfo(
            path=wire_folder("folder", folder), step=wire_step("step", step), version=version
        )

        def call(replica: int) -> LoadedPolicy:
            reply = self._call("LoadPolicy", pb.LoadPolicyRequest(checkpoint=info), replica)
            loaded = reply.loaded
            return LoadedPolicy(self.addresses[replica], loaded.step, loaded.path, loaded.version, reply.load_seconds)

        pending = [self._pool.submit(call, replica) for replica in range(len(self.addresses))]
        return [future.result() for future in pending]

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Not over gRPC: weights travel as checkpoint folders on shared storage; use load_policy(folder)."""
        raise NotImplementedError("RolloutClient.load_state_dict: save the weights to a folder and call load_policy")
