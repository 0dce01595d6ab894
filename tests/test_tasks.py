"""Tasks, rewards and verifiers: hand-written right/wrong answers, format hacks, splits, determinism, plug-ins."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import reasoning_gym

from npo.core.config import ConfigError, from_dict
from npo.core.types import Problem
from npo.runtime.tasks import (
    COMPACT_ALPHABET,
    TaskConfig,
    countdown_item,
    extract_answer,
    is_canonical_integer,
    is_compact_expression,
    load_task,
    math_reward,
)

SMALL = {"train_size": 200, "test_size": 50}


def exact_match_reward(response: str, answer: str) -> float:
    """A reward plug-in for the jsonl tests: 1.0 when the stripped response equals the answer."""
    return float(response.strip() == answer)


def numeric_problem(expression: str, answer: str) -> Problem:
    return Problem(
        prompt_id="hand/1",
        prompt=f"State the final answer to the following arithmetic problem: {expression} =",
        answer=answer,
        compact_prompt="".join(expression.split()) + "=",
        solution=answer,
        metadata={"expression": expression},
    )


def countdown_problem(numbers: list[int], target: int) -> Problem:
    return Problem(
        prompt_id="hand/2",
        prompt=f"Using all the numbers {', '.join(map(str, numbers))}, create an expression that equals {target}.",
        answer="",
        compact_prompt=" ".join(map(str, numbers)) + f">{target}:",
        metadata={"numbers": numbers, "target": target},
    )


@pytest.fixture(scope="module")
def tasks() -> dict:
    """One small compact-format task per generator (loading is the slow part; shared by the tests below)."""
    return {name: load_task(TaskConfig(name=name, **SMALL)) for name in ("chain_sum", "basic_arithmetic", "countdown")}


@pytest.mark.parametrize("task_name", ["chain_sum", "basic_arithmetic"])
def test_numeric_compact_reward_accepts_only_the_canonical_answer(tasks, task_name):
    task = tasks[task_name]
    positive = numeric_problem("12 + 34", "46")
    assert task.reward(positive, "46") == 1.0
    for wrong in ["45", "-46", "146", "4", "460"]:
        assert task.reward(positive, wrong) == 0.0, wrong
    for hack in ["046", "+46", "46.0", "4,6", "46 ", " 46", "46\n", "46=", "<answer>46</answer>", "4 6", "", "abc"]:
        assert task.reward(positive, hack) == 0.0, hack
    negative = numeric_problem("7 - 4 - 9", "-6")
    assert task.reward(negative, "-6") == 1.0
    for wrong in ["6", "--6", "- 6", "\u22126", "-06", "-6.0"]:
        assert task.reward(negative, wrong) == 0.0, wrong
    zero = numeric_problem("5 - 5", "0")
    assert task.reward(zero, "0") == 1.0
    assert task.reward(zero, "-0") == 0.0
    assert task.reward(zero, "00") == 0.0


def test_countdown_compact_reward(tasks):
    task = tasks["countdown"]
    problem = countdown_problem([3, 5, 7], 22)
    for right in ["3*5+7", "5*3+7", "7+5*3", "(3*5)+7", "7+(5*3)"]:
        assert task.reward(problem, right) == 1.0, right
    for wrong in ["3*7+5", "3+5+7", "3*5", "22", "3*5+7+0", "3*5+7*1", "3*5+7-3+3"]:
        assert task.reward(problem, wrong) == 0.0, wrong
    hacks = ["3*5+7=22", "3 * 5 + 7", "03*5+7", "3*5+07", "<answer>3*5+7</answer>", "3*5+7\n", "", "x"]
    hacks += ["__import__('os')", "3**5", "7//5", "3.0*5+7", "3*5+7 # 22"]
    for hack in hacks:
        assert task.reward(problem, hack) == 0.0, hack
    division = countdown_problem([6, 4, 2], 12)
    assert task.reward(division, "6*4/2") == 1.0
    assert task.reward(division, "6/4*2") == 0.0  # = 3


def test_natural_format_rewards():
    chain = load_task(TaskConfig(name="chain_sum", format="natural", train_size=20, test_size=5))
    problem = numeric_problem("12 + 34", "46")
    for right in ["<answer>46</answer>", "12 + 34 = 46", "So the answer is 46.", "<answer> 46 </answer>", "46"]:
        assert chain.reward(problem, right) == 1.0, right
    for wrong in ["<answer>146</answer>", "46 ... no, <answer>45</answer>", "the answer is 45", "no idea", ""]:
        assert chain.reward(problem, wrong) == 0.0, wrong  # 146: reasoning-gym alone would give 2/3
    assert chain.prompt_text(chain.train[0]).startswith("State the final answer")

    countdown = load_task(TaskConfig(name="countdown", format="natural", train_size=20, test_size=5))
    problem = countdown_problem([3, 5, 7], 22)
    for right in ["<answer>3 * 5 + 7</answer>", "Multiply first: 3*5 + 7", "<answer>(3*5)+7</answer>"]:
        assert countdown.reward(problem, right) == 1.0, right
    for wrong in ["<answer>3*7+5</answer>", "<answer>__import__('os').getcwd()</answer>", "<answer>3**5</answer>"]:
        assert countdown.reward(problem, wrong) == 0.0, wrong


def test_every_generated_solution_is_rewarded(tasks):
    for name, task in tasks.items():
        for problem in task.train + task.test:
            assert task.reward(problem, problem.solution) == 1.0, (name, problem)
        assert task.prompt_text(task.train[0]) == task.train[0].compact_prompt


def test_format_helpers():
    assert is_canonical_integer("46") and is_canonical_integer("-46") and is_canonical_integer("0")
    assert not any(is_canonical_integer(t) for t in ["046", "+46", "46.0", "4,6", "-0", "", " 46"])
    assert is_compact_expression("(98-54)*6-34-66") and is_compact_expression("10*20")
    assert not any(is_compact_expression(t) for t in ["2**3", "8//2", "05+1", "1 + 2", "1+2=3", "a", "1" * 201])
    assert extract_answer("x <answer>1</answer> y <answer>2</answer>") == "2"
    assert extract_answer("12 + 34 = 46.") == "46"
    assert extract_answer("total 1,000 apples") == "1,000"
    assert extract_answer("so (3+5)*2 works.", expression=True) == "(3+5)*2"
    assert extract_answer("nothing here") is None


@pytest.mark.parametrize("task_name", ["chain_sum", "basic_arithmetic", "countdown"])
def test_train_and_test_are_disjoint_and_sized(tasks, task_name):
    task = tasks[task_name]
    assert len(task.train) == SMALL["train_size"] and len(task.test) == SMALL["test_size"]
    train_prompts = {p.compact_prompt for p in task.train}
    test_prompts = {p.compact_prompt for p in task.test}
    assert len(train_prompts) == len(task.train) and len(test_prompts) == len(task.test)
    assert not train_prompts & test_prompts
    ids = [p.prompt_id for p in task.train + task.test]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(f"{task_name}/") for i in ids)


def test_tiny_task_space_is_an_error_not_an_overlap():
    # 2 one-digit terms with + or -: 10 * 10 * 2 = 200 distinct expressions.
    options = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    task = load_task(TaskConfig(name="chain_sum", options=options, train_size=150, test_size=40))
    assert not {p.compact_prompt for p in task.train} & {p.compact_prompt for p in task.test}
    with pytest.raises(ConfigError, match=r"task.train_size: .*too small"):
        load_task(TaskConfig(name="chain_sum", options=options, train_size=250, test_size=10))
    with pytest.raises(ConfigError, match=r"task.test_size: .*too small"):
        load_task(TaskConfig(name="chain_sum", options=options, train_size=190, test_size=20))


def test_same_config_gives_same_problems_and_seed_changes_them():
    for name in ("chain_sum", "basic_arithmetic", "countdown"):
        cfg = TaskConfig(name=name, train_size=30, test_size=10, seed=3)
        first, second = load_task(cfg), load_task(cfg)
        assert first.train == second.train and first.test == second.test
        assert [p.metadata for p in first.train] == [p.metadata for p in second.train]
        other = load_task(TaskConfig(name=name, train_size=30, test_size=10, seed=4))
        assert {p.prompt_id for p in other.train} != {p.prompt_id for p in first.train}


def test_prompt_ids_do_not_depend_on_split_sizes():
    small = load_task(TaskConfig(name="chain_sum", train_size=10, test_size=5))
    large = load_task(TaskConfig(name="chain_sum", train_size=40, test_size=5))
    assert large.train[:10] == small.train


def test_compact_forms_stay_inside_the_alphabet():
    configs = [
        TaskConfig(name="chain_sum", options={"allow_negation": True}, **SMALL),
        TaskConfig(
            name="basic_arithmetic",
            options={
                "operators": ["+", "-", "*", "/"],
                "allow_parentheses": True,
                "allow_negation": True,
                "max_digits": 3,
            },
            **SMALL,
        ),
        TaskConfig(name="basic_arithmetic", **SMALL),
        TaskConfig(name="countdown", **SMALL),
    ]
    alphabet = set(COMPACT_ALPHABET)
    for cfg in configs:
        task = load_task(cfg)
        for problem in task.train + task.test:
            assert set(problem.compact_prompt) <= alphabet, problem.compact_prompt
            assert set(problem.solution) <= alphabet, problem.solution
            assert problem.compact_prompt and problem.solution
    simple = load_task(TaskConfig(name="basic_arithmetic", **SMALL))
    assert max(len(p.compact_prompt) for p in simple.train) <= 16
    assert all(set(p.compact_prompt) <= set("0123456789+-=") for p in simple.train)


def test_countdown_matches_reasoning_gym_item_by_item():
    # reasoning-gym's own generator (sympy, ~40 ms an item) against the integer re-implementation.
    for options in [
        {},
        {"min_numbers": 3, "max_numbers": 4, "max_value": 20, "min_target": 10, "max_target": 100},
        {"operators": ["/", "*", "-"], "min_target": 1, "max_target": 5000, "shuffle": False},
    ]:
        dataset = reasoning_gym.create_dataset("countdown", size=20, seed=77, **options)
        for idx in range(20):
            theirs, ours = dataset[idx], countdown_item(dataset, idx)
            assert ours["question"] == theirs["question"]
            assert ours["metadata"]["numbers"] == theirs["metadata"]["numbers"]
            assert ours["metadata"]["target"] == theirs["metadata"]["target"]
            assert dataset.score_answer(ours["answer"], theirs) == 1.0
            assert dataset.score_answer(theirs["answer"], ours) == 1.0


def test_jsonl_task_with_a_reward_plugin(tmp_path):
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_rows = [{"prompt": "2+2?", "answer": "4", "id": "a"}, {"prompt": "3*3?", "answer": 9, "topic": "mul"}]
    train_file.write_text("\n".join(json.dumps(r) for r in train_rows) + "\n\n")
    test_file.write_text(json.dumps({"prompt": "5-1?", "answer": "4"}) + "\n")
    cfg = TaskConfig(
        name="jsonl", jsonl_train=str(train_file), jsonl_test=str(test_file), reward=f"{__name__}:exact_match_reward"
    )
    task = load_task(cfg)
    assert [p.prompt_id for p in task.train] == ["a", "jsonl/train/1"]
    assert [p.prompt_id for p in task.test] == ["jsonl/test/0"]
    assert task.train[1].answer == "9" and task.train[1].metadata == {"topic": "mul"}
    assert task.reward(task.train[0], " 4 ") == 1.0
    assert task.reward(task.train[0], "four") == 0.0
    assert task.prompt_text(task.train[0]) == "2+2?"

    default = load_task(TaskConfig(name="jsonl", jsonl_train=str(train_file)))
    assert default.test == []
    assert default.reward(default.train[1], "The answer is $\\boxed{9}$.") == 1.0
    assert default.reward(default.train[1], "\\boxed{8}") == 0.0


def test_jsonl_overlap_and_bad_lines_are_config_errors(tmp_path):
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_file.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    test_file.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    with pytest.raises(ConfigError, match="overlap"):
        load_task(TaskConfig(name="jsonl", jsonl_train=str(train_file), jsonl_test=str(test_file)))
    test_file.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match=r"task.jsonl_test: .*test.jsonl:1: needs a 'answer'"):
        load_task(TaskConfig(name="jsonl", jsonl_train=str(train_file), jsonl_test=str(test_file)))
    test_file.write_text("not json\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_task(TaskConfig(name="jsonl", jsonl_train=str(train_file), jsonl_test=str(test_file)))


def test_bad_configs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"task.name: 'chain_summ' is not one of .*did you mean 'chain_sum'"):
        from_dict(TaskConfig, {"name": "chain_summ"}, prefix="task.")
    with pytest.raises(ConfigError, match=r"task.format: .*did you mean 'natural'"):
        TaskConfig(format="natual").validate()
    with pytest.raises(ConfigError, match=r"task.options.min_termz: .*did you mean 'min_terms'"):
        TaskConfig(options={"min_termz": 2}).validate()
    with pytest.raises(ConfigError, match=r"task.options.seed"):
        TaskConfig(options={"seed": 1}).validate()
    with pytest.raises(ConfigError, match=r"task.options: invalid for chain_sum"):
        TaskConfig(options={"min_terms": 3, "max_terms": 2}).validate()
    with pytest.raises(ConfigError, match=r"task.options: countdown cannot generate"):
        load_task(TaskConfig(name="countdown", options={"min_target": 10**9, "max_target": 10**9 + 1}))
    with pytest.raises(ConfigError, match=r"task.train_size"):
        TaskConfig(train_size=0).validate()
    with pytest.raises(ConfigError, match=r"task.reward: 'no_colon' must look like 'module:function'"):
        TaskConfig(reward="no_colon").validate()
    with pytest.raises(ConfigError, match=r"task.reward: cannot import module 'no_such_module_xyz'"):
        load_task(TaskConfig(name="chain_sum", reward="no_such_module_xyz:f", train_size=5, test_size=1))
    with pytest.raises(ConfigError, match=r"task.reward: module 'json' has no function 'no_such_function'"):
        load_task(TaskConfig(name="chain_sum", reward="json:no_such_function", train_size=5, test_size=1))
    with pytest.raises(ConfigError, match=r"task.jsonl_train: file not found"):
        load_task(TaskConfig(name="jsonl", jsonl_train=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match=r"task.jsonl_train: required"):
        TaskConfig(name="jsonl").validate()
    with pytest.raises(ConfigError, match=r"task.jsonl_train: only used when task.name is 'jsonl'"):
        TaskConfig(name="chain_sum", jsonl_train="x.jsonl").validate()


def test_plugin_overrides_the_builtin_reward_and_its_errors_score_zero():
    task = load_task(TaskConfig(name="chain_sum", reward=f"{__name__}:exact_match_reward", train_size=5, test_size=1))
    problem = task.train[0]
    assert task.reward(problem, f" {problem.answer} ") == 1.0  # the plug-in strips; the compact reward would not
    assert task.reward(problem, None) == 0.0  # the plug-in raises AttributeError: scored 0.0, never raised


MATH_CASES = [
    ("The answer is $\\boxed{42}$.", "42", 1.0),
    ("\\boxed{41}", "42", 0.0),
    ("So we get \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("$0.5$", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{2}{3}}", "\\frac{1}{2}", 0.0),
    ("x = \\boxed{1+x^2}", "x^2+1", 1.0),
    ("no number at all", "42", 0.0),
    ("", "42", 0.0),
    ("\\boxed{9^{9^{9^{9}}}}", "5", 0.0),  # screened out: evaluating it would hold the interpreter for hours
]


def test_math_reward_from_threads():
    assert [math_reward(r, a) for r, a, _ in MATH_CASES] == [e for _, _, e in MATH_CASES]  # main thread too
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [(pool.submit(math_reward, r, a), e) for _ in range(4) for r, a, e in MATH_CASES]
        results = [(f.result(timeout=60), e) for f, e in futures]
    assert all(got == expected for got, expected in results), results
    assert time.perf_counter() - start < 60


def test_countdown_reward_from_threads(tasks):
    task = tasks["countdown"]
    pairs = [(p, p.solution, 1.0) for p in task.train[:40]] + [(p, "1+1", 0.0) for p in task.train[:40]]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda t: task.reward(t[0], t[1]), pairs))
    assert got == [expected for _, _, expected in pairs]


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["chain_sum", "basic_arithmetic", "countdown"])
def test_default_sizes_load_in_seconds(task_name):
    start = time.process_time()
    task = load_task(TaskConfig(name=task_name))
    elapsed = time.process_time() - start
    assert len(task.train) == 20000 and len(task.test) == 2000
    assert not {p.compact_prompt for p in task.train} & {p.compact_prompt for p in task.test}
    assert elapsed < 15, f"load_task({task_name}) took {elapsed:.1f} s of CPU"


def test_validate_fields_leaves_the_generator_options_to_validate():
    """from_dict (a run config's loading) runs validate_fields, which needs no reasoning-gym; the options are
    checked by validate (load_task) and, last, by the run config (npo.runtime.run_config.RunConfig.validate)."""
    cfg = from_dict(TaskConfig, {"options": {"min_termz": 2}}, prefix="task.")
    cfg.validate_fields()
    with pytest.raises(ConfigError, match=r"task.options.min_termz: .*did you mean 'min_terms'"):
        cfg.validate_options()
    with pytest.raises(ConfigError, match=r"task.options.min_termz"):
        cfg.validate()
    TaskConfig(name="jsonl", jsonl_train="x.jsonl").validate_options()  # jsonl: no generator, nothing to check


def test_math_reward_compares_non_math_answers_as_text():
    from npo.runtime.tasks import math_reward

    assert math_reward("Paris", "Paris") == 1.0 and math_reward("<answer> paris. </answer>", "Paris") == 1.0
    assert math_reward("Lyon", "Paris") == 0.0 and math_reward("", "yes") == 0.0
    assert math_reward("x = 0.5", "1/2") == 1.0 and math_reward("8", "7") == 0.0  # maths still goes to math-verify
