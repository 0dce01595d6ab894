"""Service mode == embedded: the same seeded NPO run (scout, guides, rollback, replay) once with every role in this
process and once with rollout, guidance cache and learner as real gRPC servers on 127.0.0.1 (the learner samples
through the rollout replica, publishing its weights after every change, and reads guides from the cache service
over a real Redis), driven through LearnerService."""

import copy
import json

import pytest
import torch
from rows import assert_rows_close, read_rows

from npo.runtime.engine import TransformersEngine
from npo.runtime.models import load_policy
from npo.runtime.run_config import load_run_config
from npo.runtime.runner import Runner
from npo.runtime.tasks import COMPACT_ALPHABET, load_task
from services.guidance_cache.client import GuidanceCacheClient
from services.guidance_cache.embedded import EmbeddedRedis
from services.guidance_cache.server import serve as serve_cache
from services.guidance_cache.store import RedisGuideStore
from services.learner.client import LearnerClient
from services.learner.publish import WeightPublisher
from services.learner.server import prepare_run_dir
from services.learner.server import serve as serve_learner
from services.rollout.client import RolloutClient
from services.rollout.server import serve as serve_rollout

STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("models"))
    cfg = load_run_config(
        None,
        [
            "seed=5",
            "method=npo",
            f"model.cache_dir={cache}",
            "model.warmup_steps=120",
            "task.name=chain_sum",
            "task.options={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}",
            "task.train_size=60",
            "task.test_size=20",
            f"train.steps={STEPS}",
            "train.prompts_per_step=6",
            "train.lr=3e-4",
            "algo.group_size=4",
            "algo.tau_gate=0.75",
            "rollout.max_new_tokens=4",
            "npo.early={enabled: true, at_step: 0, delta: 2}",
            "npo.guide_samples=4",
            "eval.every=2",
            "eval.num_prompts=12",
            "checkpoint.every=2",
        ],
    )
    task = load_task(cfg.task)
    pairs = [(p.compact_prompt, p.solution) for p in task.train]

    def policy():
        return load_policy(cfg.model, seed=cfg.seed, warmup_pairs=pairs, alphabet=COMPACT_ALPHABET)

    return cfg, task, policy


def events(run_dir):
    return [
        {k: v for k, v in json.loads(line).items() if k != "wall_time"}
        for line in (run_dir / "interventions.jsonl").read_text().splitlines()
    ]


def without(rs, keys):
    return [{k: v for k, v in r.items() if k not in keys} for r in rs]


@pytest.mark.parametrize("guide_slots", [1, 2])
def test_service_mode_gives_the_embedded_runs_metrics(tmp_path, setup, guide_slots):
    cfg, task, make_policy = setup
    cfg = copy.deepcopy(cfg)
    cfg.algo.guide_slots = guide_slots  # 2: the cache holds lists and the learner reads two guides per prompt

    with EmbeddedRedis() as redis, RedisGuideStore(redis.url) as store:
        embedded = Runner(cfg, tmp_path / "embedded", policy=make_policy(), task=task, store=store, progress=False)
        embedded.train()
        cached = store.get_guide_lists(embedded.run, 2, [p.prompt_id for p in task.train], 3)  # guide step 0 + 2
        assert cached and {len(guides) for guides in cached.values()} <= set(range(1, guide_slots + 1))
        assert guide_slots == 1 or max(map(len, cached.values())) == 2, "no prompt had two guides: too little proved"

    servers = []
    try:
        with EmbeddedRedis() as redis, RedisGuideStore(redis.url) as backing:
            server, cache_port = serve_cache(backing)
            servers.append(server)
            replica = make_policy()
            engine = TransformersEngine(replica.model, eos_id=replica.eos_id, pad_id=replica.pad_id)
            server, rollout_port = serve_rollout(engine, replica.tokenizer, task)
            servers.append(server)
            with (
                RolloutClient(f"127.0.0.1:{rollout_port}") as rollout,
                GuidanceCacheClient(f"127.0.0.1:{cache_port}") as cache,
            ):
                policy = make_policy()
                run_dir = tmp_path / "service"
                publisher = WeightPublisher(policy.model, rollout, run_dir / "published")
                runner = Runner(
                    cfg, run_dir, policy=policy, task=task, store=cache, engine=rollout, publish=publisher,
                    progress=False,
                )  # fmt: skip
                prepare_run_dir(runner)
                server, learner_port = serve_learner(runner)
                servers.append(server)
                with LearnerClient(f"127.0.0.1:{learner_port}") as learner:
                    before = learner.status()
                    assert (before.state, before.step, before.run_steps, before.finished) == ("idle", 0, STEPS, False)
                    started = learner.run_segment(0, STEPS, "grpo")
                    status = learner.wait_segment(started.segment_id, timeout_s=300)
                    assert (status.state, status.step, status.finished, status.error) == ("idle", STEPS, True, "")
                    assert status.run == runner.run and status.run_dir == str(run_dir.resolve())
    finally:
        for server in servers:
            server.stop(grace=None)

    served, reference = read_rows(run_dir), read_rows(embedded.out)
    assert [r["segment"] for r in served] == [r["segment"] for r in reference]
    assert "scout" in {r["segment"] for r in served} and "npo_replay" in {r["segment"] for r in served}
    assert served[-1]["segment"] == "final" and "eval_acc" in served[-1]
    assert any(r.get("guide_slots", 0) > 0 for r in served), "the replay used no guide: the test proves too little"
    assert_rows_close(served, reference)
    assert without(events(run_dir), {"wall_time"}) == without(events(embedded.out), {"wall_time"})
    # Weights were published before every sampling with changed weights: each step, and after the rollback.
    assert publisher.count >= STEPS + 2
    assert all(r["weight_sync_seconds"] >= 0 for r in served if r["segment"] != "final")
    assert "weight_sync_seconds" not in reference[0]
