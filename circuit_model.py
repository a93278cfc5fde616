"""Circuits: the model every circuit reader and collector shares.

What CIRCUITS and CIRCUIT_RANGES (config.py) say, checked (``Circuit``,
``parse_circuits``); a meter's figures completed and checked against its
ranges (``complete_totals``, ``check_ranges``); and the seam for kinds of
meter, ``CircuitReader`` and the errors a read raises. No I/O: the Modbus
reader and the collector are in circuit_to_graphite.py, the Tuya reader in
circuit_tuya.py; tuya_to_graphite.py and tuya_scaling.py use the figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import circuit_sdm
from graphite_helper import format_device_name
from runtime import Runtime
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
    **{name: profile.phases for name, profile in circuit_sdm.PROFILES.items()},
    **TUYA_PROFILES,
}
PROFILE_KINDS = {
    **dict.fromkeys(circuit_sdm.PROFILES, ("modbus-tcp", "modbus-rtu")),
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
            baudrate = entry.get("baudrate", circuit_sdm.PROFILES[profile].default_baudrate)
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


# --- Readers: the seam for kinds of meter -----------------------------------------


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

    ``READERS`` in circuit_to_graphite.py maps a kind to its reader (for
    ``tuya``, loaded on demand: ``circuit_tuya.TuyaCircuitReader``). The
    collector makes one reader per configured kind,
    ``READERS[kind](runtime, circuits)`` with that kind's circuits (the
    constructor may raise ConfigError, e.g. a Tuya id missing from
    devices.json), and each cycle awaits ``read(circuit)`` for every circuit
    at once; a reader serializes what must not overlap (one request at a
    time per Modbus bus, one client per Tuya device).

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

    def __init__(self, runtime: Runtime, circuits: Sequence[Circuit]) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.log = runtime.log

    async def read(self, circuit: Circuit) -> dict[str, float]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections at exit."""
