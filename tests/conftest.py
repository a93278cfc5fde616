"""Fixtures shared by the whole suite: real servers on loopback, and the shared test data.

A server that is not installed skips the tests that need it, with how to
install it as the reason; with ELECTRICITY_REQUIRE_SERVERS=1 (CI) it fails them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import pytest

from harness.carbon import CarbonNotFoundError, CarbonServer
from harness.graphite_web import GraphiteWeb, GraphiteWebNotFoundError
from harness.mosquitto import MosquittoBroker, MosquittoNotFoundError
from harness.relay import CarbonRelayNotFoundError

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
    """The shared test data (device dumps, devices.json, Glow payloads), beside the repo."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
