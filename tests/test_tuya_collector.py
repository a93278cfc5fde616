"""tuya_to_graphite end to end: the real home's devices.json (21 devices),
each served by a simulated device on its own 127.x address and speaking
protocol 3.1, 3.3, 3.4 or 3.5 to the real tinytuya; lines into a real
carbon-cache (or stdout with --dry-run)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import collector
import tuya_to_graphite
from graphite_helper import format_device_name
from runtime import Runtime
from settings import load_settings
from simulators.tuya import (
    SimulatedTuyaDevice,
    TuyaSimulator,
    default_dps,
    din_meter_dps,
    plug_dps,
)
from tests.helpers import carbon_arg, run_collector

# Every test here starts a server, a simulated device or a process.
pytestmark = pytest.mark.slow

PREFIX = "home.electricity.tuya"
# devices.json has no address and no version for these: the collector learns
# both from the devices' announcements.
UNADDRESSED_VERSIONS = {
    "Diivoo smart dual water timer": "3.3",
    "Electric blanket": "3.3",
    "Towel Rail": "3.4",
    "Office shelves": "3.5",
    "Freezer": "3.1",
    "Dishwasher": "3.3",
    "Boot room freezer": "3.4",
    "Garage power A": "3.5",
    "Main Oven": "3.4",
    "Top Oven": "3.5",
}
SKIPPED = {"Diivoo smart dual water timer", "Gateway", "Multifunction alarm"}
OVEN_PHASES = {
    "Main Oven": [(231.4, 7.25, 1650.0)],
    "Top Oven": [(230.1, 4.2, 950.0), (232.7, 4.1, 940.0), (229.8, 0.0, 0.0)],
}
WRONG_KEY = "Zz9Yy8Xx7Ww6Vv5U"


def plug_figures(index: int) -> tuple[float, float]:
    """A distinct (watts, volts) per device, so no value can pass for another's."""
    return 10.5 + 37.3 * index, 228.0 + 0.7 * index


def device_dps(entry: Mapping[str, Any], index: int) -> tuple[dict, dict[str, float]]:
    """DPs to serve for a devices.json entry, and the figures they must become."""
    codes = {spec.get("code") for spec in (entry.get("mapping") or {}).values()}
    watts, volts = plug_figures(index)
    expected_plug = {
        "power_watts": round(watts * 10) / 10,
        "voltage_volts": round(volts * 10) / 10,
        "current_amps": round(watts / volts * 1000) / 1000,
        "is_on": 1.0,
        "energy_kwh": 0.0,  # integrated from power: the first sample starts at 0
    }
    if "cur_power" in codes:  # mapped plugs: 18 mA, 19 W x10, 20 V x10
        return plug_dps(watts, volts, energy_kwh=0.321), expected_plug
    if entry["category"] == "dlq":
        phases = OVEN_PHASES[entry["name"]]
        dps = din_meter_dps(phases, total_kwh=8123.45)
        if len(phases) == 1:
            volts, amps, watts = phases[0]
            figures = {"voltage_volts": volts, "current_amps": amps, "power_watts": watts}
        else:
            figures = {
                f"l{n}_{metric}": value
                for n, phase in enumerate(phases, start=1)
                for metric, value in zip(("voltage_volts", "current_amps", "power_watts"), phase)
            }
            figures["power_watts"] = sum(p[2] for p in phases)
            figures["current_amps"] = sum(p[1] for p in phases)
            figures["voltage_volts"] = sum(p[0] for p in phases) / 3
        return dps, {**figures, "energy_kwh": 8123.45, "is_on": 1.0}
    if entry["name"] in SKIPPED:
        return default_dps(entry), {}
    if not entry.get("mapping"):  # sockets without a mapping: the older 4/5/6 layout
        return plug_dps(watts, volts, legacy=True), expected_plug
    on = index % 2 == 0  # switch-only
    return {**default_dps(entry), "1": on}, {"is_on": 1.0 if on else 0.0}


@dataclass
class Home:
    path: Path
    simulator: TuyaSimulator
    devices: dict[str, SimulatedTuyaDevice]  # by name
    expected: dict[str, dict[str, float]]  # by metric segment
    keys: list[str]

    def segment(self, name: str) -> str:
        return format_device_name(name)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def announce_port() -> int:
    return free_udp_port()


@pytest.fixture
def make_home(tmp_path, fixtures_dir, hosts, announce_port):
    """Serve the wizard's home; ``modes``/``keys`` by device name; ``leave_out``
    names are in devices.json but not served; ``extra`` devices are served but
    not in devices.json."""
    started: list[TuyaSimulator] = []

    def _make(modes=None, keys=None, leave_out=(), extra=(), **options) -> Home:
        modes, keys = modes or {}, keys or {}
        raw = json.loads((fixtures_dir / "tuya" / "devices.json").read_text(encoding="utf-8"))
        written, devices, expected = [], {}, {}
        for index, entry in enumerate(raw):
            host = next(hosts)
            name = entry["name"]
            dps, figures = device_dps(entry, index)
            if name not in leave_out:
                devices[name] = SimulatedTuyaDevice.from_devices_json(
                    entry,
                    dps=dps,
                    host=host,
                    version=entry.get("version") or UNADDRESSED_VERSIONS[name],
                    mode=modes.get(name, "normal"),
                    **options.get(name, {}),
                )
                if figures:
                    expected[format_device_name(name)] = figures
            copy = dict(entry)
            if entry.get("ip"):
                copy["ip"] = host
            copy["key"] = keys.get(name, entry["key"])
            written.append(copy)
        path = tmp_path / "devices.json"
        path.write_text(json.dumps(written, indent=1, ensure_ascii=False), encoding="utf-8")
        for device in extra:
            devices[device.dev_id] = device
        simulator = TuyaSimulator(
            list(devices.values()),
            announce_to=("127.0.0.1", announce_port),
            announce_interval_s=0.1,
        ).start()
        started.append(simulator)
        all_keys = [e["key"] for e in raw] + list(keys.values())
        return Home(path, simulator, devices, expected, all_keys)

    yield _make
    for simulator in started:
        simulator.stop()


@pytest.fixture
def env(collector_env, announce_port) -> dict[str, str]:
    return {
        **collector_env,
        "TUYA_ANNOUNCE_BIND": "127.0.0.1",
        "TUYA_ANNOUNCE_PORTS": str(announce_port),
        "TUYA_ANNOUNCE_LISTEN_S": "10",
        "TUYA_TIMEOUT_S": "0.5",
        "DEVICE_TIMEOUT_S": "5",
    }


def run_tuya(args, env, timeout_s=60) -> subprocess.CompletedProcess:
    return run_collector("tuya_to_graphite.py", args, env, timeout_s)


def dry_run_values(stdout: str) -> dict[str, float]:
    values = {}
    for line in stdout.splitlines():
        path, value, _ = line.split()
        values[path] = float(value)
    return values


# --- the whole home into Carbon ----------------------------------------------------------


@pytest.mark.slow
def test_every_device_of_the_home_lands_right(carbon_server, make_home, env):
    home = make_home()
    result = run_tuya(
        ["--once", "--devices", str(home.path), "--carbon", carbon_arg(carbon_server)], env
    )
    assert result.returncode == 0, result.stderr
    paths = [
        f"{PREFIX}.{seg}.{metric}" for seg, figures in home.expected.items() for metric in figures
    ]
    points = carbon_server.wait_for_total(len(paths), paths)
    for segment, figures in home.expected.items():
        for metric, value in figures.items():
            got = points[f"{PREFIX}.{segment}.{metric}"][-1][1]
            assert got == pytest.approx(value, rel=1e-9, abs=1e-9), (segment, metric)
    health = carbon_server.wait_for_points("home.electricity.health.tuya.devices_ok")
    assert health[-1][1] == 18
    assert carbon_server.fetch("home.electricity.health.tuya.devices_failed")[-1][1] == 0
    stored = {p.split(".")[3] for p in carbon_server.metric_paths() if p.startswith(PREFIX)}
    assert stored == set(home.expected)  # the water timer, gateway and alarm send nothing
    for name in SKIPPED:
        assert f"{name} (" in result.stderr
        assert "left out" in result.stderr
        assert "connect" not in home.devices[name].counts


@pytest.mark.slow
def test_failing_devices_do_not_stop_the_others_and_no_key_is_ever_logged(
    carbon_server, make_home, env
):
    failing = {
        "Shed": "no answer",  # 3.4, accepts and hangs
        "Bookcase lights": "garbled",  # 3.3, answers junk
        "Front room fairy lights": "busy with another client",  # 3.3
        "Kettle": "wrong local key",  # 3.4, key in devices.json is not the device's
        "N desk": "wrong local key",  # 3.3
        "Top Oven": "garbled",  # 3.5, found by its announcement
    }
    home = make_home(
        modes={
            "Shed": "hang",
            "Bookcase lights": "garbage",
            "Front room fairy lights": "busy",
            "Top Oven": "garbage",
        },
        keys={"Kettle": WRONG_KEY, "N desk": WRONG_KEY},
    )
    args = ["--once", "-v", "--devices", str(home.path), "--carbon", carbon_arg(carbon_server)]
    result = run_tuya(args, env)
    assert result.returncode == 0, result.stderr
    working = {seg: f for seg, f in home.expected.items() if seg not in map(home.segment, failing)}
    paths = [f"{PREFIX}.{seg}.{metric}" for seg, figures in working.items() for metric in figures]
    points = carbon_server.wait_for_total(len(paths), paths)
    for segment, figures in working.items():
        for metric, value in figures.items():
            got = points[f"{PREFIX}.{segment}.{metric}"][-1][1]
            assert got == pytest.approx(value, rel=1e-9, abs=1e-9), (segment, metric)
    failed = carbon_server.wait_for_points("home.electricity.health.tuya.devices_failed")
    assert failed[-1][1] == len(failing)
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    for name, reason in failing.items():
        mine = [line for line in warnings if f"tuya: {name} (" in line]
        assert len(mine) == 1, (name, warnings)
        assert reason in mine[0], (name, warnings)
    assert not any(
        p.split(".")[3] in map(home.segment, failing) for p in carbon_server.metric_paths()
    )
    for key in home.keys:
        assert key not in result.stderr
        assert key not in result.stdout


# --- in process: several cycles -------------------------------------------------------------


def in_process_collector(home: Home, env: dict[str, str], dry_run=True, **overrides):
    settings = load_settings(
        env=env,
        local_path=env["ELECTRICITY_CONFIG"],
        overrides={"TUYA_DEVICES_FILE": str(home.path), **overrides},
    )
    runtime = Runtime("tuya", settings, dry_run=dry_run)
    return tuya_to_graphite.TuyaCollector(runtime, args=None)


def test_busy_device_is_backed_off_and_logged_once(make_home, env, caplog, capsys):
    home = make_home(modes={"Front room fairy lights": "busy"})
    busy, kettle = home.devices["Front room fairy lights"], home.devices["Kettle"]
    tuya = in_process_collector(home, env, TUYA_BUSY_BACKOFF_S=3600.0)
    caplog.set_level(logging.DEBUG)

    async def cycles() -> list[tuple[int, int]]:
        loop = collector.PollLoop(tuya, interval_s=30)
        await loop.rediscover()
        results = []
        for n in range(3):
            if n == 2:
                kettle.set_dps(plug_dps(2222.2, 241.0))  # pushed to our open connection
            ok, failed, _ = await loop.cycle(int(time.time()) + n)
            results.append((ok, failed))
            if n == 0:
                rejected = busy.counts["reject"]
        await tuya.close()
        assert busy.counts["reject"] == rejected  # left alone after the first reset
        return results

    assert asyncio.run(cycles()) == [(17, 1)] * 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([r for r in warnings if "Front room fairy lights" in r.getMessage()]) == 1
    assert "busy with another client" in caplog.text
    assert kettle.counts["connect"] == 1  # one persistent connection for three cycles
    lines = capsys.readouterr().out
    assert f"{PREFIX}.kettle.power_watts 2222.2 " in lines
    for key in home.keys:
        assert key not in caplog.text


def test_energy_is_integrated_and_kept_across_restarts(make_home, env):
    home = make_home()
    kettle = home.devices["Kettle"]
    kettle.set_dps(plug_dps(2000.0, 240.0))
    state = Path(env["ELECTRICITY_STATE_DIR"]) / "tuya" / "energy.json"

    async def one_poll() -> dict[str, float]:
        tuya = in_process_collector(home, env, dry_run=False)
        try:
            devices = {d.name: d for d in await tuya.discover()}
            readings = await tuya.poll(devices["Kettle"])
            tuya.end_of_cycle(int(time.time()))
        finally:
            await tuya.close()
        return readings[0].values

    first = asyncio.run(one_poll())
    assert first["energy_kwh"] == 0.0
    started = json.loads(state.read_text())[kettle.dev_id]["timestamp"]
    time.sleep(0.3)
    second = asyncio.run(one_poll())  # a new process, in effect
    ended = json.loads(state.read_text())[kettle.dev_id]["timestamp"]
    assert second["energy_kwh"] == pytest.approx(2000.0 * (ended - started) / 3.6e6, rel=1e-9)
    assert second["energy_kwh"] > 0


# --- what is read, and what is refused ---------------------------------------------------------


def test_stale_and_device22_plugs_are_read_right(make_home, env):
    home = make_home(
        modes={"Kettle": "stale", "Dishwasher": "stale", "Main Oven": "stale"},
        **{"N desk": {"device22": True}},
    )
    result = run_tuya(["--once", "--dry-run", "--devices", str(home.path)], env)
    assert result.returncode == 0, result.stderr
    got = dry_run_values(result.stdout)
    for name in ("Kettle", "Dishwasher", "Main Oven", "N desk"):
        segment = home.segment(name)
        for metric, value in home.expected[segment].items():
            assert got[f"{PREFIX}.{segment}.{metric}"] == pytest.approx(value), (name, metric)
    for name in ("Kettle", "Dishwasher", "Main Oven"):
        assert home.devices[name].counts["UPDATEDPS"] >= 1, name


def test_impossible_values_and_scaling_mistakes_are_dropped_and_counted(make_home, env):
    home = make_home()
    home.devices["Kettle"].set_dps(plug_dps(5000.0, 240.0))  # over 4 kW: no plug does that
    home.devices["Shed"].set_dps({"20": 400})  # 40 V mains
    # The classic mistake, forced: power read as whole watts while the plug sends W x10.
    scaling = {"Garage lights": {"power_watts": {"dp": 19, "scale": 0}}}
    result = run_tuya(
        ["--once", "--dry-run", "--devices", str(home.path)],
        {**env, "TUYA_SCALING": json.dumps(scaling)},
    )
    assert result.returncode == 0, result.stderr
    got = dry_run_values(result.stdout)
    assert f"{PREFIX}.kettle.power_watts" not in got
    assert f"{PREFIX}.kettle.current_amps" not in got  # 20.8 A: over 20 A too
    assert f"{PREFIX}.kettle.voltage_volts" in got
    assert f"{PREFIX}.shed.voltage_volts" not in got
    assert f"{PREFIX}.shed.power_watts" in got
    assert f"{PREFIX}.garage_lights.power_watts" not in got
    assert f"{PREFIX}.garage_lights.current_amps" not in got
    assert got["home.electricity.health.tuya.values_out_of_range"] == 5, result.stderr
    assert "disagree" in result.stderr
    assert "TUYA_SCALING" in result.stderr
    assert "outside 0..4000" in result.stderr
    assert "outside 80..300" in result.stderr


def test_addresses_and_versions_from_the_config(make_home, env, tmp_path):
    home = make_home()
    kettle = home.devices["Kettle"]
    raw = json.loads(home.path.read_text(encoding="utf-8"))
    for entry in raw:
        if entry["name"] in ("Kettle", "Shed"):
            entry["ip"] = entry["version"] = ""  # and nothing announces: they are connected
    home.path.write_text(json.dumps(raw), encoding="utf-8")
    shed = home.devices["Shed"]
    addresses = {"kettle": kettle.host, shed.dev_id: f"{shed.host}:{shed.port}"}
    result = run_tuya(
        ["--once", "--dry-run", "--devices", str(home.path)],
        {
            **env,
            "TUYA_ADDRESSES": json.dumps(addresses),
            "TUYA_VERSIONS": json.dumps({"Shed": "3.4"}),
            "TUYA_ANNOUNCE_PORTS": str(free_udp_port()),  # hears nothing
            "TUYA_ANNOUNCE_LISTEN_S": "0.5",
        },
    )
    assert result.returncode == 0, result.stderr
    got = dry_run_values(result.stdout)
    for name in ("Kettle", "Shed"):
        segment = home.segment(name)
        assert got[f"{PREFIX}.{segment}.power_watts"] == home.expected[segment]["power_watts"]
    assert "Kettle (bfc2c15f07d2b072d5rchn) speaks protocol 3.4" in result.stderr
    # Unaddressed devices nobody announced are named, once, and skipped.
    assert "Main Oven (bf52baba2305f136datzwi): no address" in result.stderr


def test_excluded_devices_and_circuits_are_left_alone(make_home, env):
    home = make_home()
    oven = home.devices["Main Oven"]
    circuits = [{"name": "Oven", "kind": "tuya", "connection": oven.dev_id, "profile": "tuya-din"}]
    result = run_tuya(
        ["--once", "--dry-run", "--devices", str(home.path)],
        {**env, "TUYA_EXCLUDE": '["kettle"]', "CIRCUITS": json.dumps(circuits)},
    )
    assert result.returncode == 0, result.stderr
    assert ".kettle." not in result.stdout
    assert ".main_oven." not in result.stdout
    assert f"{PREFIX}.shed.power_watts" in result.stdout
    for device in (home.devices["Kettle"], oven):
        assert "connect" not in device.counts
        assert "session" not in device.counts
    assert "left out: excluded (TUYA_EXCLUDE)" in result.stderr
    assert "left out: a circuit" in result.stderr


def test_gateway_sub_devices_are_left_out_not_searched_for(make_home, env, tmp_path):
    home = make_home()
    raw = json.loads(home.path.read_text(encoding="utf-8"))
    zigbee = {**next(e for e in raw if e["name"] == "Kettle"), "id": "bfzigbee00000000000001"}
    zigbee.update(name="Zigbee plug", ip="", version="", node_id="a4c1380000000001", sub=True)
    home.path.write_text(json.dumps([*raw, zigbee]), encoding="utf-8")
    result = run_tuya(["--once", "--dry-run", "--devices", str(home.path)], env)
    assert result.returncode == 0, result.stderr
    assert "Zigbee plug (bfzigbee00000000000001): left out: a sub-device" in result.stderr
    assert "no address" not in result.stderr


def _with_a_list_code(home: Home, name: str) -> str:
    """Rewrite devices.json with ``name``'s first mapping code a list; its key."""
    raw = json.loads(home.path.read_text(encoding="utf-8"))
    entry = next(e for e in raw if e["name"] == name)
    first_dp = next(iter(entry["mapping"]))
    entry["mapping"][first_dp]["code"] = ["cur_power"]
    home.path.write_text(json.dumps(raw), encoding="utf-8")
    return entry["key"]


def test_a_wrong_type_in_one_entry_stops_only_that_device(make_home, env):
    home = make_home()
    key = _with_a_list_code(home, "Kettle")
    result = run_tuya(["--once", "--dry-run", "--devices", str(home.path)], env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert key not in result.stderr
    said = [line for line in result.stderr.splitlines() if "(Kettle)" in line]
    assert len(said) == 1
    assert "code is a list" in said[0]
    assert "left out" in said[0]
    assert ".kettle." not in result.stdout
    assert f"{PREFIX}.shed.power_watts" in result.stdout


def test_discover_with_a_wrong_type_in_one_entry_prints_no_traceback(make_home, env):
    home = make_home()
    key = _with_a_list_code(home, "Kettle")
    result = run_tuya(
        ["--discover", "--devices", str(home.path)], {**env, "TUYA_ANNOUNCE_LISTEN_S": "1.5"}
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert key not in result.stderr
    rows = {line.split("  ")[0] for line in result.stdout.splitlines()[2:]}
    assert "Kettle" not in rows
    assert "Shed" in rows


def test_discover_merges_announcements_with_devices_json(make_home, env):
    stranger = SimulatedTuyaDevice(
        "bfstranger00000000000x", "0123456789abcdef", "3.4", host="127.0.0.1", port=0
    )
    home = make_home(leave_out=("Freezer", "Gateway"), extra=[stranger])
    result = run_tuya(
        ["--discover", "--devices", str(home.path)], {**env, "TUYA_ANNOUNCE_LISTEN_S": "1.5"}
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "id", "address", "version", "product", "measures", "seen"]
    rows = {line.split("  ")[0]: line for line in lines[2:]}
    assert len(rows) == 22
    assert rows["Freezer"].rstrip().endswith("not seen")
    assert rows["Kettle"].rstrip().endswith("announced")
    oven = home.devices["Main Oven"]
    assert oven.host in rows["Main Oven"]
    assert " 3.4 " in rows["Main Oven"]
    assert "metering DIN breaker" in rows["Main Oven"]
    assert "energy counter" in rows["Main Oven"]
    assert "nothing: water timer" in rows["Diivoo smart dual water timer"]
    assert "bfstranger00000000000x" in rows["?"]
    assert "not in devices.json" in rows["?"]
    assert "2 of 21 devices.json entries not heard" in result.stderr
    assert all("connect" not in d.counts for d in home.devices.values())  # listened only


def test_exit_codes(env, tmp_path, hosts):
    # No devices.json: 2, one line naming the setting and the wizard.
    result = run_tuya(["--once", "--devices", str(tmp_path / "missing.json")], env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("tuya: TUYA_DEVICES_FILE:")
    assert "tinytuya wizard" in lines[0]
    # A bad override: 2.
    path = tmp_path / "devices.json"
    entry = {"id": "bf0000000000000000dead", "name": "Dead", "key": "0123456789abcdef"}
    path.write_text(json.dumps([{**entry, "ip": next(hosts), "version": "3.3"}]))
    result = run_tuya(
        ["--once", "--devices", str(path)], {**env, "TUYA_SCALING": '{"Dead": {"watts": 1}}'}
    )
    assert result.returncode == 2
    assert "TUYA_SCALING" in result.stderr
    # Nothing listens at the address: no device answered, 3.
    result = run_tuya(["--once", "--dry-run", "--devices", str(path)], env)
    assert result.returncode == 3, result.stderr
    assert "cannot connect" in result.stderr
