#!/usr/bin/env python3
"""DIN-rail circuit meters to Graphite: one named circuit per meter.

Users fit a meter on each circuit that matters (ovens, heat pump, EV
charger) and list it in CIRCUITS (config.py). Each cycle reads every meter
and sends ``home.electricity.circuit.<circuit>.<metric>``:
``power_watts`` (negative = export, kept), ``voltage_volts``,
``current_amps``, ``energy_kwh`` (import counter), ``energy_export_kwh``,
``power_factor``, ``frequency_hz``.

Three-phase meters add ``l1_``/``l2_``/``l3_`` per phase, and their
unprefixed figures describe the circuit as a whole: ``power_watts`` the
total power, ``current_amps`` the sum of the line currents, ``voltage_volts``
the mean line-to-neutral voltage (a "total" voltage means nothing),
``power_factor`` the total power factor. An Eastron SDM630 reports these
itself; for meters that report only phases they are worked out here.

A meter's figures go through its profile's ranges (CIRCUIT_RANGES): a value
outside them or not a number is dropped, logged and counted, never sent.

Kinds of meter are pluggable readers (see ``circuit_model.CircuitReader`` and
``READERS``): Eastron SDM120/SDM630 over Modbus TCP (a gateway) or Modbus
RTU (an RS-485 adapter) by the Modbus reader (circuit_modbus.py, with the
register maps in circuit_sdm.py); Tuya DIN meters by the Tuya reader
(circuit_tuya.py). The circuit model, ranges and totals are in circuit_model.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import collector
from circuit_modbus import ModbusReader
from circuit_model import (
    HEALTH_COUNTERS,
    Circuit,
    CircuitReader,
    CircuitReadError,
    MeterException,
    check_ranges,
    complete_totals,
    describe_values,
    parse_circuits,
    range_for,
)
from runtime import Once, Runtime, run_source
from settings import ConfigError

# --- Readers: one per kind of meter -------------------------------------------------


def tuya_reader(runtime: Runtime, circuits: Sequence[Circuit]) -> CircuitReader:
    """The Tuya DIN-meter reader, ``circuit_tuya.TuyaCircuitReader``, imported
    only when a Tuya circuit is configured (a Modbus-only setup never loads
    tinytuya)."""
    try:
        from circuit_tuya import TuyaCircuitReader
    except ModuleNotFoundError as exc:
        if exc.name != "circuit_tuya":
            raise
        raise ConfigError("CIRCUITS: no reader for kind tuya in this version") from None
    return TuyaCircuitReader(runtime, circuits)


# Kind -> reader: a CircuitReader class, or a callable with the same signature.
READERS: dict[str, Callable[[Runtime, Sequence[Circuit]], CircuitReader]] = {
    "modbus-tcp": ModbusReader,
    "modbus-rtu": ModbusReader,
    "tuya": tuya_reader,
}


# --- The collector ------------------------------------------------------------------


class CircuitCollector(collector.Collector):
    source = "circuit"
    description = "DIN-rail circuit meters (Eastron SDM120/SDM630 over Modbus, Tuya) to Graphite"
    interval_setting = "circuit_interval_s"
    discover_columns = ("circuit", "id", "kind", "connection", "profile", "answer")

    def __init__(self, runtime: Runtime, args: argparse.Namespace) -> None:
        super().__init__(runtime, args)
        self.circuits = parse_circuits(self.settings.circuits, self.settings.circuit_ranges)
        if not self.circuits:
            raise ConfigError("CIRCUITS: no circuits configured (see docs/circuit.md)")
        kinds = sorted({circuit.kind for circuit in self.circuits})
        missing = [kind for kind in kinds if kind not in READERS]
        if missing:
            raise ConfigError(f"CIRCUITS: no reader for kind {', '.join(missing)} in this version")
        self.readers = {
            kind: READERS[kind](runtime, [c for c in self.circuits if c.kind == kind])
            for kind in kinds
        }
        # The configured name is the circuit's name, even after a rename in
        # CIRCUITS (unless DEVICE_NAMES names its meter's id).
        for circuit in self.circuits:
            runtime.names.pin(circuit.stable_id, circuit.segment)
        for counter in HEALTH_COUNTERS:
            runtime.health.count(counter, 0)
        self._out_of_range = Once(self.log)  # (stable id, metric)

    # --- discover: the configured circuits (probed once with --discover) -----------

    async def discover(self) -> list[collector.Device]:
        devices = [
            collector.Device(
                stable_id=circuit.stable_id,
                name=circuit.name,
                address=circuit.address,
                model=circuit.profile,
                measures_energy=True,
                handle=circuit,
            )
            for circuit in self.circuits
        ]
        return devices

    async def discover_rows(self) -> list[Sequence[str]]:
        """--discover: every configured circuit, probed once."""
        answers = await asyncio.gather(*(self._probe(circuit) for circuit in self.circuits))
        return [
            (
                circuit.name,
                circuit.stable_id,
                circuit.kind,
                circuit.address,
                circuit.profile,
                answer,
            )
            for circuit, answer in zip(self.circuits, answers)
        ]

    async def _probe(self, circuit: Circuit) -> str:
        try:
            values = await asyncio.wait_for(
                self.readers[circuit.kind].read(circuit), self.settings.device_timeout_s
            )
        except asyncio.TimeoutError:
            return f"no answer within {self.settings.device_timeout_s:g} s"
        except MeterException as exc:
            wrong_profile = exc.code == 0x02 and "profile" not in str(exc)
            hint = " - is the profile right?" if wrong_profile else ""
            return f"refused: {exc}{hint}"
        except CircuitReadError as exc:
            return str(exc)
        except Exception as exc:
            return f"failed: {exc.__class__.__name__}: {exc}"
        return describe_values(values)

    # --- poll and extract ----------------------------------------------------------

    async def poll(self, device: collector.Device) -> list[collector.Reading]:
        circuit: Circuit = device.handle
        try:
            values = await self.readers[circuit.kind].read(circuit)
        except CircuitReadError as exc:
            self.runtime.health.count(exc.health_counter)
            raise
        return [collector.Reading(circuit.stable_id, circuit.name, self.extract(circuit, values))]

    def extract(self, circuit: Circuit, values: Mapping[str, Any]) -> dict[str, float]:
        """A meter's figures, totals completed, without what is out of range."""
        kept, dropped = check_ranges(values, circuit.ranges, circuit.phases)
        # Totals from checked phases only, then checked themselves.
        kept, dropped_totals = check_ranges(
            complete_totals(kept, circuit.phases), circuit.ranges, circuit.phases
        )
        dropped.update(dropped_totals)
        for metric, value in dropped.items():
            self.runtime.health.count("values_out_of_range")
            limits = range_for(metric, circuit.ranges, circuit.phases)
            shown = f" outside {limits[0]:g}..{limits[1]:g}" if limits else ""
            self._out_of_range.say(
                (circuit.stable_id, metric),
                "%s: %s = %r%s, dropped",
                circuit.name,
                metric,
                value,
                shown,
            )
        for metric in kept:
            self._out_of_range.clear((circuit.stable_id, metric))
        return kept

    async def close(self) -> None:
        await asyncio.gather(*(reader.close() for reader in self.readers.values()))


def main(argv: Sequence[str] | None = None) -> int:
    return run_source(CircuitCollector, argv)


if __name__ == "__main__":
    sys.exit(main())
