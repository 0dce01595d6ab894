"""GuidanceCacheService (proto/npo/v1/guidance_cache.proto) over a GuideStore, normally RedisGuideStore: the same
store code as the embedded runtime, behind gRPC.

Each servicer method converts the request, calls the store and converts the reply; the store validates its
arguments and raises ValueError naming the bad one, which the server's interceptor answers with INVALID_ARGUMENT
(services.grpc_common). Runs are namespaces (`run` in every request, under the key prefix `--prefix`).
Retention: the mistake pool keeps at most `--max-mistakes` prompts per run; with `--keep-guide-steps K > 0` a put
also deletes all but the newest K guide steps of its run; `DeleteGuides` and `ClearRun` forget on request.

    python -m services.guidance_cache --address 0.0.0.0:50051 --redis-url redis://redis:6379
    python -m services.guidance_cache --address 127.0.0.1:0     # empty --redis-url: an embedded Redis server
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from npo.core.types import Sample
from npo.runtime.store import GuideStore
from services.codec import sample_from_message, sample_to_message
from services.grpc_common import DEFAULT_MAX_MESSAGE_BYTES, host_of, serve_forever, start_server
from services.proto.npo.v1 import guidance_cache_pb2 as pb
from services.proto.npo.v1 import guidance_cache_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GuidanceCacheService"].full_name
"""Full name of the service ("npo.v1.GuidanceCacheService"), as health checks and service configs name it."""
PASSWORD_ENV = "NPO_REDIS_PASSWORD"
"""Environment variable read for the Redis password when --redis-password is not given."""


# ----------------------------------------------------------------------------------------------------------------
# Conversions between messages and the store's types.


def guides_from_request(request: pb.PutGuidesRequest) -> list[Sample]:
    """The guides of a PutGuidesRequest as Samples; ValueError naming `guides[i]` for a malformed one."""
    return [sample_from_message(message, f"guides[{i}]") for i, message in enumerate(request.guides)]


def guides_reply(guides: dict[str, Sample]) -> pb.GetGuidesResponse:
    """GetGuidesResponse listing `guides` in their order."""
    return pb.GetGuidesResponse(guides=[sample_to_message(sample) for sample in guides.values()])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def raw_guides_reply(serialized: list[bytes]) -> bytes:
    """The serialized GetGuidesResponse whose `guides` (field 1) are the given serialized npo.v1.Sample messages, in
    order: each entry is the field's tag, its length and the bytes, so nothing is parsed or copied per field."""
    return b"".join(b"\x0a" + _varint(len(s)) + s for s in serialized)


def serialize_reply(reply: Message | bytes) -> bytes:
    """A reply message's wire bytes; bytes (a reply already serialized, as GetGuides answers) pass unchanged."""
    return reply if isinstance(reply, bytes) else reply.SerializeToString()


def add_servicer(servicer: pb_grpc.GuidanceCacheServiceServicer, server: grpc.Server) -> None:
    """Register `servicer` on `server` as pb_grpc.add_GuidanceCacheServiceServicer_to_server does, except that replies
    go through `serialize_reply`, so a method may answer with the serialized reply."""
    service = pb.DESCRIPTOR.services_by_name["GuidanceCacheService"]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=getattr(pb, method.input_type.name).FromString,
            response_serializer=serialize_reply,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def mistakes_reply(mistakes: dict[str, int]) -> pb.GetMistakesResponse:
    """GetMistakesResponse ordered by step, then prompt id."""
    ordered = sorted(mistakes.items(), key=lambda item: (item[1], item[0]))
    return pb.GetMistakesResponse(mistakes=[pb.Mistake(prompt_id=p, step=s) for p, s in ordered])


def stats_reply(stats: dict[str, Any]) -> pb.StatsResponse:
    """StatsResponse of a GuideStore.stats dict."""
    counts = [pb.GuideStepCount(guide_step=step, guides=n) for step, n in sorted(stats["guide_steps"].items())]
    return pb.StatsResponse(guide_steps=counts, guides=stats["guides"], mistakes=stats["mistakes"])


def prune_guide_steps(store: GuideStore, run: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` guide steps of `run`; returns the deleted steps."""
    dropped = store.guide_steps(run)[:-keep] if keep > 0 else []
    for step in dropped:
        store.delete_guides(run, step)
    return dropped


# ----------------------------------------------------------------------------------------------------------------


class GuidanceCacheServicer(pb_grpc.GuidanceCacheServiceServicer):
    """npo.v1.GuidanceCacheService on `store`; `keep_guide_steps` > 0 bounds the guide steps kept per run."""

    def __init__(self, store: GuideStore, *, keep_guide_steps: int = 0) -> None:
        if isinstance(keep_guide_steps, bool) or not isinstance(keep_guide_steps, int) or keep_guide_steps < 0:
            raise ValueError(f"keep_guide_steps: expected a non-negative integer, got {keep_guide_steps!r}")
        self.store = store
        self.keep_guide_steps = keep_guide_steps

    def PutGuides(self, request: pb.PutGuidesRequest, context: grpc.ServicerContext) -> pb.PutGuidesResponse:
        written = self.store.put_guides(request.run, request.guide_step, guides_from_request(request))
        prune_guide_steps(self.store, request.run, self.keep_guide_steps)
        return pb.PutGuidesResponse(written=written)

    def GetGuides(self, request: pb.GetGuidesRequest, context: grpc.ServicerContext) -> pb.GetGuidesResponse | bytes:
        raw = getattr(self.store, "get_guides_raw", None)
        if raw is not None:  # stored protobuf bytes: the reply is their concatenation as field 1, sent as it is
            return raw_guides_reply(raw(request.run, request.guide_step, list(request.prompt_ids)))
        return guides_reply(self.store.get_guides(request.run, request.guide_step, list(request.prompt_ids)))

    def ListGuideSteps(
        self, request: pb.ListGuideStepsRequest, context: grpc.ServicerContext
    ) -> pb.ListGuideStepsResponse:
        return pb.ListGuideStepsResponse(guide_steps=self.store.guide_steps(request.run))

    def DeleteGuides(self, request: pb.DeleteGuidesRequest, context: grpc.ServicerContext) -> pb.DeleteGuidesResponse:
        return pb.DeleteGuidesResponse(deleted=self.store.delete_guides(request.run, request.guide_step))

    def RecordMistakes(
        self, request: pb.RecordMistakesRequest, context: grpc.ServicerContext
    ) -> pb.RecordMistakesResponse:
        self.store.record_mistakes(request.run, request.step, list(request.prompt_ids))
        return pb.RecordMistakesResponse()

    def GetMistakes(self, request: pb.GetMistakesRequest, context: grpc.ServicerContext) -> pb.GetMistakesResponse:
        return mistakes_reply(self.store.get_mistakes(request.run, request.lo, request.hi))

    def TruncateMistakes(
        self, request: pb.TruncateMistakesRequest, context: grpc.ServicerContext
    ) -> pb.TruncateMistakesResponse:
        return pb.TruncateMistakesResponse(removed=self.store.truncate_mistakes(request.run, request.from_step))

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return stats_reply(self.store.stats(request.run))

    def ClearRun(self, request: pb.ClearRunRequest, context: grpc.ServicerContext) -> pb.ClearRunResponse:
        self.store.clear_run(request.run)
        return pb.ClearRunResponse()


def serve(
    store: GuideStore,
    address: str = "127.0.0.1:0",
    *,
    keep_guide_steps: int = 0,
    max_workers: int = 8,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[grpc.Server, int]:
    """Start GuidanceCacheService on `store` at `address` (port 0: a free one), with grpc.health.v1 reporting
    SERVING. Returns the started server and its port; stop it with `server.stop(grace)` (the store stays open)."""
    servicer = GuidanceCacheServicer(store, keep_guide_steps=keep_guide_steps)
    return start_server(
        servicer, add_servicer, SERVICE_NAME, address, max_workers=max_workers, max_message_bytes=max_message_bytes
    )


@contextlib.contextmanager
def open_store(
    redis_url: str, *, password: str | None, prefix: str, max_mistakes: int
) -> Iterator[tuple[GuideStore, str]]:
    """The RedisGuideStore of `redis_url`, or of an embedded Redis server started here when it is empty; yields the
    store and a description of where it lives (never the password)."""
    from services.guidance_cache.embedded import EmbeddedRedis
    from services.guidance_cache.store import RedisGuideStore

    with contextlib.ExitStack() as stack:
        embedded = not redis_url
        if embedded:
            redis_url = stack.enter_context(EmbeddedRedis(password=password)).url
            password = None  # already in the embedded server's URL
        store = stack.enter_context(
            RedisGuideStore(redis_url, password=password, prefix=prefix, max_mistakes=max_mistakes)
        )
        yield store, f"embedded, {store.address}" if embedded else store.address


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m services.guidance_cache` (see --help)."""
    parser = argparse.ArgumentParser(
        prog="python -m services.guidance_cache", description="Serve the guidance cache (npo.v1.GuidanceCacheService)."
    )
    parser.add_argument("--address", default="127.0.0.1:50051", help="host:port to listen on (port 0: a free one)")
    parser.add_argument(
        "--redis-url", default="", help="redis://, rediss:// or unix:// URL; empty starts an embedded Redis server"
    )
    parser.add_argument(
        "--redis-password", default=None, help=f"Redis password (default: the environment variable {PASSWORD_ENV})"
    )
    parser.add_argument("--prefix", default="npo", help="key prefix of every Redis key written (default: npo)")
    parser.add_argument("--max-mistakes", type=int, default=4096, help="most prompts kept in a run's mistake pool")
    parser.add_argument(
        "--keep-guide-steps", type=int, default=0, help="keep only the newest K guide steps per run (0: all)"
    )
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_BYTES // 2**20)
    parser.add_argument("--workers", type=int, default=8, help="threads serving calls")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C; prints `serving on HOST:PORT` once ready."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    password = args.redis_password if args.redis_password is not None else os.environ.get(PASSWORD_ENV) or None
    try:
        with open_store(
            args.redis_url, password=password, prefix=args.prefix, max_mistakes=args.max_mistakes
        ) as opened:
            store, where = opened
            server, port = serve(
                store,
                args.address,
                keep_guide_steps=args.keep_guide_steps,
                max_workers=args.workers,
                max_message_bytes=args.max_message_mb * 2**20,
            )
            serve_forever(server, f"guidance cache: serving on {host_of(args.address)}:{port} (Redis: {where})")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
