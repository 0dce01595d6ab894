"""Guide sources other than the near future (guide.source past / far_future / external / none) on real tiny runs."""

import json

import pytest
from reference import TINY_CHAIN_SUM

from npo.core.config import ConfigError
from npo.runtime.models import load_policy, save_policy
from npo.runtime.run_config import load_run_config
from npo.runtime.runner import Runner
from npo.runtime.store import MemoryGuideStore
from npo.runtime.tasks import COMPACT_ALPHABET, load_task

BASE = [
    "seed=5",
    "model.warmup_steps=120",
    *TINY_CHAIN_SUM,
    "eval.every=0",
    "checkpoint.every=2",
]


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


def make(tmp_path, model_cache, *overrides, name="run"):
    cfg = load_run_config(None, [*BASE, f"model.cache_dir={model_cache}", *overrides])
    task = load_task(cfg.task)
    pairs = [(p.compact_prompt, p.solution) for p in task.train]
    policy = load_policy(cfg.model, seed=cfg.seed, warmup_pairs=pairs, alphabet=COMPACT_ALPHABET)
    return Runner(cfg, tmp_path / name, policy=policy, task=task, store=MemoryGuideStore(), progress=False)


def rows(runner):
    return [json.loads(line) for line in (runner.out / "metrics.jsonl").read_text().splitlines()]


def test_config_checks_sources():
    assert (
        load_run_config(None, ["method=grpo"]).guide.resolved(load_run_config(None, ["method=grpo"]).method) == "none"
    )
    with pytest.raises(ConfigError, match="guide.source"):
        load_run_config(None, ["method=grpo", "guide.source=nearest"])
    with pytest.raises(ConfigError, match="guide.source: method npo"):
        load_run_config(None, ["method=npo", "guide.source=past"])
    with pytest.raises(ConfigError, match="near_future guides come from scouting"):
        load_run_config(None, ["method=grpo", "guide.source=near_future"])
    with pytest.raises(ConfigError, match="guide.model"):
        load_run_config(None, ["method=grpo", "guide.source=external"])
    with pytest.raises(ConfigError, match="guide.model"):
        load_run_config(None, ["method=grpo", "guide.source=past", "guide.model=/tmp"])
    with pytest.raises(ConfigError, match="guide.past_max_age"):
        load_run_config(None, ["method=grpo", "guide.source=past", "guide.past_max_age=-1"])


def test_past_replays_own_earlier_trajectories_and_forgets_the_future_on_rollback(tmp_path, model_cache):
    runner = make(tmp_path, model_cache, "method=grpo", "guide.source=past", "train.steps=14")
    used = []
    original = runner.learner.train_step

    def spy(groups, prompt_ids):
        used.extend(g.samples[-1] for g in groups if g.replaced)
        return original(groups, prompt_ids)

    runner.learner.train_step = spy
    runner.train()
    assert sum(r.get("guide_slots", 0) for r in rows(runner)) == len(used) > 0
    steps = {r["step"]: r for r in rows(runner)}
    for guide in used:  # every guide is a verified trajectory the run itself sampled at an earlier step
        assert guide.reward == 1.0 and 0 <= guide.policy_step
    assert all(g.policy_step < 14 for g in runner.guide_source.kept.values()) and runner.guide_source.kept
    assert len(steps) == 15  # 14 steps + the final row
    runner.rollback(8)
    assert runner.guide_source.kept and all(g.policy_step < 8 for g in runner.guide_source.kept.values())


def test_past_equals_grpo_when_nothing_was_replayed_yet(tmp_path, model_cache):
    """Common random numbers: step 0 of a past-source run equals GRPO's (no earlier trajectory exists)."""
    a = make(tmp_path, model_cache, "method=grpo", "train.steps=1", name="grpo")
    b = make(tmp_path, model_cache, "method=grpo", "guide.source=past", "train.steps=1", name="past")
    a.train()
    b.train()
    ra, rb = rows(a)[0], rows(b)[0]
    assert rb["guide_slots"] == 0
    assert ra["loss"] == rb["loss"] and ra["reward_mean"] == rb["reward_mean"]


def test_model_source_guides_come_from_the_guide_model(tmp_path, model_cache):
    guide_cfg = load_run_config(None, [*BASE, f"model.cache_dir={model_cache}", "model.warmup_steps=400"])
    task = load_task(guide_cfg.task)
    pairs = [(p.compact_prompt, p.solution) for p in task.train]
    teacher = load_policy(guide_cfg.model, seed=11, warmup_pairs=pairs, alphabet=COMPACT_ALPHABET)
    folder = tmp_path / "teacher"
    save_policy(teacher, folder)
    weak = "model.warmup_steps=20"  # a weak student: most groups fall under the gate
    runner = make(
        tmp_path, model_cache, weak, "method=grpo", "guide.source=external", f"guide.model={folder}", "train.steps=3"
    )
    runner.train()
    events = [json.loads(line) for line in (runner.out / "interventions.jsonl").read_text().splitlines()]
    made = [e for e in events if e["event"] == "guides"]
    assert len(made) == 1 and made[0]["kind"] == "external" and made[0]["guides"] > 0
    assert sum(r.get("guide_slots", 0) for r in rows(runner)) > 0
    # the guide model's samples are counted as compute: 60 prompts x npo.guide_samples (8) on top of 3 x 6 x 4
    assert rows(runner)[-1]["samples_total"] == 3 * 6 * 4 + 60 * 8
    sampled = runner.guide_source.sampled.values()
    assert all(len(guides) == 1 and guides[0].policy_step == -1 for guides in sampled)  # algo.guide_slots 1: one each


def test_missing_guide_model_is_a_clear_error(tmp_path, model_cache):
    runner = make(tmp_path, model_cache, "method=grpo", "guide.source=far_future", f"guide.model={tmp_path}/none")
    with pytest.raises(FileNotFoundError, match="guide.model"):
        runner.train()
