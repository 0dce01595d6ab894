"""The controller's REST API on a real HTTP server (uvicorn on 127.0.0.1): routes, auth, error statuses, and a
property-based fuzz of every route from its OpenAPI schema. The controller behind it is a small deterministic
stand-in with the real Controller's methods over a real InterventionRecords (the API layer is what is tested here;
tests/test_controller.py runs the real controller on real services)."""

import logging
import math

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from npo.core.config import AutoNPOConfig, ConfigError, from_dict
from services.controller.api import create_app, load_token, serve_api, stop_api
from services.controller.errors import Conflict, NotFound
from services.controller.records import InterventionRecords

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKPOINTS = (0, 10, 20)
"""The stand-in run: checkpoints 0, 10, 20; at step 25 of 100."""


class StandIn:
    """The real Controller's methods over a real InterventionRecords, with a fixed run (step 25 of 100,
    checkpoints 0, 10, 20). `finish_at_once` ends every intervention right after it starts (for the fuzz, so that
    starts keep reaching the controller); step 13 is a checkpoint whose rollback fails unexpectedly (500); a step
    after 25 is beyond the learner's step (409)."""

    def __init__(self, records, finish_at_once=False):
        self.records, self.finish_at_once = records, finish_at_once
        self.enabled, self.overrides = True, {}

    def status(self):
        running = self.records.running()
        return {
            "step": 25,
            "reward": None,  # no sample yet: null, never 0
            "entropy": math.nan,  # what a broken scrape may give: sent as null
            "metrics": {"ok": False, "age_s": None, "stale": True, "error": "no samples of npo_reward_mean"},
            "segment": {"segment_id": "", "mode": "grpo", "guide_step": None, "segment_end_step": 100},
            "autonpo": {"enabled": self.enabled, "overrides": self.overrides, "cooldown_until": None},
            "running_intervention": running.id if running else None,
        }

    def _start(self, kind, request):
        started = self.records.start(kind, request)
        if self.finish_at_once:
            self.records.finish(started.id, "succeeded", outcome={"step": 25})
        return started.to_dict()

    def start_early_bootstrap(self, scout_steps):
        if 25 + scout_steps > 100:
            raise Conflict("scout_steps: passes the run's end (100)")
        return self._start("early_bootstrap", {"scout_steps": scout_steps})

    def start_plateau_breakthrough(self, plateau_start, lookahead_steps):
        if plateau_start not in CHECKPOINTS:
            raise NotFound(f"plateau_start: no checkpoint of step {plateau_start}")
        if plateau_start + lookahead_steps > 25:
            raise ValueError(f"lookahead_steps: step {plateau_start + lookahead_steps} is past the current step 25")
        return self._start("plateau_breakthrough", {"plateau_start": plateau_start, "lookahead": lookahead_steps})

    def start_rollback(self, step):
        if step > 25:  # as the real controller: a rollback goes back, never beyond the learner's current step
            raise Conflict(f"step: {step} is beyond the learner's current step 25; a rollback goes back")
        if step == 13:
            raise RuntimeError(f"learner unreachable\nsecond line of {TOKEN}")
        if step not in CHECKPOINTS:
            raise NotFound(f"step: no checkpoint of step {step} (have: {list(CHECKPOINTS)})")
        return self._start("rollback", {"step": step})

    def set_autonpo(self, enabled, overrides):
        from_dict(AutoNPOConfig, overrides, "autonpo.")  # ConfigError naming a bad key
        self.enabled, self.overrides = enabled, overrides
        return {"enabled": enabled, "overrides": overrides, "cooldown_until": None}

    def interventions(self, limit, offset):
        return [iv.to_dict() for iv in self.records.list(limit=limit, offset=offset)]

    def intervention(self, intervention_id):
        found = self.records.get(intervention_id)
        return found.to_dict() if found else None


def start(tmp_path, token=TOKEN, finish_at_once=False, **kwargs):
    controller = StandIn(InterventionRecords(tmp_path / "c.db"), finish_at_once)
    server, thread, port = serve_api(create_app(controller, token, **kwargs), "127.0.0.1", 0)
    return controller, server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture
def api(tmp_path):
    controller, server, thread, url = start(tmp_path)
    with httpx.Client(base_url=url, timeout=10) as client:
        yield controller, client
    stop_api(server, thread)


def test_every_route_on_its_happy_path(api):
    controller, http = api
    assert http.get("/healthz").json() == {"status": "ok"}
    status = http.get("/v1/status").json()
    assert status["step"] == 25 and status["reward"] is None and status["entropy"] is None  # never 0 for missing
    assert status["metrics"]["stale"] and "npo_reward_mean" in status["metrics"]["error"]
    assert status["running_intervention"] is None
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/rollback", "/v1/autonpo", "/v1/interventions/{intervention_id}"} <= set(paths)
    assert "409" in paths["/v1/rollback"]["post"]["responses"] and http.get("/docs").status_code == 200

    rollback = http.post("/v1/rollback", json={"step": 10}, headers=AUTH)
    assert rollback.status_code == 202 and rollback.json()["state"] == "running"
    assert rollback.json()["kind"] == "rollback" and rollback.json()["request"] == {"step": 10}
    iv = rollback.json()["id"]
    assert http.get("/v1/status").json()["running_intervention"] == iv
    controller.records.add_command(iv, "Learner.Rollback", {"to_step": 10}, {"step": 10})
    controller.records.finish(iv, "succeeded", outcome={"step": 10})

    early = http.post("/v1/interventions/early-bootstrap", json={"scout_steps": 5}, headers=AUTH)
    assert early.status_code == 202 and early.json()["request"] == {"scout_steps": 5}
    controller.records.finish(early.json()["id"], "failed", error="learner failed")
    plateau = http.post("/v1/interventions/plateau-breakthrough", json={"plateau_start": 10, "lookahead_steps": 4},
                        headers=AUTH)  # fmt: skip
    assert plateau.status_code == 202 and plateau.json()["kind"] == "plateau_breakthrough"

    one = http.get(f"/v1/interventions/{iv}").json()
    assert one["state"] == "succeeded" and one["outcome"] == {"step": 10}
    assert one["commands"][0]["call"] == "Learner.Rollback" and one["commands"][0]["result"] == {"step": 10}
    listed = http.get("/v1/interventions").json()["interventions"]
    assert [x["kind"] for x in listed] == ["plateau_breakthrough", "early_bootstrap", "rollback"]
    page = http.get("/v1/interventions", params={"limit": 1, "offset": 1}).json()["interventions"]
    assert [x["id"] for x in page] == [early.json()["id"]] and page[0]["error"] == "learner failed"

    switched = http.put("/v1/autonpo", json={"enabled": False, "overrides": {"window": 20}}, headers=AUTH)
    assert switched.status_code == 200 and switched.json()["enabled"] is False
    assert controller.overrides == {"window": 20} and not controller.enabled
    assert http.put("/v1/autonpo", json={"enabled": True}, headers=AUTH).json()["overrides"] == {}


def test_mutations_need_the_right_token_which_is_never_echoed(api, caplog):
    controller, http = api
    caplog.set_level(logging.DEBUG)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}):  # fmt: skip
        for method, path, body in (("POST", "/v1/rollback", {"step": 0}), ("PUT", "/v1/autonpo", {"enabled": False})):
            refused = http.request(method, path, json=body, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in refused.text
    assert controller.records.list() == [] and controller.enabled
    assert http.get("/v1/interventions").status_code == 200  # reads need no token by default
    assert TOKEN not in caplog.text


def test_error_statuses(api, caplog):
    controller, http = api
    iv = http.post("/v1/rollback", json={"step": 10}, headers=AUTH).json()["id"]
    for path, body in (("/v1/interventions/early-bootstrap", {"scout_steps": 5}), ("/v1/rollback", {"step": 0})):
        busy = http.post(path, json=body, headers=AUTH)
        assert busy.status_code == 409 and busy.json()["running_id"] == iv and iv in busy.json()["detail"]
    controller.records.finish(iv, "succeeded")

    conflict = http.post("/v1/interventions/early-bootstrap", json={"scout_steps": 500}, headers=AUTH)
    assert conflict.status_code == 409 and "run's end" in conflict.json()["detail"]
    missing = http.post("/v1/rollback", json={"step": 7}, headers=AUTH)
    assert missing.status_code == 404 and "no checkpoint of step 7" in missing.json()["detail"]
    plateau = {"plateau_start": 5, "lookahead_steps": 1}
    assert http.post("/v1/interventions/plateau-breakthrough", json=plateau, headers=AUTH).status_code == 404
    assert http.get("/v1/interventions/iv-999999").status_code == 404

    too_far = http.post("/v1/interventions/plateau-breakthrough", json={"plateau_start": 20, "lookahead_steps": 9},
                        headers=AUTH)  # fmt: skip
    assert too_far.status_code == 422 and "lookahead_steps" in too_far.json()["detail"]  # ValueError
    bad_key = http.put("/v1/autonpo", json={"enabled": True, "overrides": {"windw": 20}}, headers=AUTH)
    assert bad_key.status_code == 422 and "window" in bad_key.json()["detail"]  # ConfigError names the close key
    with pytest.raises(ConfigError):  # the stand-in refused it as the real controller does
        from_dict(AutoNPOConfig, {"windw": 20}, "autonpo.")

    with caplog.at_level(logging.ERROR, logger="services.controller.api"):
        broken = http.post("/v1/rollback", json={"step": 13}, headers=AUTH)
    assert broken.status_code == 500 and "learner unreachable" in broken.json()["detail"]
    assert "\n" not in broken.json()["detail"] and "Traceback" not in broken.text and TOKEN not in broken.text
    assert "learner unreachable" in caplog.text  # the traceback goes to the server log
    assert controller.records.running() is None


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/interventions/early-bootstrap", {"scout_steps": 0}, "scout_steps"),
        ("/v1/interventions/early-bootstrap", {"scout_steps": "ten"}, "scout_steps"),
        ("/v1/interventions/early-bootstrap", {"scout_steps": "5"}, "scout_steps"),  # strict: a string is no int
        ("/v1/interventions/early-bootstrap", {"scout_steps": True}, "scout_steps"),
        ("/v1/interventions/early-bootstrap", {"scout_steps": 2.5}, "scout_steps"),
        ("/v1/interventions/early-bootstrap", {"scout_steps": 3, "extra": 1}, "extra"),
        ("/v1/interventions/plateau-breakthrough", {"plateau_start": 1}, "lookahead_steps"),
        ("/v1/interventions/plateau-breakthrough", {"plateau_start": 0, "lookahead_steps": 0}, "lookahead_steps"),
        ("/v1/rollback", {"step": -1}, "step"),
        ("/v1/rollback", {"step": None}, "step"),
        ("/v1/rollback", [0], "body"),
        ("/v1/rollback", None, "body"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(api, path, body, field):
    controller, http = api
    reply = http.post(path, json=body, headers=AUTH)
    assert reply.status_code == 422
    assert any(field in [str(x) for x in e["loc"]] for e in reply.json()["detail"]), reply.json()
    assert controller.records.list() == []


def test_invalid_autonpo_bodies_and_queries_are_422(api):
    controller, http = api
    for body, field in (({"enabled": "yes"}, "enabled"), ({"enabled": 1}, "enabled"), ({}, "enabled"),
                        ({"enabled": True, "overrides": [1]}, "overrides")):  # fmt: skip
        reply = http.put("/v1/autonpo", json=body, headers=AUTH)
        assert reply.status_code == 422 and field in str(reply.json()["detail"]), (body, reply.json())
    assert controller.enabled
    for params, field in (({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"offset": -1}, "offset"),
                          ({"limit": "many"}, "limit")):  # fmt: skip
        reply = http.get("/v1/interventions", params=params)
        assert reply.status_code == 422 and field in str(reply.json()["detail"])


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b'{"step": 0', "application/json"),
        (b"", "application/json"),
        (b'{"step": 0}', "text/plain"),
        (b"step=0", "application/x-www-form-urlencoded"),
        (b"\xff\xfe", None),
        (b'{"step": "\xff"}', "application/json"),  # not UTF-8
    ],
)
def test_a_body_that_is_not_json_is_422(api, content, content_type):
    controller, http = api
    headers = {**AUTH, "Content-Type": content_type} if content_type else AUTH
    reply = http.post("/v1/rollback", content=content, headers=headers)
    assert reply.status_code == 422, reply.text
    assert controller.records.list() == []


def test_without_a_token_mutations_are_refused_and_reads_can_require_one(tmp_path):
    controller, server, thread, url = start(tmp_path / "a", token=None)
    try:
        off = httpx.post(f"{url}/v1/rollback", json={"step": 0}, headers=AUTH)
        assert off.status_code == 503 and "no API token configured" in off.json()["detail"]
        assert httpx.put(f"{url}/v1/autonpo", json={"enabled": False}).status_code == 503
        assert httpx.get(f"{url}/v1/status").status_code == 200 and controller.records.list() == []
    finally:
        stop_api(server, thread)
    _, server, thread, url = start(tmp_path / "b", read_auth=True)
    try:
        for path in ("/v1/status", "/v1/interventions", "/v1/interventions/iv-000001"):
            refused = httpx.get(f"{url}{path}")
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/v1/status", headers=AUTH).status_code == 200
        assert httpx.get(f"{url}/v1/interventions", headers=AUTH).json() == {"interventions": []}
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        stop_api(server, thread)
    with pytest.raises(httpx.ConnectError):  # stopped: the port is closed
        httpx.get(f"{url}/healthz")


def test_load_token_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("NPO_API_TOKEN", raising=False)
    assert load_token() is None
    monkeypatch.setenv("NPO_API_TOKEN", " tok \n")
    assert load_token() == "tok"
    monkeypatch.setenv("NPO_API_TOKEN", "  ")
    with pytest.raises(ConfigError, match="NPO_API_TOKEN"):
        load_token()
    (tmp_path / "token").write_text("from-file\n")
    assert load_token(file=tmp_path / "token") == "from-file"  # the file wins over the environment
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_token(file=tmp_path / "empty")
    with pytest.raises(ConfigError, match="absent"):
        load_token(file=tmp_path / "absent")
    monkeypatch.setenv("OTHER_TOKEN", "other")
    assert load_token(env="OTHER_TOKEN") == "other"


def test_fuzzing_the_api_from_its_schema_finds_no_server_error(tmp_path):
    """Every operation of /openapi.json, 30 positive and 30 negative generated requests each (schemathesis
    strategies driven by hypothesis), sent to the real server with the token: no 5xx, every status and body as the
    schema documents, every invalid request refused."""
    _, server, thread, url = start(tmp_path, finish_at_once=True)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]  # fmt: skip
    try:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 8
        seen: dict[str, set[int]] = {}
        for operation in operations:
            has_inputs = bool(list(operation.iter_parameters())) or len(operation.body) > 0
            modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_inputs else (GenerationMode.POSITIVE,)
            for mode in modes:  # an operation without inputs has no invalid request to make

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
                def fuzz(case):
                    response = case.call_and_validate(base_url=url, headers=AUTH, checks=checks)
                    seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

                fuzz()
        assert len(seen) == 8 and all(code < 500 for codes in seen.values() for code in codes)
        assert 202 in seen["POST /v1/rollback"] and 422 in seen["POST /v1/rollback"]
        assert 200 in seen["PUT /v1/autonpo"] and 422 in seen["PUT /v1/autonpo"]
    finally:
        stop_api(server, thread)


def test_a_rollback_beyond_the_learners_step_is_409_naming_both_steps(api):
    controller, http = api
    ahead = http.post("/v1/rollback", json={"step": 30}, headers=AUTH)
    assert ahead.status_code == 409 and "30" in ahead.json()["detail"] and "current step 25" in ahead.json()["detail"]
    assert controller.records.list() == []  # refused at request time: nothing was started


class UnreachableLearner(StandIn):
    """The stand-in with its learner down: starting an intervention raises what a learner client raises."""

    def start_rollback(self, step):
        raise ConnectionError("Learner.Status to 127.0.0.1:9: server unavailable")


def test_an_unreachable_learner_is_503_not_500(tmp_path):
    controller = UnreachableLearner(InterventionRecords(tmp_path / "c.db"))
    server, thread, port = serve_api(create_app(controller, TOKEN), "127.0.0.1", 0)
    try:
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/rollback", json={"step": 0}, headers=AUTH, timeout=10)
    finally:
        stop_api(server, thread)
    assert reply.status_code == 503 and "server unavailable" in reply.json()["detail"]
