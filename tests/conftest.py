"""Fixtures shared by the whole suite: real servers on loopback, and the shared test data.

A server that is not installed skips the tests that need it, with how to
install it as the reason; with ELECTRICITY_REQUIRE_SERVERS=1 (CI) it fails them.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import pytest

from harness.carbon import CarbonNotFoundError, CarbonServer
from harness.graphite_web import GraphiteWeb, GraphiteWebNotFoundError
from harness.mosquitto import MosquittoBroker, MosquittoNotFoundError
from harness.relay import CarbonRelayNotFoundError
from simulators.tuya import SimulatedTuyaDevice, TuyaSimulator
from tests.helpers import collector_environment
from tuya_devicefile import DeviceEntry, load_devices_file

_NOT_INSTALLED = (
    CarbonNotFoundError,
    CarbonRelayNotFoundError,
    GraphiteWebNotFoundError,
    MosquittoNotFoundError,
)


class _Server(Protocol):
    def start(self) -> Any: ...
    def stop(self) -> None: ...


S = TypeVar("S", bound=_Server)


@pytest.fixture(scope="session", autouse=True)
def _isolated_from_the_users_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test reads the developer's config_local.py or writes into their real
    state directory (spool, names), whatever it forgets to set."""
    root = tmp_path_factory.mktemp("isolated")
    empty_config = root / "config_local.py"
    empty_config.write_text("")
    saved = {name: os.environ.get(name) for name in ("ELECTRICITY_CONFIG", "ELECTRICITY_STATE_DIR")}
    os.environ["ELECTRICITY_CONFIG"] = str(empty_config)
    os.environ["ELECTRICITY_STATE_DIR"] = str(root / "state")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- The fast subset starts nothing -------------------------------------------------


class StartedSomething(AssertionError):
    """A test not marked slow started a server or a process."""


def _refuse(what: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise StartedSomething(
            f"this test {what}: mark it @pytest.mark.slow (the fast subset, "
            "-m 'not slow', starts no server and no process)"
        )

    return refuse


@pytest.fixture(autouse=True)
def _fast_tests_start_nothing(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests not marked ``slow`` may not listen on a socket (a server, a
    simulated device) nor start a process: that is what makes the fast subset
    fast and safe to run anywhere. Slow tests are left alone."""
    if request.node.get_closest_marker("slow") is not None:
        return
    monkeypatch.setattr(socket.socket, "listen", _refuse("listens on a socket"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("starts a process"))


# --- Every test stops the workers it started ----------------------------------------------

# The project's own long-lived threads. One left running outlives its test and
# acts in later ones: a Carbon sender retrying its backlog at a port another
# test's server has by then, a batcher pinging another test's notify socket.
_WORKER_THREADS = ("carbon-sender", "line-batcher", "waitress", "pty-bridge", "tuya-simulator")
_WORKER_GRACE_S = 5.0


@pytest.fixture(autouse=True)
def _workers_are_stopped() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + _WORKER_GRACE_S
    while True:
        left = sorted(
            thread.name
            for thread in set(threading.enumerate()) - before
            if thread.name.startswith(_WORKER_THREADS) and thread.is_alive()
        )
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"the test left threads running: {', '.join(left)}"


@pytest.fixture
def start_server() -> Iterator[Callable[[S], S]]:
    """Start any harness server; it is stopped when the test ends, pass or fail.

    ``relay = start_server(CarbonRelay(tmp_path / "relay", [...]))``
    """
    started: list[_Server] = []

    def start(server: S) -> S:
        try:
            server.start()
        except _NOT_INSTALLED as exc:
            if os.environ.get("ELECTRICITY_REQUIRE_SERVERS"):
                raise
            pytest.skip(str(exc))
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture
def carbon_server(start_server: Callable[[S], S], tmp_path: Path) -> CarbonServer:
    """A running carbon-cache (retentions 1s:1h,1m:1d) with its data in tmp_path."""
    return start_server(CarbonServer(tmp_path / "carbon"))


@pytest.fixture
def graphite_web(
    start_server: Callable[[S], S], carbon_server: CarbonServer, tmp_path: Path
) -> GraphiteWeb:
    """graphite-web serving carbon_server's data."""
    return start_server(GraphiteWeb(tmp_path / "graphite-web", carbon_server))


@pytest.fixture
def mosquitto_broker(start_server: Callable[[S], S], tmp_path: Path) -> MosquittoBroker:
    """A Mosquitto broker allowing anonymous clients."""
    return start_server(MosquittoBroker(tmp_path / "mosquitto"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The project's test data (device dumps, devices.json, Glow payloads, schema)."""
    return Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def wizard(fixtures_dir: Path) -> list[DeviceEntry]:
    """The devices.json of a real home of 21 Tuya devices (tests/fixtures/tuya)."""
    entries, problems = load_devices_file(fixtures_dir / "tuya" / "devices.json")
    assert problems == []
    return entries


# --- A collector script run as users run it: its own process and environment --------


@pytest.fixture
def collector_env(tmp_path: Path) -> dict[str, str]:
    """``collector_environment(tmp_path)``: add a test's own settings with
    ``{**collector_env, "DEVICE_TIMEOUT_S": "3"}``."""
    return collector_environment(tmp_path)


# --- Simulated devices on loopback ----------------------------------------------------

_rng = random.Random()  # its own: tests that seed the global generator do not repeat it


@pytest.fixture
def hosts() -> Iterator[str]:
    """Loopback addresses of a random 127.a.b.0/24, so parallel runs never share one."""
    subnet = f"127.{_rng.randrange(100, 255)}.{_rng.randrange(256)}."
    return (f"{subnet}{n}" for n in range(1, 255))


@pytest.fixture
def serve() -> Iterator[Callable[..., TuyaSimulator]]:
    """Start Tuya simulators, ``serve(*devices, **TuyaSimulator options)``; every
    one started is stopped when the test ends."""
    started: list[TuyaSimulator] = []

    def _serve(*devices: SimulatedTuyaDevice, **kwargs: Any) -> TuyaSimulator:
        simulator = TuyaSimulator(devices, **kwargs).start()
        started.append(simulator)
        return simulator

    yield _serve
    for simulator in reversed(started):
        simulator.stop()
