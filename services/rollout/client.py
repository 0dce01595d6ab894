"""RolloutClient: npo.runtime.engine.RolloutEngine over one or several RolloutService replicas.

    with RolloutClient(["rollout-0:50052", "rollout-1:50052"]) as engine:
        engine.load_policy("/shared/run/checkpoints/step_000040")          # every replica
        samples = engine.generate_verified(prompt_ids, prompts, 8, params, seed=7)   # list[list[Sample]]
        generations = engine.generate(prompts, 8, params, seed=7)        # the RolloutEngine call, no rewards
        logprobs = engine.score(prompts, responses, temperature=1.0, checkpoint="/shared/.../step_000020")

Several replicas: one generate (or score) call is split into a FIXED number of contiguous chunks of its prompts, as
many as the replicas the client was configured with (`split_contiguous(count, len(addresses))`), whatever number of
them is live; chunk c goes to replica c when it is live, else to a live one, in parallel, and the results are put back
in input order. Seeds: when the call is split into k > 1 chunks, chunk c samples with `chunk_seed(seed, c, k)`, a
seed derived from the call's seed and c; a call that is not split (one replica, or one prompt) uses the seed as
given. A chunk equals TransformersEngine.generate(chunk prompts, n, params, seed=chunk_seed(seed, c, k)) whichever
replica serves it, so sampled tokens depend on the number of replicas configured but not on which are live. Scores
have no seed; they equal a single engine's up to floating-point rounding (chunks pad to different widths).

Fail-over: a replica is dropped when a call to it fails with UNAVAILABLE (connection refused or lost, after the
channel's own retries), or with a deadline or another unexpected status while its grpc.health.v1 check fails too;
one log line (WARNING) names it, `replica_drops` counts it, and its chunks go to the live replicas at once. With no
replica live, a call waits for one to rejoin, up to `outage_timeout_s` (10 minutes by default), then raises
ConnectionError naming every replica and why it was dropped. Before each call (and while waiting) each dropped
replica is health-checked, at most once per `health_interval_s`; one that is SERVING first loads the current weights
(those of the last load_policy through this client, `current_weights`), then rejoins: one log line,
`replica_rejoins`. load_policy loads into the live replicas only; the dropped ones load the same weights when they
rejoin. Every answer carries the server's instance id (services.rollout.servicer.INSTANCE_METADATA_KEY): an answer
from another instance than the one that loaded the weights (the replica was restarted on the same address between
two calls) is discarded, the replica dropped (ReplicaRestarted) and its chunk sent again.

The server checks values; its INVALID_ARGUMENT comes back as ValueError with its message, NOT_FOUND as
LookupError (services.grpc_common.error_from_rpc). Only what cannot travel (a token id that is not an int32, a
seed outside uint64, ...) is rejected here, with a ValueError naming the argument. Every attempt has a deadline
(`timeout_s`); Generate and Score (no side effects) and LoadPolicy (idempotent) are retried on UNAVAILABLE with
exponential backoff by the channel before the replica counts as down. Any other failure of a chunk (a bad argument,
FAILED_PRECONDITION) fails the whole call.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from npo.core.seeds import derive_seed
from npo.core.types import Sample
from npo.runtime.engine import Generation, SamplingParams
from services.codec import sample_from_message
from services.grpc_common import RetryPolicy, ServiceClient, replica_addresses
from services.proto.npo.v1 import common_pb2
from services.proto.npo.v1 import rollout_pb2 as pb
from services.proto.npo.v1 import rollout_pb2_grpc as pb_grpc
from services.rollout.servicer import INSTANCE_METADATA_KEY, SERVICE_NAME

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
"""Deadline of one rollout call (retries included): generation of a large batch on a CPU takes minutes."""
DEFAULT_OUTAGE_TIMEOUT_S = 600.0
"""How long a call waits, when no replica is live, for one to rejoin before failing."""
HEALTH_INTERVAL_S = 1.0
"""Least seconds between two health checks of one dropped replica (checked before a call, and while waiting)."""
HEALTH_TIMEOUT_S = 1.0
"""Deadline of one grpc.health.v1 check."""
FAILOVER_RETRY = RetryPolicy(max_attempts=2, initial_backoff_s=0.2, max_backoff_s=1.0)
"""The channels' retry policy when several replicas are configured and the caller gives none: one quick retry, then
the replica counts as down and its chunks go to the others (the default policy would spend about 3 s on a dead
replica first); its 1 s reconnect backoff also lets a restarted replica be seen sooner."""
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
    derive_seed(seed, CHUNK_SEED_PURPOSE, index), a 63-bit seed (so results depend on the number of chunks, which is
    the number of replicas configured, not the number live)."""
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


class ReplicaRestarted(ConnectionError):
    """A replica answered from another server instance than the one that loaded this client's weights: it was
    restarted (same address) and holds its start-up weights; it is dropped and rejoins after loading them again."""


@dataclass
class ReplicaState:
    """What a RolloutClient knows of one replica."""

    address: str
    live: bool = True
    """False once dropped (down), until it answers a health check and has loaded the current weights."""
    instance: str = ""
    """The server instance id it last answered with (INSTANCE_METADATA_KEY; "" before the first answer)."""
    checked: float = -math.inf
    """time.monotonic() of its last health check while dropped (or of its drop)."""
    reason: str = ""
    """Why it was last dropped."""


class RolloutClient(ServiceClient):
    """npo.runtime.engine.RolloutEngine whose policy lives in the RolloutService replicas at `addresses`
    ("host:port", or a list of them); see the module docstring for how a call is spread across replicas and how
    a dead replica is dropped and rejoins.

    Keyword arguments: outage_timeout_s (how long a call waits while no replica is live, default
    DEFAULT_OUTAGE_TIMEOUT_S), health_interval_s (least seconds between two health checks of a dropped replica,
    default HEALTH_INTERVAL_S), timeout_s (default DEFAULT_TIMEOUT_S), retry (default: FAILOVER_RETRY with several
    replicas, services.grpc_common.DEFAULT_RETRY with one), max_message_bytes, credentials
    (services.grpc_common.ServiceClient)."""

    service = pb.DESCRIPTOR.services_by_name["RolloutService"]
    stub_class = pb_grpc.RolloutServiceStub
    default_timeout_s = DEFAULT_TIMEOUT_S
    replicated = True

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        outage_timeout_s: float = DEFAULT_OUTAGE_TIMEOUT_S,
        health_interval_s: float = HEALTH_INTERVAL_S,
        **options: Any,
    ) -> None:
        for name, value in (("outage_timeout_s", outage_timeout_s), ("health_interval_s", health_interval_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")
        if "retry" not in options and len(replica_addresses(target)) > 1:
            options["retry"] = FAILOVER_RETRY
        super().__init__(target, **options)
        self.outage_timeout_s, self.health_interval_s = float(outage_timeout_s), float(health_interval_s)
        self._replicas = [ReplicaState(address) for address in self.addresses]
        self._health = [health_pb2_grpc.HealthStub(channel) for channel in self._channels]
        self._state_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._current: common_pb2.CheckpointInfo | None = None
        self.replica_drops = 0
        """Replicas dropped so far (a replica dropped twice counts twice)."""
        self.replica_rejoins = 0
        """Dropped replicas that rejoined so far."""

    @property
    def live_replicas(self) -> list[str]:
        """Addresses of the replicas calls are sent to now, in address order."""
        return [self.addresses[i] for i in self._live()]

    @property
    def current_weights(self) -> common_pb2.CheckpointInfo | None:
        """What the last load_policy loaded (a rejoining replica loads it first); None before any."""
        return self._current

    def _live(self) -> list[int]:
        with self._state_lock:
            return [i for i, state in enumerate(self._replicas) if state.live]

    # -- one replica -----------------------------------------------------------------------------------------------

    def _call_replica(self, method: str, request: Message, replica: int) -> Any:
        """`_call`, also checking the server instance that answered, even with an error (ReplicaRestarted when it
        is not the one that loaded this client's weights)."""
        try:
            reply, call = getattr(self._stubs[replica], method).with_call(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call):
                self._check_instance(replica, method, error.trailing_metadata())
            raise self._error(error, method, self.addresses[replica]) from None
        self._check_instance(replica, method, call.trailing_metadata())
        return reply

    def _check_instance(self, replica: int, method: str, metadata: Any) -> None:
        """Record the server instance id in `metadata` (the first one seen, or any after a LoadPolicy); raise
        ReplicaRestarted when another instance answered since."""
        instance = dict(metadata or ()).get(INSTANCE_METADATA_KEY, "")
        state = self._replicas[replica]
        with self._state_lock:
            known = state.instance
            if instance and (method == "LoadPolicy" or not known):
                state.instance = known = instance
        if instance and instance != known:
            raise ReplicaRestarted(
                f"Rollout.{method} to {self.addresses[replica]}: the replica was restarted (server instance "
                f"{known[:8]} -> {instance[:8]}) and no longer holds the weights this client loaded"
            )

    def _healthy(self, replica: int) -> bool:
        """True when the replica answers its grpc.health.v1 check with SERVING within HEALTH_TIMEOUT_S."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        try:
            reply = self._health[replica].Check(request, timeout=HEALTH_TIMEOUT_S)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def _replica_down(self, replica: int, exc: BaseException) -> bool:
        """Whether the failure `exc` of a call to `replica` means the replica is down: UNAVAILABLE (connection
        refused or lost, or ReplicaRestarted) always; a bad argument never; anything else (a deadline, a status
        seen when a server dies mid-call) when its health check fails too."""
        if not isinstance(exc, Exception) or isinstance(exc, (ValueError, LookupError, NotImplementedError)):
            return False
        return isinstance(exc, ConnectionError) or not self._healthy(replica)

    def _drop(self, replica: int, exc: BaseException) -> None:
        """Stop sending calls to `replica` until it rejoins (`_refresh`); logs one line."""
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        with self._state_lock:
            state = self._replicas[replica]
            if not state.live:
                return
            state.live, state.checked, state.reason = False, time.monotonic(), reason
            self.replica_drops += 1
            live = sum(s.live for s in self._replicas)
        log.warning("rollout replica %s dropped (%d of %d live): %s", state.address, live, len(self.addresses), reason)

    def _refresh(self) -> None:
        """Health-check each dropped replica not checked in the last health_interval_s; one that is SERVING loads the
        current weights and rejoins. Another thread already refreshing: nothing to do."""
        if not self._refresh_lock.acquire(blocking=False):
            return
        try:
            now = time.monotonic()
            for replica, state in enumerate(self._replicas):
                if state.live or now - state.checked < self.health_interval_s:
                    continue
                state.checked = now
                if self._healthy(replica):
                    self._rejoin(replica)
        finally:
            self._refresh_lock.release()

    def _rejoin(self, replica: int) -> None:
        """Load the current weights into a dropped replica that is serving again, then send it calls again."""
        state = self._replicas[replica]
        current = self._current
        try:
            while current is not None:
                self._call_replica("LoadPolicy", pb.LoadPolicyRequest(checkpoint=current), replica)
                if self._current is current:
                    break
                current = self._current  # a publication came in meanwhile: load that one
        except Exception as exc:  # noqa: BLE001 - any failure leaves it dropped until the next check
            log.warning("rollout replica %s serves again but did not load the current weights: %s", state.address, exc)
            return
        with self._state_lock:
            if current is None:
                state.instance = ""  # nothing loaded through this client: whichever instance answers next is fine
            state.live = True
            self.replica_rejoins += 1
        weights = f"step {current.step}, {current.version or current.path}" if current else "its start-up weights"
        log.warning("rollout replica %s rejoined (holding %s)", state.address, weights)

    def _wait_for_replica(self, since: float | None) -> float:
        """One pause of a call that has no live replica: sleep, then `_refresh`; returns when the wait began.
        ConnectionError naming every replica once outage_timeout_s have passed since `since`."""
        now = time.monotonic()
        if since is None:
            log.warning(
                "no live rollout replica; waiting up to %g s for one of %s", self.outage_timeout_s, self.addresses
            )
            since = now
        if now - since >= self.outage_timeout_s:
            reasons = "; ".join(f"{s.address}: {s.reason or 'down'}" for s in self._replicas)
            raise ConnectionError(
                f"Rollout: no live replica among {self.addresses} for {self.outage_timeout_s:g} s ({reasons})"
            )
        time.sleep(min(self.health_interval_s, since + self.outage_timeout_s - now))
        self._refresh()
        return since

    # -- spreading a call ------------------------------------------------------------------------------------------

    def _spread(self, count: int, call: Callable[[int, int, range, int], list]) -> list:
        """call(replica, chunk, rows, chunks) for each of the fixed chunks of range(count) (split_contiguous over the
        configured replicas), in parallel on the live replicas; results concatenated in input order."""
        chunks = split_contiguous(count, len(self.addresses))
        return [item for part in self._run_chunks(chunks, call) for item in part]

    def _run_chunks(self, chunks: list[range], call: Callable[[int, int, range, int], list]) -> list[list]:
        """Each chunk's result, in chunk order. Chunk c goes to replica c when it is live, else to a live one; a
        chunk whose replica is down is sent again to another; with none live, `_wait_for_replica`. The first other
        failure is raised."""
        results: list[list] = [[] for _ in chunks]
        waiting, running, since = list(range(len(chunks))), {}, None
        self._refresh()
        while waiting or running:
            live = self._live()
            if waiting and live:
                for c in waiting:
                    replica = c if c in live else live[c % len(live)]
                    running[self._pool.submit(call, replica, c, chunks[c], len(chunks))] = (c, replica)
                waiting, since = [], None
            elif waiting and not running:
                since = self._wait_for_replica(since)
                continue
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in done:
                c, replica = running.pop(future)
                exc = future.exception()
                if exc is None:
                    results[c] = future.result()
                elif self._replica_down(replica, exc):
                    self._drop(replica, exc)
                    waiting.append(c)
                else:
                    raise exc
        return results

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

        def call(replica: int, chunk: int, rows: range, chunks: int) -> list[list[Sample]]:
            request = pb.GenerateRequest(
                prompts=wire[rows.start : rows.stop],
                n=n,
                sampling=wire_sampling(params, chunk_seed(seed, chunk, chunks)),
                expected_policy_step=expected,
            )
            reply = self._call_replica("Generate", request, replica)
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

        def call(replica: int, chunk: int, rows: range, chunks: int) -> list[list[float]]:
            request = pb.ScoreRequest(
                checkpoint=info, sequences=sequences[rows.start : rows.stop], temperature=float(temperature)
            )
            reply = self._call_replica("Score", request, replica)
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
        every live replica, in parallel; `step` -1 takes a checkpoint folder's own step. Returns the report of each
        replica that loaded them, in address order. A replica found down is dropped and loads these weights when it
        rejoins; with none live the call waits for one (outage_timeout_s) before a ConnectionError."""
        if not isinstance(version, str):
            raise ValueError(f"version: expected a str, got {version!r}")
        info = common_pb2.CheckpointInfo(
            path=wire_folder("folder", folder), step=wire_step("step", step), version=version
        )
        previous, self._current = self._current, info
        try:
            return self._load_live(info)
        except BaseException:
            if self._current is info:
                self._current = previous  # a rejoining replica loads the last weights that did load
            raise

    def _load_live(self, info: common_pb2.CheckpointInfo) -> list[LoadedPolicy]:
        """LoadPolicy(info) on every live replica (see load_policy)."""

        def call(replica: int) -> LoadedPolicy:
            reply = self._call_replica("LoadPolicy", pb.LoadPolicyRequest(checkpoint=info), replica)
            loaded = reply.loaded
            return LoadedPolicy(self.addresses[replica], loaded.step, loaded.path, loaded.version, reply.load_seconds)

        self._refresh()
        since = None
        while True:
            live = self._live()
            if not live:
                since = self._wait_for_replica(since)  # a replica that rejoins loads `info` (the current weights)
                continue
            pending = [(replica, self._pool.submit(call, replica)) for replica in live]
            reports, error = [], None
            for replica, future in pending:
                exc = future.exception()
                if exc is None:
                    reports.append(future.result())
                elif self._replica_down(replica, exc):
                    self._drop(replica, exc)
                elif error is None:
                    error = exc
            if error is not None:
                raise error
            if reports:
                return reports

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Not over gRPC: weights travel as checkpoint folders on shared storage; use load_policy(folder)."""
        raise NotImplementedError("RolloutClient.load_state_dict: save the weights to a folder and call load_policy")
