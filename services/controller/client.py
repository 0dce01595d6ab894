"""ControllerClient: the REST API of the controller (services/controller/api.py) for `npo status`, `npo intervene`
and `npo autonpo`.

    client = ControllerClient("http://127.0.0.1:8080", token)
    client.status()
    client.early_bootstrap(scout_steps=10)

The token authorises the mutating routes (services/ops/state.py: controller_target resolves a run folder of `npo up`
to its controller's URL and token). An HTTP error comes back as ControllerError with the status code and the API's
message.
"""

from __future__ import annotations

from typing import Any

import httpx


class ControllerError(RuntimeError):
    """The API answered with an error status."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code


def _message(reply: httpx.Response) -> str:
    try:
        body = reply.json()
    except ValueError:
        return reply.text[:300]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI's validation errors: name each field
        return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg', '')}" for d in detail)
    if isinstance(detail, dict):
        return detail.get("message") or str(detail)
    return str(detail)


class ControllerClient:
    """Calls the controller's REST API at `base_url` with `token` for the mutating routes."""

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.base_url, self.token = base_url.rstrip("/"), token
        self.run_dir: str | None = None
        """The run folder of `npo up` this client was opened from, when it was (`npo status` lists its services)."""
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, **params: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            reply = self._http.request(method, path, json=body, params=params or None, headers=headers)
        except httpx.HTTPError as exc:
            raise ConnectionError(f"controller at {self.base_url}: {exc}") from None
        if reply.status_code >= 400:
            raise ControllerError(reply.status_code, _message(reply))
        return reply.json()

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/v1/status")

    def early_bootstrap(self, scout_steps: int) -> dict[str, Any]:
        return self._call("POST", "/v1/interventions/early-bootstrap", {"scout_steps": scout_steps})

    def plateau_breakthrough(self, plateau_start: int, lookahead_steps: int) -> dict[str, Any]:
        body = {"plateau_start": plateau_start, "lookahead_steps": lookahead_steps}
        return self._call("POST", "/v1/interventions/plateau-breakthrough", body)

    def rollback(self, step: int) -> dict[str, Any]:
        return self._call("POST", "/v1/rollback", {"step": step})

    def set_autonpo(self, enabled: bool, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._call("PUT", "/v1/autonpo", {"enabled": enabled, "overrides": overrides or {}})

    def interventions(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/interventions", limit=limit, offset=offset)["interventions"]

    def intervention(self, intervention_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/interventions/{intervention_id}")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
