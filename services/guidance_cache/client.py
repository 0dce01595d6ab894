"""GuidanceCacheClient: npo.runtime.store.GuideStore over gRPC, so the runner uses a remote guidance cache unchanged.

    with GuidanceCacheClient("cache:50051") as store:
        store.put_guides("run-1", 40, guides)
        store.get_guides("run-1", 40, ["p3", "p7"])

Arguments are validated by the server (the same checks as every GuideStore, and services.codec.check_guide on
guides); its INVALID_ARGUMENT comes back as ValueError with the server's message. Only what cannot travel (a float
step, a string instead of a list of ids, an object that is not a Sample) is rejected here, with a ValueError naming
the argument. Every attempt has a deadline (`timeout_s`, TimeoutError when it passes).

Riding out a cache that is down: a call that fails with UNAVAILABLE (the cache restarting, its Redis restarting or
loading its data, a broken connection) is sent again with exponential backoff (RETRY_FIRST_PAUSE_S doubling up to
RETRY_MAX_PAUSE_S) until it succeeds or `retry_deadline_s` (default 120 s) has passed since the first attempt; then
ConnectionError. One line is logged when a call starts waiting and one when it succeeds again. The methods retried
are those the .proto marks IDEMPOTENT or NO_SIDE_EFFECTS, and sending one of them again never doubles anything (the
stored state after two deliveries is the state after one; tests/test_guidance_cache_service.py checks it):
- PutGuides: HSET of the same values under the same keys + ZADD of the same step, in one transaction; a put of the
  same guides again changes nothing (the guide list of a prompt is replaced, never appended to).
- RecordMistakes: ZADD prompt -> step, a prompt's record replaced by the same one; the trim to max_mistakes gives
  the same pool.
- ClearRun: deleting what is already deleted changes nothing.
- GetGuides, GetMistakes, ListGuideSteps, Stats: reads.
TruncateMistakes and DeleteGuides are not retried: their state change is idempotent too, but a repeated call would
report 0 removed. The learner makes its cache calls one at a time, so no other write of the run comes between two
deliveries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from npo.core.types import Sample
from services.codec import sample_from_message, sample_to_message
from services.grpc_common import RetryPolicy, ServiceClient, retried_methods
from services.proto.npo.v1 import guidance_cache_pb2 as pb
from services.proto.npo.v1 import guidance_cache_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
"""Deadline of one attempt of a guidance-cache call."""
DEFAULT_RETRY_DEADLINE_S = 120.0
"""How long a call keeps being retried while the cache is unavailable (0: not at all)."""
RETRY_FIRST_PAUSE_S = 0.1
"""Pause before the first retry of an unavailable cache; each next one doubles, up to RETRY_MAX_PAUSE_S."""
RETRY_MAX_PAUSE_S = 2.0
"""Longest pause between two attempts."""
CHANNEL_RETRY = RetryPolicy(max_attempts=2, initial_backoff_s=0.1, max_backoff_s=1.0)
"""The channel's own retry of a client made without `retry`: one quick retry, and reconnection attempts at most 1 s
apart, so an attempt on a cache that is down fails fast and the loop of `_call` paces the waiting."""
RETRIED_METHODS = frozenset(retried_methods(pb.DESCRIPTOR.services_by_name["GuidanceCacheService"]))
"""Methods retried while the cache is unavailable: the idempotent ones of the .proto (see the module docstring)."""


# ----------------------------------------------------------------------------------------------------------------
# What cannot travel is rejected before sending (the server checks values: emptiness, signs, ranges).


def wire_run(run: str) -> str:
    """`run` if it is a str (the server rejects an empty one), else ValueError naming `run`."""
    if not isinstance(run, str):
        raise ValueError(f"run: expected a non-empty run name, got {run!r}")
    return run


def wire_step(name: str, step: int) -> int:
    """`step` if it is an int that fits int64 (the server rejects a negative one), else ValueError naming `name`."""
    if isinstance(step, bool) or not isinstance(step, int) or not -(2**63) <= step < 2**63:
        raise ValueError(f"{name}: expected a non-negative integer step, got {step!r}")
    return step


def wire_prompt_ids(name: str, prompt_ids: Sequence[str]) -> list[str]:
    """`prompt_ids` as a list of str (the server rejects empty ones), else ValueError naming `name` or `name[i]`."""
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise ValueError(f"{name}: expected a sequence of prompt ids, got {type(prompt_ids).__name__}")
    bad = next((i for i, prompt_id in enumerate(prompt_ids) if not isinstance(prompt_id, str)), None)
    if bad is not None:
        raise ValueError(f"{name}[{bad}]: expected a non-empty prompt id, got {prompt_ids[bad]!r}")
    return list(prompt_ids)


def wire_k(k: int) -> int:
    """`k` if it is an int >= 1 (guides per prompt), else ValueError naming `k` (0 would mean 1 on the wire)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < 2**63:
        raise ValueError(f"k: expected a positive number of guides per prompt, got {k!r}")
    return k


def wire_guides(guides: Sequence[Sample]) -> list[Any]:
    """The guides as npo.v1.Sample messages; ValueError naming `guides` or `guides[i]` for one that cannot travel
    (not a Sample, a token id that is not an int32, a log-prob that is not a float)."""
    if not isinstance(guides, Sequence):
        raise ValueError(f"guides: expected a sequence of Samples, got {type(guides).__name__}")
    messages = []
    for i, guide in enumerate(guides):
        if not isinstance(guide, Sample):
            raise ValueError(f"guides[{i}]: expected a Sample, got {type(guide).__name__}")
        try:
            messages.append(sample_to_message(guide))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"guides[{i}]: cannot be sent ({exc})") from None
    return messages


# ----------------------------------------------------------------------------------------------------------------
# Replies back to the store's types.


def guides_from_reply(reply: pb.GetGuidesResponse) -> dict[str, list[Sample]]:
    """{prompt_id: [Sample, ...]} of a GetGuidesResponse, prompts and each prompt's guides in its order."""
    lists: dict[str, list[Sample]] = {}
    for i, message in enumerate(reply.guides):
        lists.setdefault(message.prompt_id, []).append(sample_from_message(message, f"guides[{i}]"))
    return lists


def mistakes_from_reply(reply: pb.GetMistakesResponse) -> dict[str, int]:
    """{prompt_id: step} of a GetMistakesResponse."""
    return {mistake.prompt_id: mistake.step for mistake in reply.mistakes}


def stats_from_reply(reply: pb.StatsResponse) -> dict[str, Any]:
    """The GuideStore.stats dict of a StatsResponse."""
    counts = {entry.guide_step: entry.guides for entry in sorted(reply.guide_steps, key=lambda e: e.guide_step)}
    return {"guide_steps": counts, "guides": reply.guides, "mistakes": reply.mistakes}


# ----------------------------------------------------------------------------------------------------------------


class GuidanceCacheClient(ServiceClient):
    """A GuideStore whose guides and mistake pool live in a GuidanceCacheService at `address` ("host:port").
    Keyword arguments: retry_deadline_s (how long a call waits for an unavailable cache, default
    DEFAULT_RETRY_DEADLINE_S; 0: fail at once), timeout_s (one attempt, default DEFAULT_TIMEOUT_S), retry (the
    channel's own retries and reconnection pace, default CHANNEL_RETRY), max_message_bytes, credentials
    (services.grpc_common.ServiceClient)."""

    service = pb.DESCRIPTOR.services_by_name["GuidanceCacheService"]
    stub_class = pb_grpc.GuidanceCacheServiceStub
    default_timeout_s = DEFAULT_TIMEOUT_S

    def __init__(self, target: str, *, retry_deadline_s: float = DEFAULT_RETRY_DEADLINE_S, **options: Any) -> None:
        if isinstance(retry_deadline_s, bool) or not isinstance(retry_deadline_s, (int, float)) or retry_deadline_s < 0:
            raise ValueError(f"retry_deadline_s: expected a non-negative number of seconds, got {retry_deadline_s!r}")
        self.retry_deadline_s = float(retry_deadline_s)
        options.setdefault("retry", CHANNEL_RETRY)
        super().__init__(target, **options)

    def _call(self, method: str, request: Message, replica: int = 0, *, timeout_s: float | None = None) -> Any:
        """ServiceClient._call, sent again while the cache is unavailable (ConnectionError) until retry_deadline_s."""
        if method not in RETRIED_METHODS or not self.retry_deadline_s:
            return super()._call(method, request, replica, timeout_s=timeout_s)
        started = time.monotonic()
        deadline, pause, attempts = started + self.retry_deadline_s, RETRY_FIRST_PAUSE_S, 1
        while True:
            attempt = min(timeout_s or self.timeout_s, max(deadline - time.monotonic(), 0.1))
            try:
                reply = super()._call(method, request, replica, timeout_s=attempt)
            except (ConnectionError, TimeoutError) as exc:
                waited = time.monotonic() - started
                if isinstance(exc, TimeoutError) and attempt >= (timeout_s or self.timeout_s):
                    raise  # a whole attempt without an answer: a slow cache, not one that is down
                if time.monotonic() + pause > deadline:
                    where = f"{self.label()}.{method} to {self.address}"
                    raise ConnectionError(
                        f"{where}: still unavailable after {waited:.1f} s ({attempts} attempts; last: {exc})"
                    ) from None
                if attempts == 1:
                    log.warning("%s; retrying for up to %g s", exc, self.retry_deadline_s)
                time.sleep(pause)
                pause, attempts = min(pause * 2, RETRY_MAX_PAUSE_S), attempts + 1
                continue
            if attempts > 1:
                waited = time.monotonic() - started
                log.warning(
                    "%s.%s to %s: answered after %.1f s (%d attempts)",
                    self.label(),
                    method,
                    self.address,
                    waited,
                    attempts,
                )
            return reply

    # -- guides ----------------------------------------------------------------------------------------------------

    def put_guides(self, run: str, guide_step: int, guides: Sequence[Sample]) -> int:
        """See npo.runtime.store.GuideStore.put_guides."""
        request = pb.PutGuidesRequest(
            run=wire_run(run), guide_step=wire_step("guide_step", guide_step), guides=wire_guides(guides)
        )
        return self._call("PutGuides", request).written

    def get_guides(self, run: str, guide_step: int, prompt_ids: Sequence[str]) -> dict[str, Sample]:
        """See npo.runtime.store.GuideStore.get_guides (one call, one Redis round trip on the server)."""
        request = pb.GetGuidesRequest(
            run=wire_run(run),
            guide_step=wire_step("guide_step", guide_step),
            prompt_ids=wire_prompt_ids("prompt_ids", prompt_ids),
        )
        return {
            prompt_id: guides[0] for prompt_id, guides in guides_from_reply(self._call("GetGuides", request)).items()
        }

    def get_guide_lists(self, run: str, guide_step: int, prompt_ids: Sequence[str], k: int) -> dict[str, list[Sample]]:
        """See npo.runtime.store.GuideStore.get_guide_lists (one call; a server older than lists answers the first
        guide of each prompt)."""
        request = pb.GetGuidesRequest(
            run=wire_run(run),
            guide_step=wire_step("guide_step", guide_step),
            prompt_ids=wire_prompt_ids("prompt_ids", prompt_ids),
            k=wire_k(k),
        )
        return guides_from_reply(self._call("GetGuides", request))

    def guide_steps(self, run: str) -> list[int]:
        """See npo.runtime.store.GuideStore.guide_steps."""
        return list(self._call("ListGuideSteps", pb.ListGuideStepsRequest(run=wire_run(run))).guide_steps)

    def delete_guides(self, run: str, guide_step: int) -> int:
        """See npo.runtime.store.GuideStore.delete_guides."""
        request = pb.DeleteGuidesRequest(run=wire_run(run), guide_step=wire_step("guide_step", guide_step))
        return self._call("DeleteGuides", request).deleted

    # -- mistake pool ----------------------------------------------------------------------------------------------

    def record_mistakes(self, run: str, step: int, prompt_ids: Sequence[str]) -> None:
        """See npo.runtime.store.GuideStore.record_mistakes."""
        request = pb.RecordMistakesRequest(
            run=wire_run(run), step=wire_step("step", step), prompt_ids=wire_prompt_ids("prompt_ids", prompt_ids)
        )
        self._call("RecordMistakes", request)

    def get_mistakes(self, run: str, lo: int, hi: int) -> dict[str, int]:
        """See npo.runtime.store.GuideStore.get_mistakes."""
        request = pb.GetMistakesRequest(run=wire_run(run), lo=wire_step("lo", lo), hi=wire_step("hi", hi))
        return mistakes_from_reply(self._call("GetMistakes", request))

    def truncate_mistakes(self, run: str, from_step: int) -> int:
        """See npo.runtime.store.GuideStore.truncate_mistakes."""
        request = pb.TruncateMistakesRequest(run=wire_run(run), from_step=wire_step("from_step", from_step))
        return self._call("TruncateMistakes", request).removed

    # -- whole run -------------------------------------------------------------------------------------------------

    def stats(self, run: str) -> dict[str, Any]:
        """See npo.runtime.store.GuideStore.stats."""
        return stats_from_reply(self._call("Stats", pb.StatsRequest(run=wire_run(run))))

    def clear_run(self, run: str) -> None:
        """See npo.runtime.store.GuideStore.clear_run."""
        self._call("ClearRun", pb.ClearRunRequest(run=wire_run(run)))
