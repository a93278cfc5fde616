"""circuit_to_graphite.py as users run it: simulated Eastron meters behind a
Modbus TCP gateway on loopback, the real script, a real carbon-cache."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.carbon import free_port
from simulators.sdm import (
    ModbusMeterSimulator,
    SimulatedSDM120,
    example_sdm120,
    example_sdm630,
)
from tests.helpers import carbon_arg, run_collector, start_collector

# Every test here starts a server, a simulated device or a process.
pytestmark = pytest.mark.slow

PREFIX = "home.electricity.circuit"
HEALTH = "home.electricity.health.circuit"


@pytest.fixture
def gateway():
    heat_pump, ev_charger = example_sdm120(), example_sdm630()
    meters = {1: heat_pump, 2: ev_charger, 3: SimulatedSDM120(fault=True)}
    with ModbusMeterSimulator(meters=meters) as simulator:
        yield simulator


def write_config(tmp_path: Path, circuits: list) -> Path:
    local = tmp_path / "config_local.py"
    local.write_text(f"CIRCUITS = {circuits!r}\n")
    return local


def circuits_on(gateway: ModbusMeterSimulator, *units: int) -> list:
    host, port = gateway.address
    names = {1: ("Heat pump", "sdm120"), 2: ("EV charger", "sdm630"), 3: ("Sauna", "sdm120")}
    return [
        {
            "name": names[unit][0],
            "kind": "modbus-tcp",
            "connection": f"{host}:{port}",
            "unit": unit,
            "profile": names[unit][1],
        }
        for unit in units
    ]


@pytest.fixture
def env(collector_env, tmp_path, gateway):
    """A collector process's environment: the meters above, short timeouts."""
    return {
        **collector_env,
        "ELECTRICITY_CONFIG": str(write_config(tmp_path, circuits_on(gateway, 1, 2, 3))),
        "CIRCUIT_MODBUS_TIMEOUT_S": "0.5",
        "DEVICE_TIMEOUT_S": "3",
        "CARBON_TIMEOUT_S": "2",
    }


def run_circuit(args: list, env: dict, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return run_collector("circuit_to_graphite.py", args, env, timeout_s)


def test_once_lands_every_figure_in_carbon(carbon_server, env) -> None:
    result = run_circuit(["--once", "--carbon", carbon_arg(carbon_server)], env)
    # The refusing meter (Sauna) is logged and skipped; the others were delivered.
    assert result.returncode == 0, result.stderr
    assert "Sauna" in result.stderr
    assert "exception 0x04" in result.stderr
    assert result.stdout == ""
    expected = {
        f"{PREFIX}.heat_pump.power_watts": -1480.0,
        f"{PREFIX}.heat_pump.energy_kwh": 1234.5,
        f"{PREFIX}.heat_pump.energy_export_kwh": 67.25,
        f"{PREFIX}.heat_pump.power_factor": 0.98,
        f"{PREFIX}.ev_charger.l2_power_watts": -550.0,
        f"{PREFIX}.ev_charger.l3_current_amps": 10.0,
        f"{PREFIX}.ev_charger.power_watts": 2650.0,
        f"{PREFIX}.ev_charger.current_amps": 16.5,
        f"{PREFIX}.ev_charger.voltage_volts": 231.0,
        f"{HEALTH}.devices_ok": 2,
        f"{HEALTH}.devices_failed": 1,
        f"{HEALTH}.meter_exceptions": 1,
    }
    for path, value in expected.items():
        points = carbon_server.wait_for_points(path)
        assert points[-1][1] == pytest.approx(value, rel=1e-6), path
    assert not [p for p in carbon_server.metric_paths() if ".sauna." in p]


def test_runs_as_a_service_until_sigterm(carbon_server, env, gateway) -> None:
    process = start_collector(
        "circuit_to_graphite.py", ["--interval", "1", "--carbon", carbon_arg(carbon_server)], env
    )
    path = f"{PREFIX}.heat_pump.power_watts"
    try:
        carbon_server.wait_for_points(path, count=2, timeout_s=20)
        gateway.meters[1].set(power_w=2500.0)  # the heat pump starts
        carbon_server.wait_for(
            lambda: any(v == 2500.0 for _, v in carbon_server.fetch(path)),
            timeout_s=20,
            what="the new power in carbon",
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    stamps = [ts for ts, _ in carbon_server.fetch(path)]
    assert stamps == list(range(stamps[0], stamps[-1] + 1))  # every second, aligned
    # The refusing meter is reported once, not every second.
    reports = [line for line in stderr.splitlines() if "Sauna" in line and "exception" in line]
    assert len(reports) == 1, stderr


def test_discover_probes_each_meter_and_sends_nothing(carbon_server, env) -> None:
    result = run_circuit(["--discover", "--carbon", carbon_arg(carbon_server)], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["circuit", "id", "kind", "connection", "profile", "answer"]
    rows = {line.split("  ")[0]: line for line in lines[2:]}
    assert set(rows) == {"Heat pump", "EV charger", "Sauna"}
    assert "231.5 V 6.50 A -1480 W" in rows["Heat pump"]
    assert "L2 231.0 V 2.50 A -550 W" in rows["EV charger"]
    assert "total 231.0 V 16.50 A 2650 W" in rows["EV charger"]
    assert "refused" in rows["Sauna"]
    assert "server device failure" in rows["Sauna"]
    time.sleep(1)
    assert carbon_server.metric_paths() == []


def test_dry_run_prints_only_lines(env) -> None:
    result = run_circuit(["--once", "--dry-run"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines
    assert all(len(line.split()) == 3 for line in lines)
    assert any(line.startswith(f"{PREFIX}.heat_pump.power_watts -1480 ") for line in lines)


def test_exit_codes(env, tmp_path, gateway) -> None:
    # Carbon unreachable: 1, one line on stderr, the lines in the spool.
    result = run_circuit(["--once", "--carbon", f"127.0.0.1:{free_port()}"], env)
    assert result.returncode == 1, result.stderr
    assert "lines kept in the spool" in result.stderr.splitlines()[-1]
    # No meter answered: 3.
    only_refusing = write_config(tmp_path, circuits_on(gateway, 3))
    result = run_circuit(["--once", "--dry-run"], {**env, "ELECTRICITY_CONFIG": str(only_refusing)})
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines()[-1] == "circuit: no device answered"
    # A bad circuit: 2, one line naming it, before any polling.
    bad = circuits_on(gateway, 1)
    bad[0]["unit"] = 300
    result = run_circuit(
        ["--once"], {**env, "ELECTRICITY_CONFIG": str(write_config(tmp_path, bad))}
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("circuit: CIRCUITS[0] ('Heat pump'): unit"), lines
    # Nothing configured: 2.
    result = run_circuit(["--once"], {**env, "ELECTRICITY_CONFIG": str(write_config(tmp_path, []))})
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "circuit: CIRCUITS: no circuits configured (see docs/circuit.md)"
    )
