#!/usr/bin/env python3
"""Circuit collector benchmark: cycle time and Modbus requests for 20 meters.

Simulated Eastron meters (10 SDM120, 10 SDM630) on loopback, read by the real
collector (CircuitCollector in the shared poll loop) in a dry run whose lines
go nowhere. Three layouts:

- one gateway, 20 units behind it: requests serialized, as a Modbus TCP to
  RS-485 gateway needs;
- 20 gateways on 127.0.0.2..21, one meter each: read in parallel;
- one gateway where one of the 20 units never answers: the cost of a dead meter.

Prints cycle times (median and worst of the steady cycles) and requests per
meter per cycle, counted by the simulated gateways.

    .venv/bin/python bench/bench_circuit.py [--cycles N]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import circuit_sdm
import collector
from circuit_model import SerialLine
from circuit_to_graphite import CircuitCollector
from runtime import DryRunSink, Runtime
from settings import load_settings
from simulators.sdm import ModbusMeterSimulator, SimulatedSDM120, SimulatedSDM630

METERS = 20
MODBUS_TIMEOUT_S = 0.5


def meter(index: int):
    if index % 2:
        sdm630 = SimulatedSDM630(import_kwh=100.0 + index)
        for phase in (1, 2, 3):
            sdm630.set_phase(phase, power_w=100.0 * index + phase, power_factor=0.95)
        return sdm630
    return SimulatedSDM120(power_w=-50.0 * index, import_kwh=10.0 + index)


def circuit(name: str, simulator: ModbusMeterSimulator, unit: int, index: int) -> dict:
    host, port = simulator.address
    return {
        "name": name,
        "kind": "modbus-tcp",
        "connection": f"{host}:{port}",
        "unit": unit,
        "profile": "sdm630" if index % 2 else "sdm120",
    }


def run_cycles(circuits: list, cycles: int, state_dir: str) -> tuple[list[float], int]:
    """Cycle wall times in seconds, and the lines of the last cycle."""
    settings = load_settings(
        env={"ELECTRICITY_STATE_DIR": state_dir},
        local_path=Path(state_dir) / "no_config_local.py",
        overrides={"CIRCUITS": circuits, "CIRCUIT_MODBUS_TIMEOUT_S": MODBUS_TIMEOUT_S},
    )
    runtime = Runtime("circuit", settings, dry_run=True)
    output = io.StringIO()
    runtime.sink = DryRunSink(output)
    circuit_collector = CircuitCollector(runtime, argparse.Namespace(discover=False))

    async def run() -> list[float]:
        poll_loop = collector.PollLoop(circuit_collector, interval_s=10)
        await poll_loop.rediscover()
        times = []
        try:
            for n in range(cycles):
                started = time.perf_counter()
                await poll_loop.cycle(1_800_000_000 + 10 * n)
                times.append(time.perf_counter() - started)
        finally:
            await circuit_collector.close()
        return times

    times = asyncio.run(run())
    last_lines = [
        line
        for line in output.getvalue().splitlines()
        if line.endswith(str(1_800_000_000 + 10 * (cycles - 1)))
    ]
    return times, len(last_lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 cycles: a smoke run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the silent meter's warning is expected
    cycles = 3 if args.quick else args.cycles
    per_value = {name: len(p.registers) for name, p in circuit_sdm.PROFILES.items()}
    print(
        f"{METERS} meters (10 SDM120, 10 SDM630), {cycles} cycles, "
        f"Modbus timeout {MODBUS_TIMEOUT_S} s; "
        f"one register pair per value would need {per_value['sdm120']} (SDM120) and "
        f"{per_value['sdm630']} (SDM630) requests per meter per cycle"
    )

    with tempfile.TemporaryDirectory() as state_dir:
        meters = {unit: meter(unit) for unit in range(1, METERS + 1)}
        with ModbusMeterSimulator(meters=meters) as gateway:
            circuits = [circuit(f"m{unit}", gateway, unit, unit) for unit in meters]
            times, lines = run_cycles(circuits, cycles, state_dir)
            counts = gateway.request_counts()
        report_counts(
            "one gateway, 20 units behind it (serialized)", times, counts, cycles, lines, meters
        )

        gateways = [
            ModbusMeterSimulator(host=f"127.0.0.{n + 1}", meters={1: meter(n)})
            for n in range(1, METERS + 1)
        ]
        try:
            for simulator in gateways:
                simulator.start()
            circuits = [circuit(f"m{n}", sim, 1, n) for n, sim in enumerate(gateways, start=1)]
            times, lines = run_cycles(circuits, cycles, state_dir)
            counts = {n: sim.request_count(1) for n, sim in enumerate(gateways, start=1)}
        finally:
            for simulator in gateways:
                simulator.stop()
        report_counts(
            "20 gateways, one meter each (parallel)", times, counts, cycles, lines, meters
        )

        meters = {unit: meter(unit) for unit in range(1, METERS + 1)}
        meters[2] = SimulatedSDM120(silent=True)  # an SDM120's place
        with ModbusMeterSimulator(meters=meters) as gateway:
            circuits = [circuit(f"m{unit}", gateway, unit, unit) for unit in meters]
            times, lines = run_cycles(circuits, cycles, state_dir)
            counts = gateway.request_counts()
        report_counts(
            "one gateway, 20 units, one of them silent", times, counts, cycles, lines, meters
        )
    report_serial_wire_time()
    return 0


def report_serial_wire_time() -> None:
    """What the same 20 meters cost on one real RS-485 bus: bytes on the wire
    only (a meter's turnaround, tens of ms, comes on top of each request)."""
    print("one RS-485 bus, 20 meters: bytes on the wire per cycle (8N1, no turnaround)")
    for baudrate in (2400, 9600, 19200, 38400):
        line = SerialLine("bus", baudrate, "N", 1)
        block_s = per_value_s = 0.0
        for index in range(1, METERS + 1):
            profile = circuit_sdm.PROFILES["sdm630" if index % 2 else "sdm120"]
            for block in profile.blocks:  # request 8 bytes, reply 5 + 2 per register
                block_s += line.transfer_s(8 + 5 + 2 * block.count)
            per_value_s += len(profile.registers) * line.transfer_s(8 + 5 + 4)
        print(
            f"  {baudrate:5d} baud: block reads {block_s:5.2f} s "
            f"(one register pair per value: {per_value_s:5.2f} s + 13x the turnarounds)"
        )


def report_counts(
    title: str, times: list[float], counts: dict, cycles: int, lines: int, meters: dict
) -> None:
    steady = times[1:]  # the first cycle connects and checks each SDM630's model
    model_checks = sum(1 for unit in meters if unit % 2)
    requests = sum(counts.values())
    per_meter = (requests - model_checks) / METERS / cycles
    print(title)
    print(
        f"  first cycle {times[0] * 1000:7.1f} ms; steady cycles: median "
        f"{statistics.median(steady) * 1000:7.1f} ms, worst {max(steady) * 1000:7.1f} ms"
    )
    print(
        f"  {requests} requests in {cycles} cycles: {per_meter:.2f} per meter per cycle "
        f"(+1 model check per SDM630 at start); {lines} lines per cycle"
    )


if __name__ == "__main__":
    sys.exit(main())
