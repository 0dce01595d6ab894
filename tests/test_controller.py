"""The controller against real services on 127.0.0.1 (guidance cache over a real Redis, a rollout replica, the
learner with its /metrics) and its REST API on a real HTTP server: AutoNPO triggers by itself and records what it
saw and chose; manual interventions run to completion; one intervention at a time; state survives a restart."""

import time

import httpx
import pytest
import torch

from npo.runtime.engine import TransformersEngine
from npo.runtime.models import load_policy
from npo.runtime.run_config import load_run_config
from npo.runtime.runner import Runner
from npo.runtime.tasks import COMPACT_ALPHABET, load_task
from services.controller.api import create_app, serve_api
from services.controller.engine import Controller
from services.controller.metrics import ScrapeSource
from services.controller.records import InterventionRecords
from services.guidance_cache.client import GuidanceCacheClient
from services.guidance_cache.embedded import EmbeddedRedis
from services.guidance_cache.server import serve as serve_cache
from services.guidance_cache.store import RedisGuideStore
from services.learner.client import LearnerClient
from services.learner.prometheus import LearnerMetrics
from services.learner.publish import WeightPublisher
from services.learner.server import prepare_run_dir
from services.learner.server import serve as serve_learner
from services.rollout.client import RolloutClient
from services.rollout.server import serve as serve_rollout

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OVERRIDES = [
    "seed=1",
    "method=grpo",
    "model.warmup_steps=120",
    "task.name=chain_sum",
    "task.options={min_terms: 3, max_terms: 3, min_digits: 1, max_digits: 2}",
    "task.train_size=80",
    "task.test_size=20",
    "train.steps=40",
    "train.prompts_per_step=8",
    "train.lr=3e-4",
    "algo.group_size=4",
    "algo.tau_gate=0.5",
    "rollout.max_new_tokens=4",
    "eval.every=0",
    "checkpoint.every=2",
    "npo.guide_samples=4",
    # A trigger that fires on this short run: any gain below 1.0 counts as stagnation, no entropy drop needed.
    "autonpo={window: 3, reward_gain_min: 1.0, require_entropy_drop: false, min_step: 4, "
    "candidate_deltas: [2, 4], q_min: 0.0, probe_size: 16, probe_samples: 4, cooldown_steps: 100, "
    "mistake_pass_rate: 0.5}",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Services:
    """Cache, rollout replica and learner (with /metrics) on loopback, and clients to them."""

    def __init__(self, root, cfg):
        self.cfg, self.root = cfg, root
        task = load_task(cfg.task)
        pairs = [(p.compact_prompt, p.solution) for p in task.train]
        make = lambda: load_policy(cfg.model, seed=cfg.seed, warmup_pairs=pairs, alphabet=COMPACT_ALPHABET)  # noqa: E731
        self.task, self.servers, self.closers = task, [], []
        self.redis = EmbeddedRedis()
        self.backing = RedisGuideStore(self.redis.url)
        server, cache_port = serve_cache(self.backing)
        self.servers.append(server)
        replica = make()
        engine = TransformersEngine(replica.model, eos_id=replica.eos_id, pad_id=replica.pad_id)
        server, rollout_port = serve_rollout(engine, replica.tokenizer, task)
        self.servers.append(server)
        self.rollout = RolloutClient(f"127.0.0.1:{rollout_port}")
        self.cache = GuidanceCacheClient(f"127.0.0.1:{cache_port}")
        self.policy = make()
        run_dir = root / "run"
        self.metrics = LearnerMetrics("run")
        metrics_port = self.metrics.serve(0)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        publish = WeightPublisher(self.policy.model, self.rollout, run_dir / "published", self.metrics)
        runner = Runner(cfg, run_dir, policy=self.policy, task=task, store=self.cache, engine=self.rollout,
                        publish=publish, progress=False, after_step=self.metrics.after_step)  # fmt: skip
        prepare_run_dir(runner)
        self.runner = runner
        server, learner_port = serve_learner(runner)
        self.servers.append(server)
        self.learner = LearnerClient(f"127.0.0.1:{learner_port}")

    def controller(self, *, autonpo=True, poll_s=0.2):
        return Controller(
            self.cfg,
            learner=self.learner,
            rollout=self.rollout,
            cache=self.cache,
            source=ScrapeSource(self.metrics_url, "run"),
            records=InterventionRecords(self.root / "controller.db"),
            problems=self.task.train,
            encode=self.policy.encode_prompt,
            autonpo=autonpo,
            poll_s=poll_s,
        )

    def close(self):
        state, _ = self.learner.pause()
        self.learner.close()
        self.rollout.close()
        self.cache.close()
        for server in self.servers:
            server.stop(grace=None)
        self.metrics.stop()
        self.backing.close()
        self.redis.stop()


@pytest.fixture
def services(tmp_path):
    cfg = load_run_config(None, [f"model.cache_dir={tmp_path.parent / 'models'}", *OVERRIDES])
    s = Services(tmp_path, cfg)
    yield s
    s.close()


@pytest.fixture
def api(services):
    controller = services.controller(autonpo=False)
    server, thread, port = serve_api(create_app(controller, TOKEN), "127.0.0.1", 0)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    yield controller, client
    controller.stop()
    client.close()
    server.should_exit = True
    thread.join(10)


def wait_for(predicate, timeout_s=300, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_autonpo_triggers_by_itself_and_records_its_decision(services):
    controller = services.controller(autonpo=True)
    services.learner.run_segment(0, services.cfg.train.steps, "grpo")
    controller.start()
    try:
        record = wait_for(
            lambda: next((iv for iv in controller.records.list() if iv.kind == "autonpo" and iv.state != "running"),
                         None),
            what="an AutoNPO intervention",
        )  # fmt: skip
    finally:
        controller.stop()
    assert record.state == "succeeded", record.error
    trigger = record.readings["trigger"]
    assert trigger["warning"] and trigger["step"] >= 4 and "reward_ema" in str(trigger)
    probe_step = record.readings.get("probe_step", record.readings["paused_at"])
    assert probe_step % services.cfg.checkpoint.every == 0  # probed at a checkpoint step: candidates exist there
    assert record.candidates, (record.outcome, "no candidate was scored")
    for candidate in record.candidates:
        assert {"delta", "q_hat", "v_hat", "s_hat"} <= candidate.keys()
        assert candidate["v_hat"] >= 1.0  # V_hat = exp(beta * K_hat), K_hat >= 0
        assert candidate["s_hat"] == pytest.approx(candidate["q_hat"] / candidate["v_hat"])
    calls = [c["call"] for c in record.commands]
    assert calls[0] == "Learner.Pause" and "Learner.SaveCheckpoint" in calls
    assert "Rollout.Generate" in calls and "Rollout.Score" in calls
    if record.outcome["intervened"]:
        delta = record.outcome["delta"]
        assert record.choice["delta"] == delta and delta in (2, 4)
        assert {"GuidanceCache.PutGuides", "Learner.Rollback", "Learner.RunSegment"} <= set(calls)
    assert controller.autonpo.cooldown_until > trigger["step"]


@pytest.mark.slow
def test_manual_interventions_through_the_rest_api(services, api):
    controller, http = api
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.post("/v1/rollback", json={"step": 0}).status_code == 401
    assert http.post("/v1/rollback", json={"step": 0}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.post("/v1/rollback", json={"step": "x"}, headers=AUTH).status_code == 422

    services.learner.run_segment(0, services.cfg.train.steps, "grpo")
    wait_for(lambda: services.learner.status().step >= 4, what="step 4")
    early = http.post("/v1/interventions/early-bootstrap", json={"scout_steps": 2}, headers=AUTH)
    assert early.status_code == 202, early.text
    early_id = early.json()["id"]
    second = http.post("/v1/rollback", json={"step": 0}, headers=AUTH)
    assert second.status_code == 409 and early_id in second.text
    done = wait_for(lambda: (r := http.get(f"/v1/interventions/{early_id}").json())["state"] != "running" and r)
    assert done["state"] == "succeeded", done
    rollbacks = [c["args"]["to_step"] for c in done["commands"] if c["call"] == "Learner.Rollback"]
    t0 = done["choice"]["plan"]["rollback_step"]
    assert done["outcome"]["guides"] >= 0 and rollbacks[-1] == t0 and t0 >= 4

    missing = http.post("/v1/rollback", json={"step": 1}, headers=AUTH)  # checkpoint.every=2: step 1 has none
    assert missing.status_code == 404 and "no checkpoint" in missing.text
    step = services.learner.status().step
    plateau = http.post(
        "/v1/interventions/plateau-breakthrough", json={"plateau_start": 2, "lookahead_steps": 2}, headers=AUTH
    )
    assert plateau.status_code == 202, plateau.text
    controller.wait_idle()
    rollback = http.post("/v1/rollback", json={"step": 2}, headers=AUTH)
    assert rollback.status_code == 202, rollback.text
    controller.wait_idle()

    listed = http.get("/v1/interventions").json()["interventions"]
    assert [iv["kind"] for iv in listed][:3] == ["rollback", "plateau_breakthrough", "early_bootstrap"]
    assert all(iv["state"] == "succeeded" for iv in listed[:3]), [iv["error"] for iv in listed[:3]]
    assert step >= 4
    status = http.get("/v1/status").json()
    assert status["running_intervention"] is None and status["learner"]["state"] in ("running", "idle")


@pytest.mark.slow
def test_a_restarted_controller_keeps_its_history_and_cooldown(services):
    first = services.controller(autonpo=True)
    first.set_autonpo(True, {"window": 5})
    with first._lock:
        first.autonpo.cooldown_until = 33
        first._save_autonpo()
    services.learner.run_segment(0, 4, "grpo")
    wait_for(lambda: services.learner.status().state == "idle", what="the segment")
    record = first.records.start("rollback", {"step": 2})  # as if the controller died during this intervention
    services.learner.run_segment(4, 4, "grpo")
    services.learner.pause()

    second = services.controller(autonpo=False)  # a restart: the saved switch and state win over the argument
    assert second.autonpo_enabled and second.overrides == {"window": 5} and second.autonpo.cooldown_until == 33
    assert second.records.get(record.id).state == "abandoned"
    assert second.recovered["abandoned"] == record.id and "resumed" in second.recovered
    assert services.learner.status().state in ("running", "idle")
