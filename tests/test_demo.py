"""The demo (`./electricity demo`): a short real run, and its small helpers."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import demo
from harness.carbon import CarbonNotFoundError, find_carbon_cache

ROOT = Path(__file__).resolve().parents[1]


def mosquitto_installed() -> bool:
    return bool(shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """One 15 s demo run, shared by the tests that look at what it left."""
    try:
        find_carbon_cache()
    except CarbonNotFoundError as exc:
        if os.environ.get("ELECTRICITY_REQUIRE_SERVERS"):
            raise
        pytest.skip(str(exc))
    output = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "demo.py", "--duration", "15", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return result, output


@pytest.mark.slow
def test_demo_fills_carbon_from_every_source(demo_run) -> None:
    result, _ = demo_run
    assert result.returncode == 0, result.stderr
    series = {
        line.split()[0]: line.split()[1:]
        for line in result.stdout.splitlines()
        if line.startswith("home.")
    }
    sources = {demo.source_of(path) for path in series}
    expected = {"kasa", "tuya", "esp32", "circuit"}
    if mosquitto_installed():
        expected.add("mqtt")
    else:
        assert "sudo apt install mosquitto" in result.stderr
    assert sources >= expected, result.stderr
    for path, (points, last) in series.items():
        assert int(points) >= 1, path
        assert float(last) == float(last), path  # a number, not NaN
    # Live values, not just any: the simulated kettle and heat pump.
    assert "home.electricity.kasa.kettle.power_watts" in series
    assert "home.electricity.circuit.heat_pump.power_watts" in series
    # The health table: each collector's devices answered and its lines went out
    # (a device missing a cycle, or a spooled batch, may happen on a loaded machine).
    row = re.compile(r"^(kasa|tuya|esp32|mqtt|circuit) +(\d+) +(\d+) +(\d+) +(\d+)$", re.MULTILINE)
    health = {name: figures for name, *figures in row.findall(result.stdout)}
    assert set(health) == expected, result.stdout
    for name, (ok, _failed, sent, _spooled) in health.items():
        assert int(ok) >= 1, (name, result.stdout[-600:], result.stderr)
        assert int(sent) > 0, (name, result.stdout[-600:], result.stderr)
    assert "read back through graphite-web" in result.stderr


@pytest.mark.slow
def test_demo_leaves_a_chart_logs_and_its_settings(demo_run) -> None:
    _, output = demo_run
    assert (output / "demo.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    for name in ("kasa", "tuya", "esp32", "circuit"):
        assert (output / "logs" / f"{name}.log").stat().st_size > 0
    config = (output / "config_local.py").read_text()
    addresses = re.findall(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b", config)
    assert addresses, config
    assert all(ipaddress.ip_address(address).is_loopback for address in addresses), config


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("home.electricity.kasa.kettle.power_watts", "kasa"),
        ("home.electricity.meter.power_watts", "esp32"),
        ("home.electricity.glow.1a2b3c4d5e6f.power_watts", "mqtt"),
        ("home.gas.glow.1a2b3c4d5e6f.energy_kwh", "mqtt"),
        ("home.electricity.circuit.heat_pump.l1_power_watts", "circuit"),
        ("home.electricity.health.tuya.devices_ok", "tuya"),
    ],
)
def test_source_of(path: str, source: str) -> None:
    assert demo.source_of(path) == source


def test_summary_and_progress() -> None:
    series = {
        "home.electricity.kasa.kettle.power_watts": [(1, 0.0), (6, 2950.0)],
        "home.electricity.health.kasa.devices_ok": [(6, 4.0)],
        "home.electricity.health.kasa.metrics_sent": [(6, 161.0)],
    }
    tables = demo.summary_tables(series)
    assert re.search(r"home\.electricity\.kasa\.kettle\.power_watts +2 +2950", tables)
    assert re.search(r"^kasa +4 +- +161 +-$", tables, re.MULTILINE)
    line = demo.progress(12.3, 60, series, ["kasa", "tuya"])
    assert line == " 12/60 s  series/points: kasa 1/2  tuya 0/0"


def test_without_carbon_the_demo_says_how_to_get_it(monkeypatch, tmp_path: Path, capsys) -> None:
    def missing(self):
        raise CarbonNotFoundError("carbon-cache not found: `apt-get install graphite-carbon`")

    monkeypatch.setattr(demo.CarbonServer, "start", missing)
    assert demo.run(1, tmp_path) == 2
    assert "apt-get install graphite-carbon" in capsys.readouterr().err
