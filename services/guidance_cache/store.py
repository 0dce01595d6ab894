"""RedisGuideStore: the GuideStore (npo/runtime/store.py) on a Redis-protocol server, through redis-py.

Keys of one run (`run` is used verbatim; steps are decimal integers, so two runs' keys never collide):
- `{prefix}:{run}:guides:{guide_step}`  hash prompt_id -> the prompt's first guide as a serialized npo.v1.Sample
                                         protobuf (values in the older JSON form, npo.runtime.store.sample_to_json,
                                         are still read)
- `{prefix}:{run}:guides:{guide_step}:more`  hash prompt_id -> the prompt's further guides (2nd, 3rd, ...; only for
                                         a prompt given several), their Sample protobufs framed as repeated field 1
                                         (services.codec.frame_samples: the bytes of a GetGuidesResponse)
- `{prefix}:{run}:guide_steps`           sorted set of guide steps (member = score = the step)
- `{prefix}:{run}:mistakes`              sorted set prompt_id, scored by the step it last failed at

A read is one round trip (get_guides is one HMGET; get_guide_lists with k > 1 one MULTI of two HMGETs). Storing
the protobuf bytes lets the gRPC service answer GetGuides by concatenating them (`get_guides_raw`), with no
per-guide work in Python. The first guide's hash is the layout written before lists existed, so a k = 1 reader
reads old and new data alike, and stats and delete_guides count every guide of a list. A write that touches several
keys is one MULTI/EXEC pipeline, so a put never leaves a half-written batch and the step index never names a
missing hash.

    with RedisGuideStore("unix:///tmp/npo/redis.sock") as store:
        store.put_guides("run-1", 40, guides)
        store.get_guides("run-1", 40, ["p3", "p7"])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from redis.connection import parse_url

from npo.core.types import Sample
from npo.runtime.store import (
    check_guides,
    check_k,
    check_max_mistakes,
    check_prompt_ids,
    check_run,
    check_step,
    sample_from_json,
)
from services.codec import check_guide, frame_samples, sample_from_message, sample_to_message, split_samples
from services.proto.npo.v1 import common_pb2

JSON_MARK = b"{"
"""First byte of a value in the older JSON form (a serialized Sample starts with its field-1 tag, 0x0a)."""


def check_step_range(lo: int, hi: int) -> None:
    """The steps [lo, hi) of get_mistakes: both >= 0 and lo <= hi, else ValueError naming the bad one (the checks of
    npo.runtime.store.MemoryGuideStore.get_mistakes)."""
    check_step("lo", lo)
    check_step("hi", hi)
    if lo > hi:
        raise ValueError(f"lo: must be <= hi, got lo={lo}, hi={hi}")


def encode_guide(sample: Sample) -> bytes:
    """The stored value of a guide: npo.v1.Sample protobuf bytes (log-probs as doubles: bit-exact)."""
    return sample_to_message(sample).SerializeToString()


def guide_message(value: bytes) -> common_pb2.Sample:
    """The npo.v1.Sample of a stored value, either form; ValueError when it is neither."""
    if value[:1] == JSON_MARK:
        return sample_to_message(sample_from_json(value))
    try:
        return common_pb2.Sample.FromString(value)
    except Exception as exc:  # noqa: BLE001 - google.protobuf.message.DecodeError
        raise ValueError(f"stored guide: not a serialized Sample ({exc})") from None


def decode_guide(value: bytes) -> Sample:
    """The Sample of a stored value, either form."""
    if value[:1] == JSON_MARK:
        return sample_from_json(value)
    return sample_from_message(guide_message(value), "stored guide")


def _count_framed(values: Sequence[bytes]) -> int:
    """How many guides the stored values of a `:more` hash hold together."""
    return sum(len(split_samples(v)) for v in values)


def _text(value: bytes | str) -> str:
    """A reply item as str, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value


def _address(client: redis.Redis) -> str:
    """Where `client` connects, for error messages (never includes a password)."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def connect(
    url: str, *, password: str | None = None, connect_timeout: float = 5.0, socket_timeout: float | None = None
) -> redis.Redis:
    """A redis-py client for a `redis://host:port[/db]`, `rediss://...` or `unix:///path` URL; a command that gets no
    answer within `socket_timeout` seconds (None: wait) fails with a ConnectionError, as one to a server that is down
    does (unless the URL sets ?socket_timeout=).

    A password may be in the URL (`redis://:secret@host:6379`, `unix://:secret@/path/redis.sock`, or
    `?password=secret`) or in `password`; when both are given they must agree.
    """
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"url: expected a redis://, rediss:// or unix:// URL, got {url!r}")
    options = parse_url(url)
    if password is not None:
        if options.get("password") not in (None, password):
            raise ValueError("password: differs from the password given in the URL")
        options["password"] = password
    options.setdefault("socket_connect_timeout", connect_timeout)
    options.setdefault("socket_timeout", socket_timeout)
    return redis.Redis.from_pool(redis.ConnectionPool(**options))


TRANSIENT_REPLIES = ("LOADING", "MISCONF", "READONLY", "TRYAGAIN", "MASTERDOWN", "ERR Errors writing to the AOF")
"""Starts of error replies of a server that cannot serve for now (loading its data, a disk that refuses writes, a
replica during a failover ...), as opposed to a wrong command."""
PING_TIMEOUT_S = 1.0
"""How long `RedisGuideStore.ping` waits for an answer."""


class RedisGuideStore:
    """A GuideStore on a Redis-protocol server (Redis >= 5 or Valkey).

    `url_or_client` is a URL (see `connect`) or an existing redis.Redis; a URL's client is owned by the store and
    closed by `close()`, a given client is left open. Construction sends a PING, so an unreachable server fails
    here with a ConnectionError that names its address. While the server is down every call fails at once with a
    builtin ConnectionError naming it (also when a command gets no answer within `command_timeout` seconds, or the
    server is still loading its data); redis-py connects again on the next call, so nothing needs reopening once
    it is back. `ping()` says whether it answers now.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        *,
        prefix: str = "npo",
        max_mistakes: int = 4096,
        password: str | None = None,
        connect_timeout: float = 5.0,
        command_timeout: float | None = 5.0,
    ) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix: expected a non-empty key prefix, got {prefix!r}")
        self.prefix = prefix
        self.max_mistakes = check_max_mistakes(max_mistakes)
        if isinstance(url_or_client, redis.Redis):
            if password is not None:
                raise ValueError("password: give it to the redis.Redis client, not alongside one")
            if url_or_client.connection_pool.connection_kwargs.get("decode_responses"):
                raise ValueError("url_or_client: the client must not decode responses (guides are stored as bytes)")
            self._client, self._owns_client = url_or_client, False
            self._probe = url_or_client
        else:
            options = {"password": password, "connect_timeout": connect_timeout}
            self._client = connect(url_or_client, **options, socket_timeout=command_timeout)
            self._owns_client = True
            quick = {"connect_timeout": min(connect_timeout, PING_TIMEOUT_S), "socket_timeout": PING_TIMEOUT_S}
            self._probe = connect(url_or_client, **{**options, **quick})
        self.address = _address(self._client)
        try:
            with self._errors():
                self._client.ping()
        except BaseException:
            self.close()
            raise

    # -- keys and errors -------------------------------------------------------------------------------------------

    def _guides_key(self, run: str, guide_step: int) -> str:
        return f"{self.prefix}:{run}:guides:{guide_step}"

    def _more_key(self, run: str, guide_step: int) -> str:
        return f"{self.prefix}:{run}:guides:{guide_step}:more"

    def _steps_key(self, run: str) -> str:
        return f"{self.prefix}:{run}:guide_steps"

    def _mistakes_key(self, run: str) -> str:
        return f"{self.prefix}:{run}:mistakes"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn redis-py's connection failures, and the error replies of a server that cannot serve for now
        (TRANSIENT_REPLIES, a transaction it aborted), into a builtin ConnectionError naming the server's address, which
        the gRPC service answers with UNAVAILABLE (and its clients retry)."""
        try:
            yield
        except redis.AuthenticationError as exc:
            raise ConnectionError(f"guidance cache: Redis at {self.address} refused the password: {exc}") from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ConnectionError(f"guidance cache: cannot reach Redis at {self.address}: {exc}") from None
        except redis.ResponseError as exc:
            if isinstance(exc, redis.exceptions.ExecAbortError) or str(exc).startswith(TRANSIENT_REPLIES):
                raise ConnectionError(f"guidance cache: Redis at {self.address} cannot serve now: {exc}") from None
            raise

    # -- guides ----------------------------------------------------------------------------------------------------

    def put_guides(self, run: str, guide_step: int, guides: Sequence[Sample]) -> int:
        """See npo.runtime.store.GuideStore.put_guides (one MULTI: HSET of the first guides, HSET of the further
        guides of prompts given several and HDEL of those of the others, ZADD of the step). A guide the learner could
        not train on (services.codec.check_guide: NaN/inf or positive log-probs, a NaN reward, a negative token id, an
        empty response) is refused with a ValueError before anything is written."""
        check_run(run)
        check_step("guide_step", guide_step)
        for i, guide in enumerate(guides if isinstance(guides, Sequence) else ()):
            if isinstance(guide, Sample):
                check_guide(guide, f"guides[{i}]")
        encoded = check_guides(guides, encode_guide)
        if not encoded:
            return 0
        more = {prompt_id: frame_samples(values[1:]) for prompt_id, values in encoded.items() if len(values) > 1}
        single = [prompt_id for prompt_id, values in encoded.items() if len(values) == 1]
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.hset(self._guides_key(run, guide_step), mapping={p: values[0] for p, values in encoded.items()})
            if more:
                pipe.hset(self._more_key(run, guide_step), mapping=more)
            if single:
                pipe.hdel(self._more_key(run, guide_step), *single)
            pipe.zadd(self._steps_key(run), {str(guide_step): guide_step})
            pipe.execute()
        return len(encoded)

    def get_guides(self, run: str, guide_step: int, prompt_ids: Sequence[str]) -> dict[str, Sample]:
        """See npo.runtime.store.GuideStore.get_guides (one HMGET)."""
        check_run(run)
        check_step("guide_step", guide_step)
        wanted = list(dict.fromkeys(check_prompt_ids("prompt_ids", prompt_ids)))
        if not wanted:
            return {}
        values = self._hmget(run, guide_step, wanted)
        return {prompt_id: decode_guide(v) for prompt_id, v in zip(wanted, values, strict=True) if v is not None}

    def get_guide_lists(self, run: str, guide_step: int, prompt_ids: Sequence[str], k: int) -> dict[str, list[Sample]]:
        """See npo.runtime.store.GuideStore.get_guide_lists (k = 1: one HMGET; else one MULTI of two HMGETs)."""
        check_run(run)
        check_step("guide_step", guide_step)
        wanted = list(dict.fromkeys(check_prompt_ids("prompt_ids", prompt_ids)))
        check_k(k)
        if not wanted:
            return {}
        firsts, mores = self._lists(run, guide_step, wanted, k)
        return {
            prompt_id: [decode_guide(first), *(decode_guide(v) for v in more)]
            for prompt_id, first, more in zip(wanted, firsts, mores, strict=True)
            if first is not None
        }

    def get_guides_raw(self, run: str, guide_step: int, prompt_ids: Sequence[str], k: int = 1) -> list[bytes]:
        """The stored guides of get_guide_lists (k = 1: of get_guides) as npo.v1.Sample protobuf bytes, prompts in
        the order of their first request and each prompt's guides in stored order, absent ones left out (k = 1: one
        HMGET; values in the JSON form are converted)."""
        check_run(run)
        check_step("guide_step", guide_step)
        wanted = list(dict.fromkeys(check_prompt_ids("prompt_ids", prompt_ids)))
        check_k(k)
        if not wanted:
            return []
        firsts, mores = self._lists(run, guide_step, wanted, k)
        raw = []
        for first, more in zip(firsts, mores, strict=True):
            if first is not None:
                raw.append(first if first[:1] != JSON_MARK else guide_message(first).SerializeToString())
                raw.extend(more)
        return raw

    def _lists(
        self, run: str, guide_step: int, wanted: list[str], k: int
    ) -> tuple[list[bytes | None], list[list[bytes]]]:
        """Per wanted prompt: the first guide's stored value (None: no guide) and at most k - 1 further guides'
        Sample bytes."""
        if k == 1:
            return self._hmget(run, guide_step, wanted), [[] for _ in wanted]
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.hmget(self._guides_key(run, guide_step), wanted)
            pipe.hmget(self._more_key(run, guide_step), wanted)
            firsts, mores = pipe.execute()
        firsts = [v.encode() if isinstance(v, str) else v for v in firsts]
        return firsts, [split_samples(m)[: k - 1] if m and f is not None else [] for f, m in zip(firsts, mores)]

    def _hmget(self, run: str, guide_step: int, wanted: list[str]) -> list[bytes | None]:
        with self._errors():
            values = self._client.hmget(self._guides_key(run, guide_step), wanted)
        return [v.encode() if isinstance(v, str) else v for v in values]

    def guide_steps(self, run: str) -> list[int]:
        """See npo.runtime.store.GuideStore.guide_steps."""
        check_run(run)
        with self._errors():
            members = self._client.zrange(self._steps_key(run), 0, -1)
        return sorted(int(m) for m in members)

    def delete_guides(self, run: str, guide_step: int) -> int:
        """See npo.runtime.store.GuideStore.delete_guides (one MULTI: HLEN, HVALS of the further guides, DEL, ZREM)."""
        check_run(run)
        check_step("guide_step", guide_step)
        key, more = self._guides_key(run, guide_step), self._more_key(run, guide_step)
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.hlen(key)
            pipe.hvals(more)
            pipe.delete(key, more)
            pipe.zrem(self._steps_key(run), str(guide_step))
            count, further, _, _ = pipe.execute()
        return int(count) + _count_framed(further)

    # -- mistake pool ----------------------------------------------------------------------------------------------

    def record_mistakes(self, run: str, step: int, prompt_ids: Sequence[str]) -> None:
        """See npo.runtime.store.GuideStore.record_mistakes (one MULTI: ZADD + ZREMRANGEBYRANK of all but the newest
        max_mistakes; a sorted set orders ties by member, as npo.runtime.store.oldest_first does)."""
        check_run(run)
        check_step("step", step)
        ids = check_prompt_ids("prompt_ids", prompt_ids)
        if not ids:
            return
        key = self._mistakes_key(run)
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.zadd(key, dict.fromkeys(ids, step))
            pipe.zremrangebyrank(key, 0, -(self.max_mistakes + 1))
            pipe.execute()

    def get_mistakes(self, run: str, lo: int, hi: int) -> dict[str, int]:
        """See npo.runtime.store.GuideStore.get_mistakes (one ZRANGEBYSCORE lo (hi)."""
        check_run(run)
        check_step_range(lo, hi)
        if lo == hi:
            return {}
        with self._errors():
            pairs = self._client.zrangebyscore(self._mistakes_key(run), lo, f"({hi}", withscores=True)
        return {_text(member): int(score) for member, score in pairs}

    def truncate_mistakes(self, run: str, from_step: int) -> int:
        """See npo.runtime.store.GuideStore.truncate_mistakes (one ZREMRANGEBYSCORE from_step +inf)."""
        check_run(run)
        check_step("from_step", from_step)
        with self._errors():
            return int(self._client.zremrangebyscore(self._mistakes_key(run), from_step, "+inf"))

    # -- whole run -------------------------------------------------------------------------------------------------

    def stats(self, run: str) -> dict[str, Any]:
        """See npo.runtime.store.GuideStore.stats."""
        check_run(run)
        steps = self.guide_steps(run)
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            for step in steps:
                pipe.hlen(self._guides_key(run, step))
                pipe.hvals(self._more_key(run, step))
            pipe.zcard(self._mistakes_key(run))
            *replies, mistakes = pipe.execute()
        lengths = [int(n) + _count_framed(further) for n, further in zip(replies[::2], replies[1::2], strict=True)]
        counts = {step: n for step, n in zip(steps, lengths, strict=True) if n}
        return {"guide_steps": counts, "guides": sum(counts.values()), "mistakes": int(mistakes)}

    def clear_run(self, run: str) -> None:
        """See npo.runtime.store.GuideStore.clear_run (one DEL of every key of the run)."""
        check_run(run)
        steps = self.guide_steps(run)
        keys = [key for step in steps for key in (self._guides_key(run, step), self._more_key(run, step))]
        keys += [self._steps_key(run), self._mistakes_key(run)]
        with self._errors():
            self._client.delete(*keys)

    def ping(self) -> bool:
        """True when the server answers PING now (within PING_TIMEOUT_S with a URL's client), False otherwise;
        never raises. A separate connection, so a check does not wait behind the calls in flight."""
        try:
            return bool(self._probe.ping())
        except (redis.RedisError, OSError):  # down, loading its AOF, refusing the password ...
            return False

    def close(self) -> None:
        """Close the connection pools if this store created them (a client passed in is left to its owner)."""
        if self._owns_client:
            self._client.close()
            self._probe.close()

    def __enter__(self) -> RedisGuideStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
