"""Task data from your own files: JSON lines, parquet, or a Hugging Face `datasets` folder, one Problem a row.

The kind is told by the path: `*.jsonl` (one JSON object a line), `*.parquet` (needs pyarrow), or a directory written
by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (needs the `datasets` package; of a DatasetDict the split
named like the one being read, "train" or "test", or its only split). pyarrow and datasets are imported only then.

Columns: a Problem field is read from the column of the same name unless task.columns maps it elsewhere; a dotted
name walks nested objects (verl: `answer: reward_model.ground_truth`, `id: extra_info.index`). A column literally
named with dots is used first when the row has one.

    field           default column   required   type
    prompt          prompt           yes        string or number, or a list of {"role", "content"} chat messages
    answer          answer           yes        string or number
    id              id               no         string or number; default "<task name>/<split>/<index>", unique
    compact_prompt  compact_prompt   no         string
    solution        solution         no         string

Every other top-level column goes to Problem.metadata unchanged. A chat prompt (or any prompt when a system prompt is
configured) keeps its full message list, system message first, in metadata["messages"] for a chat model to render
with its chat template; Problem.prompt is then the text of the last user message (of all messages when none is a
user's), so that reports and character models still have text. A row's own leading system message is kept and the
configured system prompt is then not added.

A bad row (not JSON, not an object, a missing or null column, a wrong type, a duplicate id) raises ConfigError naming
the config key, the file and the line (jsonl, from 1) or row (parquet, datasets: from 0), or, with skip_bad_rows, is
left out and its reason returned to the caller.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npo.core.config import ConfigError
from npo.core.types import Problem

FIELDS = ("prompt", "answer", "id", "compact_prompt", "solution")
"""The Problem fields a column can be mapped to (task.columns keys)."""
REQUIRED = ("prompt", "answer")
"""Fields every row must have."""
KINDS = ".jsonl, .parquet, or a folder written by Dataset.save_to_disk"
"""The accepted kinds of data path, as named in error messages."""


class RowError(ValueError):
    """One bad row; the message is the reason."""


@dataclass
class DataSpec:
    """How to turn rows into Problems (from the task config)."""

    columns: Mapping[str, str] = field(default_factory=dict)
    """Problem field -> column name (dotted for nested); fields not named use their own name."""
    system_prompt: str = ""
    """A system message put first in metadata["messages"] ("" = none)."""
    id_prefix: str = "file"
    """Default ids are "<id_prefix>/<split>/<index>"."""
    skip_bad_rows: bool = False
    """Leave bad rows out (returning their reasons) instead of raising."""

    def column(self, field_name: str) -> str:
        """The column a field is read from."""
        return self.columns.get(field_name, field_name)


def read_problems(path: str, split: str, key: str, spec: DataSpec) -> tuple[list[Problem], list[str]]:
    """The Problems of one data file (or folder), and the reasons of the rows skipped (skip_bad_rows).

    Raises ConfigError naming `key` for a missing or unreadable file, a bad row (unless skipped) or no problem."""
    problems: list[Problem] = []
    skipped: list[str] = []
    ids: set[str] = set()
    for where, row in iter_rows(path, key, split):
        try:
            if isinstance(row, RowError):
                raise row
            problem = problem_from_row(row, spec, f"{spec.id_prefix}/{split}/{len(problems)}")
            if problem.prompt_id in ids:
                raise RowError(f"duplicate id {problem.prompt_id!r}")
        except RowError as exc:
            if not spec.skip_bad_rows:
                raise ConfigError(f"{key}: {where}: {exc}") from None
            skipped.append(f"{where}: {exc}")
            continue
        ids.add(problem.prompt_id)
        problems.append(problem)
    if not problems:
        first = f" ({len(skipped)} bad rows skipped, first: {skipped[0]})" if skipped else ""
        raise ConfigError(f"{key}: {path} holds no problems{first}")
    return problems, skipped


def iter_rows(path: str, key: str, split: str) -> Iterator[tuple[str, dict | RowError]]:
    """(where, row) for every row of the file; `where` is "path:line" or "path row i"; a row that cannot be read
    as an object comes as a RowError."""
    p = Path(path)
    if p.is_dir():
        return _dataset_rows(p, key, split)
    if not p.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    if p.suffix == ".jsonl":
        return _jsonl_rows(p)
    if p.suffix == ".parquet":
        return _parquet_rows(p, key)
    raise ConfigError(f"{key}: {path}: unsupported kind of file {p.suffix or '(no suffix)'!r}; expected {KINDS}")


def _jsonl_rows(p: Path) -> Iterator[tuple[str, dict | RowError]]:
    with p.open("rb") as lines:
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield where, RowError(f"not UTF-8 text ({exc})")
                continue
            except json.JSONDecodeError as exc:
                yield where, RowError(f"not valid JSON ({exc})")
                continue
            yield where, row if isinstance(row, dict) else RowError(f"expected a JSON object, got {type(row).__name__}")


def _parquet_rows(p: Path, key: str) -> Iterator[tuple[str, dict | RowError]]:
    pq = _import("pyarrow.parquet", "pyarrow", key)
    try:
        parquet = pq.ParquetFile(p)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not parquet
        raise ConfigError(f"{key}: {p}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    index = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            yield f"{p} row {index}", row
            index += 1


def _dataset_rows(p: Path, key: str, split: str) -> Iterator[tuple[str, dict | RowError]]:
    datasets = _import("datasets", "datasets", key)
    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001 - not a save_to_disk folder, or a damaged one
        raise ConfigError(
            f"{key}: {p}: not a folder written by Dataset.save_to_disk ({type(exc).__name__}: {exc}); expected {KINDS}"
        ) from None
    where = str(p)
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split not in loaded and len(names) != 1:
            raise ConfigError(
                f"{key}: {p} holds the splits {names} and none is named {split!r}; point at one, e.g. {p / names[0]}"
            )
        name = split if split in loaded else names[0]
        loaded, where = loaded[name], f"{p} split {name}"
    return ((f"{where} row {i}", row) for i, row in enumerate(loaded))


def _import(module: str, package: str, key: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"{key}: reading this file needs the {package} package ({exc}); pip install {package}"
        ) from None


def problem_from_row(row: dict, spec: DataSpec, default_id: str) -> Problem:
    """One Problem from a row (a mapping of column -> value); RowError naming the column when the row is bad."""
    prompt_value = lookup(row, spec.column("prompt"), "prompt")
    answer = scalar_text(lookup(row, spec.column("answer"), "answer"), spec.column("answer"))
    optional = {}
    for name in ("id", "compact_prompt", "solution"):
        column = spec.column(name)
        if name in spec.columns or _has(row, column):  # a mapped column is required, a default one optional
            optional[name] = scalar_text(lookup(row, column, name), column)
    metadata = {k: v for k, v in row.items() if k not in {spec.column(f) for f in FIELDS}}
    if isinstance(prompt_value, list):
        messages = chat_messages(prompt_value, spec.column("prompt"))
        prompt = prompt_from_messages(messages)
    else:
        prompt = scalar_text(prompt_value, spec.column("prompt"))
        messages = [{"role": "user", "content": prompt}] if spec.system_prompt else []
    if messages:
        if spec.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": spec.system_prompt}, *messages]
        metadata["messages"] = messages
    return Problem(
        prompt_id=optional.get("id", default_id),
        prompt=prompt,
        answer=answer,
        compact_prompt=optional.get("compact_prompt", ""),
        solution=optional.get("solution", ""),
        metadata=metadata,
    )


def _has(row: Mapping, column: str) -> bool:
    try:
        lookup(row, column, column)
    except RowError:
        return False
    return True


def lookup(row: Mapping, column: str, field_name: str) -> Any:
    """row[column], walking nested objects at each '.' (a key that holds the dots itself wins); RowError when absent
    or null."""
    if column in row:
        value = row[column]
    else:
        value: Any = row
        for part in column.split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise RowError(f"needs a {field_name!r} value: missing column {column!r}")
            value = value[part]
    if value is None:
        raise RowError(f"needs a {field_name!r} value: column {column!r} is null")
    return value


def scalar_text(value: Any, column: str) -> str:
    """A string or number as text (an integral float without its '.0'); RowError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"column {column!r}: expected a string or a number, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def chat_messages(value: list, column: str) -> list[dict[str, str]]:
    """A list of {"role", "content"} chat messages with string fields, as plain dicts (extra keys dropped)."""
    if not value:
        raise RowError(f"column {column!r}: an empty message list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise RowError(f"column {column!r}[{i}]: expected a {{'role', 'content'}} message, got {message!r:.60}")
        if not isinstance(message.get("content"), str):
            got = type(message.get("content")).__name__
            raise RowError(f"column {column!r}[{i}]: the message content must be a string, got {got}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def prompt_from_messages(messages: list[dict[str, str]]) -> str:
    """The text of the last user message, or of all messages (joined by blank lines) when none is a user's."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else "\n\n".join(m["content"] for m in messages)
