"""The controller's REST API on a real HTTP server (uvicorn on 127.0.0.1): routes, auth, error statuses, and a
property-based fuzz of every route from its OpenAPI schema. The controller behind it is a small deterministic
stand-in with the real Controller's methods (the API layer is what is tested here; tests/test_controller.py runs
the real controller on real services)."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from npo.config import AutoNPOConfig, from_dict
from services.controller.api import create_app, load_token, serve_api
from services.controller.errors import Conflict, NotFound
from services.controller.records import InterventionRecords

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class StandIn:
    """Records in a real InterventionRecords; checkpoints 0, 10, 20; step 25 of 100."""

    def __init__(self, records):
        self.records, self.enabled, self.overrides = records, True, {}

    def status(self):
        running = self.records.running()
        return {"step": None, "reward": None, "entropy": None, "metrics": {"ok": False, "error": "no samples"},
                "running_intervention": running.id if running else None}  # fmt: skip

    def _start(self, kind, request):
        return self.records.start(kind, request).to_dict()

    def start_early_bootstrap(self, scout_steps):
        if 25 + scout_steps > 100:
            raise Conflict("scout_steps: passes the run's end (100)")
        return self._start("early_bootstrap", {"scout_steps": scout_steps})

    def start_plateau_breakthrough(self, plateau_start, lookahead_steps):
        if plateau_start not in (0, 10, 20, 25):
            raise NotFound(f"plateau_start: no checkpoint of step {plateau_start}")
        return self._start("plateau_breakthrough", {"plateau_start": plateau_start, "lookahead": lookahead_steps})

    def start_rollback(self, step):
        if step not in (0, 10, 20):
            raise NotFound(f"step: no checkpoint of step {step} (have: [0, 10, 20])")
        return self._start("rollback", {"step": step})

    def set_autonpo(self, enabled, overrides):
        from_dict(AutoNPOConfig, overrides, "autonpo.")  # ConfigError naming a bad key
        self.enabled, self.overrides = enabled, overrides
        return {"enabled": enabled, "overrides": overrides}

    def interventions(self, limit, offset):
        return [iv.to_dict() for iv in self.records.list(limit=limit, offset=offset)]

    def intervention(self, intervention_id):
        found = self.records.get(intervention_id)
        return found.to_dict() if found else None


def start(tmp_path, token=TOKEN, **kwargs):
    controller = StandIn(InterventionRecords(tmp_path / "c.db"))
    server, thread, port = serve_api(create_app(controller, token, **kwargs), "127.0.0.1", 0)
    return controller, server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture
def api(tmp_path):
    controller, server, thread, url = start(tmp_path)
    with httpx.Client(base_url=url, timeout=10) as client:
        yield controller, client
    server.should_exit = True
    thread.join(10)


def test_routes_auth_and_errors(api):
    controller, http = api
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/v1/status").json()["reward"] is None  # missing is null, never 0
    assert "/v1/rollback" in http.get("/openapi.json").json()["paths"] and http.get("/docs").status_code == 200

    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        refused = http.post("/v1/rollback", json={"step": 0}, headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in refused.text
    assert controller.records.list() == []

    started = http.post("/v1/rollback", json={"step": 10}, headers=AUTH)
    assert started.status_code == 202 and started.json()["state"] == "running"
    iv = started.json()["id"]
    busy = http.post("/v1/interventions/early-bootstrap", json={"scout_steps": 5}, headers=AUTH)
    assert busy.status_code == 409 and busy.json()["running_id"] == iv
    controller.records.finish(iv, "succeeded", outcome={"step": 10})

    assert http.post("/v1/rollback", json={"step": 7}, headers=AUTH).status_code == 404
    assert http.post("/v1/interventions/early-bootstrap", json={"scout_steps": 500}, headers=AUTH).status_code == 409
    plateau = http.post("/v1/interventions/plateau-breakthrough", json={"plateau_start": 20, "lookahead_steps": 4},
                        headers=AUTH)  # fmt: skip
    assert plateau.status_code == 202
    assert http.get(f"/v1/interventions/{iv}").json()["outcome"] == {"step": 10}
    assert [x["kind"] for x in http.get("/v1/interventions").json()["interventions"]] == [
        "plateau_breakthrough", "rollback"]  # fmt: skip
    assert (
        http.get("/v1/interventions", params={"limit": 1}).json()["interventions"][0]["kind"] == "plateau_breakthrough"
    )
    assert http.get("/v1/interventions/iv-999999").status_code == 404

    ok = http.put("/v1/autonpo", json={"enabled": False, "overrides": {"window": 20}}, headers=AUTH)
    assert ok.status_code == 200 and controller.overrides == {"window": 20} and not controller.enabled
    bad_key = http.put("/v1/autonpo", json={"enabled": True, "overrides": {"windw": 20}}, headers=AUTH)
    assert bad_key.status_code == 422 and "window" in bad_key.json()["detail"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/interventions/early-bootstrap", {"scout_steps": 0}, "scout_steps"),
        ("/v1/interventions/early-bootstrap", {"scout_steps": "ten"}, "scout_steps"),
        ("/v1/interventions/early-bootstrap", {"scout_steps": 3, "extra": 1}, "extra"),
        ("/v1/interventions/plateau-breakthrough", {"plateau_start": 1}, "lookahead_steps"),
        ("/v1/rollback", {"step": -1}, "step"),
        ("/v1/rollback", None, "body"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(api, path, body, field):
    _, http = api
    reply = http.post(path, json=body, headers=AUTH)
    assert reply.status_code == 422
    assert any(field in [str(x) for x in e["loc"]] for e in reply.json()["detail"]), reply.json()


def test_a_body_that_is_not_json_is_422(api):
    _, http = api
    reply = http.post("/v1/rollback", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert reply.status_code == 422


def test_without_a_token_mutations_are_refused_and_reads_can_require_one(tmp_path, monkeypatch):
    _, server, thread, url = start(tmp_path / "a", token=None)
    try:
        assert httpx.post(f"{url}/v1/rollback", json={"step": 0}).status_code == 503
        assert httpx.get(f"{url}/v1/status").status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
    _, server, thread, url = start(tmp_path / "b", read_auth=True)
    try:
        assert httpx.get(f"{url}/v1/status").status_code == 401
        assert httpx.get(f"{url}/v1/status", headers=AUTH).status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
    monkeypatch.setenv("NPO_API_TOKEN", " tok ")
    assert load_token() == "tok"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(Exception, match="empty"):
        load_token(file=tmp_path / "empty")


def test_fuzzing_the_api_from_its_schema_finds_no_server_error(tmp_path):
    """Every operation of /openapi.json, 25 generated requests each (schemathesis strategies driven by hypothesis),
    sent to the real server with the token: no 5xx."""
    _, server, thread, url = start(tmp_path)
    try:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 8
        seen = []
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case):
                response = case.call(base_url=url, headers=AUTH)
                seen.append(response.status_code)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

            fuzz()
        assert len(seen) >= 8 and any(400 <= code < 500 for code in seen) and any(code < 300 for code in seen)
    finally:
        server.should_exit = True
        thread.join(10)
