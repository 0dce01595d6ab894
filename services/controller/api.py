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

Auth: mutating routes (POST, PUT) need `Authorization: Bearer <token>`, compared in constant time and never logged
or echoed; a missing or wrong token is 401 with `WWW-Authenticate: Bearer`. When no token is configured (token=None)
the mutating routes answer 503 "no API token configured": a controller is never open by accident. Reads (GET /v1/...)
need no token unless `read_auth=True` (then every /v1 route needs it); /healthz never does.

Errors (body `{"detail": ...}`): an invalid body or query -> 422 naming the field (types are strict: "5" is not an
int, 1 is not a bool; unknown fields are refused; a body that is not JSON is 422 too); ValueError / ConfigError from
the controller -> 422 with its message; errors.Busy -> 409 with `running_id`; errors.Conflict -> 409 (e.g. a rollback
to a step beyond the learner's current step, naming both); errors.NotFound -> 404; the learner unreachable
(ConnectionError, TimeoutError) -> 503 with the reason; anything else -> 500 with a one-line message (the traceback
goes to the server log only). Non-finite floats in the controller's answers are sent as null (JSON has no NaN; a
missing reading is null, never 0). A request body larger than MAX_BODY_BYTES (64 KiB) is 413 before it is parsed: by
its Content-Length, or while it streams in.
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

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from npo.core.config import ConfigError
from services.controller.errors import Busy, Conflict, NotFound
from services.controller.records import KINDS, STATES, finite

log = logging.getLogger(__name__)

TOKEN_ENV = "NPO_API_TOKEN"
"""Environment variable holding the API token."""

MAX_BODY_BYTES = 64 * 1024
"""Largest request body the API reads (every valid body is a few hundred bytes); a larger one is 413."""


def load_token(env: str = TOKEN_ENV, file: str | os.PathLike | None = None) -> str | None:
    """The API token from `file` (stripped) when given, else the environment variable `env`; None when neither is
    set. An empty token or an unreadable file is a ConfigError naming its source."""
    if file is not None:
        try:
            token = Path(file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"token file {file}: cannot be read ({exc.strerror or exc})") from None
        if not token:
            raise ConfigError(f"token file {file}: is empty")
        return token
    value = os.environ.get(env)
    if value is None:
        return None
    if not value.strip():
        raise ConfigError(f"{env}: set but empty")
    return value.strip()


_BEARER = HTTPBearer(auto_error=False, description="the controller's API token (NPO_API_TOKEN or --token-file)")
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
"""The `Authorization: Bearer` credentials (None when missing or not Bearer); declared in OpenAPI for /docs."""

_STRICT = ConfigDict(extra="forbid", strict=True)


class EarlyBootstrap(BaseModel):
    """Early bootstrap: scout `scout_steps` steps ahead, then replay from the current step with that guide."""

    model_config = _STRICT
    scout_steps: int = Field(ge=1, le=1_000_000, description="Delta: steps to scout ahead from the current step")


class PlateauBreakthrough(BaseModel):
    """Plateau breakthrough: roll back to `plateau_start`, guided by the checkpoint `plateau_start + lookahead`."""

    model_config = _STRICT
    plateau_start: int = Field(ge=0, le=1_000_000_000, description="t_p: the step the run rolls back to")
    lookahead_steps: int = Field(ge=1, le=1_000_000, description="Delta: the guide is pi^(t_p + Delta)")


class Rollback(BaseModel):
    """Roll the learner back to a checkpointed step."""

    model_config = _STRICT
    step: int = Field(ge=0, le=1_000_000_000, description="a checkpointed step to return to")


class AutoNPOSwitch(BaseModel):
    """Switch AutoNPO on or off and set overrides of the run config's autonpo section."""

    model_config = _STRICT
    enabled: bool = Field(description="run AutoNPO from the controller")
    overrides: dict[str, Any] = Field(default_factory=dict, description="keys of the run config's autonpo section")


class InterventionOut(BaseModel):
    """One intervention's record (services.controller.records.Intervention)."""

    id: str = Field(description="iv-000001, increasing")
    kind: str = Field(description=" | ".join(KINDS))
    state: str = Field(description=" | ".join(STATES))
    created_unix_ms: int
    updated_unix_ms: int
    request: dict[str, Any] = Field(description="what was asked")
    readings: dict[str, Any] = Field(description="metrics when it started (AutoNPO: the trigger's EMAs)")
    candidates: list[dict[str, Any]] = Field(description="AutoNPO: every scored Delta with q_hat, v_hat, s_hat")
    choice: dict[str, Any] = Field(description="what was chosen (Delta*, the plan)")
    commands: list[dict[str, Any]] = Field(description="commands sent, in order: {at_unix_ms, call, args, result}")
    outcome: dict[str, Any] = Field(description="how it ended")
    error: str = Field(description="why it failed or was abandoned")


class InterventionList(BaseModel):
    """Interventions, newest first."""

    interventions: list[InterventionOut]


class ErrorReply(BaseModel):
    """An error: `detail` is a message, or (422 from validation) a list of {loc, msg, type}."""

    detail: str | list[dict[str, Any]]
    running_id: str | None = Field(default=None, description="409 Busy: the running intervention's id")


def _doc(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {status: {"model": ErrorReply, "description": _STATUS_DOC[status]} for status in statuses}


_STATUS_DOC = {
    401: "missing or wrong bearer token",
    404: "no such checkpoint or intervention",
    409: "another intervention runs (running_id), or the run's state forbids the request",
    422: "invalid body or query (names the field), or a value the controller refuses",
    503: "no API token is configured (mutating routes are off), or the learner does not answer",
}


_BODY_NOT_JSON = {"loc": ["body"], "msg": "the body could not be parsed (not UTF-8 JSON)", "type": "json_invalid"}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message, **extra})


def create_app(controller: Any, token: str | None, *, read_auth: bool = False) -> FastAPI:
    """The API over `controller` (services.controller.engine.Controller or anything with its methods: status,
    start_early_bootstrap, start_plateau_breakthrough, start_rollback, set_autonpo, interventions, intervention).
    `token` None turns the mutating routes off (503); `read_auth` makes the GET /v1 routes need the token too."""
    app = FastAPI(
        title="npo controller",
        version="1",
        description="AutoNPO controller of one run: status, manual interventions, AutoNPO switch, records.",
    )

    def check(credentials: _Credentials) -> None:
        if token is None:
            raise _Refused(503, "no API token configured (set NPO_API_TOKEN or --token-file)")
        given = credentials.credentials.strip() if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise _Refused(401, "missing or wrong bearer token")

    add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    mutate = [Depends(check)]
    add_routes(
        app, controller, mutate=mutate, read=mutate if read_auth else [], read_errors=(401, 503) if read_auth else ()
    )
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as a JSON body {"detail": ...} with its status: refusals 401/503, Busy/Conflict 409, NotFound 404,
    bad values 422, an unreachable learner 503, anything unexpected 500 with one line (the traceback goes to the log
    only)."""

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

    @app.exception_handler(ConnectionError)
    async def unreachable(request: Request, exc: ConnectionError) -> JSONResponse:
        return _error(503, f"a service the controller needs does not answer: {exc}")

    @app.exception_handler(TimeoutError)
    async def timed_out(request: Request, exc: TimeoutError) -> JSONResponse:
        return _error(503, f"a service the controller needs did not answer in time: {exc}")

    @app.exception_handler(ConfigError)
    async def config_error(request: Request, exc: ConfigError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): invalid, like bad JSON
            return JSONResponse(status_code=422, content={"detail": [_BODY_NOT_JSON]})
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers)

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


def add_routes(app: FastAPI, controller: Any, *, mutate: list, read: list, read_errors: tuple[int, ...]) -> None:
    """The routes: each converts its body, calls the controller, and answers its (finite) reply."""

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    starts = _doc(401, 404, 409, 422, 503)

    @app.get("/v1/status", dependencies=read, responses=_doc(*read_errors))
    def status() -> dict[str, Any]:
        """Step, reward, entropy (null when missing, never 0), metrics' age and error, segment, AutoNPO state,
        running intervention."""
        return finite(controller.status())

    @app.post("/v1/interventions/early-bootstrap", status_code=202, dependencies=mutate, responses=starts)
    def early_bootstrap(body: EarlyBootstrap) -> InterventionOut:
        """Start an early bootstrap (runs in the background); answers the running intervention."""
        return finite(controller.start_early_bootstrap(body.scout_steps))

    @app.post("/v1/interventions/plateau-breakthrough", status_code=202, dependencies=mutate, responses=starts)
    def plateau_breakthrough(body: PlateauBreakthrough) -> InterventionOut:
        """Start a plateau breakthrough (runs in the background); answers the running intervention."""
        return finite(controller.start_plateau_breakthrough(body.plateau_start, body.lookahead_steps))

    @app.post("/v1/rollback", status_code=202, dependencies=mutate, responses=starts)
    def rollback(body: Rollback) -> InterventionOut:
        """Start a rollback to a checkpointed step (runs in the background); answers the running intervention."""
        return finite(controller.start_rollback(body.step))

    @app.put("/v1/autonpo", dependencies=mutate, responses=_doc(401, 409, 422, 503))
    def autonpo(body: AutoNPOSwitch) -> dict[str, Any]:
        """Switch AutoNPO and set its overrides; answers the AutoNPO state."""
        return finite(controller.set_autonpo(body.enabled, body.overrides))

    @app.get("/v1/interventions", dependencies=read, responses=_doc(*read_errors, 422))
    def interventions(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100, offset: Annotated[int, Query(ge=0, le=10**9)] = 0
    ) -> InterventionList:
        """Interventions, newest first."""
        return {"interventions": finite(controller.interventions(limit, offset))}

    @app.get("/v1/interventions/{intervention_id}", dependencies=read, responses=_doc(*read_errors, 404))
    def intervention(intervention_id: Annotated[str, PathParam(max_length=64)]) -> InterventionOut:
        """One intervention's record; 404 when there is none."""
        found = controller.intervention(intervention_id)
        if found is None:
            raise NotFound(f"no intervention {intervention_id!r}")
        return finite(found)


class BodyLimit:
    """ASGI middleware: a request whose body exceeds `limit` bytes is answered 413 without being parsed (a declared
    Content-Length is checked first; a streamed body is counted as it arrives)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.limit:
            return await _error(413, self.message(declared))(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI passes an HTTPException raised while reading the body to its handler
                raise HTTPException(413, self.message(f"more than {seen}"))
            return message

        await self.app(scope, counted, send)

    def message(self, size: str) -> str:
        return f"request body of {size} bytes exceeds the limit of {self.limit} bytes"


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def serve_api(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> tuple[Any, threading.Thread, int]:
    """Run `app` with uvicorn in a daemon thread on host:port (0: a free port), once it accepts connections.
    Returns (server, thread, bound port); stop with `stop_api(server, thread)`."""
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


def stop_api(server: Any, thread: threading.Thread, timeout_s: float = 10.0) -> None:
    """Stop a server started by serve_api: finish requests in flight, close the socket, join the thread."""
    server.should_exit = True
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"the API did not stop within {timeout_s:g} s")
