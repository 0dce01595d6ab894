"""Your own reward functions: the three signatures, weights, failures scored 0 and counted, the thread pool.

Each test writes a real reward module to tmp_path and imports it by name through task.reward."""

from __future__ import annotations

import json
import logging
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from npo.core.config import ConfigError
from npo.runtime.rewards import ACCEPTED_SIGNATURES, RewardStyle, reward_style
from npo.runtime.tasks import TaskConfig, load_task
from services.cli import main

ROOT = Path(__file__).resolve().parents[1]

REWARDS = """
import math
import threading
import time

CALLS = []


def exact(response, answer):
    return float(response.strip() == answer)


def trl_accuracy(completions, ground_truth, **kwargs):
    CALLS.append({"completions": completions, "ground_truth": ground_truth, **kwargs})
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(t.strip() == g) for t, g in zip(texts, ground_truth)]


def trl_only_declared(completions, prompts):
    CALLS.append({"completions": completions, "prompts": prompts})
    return [0.25] * len(completions)


def trl_needs_difficulty(completions, difficulty):
    return [0.0] * len(completions)


def trl_wrong_length(completions, **kwargs):
    return [1.0] * (len(completions) + 1)


def trl_not_applicable(completions, **kwargs):
    return [None if c == "skip" else 1.0 for c in completions]


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    CALLS.append({"data_source": data_source, "extra_info": extra_info})
    return {"score": float(solution_str.strip() == ground_truth), "acc": 1}


def verl_short(solution_str, ground_truth):
    return float(ground_truth in solution_str)


def raises(response, answer):
    raise RuntimeError("boom in the reward")


def returns_nan(response, answer):
    return math.nan


def returns_text(response, answer):
    return "1.0"


def one_argument(response):
    return 1.0


def keyword_only(*, response, answer):
    return 1.0


def slow_named(response, answer):
    time.sleep(0.05)
    CALLS.append(threading.current_thread().name)
    return float(response == answer)
"""

ROWS = [
    {"question": "1+1?", "ground_truth": "2", "difficulty": 1, "data_source": "toy", "extra_info": {"index": 0}},
    {"question": "2+2?", "ground_truth": "4", "difficulty": 2, "data_source": "toy", "extra_info": {"index": 1}},
    {"question": "3+3?", "ground_truth": "6", "difficulty": 3, "data_source": "toy", "extra_info": {"index": 2}},
]
COLUMNS = {"prompt": "question", "answer": "ground_truth"}


@pytest.fixture
def rewards_module(tmp_path, monkeypatch, request):
    """A reward module written to tmp_path under a name unique to the test; returns (name, module)."""
    name = "byo_rewards_" + "".join(c if c.isalnum() else "_" for c in request.node.name)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return name, importlib.import_module(name)


def data_file(tmp_path: Path, rows: list[dict] = ROWS) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def file_task(tmp_path: Path, reward, **kwargs):
    return load_task(TaskConfig(name="file", train_file=data_file(tmp_path), columns=COLUMNS, reward=reward, **kwargs))


def test_signatures_are_told_apart(rewards_module):
    _, module = rewards_module
    expected = {
        "exact": RewardStyle.PAIR,
        "trl_accuracy": RewardStyle.BATCH,
        "trl_only_declared": RewardStyle.BATCH,
        "compute_score": RewardStyle.VERL,
        "verl_short": RewardStyle.VERL,
        "slow_named": RewardStyle.PAIR,
    }
    for name, style in expected.items():
        assert reward_style(getattr(module, name), name, "task.reward")[0] is style, name
    assert reward_style(module.trl_accuracy, "x", "k")[1] is None  # **kwargs: every column is passed
    assert reward_style(module.trl_only_declared, "x", "k")[1] == {"completions", "prompts"}


@pytest.mark.parametrize("function", ["one_argument", "keyword_only"])
def test_no_signature_fits(tmp_path, rewards_module, function):
    name, _ = rewards_module
    with pytest.raises(ConfigError) as caught:
        file_task(tmp_path, f"{name}:{function}")
    message = str(caught.value)
    assert message.startswith(f"task.reward: '{name}:{function}' has signature (")
    assert f"fits none of the accepted ones: {ACCEPTED_SIGNATURES}" in message


def test_pair_reward(tmp_path, rewards_module):
    name, _ = rewards_module
    task = file_task(tmp_path, f"{name}:exact")
    assert [task.reward(p, f" {p.answer} ") for p in task.train] == [1.0, 1.0, 1.0]
    assert task.rewards(task.train, ["2", "5", "6"]) == [1.0, 0.0, 1.0]
    assert task.reward_errors == 0


def test_trl_batch_reward_gets_columns_as_lists(tmp_path, rewards_module):
    name, module = rewards_module
    task = file_task(tmp_path, f"{name}:trl_accuracy")
    assert task.rewards(task.train, ["2", "5", "6"]) == [1.0, 0.0, 1.0]
    call = module.CALLS[-1]
    assert call["completions"] == ["2", "5", "6"] and call["prompts"] == ["1+1?", "2+2?", "3+3?"]
    assert call["ground_truth"] == ["2", "4", "6"] and call["answer"] == ["2", "4", "6"]
    assert call["difficulty"] == [1, 2, 3] and call["data_source"] == ["toy"] * 3
    assert call["prompt_id"] == ["file/train/0", "file/train/1", "file/train/2"]
    assert task.reward(task.train[1], "4") == 1.0  # one sample is a batch of one

    declared = file_task(tmp_path, f"{name}:trl_only_declared")
    assert declared.rewards(declared.train[:2], ["a", "b"]) == [0.25, 0.25]
    assert set(module.CALLS[-1]) == {"completions", "prompts"}  # no **kwargs: only what it declares


def test_trl_conversational_completions_and_system_prompt(tmp_path, rewards_module):
    name, module = rewards_module
    task = file_task(tmp_path, f"{name}:trl_accuracy", system_prompt="Answer with a number.")
    assert task.rewards(task.train, ["2", "x", "6"]) == [1.0, 0.0, 1.0]
    call = module.CALLS[-1]
    assert call["completions"][0] == [{"role": "assistant", "content": "2"}]
    assert call["prompts"][0] == [{"role": "system", "content": "Answer with a number."},
                                  {"role": "user", "content": "1+1?"}]  # fmt: skip


def test_verl_compute_score(tmp_path, rewards_module):
    name, module = rewards_module
    task = file_task(tmp_path, f"{name}:compute_score")
    assert task.rewards(task.train, ["2", "5", "6"]) == [1.0, 0.0, 1.0]  # the dict's "score"
    assert module.CALLS[-1] == {"data_source": "toy", "extra_info": {"index": 2}}
    short = file_task(tmp_path, f"{name}:verl_short")
    assert short.reward(short.train[0], "it is 2") == 1.0


def test_weighted_sum_with_the_builtin_reward(tmp_path, rewards_module):
    name, _ = rewards_module
    task = file_task(tmp_path, [f"{name}:exact", "builtin", f"{name}:trl_only_declared"], reward_weights=[1.0, 0.5, 2])
    # exact 1, math_reward 1 (x 0.5), constant 0.25 (x 2)
    assert task.rewards(task.train[:2], ["2", "\\boxed{5}"]) == [1.0 + 0.5 + 0.5, 0.0 + 0.0 + 0.5]
    equal = file_task(tmp_path, [f"{name}:exact", f"{name}:verl_short"])
    assert equal.reward(equal.train[0], "2") == 2.0  # [] weights: 1.0 each


FAILURES = [
    ("raises", "raised RuntimeError: boom in the reward"),
    ("returns_nan", "returned nan"),
    ("returns_text", "returned str '1.0', not a number"),
    ("trl_wrong_length", "returned 4 values for a batch of 3 (expected a list of that length)"),
]


@pytest.mark.parametrize("function, message", FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failing_reward_scores_zero_is_counted_and_logged_once(tmp_path, rewards_module, caplog, function, message):
    name, _ = rewards_module
    task = file_task(tmp_path, [f"{name}:{function}", f"{name}:exact"])
    with caplog.at_level(logging.DEBUG, logger="npo.runtime.rewards"):
        assert task.rewards(task.train, ["2", "4", "0"]) == [1.0, 1.0, 0.0]  # the failing one adds 0
        assert task.reward(task.train[0], "2") == 1.0
    assert task.reward_errors == 4  # three samples, then one more
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and message in warnings[0].getMessage()
    assert f"reward {name}:{function} for file/train/0" in warnings[0].getMessage()
    if function == "raises":
        assert "Traceback" in warnings[0].getMessage()  # the first failure's traceback, once
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r is not warnings[0])


def test_none_from_a_batch_function_means_not_applicable(tmp_path, rewards_module):
    name, _ = rewards_module
    task = file_task(tmp_path, f"{name}:trl_not_applicable")
    assert task.rewards(task.train, ["skip", "a", "skip"]) == [0.0, 1.0, 0.0]
    assert task.reward_errors == 0


def test_failure_count_is_thread_safe(tmp_path, rewards_module):
    name, _ = rewards_module
    task = file_task(tmp_path, f"{name}:raises")
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: task.reward(task.train[i % 3], "x"), range(400)))
    assert results == [0.0] * 400 and task.reward_errors == 400


def test_reward_workers_run_one_sample_calls_on_a_pool(tmp_path, rewards_module):
    name, module = rewards_module
    task = file_task(tmp_path, f"{name}:slow_named", reward_workers=3)
    problems = task.train * 4
    responses = [p.answer if i % 2 else "x" for i, p in enumerate(problems)]
    assert task.rewards(problems, responses) == [float(i % 2) for i in range(12)]  # in order
    names = set(module.CALLS)
    assert names and all(n.startswith("reward") for n in names) and len(names) <= 3
    module.CALLS.clear()
    inline = file_task(tmp_path, f"{name}:slow_named")
    inline.rewards(problems[:2], responses[:2])
    assert module.CALLS == [threading.current_thread().name] * 2
    task.rewarder.close()


def test_reward_config_errors(tmp_path, rewards_module):
    name, _ = rewards_module
    rows_without = [{"question": "q", "ground_truth": "1"}]
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps(rows_without[0]) + "\n")
    with pytest.raises(ConfigError, match=r"task.reward: '.*:trl_needs_difficulty' requires \['difficulty'\] but the"):
        load_task(TaskConfig(name="file", train_file=str(path), columns=COLUMNS, reward=f"{name}:trl_needs_difficulty"))
    with pytest.raises(ConfigError, match=r"task.reward_weights: 1 weights for 2 reward functions"):
        TaskConfig(reward=[f"{name}:exact", "builtin"], reward_weights=[1.0]).validate()
    with pytest.raises(ConfigError, match=r"task.reward\[1\]: 'nocolon' must look like 'module:function'"):
        TaskConfig(reward=[f"{name}:exact", "nocolon"]).validate()
    with pytest.raises(ConfigError, match=r"task.reward_workers: must be >= 0"):
        TaskConfig(reward_workers=-1).validate()
    with pytest.raises(ConfigError, match=r"task.reward\[0\]: module '.*' has no function 'nope'"):
        file_task(tmp_path, [f"{name}:nope"])


def test_plugin_on_a_generated_task_needs_no_builtin(rewards_module):
    name, _ = rewards_module
    task = load_task(TaskConfig(name="chain_sum", reward=f"{name}:trl_not_applicable", train_size=3, test_size=1))
    assert task.rewards(task.train, ["1", "skip", "2"]) == [1.0, 0.0, 1.0]


CLI_ERRORS = [
    ("one_argument", "fits none of the accepted ones"),
    ("trl_needs_difficulty", "requires ['difficulty'] but the data provides only"),
    ("no_such_function", "has no function 'no_such_function'"),
]


@pytest.mark.parametrize("function, message", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_cli_reports_an_unusable_reward_in_one_line(tmp_path, capsys, rewards_module, function, message):
    name, _ = rewards_module
    train = tmp_path / "plain.jsonl"
    train.write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n")
    argv = ["train", "--config", str(ROOT / "configs/tiny.yaml"), "--out", str(tmp_path / "r"), "--no-progress",
            "--set", "task.name=file", "--set", "task.options={}", "--set", f"task.train_file={train}",
            "--set", f"task.reward={name}:{function}"]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("npo: config error: task.reward: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
