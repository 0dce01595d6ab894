"""The guidance-trajectory store: verified guides by (run, guide_step, prompt_id) and the mistake pool.

One small Protocol, `GuideStore`, with two implementations: `MemoryGuideStore` here (pure Python, for tests of the
loop without servers) and `services.guidance_cache.store.RedisGuideStore` (the production one, also used by the
embedded runtime on an embedded Redis-protocol server). Both keep samples as the same versioned JSON text
(`sample_to_json` / `sample_from_json`, never pickle) and behave identically, ties included.

Every key lives in a run namespace `run`, so two runs never see each other's guides or mistakes:
- guides: `put_guides(run, t, samples)` stores the verified responses of the guide policy pi^(t), an ordered list
  of guides per prompt (several samples of one prompt in a batch are its list, in batch order; algo.guide_slots k
  > 1 uses them); the NPO segment reads them back for its gated prompts with `get_guide_lists(run, t, prompt_ids,
  k)` (each prompt's first k) or `get_guides(run, t, prompt_ids)` (each prompt's first guide, the k = 1 reader).
- mistake pool B: `record_mistakes(run, step, prompt_ids)` notes prompts that failed at `step` (a prompt's latest
  record wins); AutoNPO reads B_Delta = `get_mistakes(run, t - Delta, t)`; a rollback to s forgets the records of
  the abandoned future with `truncate_mistakes(run, s)`. The pool keeps at most `max_mistakes` prompts, evicting
  the oldest steps first (ties by prompt id).

This module never imports redis.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from npo.core.types import Sample

SAMPLE_JSON_VERSION = 1
"""Version field written into every serialised Sample; readers reject other versions."""

_SAMPLE_FIELDS = ("prompt_id", "response_ids", "logprobs", "reward", "text", "policy_step", "finished")


def sample_to_json(sample: Sample) -> str:
    """Serialise a Sample to compact JSON text with a version field `v`.

    Floats are written with Python's shortest round-trip repr, so logprobs and reward come back bit-exact;
    -inf/nan log-probs are written as the JSON extensions -Infinity/NaN (read back by `sample_from_json`).
    """
    if not isinstance(sample, Sample):
        raise ValueError(f"sample: expected a Sample, got {type(sample).__name__}")
    record = {"v": SAMPLE_JSON_VERSION}
    record.update({name: getattr(sample, name) for name in _SAMPLE_FIELDS})
    return json.dumps(record, separators=(",", ":"))


def sample_from_json(data: str | bytes) -> Sample:
    """Inverse of `sample_to_json`; raises ValueError on a foreign version or a missing field."""
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"data: not a serialised Sample ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError("data: not a serialised Sample (expected a JSON object)")
    if record.get("v") != SAMPLE_JSON_VERSION:
        raise ValueError(f"data: unsupported Sample version {record.get('v')!r} (expected {SAMPLE_JSON_VERSION})")
    missing = [name for name in _SAMPLE_FIELDS if name not in record]
    if missing:
        raise ValueError(f"data: serialised Sample lacks {', '.join(missing)}")
    return Sample(
        prompt_id=str(record["prompt_id"]),
        response_ids=[int(t) for t in record["response_ids"]],
        logprobs=[float(x) for x in record["logprobs"]],
        reward=float(record["reward"]),
        text=str(record["text"]),
        policy_step=int(record["policy_step"]),
        finished=bool(record["finished"]),
    )


# ----------------------------------------------------------------------------------------------------------------
# Argument checks shared by both stores, so that they reject the same inputs with the same messages.


def check_run(run: str) -> str:
    """Return `run` if it is a non-empty string, else raise ValueError naming `run`."""
    if not isinstance(run, str) or not run:
        raise ValueError(f"run: expected a non-empty run name, got {run!r}")
    return run


def check_step(name: str, step: int) -> int:
    """Return `step` if it is a non-negative int, else raise ValueError naming the argument `name`."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{name}: expected a non-negative integer step, got {step!r}")
    return step


def check_prompt_ids(name: str, prompt_ids: Sequence[str]) -> list[str]:
    """Return `prompt_ids` as a list of non-empty strings, else raise ValueError naming the argument `name`."""
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise ValueError(f"{name}: expected a sequence of prompt ids, got {type(prompt_ids).__name__}")
    for i, prompt_id in enumerate(prompt_ids):
        if not isinstance(prompt_id, str) or not prompt_id:
            raise ValueError(f"{name}[{i}]: expected a non-empty prompt id, got {prompt_id!r}")
    return list(prompt_ids)


def check_guides(guides: Sequence[Sample], encode: Callable[[Sample], Any] = sample_to_json) -> dict[str, list[Any]]:
    """Serialise a batch of guides to {prompt_id: [encode(guide), ...]} (JSON text by default): each prompt's guides
    in batch order, prompts in the order of their first guide.

    Raises ValueError naming `guides[i]` for an item that is not a Sample or has an empty prompt_id.
    """
    if not isinstance(guides, Sequence):
        raise ValueError(f"guides: expected a sequence of Samples, got {type(guides).__name__}")
    encoded: dict[str, list[Any]] = {}
    for i, guide in enumerate(guides):
        if not isinstance(guide, Sample):
            raise ValueError(f"guides[{i}]: expected a Sample, got {type(guide).__name__}")
        if not isinstance(guide.prompt_id, str) or not guide.prompt_id:
            raise ValueError(f"guides[{i}].prompt_id: expected a non-empty prompt id, got {guide.prompt_id!r}")
        encoded.setdefault(guide.prompt_id, []).append(encode(guide))
    return encoded


def check_k(k: int) -> int:
    """Return `k` (guides wanted per prompt) if it is a positive int, else raise ValueError naming `k`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive number of guides per prompt, got {k!r}")
    return k


def check_max_mistakes(max_mistakes: int) -> int:
    """Return `max_mistakes` if it is a positive int, else raise ValueError naming it."""
    if isinstance(max_mistakes, bool) or not isinstance(max_mistakes, int) or max_mistakes < 1:
        raise ValueError(f"max_mistakes: expected a positive integer, got {max_mistakes!r}")
    return max_mistakes


def oldest_first(mistakes: dict[str, int]) -> list[str]:
    """Prompt ids ordered for eviction: by step, then by prompt id (the order of a Redis sorted set)."""
    return sorted(mistakes, key=lambda prompt_id: (mistakes[prompt_id], prompt_id))


# ----------------------------------------------------------------------------------------------------------------


@runtime_checkable
class GuideStore(Protocol):
    """Guides by (run, guide_step, prompt_id) -> an ordered list, and the mistake pool by (run, prompt_id) -> step."""

    def put_guides(self, run: str, guide_step: int, guides: Sequence[Sample]) -> int:
        """Store `guides` under guide step `guide_step`, keyed by prompt_id: the guides of one prompt in the batch
        become its list, in batch order, replacing the list stored earlier; all or none are written. Returns the
        number of distinct prompt ids written (0 for an empty batch, which writes nothing)."""
        ...

    def get_guides(self, run: str, guide_step: int, prompt_ids: Sequence[str]) -> dict[str, Sample]:
        """The first stored guide of each of `prompt_ids` at `guide_step`; ids without a guide are absent."""
        ...

    def get_guide_lists(self, run: str, guide_step: int, prompt_ids: Sequence[str], k: int) -> dict[str, list[Sample]]:
        """The first min(k, stored) guides of each of `prompt_ids` at `guide_step`, in stored order (k >= 1); ids
        without a guide are absent. With k = 1 each list holds get_guides' guide."""
        ...

    def guide_steps(self, run: str) -> list[int]:
        """Guide steps that hold at least one guide, ascending."""
        ...

    def delete_guides(self, run: str, guide_step: int) -> int:
        """Forget every guide of `guide_step`; returns how many guides (all of every prompt's list) were deleted."""
        ...

    def record_mistakes(self, run: str, step: int, prompt_ids: Sequence[str]) -> None:
        """Note that `prompt_ids` failed at `step`; a prompt's latest record replaces its earlier one. Keeps at most
        max_mistakes prompts, evicting the oldest steps first (ties: smallest prompt id first)."""
        ...

    def get_mistakes(self, run: str, lo: int, hi: int) -> dict[str, int]:
        """Mistake pool restricted to steps in [lo, hi): {prompt_id: step}."""
        ...

    def truncate_mistakes(self, run: str, from_step: int) -> int:
        """Forget the records at steps >= from_step (used on rollback); returns how many were removed."""
        ...

    def stats(self, run: str) -> dict[str, Any]:
        """{"guide_steps": {guide_step: count}, "guides": total guides, "mistakes": prompts in the pool}; a prompt
        with a list of m guides counts m."""
        ...

    def clear_run(self, run: str) -> None:
        """Forget every guide and mistake of `run`."""
        ...

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


class MemoryGuideStore:
    """A GuideStore in this process's memory (thread-safe). Samples are kept as their JSON text, so reads return
    fresh copies and the serialisation path is the same as the Redis store's."""

    def __init__(self, *, max_mistakes: int = 4096) -> None:
        self.max_mistakes = check_max_mistakes(max_mistakes)
        self._guides: dict[str, dict[int, dict[str, list[str]]]] = {}  # run -> guide_step -> prompt_id -> [JSON]
        self._mistakes: dict[str, dict[str, int]] = {}  # run -> prompt_id -> step
        self._lock = threading.Lock()

    def put_guides(self, run: str, guide_step: int, guides: Sequence[Sample]) -> int:
        """See GuideStore.put_guides."""
        check_run(run)
        check_step("guide_step", guide_step)
        encoded = check_guides(guides)
        if not encoded:
            return 0
        with self._lock:
            self._guides.setdefault(run, {}).setdefault(guide_step, {}).update(encoded)
        return len(encoded)

    def get_guides(self, run: str, guide_step: int, prompt_ids: Sequence[str]) -> dict[str, Sample]:
        """See GuideStore.get_guides."""
        return {
            prompt_id: guides[0] for prompt_id, guides in self.get_guide_lists(run, guide_step, prompt_ids, 1).items()
        }

    def get_guide_lists(self, run: str, guide_step: int, prompt_ids: Sequence[str], k: int) -> dict[str, list[Sample]]:
        """See GuideStore.get_guide_lists."""
        check_run(run)
        check_step("guide_step", guide_step)
        wanted = check_prompt_ids("prompt_ids", prompt_ids)
        check_k(k)
        with self._lock:
            stored = self._guides.get(run, {}).get(guide_step, {})
            found = {prompt_id: stored[prompt_id][:k] for prompt_id in wanted if prompt_id in stored}
        return {prompt_id: [sample_from_json(text) for text in texts] for prompt_id, texts in found.items()}

    def guide_steps(self, run: str) -> list[int]:
        """See GuideStore.guide_steps."""
        check_run(run)
        with self._lock:
            return sorted(self._guides.get(run, {}))

    def delete_guides(self, run: str, guide_step: int) -> int:
        """See GuideStore.delete_guides."""
        check_run(run)
        check_step("guide_step", guide_step)
        with self._lock:
            return sum(map(len, self._guides.get(run, {}).pop(guide_step, {}).values()))

    def record_mistakes(self, run: str, step: int, prompt_ids: Sequence[str]) -> None:
        """See GuideStore.record_mistakes."""
        check_run(run)
        check_step("step", step)
        ids = check_prompt_ids("prompt_ids", prompt_ids)
        if not ids:
            return
        with self._lock:
            pool = self._mistakes.setdefault(run, {})
            pool.update(dict.fromkeys(ids, step))
            excess = len(pool) - self.max_mistakes
            if excess > 0:
                for prompt_id in oldest_first(pool)[:excess]:
                    del pool[prompt_id]

    def get_mistakes(self, run: str, lo: int, hi: int) -> dict[str, int]:
        """See GuideStore.get_mistakes."""
        check_run(run)
        check_step("lo", lo)
        check_step("hi", hi)
        if lo > hi:
            raise ValueError(f"lo: must be <= hi, got lo={lo}, hi={hi}")
        with self._lock:
            pool = self._mistakes.get(run, {})
            return {prompt_id: step for prompt_id, step in pool.items() if lo <= step < hi}

    def truncate_mistakes(self, run: str, from_step: int) -> int:
        """See GuideStore.truncate_mistakes."""
        check_run(run)
        check_step("from_step", from_step)
        with self._lock:
            pool = self._mistakes.get(run, {})
            dropped = [prompt_id for prompt_id, step in pool.items() if step >= from_step]
            for prompt_id in dropped:
                del pool[prompt_id]
        return len(dropped)

    def stats(self, run: str) -> dict[str, Any]:
        """See GuideStore.stats."""
        check_run(run)
        with self._lock:
            counts = {step: sum(map(len, lists.values())) for step, lists in sorted(self._guides.get(run, {}).items())}
            mistakes = len(self._mistakes.get(run, {}))
        return {"guide_steps": counts, "guides": sum(counts.values()), "mistakes": mistakes}

    def clear_run(self, run: str) -> None:
        """See GuideStore.clear_run."""
        check_run(run)
        with self._lock:
            self._guides.pop(run, None)
            self._mistakes.pop(run, None)

    def close(self) -> None:
        """See GuideStore.close (drops everything held)."""
        with self._lock:
            self._guides.clear()
            self._mistakes.clear()

    def __enter__(self) -> MemoryGuideStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
