"""Bring your own task, as a new user would: a natural-language data file and a reward written for TRL or for verl,
the default tiny preset, `npo train` in a fresh process. Each trains 5 steps and evaluates on the held-out file.

The reward module and the data files are written to tmp_path; the tiny model is shrunk (and its warm-up shortened)
only to keep the test fast, through the same --set overrides a user has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["apples", "pears", "coins", "stones", "books"]

REWARDS = '''
def trl_accuracy(completions, solution, **kwargs):
    """TRL's shape: a batch of completions, dataset columns as keyword lists."""
    return [float(c.strip() == s) for c, s in zip(completions, solution)]


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's shape: one response, a dict with the score."""
    return {"score": float(solution_str.strip() == ground_truth), "source": data_source}


def exact(response, answer):
    return float(response.strip() == answer)
'''

SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
         "model.warmup_steps=20", "model.warmup_batch_size=16", "train.threads=1", "train.steps=5",
         "train.prompts_per_step=4", "algo.group_size=4", "rollout.max_new_tokens=4", "eval.every=5",
         "eval.num_prompts=8", "eval.samples_per_prompt=1", "checkpoint.every=5"]  # fmt: skip


def rows(start: int, count: int, answer_key: str = "solution") -> list[dict]:
    """Natural-language questions of about 80 characters; the answer under `answer_key`, verl's nesting for
    "reward_model.ground_truth"."""
    out = []
    for i in range(start, start + count):
        a, b, word = i % 10, i // 10 % 10, WORDS[i // 100 % len(WORDS)]
        row = {"question": f"Sam has {a} {word} and finds {b} more {word}. How many {word} does Sam have now?",
               "data_source": "counting"}  # fmt: skip
        if answer_key == "reward_model.ground_truth":
            row["reward_model"] = {"ground_truth": str(a + b)}
        else:
            row[answer_key] = str(a + b)
        out.append(row)
    return out


def write(path: Path, data: list[dict]) -> Path:
    """data as .jsonl, .parquet or a datasets folder, by the path's form."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
    elif path.suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(data).to_parquet(path)
    else:
        from datasets import Dataset

        Dataset.from_list(data).save_to_disk(str(path))
    return path


PLAIN = {"prompt": "question", "answer": "solution"}
CASES = {
    "jsonl + TRL reward": ("jsonl", "solution", "user_rewards:trl_accuracy", PLAIN),
    "jsonl + verl reward": ("jsonl", "reward_model.ground_truth", "user_rewards:compute_score",
                            {"prompt": "question", "answer": "reward_model.ground_truth"}),
    "parquet": ("parquet", "solution", "user_rewards:exact", PLAIN),
    "datasets folder": ("ds", "solution", "user_rewards:trl_accuracy", PLAIN),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_own_data_and_reward_train_five_steps_on_the_tiny_preset(tmp_path, case):
    kind, answer_key, reward, columns = CASES[case]
    (tmp_path / "user_rewards.py").write_text(textwrap.dedent(REWARDS))
    suffix = "" if kind == "ds" else f".{kind}"
    train = write(tmp_path / f"train{suffix}", rows(0, 40, answer_key))
    test = write(tmp_path / f"test{suffix}", rows(200, 8, answer_key))
    out = tmp_path / "run"
    sets = ["task.name=file", "task.options={}", f"task.train_file={train}", f"task.test_file={test}",
            f"task.reward={reward}", f"task.columns={json.dumps(columns)}", f"model.cache_dir={tmp_path / 'models'}",
            *SMALL]  # fmt: skip
    command = [sys.executable, "-m", "services.cli", "train", "--config", str(ROOT / "configs/tiny.yaml"), "--out",
               str(out), "--no-progress"] + [arg for s in sets for arg in ("--set", s)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "reward_mean" in r] == [0, 1, 2, 3, 4]
    final = metrics[-1]
    assert final["segment"] == "final" and final["step"] == 5 and 0.0 <= final["eval_acc"] <= 1.0
    assert final["reward_errors"] == 0 and final["skipped_rows"] == 0
    assert (out / "checkpoints").is_dir() and (out / "report.md").is_file()
