"""gRPC plumbing shared by every service of proto/npo/v1: server, channel, status codes, health.

Server side:
- `make_server` builds a grpc.Server with message size limits and the one `StatusInterceptor`, which maps a
  servicer's exceptions to status codes (`status_for`): ValueError (ConfigError included) -> INVALID_ARGUMENT with
  the exception's message, KeyError/FileNotFoundError -> NOT_FOUND, ConnectionError/TimeoutError -> UNAVAILABLE,
  NotImplementedError -> UNIMPLEMENTED, anything else -> INTERNAL with a one-line message (the traceback is logged
  here, on the server). Servicer methods therefore just raise.
- `bind` listens on an address and returns the port; `add_health` registers grpc.health.v1 reporting SERVING.
- `start_server` does all of that for one servicer and starts the server; `serve_forever` prints the line a launcher
  waits for (`... serving on HOST:PORT ...`), serves until SIGTERM or Ctrl-C, then stops gracefully
  (`wait_for_shutdown` is its wait, also used by the controller's HTTP server).
- `abort_on` answers one exception type raised in a block with a chosen status (FAILED_PRECONDITION, DATA_LOSS).

Client side:
- `open_channel` makes a channel that gives every call a default deadline (`DefaultDeadline`) and whose gRPC
  service config retries the methods that the .proto marks `idempotency_level = IDEMPOTENT` or `NO_SIDE_EFFECTS`
  on UNAVAILABLE, with exponential backoff (`RetryPolicy`); send and receive size limits are set on both ends.
- `error_from_rpc` turns a failed call back into a builtin exception: INVALID_ARGUMENT -> ValueError (the server's
  message verbatim), NOT_FOUND -> LookupError, UNAVAILABLE -> ConnectionError, DEADLINE_EXCEEDED -> TimeoutError,
  UNIMPLEMENTED -> NotImplementedError, others -> RuntimeError.
- `ServiceClient` is the base of the service clients: channels to one address (or to several replicas), the
  deadline, `_call` raising error_from_rpc's exceptions, `close` and the context manager.

The Sample <-> npo.v1.Sample conversion lives in services.codec (no grpc there, so storage code can use it).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pb2 import MethodOptions
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message sent or received, both ends (gRPC's own default receive limit is 4 MiB)."""
DEFAULT_TIMEOUT_S = 30.0
"""Deadline of a call when the caller gives none."""
_RETRIED_LEVELS = (MethodOptions.IDEMPOTENT, MethodOptions.NO_SIDE_EFFECTS)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of idempotent calls that failed with UNAVAILABLE (gRPC retry policy, backoff jittered by +-20%)."""

    max_attempts: int = 5
    """Attempts in all, the first included (gRPC allows 2 to 5)."""
    initial_backoff_s: float = 0.2
    """Pause before the first retry."""
    max_backoff_s: float = 2.0
    """Longest pause between two attempts."""
    backoff_multiplier: float = 2.0
    """Each pause is the previous one times this (capped at max_backoff_s)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ValueError(f"max_attempts: expected an integer, got {self.max_attempts!r}")
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts: must be in [2, 5] (gRPC's limit), got {self.max_attempts}")
        if not self.initial_backoff_s >= 0.001:
            raise ValueError(f"initial_backoff_s: must be >= 0.001 s, got {self.initial_backoff_s}")
        if not self.max_backoff_s >= self.initial_backoff_s:
            raise ValueError(f"max_backoff_s: must be >= initial_backoff_s, got {self.max_backoff_s}")
        if not self.backoff_multiplier >= 1.0:
            raise ValueError(f"backoff_multiplier: must be >= 1, got {self.backoff_multiplier}")


DEFAULT_RETRY = RetryPolicy()
"""The retry policy of channels made without one."""


# ----------------------------------------------------------------------------------------------------------------
# Server side.


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a servicer exception is answered with (see the module docstring)."""
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, KeyError):
        return grpc.StatusCode.NOT_FOUND, str(exc.args[0]) if len(exc.args) == 1 else str(exc)
    if isinstance(exc, FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented"
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {first_line}); see the server log"


@contextlib.contextmanager
def abort_on(context: grpc.ServicerContext, error: type[Exception], code: grpc.StatusCode) -> Iterator[None]:
    """Answer an `error` raised inside the block with status `code` and the exception's message (for the statuses
    that `status_for` does not give, such as FAILED_PRECONDITION or DATA_LOSS)."""
    try:
        yield
    except error as exc:
        context.abort(code, str(exc))


def _aborted(context: grpc.ServicerContext) -> bool:
    """True when the servicer already chose a status (context.abort raises a bare Exception after setting it)."""
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


def _answer_exception(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    """Abort the call with the status of `exc`; log the traceback of unexpected ones."""
    if _aborted(context):
        raise exc
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed: %s", method, message, exc_info=exc)
    context.abort(code, message)


def _parse(raw: Any, deserializer: Callable | None, context: grpc.ServicerContext, method: str) -> Any:
    """The request message of `raw` bytes; a request that does not parse is INVALID_ARGUMENT (gRPC itself would
    answer INTERNAL)."""
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except Exception as exc:  # noqa: BLE001 - google.protobuf.message.DecodeError and friends
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message for {method} ({detail})")


def _wrap_unary_response(behavior: Callable, method: str, deserializer: Callable | None = None) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        request = _parse(request, deserializer, context, method)
        try:
            return behavior(request, context)
        except Exception as exc:
            _answer_exception(exc, context, method)

    return wrapped


def _wrap_stream_response(behavior: Callable, method: str, deserializer: Callable | None = None) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        request = _parse(request, deserializer, context, method)
        try:
            yield from behavior(request, context)
        except Exception as exc:
            _answer_exception(exc, context, method)

    return wrapped


class StatusInterceptor(grpc.ServerInterceptor):
    """Maps the exceptions of every handler of the server to status codes with `status_for`."""

    def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        # Unary requests arrive as bytes and are parsed inside the wrapper, so a malformed one gets INVALID_ARGUMENT.
        raw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
        parse = handler.request_deserializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary_response(handler.unary_unary, method, parse), **raw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary_response(handler.stream_unary, method), **codec)
        if handler.unary_stream:
            behavior = _wrap_stream_response(handler.unary_stream, method, parse)
            return grpc.unary_stream_rpc_method_handler(behavior, **raw)
        return grpc.stream_stream_rpc_method_handler(_wrap_stream_response(handler.stream_stream, method), **codec)


def size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options limiting sent and received messages to `max_message_bytes`."""
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1:
        raise ValueError(f"max_message_bytes: expected a positive integer, got {max_message_bytes!r}")
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def make_server(*, max_workers: int = 8, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.Server:
    """A not yet started grpc.Server with size limits and the StatusInterceptor; add servicers, `bind`, start."""
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers: expected a positive integer, got {max_workers!r}")
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-server"),
        interceptors=[StatusInterceptor()],
        options=size_options(max_message_bytes),
    )


def bind(server: grpc.Server, address: str) -> int:
    """Listen on `address` ("host:port"; port 0 picks a free one) without TLS; returns the port bound."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"address: expected host:port, got {address!r}")
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"address: cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"address: cannot listen on {address}")
    return port


def add_health(server: grpc.Server, service_names: Iterable[str]) -> health.HealthServicer:
    """Register grpc.health.v1.Health on `server`, reporting SERVING for "" (the whole server) and each name."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def start_server(
    servicer: Any,
    add_servicer: Callable[[Any, grpc.Server], None],
    service_name: str,
    address: str,
    *,
    max_workers: int = 8,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[grpc.Server, int]:
    """Serve `servicer` (registered with `add_servicer(servicer, server)`, e.g. a generated add_..._to_server) at
    `address` (port 0: a free one), with grpc.health.v1 reporting SERVING for `service_name`. Returns the started
    server and its port; stop it with `server.stop(grace)`."""
    server = make_server(max_workers=max_workers, max_message_bytes=max_message_bytes)
    add_servicer(servicer, server)
    add_health(server, [service_name])
    port = bind(server, address)
    server.start()
    return server, port


def host_of(address: str) -> str:
    """The host part of "host:port", as the `serving on HOST:PORT` lines print it."""
    return address.rsplit(":", 1)[0]


def wait_for_shutdown(ready_line: str) -> bool:
    """Print `ready_line` (what a launcher waits for), then block until SIGTERM or Ctrl-C; True for SIGTERM.

    Call it from the main thread (it installs a SIGTERM handler, removed again before returning)."""
    terminated = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    try:
        print(ready_line, flush=True)
        terminated.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return terminated.is_set()


def serve_forever(
    server: grpc.Server, ready_line: str, *, grace_s: float = 5.0, interrupt_grace_s: float = 1.0
) -> None:
    """Print `ready_line`, serve until SIGTERM (then stop with `grace_s` seconds for the calls in flight) or Ctrl-C
    (`interrupt_grace_s`), and return once the server stopped."""
    terminated = wait_for_shutdown(ready_line)
    server.stop(grace=grace_s if terminated else interrupt_grace_s).wait()


# ----------------------------------------------------------------------------------------------------------------
# Client side.


def retried_methods(service: ServiceDescriptor) -> list[str]:
    """Names of the methods of `service` that the .proto marks IDEMPOTENT or NO_SIDE_EFFECTS, in proto order."""
    return [method.name for method in service.methods if _idempotency(method) in _RETRIED_LEVELS]


def _idempotency(method: MethodDescriptor) -> int:
    return method.GetOptions().idempotency_level


def _duration(seconds: float) -> str:
    """A google.protobuf.Duration in JSON form ("1.500s")."""
    return f"{seconds:.3f}s"


def service_config(services: Sequence[ServiceDescriptor], retry: RetryPolicy) -> str:
    """gRPC service config (JSON) retrying the idempotent methods of `services` on UNAVAILABLE with `retry`.

    The default deadline is not put here: with grpcio 1.85 a service-config `timeout` was seen to expire calls about
    1.5 s early (at once for 1 s), so `open_channel` sets it with the `DefaultDeadline` interceptor instead.
    """
    policy = {
        "maxAttempts": retry.max_attempts,
        "initialBackoff": _duration(retry.initial_backoff_s),
        "maxBackoff": _duration(retry.max_backoff_s),
        "backoffMultiplier": retry.backoff_multiplier,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": s.full_name, "method": name} for s in services for name in retried_methods(s)]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}] if names else []})


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.ClientCallDetails,
):
    """grpc.ClientCallDetails with a replaced timeout."""


class DefaultDeadline(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Client interceptor giving a deadline of `timeout_s` to every call made without one."""

    def __init__(self, timeout_s: float) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        if details.timeout is not None:
            return details
        return _CallDetails(
            details.method,
            self.timeout_s,
            details.metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    address: str,
    services: Sequence[ServiceDescriptor],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    retry: RetryPolicy = DEFAULT_RETRY,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.Channel:
    """A channel to `address` for `services`: a deadline of `timeout_s` for calls made without one, retries of the
    idempotent methods, size limits.

    Reconnection to a server that is down is attempted with the same backoff as the retries, so a call retried on
    a server that starts late reaches it. TLS when `credentials` are given (grpc.ssl_channel_credentials(...)).
    """
    if not isinstance(address, str) or not address:
        raise ValueError(f"address: expected host:port, got {address!r}")
    options: list[tuple[str, Any]] = size_options(max_message_bytes) + [
        ("grpc.service_config", service_config(services, retry)),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),  # larger requests would not be retried
        ("grpc.initial_reconnect_backoff_ms", int(retry.initial_backoff_s * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(retry.initial_backoff_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(retry.max_backoff_s * 1000)),
    ]
    deadline = DefaultDeadline(timeout_s)
    if credentials is not None:
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, deadline)


def error_from_rpc(error: grpc.RpcError, *, method: str, target: str, timeout_s: float) -> Exception:
    """The builtin exception a failed call raises to its caller (see the module docstring)."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(details)
    if code is grpc.StatusCode.NOT_FOUND:
        return LookupError(details)
    if code is grpc.StatusCode.UNAVAILABLE:
        return ConnectionError(f"{method} to {target}: server unavailable: {details}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(f"{method} to {target}: no answer within the {timeout_s:g} s deadline")
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return NotImplementedError(f"{method} to {target}: {details}")
    return RuntimeError(f"{method} to {target} failed with {code.name}: {details}")


class ServiceClient:
    """Base of a client of one npo.v1 service at `target` ("host:port"), or, for a class with `replicated` set, at
    one or several replicas (`target` a "host:port" or a list of them).

    Every call has a deadline of `timeout_s` (the class's `default_timeout_s` when None); the methods the .proto
    marks idempotent are retried on UNAVAILABLE with `retry`; `credentials` make the channels TLS. A subclass names
    its `service` (descriptor) and `stub_class`, and calls `_call`; error messages name a method as
    "Rollout.Generate" (the service's name without "Service"). Use it as a context manager or `close` it.
    """

    service: ClassVar[ServiceDescriptor]
    """The service called."""
    stub_class: ClassVar[Callable[[grpc.Channel], Any]]
    """Its generated stub class."""
    default_timeout_s: ClassVar[float] = DEFAULT_TIMEOUT_S
    """Deadline of a call when the constructor gets no timeout_s."""
    replicated: ClassVar[bool] = False
    """True: the target may be a list of replicas, called in parallel through `_pool`."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout_s: float | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.addresses = replica_addresses(target) if self.replicated else [target]
        self.address = self.addresses[0]
        self.timeout_s = self.default_timeout_s if timeout_s is None else timeout_s
        options = {"retry": retry, "max_message_bytes": max_message_bytes, "credentials": credentials}
        self._channels = [open_channel(a, [self.service], timeout_s=self.timeout_s, **options) for a in self.addresses]
        self._stubs = [self.stub_class(channel) for channel in self._channels]
        self._pool: futures.ThreadPoolExecutor | None = None
        if self.replicated:
            name = f"{self.label().lower()}-client"
            self._pool = futures.ThreadPoolExecutor(max_workers=len(self.addresses), thread_name_prefix=name)

    def _call(self, method: str, request: Message, replica: int = 0, *, timeout_s: float | None = None) -> Any:
        """Send `request` to `method` (of replica `replica`) with the deadline (`timeout_s`, default the client's);
        a failure becomes `_error`'s exception."""
        try:
            return getattr(self._stubs[replica], method)(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as error:
            raise self._error(error, method, self.addresses[replica]) from None

    def _error(self, error: grpc.RpcError, method: str, target: str) -> Exception:
        """The exception a failed call raises (error_from_rpc); a subclass may map more status codes."""
        return error_from_rpc(error, method=f"{self.label()}.{method}", target=target, timeout_s=self.timeout_s)

    @classmethod
    def label(cls) -> str:
        """The service's short name in messages ("Rollout" for npo.v1.RolloutService)."""
        return cls.service.name.removesuffix("Service")

    def __repr__(self) -> str:
        target = self.addresses if self.replicated else self.address
        return f"{type(self).__name__}({target!r}, timeout_s={self.timeout_s})"

    def close(self) -> None:
        """Close the channels; the client is unusable afterwards."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def replica_addresses(addresses: str | Sequence[str]) -> list[str]:
    """The replica addresses of a client, as a list: one host:port, or a non-empty list of distinct ones; else
    ValueError naming `addresses`."""
    listed = [addresses] if isinstance(addresses, str) else list(addresses)
    if not listed or not all(isinstance(a, str) and a for a in listed):
        raise ValueError(f"addresses: expected host:port or a non-empty list of them, got {addresses!r}")
    if len(set(listed)) != len(listed):
        raise ValueError(f"addresses: listed twice: {sorted({a for a in listed if listed.count(a) > 1})}")
    return listed
