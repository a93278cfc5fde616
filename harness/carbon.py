"""A real carbon-cache on a loopback port, for end-to-end tests, the demo and benchmarks.

carbon-cache runs in the foreground (``--nodaemon``) as a child process with a
carbon.conf generated in a work directory, so several can run side by side and
nothing is written outside that directory. Data is read back straight from the
whisper files, the same files graphite-web reads.

The process helpers every harness server shares live in ``harness._process``;
they are re-exported here because tests, the demo and tools import them from
this module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import sys
import sysconfig
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Callable

# Re-exported: tests, demo.py and tools import the process helpers from here.
from harness._process import (  # noqa: F401
    ServerProcess,
    ServerStartError,
    _live_processes,
    check_loopback,
    free_port,
    kill,
    log_tail,
    spawn,
    terminate,
    wait_listening,
)

__all__ = [
    "CarbonNotFoundError",
    "CarbonServer",
    "ServerStartError",
    "find_carbon_cache",
    "find_carbon_python",
    "free_port",
    "send_lines",
]

DEFAULT_RETENTIONS = "1s:1h,1m:1d"

# Where pip's carbon puts its scripts when it is not installed in a virtualenv.
_OPT_GRAPHITE_SCRIPT = Path("/opt/graphite/bin/carbon-cache.py")


class CarbonNotFoundError(RuntimeError):
    """No carbon-cache executable could be found."""


def send_lines(address: tuple[str, int], lines: Iterable[str], timeout_s: float = 10.0) -> bytes:
    """Send plaintext-protocol lines, half-close, and wait for the server to close.

    Returns what the server sent before closing: b"" from carbon-cache and
    carbon-c-relay, which never answer. Their close only means the lines were
    read, not stored (see docs/design.md and tests/test_harness.py).
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


def find_carbon_python() -> str:
    """The Python interpreter that runs carbon-cache (and can import ``carbon``):
    this one with PyPI's carbon, else the one named by the script's ``#!`` line
    (the system Python for Debian's)."""
    command = find_carbon_cache()
    if len(command) > 1:
        return command[0]
    with open(command[0], "rb") as script:
        first = script.readline().decode(errors="replace")
    if not first.startswith("#!"):
        raise CarbonNotFoundError(f"{command[0]} names no interpreter on its #! line")
    return first[2:].split()[0]


class CarbonServer(ServerProcess):
    """carbon-cache listening for the plaintext protocol on a loopback port.

    >>> with CarbonServer(tmp_path) as carbon:
    ...     send_lines(carbon.line_address, [f"a.b 1 {int(time.time())}"])
    ...     carbon.wait_for_points("a.b")

    ``stop()`` (SIGTERM), like a real restart, loses points still in carbon's
    cache: carbon 1.1.x does not flush it on shutdown, and its writer runs
    about once a second. Wait for points (``wait_for_points``) before stopping
    to keep them. ``kill()`` (SIGKILL, a crash) loses them too. ``restart()``
    comes back on the same port with the data already on disk.
    """

    name = "carbon-cache"

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
        super().__init__(work_dir, host, port, start_timeout_s)
        self.cache_query_port = free_port(host)
        self.retentions = retentions
        self.storage_schemas = storage_schemas
        self.storage_aggregation = storage_aggregation
        self.conf_dir = self.work_dir / "conf"
        self.storage_dir = self.work_dir / "storage"
        self.data_dir = self.storage_dir / "whisper"
        self.pid_path = self.work_dir / "carbon-cache.pid"

    # The plaintext-protocol (line receiver) port.
    line_address = ServerProcess.address

    @property
    def cache_query_address(self) -> tuple[str, int]:
        """Carbon's cache query (carbonlink) port, for graphite-web's CARBONLINK_HOSTS."""
        return (self.host, self.cache_query_port)

    def _prepare(self) -> tuple[list[str], dict[str, str] | None]:
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
        command = [
            *argv,
            "--config",
            str(self.conf_dir / "carbon.conf"),
            "--pidfile",
            str(self.pid_path),
            "--nodaemon",
            "start",
        ]
        return command, env

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
