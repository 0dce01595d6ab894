"""The controller API's request-size limit on a real HTTP server (uvicorn on 127.0.0.1): a body above
MAX_BODY_BYTES is 413 before it is parsed, whether it declares its length or streams in chunks; a body within the
limit reaches the route as before."""

import httpx
import pytest

from services.controller.api import MAX_BODY_BYTES, create_app, serve_api, stop_api
from services.controller.records import InterventionRecords

TOKEN = "limit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


class Rollbacks:
    """The one controller method these tests reach: start_rollback records what it was asked in real records."""

    def __init__(self, records):
        self.records, self.asked = records, []

    def start_rollback(self, step):
        self.asked.append(step)
        return self.records.start("rollback", {"step": step}).to_dict()


@pytest.fixture()
def api(tmp_path):
    controller = Rollbacks(InterventionRecords(tmp_path / "records.sqlite"))
    server, thread, port = serve_api(create_app(controller, TOKEN))
    try:
        yield f"http://127.0.0.1:{port}", controller
    finally:
        stop_api(server, thread)


def test_a_declared_oversize_body_is_413_and_never_reaches_the_controller(api):
    url, controller = api
    body = b'{"step": 0, "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    reply = httpx.post(f"{url}/v1/rollback", content=body, headers=AUTH, timeout=30)
    assert reply.status_code == 413
    assert reply.json() == {"detail": f"request body of {len(body)} bytes exceeds the limit of {MAX_BODY_BYTES} bytes"}
    assert controller.asked == []


def test_a_streamed_oversize_body_is_413(api):
    url, controller = api

    def chunks():
        for _ in range(8):
            yield b"x" * (MAX_BODY_BYTES // 4)

    reply = httpx.post(f"{url}/v1/rollback", content=chunks(), headers=AUTH, timeout=30)
    assert reply.status_code == 413
    assert reply.json()["detail"].startswith("request body of more than ")
    assert controller.asked == []


def test_a_body_within_the_limit_reaches_the_route(api):
    url, controller = api
    reply = httpx.post(f"{url}/v1/rollback", json={"step": 10}, headers=AUTH, timeout=30)
    assert reply.status_code == 202, reply.text
    assert controller.asked == [10]
    # and the server still answers after refusing a large body
    assert httpx.post(f"{url}/v1/rollback", content=b"x" * (MAX_BODY_BYTES + 1), headers=AUTH).status_code == 413
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
