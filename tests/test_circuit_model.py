"""circuit_model.py without devices: CIRCUITS checking, totals, ranges, names."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

import circuit_model as circuits_module
import config
from circuit_model import (
    PHYSICAL_LIMITS,
    Circuit,
    check_ranges,
    complete_totals,
    configured_tuya_circuit_ids,
    describe_values,
    parse_circuits,
    range_for,
)
from settings import ConfigError, load_settings

RANGES = config.CIRCUIT_RANGES


def tcp(name: str, unit: int = 1, profile: str = "sdm120", **extra) -> dict:
    return {
        "name": name,
        "kind": "modbus-tcp",
        "connection": "127.0.0.1:5020",
        "unit": unit,
        "profile": profile,
        **extra,
    }


def rtu(name: str, unit: int, profile: str = "sdm120", **extra) -> dict:
    return {
        "name": name,
        "kind": "modbus-rtu",
        "connection": "/dev/ttyUSB0",
        "unit": unit,
        "profile": profile,
        **extra,
    }


def parse_one(entry: dict) -> Circuit:
    (circuit,) = parse_circuits([entry], RANGES)
    return circuit


def config_error(entries: list, ranges: dict = RANGES) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_circuits(entries, ranges)
    return str(caught.value)


# -- CIRCUITS --------------------------------------------------------------------


def test_a_modbus_tcp_circuit() -> None:
    circuit = parse_one(tcp("Heat pump", unit=7))
    assert circuit.segment == "heat_pump"
    assert (circuit.host, circuit.port, circuit.unit) == ("127.0.0.1", 5020, 7)
    assert circuit.stable_id == "modbus-tcp:127.0.0.1:5020:7"
    assert circuit.bus == "127.0.0.1:5020"
    assert circuit.phases == 1
    assert circuit.serial is None
    assert circuit.ranges["power_watts"] == (-15000.0, 15000.0)
    assert circuit.ranges["power_factor"] == PHYSICAL_LIMITS["power_factor"]


def test_modbus_defaults_port_502_and_unit_1() -> None:
    circuit = parse_one(
        {"name": "Oven", "kind": "modbus-tcp", "connection": "127.0.0.2", "profile": "sdm630"}
    )
    assert (circuit.port, circuit.unit, circuit.phases) == (502, 1, 3)


def test_a_modbus_rtu_circuit_takes_the_factory_baud_rate_of_its_profile() -> None:
    sdm120, sdm630 = parse_circuits(
        [rtu("A", 1), {**rtu("B", 2, "sdm630"), "connection": "/dev/ttyUSB1"}], RANGES
    )
    assert (sdm120.serial.baudrate, sdm120.serial.parity, sdm120.serial.stopbits) == (2400, "N", 1)
    assert sdm630.serial.baudrate == 9600
    assert sdm120.stable_id == "modbus-rtu:/dev/ttyUSB0:1"
    assert sdm120.address == "/dev/ttyUSB0 unit 1"


def test_one_serial_port_is_one_bus_with_one_speed() -> None:
    message = config_error([rtu("A", 1), rtu("B", 2, "sdm630")])
    assert message.startswith("CIRCUITS[1] ('B'): /dev/ttyUSB0 is one bus")
    assert "2400 N1" in message
    assert "9600 N1" in message
    both = parse_circuits([rtu("A", 1, baudrate=9600), rtu("B", 2, "sdm630")], RANGES)
    assert {c.serial.baudrate for c in both} == {9600}


def test_a_tuya_circuit() -> None:
    entry = {
        "name": "Main oven",
        "kind": "tuya",
        "connection": "bf52baba2305f136datzwi",
        "profile": "tuya-din",
    }
    circuit = parse_one(entry)
    assert circuit.stable_id == "bf52baba2305f136datzwi"
    assert circuit.address == "bf52baba2305f136datzwi"
    assert parse_one({**entry, "profile": "tuya-din-3p"}).phases == 3


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("sdm120", "must be a dict"),
        ({**tcp("A"), "unit_id": 2}, "unknown key 'unit_id'"),
        ({**tcp("A"), "kind": "modbus"}, "kind must be one of modbus-tcp, modbus-rtu, tuya"),
        ({**tcp("A"), "profile": "sdm72"}, "profile must be one of"),
        ({**tcp("A"), "profile": "tuya-din"}, "profile 'tuya-din' is not read over modbus-tcp"),
        ({**tcp("A"), "connection": ""}, "connection must be a non-empty string"),
        ({**tcp("A"), "name": 5}, "name must be a non-empty string"),
        (tcp("A", unit=0), "unit must be a Modbus unit id, 1 to 247, not 0"),
        (tcp("A", unit=True), "unit must be a Modbus unit id"),
        ({**tcp("A"), "connection": "127.0.0.1:99999"}, "bad port"),
        ({**tcp("A"), "baudrate": 9600}, "baudrate, parity, stopbits are for modbus-rtu"),
        (rtu("A", 1, baudrate=9601), "baudrate must be one of"),
        (rtu("A", 1, parity="X"), "parity must be"),
        (rtu("A", 1, stopbits=3), "stopbits must be 1 or 2"),
        (
            {"name": "T", "kind": "tuya", "connection": "x", "profile": "tuya-din", "unit": 1},
            "are for Modbus meters",
        ),
        ({**tcp("A"), "ranges": {"power": [0, 1]}}, "unknown metric 'power'"),
        ({**tcp("A"), "ranges": {"power_watts": [5, 1]}}, "power_watts must be [min, max]"),
        ({**tcp("A"), "ranges": {"power_watts": [0, "x"]}}, "power_watts must be [min, max]"),
    ],
)
def test_bad_entries_are_named(entry, message: str) -> None:
    text = config_error([tcp("Fine", unit=9), entry])
    assert text.startswith("CIRCUITS[1]"), text
    assert message in text


def test_two_circuits_cannot_share_a_name_or_a_meter() -> None:
    assert "same metric name 'heat_pump'" in config_error(
        [tcp("Heat pump", 1), tcp("heat-pump", 2)]
    )
    assert "same meter (127.0.0.1:5020 unit 1)" in config_error([tcp("A", 1), tcp("B", 1)])
    # The same unit behind another gateway is another meter.
    assert (
        len(parse_circuits([tcp("A", 1), {**tcp("B", 1), "connection": "127.0.0.2:5020"}], RANGES))
        == 2
    )


def test_circuit_ranges_setting_is_checked() -> None:
    assert "CIRCUIT_RANGES: must be a dict" in config_error([tcp("A")], ranges=[])
    bad = {"sdm120": {"power_watts": [1]}}
    assert "CIRCUIT_RANGES['sdm120']: power_watts must be [min, max]" in config_error(
        [tcp("A")], bad
    )


def test_a_circuits_own_ranges_override_its_profiles() -> None:
    circuit = parse_one({**tcp("A"), "ranges": {"current_amps": [0, 16]}})
    assert circuit.ranges["current_amps"] == (0.0, 16.0)
    assert circuit.ranges["power_watts"] == (-15000.0, 15000.0)


def test_circuits_from_the_environment_as_json(tmp_path) -> None:
    entries = [tcp("Heat pump"), rtu("EV", 2, "sdm630")]
    settings = load_settings(env={"CIRCUITS": json.dumps(entries)}, local_path=tmp_path / "none.py")
    assert [c.name for c in parse_circuits(settings.circuits, settings.circuit_ranges)] == [
        "Heat pump",
        "EV",
    ]


def test_default_settings_are_consistent() -> None:
    assert config.CIRCUITS == []
    assert set(config.CIRCUIT_RANGES) == set(circuits_module.PROFILE_KINDS)
    for profile in config.CIRCUIT_RANGES:  # every profile's ranges parse
        kind = circuits_module.PROFILE_KINDS[profile][0]
        entry = {"name": "x", "kind": kind, "connection": "127.0.0.1", "profile": profile}
        parse_one(entry)


# -- Tuya devices configured as circuits -------------------------------------------


def test_configured_tuya_circuit_ids_come_from_devices_json(fixtures_dir) -> None:
    devices = json.loads((fixtures_dir / "tuya" / "devices.json").read_text())
    din_meters = [d["id"] for d in devices if d.get("category") == "dlq"]
    assert len(din_meters) == 2  # Main Oven and Top Oven, metering breakers
    settings = SimpleNamespace(
        circuits=[
            {
                "name": "Main oven",
                "kind": "tuya",
                "connection": din_meters[0],
                "profile": "tuya-din",
            },
            {
                "name": "Top oven",
                "kind": "tuya",
                "connection": f" {din_meters[1]} ",
                "profile": "tuya-din",
            },
            tcp("Heat pump"),
            "not even a dict",
            {"kind": "tuya", "connection": 42},
        ]
    )
    assert configured_tuya_circuit_ids(settings) == set(din_meters)
    assert configured_tuya_circuit_ids(SimpleNamespace(circuits=[])) == set()


# -- Extract: totals and ranges -------------------------------------------------------


def test_totals_are_worked_out_from_phases_only_when_missing() -> None:
    phases = {
        "l1_power_watts": 900.0,
        "l2_power_watts": -550.0,
        "l3_power_watts": 2300.0,
        "l1_current_amps": 4.0,
        "l2_current_amps": 2.5,
        "l3_current_amps": 10.0,
        "l1_voltage_volts": 229.0,
        "l2_voltage_volts": 231.0,
        "l3_voltage_volts": 236.0,
    }
    totals = complete_totals(phases, 3)
    assert totals["power_watts"] == 2650.0
    assert totals["current_amps"] == 16.5
    assert totals["voltage_volts"] == 232.0
    # The meter's own figure wins; a missing phase means no total.
    assert complete_totals({**phases, "power_watts": 2651.0}, 3)["power_watts"] == 2651.0
    partial = {k: v for k, v in phases.items() if k != "l2_power_watts"}
    assert "power_watts" not in complete_totals(partial, 3)
    assert complete_totals({"power_watts": 5.0}, 1) == {"power_watts": 5.0}


def test_ranges_are_per_phase_and_summed_totals_scale() -> None:
    ranges = {"power_watts": (-100.0, 100.0), "voltage_volts": (100.0, 300.0)}
    assert range_for("l2_power_watts", ranges, 3) == (-100.0, 100.0)
    assert range_for("power_watts", ranges, 3) == (-300.0, 300.0)
    assert range_for("power_watts", ranges, 1) == (-100.0, 100.0)
    assert range_for("voltage_volts", ranges, 3) == (100.0, 300.0)  # a mean, not a sum
    assert range_for("frequency_hz", ranges, 1) is None


def test_check_ranges_keeps_export_and_drops_the_impossible() -> None:
    ranges = {
        **PHYSICAL_LIMITS,
        "power_watts": (-15000.0, 15000.0),
        "voltage_volts": (100.0, 300.0),
    }
    values = {
        "power_watts": -1480.0,  # export: real, kept
        "voltage_volts": 0.0,  # a glitch
        "power_factor": 1.7,
        "frequency_hz": math.nan,
        "energy_kwh": -3.0,
        "energy_export_kwh": math.inf,
        "current_amps": "6.5",  # not a number
        "l1_power_watts": 20000.0,
    }
    kept, dropped = check_ranges(values, ranges, phases=1)
    assert kept == {"power_watts": -1480.0}
    assert set(dropped) == set(values) - {"power_watts"}


def test_describe_values_for_discover() -> None:
    assert describe_values({"voltage_volts": 231.5, "power_watts": -1480.0}) == "231.5 V -1480 W"
    three = describe_values({"l1_power_watts": 900.0, "l2_power_watts": 5.0, "power_watts": 905.0})
    assert three == "L1 900 W; L2 5 W; total 905 W"
    assert describe_values({}) == "no figures"
