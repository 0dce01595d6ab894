"""Reward functions: the built-in verifiers and your own, in any of three calling conventions, weighted and summed.

A plug-in is named "module:function" under task.reward (one name or a list). Its signature says how it is called:

    pair   fn(response, answer) -> float                         one sample a call; any two positional parameters
    batch  fn(completions, **kwargs) -> list[float]              TRL: a parameter named `completions`; one call a batch
    verl   compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict
                                                                 verl: parameters named solution_str and ground_truth;
                                                                 a dict's "score" is the reward

A batch function gets, as keyword lists with one entry per sample: `completions` (the response text; for a problem
whose prompt is a chat-message list, TRL's conversational form [{"role": "assistant", "content": text}]), `prompts`
(metadata["messages"] when the problem has them, else the prompt text), `answer`, `prompt_id`, and every other
column of the data row (Problem.metadata, and the source columns of answer/id/solution under their own names, e.g.
`solution` or `ground_truth`). It receives only the names it declares unless it takes **kwargs. A None in its list
means "not applicable" (TRL's rule) and counts 0 without being an error.

The reward of a sample is sum_i w_i * r_i over the functions. A function that raises, returns NaN/inf, a non-number
or (batch) a list of the wrong length contributes 0 for the samples concerned; each such (sample, function) pair is
counted in `Rewarder.errors`, the first failure is logged as a warning with its traceback, later ones at debug level.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from npo.core.config import ConfigError
from npo.core.types import Problem

logger = logging.getLogger(__name__)

ACCEPTED_SIGNATURES = (
    "fn(response, answer) -> float; fn(completions, **kwargs) -> list[float] (TRL); "
    "compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict (verl)"
)
"""The calling conventions a plug-in may use, as named in error messages."""
VERL_NAMES = ("data_source", "solution_str", "ground_truth", "extra_info")
"""The keyword arguments a verl-style function may take."""
BATCH_FIXED = ("completions", "prompts", "answer", "prompt_id")
"""Keyword lists every batch call provides, besides the data's own columns."""


class RewardStyle(StrEnum):
    """How a reward function is called."""

    PAIR = "pair"
    """fn(response, answer) -> float, one sample a call."""
    BATCH = "batch"
    """fn(completions=[...], prompts=[...], **columns) -> list[float], one call a batch (TRL)."""
    VERL = "verl"
    """fn(data_source=, solution_str=, ground_truth=, extra_info=) -> float | dict, one sample a call (verl)."""
    PROBLEM = "problem"
    """fn(problem, response) -> float: a built-in verifier (never a plug-in)."""


class RewardFailure(Exception):
    """A reward value that is not a finite number (the reason is the message)."""


@dataclass
class RewardFunction:
    """One reward function, its calling convention and its weight."""

    name: str
    """"module:function", or "builtin" for the task's own verifier."""
    fn: Callable[..., Any]
    """The function itself."""
    style: RewardStyle
    """How it is called."""
    weight: float = 1.0
    """Its factor in the weighted sum."""
    accepts: frozenset[str] | None = None
    """Keyword names it takes (batch, verl); None = any (it has **kwargs)."""

    def score_one(self, problem: Problem, response: str) -> Any:
        """The raw value for one sample (pair, verl, problem styles)."""
        if self.style is RewardStyle.PAIR:
            return self.fn(response, problem.answer)
        if self.style is RewardStyle.PROBLEM:
            return self.fn(problem, response)
        metadata = problem.metadata
        values = {
            "data_source": metadata.get("data_source", problem.prompt_id.split("/")[0]),
            "solution_str": response,
            "ground_truth": problem.answer,
            "extra_info": metadata.get("extra_info"),
        }
        return self.fn(**{k: v for k, v in values.items() if self.accepts is None or k in self.accepts})

    def score_batch(
        self, problems: Sequence[Problem], responses: Sequence[str], columns: Mapping[str, str]
    ) -> list[Any]:
        """The raw values of one batch call (batch style); `columns` as in batch_kwargs."""
        kwargs = batch_kwargs(problems, responses, columns)
        if self.accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepts}
        values = self.fn(**kwargs)
        if not isinstance(values, (list, tuple)) or len(values) != len(problems):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardFailure(f"returned {got} for a batch of {len(problems)} (expected a list of that length)")
        return list(values)


def batch_kwargs(
    problems: Sequence[Problem], responses: Sequence[str], columns: Mapping[str, str]
) -> dict[str, list[Any]]:
    """The keyword lists of a batch (TRL-style) call; a column missing from some rows is None there. `columns` maps
    Problem fields to the data's column names (task.columns with its defaults)."""
    rows = [problem_columns(p, columns) for p in problems]
    names = list(dict.fromkeys(name for row in rows for name in row))
    kwargs: dict[str, list[Any]] = {name: [row.get(name) for row in rows] for name in names}
    kwargs["prompts"] = [p.metadata.get("messages", p.prompt) for p in problems]
    kwargs["completions"] = [
        [{"role": "assistant", "content": text}] if "messages" in p.metadata else text
        for p, text in zip(problems, responses, strict=True)
    ]
    return kwargs


def problem_columns(problem: Problem, columns: Mapping[str, str]) -> dict[str, Any]:
    """A problem's data columns as a batch function sees them: metadata (less "messages"), answer, prompt_id, and
    the fields read from a top-level column again under that column's name (e.g. ground_truth, solution)."""
    row = {k: v for k, v in problem.metadata.items() if k != "messages"}
    row["answer"] = problem.answer
    row["prompt_id"] = problem.prompt_id
    fields = {"answer": problem.answer, "id": problem.prompt_id, "solution": problem.solution}
    fields["compact_prompt"] = problem.compact_prompt
    for field_name, column in columns.items():
        if field_name in fields and "." not in column:
            row.setdefault(column, fields[field_name])
    return row


def import_reward(spec: str, key: str) -> Callable[..., Any]:
    """Import 'module:function'; ConfigError naming `key` when malformed, not importable or not callable."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"{key}: {spec!r} must look like 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a configuration problem
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"{key}: module {module_name!r} has no function {func_name!r}")
    return fn


def reward_style(fn: Callable[..., Any], spec: str, key: str) -> tuple[RewardStyle, frozenset[str] | None]:
    """The calling convention that `fn`'s signature fits, and the keyword names it takes (None: **kwargs).

    verl when it has parameters named solution_str and ground_truth; batch (TRL) when it has one named completions;
    pair when it can take two positional arguments and needs no more. ConfigError naming `key` otherwise."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {spec!r} has no readable signature; accepted: {ACCEPTED_SIGNATURES}") from None
    params = list(signature.parameters.values())
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    accepts = None if var_keyword else frozenset(names)
    if {"solution_str", "ground_truth"} <= names and required <= set(VERL_NAMES):
        return RewardStyle.VERL, accepts
    if "completions" in names:
        return RewardStyle.BATCH, accepts
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_two = len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)
    if takes_two and not (required - {p.name for p in positional[:2]}):
        return RewardStyle.PAIR, accepts
    raise ConfigError(
        f"{key}: {spec!r} has signature {signature}, which fits none of the accepted ones: {ACCEPTED_SIGNATURES}"
    )


def check_batch_arguments(function: RewardFunction, sample: Problem, columns: Mapping[str, str], key: str) -> None:
    """ConfigError naming `key` when a batch function requires an argument that the data does not provide."""
    if function.style is not RewardStyle.BATCH:
        return
    params = inspect.signature(function.fn).parameters.values()
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    available = set(BATCH_FIXED) | set(problem_columns(sample, columns))
    missing = [name for name in required if name not in available]
    if missing:
        raise ConfigError(
            f"{key}: {function.name!r} requires {missing} but the data provides only {sorted(available)}; "
            f"map a column with task.columns or give the parameter a default"
        )


def reward_value(raw: Any) -> float:
    """A finite float from a function's return value (a verl dict's "score"); RewardFailure otherwise."""
    if isinstance(raw, dict):
        if "score" not in raw:
            raise RewardFailure(f"returned a dict without a 'score' key (keys {sorted(raw)[:5]})")
        raw = raw["score"]
    if not isinstance(raw, numbers.Real):
        raise RewardFailure(f"returned {type(raw).__name__} {raw!r:.60}, not a number")
    value = float(raw)
    if not math.isfinite(value):
        raise RewardFailure(f"returned {value}")
    return value


class Rewarder:
    """Weighted sum of reward functions over a batch, with a thread-safe failure count and an optional thread pool.

    workers = 0 calls every function inline; workers = N > 0 spreads the one-sample calls (pair, verl, built-in) of a
    batch over a pool of N threads (a batch function is still one call). Threads help rewards that wait (a sandbox,
    a remote judge, a subprocess) or release the GIL; the functions must be thread-safe."""

    def __init__(
        self, functions: Sequence[RewardFunction], workers: int = 0, columns: Mapping[str, str] | None = None
    ) -> None:
        self.functions = list(functions)
        self.workers = workers
        self.columns = dict(columns or {})
        self._lock = threading.Lock()
        self._errors = 0
        self._pool: ThreadPoolExecutor | None = None

    @property
    def errors(self) -> int:
        """(sample, function) pairs that scored 0 because the function failed."""
        with self._lock:
            return self._errors

    def score(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[float]:
        """The weighted reward of each (problem, response); never raises for a failing function."""
        if len(problems) != len(responses):
            raise ValueError(f"responses: expected {len(problems)} (one per problem), got {len(responses)}")
        totals = [0.0] * len(problems)
        for function in self.functions:
            for i, value in enumerate(self._values(function, problems, responses)):
                totals[i] += function.weight * value
        return totals

    def _values(self, function: RewardFunction, problems: Sequence[Problem], responses: Sequence[str]) -> list[float]:
        if function.style is RewardStyle.BATCH:
            try:
                raws = function.score_batch(problems, responses, self.columns)
            except Exception as exc:  # noqa: BLE001 - a failing plug-in scores 0, it never stops training
                self._failed(function, problems[0] if problems else None, exc, len(problems))
                return [0.0] * len(problems)
            return [0.0 if raw is None else self._checked(function, p, raw) for p, raw in zip(problems, raws)]

        def one(pair: tuple[Problem, str]) -> float:
            try:
                raw = function.score_one(*pair)
            except Exception as exc:  # noqa: BLE001 - as above
                self._failed(function, pair[0], exc, 1)
                return 0.0
            return self._checked(function, pair[0], raw)

        pairs = list(zip(problems, responses))
        if self.workers > 0 and len(pairs) > 1:
            return list(self._executor().map(one, pairs))
        return [one(pair) for pair in pairs]

    def _checked(self, function: RewardFunction, problem: Problem, raw: Any) -> float:
        try:
            return reward_value(raw)
        except RewardFailure as exc:
            self._failed(function, problem, exc, 1)
            return 0.0

    def _failed(self, function: RewardFunction, problem: Problem | None, exc: Exception, count: int) -> None:
        with self._lock:
            first = self._errors == 0
            self._errors += count
        where = f"reward {function.name} for {problem.prompt_id if problem else '?'}"
        if isinstance(exc, RewardFailure):
            logger.log(logging.WARNING if first else logging.DEBUG, "%s %s; scored 0.0", where, exc)
        elif first:
            tb = "".join(traceback.format_exception(exc)).rstrip()
            logger.warning("%s raised %s: %s; scored 0.0 (later failures: debug level)\n%s", where,
                           type(exc).__name__, exc, tb)  # fmt: skip
        else:
            logger.debug("%s raised %s: %s; scored 0.0", where, type(exc).__name__, exc)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="reward")
            return self._pool

    def close(self) -> None:
        """Stop the thread pool (if one was started)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def load_reward(spec: str, key: str, weight: float = 1.0) -> RewardFunction:
    """Import 'module:function' and fit its signature; ConfigError naming `key` when it cannot be used."""
    fn = import_reward(spec, key)
    style, accepts = reward_style(fn, spec, key)
    return RewardFunction(spec, fn, style, float(weight), accepts)
