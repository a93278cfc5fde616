"""circuit_to_graphite against simulated Eastron meters over real Modbus (pymodbus
on loopback, TCP and RTU over a pty), in-process: what a cycle sends and counts."""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
from pathlib import Path

import pytest

import circuit_modbus
import circuit_to_graphite
import collector
from circuit_model import CircuitReader
from circuit_to_graphite import CircuitCollector
from runtime import DryRunSink, Runtime
from settings import ConfigError, load_settings
from simulators.sdm import (
    ModbusMeterSimulator,
    ModbusRtuSimulator,
    SimulatedSDM120,
    example_sdm120,
    example_sdm630,
)

PREFIX = "home.electricity.circuit"
TIMESTAMP = 1_800_000_000
# Short, so silent meters cost little; loopback answers in milliseconds.
MODBUS_TIMEOUT_S = 0.3


def tcp_circuit(name: str, gateway: ModbusMeterSimulator, unit: int, profile: str) -> dict:
    host, port = gateway.address
    return {
        "name": name,
        "kind": "modbus-tcp",
        "connection": f"{host}:{port}",
        "unit": unit,
        "profile": profile,
    }


class Harness:
    """A circuit collector in a dry run whose lines land in a buffer."""

    def __init__(self, tmp_path: Path, circuits: list, **overrides) -> None:
        settings = load_settings(
            env={"ELECTRICITY_STATE_DIR": str(tmp_path / "state")},
            local_path=tmp_path / "no_config_local.py",
            overrides={
                "CIRCUITS": circuits,
                "CIRCUIT_MODBUS_TIMEOUT_S": MODBUS_TIMEOUT_S,
                "DEVICE_TIMEOUT_S": 5.0,
                **overrides,
            },
        )
        self.runtime = Runtime("circuit", settings, dry_run=True)
        self.output = io.StringIO()
        self.runtime.sink = DryRunSink(self.output)
        self.collector = CircuitCollector(self.runtime, argparse.Namespace(discover=False))

    def cycles(self, count: int = 1) -> list[tuple[int, int, bool]]:
        async def run() -> list[tuple[int, int, bool]]:
            # Made in the running loop: Python 3.9's asyncio.Event binds to it.
            poll_loop = collector.PollLoop(self.collector, interval_s=10)
            try:
                await poll_loop.rediscover()
                return [await poll_loop.cycle(TIMESTAMP + 10 * n) for n in range(count)]
            finally:
                await self.collector.close()

        return asyncio.run(run())

    def values(self, timestamp: int = TIMESTAMP) -> dict[str, float]:
        """Sent values by path, of one cycle."""
        found = {}
        for line in self.output.getvalue().splitlines():
            path, value, stamp = line.split()
            if int(stamp) == timestamp:
                found[path] = float(value)
        return found

    @property
    def health(self) -> dict:
        return {**vars(self.runtime.health), **self.runtime.health.extra}


@pytest.fixture
def gateway():
    meters = {
        1: example_sdm120(),
        2: example_sdm630(),
        3: SimulatedSDM120(fault=True),
        4: SimulatedSDM120(silent=True),
    }
    with ModbusMeterSimulator(meters=meters) as simulator:
        yield simulator


@pytest.mark.slow
def test_one_cycle_sends_every_figure_with_one_request_per_meter(gateway, tmp_path) -> None:
    harness = Harness(
        tmp_path,
        [
            tcp_circuit("Solar inverter", gateway, 1, "sdm120"),
            tcp_circuit("EV charger", gateway, 2, "sdm630"),
        ],
    )
    gateway.reset_counts()
    assert harness.cycles(3) == [(2, 0, True)] * 3
    # One block read per meter per cycle, not one per value; the SDM630's
    # model is checked once, with one more request before its first reading.
    assert gateway.request_counts() == {1: 3, 2: 3 + 1}
    values = harness.values()
    solar = {k[len(PREFIX) + 16 :]: v for k, v in values.items() if ".solar_inverter." in k}
    assert solar == {
        "power_watts": -1480.0,  # export kept, sign and all
        "voltage_volts": 231.5,
        "current_amps": 6.5,
        "power_factor": 0.98,
        "frequency_hz": 49.95,
        "energy_kwh": 1234.5,
        "energy_export_kwh": 67.25,
    }
    ev = f"{PREFIX}.ev_charger"
    assert [values[f"{ev}.l{p}_power_watts"] for p in (1, 2, 3)] == [900.0, -550.0, 2300.0]
    assert [values[f"{ev}.l{p}_current_amps"] for p in (1, 2, 3)] == [4.0, 2.5, 10.0]
    assert [values[f"{ev}.l{p}_voltage_volts"] for p in (1, 2, 3)] == [229.0, 231.0, 233.0]
    assert values[f"{ev}.l2_power_factor"] == 0.95
    assert values[f"{ev}.power_watts"] == 2650.0
    assert values[f"{ev}.current_amps"] == 16.5
    assert values[f"{ev}.voltage_volts"] == 231.0
    assert values[f"{ev}.energy_kwh"] == 9876.5
    assert values[f"{ev}.energy_export_kwh"] == 12.5
    assert values[f"{ev}.frequency_hz"] == 50.02
    assert values["home.electricity.health.circuit.devices_ok"] == 2


@pytest.mark.slow
def test_a_refusing_and_a_silent_meter_are_skipped_and_counted(gateway, tmp_path) -> None:
    harness = Harness(
        tmp_path,
        [
            tcp_circuit("Heat pump", gateway, 1, "sdm120"),
            tcp_circuit("Broken", gateway, 3, "sdm120"),
            tcp_circuit("Silent", gateway, 4, "sdm120"),
            tcp_circuit("EV charger", gateway, 2, "sdm630"),
        ],
    )
    # More cycles than pymodbus's own no-response limit: the silent unit must
    # never cost the others their readings.
    results = harness.cycles(6)
    assert results == [(2, 2, True)] * 6
    for n in range(6):
        values = harness.values(TIMESTAMP + 10 * n)
        assert values[f"{PREFIX}.heat_pump.power_watts"] == -1480.0
        assert values[f"{PREFIX}.ev_charger.power_watts"] == 2650.0
        assert not any(".broken." in path or ".silent." in path for path in values)
    assert harness.health["meter_exceptions"] == 6
    assert harness.health["meter_timeouts"] == 6
    assert harness.values(TIMESTAMP + 50)["home.electricity.health.circuit.meter_timeouts"] == 6


@pytest.mark.slow
def test_a_meter_with_the_wrong_profile_is_refused_not_misread(gateway, tmp_path) -> None:
    # An SDM120 has no register 0x34 (total power): it refuses the SDM630 read.
    # Its block read alone would succeed, with zeros for phases 2 and 3.
    harness = Harness(tmp_path, [tcp_circuit("Oven", gateway, 1, "sdm630")])
    assert harness.cycles(2) == [(0, 1, True)] * 2
    assert harness.health["meter_exceptions"] == 2
    assert not any(".oven." in path for path in harness.output.getvalue().splitlines())


@pytest.mark.slow
def test_impossible_values_are_dropped_and_counted(gateway, tmp_path) -> None:
    gateway.meters[1].set(voltage_v=float("nan"), frequency_hz=0.0, power_w=-1480.0)
    gateway.meters[2].set_phase(2, power_w=90000.0)  # beyond an SDM630's 100 A
    harness = Harness(
        tmp_path,
        [
            tcp_circuit("Heat pump", gateway, 1, "sdm120"),
            tcp_circuit("EV charger", gateway, 2, "sdm630"),
        ],
    )
    assert harness.cycles() == [(2, 0, True)]
    values = harness.values()
    assert f"{PREFIX}.heat_pump.voltage_volts" not in values
    assert f"{PREFIX}.heat_pump.frequency_hz" not in values
    assert values[f"{PREFIX}.heat_pump.power_watts"] == -1480.0
    assert f"{PREFIX}.ev_charger.l2_power_watts" not in values
    assert values[f"{PREFIX}.ev_charger.l1_power_watts"] == 900.0
    # 900 - 550 ... the meter's own total (0x34) is 92 kW: within 3 x 33 kW.
    assert values[f"{PREFIX}.ev_charger.power_watts"] == 900.0 + 90000.0 + 2300.0
    assert harness.health["values_out_of_range"] == 3
    assert all("nan" not in line for line in harness.output.getvalue().splitlines())


@pytest.mark.slow
def test_a_silent_meter_on_one_gateway_delays_no_other_gateway(tmp_path) -> None:
    slow_timeout_s = 2.0
    slow_meters = {1: SimulatedSDM120(silent=True), 2: example_sdm120()}
    with (
        ModbusMeterSimulator(meters=slow_meters) as slow,
        ModbusMeterSimulator(meters={1: example_sdm630()}) as fast,
    ):
        harness = Harness(
            tmp_path,
            [
                tcp_circuit("Silent", slow, 1, "sdm120"),
                tcp_circuit("Behind silent", slow, 2, "sdm120"),
                tcp_circuit("Elsewhere", fast, 1, "sdm630"),
            ],
            CIRCUIT_MODBUS_TIMEOUT_S=slow_timeout_s,
        )
        sent_at = []
        sink_send = harness.runtime.sink.send_lines

        def recording_send(lines):
            sent_at.append((time.monotonic(), list(lines)))
            return sink_send(lines)

        harness.runtime.sink.send_lines = recording_send
        started = time.monotonic()
        assert harness.cycles() == [(2, 1, True)]
    first_at, first_lines = sent_at[0]
    assert all(".elsewhere." in line for line in first_lines)
    assert first_at - started < slow_timeout_s / 2
    # The meter queued behind the silent one on the same gateway still answers.
    assert harness.values()[f"{PREFIX}.behind_silent.power_watts"] == -1480.0


def test_an_unreachable_gateway_fails_its_meters_at_once(tmp_path, caplog) -> None:
    from harness.carbon import free_port

    port = free_port()  # nothing listens: connection refused
    circuits = [
        {
            "name": f"Meter {unit}",
            "kind": "modbus-tcp",
            "connection": f"127.0.0.1:{port}",
            "unit": unit,
            "profile": "sdm120",
        }
        for unit in range(1, 6)
    ]
    harness = Harness(tmp_path, circuits)
    assert harness.cycles(2) == [(0, 5, True)] * 2
    assert harness.health["meter_timeouts"] == 10
    assert harness.health["devices_failed"] == 5
    assert f"cannot connect to 127.0.0.1:{port} (refused" in caplog.text


def test_meters_on_a_serial_bus(tmp_path) -> None:
    pytest.importorskip("serial", reason="Modbus RTU needs pyserial")
    meters = {1: example_sdm120(), 2: example_sdm630(), 3: SimulatedSDM120(silent=True)}
    with ModbusRtuSimulator(meters=meters, baudrate=9600) as bus:
        circuits = [
            {
                "name": name,
                "kind": "modbus-rtu",
                "connection": bus.port,
                "unit": unit,
                "profile": profile,
                "baudrate": 9600,
            }
            for name, unit, profile in (
                ("Heat pump", 1, "sdm120"),
                ("EV charger", 2, "sdm630"),
                ("Silent", 3, "sdm120"),
            )
        ]
        harness = Harness(tmp_path, circuits)
        assert harness.cycles(2) == [(2, 1, True)] * 2
        assert bus.request_counts() == {1: 2, 2: 2 + 1, 3: 2}  # + the model check
    for n in range(2):
        values = harness.values(TIMESTAMP + 10 * n)
        assert values[f"{PREFIX}.heat_pump.power_watts"] == -1480.0
        assert values[f"{PREFIX}.ev_charger.l2_power_watts"] == -550.0
        assert values[f"{PREFIX}.ev_charger.power_watts"] == 2650.0


def test_a_missing_serial_port_is_a_failed_meter_not_a_crash(tmp_path, caplog) -> None:
    circuits = [
        {
            "name": "Heat pump",
            "kind": "modbus-rtu",
            "connection": str(tmp_path / "ttyUSB9"),
            "profile": "sdm120",
        }
    ]
    harness = Harness(tmp_path, circuits)
    assert harness.cycles() == [(0, 1, True)]
    assert harness.health["meter_timeouts"] == 1
    assert f"{tmp_path / 'ttyUSB9'} does not exist (adapter unplugged?" in caplog.text
    not_a_tty = tmp_path / "not_a_tty"
    not_a_tty.write_text("")
    assert "cannot open" in circuit_modbus.serial_port_problem(str(not_a_tty))


@pytest.mark.slow
def test_the_configured_name_wins_after_a_rename(gateway, tmp_path) -> None:
    # Not a dry run: the name map is on disk, as in service.
    settings_env = {"ELECTRICITY_STATE_DIR": str(tmp_path / "state")}
    stable_id = "modbus-tcp:{}:{}:1".format(*gateway.address)
    for name, segment in (("Heat pump", "heat_pump"), ("Heat pump (garden)", "heat_pump_garden")):
        settings = load_settings(
            env=settings_env,
            local_path=tmp_path / "none.py",
            overrides={"CIRCUITS": [tcp_circuit(name, gateway, 1, "sdm120")]},
        )
        runtime = Runtime("circuit", settings)
        CircuitCollector(runtime, argparse.Namespace(discover=False))
        assert runtime.names.name_for(stable_id, "reported name") == segment


class PhasesOnlyReader(CircuitReader):
    """A stand-in for a reader of meters that report phases only (like Tuya
    three-phase DIN meters): checks the seam, not any device."""

    async def read(self, circuit):
        return {
            "l1_power_watts": 1000.0,
            "l2_power_watts": 2000.0,
            "l3_power_watts": 3000.0,
            "l1_voltage_volts": 230.0,
            "l2_voltage_volts": 231.0,
            "l3_voltage_volts": 232.0,
            "energy_kwh": 42.5,
        }


def test_a_reader_plugged_in_for_a_kind_gets_totals_and_ranges(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(circuit_to_graphite.READERS, "tuya", PhasesOnlyReader)
    circuit = {"name": "Sauna", "kind": "tuya", "connection": "bf52baba", "profile": "tuya-din-3p"}
    harness = Harness(tmp_path, [circuit])
    assert harness.cycles() == [(1, 0, True)]
    values = harness.values()
    assert values[f"{PREFIX}.sauna.power_watts"] == 6000.0
    assert values[f"{PREFIX}.sauna.voltage_volts"] == 231.0
    assert values[f"{PREFIX}.sauna.energy_kwh"] == 42.5


def test_a_kind_without_a_reader_is_a_config_error(tmp_path, monkeypatch) -> None:
    circuit = {"name": "Oven", "kind": "tuya", "connection": "bf52baba", "profile": "tuya-din"}
    monkeypatch.setitem(sys.modules, "circuit_tuya", None)  # as if not written yet
    with pytest.raises(ConfigError, match="no reader for kind tuya"):
        Harness(tmp_path, [circuit])
    monkeypatch.delitem(circuit_to_graphite.READERS, "tuya")
    with pytest.raises(ConfigError, match="no reader for kind tuya"):
        Harness(tmp_path, [circuit])
    with pytest.raises(ConfigError, match="CIRCUITS: no circuits configured"):
        Harness(tmp_path, [])
