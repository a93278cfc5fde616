"""A real carbon-cache on a loopback port, for end-to-end tests, the demo and benchmarks.

carbon-cache runs in the foreground (``--nodaemon``) as a child process with a
carbon.conf generated in a work directory, so several can run side by side and
nothing is written outside that directory. Data is read back straight from the
whisper files, the same files graphite-web reads.

Also home to the small process helpers the other harness servers share.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Callable

__all__ = [
    "CarbonNotFoundError",
    "CarbonServer",
    "ServerStartError",
    "find_carbon_cache",
    "free_port",
    "send_lines",
]

DEFAULT_RETENTIONS = "1s:1h,1m:1d"

# Where pip's carbon puts its scripts when it is not installed in a virtualenv.
_OPT_GRAPHITE_SCRIPT = Path("/opt/graphite/bin/carbon-cache.py")


class ServerStartError(RuntimeError):
    """A server process did not come up (its log tail is in the message)."""


class CarbonNotFoundError(RuntimeError):
    """No carbon-cache executable could be found."""


# -- process helpers shared by the harness servers --------------------------

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


# -- carbon-cache -------------------------------------------------------------


def send_lines(address: tuple[str, int], lines: Iterable[str], timeout_s: float = 10.0) -> bytes:
    """Send plaintext-protocol lines, half-close, and wait for the server to close.

    Returns what the server sent before closing: b"" from carbon-cache and
    carbon-c-relay, which never answer. Their close only means the lines were
    read, not stored (see DESIGN.md and tests/test_harness.py).
    """
    with socket.create_connection(address, timeout=timeout_s) as sock:
        sock.sendall("".join(line + "\n" for line in lines).encode())
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(65536)


def find_carbon_cache() -> list[str]:
    """The command that runs carbon-cache, preferring the current Python environment.

    pip's carbon installs ``carbon-cache.py`` into the environment's scripts
    directory (``.venv/bin``) and its example configs under the environment
    root; we always pass ``--config`` so that root is never used. On Python
    3.12+ PyPI's carbon does not install, and Debian's ``graphite-carbon``
    (``carbon-cache`` on PATH) takes the same flags.
    """
    if importlib.util.find_spec("carbon") is not None:
        for scripts in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
            script = Path(scripts) / "carbon-cache.py"
            if script.is_file():
                return [sys.executable, str(script)]
    debian = shutil.which("carbon-cache")
    if debian:
        return [debian]
    if _OPT_GRAPHITE_SCRIPT.is_file():
        return [str(_OPT_GRAPHITE_SCRIPT)]
    raise CarbonNotFoundError(
        "carbon-cache not found: on Python <= 3.11 run "
        "`pip install -r requirements-dev.txt` (installs carbon 1.1.10), "
        "on any Python `apt-get install graphite-carbon` (Debian's carbon-cache)"
    )


class CarbonServer:
    """carbon-cache listening for the plaintext protocol on a loopback port.

    >>> with CarbonServer(tmp_path) as carbon:
    ...     send_lines(carbon.line_address, [f"a.b 1 {int(time.time())}"])
    ...     carbon.wait_for_points("a.b")
    """

    def __init__(
        self,
        work_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        retentions: str = DEFAULT_RETENTIONS,
        storage_schemas: Path | None = None,
        storage_aggregation: Path | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        check_loopback(host)
        self.work_dir = Path(work_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.cache_query_port = free_port(host)
        self.retentions = retentions
        self.storage_schemas = storage_schemas
        self.storage_aggregation = storage_aggregation
        self.start_timeout_s = start_timeout_s
        self.conf_dir = self.work_dir / "conf"
        self.storage_dir = self.work_dir / "storage"
        self.data_dir = self.storage_dir / "whisper"
        self.log_path = self.work_dir / "carbon-cache.log"
        self.pid_path = self.work_dir / "carbon-cache.pid"
        self.start_seconds: float | None = None  # how long the last start() took
        self._proc: subprocess.Popen | None = None

    # -- lifecycle --

    @property
    def line_address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def cache_query_address(self) -> tuple[str, int]:
        """Carbon's cache query (carbonlink) port, for graphite-web's CARBONLINK_HOSTS."""
        return (self.host, self.cache_query_port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> CarbonServer:
        if self.running:
            raise RuntimeError("carbon-cache is already running")
        argv = find_carbon_cache()
        self._write_config()
        # carbon refuses to start while its pid file names a live process,
        # and a killed carbon's pid may since belong to another one.
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()
        env = dict(os.environ)
        env["GRAPHITE_ROOT"] = str(self.work_dir)
        env["GRAPHITE_CONF_DIR"] = str(self.conf_dir)
        env["GRAPHITE_STORAGE_DIR"] = str(self.storage_dir)
        env["PYTHONUNBUFFERED"] = "1"
        started = time.monotonic()
        self._proc = spawn(
            [
                *argv,
                "--config",
                str(self.conf_dir / "carbon.conf"),
                "--pidfile",
                str(self.pid_path),
                "--nodaemon",
                "start",
            ],
            self.log_path,
            env=env,
            cwd=self.work_dir,
        )
        try:
            wait_listening(
                self._proc, self.line_address, self.start_timeout_s, "carbon-cache", self.log_path
            )
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: carbon stops listening and exits (resumes a paused server first).

        Like a real restart, this loses points still in carbon's cache: carbon
        1.1.x does not flush it on shutdown, and its writer runs about once a
        second. Wait for points (``wait_for_points``) before stopping to keep them.
        """
        if self._proc is not None:
            terminate(self._proc, timeout_s)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL, to simulate a crash: points still in carbon's cache are lost."""
        if self._proc is not None:
            kill(self._proc)
            self._proc = None

    def restart(self) -> CarbonServer:
        """Stop and start again on the same port, with the data already on disk."""
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: a hung server. The kernel still completes TCP handshakes
        (up to the listen backlog) but nothing reads or answers."""
        if not self.running:
            raise RuntimeError("carbon-cache is not running")
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if not self.running:
            raise RuntimeError("carbon-cache is not running")
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> CarbonServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    # -- read-back --

    def wsp_path(self, path: str) -> Path:
        return self.data_dir.joinpath(*path.split(".")).with_suffix(".wsp")

    def metric_paths(self) -> list[str]:
        """Dotted names of every metric carbon has created, sorted."""
        if not self.data_dir.is_dir():
            return []
        return sorted(
            ".".join(wsp.relative_to(self.data_dir).with_suffix("").parts)
            for wsp in self.data_dir.rglob("*.wsp")
        )

    def fetch(
        self, path: str, from_ts: int | None = None, until_ts: int | None = None
    ) -> list[tuple[int, float]]:
        """Stored points of ``path`` with ``from_ts <= ts <= until_ts``, None values left out.

        The default window is the finest archive's (the last hour with the
        default retentions), so points come back at their own resolution; a
        ``from_ts`` further back makes whisper answer from a coarser archive.
        Returns [] while the metric does not exist yet.
        """
        import whisper  # imported late: only read-back needs it

        wsp = self.wsp_path(path)
        try:
            info = whisper.info(str(wsp))  # None when the file does not exist
            if info is None:
                return []
            now = int(time.time())
            if from_ts is None:
                from_ts = now - info["archives"][0]["retention"] + 1
            # whisper's window is (from, until]: step back one so from_ts is included.
            result = whisper.fetch(str(wsp), from_ts - 1, until_ts, now=now)
        except FileNotFoundError:
            return []
        except whisper.CorruptWhisperFile:
            # Caught between carbon creating the file and writing its header.
            return []
        if result is None:
            return []
        (start, _end, step), values = result
        return [(start + i * step, value) for i, value in enumerate(values) if value is not None]

    def wait_for(
        self,
        predicate: Callable[[], object],
        timeout_s: float = 10.0,
        what: str = "condition",
        poll_s: float = 0.1,
    ):
        """Poll ``predicate`` until it returns something truthy, and return that."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                paths = self.metric_paths()
                raise TimeoutError(
                    f"{what} not met within {timeout_s:g} s; carbon has "
                    f"{len(paths)} metrics {paths[:20]}; log tail:\n{self.log_tail(15)}"
                )
            time.sleep(poll_s)

    def wait_for_points(
        self, path: str, count: int = 1, timeout_s: float = 10.0
    ) -> list[tuple[int, float]]:
        """Wait until ``path`` has at least ``count`` points; return them all."""

        def enough() -> list[tuple[int, float]]:
            points = self.fetch(path)
            return points if len(points) >= count else []

        return self.wait_for(enough, timeout_s, f"{count} point(s) in {path}")

    def all_points(self, paths: Iterable[str] | None = None) -> dict[str, list[tuple[int, float]]]:
        """Points of every metric (or of ``paths``), keyed by dotted name."""
        return {p: self.fetch(p) for p in (self.metric_paths() if paths is None else paths)}

    def wait_for_total(
        self, count: int, paths: Iterable[str] | None = None, timeout_s: float = 10.0
    ) -> dict[str, list[tuple[int, float]]]:
        """Wait until the metrics (all, or ``paths``) hold ``count`` points between them."""
        wanted = list(paths) if paths is not None else None

        def enough() -> dict[str, list[tuple[int, float]]]:
            points = self.all_points(wanted)
            return points if sum(map(len, points.values())) >= count else {}

        return self.wait_for(enough, timeout_s, f"{count} point(s) in total")

    # -- configuration --

    def _write_config(self) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # carbon reads both files from the directory holding carbon.conf.
        schemas = self.conf_dir / "storage-schemas.conf"
        if self.storage_schemas is not None:
            shutil.copyfile(self.storage_schemas, schemas)
        else:
            schemas.write_text(
                f"[default]\npattern = .*\nretentions = {self.retentions}\n", encoding="utf-8"
            )
        aggregation = self.conf_dir / "storage-aggregation.conf"
        if self.storage_aggregation is not None:
            shutil.copyfile(self.storage_aggregation, aggregation)
        else:
            # xFilesFactor 0 so even one point a minute rolls up into the
            # coarser archive: renders over a day then still show test data.
            aggregation.write_text(
                "[counters]\npattern = (_kwh|_total)$\nxFilesFactor = 0\n"
                "aggregationMethod = last\n\n"
                "[default]\npattern = .*\nxFilesFactor = 0\naggregationMethod = average\n",
                encoding="utf-8",
            )
        settings = {
            "STORAGE_DIR": self.storage_dir,
            "LOCAL_DATA_DIR": self.data_dir,
            "WHITELISTS_DIR": self.storage_dir / "lists",
            "LOG_DIR": self.work_dir / "log",
            "PID_DIR": self.work_dir,
            "USER": "",
            "LINE_RECEIVER_INTERFACE": self.host,
            "LINE_RECEIVER_PORT": self.port,
            "ENABLE_UDP_LISTENER": "False",
            "UDP_RECEIVER_INTERFACE": self.host,
            # Port 0 switches the pickle receiver off.
            "PICKLE_RECEIVER_INTERFACE": self.host,
            "PICKLE_RECEIVER_PORT": 0,
            "CACHE_QUERY_INTERFACE": self.host,
            "CACHE_QUERY_PORT": self.cache_query_port,
            "ENABLE_MANHOLE": "False",
            "ENABLE_AMQP": "False",
            "MAX_CACHE_SIZE": "inf",
            "MAX_UPDATES_PER_SECOND": "inf",
            "MAX_CREATES_PER_MINUTE": "inf",
            "ENABLE_TAGS": "False",
            "CACHE_WRITE_STRATEGY": "sorted",
            # No carbon.agents.* self-metrics: metric_paths() shows only what was sent.
            "CARBON_METRIC_INTERVAL": 0,
            "LOG_UPDATES": "False",
            "LOG_CACHE_HITS": "False",
            "LOG_CACHE_QUEUE_SORTS": "False",
            "LOG_CREATES": "True",
            "ENABLE_LOGROTATION": "False",
        }
        body = "".join(f"{key} = {value}\n" for key, value in settings.items())
        (self.conf_dir / "carbon.conf").write_text(
            "# Generated by harness/carbon.py\n[cache]\n" + body, encoding="utf-8"
        )
