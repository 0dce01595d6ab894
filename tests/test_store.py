"""The guide store: the same behavioural tests on MemoryGuideStore and on RedisGuideStore over a real embedded
valkey-server; plus the embedded server's lifecycle and the Redis store's connection errors."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from npo.core.types import Sample
from npo.runtime.store import GuideStore, MemoryGuideStore, sample_from_json, sample_to_json
from services.guidance_cache.embedded import EmbeddedRedis
from services.guidance_cache.store import RedisGuideStore

REPO = Path(__file__).resolve().parents[1]


def guide(prompt_id: str, step: int = 7, logprobs: list[float] | None = None) -> Sample:
    logprobs = logprobs if logprobs is not None else [-0.5, -1.25]
    return Sample(prompt_id, list(range(3, 3 + len(logprobs))), logprobs, reward=1.0, text="42", policy_step=step)


@pytest.fixture(scope="module")
def server():
    with EmbeddedRedis() as embedded:
        yield embedded


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """Factory of empty stores of the parametrised kind (Redis ones get a fresh key prefix each)."""
    stores = []

    def make(max_mistakes: int = 4096) -> GuideStore:
        if request.param == "memory":
            store = MemoryGuideStore(max_mistakes=max_mistakes)
        else:
            prefix = f"test{len(stores)}-{request.node.name}"
            store = RedisGuideStore(request.getfixturevalue("server").url, prefix=prefix, max_mistakes=max_mistakes)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store):
    return make_store()


def _alive(pid: int) -> bool:
    """True while `pid` is a running (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


# ---------------------------------------------------------------------------------------------------------------
# Behaviour shared by both stores.


def test_both_stores_satisfy_the_protocol(store):
    assert isinstance(store, GuideStore)


def test_guides_round_trip_exactly(store):
    awkward = [0.1 - 0.3, -1e-300, -5e-324, math.nextafter(-1.0, 0.0), -123456.789012345678, -1.7e308, 0.0]
    original = Sample("p/1 é", [5, 6, 7, 8, 9, 10, 2], awkward, reward=0.75, text="x = ½\n", policy_step=40)
    unfinished = Sample("p2", [0], [-0.0], reward=0.0, text="", policy_step=40, finished=False)
    assert store.put_guides("run", 40, [original, unfinished]) == 2

    got = store.get_guides("run", 40, ["p/1 é", "p2"])
    assert got == {"p/1 é": original, "p2": unfinished}
    assert [x.hex() for x in got["p/1 é"].logprobs] == [x.hex() for x in awkward]
    assert got["p/1 é"] is not original  # a copy, not the object that was put


def test_get_guides_of_missing_ids_are_absent(store):
    store.put_guides("run", 3, [guide("a"), guide("b")])
    assert set(store.get_guides("run", 3, ["a", "zzz", "b", "a"])) == {"a", "b"}
    assert store.get_guides("run", 3, ["zzz"]) == {}
    assert store.get_guides("run", 3, []) == {}
    assert store.get_guides("run", 4, ["a"]) == {}  # other guide step
    assert store.get_guides("other-run", 3, ["a"]) == {}


def test_put_replaces_a_prompts_guide_and_counts_distinct_ids(store):
    assert store.put_guides("run", 5, [guide("a", logprobs=[-1.0]), guide("a", logprobs=[-2.0]), guide("b")]) == 2
    assert store.get_guides("run", 5, ["a"])["a"].logprobs == [
        -1.0
    ]  # a's list is both, in order; k = 1 reads the first
    assert store.put_guides("run", 5, [guide("a", logprobs=[-3.0])]) == 1
    assert store.get_guides("run", 5, ["a"])["a"].logprobs == [-3.0]
    assert store.put_guides("run", 6, []) == 0
    assert store.guide_steps("run") == [5]  # an empty batch registers no guide step
    assert store.stats("run")["guides"] == 2


def test_a_prompts_guides_are_an_ordered_list(store):
    check_guide_lists(store)


def check_guide_lists(store: GuideStore) -> None:
    """The guide-list contract (algo.guide_slots k > 1) on an empty store; test_guidance_cache_service runs it through
    the gRPC client. Several guides of one prompt in a batch are its list, in batch order."""
    first, second, third = (guide("a", logprobs=[-x]) for x in (1.0, 2.0, 3.0))
    assert store.put_guides("run", 5, [first, guide("b"), second]) == 2  # distinct prompt ids
    assert store.get_guide_lists("run", 5, ["a", "zzz", "b", "a"], 2) == {"a": [first, second], "b": [guide("b")]}
    assert store.get_guide_lists("run", 5, ["a"], 1) == {"a": [first]}
    assert store.get_guides("run", 5, ["a", "b"]) == {"a": first, "b": guide("b")}  # a k = 1 reader sees the first
    assert store.stats("run") == {"guide_steps": {5: 3}, "guides": 3, "mistakes": 0}  # every guide counts

    assert store.put_guides("run", 5, [third, first, second]) == 1  # replaces a's list, b's stays
    assert store.get_guide_lists("run", 5, ["a"], 2) == {"a": [third, first]}
    assert store.get_guide_lists("run", 5, ["a", "b"], 9) == {"a": [third, first, second], "b": [guide("b")]}
    assert store.put_guides("run", 5, [second]) == 1  # a shorter list leaves nothing of the longer one behind
    assert store.get_guide_lists("run", 5, ["a"], 3) == {"a": [second]}
    assert store.stats("run")["guide_steps"] == {5: 2}

    store.put_guides("run", 6, [first, second, guide("c")])
    assert store.stats("run") == {"guide_steps": {5: 2, 6: 3}, "guides": 5, "mistakes": 0}
    assert store.delete_guides("run", 6) == 3
    assert store.get_guide_lists("run", 6, ["a", "c"], 2) == {}
    store.put_guides("run", 7, [first, second])
    store.clear_run("run")
    assert store.stats("run") == {"guide_steps": {}, "guides": 0, "mistakes": 0}
    assert store.get_guide_lists("run", 7, ["a"], 2) == {}
    for k in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="^k: "):
            store.get_guide_lists("run", 5, ["a"], k)


def test_runs_are_namespaced(store):
    store.put_guides("run", 1, [guide("a", logprobs=[-1.0])])
    store.put_guides("run:guides:1", 1, [guide("a", logprobs=[-9.0])])
    store.record_mistakes("run", 2, ["m"])
    assert store.get_guides("run", 1, ["a"])["a"].logprobs == [-1.0]
    assert store.get_guides("run:guides:1", 1, ["a"])["a"].logprobs == [-9.0]
    assert store.get_mistakes("run:guides:1", 0, 100) == {}
    assert store.guide_steps("runx") == []

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
    assert store.delete_guides("run", 999) == 0
    assert store.guide_steps("run") == [10, 30]
    assert store.get_guides("run", 20, ["x"]) == {}
    assert store.stats("run") == {"guide_steps": {10: 1, 30: 3}, "guides": 4, "mistakes": 2}

    store.clear_run("run")
    assert store.guide_steps("run") == []
    assert store.get_guides("run", 30, ["a"]) == {}
    assert store.get_mistakes("run", 0, 100) == {}
    store.clear_run("run")  # clearing an empty run is fine


def test_mistakes_by_step_range(store):
    store.record_mistakes("run", 3, ["a", "b"])
    store.record_mistakes("run", 5, ["c"])
    store.record_mistakes("run", 9, ["d"])
    store.record_mistakes("run", 9, [])
    assert store.get_mistakes("run", 0, 100) == {"a": 3, "b": 3, "c": 5, "d": 9}
    assert store.get_mistakes("run", 3, 9) == {"a": 3, "b": 3, "c": 5}  # [lo, hi): 9 excluded
    assert store.get_mistakes("run", 4, 6) == {"c": 5}
    assert store.get_mistakes("run", 5, 5) == {}
    assert store.stats("run")["mistakes"] == 4


def test_a_later_record_moves_the_prompt(store):
    store.record_mistakes("run", 3, ["a", "b"])
    store.record_mistakes("run", 8, ["a"])
    assert store.get_mistakes("run", 0, 5) == {"b": 3}
    assert store.get_mistakes("run", 5, 10) == {"a": 8}
    assert store.stats("run")["mistakes"] == 2


def test_truncate_forgets_records_from_a_step_on(store):
    store.record_mistakes("run", 2, ["a"])
    store.record_mistakes("run", 6, ["b", "c"])
    store.record_mistakes("run", 9, ["d"])
    assert store.truncate_mistakes("run", 6) == 3
    assert store.get_mistakes("run", 0, 100) == {"a": 2}
    assert store.truncate_mistakes("run", 6) == 0
    store.record_mistakes("run", 7, ["b"])  # the replayed future records again
    assert store.get_mistakes("run", 0, 100) == {"a": 2, "b": 7}


def test_mistake_pool_is_bounded_evicting_the_oldest_steps(make_store):
    store = make_store(max_mistakes=3)
    store.record_mistakes("run", 1, ["old"])
    store.record_mistakes("run", 2, ["b", "a"])
    store.record_mistakes("run", 3, ["new"])
    assert store.get_mistakes("run", 0, 100) == {"a": 2, "b": 2, "new": 3}
    store.record_mistakes("run", 4, ["x", "y"])  # ties at step 2 go in prompt-id order: "a" first
    assert store.get_mistakes("run", 0, 100) == {"new": 3, "x": 4, "y": 4}
    store.record_mistakes("run", 5, ["new"])  # re-recording moves it, so nothing is evicted
    assert store.get_mistakes("run", 0, 100) == {"x": 4, "y": 4, "new": 5}


def test_a_rejected_batch_writes_nothing(store):
    batch = [guide("a"), guide("b"), Sample("", [1], [-0.1])]
    with pytest.raises(ValueError, match=r"guides\[2\]\.prompt_id"):
        store.put_guides("run", 1, batch)
    assert store.guide_steps("run") == []
    assert store.get_guides("run", 1, ["a", "b"]) == {}


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda s: s.put_guides("", 1, [guide("a")]), "run"),
        (lambda s: s.put_guides(None, 1, [guide("a")]), "run"),
        (lambda s: s.put_guides("run", -1, [guide("a")]), "guide_step"),
        (lambda s: s.put_guides("run", 1.0, [guide("a")]), "guide_step"),
        (lambda s: s.put_guides("run", True, [guide("a")]), "guide_step"),
        (lambda s: s.put_guides("run", 1, [guide("a"), "not a sample"]), r"guides\[1\]"),
        (lambda s: s.put_guides("run", 1, [Sample("", [], [])]), r"guides\[0\]\.prompt_id"),
        (lambda s: s.get_guides("run", -2, ["a"]), "guide_step"),
        (lambda s: s.get_guides("run", 1, "abc"), "prompt_ids"),
        (lambda s: s.get_guides("run", 1, ["a", ""]), r"prompt_ids\[1\]"),
        (lambda s: s.guide_steps(""), "run"),
        (lambda s: s.delete_guides("run", -1), "guide_step"),
        (lambda s: s.record_mistakes("run", -1, ["a"]), "step"),
        (lambda s: s.record_mistakes("run", 1, "a"), "prompt_ids"),
        (lambda s: s.record_mistakes("run", 1, [3]), r"prompt_ids\[0\]"),
        (lambda s: s.get_mistakes("run", 5, 4), "lo"),
        (lambda s: s.get_mistakes("run", -1, 4), "lo"),
        (lambda s: s.truncate_mistakes("run", -1), "from_step"),
        (lambda s: s.stats(""), "run"),
        (lambda s: s.clear_run(""), "run"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(store, call, argument):
    with pytest.raises(ValueError, match=rf"^{argument}"):
        call(store)


def test_bad_max_mistakes_is_rejected(make_store):
    with pytest.raises(ValueError, match="max_mistakes"):
        make_store(max_mistakes=0)


# ---------------------------------------------------------------------------------------------------------------
# Serialisation.


def test_sample_json_is_versioned_plain_json():
    text = sample_to_json(guide("a"))
    assert text.startswith('{"v":1,') and '"prompt_id":"a"' in text
    assert sample_from_json(text.encode()) == guide("a")
    with pytest.raises(ValueError, match="version 2"):
        sample_from_json(text.replace('"v":1', '"v":2'))
    with pytest.raises(ValueError, match="logprobs"):
        sample_from_json(text.replace('"logprobs"', '"lp"'))
    with pytest.raises(ValueError, match="data"):
        sample_from_json(b"\x80\x04pickle")


def test_core_store_does_not_import_redis():
    code = "import sys, npo.runtime.store; print(sorted(m for m in ('redis', 'valkey', 'grpc') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# Redis specifics.


def test_get_guides_is_one_round_trip_and_put_one_transaction(server):
    client = redis.Redis.from_url(server.url)
    with RedisGuideStore(client, prefix="roundtrip") as store:
        client.config_resetstat()
        store.put_guides("run", 2, [guide(f"p{i}") for i in range(50)])
        stats = client.info("commandstats")
        assert {name: s["calls"] for name, s in stats.items() if name != "cmdstat_config|resetstat"} == {
            "cmdstat_multi": 1,
            "cmdstat_hset": 1,
            "cmdstat_hdel": 1,  # of the further guides an earlier, longer list of these prompts may have left
            "cmdstat_zadd": 1,
            "cmdstat_exec": 1,
        }
        client.config_resetstat()
        assert len(store.get_guides("run", 2, [f"p{i}" for i in range(0, 100, 2)])) == 25
        calls = {name: s["calls"] for name, s in client.info("commandstats").items()}
        assert calls.get("cmdstat_hmget") == 1
        assert set(calls) <= {"cmdstat_hmget", "cmdstat_config|resetstat"}
        client.config_resetstat()
        store.put_guides("run", 3, [guide("a"), guide("a", logprobs=[-2.0])])  # a list of two (algo.guide_slots 2)
        assert len(store.get_guide_lists("run", 3, ["a", "b"], 2)["a"]) == 2
        calls = {name: s["calls"] for name, s in client.info("commandstats").items()}
        assert {name: calls.get(f"cmdstat_{name}") for name in ("multi", "hset", "hdel", "hmget", "exec")} == {
            "multi": 2, "hset": 2, "hdel": None, "hmget": 2, "exec": 2}  # fmt: skip
    assert client.ping()  # a client passed in stays open after the store is closed
    client.close()


def test_redis_store_accepts_a_password_in_the_url_or_as_an_argument():
    with EmbeddedRedis(password="s3cret:/@x", unix_socket=False) as secured:
        assert secured.url.startswith("redis://:") and secured.port is not None
        with RedisGuideStore(secured.url) as store:
            store.put_guides("run", 1, [guide("a")])
        bare_url = f"redis://127.0.0.1:{secured.port}"
        with RedisGuideStore(bare_url, password="s3cret:/@x") as store:
            assert set(store.get_guides("run", 1, ["a"])) == {"a"}
        with pytest.raises(ConnectionError, match=rf"{bare_url}.*password"):
            RedisGuideStore(bare_url, password="wrong")
        with pytest.raises(ValueError, match="password"):
            RedisGuideStore(secured.url, password="other")


def test_unreachable_server_raises_a_clear_connection_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"cannot reach Redis at redis://127\.0\.0\.1:{port}") as info:
        RedisGuideStore(f"redis://127.0.0.1:{port}")
    assert time.monotonic() - started < 5.0
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained redis-py traceback
    with pytest.raises(ValueError, match="url"):
        RedisGuideStore("http://127.0.0.1:6379")


# ---------------------------------------------------------------------------------------------------------------
# The embedded server's lifecycle.


def test_embedded_redis_keeps_nothing_on_disk_and_stop_really_stops(server):
    embedded = EmbeddedRedis()
    assert embedded.is_running() and _alive(embedded.pid)
    assert embedded.socket_path is not None and embedded.socket_path.is_socket()
    assert oct(embedded.socket_path.stat().st_mode & 0o777) == "0o700"
    with RedisGuideStore(embedded.url) as store:
        store.put_guides("run", 1, [guide("a")])
    assert sorted(p.name for p in embedded.directory.iterdir()) == ["redis.sock", "server.log"]

    embedded.stop()
    assert not embedded.is_running() and not _alive(embedded.pid)
    assert not embedded.socket_path.exists() and not embedded.directory.exists()
    embedded.stop()  # idempotent
    with pytest.raises(ConnectionError, match="cannot reach Redis at unix://"):
        RedisGuideStore(embedded.url)
    assert server.is_running()  # other servers are untouched


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_embedded_redis_dies_with_its_parent(ending):
    code = (
        "import os, signal, sys\n"
        "from services.guidance_cache.embedded import EmbeddedRedis\n"
        "server = EmbeddedRedis()\n"
        "print(server.pid, server.directory, flush=True)\n"
        f"os.kill(os.getpid(), signal.SIGKILL) if {ending == 'sigkill'} else sys.exit(0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == (-signal.SIGKILL if ending == "sigkill" else 0), result.stderr
    pid, directory = result.stdout.split()
    deadline = time.monotonic() + 5.0
    while _alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(int(pid))
    if ending == "exit":  # a clean exit also removes the private directory
        assert not os.path.exists(directory)
    shutil.rmtree(directory, ignore_errors=True)  # after SIGKILL nobody could


# ---------------------------------------------------------------------------------------------------------------
# Faults and data integrity of the Redis store: an append-only data folder, a restarted server, bad guide values.


def test_embedded_redis_with_a_data_dir_keeps_every_key_across_restarts(tmp_path):
    data = tmp_path / "data"
    guides = [guide(f"p{i}", logprobs=[-0.5] * (i + 1)) for i in range(30)]
    with EmbeddedRedis(data_dir=data) as embedded, RedisGuideStore(embedded.url) as store:
        store.put_guides("run", 3, guides)
        store.record_mistakes("run", 2, ["m1", "m2"])
        os.kill(embedded.pid, signal.SIGKILL)  # no clean shutdown: only what was fsynced before each answer
        deadline = time.monotonic() + 5.0
        while embedded.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert embedded.exit_code == -signal.SIGKILL
        assert not store.ping()
        with pytest.raises(ConnectionError, match="cannot reach Redis at unix://"):
            store.get_guides("run", 3, ["p0"])
        assert embedded.restart() < 5.0  # same socket: the store's URL still works
        assert store.ping()
        assert store.get_guides("run", 3, [g.prompt_id for g in guides]) == {g.prompt_id: g for g in guides}
        store.record_mistakes("run", 4, ["m3"])
    assert (data / "appendonlydir").is_dir()
    with EmbeddedRedis(data_dir=data) as again, RedisGuideStore(again.url) as store:  # a new server on the folder
        assert store.stats("run") == {"guide_steps": {3: 30}, "guides": 30, "mistakes": 3}
        assert store.get_mistakes("run", 0, 10) == {"m1": 2, "m2": 2, "m3": 4}


def test_a_data_dir_serves_one_server_at_a_time(tmp_path):
    with EmbeddedRedis(data_dir=tmp_path / "data"):
        with pytest.raises(RuntimeError, match=r"data folder .*data is in use by another server"):
            EmbeddedRedis(data_dir=tmp_path / "data", start_timeout=0.3)
    with EmbeddedRedis(data_dir=tmp_path / "data") as next_one:  # free again once the first stopped
        assert next_one.is_running()
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedRedis(data_dir=tmp_path / "data", appendfsync="no")


@pytest.mark.parametrize(
    "bad, message",
    [
        (Sample("b", [3], [math.nan]), "guides[1].logprobs[0]: nan is not a finite log-prob (prompt 'b')"),
        (Sample("b", [3], [0.5]), "guides[1].logprobs[0]: 0.5 > 0 is not a log-prob (tolerance 1e-06) (prompt 'b')"),
        (Sample("b", [3], [-0.5], math.inf), "guides[1].reward: inf is not a finite reward (prompt 'b')"),
        (Sample("b", [-1], [-0.5]), "guides[1].response_ids[0]: token id -1 is negative (prompt 'b')"),
        (Sample("b", [], []), "guides[1].response_ids: empty response (a guide needs at least one token) (prompt 'b')"),
    ],
)
def test_the_redis_store_refuses_guides_the_learner_cannot_train_on(server, bad, message):
    """The embedded run writes through RedisGuideStore directly (no gRPC): the same check, before any write."""
    with RedisGuideStore(server.url, prefix="bad-values") as store:
        with pytest.raises(ValueError) as info:
            store.put_guides("run", 1, [guide("a"), bad])
        assert str(info.value) == message
        assert redis.Redis.from_url(server.url).keys("bad-values:*") == []


@pytest.mark.parametrize(
    "reply, raised",
    [
        ("LOADING Redis is loading the dataset in memory", ConnectionError),
        ("MISCONF Errors writing to disk", ConnectionError),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", redis.ResponseError),
    ],
)
def test_error_replies_of_a_server_that_cannot_serve_now_are_connection_errors(server, reply, raised):
    """ConnectionError is answered UNAVAILABLE by the service (and retried by its clients); a command error is not."""

    class Replying(redis.Redis):
        def hmget(self, *args, **kwargs):
            raise redis.ResponseError(reply)

    with RedisGuideStore(Replying.from_url(server.url), prefix="replies") as store:
        with pytest.raises(raised) as info:
            store.get_guides("run", 1, ["a"])
    if raised is ConnectionError:
        assert str(info.value) == f"guidance cache: Redis at {store.address} cannot serve now: {reply}"
