"""GuidanceCacheService end to end: the GuideStore behaviour through GuidanceCacheClient, a real gRPC server on
127.0.0.1 (ephemeral port) and a real embedded Redis behind it; status codes, deadlines, retries, health, limits;
guide values refused at the boundary; faults: health following Redis, an embedded Redis restarted with its
append-only file, a cache restarted on the same port and data folder while a client waits for it."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_store import check_guide_lists

from npo.core.types import Sample
from npo.runtime.store import GuideStore, MemoryGuideStore
from services.codec import sample_to_message
from services.grpc_common import RetryPolicy, make_server, open_channel, retried_methods, status_for
from services.guidance_cache.client import RETRIED_METHODS, GuidanceCacheClient
from services.guidance_cache.embedded import EmbeddedRedis
from services.guidance_cache.server import SERVICE_NAME, raw_guides_reply, serve
from services.guidance_cache.store import RedisGuideStore
from services.proto.npo.v1 import common_pb2
from services.proto.npo.v1 import guidance_cache_pb2 as pb
from services.proto.npo.v1 import guidance_cache_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=0.05, max_backoff_s=0.2)


def guide(prompt_id: str, step: int = 7, logprobs: list[float] | None = None) -> Sample:
    logprobs = logprobs if logprobs is not None else [-0.5, -1.25]
    return Sample(prompt_id, list(range(3, 3 + len(logprobs))), logprobs, reward=1.0, text="42", policy_step=step)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as embedded:
        yield embedded


@pytest.fixture
def start_service(redis_server, request):
    """Factory: a GuidanceCacheService on a fresh key prefix of the embedded Redis; returns (store, port)."""
    started = []

    def start(**serve_options) -> tuple[RedisGuideStore, int]:
        max_mistakes = serve_options.pop("max_mistakes", 4096)
        prefix = f"svc{len(started)}-{request.node.name}"
        store = RedisGuideStore(redis_server.url, prefix=prefix, max_mistakes=max_mistakes)
        server, port = serve(store, "127.0.0.1:0", **serve_options)
        started.append((server, store))
        return store, port

    yield start
    for server, store in started:
        server.stop(None)
        store.close()


@pytest.fixture
def make_client(start_service):
    """Factory: a client of a fresh service (server options pass through)."""
    clients = []

    def make(**serve_options) -> GuidanceCacheClient:
        _, port = start_service(**serve_options)
        client = GuidanceCacheClient(f"127.0.0.1:{port}", timeout_s=5.0, retry=FAST_RETRY)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def store(make_client):
    return make_client()


@pytest.fixture
def raw_stub(start_service):
    """The generated stub on a fresh service, for requests the client would never build."""
    _, port = start_service()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.GuidanceCacheServiceStub(channel)


# ---------------------------------------------------------------------------------------------------------------
# The GuideStore behaviour, through the client.


def test_client_satisfies_the_guide_store_protocol(store):
    assert isinstance(store, GuideStore)


def test_guides_round_trip_exactly(store):
    awkward = [0.1 - 0.3, -1e-300, -5e-324, math.nextafter(-1.0, 0.0), -123456.789012345678, -1.7e308, 0.0]
    original = Sample("p/1 é", [5, 6, 7, 8, 9, 10, 2], awkward, reward=0.75, text="x = ½\n", policy_step=40)
    unfinished = Sample("p2", [0], [-0.0], reward=0.0, text="", policy_step=-1, finished=False)
    assert store.put_guides("run", 40, [original, unfinished]) == 2

    got = store.get_guides("run", 40, ["p/1 é", "p2"])
    assert got == {"p/1 é": original, "p2": unfinished}
    assert [x.hex() for x in got["p/1 é"].logprobs] == [x.hex() for x in awkward]


def test_get_guides_reply_is_the_stored_bytes_and_keeps_every_value(make_client):
    ids = [0, 127, 128, 151_935, 2**31 - 1, 16_383, 2**21]  # one- to five-byte varints (negative ids are refused)
    logprobs = [-0.0, -1.7e308, -math.pi, -5e-324, -1e-300, math.nextafter(-1.0, 0.0), -7.25]
    original = Sample("p", ids, logprobs, reward=-0.5, text="ü", policy_step=-1, finished=False)
    client = make_client()
    client.put_guides("run", 3, [original])
    got = client.get_guides("run", 3, ["p", "absent"])["p"]
    assert (got.response_ids, got.reward, got.text, got.policy_step, got.finished) == (ids, -0.5, "ü", -1, False)
    assert [x.hex() for x in got.logprobs] == [x.hex() for x in logprobs]
    assert type(got.response_ids) is list and type(got.logprobs) is list
    assert (
        raw_guides_reply([b"\x0a\x01p", b"\x0a\x01q"])
        == pb.GetGuidesResponse(
            guides=[common_pb2.Sample(prompt_id="p"), common_pb2.Sample(prompt_id="q")]
        ).SerializeToString()
    )


def test_get_guides_of_missing_ids_are_absent(store):
    store.put_guides("run", 3, [guide("a"), guide("b")])
    assert list(store.get_guides("run", 3, ["b", "zzz", "a", "b"])) == ["b", "a"]  # request order, once each
    assert store.get_guides("run", 3, ["zzz"]) == {}
    assert store.get_guides("run", 3, []) == {}
    assert store.get_guides("run", 4, ["a"]) == {}
    assert store.get_guides("other-run", 3, ["a"]) == {}


def test_put_replaces_a_prompts_guide_and_counts_distinct_ids(store):
    assert store.put_guides("run", 5, [guide("a", logprobs=[-1.0]), guide("a", logprobs=[-2.0]), guide("b")]) == 2
    assert store.get_guides("run", 5, ["a"])["a"].logprobs == [-1.0]  # a's list is both, in order
    assert store.put_guides("run", 6, []) == 0
    assert store.guide_steps("run") == [5]


def test_a_prompts_guides_are_an_ordered_list(store):
    check_guide_lists(store)  # the store contract of test_store, through the gRPC client


def test_an_older_client_reads_the_first_guide_and_a_negative_k_is_refused(raw_stub):
    # a GetGuidesRequest without k (a client older than lists) is answered with each prompt's first guide
    first, second = guide("a", logprobs=[-1.0]), guide("a", logprobs=[-2.0])
    put = pb.PutGuidesRequest(run="run", guide_step=5, guides=[sample_to_message(first), sample_to_message(second)])
    assert raw_stub.PutGuides(put).written == 1
    assert [
        m.logprobs for m in raw_stub.GetGuides(pb.GetGuidesRequest(run="run", guide_step=5, prompt_ids=["a"])).guides
    ] == [[-1.0]]
    both = raw_stub.GetGuides(pb.GetGuidesRequest(run="run", guide_step=5, prompt_ids=["a"], k=2)).guides
    assert [m.logprobs for m in both] == [[-1.0], [-2.0]]
    with pytest.raises(grpc.RpcError) as refused:
        raw_stub.GetGuides(pb.GetGuidesRequest(run="run", guide_step=5, prompt_ids=["a"], k=-1))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.value.details().startswith("k: ")


def test_runs_are_namespaced(store):
    store.put_guides("run", 1, [guide("a", logprobs=[-1.0])])
    store.put_guides("run:guides:1", 1, [guide("a", logprobs=[-9.0])])
    store.record_mistakes("run", 2, ["m"])
    assert store.get_guides("run", 1, ["a"])["a"].logprobs == [-1.0]
    assert store.get_mistakes("run:guides:1", 0, 100) == {}

    store.clear_run("run")
    assert store.stats("run") == {"guide_steps": {}, "guides": 0, "mistakes": 0}
    assert store.get_guides("run:guides:1", 1, ["a"])["a"].logprobs == [-9.0]


def test_guide_steps_delete_stats_and_clear(store):
    store.put_guides("run", 30, [guide("a"), guide("b"), guide("c")])
    store.put_guides("run", 10, [guide("a")])
    store.put_guides("run", 20, [guide("x"), guide("y")])
    store.record_mistakes("run", 4, ["m1", "m2"])
    assert store.guide_steps("run") == [10, 20, 30]
    assert store.stats("run") == {"guide_steps": {10: 1, 20: 2, 30: 3}, "guides": 6, "mistakes": 2}

    assert store.delete_guides("run", 20) == 2
    assert store.delete_guides("run", 20) == 0
    assert store.stats("run") == {"guide_steps": {10: 1, 30: 3}, "guides": 4, "mistakes": 2}

    store.clear_run("run")
    assert store.guide_steps("run") == []
    assert store.get_mistakes("run", 0, 100) == {}


def test_mistakes_by_step_range_and_truncation(store):
    store.record_mistakes("run", 3, ["b", "a"])
    store.record_mistakes("run", 5, ["c"])
    store.record_mistakes("run", 9, ["d"])
    store.record_mistakes("run", 8, ["c"])  # a later record moves the prompt
    assert store.get_mistakes("run", 0, 100) == {"a": 3, "b": 3, "c": 8, "d": 9}
    assert list(store.get_mistakes("run", 0, 100)) == ["a", "b", "c", "d"]  # by step, then prompt id
    assert store.get_mistakes("run", 3, 9) == {"a": 3, "b": 3, "c": 8}  # [lo, hi)
    assert store.get_mistakes("run", 5, 5) == {}

    assert store.truncate_mistakes("run", 8) == 2
    assert store.truncate_mistakes("run", 8) == 0
    assert store.get_mistakes("run", 0, 100) == {"a": 3, "b": 3}


def test_mistake_pool_is_bounded_evicting_the_oldest_steps(make_client):
    store = make_client(max_mistakes=3)
    store.record_mistakes("run", 1, ["old"])
    store.record_mistakes("run", 2, ["b", "a"])
    store.record_mistakes("run", 3, ["new"])
    store.record_mistakes("run", 4, ["x", "y"])
    assert store.get_mistakes("run", 0, 100) == {"new": 3, "x": 4, "y": 4}
    assert store.stats("run")["mistakes"] == 3


def test_retention_keeps_the_newest_guide_steps(make_client):
    store = make_client(keep_guide_steps=2)
    for step in (10, 30, 20, 40):
        store.put_guides("run", step, [guide("a", step)])
    assert store.guide_steps("run") == [30, 40]
    assert store.get_guides("run", 10, ["a"]) == {}
    store.put_guides("other", 1, [guide("a")])
    assert store.guide_steps("run") == [30, 40]  # retention is per run


# ---------------------------------------------------------------------------------------------------------------
# Bad input: INVALID_ARGUMENT with the store's message; the client raises ValueError with it.


def store_message(call) -> str:
    """The ValueError message an in-memory GuideStore gives for `call` (the reference wording)."""
    with pytest.raises(ValueError) as info:
        call(MemoryGuideStore())
    return str(info.value)


BAD_CALLS = {
    "negative guide step": lambda s: s.get_guides("run", -1, ["a"]),
    "negative mistake step": lambda s: s.record_mistakes("run", -3, ["a"]),
    "empty run": lambda s: s.put_guides("", 1, [guide("a")]),
    "lo > hi": lambda s: s.get_mistakes("run", 5, 4),
    "empty prompt id": lambda s: s.get_guides("run", 1, ["a", ""]),
    "guide without prompt id": lambda s: s.put_guides("run", 1, [guide("a"), Sample("", [1], [-0.1])]),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_client_raises_the_servers_value_error(store, case):
    expected = store_message(BAD_CALLS[case])
    with pytest.raises(ValueError) as info:
        BAD_CALLS[case](store)
    assert str(info.value) == expected
    assert store.stats("run") == {"guide_steps": {}, "guides": 0, "mistakes": 0}  # nothing was written


@pytest.mark.parametrize(
    "method, request_message, message",
    [
        ("GetGuides", pb.GetGuidesRequest(run="run", guide_step=-1), "guide_step: expected a non-negative"),
        ("Stats", pb.StatsRequest(run=""), "run: expected a non-empty run name, got ''"),
        ("GetMistakes", pb.GetMistakesRequest(run="run", lo=5, hi=4), "lo: must be <= hi, got lo=5, hi=4"),
        ("TruncateMistakes", pb.TruncateMistakesRequest(run="run", from_step=-2), "from_step: expected"),
        (
            "PutGuides",
            pb.PutGuidesRequest(
                run="run",
                guide_step=1,
                guides=[
                    common_pb2.Sample(prompt_id="a", response_ids=[1, 2], logprobs=[-0.1, -0.2]),
                    common_pb2.Sample(prompt_id="b", response_ids=[1, 2, 3], logprobs=[-0.1]),
                ],
            ),
            "guides[1].logprobs: expected one log-prob per response token (3), got 1",
        ),
    ],
)
def test_bad_requests_get_invalid_argument_naming_the_field(raw_stub, method, request_message, message):
    with pytest.raises(grpc.RpcError) as info:
        getattr(raw_stub, method)(request_message, timeout=5.0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(message)
    assert raw_stub.Stats(pb.StatsRequest(run="run"), timeout=5.0).guides == 0  # the bad batch wrote nothing


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda s: s.put_guides(None, 1, [guide("a")]), "run"),
        (lambda s: s.put_guides("run", 1.0, [guide("a")]), "guide_step"),
        (lambda s: s.put_guides("run", True, [guide("a")]), "guide_step"),
        (lambda s: s.put_guides("run", 1, [guide("a"), "not a sample"]), r"guides\[1\]"),
        (lambda s: s.put_guides("run", 1, [Sample("a", [2**40], [-0.1])]), r"guides\[0\]"),
        (lambda s: s.get_guides("run", 1, "abc"), "prompt_ids"),
        (lambda s: s.record_mistakes("run", 1, [3]), r"prompt_ids\[0\]"),
        (lambda s: s.get_mistakes("run", 0, 2**63), "hi"),
    ],
)
def test_what_cannot_travel_is_rejected_by_the_client(call, argument):
    # No server at all: these never leave the process.
    with GuidanceCacheClient(f"127.0.0.1:{free_port()}", timeout_s=0.5) as client:
        with pytest.raises(ValueError, match=rf"^{argument}"):
            call(client)


# ---------------------------------------------------------------------------------------------------------------
# Status codes of unexpected exceptions, deadlines, retries, health, size limits.


class SilentCache(pb_grpc.GuidanceCacheServiceServicer):
    """A servicer that never answers GetGuides (until released) and fails the other calls in chosen ways."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def GetGuides(self, request, context):
        self.release.wait(10.0)
        return pb.GetGuidesResponse()

    def Stats(self, request, context):
        raise {"missing": KeyError("run x: no such run"), "down": ConnectionError("redis is down")}.get(
            request.run, RuntimeError("disk on fire\nsecond line")
        )


@pytest.fixture
def silent_server():
    servicer = SilentCache()
    server = make_server(max_workers=4)
    pb_grpc.add_GuidanceCacheServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    servicer.release.set()
    server.stop(None)


def test_a_call_to_a_server_that_never_answers_times_out(silent_server):
    with GuidanceCacheClient(f"127.0.0.1:{silent_server}", timeout_s=0.3, retry=FAST_RETRY) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"GuidanceCache\.GetGuides to 127\.0\.0\.1:\d+: no answer within"):
            client.get_guides("run", 1, ["a"])
        assert 0.25 < time.monotonic() - started < 3.0
    # A call made on the channel without a timeout gets the channel's default deadline.
    channel = open_channel(
        f"127.0.0.1:{silent_server}", [pb.DESCRIPTOR.services_by_name["GuidanceCacheService"]], timeout_s=0.3
    )
    with channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GuidanceCacheServiceStub(channel).GetGuides(pb.GetGuidesRequest(run="run"))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.25 < time.monotonic() - started < 3.0


def test_exceptions_map_to_status_codes_and_back(silent_server, caplog):
    with GuidanceCacheClient(f"127.0.0.1:{silent_server}", timeout_s=5.0, retry=FAST_RETRY) as client:
        with pytest.raises(LookupError, match="^run x: no such run$"):
            client.stats("missing")
        with pytest.raises(ConnectionError, match="redis is down"):
            client.stats("down")  # UNAVAILABLE: retried, then given up
        with caplog.at_level(logging.ERROR, logger="services.grpc_common"):
            with pytest.raises(RuntimeError, match=r"INTERNAL: internal error \(RuntimeError: disk on fire\);") as info:
                client.stats("other")
    assert "second line" not in str(info.value)  # one line to the client ...
    assert any(r.exc_info and "disk on fire\nsecond line" in str(r.exc_info[1]) for r in caplog.records)  # full log
    assert status_for(ValueError("x: bad")) == (grpc.StatusCode.INVALID_ARGUMENT, "x: bad")
    assert status_for(FileNotFoundError("ckpt"))[0] == grpc.StatusCode.NOT_FOUND


def test_idempotent_calls_retry_until_a_late_server_starts(redis_server):
    port = free_port()
    outcome = {}
    # The default policy: the client's retries (0.1 s doubling up to 2 s) within its 120 s retry deadline.
    with GuidanceCacheClient(f"127.0.0.1:{port}", timeout_s=8.0) as client:

        def read() -> None:
            try:
                outcome["guides"] = client.get_guides("run", 1, ["a"])
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = exc

        started = time.monotonic()
        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.4)  # the first attempts find nobody listening
        assert reader.is_alive()
        with RedisGuideStore(redis_server.url, prefix="late") as store:
            store.put_guides("run", 1, [guide("a")])
            server, _ = serve(store, f"127.0.0.1:{port}")
            try:
                reader.join(10.0)
            finally:
                server.stop(None)
                store.clear_run("run")
    assert outcome == {"guides": {"a": guide("a")}}
    assert time.monotonic() - started > 0.4


def test_calls_that_are_not_idempotent_are_not_retried():
    with GuidanceCacheClient(f"127.0.0.1:{free_port()}", timeout_s=5.0) as client:
        started = time.monotonic()
        with pytest.raises(ConnectionError, match=r"TruncateMistakes to 127\.0\.0\.1:\d+: server unavailable"):
            client.truncate_mistakes("run", 3)
        assert time.monotonic() - started < 1.0  # one attempt; retries would take about 3 s to give up
    service = pb.DESCRIPTOR.services_by_name["GuidanceCacheService"]
    assert retried_methods(service) == [
        "PutGuides",
        "GetGuides",
        "ListGuideSteps",
        "RecordMistakes",
        "GetMistakes",
        "Stats",
        "ClearRun",
    ]


def test_health_reports_serving(start_service):
    _, port = start_service()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5.0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="npo.v1.NoSuchService"), timeout=5.0)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert SERVICE_NAME == "npo.v1.GuidanceCacheService"


def test_messages_over_the_size_limit_are_refused(make_client):
    store = make_client(max_message_bytes=64 * 1024)
    small = [guide(f"p{i}", logprobs=[-0.5] * 100) for i in range(5)]  # ~5 KB
    large = [guide(f"p{i}", logprobs=[-0.5] * 1000) for i in range(20)]  # ~200 KB
    assert store.put_guides("run", 1, small) == 5
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        store.put_guides("run", 2, large)
    assert store.guide_steps("run") == [1]


def test_main_serves_an_embedded_redis_until_sigterm():
    env = {**os.environ, "NPO_REDIS_PASSWORD": "pw:@/x"}
    command = [sys.executable, "-m", "services.guidance_cache", "--address", "127.0.0.1:0", "--prefix", "main"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("guidance cache: serving on 127.0.0.1:"), process.stderr.read()
        assert "pw:@/x" not in line and "embedded" in line
        port = int(line.split("serving on 127.0.0.1:")[1].split()[0])
        with GuidanceCacheClient(f"127.0.0.1:{port}", timeout_s=5.0) as client:
            assert client.put_guides("run", 3, [guide("a")]) == 1
            assert client.get_guides("run", 3, ["a"]) == {"a": guide("a")}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------------------------------
# Guide values the learner cannot train on: INVALID_ARGUMENT naming the field and the guide, nothing stored.

BAD_GUIDES = {
    "NaN log-prob": (
        Sample("b", [3, 4], [-0.5, math.nan], 1.0),
        "guides[1].logprobs[1]: nan is not a finite log-prob (prompt 'b')",
    ),
    "inf log-prob": (
        Sample("b", [3, 4], [math.inf, -0.5], 1.0),
        "guides[1].logprobs[0]: inf is not a finite log-prob (prompt 'b')",
    ),
    "-inf log-prob": (
        Sample("b", [3, 4], [-0.5, -math.inf], 1.0),
        "guides[1].logprobs[1]: -inf is not a finite log-prob (prompt 'b')",
    ),
    "positive log-prob": (
        Sample("b", [3, 4, 5], [-0.5, -0.1, 0.25], 1.0),
        "guides[1].logprobs[2]: 0.25 > 0 is not a log-prob (tolerance 1e-06) (prompt 'b')",
    ),
    "log-prob just over the tolerance": (
        Sample("b", [3], [2e-6], 1.0),
        "guides[1].logprobs[0]: 2e-06 > 0 is not a log-prob (tolerance 1e-06) (prompt 'b')",
    ),
    "NaN reward": (Sample("b", [3], [-0.5], math.nan), "guides[1].reward: nan is not a finite reward (prompt 'b')"),
    "inf reward": (Sample("b", [3], [-0.5], -math.inf), "guides[1].reward: -inf is not a finite reward (prompt 'b')"),
    "negative token id": (
        Sample("b", [3, -7, 4], [-0.5, -0.5, -0.5], 1.0),
        "guides[1].response_ids[1]: token id -7 is negative (prompt 'b')",
    ),
    "empty response": (
        Sample("b", [], [], 1.0),
        "guides[1].response_ids: empty response (a guide needs at least one token) (prompt 'b')",
    ),
    "lengths that disagree": (  # a Sample cannot be built so; only a request can carry it
        common_pb2.Sample(prompt_id="b", response_ids=[3, 4, 5], logprobs=[-0.5], reward=1.0),
        "guides[1].logprobs: expected one log-prob per response token (3), got 1 (prompt 'b')",
    ),
}


@pytest.mark.parametrize("case", list(BAD_GUIDES))
def test_bad_guide_values_get_invalid_argument_and_nothing_is_stored(raw_stub, store, case):
    bad, message = BAD_GUIDES[case]
    bad_message = bad if isinstance(bad, common_pb2.Sample) else sample_to_message(bad)
    request = pb.PutGuidesRequest(run="run", guide_step=1, guides=[sample_to_message(guide("a")), bad_message])
    with pytest.raises(grpc.RpcError) as info:
        raw_stub.PutGuides(request, timeout=5.0)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert raw_stub.Stats(pb.StatsRequest(run="run"), timeout=5.0).guides == 0  # not even the good guide "a"
    if isinstance(bad, Sample):
        with pytest.raises(ValueError) as raised:  # through the client: ValueError with the same message
            store.put_guides("run", 1, [guide("a"), bad])
        assert str(raised.value) == message
        assert store.stats("run") == {"guide_steps": {}, "guides": 0, "mistakes": 0}


def test_log_probs_within_the_tolerance_are_accepted(store):
    rounded = Sample("a", [3, 4, 5], [6e-8, 1e-6, -0.0], reward=0.0)  # log(1) of a float32 softmax can be +6e-8
    assert store.put_guides("run", 1, [rounded]) == 1
    assert store.get_guides("run", 1, ["a"]) == {"a": rounded}


# ---------------------------------------------------------------------------------------------------------------
# Sending a call again never doubles anything (the client retries these while the cache is unavailable).


def test_retried_calls_sent_twice_leave_the_state_of_one(store):
    guides = [guide("a"), guide("b", logprobs=[-0.25])]
    for _ in range(2):
        assert store.put_guides("run", 4, guides) == 2
        store.record_mistakes("run", 3, ["a", "c"])
    assert store.stats("run") == {"guide_steps": {4: 2}, "guides": 2, "mistakes": 2}
    assert store.get_guides("run", 4, ["a", "b"]) == {"a": guides[0], "b": guides[1]}
    assert store.get_mistakes("run", 0, 10) == {"a": 3, "c": 3}
    for _ in range(2):
        store.clear_run("run")
    assert store.stats("run") == {"guide_steps": {}, "guides": 0, "mistakes": 0}
    assert GuidanceCacheClient.__module__ == "services.guidance_cache.client"
    assert sorted(RETRIED_METHODS) == sorted(retried_methods(pb.DESCRIPTOR.services_by_name["GuidanceCacheService"]))


def test_a_call_gives_up_after_its_retry_deadline(caplog):
    caplog.set_level(logging.WARNING, logger="services.guidance_cache.client")
    with GuidanceCacheClient(f"127.0.0.1:{free_port()}", timeout_s=5.0, retry_deadline_s=1.0) as client:
        started = time.monotonic()
        with pytest.raises(
            ConnectionError, match=r"GetGuides to [\d.:]+: still unavailable after \d+\.\d s \(\d+ attempts; last: "
        ):
            client.get_guides("run", 1, ["a"])
        assert 0.5 < time.monotonic() - started < 4.0
    waiting = [r.getMessage() for r in caplog.records if "retrying for up to 1 s" in r.getMessage()]
    assert len(waiting) == 1  # one line when it starts waiting, not one per attempt
    with pytest.raises(ValueError, match="retry_deadline_s"):
        GuidanceCacheClient("127.0.0.1:1", retry_deadline_s=-1)


# ---------------------------------------------------------------------------------------------------------------
# Faults: health follows Redis, an embedded Redis is restarted with its data, a restarted cache keeps everything.


def health_status(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2
        )
    return reply.status


def wait_for_health(port: int, status: int, timeout: float = 10.0) -> float:
    """Seconds until the service reports `status` (fails the test after `timeout`)."""
    started = time.monotonic()
    while health_status(port) != status:
        assert time.monotonic() - started < timeout, f"health not {status} within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_health_follows_an_external_redis_and_calls_are_unavailable_meanwhile(tmp_path):
    redis_process = EmbeddedRedis(data_dir=tmp_path / "data")  # stands for a Redis at cache.url: nobody restarts it
    store = RedisGuideStore(redis_process.url, prefix="ext")
    server, port = serve(store, "127.0.0.1:0", health_interval_s=0.1)
    try:
        with GuidanceCacheClient(f"127.0.0.1:{port}", timeout_s=5.0, retry_deadline_s=0) as client:
            client.put_guides("run", 2, [guide("a")])
            assert health_status(port) == health_pb2.HealthCheckResponse.SERVING
            os.kill(redis_process.pid, signal.SIGKILL)
            assert wait_for_health(port, health_pb2.HealthCheckResponse.NOT_SERVING) < 2.0
            with pytest.raises(
                ConnectionError, match=r"server unavailable: guidance cache: cannot reach Redis at unix:"
            ):
                client.get_guides("run", 2, ["a"])  # UNAVAILABLE with the reason, not INTERNAL
            redis_process.restart()
            assert wait_for_health(port, health_pb2.HealthCheckResponse.SERVING) < 2.0
            assert client.get_guides("run", 2, ["a"]) == {"a": guide("a")}  # redis-py reconnected; the AOF kept it
    finally:
        server.stop(None)
        store.close()
        redis_process.stop()


def test_an_embedded_redis_that_dies_is_restarted_with_every_guide(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="services.guidance_cache.server")
    embedded = EmbeddedRedis(data_dir=tmp_path / "data")
    store = RedisGuideStore(embedded.url, prefix="emb")
    server, port = serve(store, "127.0.0.1:0", embedded=embedded, health_interval_s=0.1)
    try:
        with GuidanceCacheClient(f"127.0.0.1:{port}", timeout_s=5.0) as client:
            guides = [guide(f"p{i}", logprobs=[-0.5 - i]) for i in range(50)]
            client.put_guides("run", 5, guides)
            client.record_mistakes("run", 4, ["m1", "m2"])
            dead = embedded.pid
            os.kill(dead, signal.SIGKILL)
            started = time.monotonic()
            while embedded.pid == dead or health_status(port) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() - started < 3.0, "not restarted within 3 s"
                time.sleep(0.02)
            assert client.get_guides("run", 5, [g.prompt_id for g in guides]) == {g.prompt_id: g for g in guides}
            assert client.get_mistakes("run", 0, 10) == {"m1": 4, "m2": 4}
        messages = [r.getMessage() for r in caplog.records]
        assert any(f"pid {dead} exited with code -9): health NOT_SERVING" in m for m in messages), messages
        assert any(m.startswith("embedded Redis restarted in") for m in messages), messages
        assert any("answers again after" in m and m.endswith("health SERVING") for m in messages), messages
    finally:
        server.stop(None)
        store.close()
        embedded.stop()


def start_cache(port: int, data_dir: Path) -> subprocess.Popen:
    """`python -m services.guidance_cache` on 127.0.0.1:`port` with `data_dir`, once it serves."""
    command = [sys.executable, "-m", "services.guidance_cache", "--address", f"127.0.0.1:{port}"]
    command += ["--data-dir", str(data_dir)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith(f"guidance cache: serving on 127.0.0.1:{port}"), process.stderr.read()
    assert f"append-only file in {data_dir}" in line
    return process


def test_a_restarted_cache_has_every_guide_and_mistake_and_the_client_waits_for_it(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="services.guidance_cache.client")
    port, data_dir = free_port(), tmp_path / "cache-data"
    process = start_cache(port, data_dir)
    guides = [guide(f"p{i}", step=i, logprobs=[-0.5] * (i + 1)) for i in range(20)]
    try:
        with GuidanceCacheClient(f"127.0.0.1:{port}", timeout_s=5.0) as client:
            client.put_guides("run", 10, guides)
            client.record_mistakes("run", 7, ["m1", "m2"])
            client.record_mistakes("run", 8, ["m3"])
            process.kill()  # SIGKILL: its Redis gets SIGTERM from the kernel (parent death)
            process.wait()
            outcome = {}

            def put_while_down() -> None:
                try:
                    outcome["written"] = client.put_guides("run", 11, guides[:3])
                except Exception as exc:  # reported by the assertion below
                    outcome["error"] = exc

            writer = threading.Thread(target=put_while_down)
            writer.start()
            time.sleep(0.5)
            assert writer.is_alive()  # waiting for the cache, not failed
            process = start_cache(port, data_dir)  # same port, same data folder
            writer.join(15.0)
            assert outcome == {"written": 3}
            assert client.get_guides("run", 10, [g.prompt_id for g in guides]) == {g.prompt_id: g for g in guides}
            assert client.get_mistakes("run", 0, 100) == {"m1": 7, "m2": 7, "m3": 8}
            assert client.stats("run") == {"guide_steps": {10: 20, 11: 3}, "guides": 23, "mistakes": 3}
        messages = [r.getMessage() for r in caplog.records]
        assert sum("PutGuides" in m and "retrying for up to 120 s" in m for m in messages) == 1, messages
        assert sum("PutGuides" in m and "answered after" in m for m in messages) == 1, messages
    finally:
        process.kill()
        process.wait()
