"""The controller's REST API (FastAPI; OpenAPI at /openapi.json, docs at /docs).

    GET  /healthz                                   liveness (never needs a token)
    GET  /v1/status                                 step, reward, entropy (null when missing, never 0), learner,
                                                    segment, AutoNPO state, running intervention
    POST /v1/interventions/early-bootstrap          {scout_steps}                       -> 202 + the intervention
    POST /v1/interventions/plateau-breakthrough     {plateau_start, lookahead_steps}    -> 202
    POST /v1/rollback                               {step}                              -> 202
    PUT  /v1/autonpo                                {enabled, overrides}                -> the AutoNPO state
    GET  /v1/interventions?limit=&offset=           newest first
    GET  /v1/interventions/{id}

Mutating routes need `Authorization: Bearer <token>` (compared in constant time, never logged or echoed); 401 with
WWW-Authenticate otherwise. Without a configured token they answer 503: a controller is never open by accident.
Reads need no token unless `read_auth`. Errors: invalid body -> 422 naming the field; a second intervention while
one runs -> 409 with the running one's id; no such checkpoint / intervention -> 404; a request the run's state
forbids -> 409; anything unexpected -> 500 with a one-line message (traceback in the server log only).
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from npo.config import ConfigError
from services.controller.errors import Busy, Conflict, NotFound

log = logging.getLogger(__name__)

TOKEN_ENV = "NPO_API_TOKEN"
"""Environment variable holding the API token."""


def load_token(env: str = TOKEN_ENV, file: str | os.PathLike | None = None) -> str | None:
    """The API token from `file` (stripped) when given, else the environment variable; None when neither is set.
    An empty token is a ConfigError naming its source."""
    if file is not None:
        token = Path(file).read_text().strip()
        if not token:
            raise ConfigError(f"--token-file: {file} is empty")
        return token
    value = os.environ.get(env)
    if value is None:
        return None
    if not value.strip():
        raise ConfigError(f"{env}: set but empty")
    return value.strip()


class EarlyBootstrap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scout_steps: int = Field(ge=1, le=1_000_000, description="Delta: steps to scout ahead from the current step")


class PlateauBreakthrough(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plateau_start: int = Field(ge=0, le=1_000_000_000, description="t_p: the step the run rolls back to")
    lookahead_steps: int = Field(ge=1, le=1_000_000, description="Delta: the guide is pi^(t_p + Delta)")


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0, le=1_000_000_000, description="a checkpointed step to return to")


class AutoNPOSwitch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(description="run AutoNPO from the controller")
    overrides: dict[str, Any] = Field(default_factory=dict, description="keys of the run config's autonpo section")


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message, **extra})


def create_app(controller: Any, token: str | None, *, read_auth: bool = False) -> FastAPI:
    """The API over `controller` (services.controller.engine.Controller or anything with its methods)."""
    app = FastAPI(
        title="npo controller",
        version="1",
        description="AutoNPO controller of one run: status, manual interventions, AutoNPO switch, records.",
    )

    def check(request: Request) -> None:
        if token is None:
            raise _Refused(503, "no API token configured (set NPO_API_TOKEN or --token-file)")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise _Refused(401, "missing or wrong bearer token")

    def check_read(request: Request) -> None:
        if read_auth:
            check(request)

    mutate = [Depends(check)]
    read = [Depends(check_read)]

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(status_code=exc.status, content={"detail": exc.message}, headers=headers)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return _error(409, str(exc), running_id=exc.running_id)

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc.args[0]) if exc.args else "not found")

    @app.exception_handler(ConfigError)
    async def config_error(request: Request, exc: ConfigError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return _error(500, f"internal error ({type(exc).__name__}: {first}); see the controller's log")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/status", dependencies=read)
    def status() -> dict[str, Any]:
        return controller.status()

    @app.post("/v1/interventions/early-bootstrap", status_code=202, dependencies=mutate)
    def early_bootstrap(body: EarlyBootstrap) -> dict[str, Any]:
        return controller.start_early_bootstrap(body.scout_steps)

    @app.post("/v1/interventions/plateau-breakthrough", status_code=202, dependencies=mutate)
    def plateau_breakthrough(body: PlateauBreakthrough) -> dict[str, Any]:
        return controller.start_plateau_breakthrough(body.plateau_start, body.lookahead_steps)

    @app.post("/v1/rollback", status_code=202, dependencies=mutate)
    def rollback(body: Rollback) -> dict[str, Any]:
        return controller.start_rollback(body.step)

    @app.put("/v1/autonpo", dependencies=mutate)
    def autonpo(body: AutoNPOSwitch) -> dict[str, Any]:
        return controller.set_autonpo(body.enabled, body.overrides)

    @app.get("/v1/interventions", dependencies=read)
    def interventions(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100, offset: Annotated[int, Query(ge=0, le=10**9)] = 0
    ) -> dict[str, Any]:
        return {"interventions": controller.interventions(limit, offset)}

    @app.get("/v1/interventions/{intervention_id}", dependencies=read)
    def intervention(intervention_id: str) -> dict[str, Any]:
        found = controller.intervention(intervention_id)
        if found is None:
            raise NotFound(f"no intervention {intervention_id!r}")
        return found

    return app


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def serve_api(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> tuple[Any, threading.Thread, int]:
    """Run `app` with uvicorn in a daemon thread on host:port (0: a free port). Returns (server, thread, port);
    stop with `server.should_exit = True; thread.join()`."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="controller-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the API did not start on {host}:{bound}")
        time.sleep(0.02)
    return server, thread, bound
