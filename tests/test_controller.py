"""The controller against real services on 127.0.0.1 (guidance cache over a real Redis, a rollout replica, the
learner with its /metrics) and its REST API on a real HTTP server: AutoNPO triggers by itself and records what it
saw and chose; manual interventions run to completion; one intervention at a time; state survives a restart. Fast
tests against a stand-in learner: a rollback beyond the learner's step is refused, an unreachable learner is reported
(not a 500), and a restarted controller re-attaches to what reached the learner and abandons the rest."""

import time

import httpx
import pytest
import torch

from npo.runtime.engine import TransformersEngine
from npo.runtime.models import load_policy
from npo.runtime.run_config import load_run_config
from npo.runtime.runner import Runner
from npo.runtime.tasks import COMPACT_ALPHABET, load_task
from services.controller.api import create_app, serve_api, stop_api
from services.controller.engine import Controller
from services.controller.errors import Conflict
from services.controller.metrics import Reading, ScrapeSource
from services.controller.records import InterventionRecords
from services.guidance_cache.client import GuidanceCacheClient
from services.guidance_cache.embedded import EmbeddedRedis
from services.guidance_cache.server import serve as serve_cache
from services.guidance_cache.store import RedisGuideStore
from services.learner.client import CheckpointRecord, LearnerClient, LearnerStatus
from services.learner.prometheus import LearnerMetrics
from services.learner.publish import WeightPublisher
from services.learner.server import prepare_run_dir
from services.learner.server import serve as serve_learner
from services.ops.control import format_status
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


# -- the controller against a stand-in learner (fast): 409 rollbacks, an unreachable learner, restart rules --------


class FakeLearner:
    """A learner client's methods over a fixed state (step 10 of 30, checkpoints 0, 5, 10); `down` makes every call
    raise what LearnerClient raises for a server that does not answer."""

    def __init__(self, state="running", step=10, segment_id="seg-1"):
        self.state, self.step, self.segment_id, self.down, self.resumed = state, step, segment_id, False, 0

    def _check(self):
        if self.down:
            raise ConnectionError("Learner.Status to 127.0.0.1:9: server unavailable")

    def status(self):
        self._check()
        return LearnerStatus(self.state, self.step, self.segment_id, "grpo", -1, 30, run="fake", run_steps=30)

    def list_checkpoints(self):
        self._check()
        return [CheckpointRecord(s, f"/ckpt/{s}", "", 0) for s in (0, 5, 10)]

    def resume(self):
        self._check()
        self.resumed += 1
        self.state = "running"
        return self.state, self.step


class NoMetrics:
    def read(self):
        return Reading(error="no metrics here")

    def describe(self):
        return "none"


def fake_controller(tmp_path, learner, **kwargs):
    cfg = load_run_config(None, [f"model.cache_dir={tmp_path / 'models'}", *OVERRIDES])
    return Controller(
        cfg, learner=learner, rollout=None, cache=None, source=NoMetrics(),
        records=InterventionRecords(tmp_path / "controller.db"), problems=load_task(cfg.task).train,
        encode=lambda problem: [], autonpo=False, poll_s=0.05, learner_retry_s=0.3, **kwargs,
    )  # fmt: skip


def test_a_rollback_beyond_the_learners_step_is_a_conflict_naming_both_steps(tmp_path):
    controller = fake_controller(tmp_path, FakeLearner(step=10))
    with pytest.raises(Conflict, match=r"20 is beyond the learner's current step 10"):
        controller.start_rollback(20)
    assert controller.records.list() == []


def test_an_unreachable_learner_is_reported_not_an_error(tmp_path):
    learner = FakeLearner()
    controller = fake_controller(tmp_path, learner)
    learner.down = True
    status = controller.status()
    assert status["learner"]["reachable"] is False and "server unavailable" in status["learner"]["error"]
    assert "learner: unreachable (" in format_status(status, [])
    server, thread, port = serve_api(create_app(controller, TOKEN), "127.0.0.1", 0)
    try:
        reply = httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=30)
        started = httpx.post(f"http://127.0.0.1:{port}/v1/rollback", json={"step": 5}, headers=AUTH, timeout=30)
    finally:
        stop_api(server, thread)
    assert reply.status_code == 200 and reply.json()["learner"]["reachable"] is False
    assert started.status_code == 503 and "does not answer" in started.json()["detail"]
    learner.down = False  # back: the same controller answers with it again
    back = controller.status()["learner"]
    assert back["reachable"] is True and back["step"] == 10
    with pytest.raises(ConnectionError, match="stayed unreachable"):
        learner.down = True
        fake_controller(tmp_path / "second", learner)  # started while the learner is down: waits, then says so


def _interrupted(tmp_path, commands, kind="early_bootstrap", request=None):
    """A records file as a controller SIGKILLed during an intervention of `kind` leaves it."""
    records = InterventionRecords(tmp_path / "controller.db")
    iv = records.start(kind, request or {"scout_steps": 4})
    for call, args, result in commands:
        records.add_command(iv.id, call, args, result)
    records.close()
    return iv.id


def test_a_restarted_controller_reattaches_only_to_what_reached_the_learner(tmp_path):
    paused = ("Controller.Paused", {}, {"step": 10, "segment_end": 30})
    main_line = ("Learner.RunSegment", {"from_step": 14, "length": 16, "mode": "grpo", "phase": "main_line"},
                 {"segment_id": "seg-1", "end_step": 30})  # fmt: skip
    iv = _interrupted(tmp_path, [paused, main_line])
    controller = fake_controller(tmp_path, FakeLearner())
    controller.wait_idle(30)
    record = controller.records.get(iv)
    assert record.state == "succeeded" and record.outcome["reattached"] and controller.recovered["reattached"] == iv
    assert record.commands[-1]["call"] == "Controller.Reattach"

    scout = ("Learner.RunSegment", {"from_step": 10, "length": 4, "mode": "grpo", "label": "scout"},
             {"segment_id": "seg-9", "end_step": 14})  # fmt: skip
    iv = _interrupted(tmp_path, [paused, scout])
    controller = fake_controller(tmp_path, FakeLearner(segment_id="seg-10"))  # the learner has moved on
    record = controller.records.get(iv)
    assert record.state == "abandoned" and "Learner.RunSegment" in record.error

    learner = FakeLearner(state="paused")
    iv = _interrupted(tmp_path, [("Learner.Pause", {}, {"state": "paused", "step": 10})])
    controller = fake_controller(tmp_path, learner)
    assert controller.records.get(iv).state == "abandoned" and learner.resumed == 1
    assert controller.recovered["resumed"] == {"state": "running", "step": 10}
