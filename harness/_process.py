"""Process helpers and the lifecycle every harness server shares.

Each server (carbon-cache, graphite-web, Mosquitto, carbon-c-relay) is a child
process listening on a loopback port, with its config and log in its own work
directory. ``ServerProcess`` holds the start/stop/kill/restart lifecycle; a
subclass names itself and says how to configure and launch its program.

``harness.carbon`` re-exports these names for code that imports them from there.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Callable, TypeVar

__all__ = [
    "ServerProcess",
    "ServerStartError",
    "check_loopback",
    "free_port",
    "kill",
    "log_tail",
    "spawn",
    "terminate",
    "wait_listening",
]


class ServerStartError(RuntimeError):
    """A server process did not come up (its log tail is in the message)."""


# Children still running when the interpreter exits (a test run interrupted
# between start and stop) are killed so none outlive the run.
_live_processes: set[subprocess.Popen] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live_processes):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
    _live_processes.clear()


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook that makes a Linux child get SIGTERM when its parent dies.

    Covers what atexit cannot: the test run itself killed (a CI timeout, a
    SIGKILL). Linux ties this to the thread that started the child, so start
    servers from a thread that outlives them (normally the main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        # Looked up here, not in the forked child, where importing is unsafe.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_parent_death_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return set_parent_death_signal


_PRE_EXEC = _parent_death_signal()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_loopback(host: str) -> None:
    """Refuse anything but 127.0.0.0/8: the harness never touches a real network."""
    if not host.startswith("127."):
        raise ValueError(f"harness servers bind to loopback only (127.0.0.0/8), not {host!r}")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"(empty log {path})"


def spawn(
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """Start a child with stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            # Its own session: a Ctrl-C meant for pytest does not reach it
            # half-way through a test; stop() and the atexit hook end it.
            start_new_session=True,
            preexec_fn=_PRE_EXEC,
        )
    _live_processes.add(proc)
    return proc


def wait_listening(
    proc: subprocess.Popen,
    address: tuple[str, int],
    timeout_s: float,
    name: str,
    log_path: Path,
) -> None:
    """Wait until ``address`` accepts TCP connections, failing fast if ``proc`` dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        code = proc.poll()
        if code is not None:
            raise ServerStartError(
                f"{name} exited with status {code} before listening on "
                f"{address[0]}:{address[1]}; log {log_path}:\n{log_tail(log_path)}"
            )
        try:
            with socket.create_connection(address, timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"{name} did not listen on {address[0]}:{address[1]} within "
                f"{timeout_s:g} s; log {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(0.05)


def terminate(proc: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """SIGTERM (after SIGCONT, in case it was paused), then SIGKILL if it lingers."""
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        return proc.returncode
    finally:
        _live_processes.discard(proc)


def kill(proc: subprocess.Popen) -> int:
    """SIGKILL and reap: a crash, with no chance to clean up."""
    try:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return proc.wait(timeout=10)
    finally:
        _live_processes.discard(proc)


# typing.Self needs Python 3.11; the harness also runs on 3.9.
_S = TypeVar("_S", bound="ServerProcess")


class ServerProcess:
    """One server program as a child process listening on ``host:port`` (loopback only).

    A subclass sets ``name`` (used in messages and as the log file's name) and
    implements ``_prepare``, which writes its config and returns the command
    line and environment. Everything else (start and wait until it listens,
    stop, crash, restart, context manager, log tail) is here.
    """

    name = "server"

    def __init__(
        self,
        work_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        check_loopback(host)
        self.work_dir = Path(work_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.start_timeout_s = start_timeout_s
        self.log_path = self.work_dir / f"{self.name}.log"
        self.start_seconds: float | None = None  # how long the last start() took
        self._proc: subprocess.Popen | None = None

    def _prepare(self) -> tuple[list[str], dict[str, str] | None]:
        """Find the program, write its config, and return (argv, env or None to inherit).

        Runs in ``work_dir`` (created already) on every start, and counts in
        ``start_seconds``; raise here when the program is not installed.
        """
        raise NotImplementedError

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self: _S) -> _S:
        """Configure, spawn, and return once ``address`` accepts connections.

        If the server does not come up it is killed and ``ServerStartError``
        (with its log tail) is raised.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        argv, env = self._prepare()
        self._proc = spawn(argv, self.log_path, env=env, cwd=self.work_dir)
        try:
            wait_listening(self._proc, self.address, self.start_timeout_s, self.name, self.log_path)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (resuming a paused server first), SIGKILL if it outlasts ``timeout_s``."""
        if self._proc is not None:
            terminate(self._proc, timeout_s)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL, to simulate a crash: the server gets no chance to clean up."""
        if self._proc is not None:
            kill(self._proc)
            self._proc = None

    def restart(self: _S) -> _S:
        """Stop and start again on the same port, in the same work directory."""
        self.stop()
        return self.start()

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)
