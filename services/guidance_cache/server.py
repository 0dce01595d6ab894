"""GuidanceCacheService (proto/npo/v1/guidance_cache.proto) over a GuideStore, normally RedisGuideStore: the same
store code as the embedded runtime, behind gRPC.

Each servicer method converts the request, calls the store and converts the reply; the store validates its
arguments and raises ValueError naming the bad one, which the server's interceptor answers with INVALID_ARGUMENT
(services.grpc_common). Runs are namespaces (`run` in every request, under the key prefix `--prefix`).
Retention: the mistake pool keeps at most `--max-mistakes` prompts per run; with `--keep-guide-steps K > 0` a put
also deletes all but the newest K guide steps of its run; `DeleteGuides` and `ClearRun` forget on request.
Guides are checked at the boundary (services.codec.check_guide: finite log-probs <= 0, a finite reward, token ids
>= 0, a non-empty response): a bad one is answered INVALID_ARGUMENT naming the field and the guide, and nothing of
its batch is written.

Faults: grpc.health.v1 follows Redis (`RedisWatch`: a PING every HEALTH_INTERVAL_S; NOT_SERVING while it does not
answer). While Redis is down every call fails with UNAVAILABLE ("guidance cache: cannot reach Redis at ..."), which
GuidanceCacheClient retries; redis-py connects again by itself once it is back. An embedded Redis that dies is
started again by the watch (same socket, same data folder), within about a second. Persistence: with `--data-dir`
the embedded Redis keeps an append-only file there (fsynced before a write is answered), so a restarted cache, or
a restarted embedded Redis, has every guide and mistake; without it nothing is kept on disk. An external Redis
(`--redis-url`) keeps what its own configuration keeps.

    python -m services.guidance_cache --address 0.0.0.0:50051 --redis-url redis://redis:6379
    python -m services.guidance_cache --address 127.0.0.1:0     # empty --redis-url: an embedded Redis server
    python -m services.guidance_cache --address 127.0.0.1:50051 --data-dir runs/svc/cache-data   # ... persisted
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from npo.core.types import Sample
from npo.runtime.store import GuideStore
from services.codec import check_guide, frame_samples, sample_from_message, sample_to_message
from services.grpc_common import DEFAULT_MAX_MESSAGE_BYTES, add_health, bind, host_of, make_server, serve_forever
from services.proto.npo.v1 import guidance_cache_pb2 as pb
from services.proto.npo.v1 import guidance_cache_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GuidanceCacheService"].full_name
"""Full name of the service ("npo.v1.GuidanceCacheService"), as health checks and service configs name it."""
HEALTH_INTERVAL_S = 0.5
"""Seconds between two PINGs of the health check (and checks that the embedded Redis still runs)."""
PASSWORD_ENV = "NPO_REDIS_PASSWORD"
"""Environment variable read for the Redis password when --redis-password is not given."""


# ----------------------------------------------------------------------------------------------------------------
# Conversions between messages and the store's types.


def guides_from_request(request: pb.PutGuidesRequest) -> list[Sample]:
    """The guides of a PutGuidesRequest as Samples; ValueError naming `guides[i]` and the field for a malformed one
    or one with values the learner cannot train on (services.codec.check_guide)."""
    guides = []
    for i, message in enumerate(request.guides):
        check_guide(message, f"guides[{i}]")
        guides.append(sample_from_message(message, f"guides[{i}]"))
    return guides


def guides_reply(guides: dict[str, list[Sample]]) -> pb.GetGuidesResponse:
    """GetGuidesResponse listing the prompts' guide lists in their order, each list's guides consecutive."""
    return pb.GetGuidesResponse(guides=[sample_to_message(s) for samples in guides.values() for s in samples])


def guides_per_prompt(request: pb.GetGuidesRequest) -> int:
    """The k of a GetGuidesRequest: 0 (unset: an older client) reads as 1; ValueError naming `k` when negative."""
    if request.k < 0:
        raise ValueError(f"k: expected a non-negative number of guides per prompt, got {request.k}")
    return max(request.k, 1)


def raw_guides_reply(serialized: list[bytes]) -> bytes:
    """The serialized GetGuidesResponse whose `guides` (field 1) are the given serialized npo.v1.Sample messages, in
    order: each entry is the field's tag, its length and the bytes, so nothing is parsed or copied per field."""
    return frame_samples(serialized)


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
        k, raw = guides_per_prompt(request), getattr(self.store, "get_guides_raw", None)
        if raw is not None:  # stored protobuf bytes: the reply is their concatenation as field 1, sent as it is
            return raw_guides_reply(raw(request.run, request.guide_step, list(request.prompt_ids), k))
        return guides_reply(self.store.get_guide_lists(request.run, request.guide_step, list(request.prompt_ids), k))

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


class RedisWatch:
    """Health follows Redis: every `interval_s` seconds, PING the store's Redis and report the result on the
    grpc.health.v1 servicer (SERVING / NOT_SERVING for "" and the service), logging each change. With `embedded` (the
    EmbeddedRedis behind the store), a server process that died is first started again (same socket or port, same
    data folder).

    It runs in a thread started by `start(server)` that ends when the gRPC server stops; `check()` is one round."""

    def __init__(self, store: Any, health: Any, *, embedded: Any = None, interval_s: float = HEALTH_INTERVAL_S) -> None:
        self.store, self.health, self.embedded, self.interval_s = store, health, embedded, interval_s
        self.serving = True
        self._down_since = 0.0
        self._thread: threading.Thread | None = None

    def _report(self, serving: bool, why: str = "") -> None:
        if serving != self.serving:
            where = getattr(self.store, "address", "Redis")
            if serving:
                down = time.monotonic() - self._down_since
                log.warning("Redis at %s answers again after %.2f s: health SERVING", where, down)
            else:
                self._down_since = time.monotonic()
                log.warning("Redis at %s does not answer%s: health NOT_SERVING", where, why)
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _restart_embedded(self) -> None:
        """Start the embedded Redis again when its process died (tied to this thread, which lives as long as the
        server, so the kernel stops it if this process is killed)."""
        if self.embedded is None or self.embedded.is_running():
            return
        pid, code = self.embedded.pid, self.embedded.exit_code
        self._report(False, f" (embedded Redis pid {pid} exited with code {code})")
        try:
            seconds = self.embedded.restart(tie_to_thread=True)
        except (RuntimeError, TimeoutError) as exc:
            log.error("embedded Redis: restart failed (trying again in %g s): %s", self.interval_s, exc)
            return
        log.warning(
            "embedded Redis restarted in %.2f s (pid %d, same address and data folder)", seconds, self.embedded.pid
        )

    def check(self) -> bool:
        """One round: restart a dead embedded Redis, PING, report; True when Redis answers."""
        self._restart_embedded()
        serving = bool(self.store.ping())
        self._report(serving)
        return serving

    def start(self, server: grpc.Server) -> None:
        """Check every interval_s seconds in a daemon thread until `server` stops."""

        def loop() -> None:
            while server.wait_for_termination(timeout=self.interval_s):  # True: timed out, the server still runs
                try:
                    self.check()
                except Exception:  # noqa: BLE001 - a check never ends the watch
                    log.exception("health check of Redis failed")

        self._thread = threading.Thread(target=loop, name="redis-watch", daemon=True)
        self._thread.start()


def serve(
    store: GuideStore,
    address: str = "127.0.0.1:0",
    *,
    keep_guide_steps: int = 0,
    max_workers: int = 8,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    embedded: Any = None,
    health_interval_s: float = HEALTH_INTERVAL_S,
) -> tuple[grpc.Server, int]:
    """Start GuidanceCacheService on `store` at `address` (port 0: a free one), with grpc.health.v1 reporting SERVING
    while the store's Redis answers PING and NOT_SERVING while it does not (a `RedisWatch` every `health_interval_s`
    seconds, when the store has `ping`; it also restarts `embedded`, the EmbeddedRedis behind the store, when it
    dies). Returns the started server and its port; stop it with `server.stop(grace)` (the store stays open)."""
    servicer = GuidanceCacheServicer(store, keep_guide_steps=keep_guide_steps)
    server = make_server(max_workers=max_workers, max_message_bytes=max_message_bytes)
    add_servicer(servicer, server)
    health = add_health(server, [SERVICE_NAME])
    port = bind(server, address)
    server.start()
    if hasattr(store, "ping"):
        watch = RedisWatch(store, health, embedded=embedded, interval_s=health_interval_s)
        watch.check()
        watch.start(server)
    return server, port


@contextlib.contextmanager
def open_store(
    redis_url: str, *, password: str | None, prefix: str, max_mistakes: int, data_dir: str | None = None
) -> Iterator[tuple[GuideStore, str, Any]]:
    """The RedisGuideStore of `redis_url`, or of an embedded Redis server started here when it is empty (keeping an
    append-only file in `data_dir` when given); yields the store, a description of where it lives (never the
    password) and the EmbeddedRedis (None for an external Redis)."""
    from services.guidance_cache.embedded import EmbeddedRedis
    from services.guidance_cache.store import RedisGuideStore

    with contextlib.ExitStack() as stack:
        embedded = None
        if not redis_url:
            embedded = stack.enter_context(EmbeddedRedis(password=password, data_dir=data_dir or None))
            redis_url = embedded.url
            password = None  # already in the embedded server's URL
        elif data_dir:
            log.warning("--data-dir %s is not used: Redis at --redis-url keeps its own data", data_dir)
        store = stack.enter_context(
            RedisGuideStore(redis_url, password=password, prefix=prefix, max_mistakes=max_mistakes)
        )
        if embedded is None:
            yield store, store.address, None
        else:
            kept = f"append-only file in {embedded.data_dir}" if embedded.data_dir else "nothing kept on disk"
            yield store, f"embedded, {store.address}, {kept}", embedded


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
    parser.add_argument(
        "--data-dir",
        default="",
        help="folder where the embedded Redis keeps an append-only file (fsync before each write is answered), so a "
        "restarted cache has every guide and mistake; default: none, nothing is kept on disk (a restarted cache "
        "starts empty); not used with --redis-url (that Redis keeps its own data)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C; prints `serving on HOST:PORT` once ready."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    password = args.redis_password if args.redis_password is not None else os.environ.get(PASSWORD_ENV) or None
    try:
        options = {"password": password, "prefix": args.prefix, "max_mistakes": args.max_mistakes}
        with open_store(args.redis_url, **options, data_dir=args.data_dir) as (store, where, embedded):
            server, port = serve(
                store,
                args.address,
                keep_guide_steps=args.keep_guide_steps,
                max_workers=args.workers,
                max_message_bytes=args.max_message_mb * 2**20,
                embedded=embedded,
            )
            serve_forever(server, f"guidance cache: serving on {host_of(args.address)}:{port} (Redis: {where})")
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
