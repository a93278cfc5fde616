"""The simulated home (simulators/home.py, home_live.py) and the collector
processes it runs (harness/collectors.py): the parts that need no server."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from harness.collectors import collector_environment, write_config
from simulators import home_live
from simulators.home import LAMP_SILENT_S, device_loads, house_load
from simulators.home_live import START_AGE_S, TIME_LAPSE, HomeSource, LiveHome


def test_settings_in_the_environment_never_reach_the_collectors(monkeypatch) -> None:
    monkeypatch.setenv("CARBON_HOST", "192.168.86.123")
    monkeypatch.setenv("KASA_HOSTS", "192.168.86.40")
    monkeypatch.setenv("ELECTRICITY_STATE_DIR", "/var/lib/home")
    monkeypatch.setenv("ELECTRICITY_CONFIG", "/home/pi/config_local.py")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = collector_environment()
    for name in ("CARBON_HOST", "KASA_HOSTS", "ELECTRICITY_STATE_DIR", "ELECTRICITY_CONFIG"):
        assert name not in env
    assert env["LANG"] == "C.UTF-8"


def test_given_settings_reach_the_collectors_as_they_read_them(tmp_path: Path) -> None:
    env = collector_environment(
        {"STATE_DIR": "/tmp/s", "KASA_HOSTS": ["127.0.0.2"], "KASA_DISCOVERY_ENABLED": False},
        tmp_path / "config_local.py",
    )
    assert env["ELECTRICITY_STATE_DIR"] == "/tmp/s"
    assert env["KASA_HOSTS"] == '["127.0.0.2"]'
    assert env["KASA_DISCOVERY_ENABLED"] == "0"
    assert env["ELECTRICITY_CONFIG"] == str(tmp_path / "config_local.py")


def test_a_written_config_reads_back_as_python(tmp_path: Path) -> None:
    path = tmp_path / "config_local.py"
    write_config(path, {"carbon": {"CARBON_PORT": 2003}, "kasa": {"KASA_HOSTS": ["127.0.0.2"]}})
    values: dict = {}
    exec(path.read_text(), values)
    assert (values["CARBON_PORT"], values["KASA_HOSTS"]) == (2003, ["127.0.0.2"])


def test_the_whole_house_is_every_device_not_behind_another() -> None:
    for age_s in (0, 600, 5400, 20000):
        loads = device_loads(age_s)
        assert all(watts >= 0 for watts in loads.values())
        assert house_load(age_s) > sum(w for name, w in loads.items() if name != "Monitor")
    assert device_loads(LAMP_SILENT_S)["Lamp"] > 0 == device_loads(0)["Lamp"]


def test_the_live_home_plays_the_day_faster_and_counts_energy_at_the_real_pace(
    tmp_path: Path,
) -> None:
    home = LiveHome(tmp_path, interval_s=5.0)
    heard: list[float] = []
    home.meters.append(heard.append)
    home.tick(0.0)
    before_kwh = home.devices.energy_kwh["Office"]
    home.tick(1800.0)
    office_w = device_loads(START_AGE_S)["Office"]
    assert home.devices.energy_kwh["Office"] == pytest.approx(before_kwh + office_w / 2000)
    assert heard == [house_load(START_AGE_S), house_load(START_AGE_S + 1800 * TIME_LAPSE)]
    # The lamp never goes silent in a live run: only the history plays that.
    assert START_AGE_S >= LAMP_SILENT_S


def test_without_mosquitto_the_home_says_how_to_get_it(monkeypatch, tmp_path: Path) -> None:
    from harness.mosquitto import MosquittoBroker, MosquittoNotFoundError

    def missing(self):
        raise MosquittoNotFoundError("mosquitto not found")

    monkeypatch.setattr(MosquittoBroker, "start", missing)
    with (
        contextlib.ExitStack() as stack,
        pytest.raises(home_live.Unavailable, match="apt install mosquitto"),
    ):
        home_live.mqtt_source(LiveHome(tmp_path, 5.0), stack, tmp_path)


def test_a_source_that_cannot_start_is_skipped_with_one_line(monkeypatch, tmp_path: Path) -> None:
    def broken(home, stack, work):
        raise FileNotFoundError("devices.json is missing")

    def working(home, stack, work):
        return HomeSource(name="kasa", script="kasa_to_graphite.py", what="plugs")

    monkeypatch.setattr(home_live, "SOURCES", [broken, working])
    monkeypatch.setattr(home_live, "SOURCE_NAMES", ["tuya", "kasa"])
    said: list[str] = []
    with contextlib.ExitStack() as stack:
        _home, started = home_live.start_sources(stack, tmp_path, 5.0, said.append)
    assert [source.name for source in started] == ["kasa"]
    assert [line for line in said if "tuya" in line] == [
        "  tuya     skipped: it did not start: FileNotFoundError: devices.json is missing"
    ]
