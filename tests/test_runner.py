"""End-to-end runs of the step loop on the tiny preset: real model, real task and verifier, real checkpoints.

The guidance store here is the in-memory one (the Redis store is exercised through the CLI in test_cli.py).
"""

import json
import math

import pytest
import torch
from reference import EARLY_BOOTSTRAP_NPO, EARLY_BOOTSTRAP_SEGMENTS, TINY_CHAIN_SUM

from npo.runtime.checkpoint import CheckpointError
from npo.runtime.models import load_policy
from npo.runtime.run_config import load_run_config
from npo.runtime.runner import Interrupted, PromptSampler, Runner
from npo.runtime.store import MemoryGuideStore
from npo.runtime.tasks import COMPACT_ALPHABET, load_task

TIMING_KEYS = {"wall_time", "gen_seconds", "train_seconds"}


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


def make(tmp_path, model_cache, *overrides, name="run", store=None, after_step=None):
    cfg = load_run_config(
        None,
        [
            "seed=3",
            f"model.cache_dir={model_cache}",
            "model.warmup_steps=120",
            *TINY_CHAIN_SUM,
            "eval.every=2",
            "eval.num_prompts=12",
            "checkpoint.every=1",
            "autonpo.candidate_deltas=[1, 2]",
            *overrides,
        ],
    )
    task = load_task(cfg.task)
    pairs = [(p.compact_prompt, p.solution) for p in task.train]
    policy = load_policy(cfg.model, seed=cfg.seed, warmup_pairs=pairs, alphabet=COMPACT_ALPHABET)
    return Runner(
        cfg,
        tmp_path / name,
        policy=policy,
        task=task,
        store=store or MemoryGuideStore(),
        progress=False,
        after_step=after_step,
    )


def rows(runner):
    return [json.loads(line) for line in (runner.out / "metrics.jsonl").read_text().splitlines()]


def events(runner):
    return [json.loads(line) for line in (runner.out / "interventions.jsonl").read_text().splitlines()]


def untimed(rs):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]


def weights(runner):
    return {k: v.clone() for k, v in runner.policy.model.state_dict().items()}


def test_grpo_run_writes_metrics_and_checkpoints(tmp_path, model_cache):
    runner = make(tmp_path, model_cache, "method=grpo", "train.steps=4")
    runner.train()
    rs = rows(runner)
    assert [r["step"] for r in rs] == [0, 1, 2, 3, 4]
    assert rs[-1]["segment"] == "final" and "eval_acc" in rs[-1]
    for key in ("wall_time", "reward_mean", "pass_rate", "entropy", "guide_slots", "loss", "clip_frac", "segment"):
        assert key in rs[0]
    assert all(r["guide_slots"] == 0 for r in rs[:-1])
    assert "eval_acc" in rs[0] and "eval_acc" in rs[2] and "eval_acc" not in rs[1]
    assert runner.ckpt.steps() == [0, 1, 2, 3, 4]
    assert rs[-1]["optimizer_steps"] == 4
    assert events(runner) == []


def test_npo_early_bootstrap_scouts_rolls_back_and_replays(tmp_path, model_cache):
    runner = make(
        tmp_path,
        model_cache,
        *EARLY_BOOTSTRAP_NPO,
        "npo.early.delta=2",
        "npo.guide_samples=16",
        "algo.tau_gate=1.0",  # gate every group that has a guide
    )
    assert runner.cfg.npo.early.enabled  # a partial section keeps the default's enabled=true
    runner.train()
    rs = rows(runner)
    assert [(r["step"], r["segment"]) for r in rs] == EARLY_BOOTSTRAP_SEGMENTS
    assert rs[-1]["optimizer_steps"] == 7  # 5 main-line steps + 2 scout steps
    ev = events(runner)
    assert [e["event"] for e in ev] == ["scout_start", "guides", "rollback"]
    assert ev[1]["guide_step"] == 3 and ev[2]["to_step"] == 1
    assert ev[1]["guides"] > 0, "the warmed tiny model should solve some replay prompts with 16 samples"
    # Guides are read only for gated prompts, and only in the replay segment.
    assert sum(r["guide_slots"] for r in rs if r["segment"] == "npo_replay") > 0
    # Common random numbers: the replay's first step sees the same prompts and samples as the scout's first step,
    # so the on-policy rewards are identical; only the guide slot differs.
    assert rs[1]["reward_mean"] == rs[3]["reward_mean"]


def test_two_guide_slots_per_group_in_the_replay(tmp_path, model_cache):
    runner = make(
        tmp_path,
        model_cache,
        *EARLY_BOOTSTRAP_NPO,
        "npo.early.delta=2",
        "npo.guide_samples=16",
        "algo.tau_gate=1.0",
        "algo.guide_slots=2",
    )
    seen = []  # (segment, [(prompt_id, guide slots, is_guide)] per group) of every step
    train_step = runner.learner.train_step

    def recording(groups, prompt_ids):
        seen.append((runner.segment.name, [(g.prompt_id, g.guides, g.is_guide) for g in groups]))
        return train_step(groups, prompt_ids)

    runner.learner.train_step = recording
    runner.train()
    rs = [r for r in rows(runner) if r["segment"] != "final"]
    assert [(r["step"], r["segment"]) for r in rs] == EARLY_BOOTSTRAP_SEGMENTS[:-1]
    for row, (segment, groups) in zip(rs, seen, strict=True):
        assert row["guide_slots"] == sum(m for _, m, _ in groups)  # the metric counts replaced slots
        for prompt_id, m, is_guide in groups:
            assert is_guide == [False] * (4 - m) + [True] * m  # the last m slots
            if segment == "npo_replay" and m:  # m = min(k, the prompt's cached guides)
                assert m == len(runner.store.get_guide_lists(runner.run, 3, [prompt_id], 2)[prompt_id])
    guided = [m for segment, groups in seen if segment == "npo_replay" for _, m, _ in groups if m]
    assert guided and set(guided) == {2}, guided  # every guided group of this run had two guides: 2 slots each
    replay = [r["guide_slots"] for r in rs if r["segment"] == "npo_replay"]
    assert sum(replay) == 2 * len(guided)


def test_autonpo_probes_and_intervenes(tmp_path, model_cache):
    runner = make(
        tmp_path,
        model_cache,
        "method=autonpo",
        "train.steps=6",
        "autonpo.min_step=2",
        "autonpo.window=1",
        "autonpo.reward_gain_min=10",  # any reward change counts as stagnation
        "autonpo.require_entropy_drop=false",
        "autonpo.q_min=0.0",
        "autonpo.probe_samples=16",
        "autonpo.mistake_pass_rate=0.5",
    )
    runner.train()
    ev = events(runner)
    probes = [e for e in ev if e["event"] == "probe"]
    assert probes, "the permissive trigger must fire"
    decided = [e for e in probes if e["decision"]]
    assert decided
    decision = decided[0]["decision"]
    assert decision["rollback_step"] == decision["trigger_step"] - decision["delta"]
    cands = decided[0]["candidates"]
    for c in cands:
        assert c["s_hat"] == pytest.approx(c["q_hat"] / c["v_hat"])
    rollbacks = [e for e in ev if e["event"] == "rollback"]
    assert rollbacks and rollbacks[0]["to_step"] == decision["rollback_step"]
    replay = [r for r in rows(runner) if r["segment"] == "autonpo_replay"]
    assert len(replay) >= decision["delta"]
    if decision["prompt_ids"]:
        assert sum(r["guide_slots"] for r in replay) > 0


def test_rollback_restores_everything_exactly(tmp_path, model_cache):
    runner = make(tmp_path, model_cache, "method=grpo", "train.steps=5", "eval.every=0")
    runner.train()
    w5 = weights(runner)
    opt5 = runner.learner.optimizer.state_dict()
    runner.rollback(2)
    assert runner.step == 2
    assert not all(torch.equal(w5[k], v) for k, v in runner.policy.model.state_dict().items())
    runner.run_until(5)
    for k, v in runner.policy.model.state_dict().items():
        assert torch.equal(w5[k], v), k
    opt = runner.learner.optimizer.state_dict()
    for pid, st in opt5["state"].items():
        assert torch.equal(st["exp_avg"], opt["state"][pid]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], opt["state"][pid]["exp_avg_sq"])
    rs = rows(runner)
    first = {r["step"]: r for r in rs[:5]}
    for r in rs[6:]:
        assert r["reward_mean"] == first[r["step"]]["reward_mean"] and r["loss"] == first[r["step"]]["loss"]


def test_evaluation_never_changes_training(tmp_path, model_cache):
    with_eval = make(tmp_path, model_cache, "method=grpo", "train.steps=4", "eval.every=1", name="a")
    with_eval.train()
    without = make(tmp_path, model_cache, "method=grpo", "train.steps=4", "eval.every=0", name="b")
    without.train()
    w = weights(without)
    for k, v in with_eval.policy.model.state_dict().items():
        assert torch.equal(w[k], v), k
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("eval")} for r in untimed(rs)]  # noqa: E731
    assert strip(rows(with_eval)) == strip(rows(without))


REPLAY_RUN = ("method=npo", "train.steps=6", "npo.early.at_step=1", "npo.early.delta=2", "npo.early.replay_steps=4")
"""Scout 1 -> 3, roll back to 1, replay 1 -> 5 with NPO, then plain GRPO to 6."""


def full_and_interrupted(tmp_path, model_cache):
    """An uninterrupted REPLAY_RUN, and the same run interrupted (Ctrl-C) after step 2 of the replay; the interrupted
    one's step."""
    full = make(tmp_path, model_cache, *REPLAY_RUN, name="full")
    full.train()

    def stop_in_replay(runner, row):
        if row["segment"] == "npo_replay" and row["step"] == 2:
            runner.request_stop()

    cut = make(tmp_path, model_cache, *REPLAY_RUN, name="cut", after_step=stop_in_replay)
    with pytest.raises(Interrupted) as info:
        cut.train()
    return full, cut, info.value.step


def test_interrupt_and_resume_equals_uninterrupted(tmp_path, model_cache):
    common = REPLAY_RUN
    full, cut, step = full_and_interrupted(tmp_path, model_cache)
    assert step == 3 and cut.ckpt.latest() == 3
    # A new process: fresh model, fresh (empty) guidance store; the checkpoint carries the segment's guides.
    resumed = make(tmp_path, model_cache, *common, name="cut")
    resumed.train(resume=True)
    assert untimed(rows(resumed)) == untimed(rows(full))
    w = weights(full)
    for k, v in resumed.policy.model.state_dict().items():
        assert torch.equal(w[k], v), k


def test_prompt_sampler_is_a_function_of_step():
    task_like = [type("P", (), {"prompt_id": str(i)})() for i in range(10)]
    a, b = PromptSampler(task_like, 3, seed=1), PromptSampler(task_like, 3, seed=1)
    assert [p.prompt_id for p in a.batch(7)] == [p.prompt_id for p in b.batch(7)]
    epoch = [p.prompt_id for s in range(3) for p in a.batch(s)]
    assert len(set(epoch)) == 9  # no repeats within an epoch
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(task_like, 11, seed=0)


def test_retention_keeps_what_a_pending_intervention_needs(tmp_path, model_cache):
    runner = make(
        tmp_path,
        model_cache,
        *EARLY_BOOTSTRAP_NPO,
        "npo.early.delta=3",
        "checkpoint.keep_last=1",
        "eval.every=0",
    )
    runner.train()  # the rollback to step 1 happens at step 4: checkpoint 1 must have survived pruning
    assert [e["event"] for e in events(runner)] == ["scout_start", "guides", "rollback"]
    assert runner.ckpt.steps() == [5]  # once the plan is done, only the newest is kept


def test_npo_early_and_late_interventions(tmp_path, model_cache):
    runner = make(
        tmp_path,
        model_cache,
        "method=npo",
        "train.steps=7",
        "eval.every=0",
        "npo.early.delta=2",
        "npo.late.enabled=true",
        "npo.late.at_step=4",
        "npo.late.delta=2",
    )
    runner.train()
    ev = [(e["kind"], e["event"]) for e in events(runner)]
    assert ev == [
        ("early_bootstrap", "scout_start"),
        ("early_bootstrap", "guides"),
        ("early_bootstrap", "rollback"),
        ("plateau_breakthrough", "scout_start"),
        ("plateau_breakthrough", "guides"),
        ("plateau_breakthrough", "rollback"),
    ]
    segments = [(r["step"], r["segment"]) for r in rows(runner)]
    assert segments[-4:] == [(4, "npo_replay"), (5, "npo_replay"), (6, "grpo"), (7, "final")]
    assert rows(runner)[-1]["optimizer_steps"] == 11  # 7 main-line steps + two scouts of 2


def test_repeated_late_interventions_follow_the_delta_schedule(tmp_path, model_cache):
    # late at 2, every 4 steps, Delta doubling: plans (t, Delta) = (2, 1), (6, 2); (10, 4) would end at 14 > 11
    runner = make(
        tmp_path,
        model_cache,
        "method=npo",
        "train.steps=11",
        "eval.every=0",
        "npo.early.enabled=false",
        "npo.late.enabled=true",
        "npo.late.at_step=2",
        "npo.late.delta=1",
        "npo.late.repeat_every=4",
        "npo.late.delta_growth=2",
    )
    runner.train()
    rollbacks = [(e["step"], e["to_step"]) for e in events(runner) if e["event"] == "rollback"]
    assert rollbacks == [(3, 2), (8, 6)]  # guide steps 3 = 2 + 1 and 8 = 6 + 2
    assert rows(runner)[-1]["optimizer_steps"] == 11 + 1 + 2  # main line + the two scouts


def test_probe_reads_samples_scores_and_decides_through_its_ports():
    """npo.runtime.probe with fake ports: the ports' calls, K_hat per Delta, Delta* and the guides named."""
    from npo.core.autonpo import AutoNPO, mean_token_kl
    from npo.core.config import AutoNPOConfig
    from npo.core.types import Problem, Sample
    from npo.runtime.probe import ProbePorts, run_probe, unguarded

    autonpo = AutoNPO(AutoNPOConfig(candidate_deltas=[2, 4], probe_samples=2, q_min=0.0, beta=1.0, window=3))
    problems = {p: Problem(p, p, "1") for p in ("a", "b", "c")}
    mistakes = {"a": 9, "b": 8, "c": 6}  # c failed before t - 2: only in B_4
    calls = []

    def sample(probed, n, step):
        calls.append(("sample", [p.prompt_id for p in probed], n, step))
        reward = {"a": 1.0, "b": 0.0, "c": 1.0}
        return [[Sample(p.prompt_id, [3], [-0.5], reward[p.prompt_id] * i) for i in range(n)] for p in probed]

    def score(step, prompts, responses):
        calls.append(("score", step, len(prompts)))
        return [[-0.5 - 0.1 * (10 - step)] for _ in responses]

    ports = ProbePorts(
        mistakes=lambda lo, hi: calls.append(("mistakes", lo, hi)) or {p: s for p, s in mistakes.items() if lo <= s},
        sample=sample,
        score=score,
        encode=lambda problem: [1, ord(problem.prompt_id)],
    )
    result = run_probe(
        unguarded(autonpo), 10, [0, 6, 8], ports, problems=problems, seed=0, correct_threshold=1.0, reading=None
    )
    assert calls == [("mistakes", 6, 10), ("sample", ["a", "b", "c"], 2, 10), ("score", 8, 6), ("score", 6, 6)]
    assert result.reason is None and result.solved == {"a": True, "b": False, "c": True}
    kl = {c.delta: c.kl for c in result.candidates}
    assert kl[2] == mean_token_kl([[-0.5]] * 6, [[-0.7]] * 6) and kl[4] == mean_token_kl([[-0.5]] * 6, [[-0.9]] * 6)
    assert result.decision is not None and result.decision.prompt_ids == tuple(p.prompt_id for p in result.guides)
    assert all(g.reward == 1.0 for g in result.guides)

    empty = run_probe(
        unguarded(autonpo), 20, [16, 18], ProbePorts(lambda lo, hi: {}, sample, score, ports.encode),
        problems=problems, seed=0, correct_threshold=1.0, reading=None,
    )  # fmt: skip
    assert empty.reason == "empty_pool" and autonpo.cooldown_until == 23
    assert run_probe(unguarded(autonpo), 1, [0], ports, problems=problems, seed=0, correct_threshold=1.0,
                     reading=None).reason == "no_candidates"  # fmt: skip


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, model_cache):
    common = REPLAY_RUN
    full, cut, _ = full_and_interrupted(tmp_path, model_cache)
    newest = cut.ckpt.newest_first()[0]
    assert newest == 3
    model_file = cut.ckpt.path(newest) / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # a crash mid-write of the disk, not of the checkpoint
    resumed = make(tmp_path, model_cache, *common, name="cut")
    lines = []
    resumed.log = lines.append
    assert resumed.resume() == 2  # the previous one: step 2 of the replay, saved after the rollback
    assert [line for line in lines if "step_000003" in line and "model.safetensors" in line]
    assert resumed.segment.name == "npo_replay" and resumed.segment.end == 5
    resumed.train(resume=True)
    assert untimed(rows(resumed)) == untimed(rows(full))
    w = weights(full)
    for k, v in resumed.policy.model.state_dict().items():
        assert torch.equal(w[k], v), k


def test_resume_without_a_valid_checkpoint_raises_checkpoint_error(tmp_path, model_cache):
    runner = make(tmp_path, model_cache, "method=grpo", "train.steps=1", "eval.every=0")
    runner.train()
    for step in runner.ckpt.steps():
        (runner.ckpt.path(step) / "model.safetensors").write_bytes(b"")
    again = make(tmp_path, model_cache, "method=grpo", "train.steps=1", "eval.every=0")
    again.log = lambda line: None
    with pytest.raises(CheckpointError, match="no valid checkpoint left.*hint"):
        again.train(resume=True)


def test_a_nonfinite_loss_skips_the_optimizer_step(tmp_path, model_cache):
    lines, seen = [], {}
    runner = make(
        tmp_path,
        model_cache,
        "method=grpo",
        "train.steps=3",
        "eval.every=0",
        after_step=lambda r, row: seen.setdefault(row["step"], weights(r)),
    )
    runner.log = lines.append
    real = runner.learner.train_step

    def poisoned(groups, prompt_ids):
        if runner.step == 1:  # what a guide whose log-probs are NaN does to the importance ratio
            groups[0].behaviour_logprobs[-1] = [float("nan")] * len(groups[0].behaviour_logprobs[-1])
        return real(groups, prompt_ids)

    runner.learner.train_step = poisoned
    runner.train()
    rs = rows(runner)
    assert "nonfinite_skipped" not in rs[0]
    assert [r.get("nonfinite_skipped") for r in rs[1:3]] == [1, 1] and math.isnan(rs[1]["loss"])
    assert [r["optimizer_steps"] for r in rs] == [1, 1, 2, 2]
    for k, v in seen[0].items():  # step 1 left the weights as step 0 made them
        assert torch.equal(v, seen[1][k]), k
    assert all(torch.isfinite(v).all() for v in runner.policy.model.state_dict().values())
    assert [line for line in lines if "step 1:" in line and "skipped" in line]
    assert runner.ckpt.load(3).trainer_state["nonfinite_skipped"] == 1


def test_torch_learner_refuses_a_group_with_nan_guide_logprobs():
    from reference import GROUP_PROMPTS, PAD, mixed_groups, tiny_llama

    from npo.core.config import AlgoConfig
    from npo.runtime.learner import TorchLearner

    model = tiny_llama(0)
    algo = AlgoConfig(group_size=4, tau_gate=0.6, is_correction=True)
    learner = TorchLearner(model, pad_id=PAD, algo=algo, lr=1e-2, weight_decay=0.01, micro_batch_size=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = mixed_groups(model, 0)
    (gated,) = [g for g in groups if g.replaced]
    gated.behaviour_logprobs[-1] = [float("nan")] * len(gated.behaviour_logprobs[-1])  # the guide slot's q_i
    metrics = learner.train_step(groups, GROUP_PROMPTS)
    assert metrics["nonfinite_skipped"] == 1 and not math.isfinite(metrics["loss"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert learner.optimizer.state_dict()["state"] == {}  # AdamW never stepped
    assert learner.state_dict()["nonfinite_skipped"] == 1
