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

Kinds of meter are pluggable readers (see ``CircuitReader`` and
``READERS``): Eastron SDM120/SDM630 over Modbus TCP (a gateway) or Modbus
RTU (an RS-485 adapter) are read here; Tuya DIN meters by the Tuya reader.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import collector
import modbus_meters
from graphite_helper import format_device_name
from settings import ConfigError, parse_host_port

METRICS = (
    "power_watts",
    "voltage_volts",
    "current_amps",
    "energy_kwh",
    "energy_export_kwh",
    "power_factor",
    "frequency_hz",
)
# Three-phase totals that are the sum of the phases (their range scales with
# the number of phases); voltage and power factor are not.
SUMMED_METRICS = ("power_watts", "current_amps")
_PHASE_PREFIX = re.compile(r"l[1-3]_")

KINDS = ("modbus-tcp", "modbus-rtu", "tuya")
MODBUS_TCP_PORT = 502
TUYA_PROFILES = {"tuya-din": 1, "tuya-din-3p": 3, "tuya-clamp": 1}  # name -> phases
PROFILE_PHASES = {
    **{name: profile.phases for name, profile in modbus_meters.PROFILES.items()},
    **TUYA_PROFILES,
}
PROFILE_KINDS = {
    **dict.fromkeys(modbus_meters.PROFILES, ("modbus-tcp", "modbus-rtu")),
    **dict.fromkeys(TUYA_PROFILES, ("tuya",)),
}
# What no meter can report, whatever its model; CIRCUIT_RANGES narrows these.
PHYSICAL_LIMITS = {
    "power_factor": (-1.0, 1.0),
    "frequency_hz": (40.0, 70.0),
    "energy_kwh": (0.0, math.inf),
    "energy_export_kwh": (0.0, math.inf),
}
SERIAL_BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
SERIAL_PARITIES = ("N", "E", "O")

_CIRCUIT_KEYS = (
    "name",
    "kind",
    "connection",
    "profile",
    "unit",
    "baudrate",
    "parity",
    "stopbits",
    "ranges",
)
_MODBUS_EXCEPTIONS = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "server device failure",
    0x05: "acknowledge",
    0x06: "server device busy",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target device failed to respond",
}

Range = tuple[float, float]


# --- Configuration: CIRCUITS --------------------------------------------------


@dataclass(frozen=True)
class SerialLine:
    """An RS-485 bus on a serial port, as every meter on it is set up."""

    port: str
    baudrate: int
    parity: str
    stopbits: int

    def transfer_s(self, byte_count: int) -> float:
        """Seconds to move ``byte_count`` bytes (start bit, 8 data, parity, stop)."""
        bits = 1 + 8 + (self.parity != "N") + self.stopbits
        return byte_count * bits / self.baudrate


@dataclass(frozen=True)
class Circuit:
    """One configured circuit and the meter on it."""

    name: str
    segment: str  # the metric path segment
    kind: str
    connection: str  # as configured: "host:port", a serial port, a Tuya id
    profile: str
    phases: int
    ranges: Mapping[str, Range] = field(hash=False)
    host: str = ""
    port: int = 0
    unit: int = 0
    serial: SerialLine | None = None

    @property
    def bus(self) -> str:
        """What its requests share: a gateway, a serial port, a Tuya device."""
        if self.kind == "modbus-tcp":
            return f"{self.host}:{self.port}"
        return self.connection

    @property
    def stable_id(self) -> str:
        if self.kind == "tuya":
            return self.connection
        return f"{self.kind}:{self.bus}:{self.unit}"

    @property
    def address(self) -> str:
        """Where it is, for logs and --discover."""
        return f"{self.bus} unit {self.unit}" if self.kind != "tuya" else self.connection


def _entry_error(index: int, entry: Any, message: str) -> ConfigError:
    name = entry.get("name") if isinstance(entry, dict) else None
    label = f"CIRCUITS[{index}]" + (f" ({name!r})" if isinstance(name, str) and name else "")
    return ConfigError(f"{label}: {message}")


def _parse_ranges(where: str, raw: Any) -> dict[str, Range]:
    """``{metric: [min, max]}`` checked; metric names are per phase (no l1_)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a dict of metric -> [min, max]")
    ranges: dict[str, Range] = {}
    for metric, limits in raw.items():
        if metric not in METRICS:
            raise ConfigError(f"{where}: unknown metric {metric!r} (one of {', '.join(METRICS)})")
        if (
            not isinstance(limits, (list, tuple))
            or len(limits) != 2
            or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
                for x in limits
            )
            or not limits[0] < limits[1]
        ):
            raise ConfigError(f"{where}: {metric} must be [min, max] with min < max")
        ranges[metric] = (float(limits[0]), float(limits[1]))
    return ranges


def _unit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 247:
        raise ValueError(f"unit must be a Modbus unit id, 1 to 247, not {value!r}")
    return value


def parse_circuit(index: int, entry: Any, profile_ranges: Mapping[str, Any]) -> Circuit:
    """One CIRCUITS entry, checked. Raises ConfigError naming the entry."""
    if not isinstance(entry, dict):
        raise _entry_error(index, entry, "must be a dict with name, kind, connection, profile")
    unknown = sorted(set(entry) - set(_CIRCUIT_KEYS))
    if unknown:
        raise _entry_error(
            index,
            entry,
            f"unknown key {', '.join(map(repr, unknown))} ({', '.join(_CIRCUIT_KEYS)})",
        )
    for key in ("name", "kind", "connection", "profile"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise _entry_error(index, entry, f"{key} must be a non-empty string")
    name, kind, profile = entry["name"].strip(), entry["kind"], entry["profile"]
    connection = entry["connection"].strip()
    if kind not in KINDS:
        raise _entry_error(index, entry, f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if profile not in PROFILE_KINDS:
        raise _entry_error(
            index, entry, f"profile must be one of {', '.join(PROFILE_KINDS)}, not {profile!r}"
        )
    if kind not in PROFILE_KINDS[profile]:
        raise _entry_error(index, entry, f"profile {profile!r} is not read over {kind}")
    modbus_only = ("unit", "baudrate", "parity", "stopbits")
    if kind == "tuya" and any(key in entry for key in modbus_only):
        raise _entry_error(index, entry, "unit, baudrate, parity, stopbits are for Modbus meters")
    if kind == "modbus-tcp" and any(key in entry for key in modbus_only[1:]):
        raise _entry_error(index, entry, "baudrate, parity, stopbits are for modbus-rtu")

    ranges: dict[str, Range] = dict(PHYSICAL_LIMITS)
    ranges.update(_parse_ranges(f"CIRCUIT_RANGES[{profile!r}]", profile_ranges.get(profile, {})))
    try:
        ranges.update(_parse_ranges("ranges", entry.get("ranges", {})))
    except ConfigError as exc:
        raise _entry_error(index, entry, str(exc)) from None

    circuit = {
        "name": name,
        "segment": format_device_name(name),
        "kind": kind,
        "connection": connection,
        "profile": profile,
        "phases": PROFILE_PHASES[profile],
        "ranges": ranges,
    }
    try:
        if kind != "tuya":
            circuit["unit"] = _unit(entry.get("unit", 1))
        if kind == "modbus-tcp":
            circuit["host"], circuit["port"] = parse_host_port(
                connection, MODBUS_TCP_PORT, "connection"
            )
        if kind == "modbus-rtu":
            baudrate = entry.get("baudrate", modbus_meters.PROFILES[profile].default_baudrate)
            parity = entry.get("parity", "N")
            stopbits = entry.get("stopbits", 1)
            if baudrate not in SERIAL_BAUDRATES or isinstance(baudrate, bool):
                raise ValueError(f"baudrate must be one of {SERIAL_BAUDRATES}, not {baudrate!r}")
            if parity not in SERIAL_PARITIES:
                raise ValueError(f"parity must be 'N', 'E' or 'O', not {parity!r}")
            if stopbits not in (1, 2) or isinstance(stopbits, bool):
                raise ValueError(f"stopbits must be 1 or 2, not {stopbits!r}")
            circuit["serial"] = SerialLine(connection, baudrate, parity, stopbits)
    except (ValueError, ConfigError) as exc:
        raise _entry_error(index, entry, str(exc)) from None
    return Circuit(**circuit)


def parse_circuits(entries: Sequence[Any], profile_ranges: Mapping[str, Any]) -> list[Circuit]:
    """CIRCUITS checked as a whole: names, meters and serial settings must agree."""
    if not isinstance(profile_ranges, dict):
        raise ConfigError("CIRCUIT_RANGES: must be a dict of profile -> {metric: [min, max]}")
    circuits = [parse_circuit(index, entry, profile_ranges) for index, entry in enumerate(entries)]
    by_segment: dict[str, Circuit] = {}
    by_id: dict[str, Circuit] = {}
    by_port: dict[str, Circuit] = {}
    for index, circuit in enumerate(circuits):
        label = f"CIRCUITS[{index}] ({circuit.name!r})"
        other = by_segment.setdefault(circuit.segment, circuit)
        if other is not circuit:
            raise ConfigError(
                f"{label}: same metric name {circuit.segment!r} as {other.name!r}; "
                "give each circuit its own name"
            )
        other = by_id.setdefault(circuit.stable_id.lower(), circuit)
        if other is not circuit:
            raise ConfigError(f"{label}: same meter ({circuit.address}) as {other.name!r}")
        if circuit.serial is not None:
            other = by_port.setdefault(circuit.serial.port, circuit)
            if other.serial != circuit.serial:
                raise ConfigError(
                    f"{label}: {circuit.serial.port} is one bus: baudrate, parity and stopbits "
                    f"must match {other.name!r} ({_describe_line(other.serial)}, not "
                    f"{_describe_line(circuit.serial)}); set them on the meters and here"
                )
    return circuits


def _describe_line(line: SerialLine | None) -> str:
    return "" if line is None else f"{line.baudrate} {line.parity}{line.stopbits}"


def configured_tuya_circuit_ids(settings: Any) -> set[str]:
    """Tuya device ids configured as circuits: tuya_to_graphite.py leaves them out,
    so no figure is counted twice and each device keeps a single client.

    Lenient on purpose: a malformed CIRCUITS entry is this collector's error to
    report, not a reason for the Tuya collector to stop.
    """
    ids = set()
    for entry in getattr(settings, "circuits", None) or []:
        if isinstance(entry, dict) and entry.get("kind") == "tuya":
            connection = entry.get("connection")
            if isinstance(connection, str) and connection.strip():
                ids.add(connection.strip())
    return ids


# --- Extract: totals and ranges ---------------------------------------------------


def complete_totals(values: Mapping[str, float], phases: int | Sequence[int]) -> dict[str, float]:
    """A three-phase meter's unprefixed figures, where it reports only phases.

    Power and current are the sums of the phases, voltage their mean. The
    meter's own figures, when present, are kept as they are. Needs every phase:
    ``phases`` is how many the meter has (none added below 2), or which ones.
    """
    completed = dict(values)
    if isinstance(phases, int):
        if phases < 2:
            return completed
        phases = range(1, phases + 1)
    for metric in ("power_watts", "current_amps", "voltage_volts"):
        parts = [values.get(f"l{phase}_{metric}") for phase in phases]
        if metric in completed or any(part is None for part in parts):
            continue
        total = math.fsum(parts)  # type: ignore[arg-type]
        completed[metric] = total / len(parts) if metric == "voltage_volts" else total
    return completed


def range_for(metric: str, ranges: Mapping[str, Range], phases: int) -> Range | None:
    """The sane range of a metric: per phase, times the phases for summed totals."""
    is_phase = bool(_PHASE_PREFIX.match(metric))
    base = metric[3:] if is_phase else metric
    limits = ranges.get(base)
    if limits is None:
        return None
    if phases > 1 and not is_phase and base in SUMMED_METRICS:
        return limits[0] * phases, limits[1] * phases
    return limits


def check_ranges(
    values: Mapping[str, Any], ranges: Mapping[str, Range], phases: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """Split values into (kept, dropped): numbers within their ranges, the rest."""
    kept: dict[str, float] = {}
    dropped: dict[str, Any] = {}
    for metric, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            dropped[metric] = value
            continue
        limits = range_for(metric, ranges, phases)
        low, high = limits if limits is not None else (-math.inf, math.inf)
        if math.isfinite(value) and low <= value <= high:
            kept[metric] = float(value)
        else:
            dropped[metric] = value
    return kept, dropped


def describe_values(values: Mapping[str, float]) -> str:
    """A meter's answer in one line, for --discover."""
    units = {
        "voltage_volts": "{:.1f} V",
        "current_amps": "{:.2f} A",
        "power_watts": "{:.0f} W",
        "power_factor": "PF {:.2f}",
        "frequency_hz": "{:.2f} Hz",
        "energy_kwh": "{:.2f} kWh in",
        "energy_export_kwh": "{:.2f} kWh out",
    }

    def figures(prefix: str) -> str:
        return " ".join(
            pattern.format(values[prefix + metric])
            for metric, pattern in units.items()
            if prefix + metric in values
        )

    parts = [f"L{phase} {figures(f'l{phase}_')}" for phase in (1, 2, 3) if figures(f"l{phase}_")]
    total = figures("")
    if total:
        parts.append(("total " if parts else "") + total)
    return "; ".join(parts) or "no figures"


# --- Readers: one per kind of meter -------------------------------------------------


class CircuitReadError(Exception):
    """A meter's reply could not be used this cycle."""

    health_counter = "read_errors"


class NoAnswer(CircuitReadError):
    """Nothing came back in time: a timeout, a refused or lost connection."""

    health_counter = "meter_timeouts"


class MeterException(CircuitReadError):
    """The meter (or its gateway) answered, refusing the request."""

    health_counter = "meter_exceptions"

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


HEALTH_COUNTERS = ("read_errors", "meter_timeouts", "meter_exceptions", "values_out_of_range")


class CircuitReader:
    """Reads every circuit of one kind: the seam for new kinds of meter.

    ``READERS`` maps a kind to its reader (for ``tuya``, loaded on demand:
    ``circuit_tuya.TuyaCircuitReader``). The collector makes one reader per
    configured kind, ``READERS[kind](runtime, circuits)`` with
    that kind's circuits (the constructor may raise ConfigError, e.g. a Tuya
    id missing from devices.json), and each cycle awaits ``read(circuit)``
    for every circuit at once; a reader serializes what must not overlap
    (one request at a time per Modbus bus, one client per Tuya device).

    ``read`` returns the meter's figures as the meter sent them, by metric
    name: ``power_watts``, ``voltage_volts``, ``current_amps``,
    ``energy_kwh`` (import), ``energy_export_kwh``, ``power_factor``,
    ``frequency_hz``, with ``l1_``/``l2_``/``l3_`` per phase on three-phase
    meters; leave out what the meter lacks. The collector works out missing
    three-phase totals, applies the profile's ranges and sends. A failed
    read raises ``NoAnswer``, ``MeterException`` or ``CircuitReadError``
    (counted in health); anything else counts as that circuit's failure
    for the cycle. The collector's per-device timeout cancels a read that
    takes too long. ``close()`` releases connections at exit.
    """

    def __init__(self, runtime: collector.Runtime, circuits: Sequence[Circuit]) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.log = runtime.log

    async def read(self, circuit: Circuit) -> dict[str, float]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections at exit."""


class ModbusBus:
    """One Modbus connection, a TCP gateway or a serial port, and its meters.

    Requests run one at a time on the bus's own worker thread: an RS-485 bus
    (and a TCP gateway in front of one) carries one transaction at a time,
    while different buses run in parallel. pymodbus matches no transaction
    ids, so after any failure the client is dropped and the next request
    starts on a fresh connection: a late reply can never be taken for the
    next meter's, and pymodbus's no-response counter starts from zero.

    The synchronous client is used on purpose: one request, one reply, no
    background reconnect task and no shared no-response counter that would
    drop every unit's connection because one unit is silent (pymodbus
    3.8.6's async client does); the one worker thread makes the
    serialization plain.
    """

    def __init__(
        self,
        description: str,
        make_client: Callable[[], Any],
        timeout_s: float,
        why_unreachable: Callable[[], str],
    ) -> None:
        self.description = description
        self.why_unreachable = why_unreachable  # pymodbus keeps the reason to its log
        self.timeout_s = timeout_s
        self._make_client = make_client
        self._client: Any = None
        # When the last connection attempt failed: requests queued before
        # then fail at once instead of each waiting for its own attempt.
        self._connect_failed_at = -math.inf
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modbus")

    async def read_input_registers(self, unit: int, address: int, count: int) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._read, unit, address, count, time.monotonic()
        )

    def _read(self, unit: int, address: int, count: int, queued_at: float) -> list[int]:
        # Imported here so that importing this module needs no pymodbus (the
        # Tuya collector imports configured_tuya_circuit_ids).
        from pymodbus.exceptions import ModbusIOException

        if self._client is None:
            if self._connect_failed_at >= queued_at:
                raise NoAnswer(f"{self.description} unreachable")
            client = self._make_client()
            if not client.connect():
                self._connect_failed_at = time.monotonic()
                client.close()
                raise NoAnswer(self.why_unreachable())
            self._client = client
        try:
            response = self._client.read_input_registers(address, count=count, slave=unit)
        except ModbusIOException:
            self._drop_client()
            raise NoAnswer(f"unit {unit}: no answer within {self.timeout_s:.3g} s") from None
        except Exception as exc:  # a lost connection, a garbled frame: start afresh
            self._drop_client()
            raise NoAnswer(f"unit {unit}: {exc.__class__.__name__}: {exc}") from None
        if response.isError():
            code = getattr(response, "exception_code", None)
            meaning = _MODBUS_EXCEPTIONS.get(code, "unknown") if code is not None else "unknown"
            shown = f"{code:#04x}" if isinstance(code, int) else "?"
            raise MeterException(f"unit {unit}: Modbus exception {shown} ({meaning})", code)
        registers = list(getattr(response, "registers", []))
        if len(registers) != count:
            self._drop_client()
            raise CircuitReadError(
                f"unit {unit}: {len(registers)} registers in the reply, asked for {count}"
            )
        return registers

    def _drop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing a broken connection may fail too
                pass
            self._client = None

    def close(self) -> None:
        """Cancel queued requests, wait for the running one, close the connection."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._drop_client()


class ModbusReader(CircuitReader):
    """Eastron SDM120/SDM630 over Modbus TCP gateways or RS-485 serial ports."""

    def __init__(self, runtime: collector.Runtime, circuits: Sequence[Circuit]) -> None:
        super().__init__(runtime, circuits)
        # pymodbus logs every exception reply and timeout at ERROR; they are
        # counted and logged once per failing meter by the collector instead.
        if self.settings.log_level.upper() != "DEBUG":
            logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        self.timeout_s = self.settings.circuit_modbus_timeout_s
        self.buses: dict[str, ModbusBus] = {}
        self._models_checked: set[str] = set()  # stable ids
        for circuit in circuits:
            if circuit.bus not in self.buses:
                self.buses[circuit.bus] = self._open_bus(circuit)
        self._warn_slow_serial_buses(circuits)

    def _open_bus(self, circuit: Circuit) -> ModbusBus:
        from pymodbus.client import ModbusSerialClient, ModbusTcpClient

        line = circuit.serial
        if line is None:
            host, port, timeout_s = circuit.host, circuit.port, self.timeout_s

            def make_client() -> Any:
                return ModbusTcpClient(host, port=port, timeout=timeout_s, retries=0)

            def why_unreachable() -> str:
                return f"cannot connect to {host}:{port} (refused, unreachable or switched off)"

            return ModbusBus(f"gateway {host}:{port}", make_client, timeout_s, why_unreachable)

        # The transfer time of the longest reply at the bus's speed comes on top.
        longest_reply = 5 + 2 * modbus_meters.MAX_REGISTERS_PER_REQUEST
        serial_timeout_s = self.timeout_s + line.transfer_s(longest_reply)

        def make_serial_client() -> Any:
            return ModbusSerialClient(
                line.port,
                baudrate=line.baudrate,
                parity=line.parity,
                stopbits=line.stopbits,
                bytesize=8,
                timeout=serial_timeout_s,
                retries=0,
            )

        return ModbusBus(
            f"serial port {line.port}",
            make_serial_client,
            serial_timeout_s,
            lambda: serial_port_problem(line.port),
        )

    def _warn_slow_serial_buses(self, circuits: Sequence[Circuit]) -> None:
        """A bus whose meters cannot all answer within a cycle loses readings."""
        budget_s = min(self.settings.circuit_interval_s, self.settings.device_timeout_s)
        seconds: dict[str, float] = {}
        for circuit in circuits:
            if circuit.serial is not None:
                for block in _blocks(circuit):  # request 8 bytes, reply 5 + 2 per register
                    wire_s = circuit.serial.transfer_s(8 + 5 + 2 * block.count)
                    seconds[circuit.bus] = seconds.get(circuit.bus, 0.0) + wire_s
        for port, wire_s in seconds.items():
            if wire_s > budget_s:
                self.log.warning(
                    "%s: its meters need at least %.1f s on the wire per cycle, more than %g s "
                    "(CIRCUIT_INTERVAL_S, DEVICE_TIMEOUT_S): raise the baud rate or the interval",
                    port,
                    wire_s,
                    budget_s,
                )

    async def read(self, circuit: Circuit) -> dict[str, float]:
        profile = modbus_meters.PROFILES[circuit.profile]
        blocks = _blocks(circuit)
        bus = self.buses[circuit.bus]
        if circuit.stable_id not in self._models_checked:
            await self._check_model(circuit, profile, bus)
        replies = [
            await bus.read_input_registers(circuit.unit, block.address, block.count)
            for block in blocks
        ]
        try:
            return modbus_meters.decode_values(profile.registers, blocks, replies)
        except ValueError as exc:
            raise CircuitReadError(f"unit {circuit.unit}: {exc}") from None

    async def _check_model(
        self, circuit: Circuit, profile: modbus_meters.MeterProfile, bus: ModbusBus
    ) -> None:
        """Once per meter: is it the model its profile says? (A wrong profile
        would read plausible zeros, not fail.) Other failures are retried."""
        register = profile.identity_register
        if register is not None:
            try:
                await bus.read_input_registers(circuit.unit, register, 2)
            except MeterException as exc:
                if exc.code == 0x02:
                    raise MeterException(
                        f"unit {circuit.unit} refuses register {register:#x}, which every "
                        f"{profile.description} has: is it another model? (profile "
                        f"{profile.name!r})",
                        exc.code,
                    ) from None
                raise
        self._models_checked.add(circuit.stable_id)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(None, bus.close) for bus in self.buses.values())
        )


def serial_port_problem(path: str) -> str:
    """Why a serial port would not open, in words a user can act on."""
    if not os.path.exists(path):
        return f"{path} does not exist (adapter unplugged? see ls /dev/serial/by-id/)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"no permission to use {path} (add the user to the 'dialout' group)"
    return f"cannot open {path} (in use by another program?)"


def _blocks(circuit: Circuit) -> list[modbus_meters.Block]:
    return modbus_meters.PROFILES[circuit.profile].blocks


def tuya_reader(runtime: collector.Runtime, circuits: Sequence[Circuit]) -> CircuitReader:
    """The Tuya DIN-meter reader, ``circuit_tuya.TuyaCircuitReader``, imported
    only when a Tuya circuit is configured (it subclasses CircuitReader, so
    importing it here at load time would be circular)."""
    try:
        from circuit_tuya import TuyaCircuitReader
    except ModuleNotFoundError as exc:
        if exc.name != "circuit_tuya":
            raise
        raise ConfigError("CIRCUITS: no reader for kind tuya in this version") from None
    return TuyaCircuitReader(runtime, circuits)


# Kind -> reader: a CircuitReader class, or a callable with the same signature.
READERS: dict[str, Callable[[collector.Runtime, Sequence[Circuit]], CircuitReader]] = {
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

    def __init__(self, runtime: collector.Runtime, args: argparse.Namespace) -> None:
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
            runtime.health.extra.setdefault(counter, 0)
        self._out_of_range: set[tuple[str, str]] = set()
        self._answers: dict[str, str] = {}

    # --- discover: the configured circuits (probed with --discover) ----------------

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
        if self.args.discover:
            answers = await asyncio.gather(*(self._probe(circuit) for circuit in self.circuits))
            self._answers = {c.stable_id: answer for c, answer in zip(self.circuits, answers)}
        return devices

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

    def discover_row(self, device: collector.Device) -> Sequence[str]:
        circuit: Circuit = device.handle
        return (
            circuit.name,
            circuit.stable_id,
            circuit.kind,
            circuit.address,
            circuit.profile,
            self._answers.get(circuit.stable_id, ""),
        )

    # --- poll and extract ----------------------------------------------------------

    async def poll(self, device: collector.Device) -> list[collector.Reading]:
        circuit: Circuit = device.handle
        try:
            values = await self.readers[circuit.kind].read(circuit)
        except CircuitReadError as exc:
            self._count(exc.health_counter)
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
            self._count("values_out_of_range")
            key = (circuit.stable_id, metric)
            limits = range_for(metric, circuit.ranges, circuit.phases)
            shown = f" outside {limits[0]:g}..{limits[1]:g}" if limits else ""
            level = logging.DEBUG if key in self._out_of_range else logging.WARNING
            self.log.log(level, "%s: %s = %r%s, dropped", circuit.name, metric, value, shown)
            self._out_of_range.add(key)
        for metric in kept:
            self._out_of_range.discard((circuit.stable_id, metric))
        return kept

    def _count(self, counter: str) -> None:
        extra = self.runtime.health.extra
        extra[counter] = extra.get(counter, 0) + 1

    async def close(self) -> None:
        await asyncio.gather(*(reader.close() for reader in self.readers.values()))


def main(argv: Sequence[str] | None = None) -> int:
    return collector.main(CircuitCollector, argv)


if __name__ == "__main__":
    sys.exit(main())
