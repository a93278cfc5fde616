"""The demo (`./electricity demo`): a short real run, and its small helpers."""

from __future__ import annotations

import contextlib
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


def test_settings_in_the_environment_never_reach_the_collectors(monkeypatch) -> None:
    monkeypatch.setenv("CARBON_HOST", "192.168.86.123")
    monkeypatch.setenv("KASA_HOSTS", "192.168.86.40")
    monkeypatch.setenv("ELECTRICITY_STATE_DIR", "/var/lib/home")
    monkeypatch.setenv("ELECTRICITY_CONFIG", "/home/pi/config_local.py")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = demo.collector_environment()
    for name in ("CARBON_HOST", "KASA_HOSTS", "ELECTRICITY_STATE_DIR", "ELECTRICITY_CONFIG"):
        assert name not in env
    assert env["LANG"] == "C.UTF-8"


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


def test_the_simulated_home_adds_up() -> None:
    for elapsed_s in (0, 10, 25, 45):
        loads = demo.appliance_watts(elapsed_s)
        assert all(watts >= 0 for watts in loads.values())
        assert demo.house_watts(elapsed_s) == pytest.approx(demo.BASE_LOAD_W + sum(loads.values()))
    counter = demo.EnergyCounter(10.0)
    counter.add(3600.0, 0)
    assert counter.add(3600.0, 1800) == pytest.approx(11.8)  # 3.6 kW for half an hour


def test_without_mosquitto_the_demo_says_how_to_get_it(monkeypatch, tmp_path: Path) -> None:
    from harness.mosquitto import MosquittoBroker, MosquittoNotFoundError

    def missing(self):
        raise MosquittoNotFoundError("mosquitto not found")

    monkeypatch.setattr(MosquittoBroker, "start", missing)
    with (
        contextlib.ExitStack() as stack,
        pytest.raises(demo.Unavailable, match="apt install mosquitto"),
    ):
        demo.mqtt_source(stack, tmp_path)


def test_without_carbon_the_demo_says_how_to_get_it(monkeypatch, tmp_path: Path, capsys) -> None:
    def missing(self):
        raise CarbonNotFoundError("carbon-cache not found: `apt-get install graphite-carbon`")

    monkeypatch.setattr(demo.CarbonServer, "start", missing)
    assert demo.run(1, tmp_path) == 2
    assert "apt-get install graphite-carbon" in capsys.readouterr().err


def test_a_source_that_cannot_start_is_skipped_with_one_line(
    monkeypatch, tmp_path: Path, capsys
) -> None:
    def broken(stack, work):
        raise FileNotFoundError("devices.json is missing")

    def working(stack, work):
        return demo.Source(
            name="kasa", script="kasa_to_graphite.py", args=[], what="plugs", tick=lambda s: None
        )

    monkeypatch.setattr(demo, "SOURCES", [broken, working])
    monkeypatch.setattr(demo, "SOURCE_NAMES", ["tuya", "kasa"])
    with contextlib.ExitStack() as stack:
        started = demo.start_sources(stack, tmp_path)
    assert [source.name for source in started] == ["kasa"]
    said = capsys.readouterr().err.splitlines()
    assert [line for line in said if "tuya" in line] == [
        "  tuya     skipped: it did not start: FileNotFoundError: devices.json is missing"
    ]
