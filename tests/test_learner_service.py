"""LearnerService over real gRPC on 127.0.0.1, around a real Runner on the tiny preset (in-memory guide store)."""

import json

import pytest
import torch

from npo.core.types import Sample
from npo.runtime.models import load_policy
from npo.runtime.run_config import load_run_config
from npo.runtime.runner import Runner, Segment
from npo.runtime.store import MemoryGuideStore
from npo.runtime.tasks import COMPACT_ALPHABET, load_task
from services.learner.client import LearnerBusyError, LearnerClient
from services.learner.prometheus import LearnerMetrics
from services.learner.server import LearnerControl, SegmentSpec, prepare_run_dir, serve, start_or_resume

TIMING_KEYS = {"wall_time", "gen_seconds", "train_seconds"}
RUN_KEYS = {"optimizer_steps", "samples_total"}  # run bookkeeping: keeps counting across a rollback


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


def make(tmp_path, model_cache, *overrides, name="run", fresh=True):
    cfg = load_run_config(
        None,
        [
            "seed=3",
            "method=grpo",
            f"model.cache_dir={model_cache}",
            "model.warmup_steps=120",
            "task.name=chain_sum",
            "task.options={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}",
            "task.train_size=60",
            "task.test_size=20",
            "train.prompts_per_step=6",
            "train.lr=3e-4",
            "algo.group_size=4",
            "rollout.max_new_tokens=4",
            "eval.every=2",
            "eval.num_prompts=12",
            "checkpoint.every=1",
            *overrides,
        ],
    )
    task = load_task(cfg.task)
    pairs = [(p.compact_prompt, p.solution) for p in task.train]
    policy = load_policy(cfg.model, seed=cfg.seed, warmup_pairs=pairs, alphabet=COMPACT_ALPHABET)
    runner = Runner(cfg, tmp_path / name, policy=policy, task=task, store=MemoryGuideStore(), progress=False)
    if fresh:
        prepare_run_dir(runner)
    return runner


@pytest.fixture
def served(tmp_path, model_cache):
    runner = make(tmp_path, model_cache, name="served")
    server, port = serve(runner, "127.0.0.1:0")
    client = LearnerClient(f"127.0.0.1:{port}", timeout_s=30.0)
    yield runner, client
    client.pause()
    client.close()
    server.stop(grace=None)


def rows(runner):
    return [json.loads(line) for line in (runner.out / "metrics.jsonl").read_text().splitlines()]


def without(rs, keys):
    return [{k: v for k, v in r.items() if k not in keys} for r in rs]


def test_grpo_segment_matches_in_process_and_replays_after_rollback(tmp_path, model_cache, served):
    runner, client = served
    assert client.status().state == "idle" and client.status().segment_id == ""

    started = client.run_segment(0, 3, "grpo")
    assert started.end_step == 3
    status = client.wait_segment(started.segment_id, timeout_s=120)
    assert (status.state, status.step, status.mode, status.guide_step) == ("idle", 3, "grpo", -1)
    assert status.segment_end_step == 3 and status.error == ""
    served_rows = rows(runner)
    assert [r["step"] for r in served_rows] == [0, 1, 2]
    assert status.metrics["reward_mean"] == served_rows[-1]["reward_mean"]
    assert status.metrics["optimizer_steps"] == 3.0

    reference = make(tmp_path, model_cache, name="reference")
    reference.segment = Segment("grpo", False, -1, 3)
    reference.run_until(3)
    assert without(served_rows, TIMING_KEYS) == without(rows(reference), TIMING_KEYS)

    assert [c.step for c in client.list_checkpoints()] == [0, 1, 2]
    saved = client.save_checkpoint()
    assert saved.step == 3 and saved.path.endswith("step_000003") and saved.version and saved.created_unix_ms > 0
    listed = client.list_checkpoints()
    assert [c.step for c in listed] == [0, 1, 2, 3] and listed[-1] == saved

    assert client.rollback(1) == 1
    assert client.status().step == 1 and runner.step == 1
    replay = client.run_segment(1, 2, "grpo", label="replay")
    assert replay.segment_id != started.segment_id
    client.wait_segment(replay.segment_id, timeout_s=120)
    replayed = rows(runner)[3:]
    assert [r["segment"] for r in replayed] == ["replay", "replay"]
    keys = TIMING_KEYS | RUN_KEYS | {"segment"}
    assert without(replayed, keys) == without(served_rows[1:], keys)
    assert client.status().metrics["optimizer_steps"] == 5.0  # 3 + 2 optimiser steps in all


def test_npo_segment_reads_guides_and_restores_the_gate(served):
    runner, client = served
    guide_step, tok = 7, runner.policy.tokenizer
    guides = []
    for step in range(2):
        for problem in runner.sampler.batch(step):
            ids = tok.encode(problem.solution, add_special_tokens=False) + [runner.policy.eos_id]
            guides.append(Sample(problem.prompt_id, ids, [-0.5] * len(ids), 1.0, problem.solution, guide_step, True))
    runner.store.put_guides(runner.run, guide_step, guides)
    gate_before, correction_before = runner.cfg.algo.tau_gate, runner.cfg.algo.is_correction

    started = client.run_segment(
        0, 2, "npo", guide_step=guide_step, tau_gate=1.0, is_correction=False, label="npo_replay"
    )
    status = client.wait_segment(started.segment_id, timeout_s=120)
    assert (status.state, status.step, status.mode, status.guide_step) == ("idle", 2, "npo", guide_step)
    rs = rows(runner)
    assert [r["segment"] for r in rs] == ["npo_replay", "npo_replay"]
    assert all(r["gated_groups"] == 6 for r in rs)  # tau_gate 1.0 gates every group
    assert all(r["guide_slots"] > 0 for r in rs)
    assert (runner.cfg.algo.tau_gate, runner.cfg.algo.is_correction) == (gate_before, correction_before)
    assert runner.segment.name == "grpo" and not runner.segment.npo


def test_bad_requests_and_conflicts(served):
    runner, client = served
    with pytest.raises(ValueError, match="length"):
        client.run_segment(0, -1, "grpo")
    with pytest.raises(ValueError, match="guide_step"):
        client.run_segment(0, 1, "npo")
    with pytest.raises(ValueError, match="tau_gate"):
        client.run_segment(0, 1, "npo", guide_step=0, tau_gate=1.5)
    with pytest.raises(ValueError, match="from_step"):
        client.run_segment(-1, 1, "grpo")
    with pytest.raises(LearnerBusyError, match="current step 0"):
        client.run_segment(4, 1, "grpo")
    with pytest.raises(LookupError, match="no checkpoint of step 0"):
        client.rollback(0)
    with pytest.raises(ValueError, match="to_step"):
        client.rollback(-2)
    assert client.pause() == ("idle", 0) and client.resume() == ("idle", 0)

    started = client.run_segment(0, 3, "grpo")
    with pytest.raises(LearnerBusyError, match=started.segment_id):
        client.run_segment(0, 1, "grpo")
    with pytest.raises(LearnerBusyError, match=started.segment_id):
        client.rollback(0)
    state, step = client.pause()
    if state == "paused":  # the segment stopped between steps; its remaining steps wait for Resume
        assert step < 3 and client.status().state == "paused"
        with pytest.raises(LearnerBusyError, match="paused"):
            client.run_segment(step, 1, "grpo")
        assert step in [c.step for c in client.list_checkpoints()]  # pausing saves a checkpoint
        assert client.resume()[0] in ("running", "idle")
    else:
        assert (state, step) == ("idle", 3)
    status = client.wait_segment(started.segment_id, timeout_s=120)
    assert (status.state, status.step) == ("idle", 3)
    assert [r["step"] for r in rows(runner)] == [0, 1, 2]


def test_a_restarted_learner_resumes_inside_its_segment(tmp_path, model_cache):
    replay = Segment("npo_replay", True, 7, 3)  # an NPO segment of a plan, cut short by a crash after step 1
    crashed = make(tmp_path, model_cache, name="crashed")
    crashed.segment = replay
    crashed.run_until(2)  # rows 0 and 1; checkpoint 1 (before step 1) is the newest
    restarted = make(tmp_path, model_cache, name="crashed", fresh=False)
    assert start_or_resume(restarted) == 1
    assert [r["step"] for r in rows(restarted)] == [0]  # the row after the checkpoint is redone
    assert (restarted.segment.name, restarted.segment.end) == ("npo_replay", 3)
    control = LearnerControl(restarted)
    assert not control.finished
    control.run_segment(SegmentSpec(1, 2, False))  # the driver's main line must not end the replay
    control.wait(120)
    assert control.state == "idle" and restarted.step == 3
    reference = make(tmp_path, model_cache, name="reference")
    reference.segment = Segment("npo_replay", True, 7, 3)
    reference.run_until(3)
    assert [r["segment"] for r in rows(restarted)] == ["npo_replay"] * 3
    assert without(rows(restarted), TIMING_KEYS) == without(rows(reference), TIMING_KEYS)


def test_a_learner_restarted_at_the_end_is_finished_and_a_fresh_folder_starts_fresh(tmp_path, model_cache):
    done = make(tmp_path, model_cache, "train.steps=1", name="done")
    assert start_or_resume(done) is None and rows(done) == []
    done.run_until(1)
    done.finish()
    restarted = make(tmp_path, model_cache, "train.steps=1", name="done", fresh=False)
    assert start_or_resume(restarted) == 1
    assert without(rows(restarted), TIMING_KEYS) == without(rows(done), TIMING_KEYS)  # the final row again
    assert LearnerControl(restarted).finished


def test_prometheus_exports_the_refused_step_counter_once_there_is_one():
    metrics = LearnerMetrics("r")
    metrics.observe({"step": 0, "reward_mean": 0.5})
    assert metrics.registry.get_sample_value("npo_nonfinite_skipped", {"run": "r"}) is None
    metrics.observe({"step": 1, "reward_mean": 0.5, "nonfinite_skipped": 2})
    assert metrics.registry.get_sample_value("npo_nonfinite_skipped", {"run": "r"}) == 2.0
