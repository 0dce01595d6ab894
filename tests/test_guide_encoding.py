"""Guides in Redis are npo.v1.Sample protobuf bytes (GetGuides concatenates them); values written in the older
JSON form are still read, by the store and through the service, bit-exact."""

import math

import pytest
import redis

from npo.core.types import Sample
from npo.runtime.store import sample_to_json
from services.codec import frame_samples, sample_to_message, split_samples
from services.guidance_cache.client import GuidanceCacheClient
from services.guidance_cache.embedded import EmbeddedRedis
from services.guidance_cache.server import serve
from services.guidance_cache.store import RedisGuideStore
from services.proto.npo.v1 import guidance_cache_pb2 as pb

GUIDES = [
    Sample("p1", [5, 6, 2], [-0.1, float("-inf"), -1e-300], 1.0, "12", 40, True),
    Sample("p2", [7], [float("nan")], 0.5, "ünï", 40, False),
    Sample("p3", [], [], 0.0, "", 40, True),
]
VALID_GUIDES = [
    Sample("p1", [5, 6, 2], [-0.1, -1.7e308, -1e-300], 1.0, "12", 40, True),
    Sample("p2", [7], [-0.0], 0.5, "ünï", 40, False),
    Sample("p3", [0], [-5e-324], 0.0, "", 40, True),
]
"""What a put accepts (finite log-probs <= 0, a non-empty response: services.codec.check_guide); GUIDES, with NaN,
-inf and an empty response, are still read back exactly when an older version stored them."""


@pytest.fixture
def served():
    with EmbeddedRedis() as server, RedisGuideStore(server.url) as store:
        grpc_server, port = serve(store)
        with GuidanceCacheClient(f"127.0.0.1:{port}") as client:
            yield server, store, client
        grpc_server.stop(grace=None)


def same(a, b):
    assert (a.prompt_id, a.response_ids, a.reward, a.text, a.policy_step, a.finished) == (
        b.prompt_id, b.response_ids, b.reward, b.text, b.policy_step, b.finished)  # fmt: skip
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert (math.isnan(x) and math.isnan(y)) or (x == y and math.copysign(1, x) == math.copysign(1, y))


def test_guides_are_stored_as_protobuf_and_read_back_exactly(served):
    server, store, client = served
    store.put_guides("r", 40, VALID_GUIDES)
    raw = redis.Redis.from_url(server.url).hget("npo:r:guides:40", "p1")
    assert raw[:1] == b"\x0a"  # a serialized Sample, not JSON
    for reader in (store, client):
        got = reader.get_guides("r", 40, ["p3", "p1", "missing", "p2", "p1"])
        assert list(got) == ["p3", "p1", "p2"]
        for sample in VALID_GUIDES:
            same(got[sample.prompt_id], sample)


def test_values_in_the_older_json_form_are_still_read(served):
    server, store, client = served
    redis.Redis.from_url(server.url).hset("npo:r:guides:7", mapping={g.prompt_id: sample_to_json(g) for g in GUIDES})
    for reader in (store, client):
        got = reader.get_guides("r", 7, ["p1", "p2", "p3"])
        for sample in GUIDES:
            same(got[sample.prompt_id], sample)
        lists = reader.get_guide_lists("r", 7, ["p1", "p2", "p3"], 2)  # a k = 2 reader gets the one guide stored
        for sample in GUIDES:
            (got,) = lists[sample.prompt_id]
            same(got, sample)


def test_a_client_that_decodes_responses_is_refused(served):
    server, _, _ = served
    with pytest.raises(ValueError, match="decode responses"):
        RedisGuideStore(redis.Redis.from_url(server.url, decode_responses=True))


def test_further_guides_are_framed_samples_and_read_back_in_order(served):
    # a prompt's 2nd, 3rd ... guides are kept in the `:more` hash as a GetGuidesResponse's bytes
    server, store, client = served
    long_text = Sample("p1", [5, 6, 2], [-0.1, -0.2, -0.3], 1.0, "x" * 300, 40, True)  # a two-byte length varint
    store.put_guides("r", 40, [VALID_GUIDES[0], long_text, VALID_GUIDES[1], VALID_GUIDES[0]])
    framed = redis.Redis.from_url(server.url).hget("npo:r:guides:40:more", "p1")
    assert [m.text for m in pb.GetGuidesResponse.FromString(framed).guides] == ["x" * 300, "12"]
    assert split_samples(framed) == [sample_to_message(s).SerializeToString() for s in (long_text, VALID_GUIDES[0])]
    assert frame_samples(split_samples(framed)) == framed
    for reader in (store, client):
        got = reader.get_guide_lists("r", 40, ["p2", "p1"], 3)
        assert list(got) == ["p2", "p1"] and [g.text for g in got["p1"]] == ["12", "x" * 300, "12"]
    for bad in (b"\x12\x01a", b"\x0a\x05ab", b"\x0a\x80"):
        with pytest.raises(ValueError, match="framed samples"):
            split_samples(bad)
