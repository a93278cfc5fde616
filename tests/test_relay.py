"""Beyond one Graphite: a real collector sending through Debian's carbon-c-relay
to two carbon-caches, and the failover list of destinations.

The collector is kasa_to_graphite.py --once against simulated plugs and a
strip; the caches and the relay are real servers on loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.carbon import CarbonServer, free_port
from harness.relay import CarbonRelay
from simulators.kasa import KasaSimulator, SimulatedKasaDevice, loopback_host

# Every test here starts a server, a simulated device or a process.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HEALTH = "home.electricity.health."


def kasa_devices() -> list[SimulatedKasaDevice]:
    kettle = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(0), alias="Kettle")
    fridge = SimulatedKasaDevice("HS110(EU)_1.0_1.2.5.json", host=loopback_host(1), alias="Fridge")
    strip = SimulatedKasaDevice(
        "HS300(US)_1.0_1.0.21.json",
        host=loopback_host(2),
        alias="Strip",
        child_aliases=["Desk", "Monitor", "Printer", "Router", "Charger", "Speaker"],
    )
    kettle.set_realtime(power_w=2950.0, voltage_v=241.2, current_a=12.23, total_kwh=412.5)
    fridge.set_realtime(power_w=88.4, voltage_v=240.8, current_a=0.52, total_kwh=1893.2)
    for outlet in range(6):
        strip.set_realtime(power_w=10.0 * (outlet + 1), voltage_v=240.5, child=outlet)
    return [kettle, fridge, strip]


@pytest.fixture
def kasa(tmp_path: Path):
    """Simulated Kasa devices, and a function running the real collector once."""
    devices = kasa_devices()
    local = tmp_path / "config_local.py"
    local.write_text("")

    def run(*args: str, **settings: str) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "ELECTRICITY_CONFIG": str(local),
            "ELECTRICITY_STATE_DIR": str(tmp_path / "state"),
            "KASA_DISCOVERY_TIMEOUT_S": "1",
            "DEVICE_TIMEOUT_S": "3",
            **settings,
        }
        hosts = [arg for device in devices for arg in ("--host", f"{device.host}:{sim.port}")]
        return subprocess.run(
            [sys.executable, "kasa_to_graphite.py", "--once", *hosts, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    with KasaSimulator(devices) as sim:
        yield run


def dry_run_lines(kasa) -> dict[str, float]:
    """path -> value of the lines the collector makes (printed, not sent)."""
    result = kasa("--dry-run")
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    return {path: float(value) for path, value, _ in lines}


def wait_for_paths(caches: list[CarbonServer], count: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(len(cache.metric_paths()) for cache in caches) < count:
        assert time.monotonic() < deadline, [cache.metric_paths() for cache in caches]
        time.sleep(0.1)


def test_every_line_lands_in_exactly_one_cache_behind_the_relay(
    start_server, tmp_path: Path, kasa
) -> None:
    expected = dry_run_lines(kasa)
    devices = {path: value for path, value in expected.items() if not path.startswith(HEALTH)}
    assert len(devices) >= 40

    caches = [start_server(CarbonServer(tmp_path / name)) for name in ("a", "b")]
    relay = start_server(CarbonRelay(tmp_path / "relay", [c.line_address for c in caches]))
    host, port = relay.address
    before = int(time.time())
    result = kasa("--carbon", f"{host}:{port}")
    # Exit 0: the relay closed its side after our end of stream (confirmed delivery).
    assert result.returncode == 0, result.stderr

    wait_for_paths(caches, len(expected) + 2)  # sent for real: spool_lines, spool_dropped too
    per_cache = [set(cache.metric_paths()) for cache in caches]
    assert per_cache[0].isdisjoint(per_cache[1])
    assert per_cache[0] | per_cache[1] >= set(expected)
    assert all(per_cache), "the relay put every metric on one cache"
    stamps = set()
    for path, value in devices.items():
        owner = caches[0] if path in per_cache[0] else caches[1]
        [(stamp, stored)] = owner.wait_for_points(path)
        assert stored == pytest.approx(value), path
        stamps.add(stamp)
    # One cycle, one sample time, never the send time of each line.
    assert len(stamps) == 1
    assert before <= stamps.pop() <= int(time.time())


def test_a_cache_down_behind_the_relay_gets_its_lines_when_back(
    start_server, tmp_path: Path, kasa
) -> None:
    """The relay confirms what it has read, and queues the lines of a cache
    that is down (carbon-c-relay's -q, 25,000 lines per cache by default)."""
    caches = [start_server(CarbonServer(tmp_path / name)) for name in ("a", "b")]
    relay = start_server(CarbonRelay(tmp_path / "relay", [c.line_address for c in caches]))
    caches[1].stop()
    host, port = relay.address
    result = kasa("--carbon", f"{host}:{port}")
    assert result.returncode == 0, result.stderr
    wait_for_paths(caches[:1], 1)

    caches[1].start()
    expected = dry_run_lines(kasa)
    wait_for_paths(caches, len(expected) + 2, timeout_s=30)
    assert caches[1].metric_paths(), "the queued lines reached the cache once it was back"


def test_failover_first_destination_refuses(carbon_server, kasa) -> None:
    host, port = carbon_server.line_address
    nobody = f"127.0.0.1:{free_port()}"
    result = kasa(CARBON_DESTINATIONS=f"{nobody},{host}:{port}")
    assert result.returncode == 0, result.stderr
    expected = dry_run_lines(kasa)
    carbon_server.wait_for_total(len(expected), list(expected))
    assert set(expected) <= set(carbon_server.metric_paths())


def test_failover_first_destination_hangs(start_server, tmp_path: Path, kasa) -> None:
    """A first destination that accepts connections and never reads (a hung
    carbon-cache): after CARBON_TIMEOUT_S the second one gets the lines."""
    hung, second = (start_server(CarbonServer(tmp_path / name)) for name in ("hung", "second"))
    hung.pause()
    try:
        destinations = ",".join(f"{h}:{p}" for h, p in (hung.line_address, second.line_address))
        result = kasa(CARBON_DESTINATIONS=destinations, CARBON_TIMEOUT_S="1")
        assert result.returncode == 0, result.stderr
        expected = dry_run_lines(kasa)
        second.wait_for_total(len(expected), list(expected))
    finally:
        # Resumed, it reads the batches it timed out on and stores them too:
        # the same values at the same timestamps, which whisper keeps once.
        hung.resume()
