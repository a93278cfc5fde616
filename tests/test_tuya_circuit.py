"""Tuya DIN meters as circuits: circuit_to_graphite.py as users run it, its
``tuya`` reader (circuit_tuya.py) talking to simulated meters (one and three
phases, protocols 3.3 to 3.5) through the real tinytuya, into a real
carbon-cache."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest

from simulators.tuya import SimulatedTuyaDevice, TuyaSimulator, din_meter_dps, plug_dps
from tests.helpers import collector_environment, run_collector

PREFIX = "home.electricity.circuit"
HEALTH = "home.electricity.health.circuit"
KEY = "0123456789abcdef"

pytestmark = pytest.mark.slow
THREE_PHASES = [(230.1, 4.2, 950.0), (232.7, 4.1, 940.0), (229.8, 10.0, 2290.0)]
CLAMP_MAPPING = {
    "18": {"code": "cur_current", "type": "Integer", "values": {"unit": "mA", "scale": 0}},
    "19": {"code": "cur_power", "type": "Integer", "values": {"unit": "W", "scale": 1}},
    "20": {"code": "cur_voltage", "type": "Integer", "values": {"unit": "V", "scale": 1}},
}


@pytest.fixture
def meters(tmp_path, fixtures_dir):
    """The home's two metering breakers (one as a three-phase meter), a hung
    meter and a clamp without an energy counter, served on a random 127.a.b.0/24."""
    subnet = f"127.{random.randrange(100, 255)}.{random.randrange(256)}."
    raw = json.loads((fixtures_dir / "tuya" / "devices.json").read_text(encoding="utf-8"))
    main_oven = dict(next(e for e in raw if e["name"] == "Main Oven"))
    top_oven = dict(next(e for e in raw if e["name"] == "Top Oven"))
    main_oven.update(ip=f"{subnet}1", version="3.4")  # top oven: no address, it announces
    hob = {**main_oven, "id": "bf00000000000000000hob", "name": "Hob", "ip": f"{subnet}3"}
    hob["version"] = "3.3"
    clamp = {
        "id": "bf0000000000000000clmp",
        "name": "Clamp",
        "key": KEY,
        "ip": f"{subnet}4",
        "version": "3.5",
        "category": "zndb",
        "mapping": CLAMP_MAPPING,
    }
    # On free ports, their addresses in TUYA_ADDRESSES; the top oven on the
    # default port of its own address, found by its announcements.
    served = [
        (main_oven, din_meter_dps([(231.4, 7.25, 1650.0)], 8123.45), {"port": 0}),
        (top_oven, din_meter_dps(THREE_PHASES, 456.78), {"host": f"{subnet}2", "version": "3.5"}),
        (hob, din_meter_dps([(230.0, 1.0, 230.0)], 1.0), {"port": 0, "mode": "hang"}),
        (clamp, plug_dps(3450.0, 230.0), {"port": 0}),
    ]
    devices = [
        SimulatedTuyaDevice.from_devices_json(entry, dps=dps, **options)
        for entry, dps, options in served
    ]
    path = tmp_path / "devices.json"
    path.write_text(json.dumps([main_oven, top_oven, hob, clamp]), encoding="utf-8")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        announce_port = sock.getsockname()[1]
    simulator = TuyaSimulator(
        devices, announce_to=("127.0.0.1", announce_port), announce_interval_s=0.1
    ).start()
    try:
        yield path, announce_port, devices
    finally:
        simulator.stop()


def write_env(tmp_path: Path, devices_json: Path, announce_port: int, devices, circuits) -> dict:
    # Devices on free ports: their addresses (with the port) come from the config.
    addresses = {d.dev_id: f"{d.host}:{d.port}" for d in devices if d.dev_id != devices[1].dev_id}
    return collector_environment(
        tmp_path,
        config=f"CIRCUITS = {circuits!r}\nTUYA_ADDRESSES = {addresses!r}\n",
        TUYA_DEVICES_FILE=str(devices_json),
        TUYA_ANNOUNCE_BIND="127.0.0.1",
        TUYA_ANNOUNCE_PORTS=str(announce_port),
        TUYA_ANNOUNCE_LISTEN_S="5",
        TUYA_TIMEOUT_S="0.5",
        DEVICE_TIMEOUT_S="8",
    )


def circuit(name: str, device: SimulatedTuyaDevice, profile: str) -> dict:
    return {"name": name, "kind": "tuya", "connection": device.dev_id, "profile": profile}


def test_tuya_meters_land_as_circuits(carbon_server, meters, tmp_path):
    devices_json, announce_port, devices = meters
    main_oven, top_oven, hob, clamp = devices
    circuits = [
        circuit("Oven", main_oven, "tuya-din"),
        circuit("Top oven", top_oven, "tuya-din-3p"),
        circuit("Hob", hob, "tuya-din"),
        circuit("Sauna", clamp, "tuya-clamp"),
    ]
    env = write_env(tmp_path, devices_json, announce_port, devices, circuits)
    host, port = carbon_server.line_address
    result = run_collector("circuit_to_graphite.py", ["--once", "--carbon", f"{host}:{port}"], env)
    assert result.returncode == 0, result.stderr
    expected = {
        f"{PREFIX}.oven.voltage_volts": 231.4,
        f"{PREFIX}.oven.current_amps": 7.25,
        f"{PREFIX}.oven.power_watts": 1650.0,
        f"{PREFIX}.oven.energy_kwh": 8123.45,
        f"{PREFIX}.top_oven.l1_voltage_volts": 230.1,
        f"{PREFIX}.top_oven.l2_power_watts": 940.0,
        f"{PREFIX}.top_oven.l3_current_amps": 10.0,
        f"{PREFIX}.top_oven.power_watts": 4180.0,
        f"{PREFIX}.top_oven.current_amps": 18.3,
        f"{PREFIX}.top_oven.voltage_volts": (230.1 + 232.7 + 229.8) / 3,
        f"{PREFIX}.top_oven.energy_kwh": 456.78,
        f"{PREFIX}.sauna.power_watts": 3450.0,
        f"{PREFIX}.sauna.voltage_volts": 230.0,
        f"{PREFIX}.sauna.current_amps": 15.0,
        f"{PREFIX}.sauna.energy_kwh": 0.0,  # no counter: integrated, from its first sample
        f"{HEALTH}.devices_ok": 3,
        f"{HEALTH}.devices_failed": 1,
        f"{HEALTH}.meter_timeouts": 1,  # the hung meter, counted by the collector
    }
    points = carbon_server.wait_for_total(len(expected), list(expected))
    for path, value in expected.items():
        assert points[path][-1][1] == pytest.approx(value, rel=1e-9), path
    assert not [p for p in carbon_server.metric_paths() if ".hob." in p or "is_on" in p]
    assert "Hob" in result.stderr
    assert "no answer" in result.stderr
    for key in {d.local_key.decode() for d in devices}:
        assert key not in result.stderr

    # The Tuya collector leaves circuits alone: each device keeps one client.
    dry = run_collector("tuya_to_graphite.py", ["--once", "--dry-run"], env)
    assert dry.returncode == 3, dry.stderr  # every device here is a circuit
    assert dry.stderr.count("left out: a circuit") == 4


def test_a_circuit_id_missing_from_devices_json_stops_the_collector(meters, tmp_path):
    devices_json, announce_port, devices = meters
    stranger = SimulatedTuyaDevice("bf000000000000stranger", KEY, "3.4", host="127.0.0.1")
    env = write_env(
        tmp_path, devices_json, announce_port, devices, [circuit("X", stranger, "tuya-din")]
    )
    result = run_collector("circuit_to_graphite.py", ["--once", "--dry-run"], env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "bf000000000000stranger is not in" in lines[0]
