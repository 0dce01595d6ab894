"""Your own task data: .jsonl, .parquet and datasets folders, column mapping, chat prompts, bad rows (real files)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from npo.core.config import ConfigError
from npo.runtime.tasks import TaskConfig, load_task
from services.cli import main

ROOT = Path(__file__).resolve().parents[1]

VERL_ROWS = [
    {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
        "extra_info": {"split": "train", "index": i},
    }
    for i in range(4)
]
"""Rows in verl's parquet layout: a chat prompt, the answer nested under reward_model, the id under extra_info."""
VERL_COLUMNS = {"answer": "reward_model.ground_truth", "id": "extra_info.index"}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def file_task(train: str, test: str = "", **kwargs) -> TaskConfig:
    return TaskConfig(name="file", train_file=train, test_file=test, **kwargs)


def test_jsonl_with_the_generic_keys(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "2+2?", "answer": 4, "topic": "add"}, {"prompt": "3*3?",
                        "answer": "9", "id": "nine"}])  # fmt: skip
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "5-1?", "answer": 4.0}])
    task = load_task(file_task(train, test))
    assert [p.prompt_id for p in task.train] == ["file/train/0", "nine"]
    assert [p.prompt_id for p in task.test] == ["file/test/0"]
    assert [p.answer for p in task.train + task.test] == ["4", "9", "4"]  # an integral float loses its ".0"
    assert task.train[0].metadata == {"topic": "add"} and "messages" not in task.train[1].metadata
    assert task.skipped_rows == 0
    # the earlier keys still work, with either name
    old = load_task(TaskConfig(name="jsonl", jsonl_train=train))
    assert [p.prompt_id for p in old.train] == ["jsonl/train/0", "nine"]
    assert load_task(TaskConfig(name="file", jsonl_train=train)).train[0].prompt_id == "file/train/0"


def test_verl_parquet_with_nested_columns(tmp_path):
    train = write_parquet(tmp_path / "train.parquet", VERL_ROWS)
    task = load_task(file_task(train, columns=VERL_COLUMNS))
    first = task.train[0]
    assert [p.prompt_id for p in task.train] == ["0", "1", "2", "3"]
    assert first.prompt == "What is 0 + 0?" and first.answer == "0"
    assert first.metadata["messages"] == [{"role": "user", "content": "What is 0 + 0?"}]
    assert first.metadata["data_source"] == "openai/gsm8k" and first.metadata["extra_info"]["index"] == 0
    assert "prompt" not in first.metadata  # the prompt column became prompt + messages
    assert task.reward(task.train[3], "so the answer is \\boxed{6}") == 1.0  # the built-in math reward


def test_datasets_folders_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"question": f"q{i}", "ground_truth": str(i)} for i in range(6)]
    splits = DatasetDict({"train": Dataset.from_list(rows[:4]), "test": Dataset.from_list(rows[4:])})
    splits.save_to_disk(str(tmp_path / "dict"))
    Dataset.from_list(rows[:2]).save_to_disk(str(tmp_path / "single"))
    columns = {"prompt": "question", "answer": "ground_truth"}

    task = load_task(file_task(str(tmp_path / "dict"), str(tmp_path / "dict"), columns=columns))
    assert [p.prompt for p in task.train] == ["q0", "q1", "q2", "q3"]
    assert [(p.prompt, p.answer) for p in task.test] == [("q4", "4"), ("q5", "5")]
    assert task.train[0].metadata == {}  # both columns were mapped
    single = load_task(file_task(str(tmp_path / "single"), str(tmp_path / "dict" / "test"), columns=columns))
    assert [p.prompt for p in single.train] == ["q0", "q1"] and len(single.test) == 2

    DatasetDict({"a": Dataset.from_list(rows[:1]), "b": Dataset.from_list(rows[1:2])}).save_to_disk(
        str(tmp_path / "ab")
    )
    with pytest.raises(
        ConfigError, match=r"task.train_file: .*ab holds the splits \['a', 'b'\] and none is named 'train'"
    ):
        load_task(file_task(str(tmp_path / "ab"), columns=columns))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"task.test_file: .*empty: not a folder written by Dataset.save_to_disk"):
        load_task(file_task(str(tmp_path / "single"), str(tmp_path / "empty"), columns=columns))


def test_chat_prompts_and_the_system_prompt(tmp_path):
    rows = [
        {"prompt": "plain", "answer": "1"},
        {"prompt": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "last"}], "answer": "2"},
        {"prompt": [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"}], "answer": "3"},
    ]  # fmt: skip
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    plain = load_task(file_task(train))
    assert "messages" not in plain.train[0].metadata
    assert plain.train[1].prompt == "last" and len(plain.train[1].metadata["messages"]) == 3

    task = load_task(file_task(train, system_prompt="Be brief."))
    system = {"role": "system", "content": "Be brief."}
    assert task.train[0].metadata["messages"] == [system, {"role": "user", "content": "plain"}]
    assert task.train[1].metadata["messages"][0] == system and len(task.train[1].metadata["messages"]) == 4
    assert task.train[2].metadata["messages"] == rows[2]["prompt"]  # the row's own system message wins
    assert [p.prompt for p in task.train] == ["plain", "last", "hi"]

    only_system = write_jsonl(tmp_path / "sys.jsonl", [{"prompt": [{"role": "system", "content": "x"}], "answer": 1}])
    assert load_task(file_task(only_system)).train[0].prompt == "x"  # no user message: all contents


def test_system_prompt_on_a_generated_task():
    task = load_task(TaskConfig(name="chain_sum", format="natural", system_prompt="Think.", train_size=3, test_size=1))
    problem = task.train[0]
    assert problem.metadata["messages"] == [{"role": "system", "content": "Think."},
                                            {"role": "user", "content": problem.prompt}]  # fmt: skip
    assert task.reward(problem, f"<answer>{problem.answer}</answer>") == 1.0
    with pytest.raises(ConfigError, match=r"task.system_prompt: not used by the compact format"):
        TaskConfig(name="chain_sum", system_prompt="Think.").validate()


BAD_ROWS = [
    ("missing", [{"prompt": "p", "answer": "1"}, {"prompt": "q"}], {},
     r"task.train_file: .*train.jsonl:2: needs a 'answer' value: missing column 'answer'"),
    ("nested", [{"prompt": "p", "reward_model": {"style": "rule"}}], {"answer": "reward_model.ground_truth"},
     r"train.jsonl:1: needs a 'answer' value: missing column 'reward_model.ground_truth'"),
    ("not json", [{"prompt": "p", "answer": "1"}, "", '{"prompt": "q", "answer"'], {},
     r"task.train_file: .*train.jsonl:3: not valid JSON"),
    ("not an object", ['["p", "1"]'], {}, r"train.jsonl:1: expected a JSON object, got list"),
    ("wrong type", [{"prompt": "p", "answer": ["1", "2"]}], {},
     r"train.jsonl:1: column 'answer': expected a string or a number, got list"),
    ("null", [{"prompt": "p", "answer": None}], {}, r"train.jsonl:1: needs a 'answer' value: column 'answer' is null"),
    ("bool", [{"prompt": True, "answer": "1"}], {}, r"train.jsonl:1: column 'prompt': expected a string or a number"),
    ("message", [{"prompt": [{"role": "user", "content": ["a"]}], "answer": "1"}], {},
     r"train.jsonl:1: column 'prompt'\[0\]: the message content must be a string, got list"),
    ("duplicate id", [{"prompt": "p", "answer": "1", "id": 7}, {"prompt": "q", "answer": "2", "id": "7"}], {},
     r"train.jsonl:2: duplicate id '7'"),
    ("mapped id", [{"prompt": "p", "answer": "1"}], {"id": "extra_info.index"},
     r"train.jsonl:1: needs a 'id' value: missing column 'extra_info.index'"),
    ("empty", [], {}, r"task.train_file: .*train.jsonl holds no problems$"),
    ("blank lines", ["", "  "], {}, r"holds no problems"),
]  # fmt: skip


@pytest.mark.parametrize("case, rows, columns, message", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_a_bad_row_is_a_config_error_naming_key_file_and_line(tmp_path, case, rows, columns, message):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ConfigError, match=message) as caught:
        load_task(file_task(train, columns=columns))
    assert "\n" not in str(caught.value)


def test_bad_parquet_rows_and_files(tmp_path):
    train = write_parquet(tmp_path / "train.parquet", [{"prompt": "p", "answer": "1"}, {"prompt": "q", "answer": None}])
    with pytest.raises(ConfigError, match=r"task.train_file: .*train.parquet row 1: needs a 'answer' value: .* null"):
        load_task(file_task(train))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")  # fmt: skip
    with pytest.raises(ConfigError, match=r"task.train_file: .*empty.parquet holds no problems"):
        load_task(file_task(str(tmp_path / "empty.parquet")))
    (tmp_path / "junk.parquet").write_text("not parquet")
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "answer": 1}])
    with pytest.raises(ConfigError, match=r"task.test_file: .*junk.parquet: not a readable parquet file"):
        load_task(file_task(good, str(tmp_path / "junk.parquet")))
    (tmp_path / "data.csv").write_text("prompt,answer\n")
    with pytest.raises(
        ConfigError, match=r"task.train_file: .*data.csv: unsupported kind of file '.csv'; expected .jsonl"
    ):
        load_task(file_task(str(tmp_path / "data.csv")))
    with pytest.raises(ConfigError, match=r"task.train_file: file not found: .*missing.jsonl"):
        load_task(file_task(str(tmp_path / "missing.jsonl")))


def test_skip_bad_rows_counts_them_and_warns_once(tmp_path, caplog):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b"}, "{oops", {"prompt": "c", "answer": "3"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "d", "answer": [1]}, {"prompt": "e", "answer": "5"}])
    with caplog.at_level(logging.WARNING, logger="npo.runtime.tasks"):
        task = load_task(file_task(train, test, skip_bad_rows=True))
    assert [p.prompt for p in task.train] == ["a", "c"] and [p.prompt for p in task.test] == ["e"]
    assert [p.prompt_id for p in task.train] == ["file/train/0", "file/train/1"]
    assert task.skipped_rows == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 3 bad data rows" in warnings[0] and "train.jsonl:2: needs a 'answer' value" in warnings[0]

    all_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}, "nope"])
    with pytest.raises(ConfigError, match=r"bad.jsonl holds no problems \(2 bad rows skipped, first: .*bad.jsonl:1"):
        load_task(file_task(all_bad, skip_bad_rows=True))


def test_overlap_and_config_checks(tmp_path):
    chat = [{"prompt": [{"role": "user", "content": "same"}], "answer": "1"}]
    train = write_jsonl(tmp_path / "train.jsonl", chat)
    test = write_jsonl(tmp_path / "test.jsonl", chat)
    with pytest.raises(ConfigError, match=r"task.test_file: 1 test prompts also appear in task.train_file"):
        load_task(file_task(train, test))
    other_context = [{"prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": "same"}], "answer": 1}]
    assert len(load_task(file_task(train, write_jsonl(tmp_path / "t2.jsonl", other_context))).test) == 1

    with pytest.raises(ConfigError, match=r"task.jsonl_train: the earlier name of task.train_file; set one"):
        TaskConfig(name="file", train_file=train, jsonl_train=train).validate()
    with pytest.raises(ConfigError, match=r"task.train_file: required when task.name is 'file'"):
        TaskConfig(name="file").validate()
    with pytest.raises(ConfigError, match=r"task.columns.promt: 'promt' is not one of .*did you mean 'prompt'"):
        file_task(train, columns={"promt": "question"}).validate()
    with pytest.raises(ConfigError, match=r"task.columns.answer: expected a column name, got ''"):
        file_task(train, columns={"answer": ""}).validate()
    with pytest.raises(ConfigError, match=r"task.columns: only used when task.name is 'jsonl' or 'file'"):
        TaskConfig(name="chain_sum", columns={"prompt": "q"}).validate()
    with pytest.raises(ConfigError, match=r"task.train_file: only used when task.name is 'jsonl' or 'file'"):
        TaskConfig(name="chain_sum", train_file=train).validate()


def test_pyarrow_and_datasets_are_imported_only_for_their_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "answer": "1"}])
    script = (
        "import sys\nfrom npo.runtime.tasks import TaskConfig, load_task\n"
        f"load_task(TaskConfig(name='file', train_file={train!r}))\n"
        "print(sorted(m for m in ('pyarrow', 'datasets', 'pandas') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


CLI_ERRORS = [
    ("missing column", [{"prompt": "p"}], "train.jsonl:1: needs a 'answer' value: missing column 'answer'"),
    ("malformed line", ['{"prompt": "p", '], "train.jsonl:1: not valid JSON"),
    ("empty file", [], "train.jsonl holds no problems"),
]


@pytest.mark.parametrize("case, rows, message", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_cli_reports_a_bad_data_file_in_one_line(tmp_path, capsys, case, rows, message):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    argv = ["train", "--config", str(ROOT / "configs/tiny.yaml"), "--out", str(tmp_path / "r"), "--no-progress",
            "--set", "task.name=file", "--set", "task.options={}", "--set", f"task.train_file={train}"]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert f"npo: config error: task.train_file: {train}" in err and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
