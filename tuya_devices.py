"""Tuya devices on the local network, through tinytuya: what the wizard's
devices.json says about each one, what it measures and in which scale, and
one connection per device.

Shared by tuya_to_graphite.py (plugs, switches, meters) and the circuit
collector's Tuya DIN-meter reader (circuit_tuya.py). Pure functions first:
loading devices.json, deciding what a device measures (``plan_for``),
decoding its DPs (``extract_values``), sanity checks (the circuit collector's
range check and phase totals, applied per device), announcements. The class
doing I/O, ``TuyaConnection``, and the ``Connections`` both collectors keep
come last.

Where a value's scale comes from, first match wins: the user's TUYA_SCALING,
the device's own ``mapping`` in devices.json (``values.scale`` and ``unit``),
the built-in ``PROFILES`` (by product id, then category), and last the usual
DP numbers (18 mA, 19 W x10, 20 V x10; older plugs 4, 5, 6) when the
device's status shows them.

Local keys live in ``DeviceEntry.key`` only: never in a repr, a log line or
an exception message (tinytuya's own repr and debug log show them, so its
logger stays at WARNING and ``collector.SecretFilter`` scrubs every handler).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import re
import select
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import tinytuya

import circuits
import collector
from settings import ConfigError, parse_host_port

log = logging.getLogger("electricity.tuya")

DEFAULT_PORT = 6668
VERSIONS = ("3.1", "3.2", "3.3", "3.4", "3.5")
# Tried in this order when neither devices.json, the config nor an
# announcement says (3.1 last: its reads are plain JSON and need no key).
DETECT_ORDER = ("3.3", "3.4", "3.5", "3.1")

PLUG, METER, SWITCH, SKIP = "plug", "meter", "switch", ""

# Wizard mapping codes.
SWITCH_CODES = ("switch", "switch_1", "switch_on")
POWER_CODES = {
    "cur_power": "power_watts",
    "cur_voltage": "voltage_volts",
    "cur_current": "current_amps",
}
# Totals the device keeps itself: trustworthy kWh counters.
COUNTER_CODES = ("forward_energy_total", "total_forward_energy")
# "add_ele" is the energy added since the device's last report on many plugs
# (it restarts from 0), not a total: it marks a device as metering, but its
# energy_kwh is integrated from power instead.
INCREMENT_CODES = ("add_ele",)
PHASE_CODES = ("phase_a", "phase_b", "phase_c")
ENERGY_CODES = frozenset((*POWER_CODES, *COUNTER_CODES, *INCREMENT_CODES, *PHASE_CODES))
# The unit a code's values have when the mapping does not say.
CONVENTIONAL_UNITS = {
    "cur_power": "w",
    "cur_voltage": "v",
    "cur_current": "ma",
    "forward_energy_total": "kwh",
    "total_forward_energy": "kwh",
}
# Unit (lowercase) -> (metric, numerator, denominator): SI = raw * n / d.
UNITS = {
    "w": ("power_watts", 1, 1),
    "kw": ("power_watts", 1000, 1),
    "v": ("voltage_volts", 1, 1),
    "mv": ("voltage_volts", 1, 1000),
    "a": ("current_amps", 1, 1),
    "ma": ("current_amps", 1, 1000),
    "kwh": ("energy_kwh", 1, 1),
    "kw·h": ("energy_kwh", 1, 1),
    "kw.h": ("energy_kwh", 1, 1),
    "度": ("energy_kwh", 1, 1),  # Chinese kWh, in some mappings
    "wh": ("energy_kwh", 1, 1000),
    "w·h": ("energy_kwh", 1, 1000),
}
SCALED_METRICS = ("power_watts", "voltage_volts", "current_amps", "energy_kwh")

# Categories whose switch is worth an is_on (sockets, strips, wall switches,
# breakers, meters); other devices with a switch (water timers, sirens) are
# not electricity figures. Devices of these categories without a meter in
# their mapping are still read with the usual DP numbers if their status
# shows them.
SWITCH_CATEGORIES = frozenset({"cz", "pc", "kg", "tdq", "dlq", "zndb"})
CATEGORY_NAMES = {
    "cz": "socket",
    "pc": "power strip",
    "kg": "switch",
    "tdq": "breaker",
    "dlq": "metering breaker",
    "zndb": "energy meter",
    "ggq": "water timer",
    "mal": "alarm",
    "wg2": "gateway",
    "wsdcg": "sensor",
    "dj": "light",
    "dd": "light strip",
    "fs": "fan",
}


# --- devices.json ----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceEntry:
    """One device of the wizard's devices.json (the fields this project uses)."""

    id: str
    name: str
    key: str = field(repr=False)
    ip: str = ""
    port: int = DEFAULT_PORT
    version: str = ""
    category: str = ""
    product_id: str = ""
    product_name: str = ""
    mapping: Mapping[str, Any] = field(default_factory=dict, repr=False, hash=False)
    node_id: str = ""  # a Zigbee/BLE sub-device, reached only through its gateway

    @property
    def label(self) -> str:
        """For logs: the name and the id."""
        return f"{self.name} ({self.id})" if self.name != self.id else self.id

    @property
    def kind_name(self) -> str:
        return CATEGORY_NAMES.get(self.category, f"category {self.category or '?'}")


def normalize_version(value: Any) -> str:
    """'3.3', 3.3, '3.30' -> '3.3'; '' or None -> ''. Raises ValueError."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    try:
        text = f"{float(value):.1f}"
    except (TypeError, ValueError):
        raise ValueError(f"protocol version {value!r} is not a number") from None
    if text not in VERSIONS:
        raise ValueError(f"protocol version {text} is not one of {', '.join(VERSIONS)}")
    return text


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _checked_mapping(mapping: Any) -> dict[str, Any]:
    """The wizard's DP mapping, every type checked: one wrong type (a list
    where a code should be) is this entry's problem, not every device's."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ValueError(f"mapping is {_type_name(mapping)}, not an object")
    for dp, spec in mapping.items():
        if not isinstance(spec, dict):
            raise ValueError(f"mapping DP {dp}: is {_type_name(spec)}, not an object")
        for field_name in ("code", "type"):
            value = spec.get(field_name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"mapping DP {dp}: {field_name} is {_type_name(value)}, not text")
        values = spec.get("values")
        if values is not None and not isinstance(values, (dict, str)):
            raise ValueError(f"mapping DP {dp}: values is {_type_name(values)}")
    return mapping


def parse_entry(raw: Any) -> DeviceEntry:
    """One devices.json entry. Raises ValueError (never naming the key)."""
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    dev_id = raw.get("id")
    if not isinstance(dev_id, str) or not dev_id.strip():
        raise ValueError("no device id")
    # A wrong type is said (the value never: it may be the key), not guessed at.
    for field_name in ("key", "name", "ip", "category", "product_id", "product_name", "node_id"):
        value = raw.get(field_name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{field_name} is {_type_name(value)}, not text")
    key = raw.get("key") or ""
    name = raw.get("name")
    name = name.strip() if isinstance(name, str) and name.strip() else dev_id
    port = raw.get("port") or DEFAULT_PORT
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r} is not a TCP port")
    mapping = _checked_mapping(raw.get("mapping"))

    def text(field_name: str) -> str:
        return (raw.get(field_name) or "").strip()

    return DeviceEntry(
        id=dev_id.strip(),
        name=name,
        key=key,
        ip=text("ip"),
        port=port,
        version=normalize_version(raw.get("version")),
        category=text("category"),
        product_id=text("product_id"),
        product_name=text("product_name"),
        mapping=mapping,
        node_id=text("node_id"),
    )


def parse_devices(data: Any) -> tuple[list[DeviceEntry], list[str]]:
    """The entries of a devices.json document, in either form the wizard has
    written (a list, or ``{"devices": [...]}``), and one problem line per entry
    left out. Raises ValueError when the document is neither form."""
    if isinstance(data, dict) and isinstance(data.get("devices"), list):
        data = data["devices"]
    if not isinstance(data, list):
        raise ValueError('expected a list of devices or {"devices": [...]}')
    entries: list[DeviceEntry] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, raw in enumerate(data):
        where = f"entry {index}"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            where += f" ({raw['name']})"
        try:
            entry = parse_entry(raw)
        except ValueError as exc:
            problems.append(f"{where}: {exc}; left out")
            continue
        if entry.id in seen:
            problems.append(f"{where}: device id {entry.id} appears twice; the first one is used")
            continue
        seen.add(entry.id)
        entries.append(entry)
    return entries, problems


def load_devices_file(path: Path | str) -> tuple[list[DeviceEntry], list[str]]:
    """devices.json from disk. Raises ConfigError when it cannot be used at all."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"TUYA_DEVICES_FILE: {path} not found: run 'python -m tinytuya wizard' "
            "and point TUYA_DEVICES_FILE or --devices at the devices.json it writes"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"TUYA_DEVICES_FILE: cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"TUYA_DEVICES_FILE: {path} is not valid JSON: {exc}") from None
    try:
        return parse_devices(data)
    except ValueError as exc:
        raise ConfigError(f"TUYA_DEVICES_FILE: {path}: {exc}") from None


def lookup(table: Mapping[str, Any], entry: DeviceEntry) -> Any:
    """A per-device setting keyed by device id or name (names case-insensitively)."""
    if entry.id in table:
        return table[entry.id]
    wanted = entry.name.casefold()
    for key, value in table.items():
        if isinstance(key, str) and key.strip().casefold() == wanted:
            return value
    return None


def matches(names: Iterable[str], entry: DeviceEntry) -> bool:
    """True when ``entry``'s id or name is among ``names``."""
    return lookup(dict.fromkeys(names, True), entry) is True


# --- What a device measures, and in which scale ---------------------------------------


@dataclass(frozen=True)
class Channel:
    """Where one figure lives: SI value = raw * numerator / (denominator * 10**scale)."""

    dp: str
    scale: int = 0
    numerator: int = 1
    denominator: int = 1

    def convert(self, raw: float) -> float:
        return raw * self.numerator / (self.denominator * 10**self.scale)


@dataclass(frozen=True)
class Profile:
    """A product's DP layout, for devices whose devices.json has no mapping."""

    description: str
    kind: str
    switch_dp: str | None
    channels: Mapping[str, Channel]
    phase_dps: tuple[str, ...] = ()


# Metering DIN breakers: DP 1 total kWh x100, DP 6/7/8 phase A/B/C as base64
# (V x10, A x1000, W), DP 16 the breaker (docs/design.md).
METERING_BREAKER = Profile(
    "metering DIN breaker",
    METER,
    switch_dp="16",
    channels={"energy_kwh": Channel("1", scale=2)},
    phase_dps=("6", "7", "8"),
)
# Keyed by product_id first, then by category.
PROFILES: dict[str, Profile] = {
    "dlq": METERING_BREAKER,
    "zndb": replace(METERING_BREAKER, description="DIN energy meter"),
    "odhgp5hewa1o7mdn": METERING_BREAKER,  # "计量断路器", 63 A metering breaker
}
# The usual plug DPs: current mA, power W x10, voltage V x10.
DP_LAYOUTS: tuple[tuple[str, Mapping[str, Channel]], ...] = (
    (
        "DPs 18/19/20",
        {
            "current_amps": Channel("18", 0, 1, 1000),
            "power_watts": Channel("19", 1),
            "voltage_volts": Channel("20", 1),
        },
    ),
    (
        "DPs 4/5/6",
        {
            "current_amps": Channel("4", 0, 1, 1000),
            "power_watts": Channel("5", 1),
            "voltage_volts": Channel("6", 1),
        },
    ),
)
LAYOUT_DPS = sorted({int(ch.dp) for _, layout in DP_LAYOUTS for ch in layout.values()})


@dataclass(frozen=True)
class Plan:
    """What to read from one device and how to scale it."""

    kind: str  # PLUG, METER, SWITCH or SKIP
    source: str  # where the scaling comes from, for --discover and logs
    switch_dp: str | None = None
    channels: Mapping[str, Channel] = field(default_factory=dict)
    phase_dps: tuple[str, ...] = ()
    # No meter known yet: use DP_LAYOUTS if the device's status shows them.
    probe_layouts: bool = False
    claimed_dps: frozenset[str] = frozenset()  # DPs the mapping gives other meanings
    reason: str = ""  # why skipped

    @property
    def measures_power(self) -> bool:
        return "power_watts" in self.channels or bool(self.phase_dps)

    @property
    def has_counter(self) -> bool:
        return "energy_kwh" in self.channels

    @property
    def refresh_dps(self) -> list[int]:
        """DPs whose values a device may leave stale until asked (UPDATEDPS)."""
        dps = {ch.dp for metric, ch in self.channels.items() if metric != "energy_kwh"}
        dps.update(self.phase_dps)
        return sorted(int(dp) for dp in dps if dp.isdigit())

    def wanted_dps(self) -> dict[str, None]:
        """Every DP this plan reads, for devices that must be asked by name (device22)."""
        dps = {ch.dp for ch in self.channels.values()} | set(self.phase_dps)
        if self.switch_dp:
            dps.add(self.switch_dp)
        if self.probe_layouts:
            dps.update(str(dp) for dp in LAYOUT_DPS)
        dps.add("1")
        return dict.fromkeys(sorted(dps, key=lambda dp: (len(dp), dp)))

    def describe(self) -> str:
        """What it measures and whence the scaling, for --discover."""
        if self.kind == SKIP:
            return f"nothing: {self.reason}"
        figures = []
        if self.phase_dps:
            figures.append("power/voltage/current per phase")
        elif self.measures_power:
            figures.append("power")
            figures += [
                m.split("_")[0] for m in ("voltage_volts", "current_amps") if m in self.channels
            ]
        if self.has_counter:
            figures.append("energy counter")
        elif self.measures_power:
            figures.append("energy integrated")
        if self.switch_dp:
            figures.append("on/off")
        if self.probe_layouts:
            figures.append("power if its DPs show it")
        return f"{', '.join(figures)} ({self.source})"


def _mapping_values(spec: Mapping[str, Any]) -> dict[str, Any]:
    values = spec.get("values")
    if isinstance(values, str):  # the wizard keeps some as JSON text
        try:
            values = json.loads(values)
        except ValueError:
            return {}
    return values if isinstance(values, dict) else {}


def _scale_of(values: Mapping[str, Any]) -> int:
    scale = values.get("scale", 0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, str)):
        return 0
    try:
        scale = int(scale)
    except ValueError:
        return 0
    return scale if 0 <= scale <= 9 else 0


def channel_from_mapping(dp: str, code: str, spec: Mapping[str, Any]) -> tuple[str, Channel]:
    """The metric and channel of one metering DP of a wizard mapping."""
    values = _mapping_values(spec)
    unit = str(values.get("unit", "")).strip().lower()
    metric, numerator, denominator = UNITS[CONVENTIONAL_UNITS[code]]
    if unit in UNITS and UNITS[unit][0] == metric:
        _, numerator, denominator = UNITS[unit]
    return metric, Channel(dp, _scale_of(values), numerator, denominator)


def plan_from_mapping(mapping: Mapping[str, Any]) -> tuple[dict[str, Channel], tuple, str | None]:
    """(channels, phase DPs, switch DP) that a wizard mapping describes."""
    channels: dict[str, Channel] = {}
    phases: dict[str, str] = {}
    switches: dict[str, str] = {}
    for dp, spec in mapping.items():
        if not isinstance(spec, dict) or not str(dp).isdigit():
            continue
        code = spec.get("code")
        if code in POWER_CODES or code in COUNTER_CODES:
            metric, channel = channel_from_mapping(str(dp), code, spec)
            channels.setdefault(metric, channel)
        elif code in PHASE_CODES:
            phases[code] = str(dp)
        elif code in SWITCH_CODES:
            switches[code] = str(dp)
    phase_dps = tuple(phases[code] for code in PHASE_CODES if code in phases)
    switch_dp = next((switches[code] for code in SWITCH_CODES if code in switches), None)
    return channels, phase_dps, switch_dp


def parse_scaling(where: str, spec: Any) -> tuple[dict[str, Channel], str | None]:
    """One device's TUYA_SCALING entry -> (channels, switch DP). Raises ConfigError."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a dict of metric -> {{'dp': N, 'scale': S}}")
    channels: dict[str, Channel] = {}
    switch_dp = None
    for metric, item in spec.items():
        if metric not in (*SCALED_METRICS, "is_on"):
            raise ConfigError(
                f"{where}: unknown metric {metric!r} ({', '.join((*SCALED_METRICS, 'is_on'))})"
            )
        if not isinstance(item, dict) or set(item) - {"dp", "scale", "unit"}:
            raise ConfigError(f"{where}[{metric!r}]: must be {{'dp': N, 'scale': S, 'unit': U}}")
        dp = item.get("dp")
        if isinstance(dp, int) and not isinstance(dp, bool):
            dp = str(dp)
        if not isinstance(dp, str) or not dp.isdigit():
            raise ConfigError(f"{where}[{metric!r}]: 'dp' must be a DP number")
        if metric == "is_on":
            if set(item) != {"dp"}:
                raise ConfigError(f"{where}['is_on']: only 'dp'")
            switch_dp = dp
            continue
        scale = item.get("scale", 0)
        if isinstance(scale, bool) or not isinstance(scale, int) or not -6 <= scale <= 9:
            raise ConfigError(f"{where}[{metric!r}]: 'scale' must be a whole number, 0 to 9")
        unit = str(item.get("unit", "")).strip().lower()
        numerator = denominator = 1
        if unit:
            if unit not in UNITS or UNITS[unit][0] != metric:
                known = [u for u, (m, _, _) in UNITS.items() if m == metric]
                raise ConfigError(
                    f"{where}[{metric!r}]: unit {unit!r} is not one of {', '.join(known)}"
                )
            _, numerator, denominator = UNITS[unit]
        channels[metric] = Channel(dp, scale, numerator, denominator)
    return channels, switch_dp


def plan_for(
    entry: DeviceEntry, scaling: tuple[dict[str, Channel], str | None] | None = None
) -> Plan:
    """Decide what to read from a device and how to scale it.

    ``scaling`` is the device's TUYA_SCALING entry as ``parse_scaling`` returns
    it (channels, switch DP); it wins over the mapping, which wins over the
    built-in profile. A device with no meter known but a switch worth reading
    is a SWITCH that still tries the usual DP layouts on its first answers.
    """
    override_channels, override_switch = scaling or ({}, None)
    channels, phase_dps, switch_dp = plan_from_mapping(entry.mapping)
    profile = PROFILES.get(entry.product_id) or PROFILES.get(entry.category)
    sources = ["mapping"] if channels or phase_dps else []
    if profile is not None:
        if not sources:
            channels, phase_dps = dict(profile.channels), profile.phase_dps
            sources = [f"profile: {profile.description}"]
        switch_dp = switch_dp or profile.switch_dp
    if override_channels or override_switch:
        channels.update(override_channels)
        switch_dp = override_switch or switch_dp
        sources.insert(0, "TUYA_SCALING")
    if channels or phase_dps:
        meter = (
            phase_dps or entry.category in ("dlq", "zndb") or (profile and profile.kind == METER)
        )
        return Plan(METER if meter else PLUG, ", ".join(sources), switch_dp, channels, phase_dps)

    codes = {spec.get("code") for spec in entry.mapping.values() if isinstance(spec, dict)}
    # Old wizard files have no category: such a device is tried like a plug.
    if entry.category and entry.category not in SWITCH_CATEGORIES and not codes & ENERGY_CODES:
        what = "its switch is not electricity" if switch_dp else "no switch or meter"
        return Plan(SKIP, "", reason=f"{entry.kind_name} ({entry.category}): {what}")
    if switch_dp is None and not entry.mapping:
        switch_dp = "1"  # a plug's relay
    return Plan(
        SWITCH,
        ", ".join(sources) or ("mapping" if entry.mapping else "DP defaults"),
        switch_dp,
        probe_layouts=True,
        claimed_dps=frozenset(str(dp) for dp in entry.mapping) - {switch_dp or ""},
    )


def resolve_layout(plan: Plan, dps: Mapping[str, Any]) -> Plan | None:
    """A probing plan turned into a plug plan if ``dps`` show one of the usual
    DP layouts (every DP a number, none given another meaning by the mapping)."""
    if not plan.probe_layouts:
        return None
    for description, layout in DP_LAYOUTS:
        usable = all(
            ch.dp not in plan.claimed_dps and as_number(dps.get(ch.dp)) is not None
            for ch in layout.values()
        )
        if usable:
            usual = f"usual {description}"
            source = usual if plan.source == "DP defaults" else f"{plan.source}, {usual}"
            return replace(
                plan,
                kind=PLUG,
                source=source,
                channels={**layout, **plan.channels},
                probe_layouts=False,
            )
    return None


# --- Decoding and checking values -----------------------------------------------------


def as_number(value: Any) -> float | None:
    """A DP value as a finite number, or None (booleans are not numbers here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def decode_phase(value: Any) -> tuple[float, float, float]:
    """One DIN-meter phase DP (base64 of 8 bytes, big-endian: V x10 in 2 bytes,
    A x1000 in 3, W in 3) -> (volts, amps, watts). Raises ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"a phase DP is base64 text, not {type(value).__name__}")
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"phase DP {_short(value)} is not base64") from None
    if len(raw) != 8:
        raise ValueError(f"a phase DP holds 8 bytes, this one {len(raw)}")
    return (
        int.from_bytes(raw[0:2], "big") / 10,
        int.from_bytes(raw[2:5], "big") / 1000,
        float(int.from_bytes(raw[5:8], "big")),
    )


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def extract_values(plan: Plan, dps: Mapping[str, Any]) -> tuple[dict[str, float], list[str]]:
    """A device's figures in SI units from its DPs, unchecked, and a problem
    line per DP that could not be read. Meter phases come as ``l1_``,
    ``l2_``, ``l3_`` figures (``combine_phases`` names them); a phase other
    than the first reading all zeros is a phase the meter does not have."""
    values: dict[str, float] = {}
    problems: list[str] = []
    if plan.switch_dp and plan.switch_dp in dps:
        state = dps[plan.switch_dp]
        if isinstance(state, bool):
            values["is_on"] = 1.0 if state else 0.0
        else:
            problems.append(f"DP {plan.switch_dp} (switch) is {_short(state)}, not true/false")
    for metric, channel in plan.channels.items():
        if channel.dp not in dps:
            continue
        number = as_number(dps[channel.dp])
        if number is None:
            problems.append(f"DP {channel.dp} ({metric}) is {_short(dps[channel.dp])}")
            continue
        values[metric] = channel.convert(number)
    for index, dp in enumerate(plan.phase_dps, start=1):
        if dp not in dps:
            continue
        try:
            volts, amps, watts = decode_phase(dps[dp])
        except ValueError as exc:
            problems.append(f"DP {dp} (phase {index}): {exc}")
            continue
        if index > 1 and volts == amps == watts == 0:
            continue
        values[f"l{index}_voltage_volts"] = volts
        values[f"l{index}_current_amps"] = amps
        values[f"l{index}_power_watts"] = watts
    return values, problems


_PHASE = re.compile(r"l([1-3])_(.+)")


def check_ranges(
    values: Mapping[str, float], ranges: Mapping[str, Sequence[float]]
) -> tuple[dict[str, float], list[str]]:
    """Split values into those within ``ranges`` ({metric: [min, max]}, per
    phase for ``lN_`` figures) and a line per value dropped. Energy counters
    must not be negative. The circuit collector's check, on one device's figures."""
    limits = {**ranges, "energy_kwh": (0.0, math.inf)}
    kept, dropped = circuits.check_ranges(values, limits, phases=1)
    lines = []
    for metric, value in dropped.items():
        low, high = circuits.range_for(metric, limits, phases=1) or (-math.inf, math.inf)
        lines.append(f"{metric} {value:g} outside {low:g}..{high:g}")
    return kept, lines


# Real power cannot exceed voltage x current (apparent power); this much slack
# covers measuring error at small loads. A power figure well above it is the
# classic scaling mistake (400 W read for a 40 W plug).
APPARENT_POWER_SLACK = 1.1
APPARENT_POWER_SLACK_WATTS = 5.0


def check_apparent_power(values: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """Drop power and current where power exceeds voltage x current: one of
    their scales is wrong, and which one cannot be told."""
    kept = dict(values)
    dropped: list[str] = []
    for prefix in ("", "l1_", "l2_", "l3_"):
        power = kept.get(prefix + "power_watts")
        volts = kept.get(prefix + "voltage_volts")
        amps = kept.get(prefix + "current_amps")
        if power is None or volts is None or amps is None:
            continue
        apparent = volts * amps
        if abs(power) > apparent * APPARENT_POWER_SLACK + APPARENT_POWER_SLACK_WATTS:
            del kept[prefix + "power_watts"], kept[prefix + "current_amps"]
            dropped.append(
                f"{prefix}power_watts {power:g} and {prefix}current_amps {amps:g} disagree: "
                f"power exceeds voltage x current = {apparent:.1f} VA, so a scale is wrong "
                "(see TUYA_SCALING)"
            )
    return kept, dropped


def combine_phases(values: Mapping[str, float]) -> dict[str, float]:
    """Name phase figures: a one-phase meter's are plain ``power_watts`` etc.;
    several phases keep ``lN_`` and add totals (power and current summed,
    voltage the mean) where every phase has the figure."""
    phases = sorted({int(m.group(1)) for m in map(_PHASE.fullmatch, values) if m})
    if not phases:
        return dict(values)
    if phases == [1]:
        return {_PHASE.sub(r"\2", metric): value for metric, value in values.items()}
    return circuits.complete_totals(values, phases)


def parse_ranges(raw: Any) -> dict[str, dict[str, tuple[float, float]]]:
    """TUYA_RANGES checked: {"plug"|"meter": {metric: [min, max]}}. Raises ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError("TUYA_RANGES: must be a dict of 'plug'/'meter' -> {metric: [min, max]}")
    ranges: dict[str, dict[str, tuple[float, float]]] = {}
    for kind, limits in raw.items():
        if kind not in (PLUG, METER) or not isinstance(limits, dict):
            raise ConfigError("TUYA_RANGES: keys are 'plug' and 'meter', each a dict")
        ranges[kind] = {}
        for metric, pair in limits.items():
            ok = (
                metric in ("power_watts", "voltage_volts", "current_amps")
                and isinstance(pair, (list, tuple))
                and len(pair) == 2
                and all(as_number(x) is not None for x in pair)
                and pair[0] < pair[1]
            )
            if not ok:
                raise ConfigError(
                    f"TUYA_RANGES[{kind!r}][{metric!r}]: must be [min, max] of power_watts, "
                    "voltage_volts or current_amps"
                )
            ranges[kind][metric] = (float(pair[0]), float(pair[1]))
    return ranges


# --- Announcements: devices telling the network where they are -------------------------


@dataclass(frozen=True)
class Announcement:
    """What a device's UDP announcement says."""

    id: str
    ip: str
    version: str
    product_key: str = ""


def parse_announcement(data: bytes, source_ip: str) -> Announcement | None:
    """A device announcement in any of its three formats (3.1 plain JSON, 3.3/3.4
    AES-ECB, 3.5 AES-GCM, all with the well-known UDP key), or None."""
    if len(data) > 4096:
        return None
    try:
        info = json.loads(tinytuya.decrypt_udp(data))
    except Exception:  # anything can arrive on a UDP port: not ours to crash on
        return None
    if not isinstance(info, dict) or not isinstance(info.get("gwId"), str):
        return None
    try:
        version = normalize_version(info.get("version"))
    except ValueError:
        version = ""
    ip = info.get("ip") if isinstance(info.get("ip"), str) and info.get("ip") else source_ip
    product_key = info.get("productKey")
    return Announcement(
        info["gwId"], ip, version, product_key if isinstance(product_key, str) else ""
    )


_port_problems = collector.Once(log)  # (bind, port) we could not listen on


async def listen_for_announcements(
    bind: str,
    ports: Sequence[int],
    duration_s: float,
    wanted: set[str] | None = None,
) -> dict[str, Announcement]:
    """Listen on UDP ``ports`` for up to ``duration_s``; returns announcements
    by device id, early once every ``wanted`` id is heard. Sends nothing."""
    loop = asyncio.get_running_loop()
    found: dict[str, Announcement] = {}
    complete = asyncio.Event()
    ignored = [0]

    class Listener(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple) -> None:
            announcement = parse_announcement(data, addr[0])
            if announcement is None:
                ignored[0] += 1
                return
            found[announcement.id] = announcement
            if wanted is not None and wanted <= set(found):
                complete.set()

    transports = []
    for port in ports:
        try:
            transport, _ = await loop.create_datagram_endpoint(
                Listener, local_addr=(bind, port), reuse_port=hasattr(socket, "SO_REUSEPORT")
            )
        except OSError as exc:
            _port_problems.say(
                (bind, port),
                "cannot listen for device announcements on UDP %s:%d (%s): devices without "
                "an address in devices.json need one in TUYA_ADDRESSES",
                bind,
                port,
                exc.strerror or exc,
            )
            continue
        transports.append(transport)
    if not transports:
        return found
    try:
        await asyncio.wait_for(complete.wait(), timeout=duration_s)
    except asyncio.TimeoutError:
        pass
    finally:
        for transport in transports:
            transport.close()
    if ignored[0]:
        log.debug("ignored %d datagrams that were not device announcements", ignored[0])
    return found


# --- Keeping keys out of logs ------------------------------------------------------


def protect_keys(entries: Iterable[DeviceEntry]) -> None:
    """Scrub these devices' keys from every log line, and hold tinytuya's
    logger at WARNING (its debug lines print keys)."""
    collector.protect_secrets(entry.key for entry in entries)
    logging.getLogger("tinytuya").setLevel(logging.WARNING)


# --- Talking to a device -------------------------------------------------------------


class TuyaError(Exception):
    """A device did not answer as it should. The message says why, never the key."""


class NoAnswer(TuyaError):
    """Nothing came back: a timeout, a refused or unreachable address."""


class DeviceBusy(NoAnswer):
    """Another client holds the device's only local connection."""


class _Client(tinytuya.OutletDevice):
    """tinytuya's device, remembering why its last read failed (tinytuya turns a
    reset, a close and a timeout into the same error codes), and with a repr
    that leaves the key out."""

    receive_error: BaseException | None = None

    def _receive(self):  # type: ignore[no-untyped-def]
        try:
            return super()._receive()
        except Exception as exc:
            if self.receive_error is None:  # the first is the cause; later ones follow from it
                self.receive_error = exc
            raise

    def __repr__(self) -> str:
        return f"<Tuya device {self.id} at {self.address}:{self.port}>"


class TuyaConnection:
    """One device over tinytuya: a persistent socket, one retry, one thread.

    ``read()`` blocks and runs on the device's own worker thread (``poll()``
    puts it there), so a hung device costs only its own timeout, and never
    more than one thread: while a read is still running, the next ``poll()``
    fails at once instead of starting another.

    Each read: reports the device pushed since the last read are taken in,
    then STATUS; power DPs missing from it, or unchanged for ``stale_polls``
    reads, are asked for again with UPDATEDPS (some plugs answer STATUS from
    a cache they refresh only when asked). A device that resets us is busy
    with another client: it is left alone for ``busy_backoff_s``.
    """

    def __init__(
        self,
        entry: DeviceEntry,
        address: str,
        port: int,
        version: str,
        plan: Plan,
        *,
        timeout_s: float,
        persistent: bool = True,
        busy_backoff_s: float = 60.0,
        stale_polls: int = 3,
    ) -> None:
        # tinytuya scans the LAN for a device without an address and reads
        # ./devices.json for one without a key: neither may ever happen here.
        if not address or address in ("Auto", "0.0.0.0"):
            raise ValueError(f"{entry.label}: no address")
        if not entry.key:
            raise ValueError(f"{entry.label}: no local key in devices.json")
        self.entry = entry
        self.address = address
        self.port = port
        self.version = version
        self.plan = plan
        self.timeout_s = timeout_s
        self.persistent = persistent
        self.busy_backoff_s = busy_backoff_s
        self.stale_polls = stale_polls
        self.requested = (entry, address, port, version, plan)  # as made, to spot changes
        self.failures = 0  # consecutive failed polls
        self.answered = False  # has answered with this key since we started
        self._client: _Client | None = None
        self._busy_until = 0.0
        self._asked_by_name = False  # device22: DPs set for its queries
        self._probed = False
        self._power_dps: list[str] | None = None  # the power DPs it reports, once known
        self._updates_unanswered = 0
        self._last_power: tuple | None = None
        self._unchanged = 0
        self._running: Future | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuya")

    def __repr__(self) -> str:
        return f"TuyaConnection({self.entry.label} at {self.address}:{self.port})"

    @property
    def where(self) -> str:
        return f"{self.address}:{self.port}" if self.port != DEFAULT_PORT else self.address

    async def poll(self) -> dict[str, Any]:
        """The device's DPs now, read on its own thread. Raises TuyaError."""
        if self._running is not None and not self._running.done():
            raise NoAnswer("still waiting for its previous answer (a hung connection)")
        try:
            self._running = self._executor.submit(self.read)
        except RuntimeError:
            raise TuyaError("connection closed (its address changed)") from None
        try:
            dps = await asyncio.wrap_future(self._running)
        except BaseException:
            self.failures += 1
            raise
        self.failures = 0
        return dps

    def close(self) -> None:
        """Close the socket (on the device's thread, after any running read)."""
        try:
            self._executor.submit(self._drop_client)
        except RuntimeError:
            pass
        self._executor.shutdown(wait=False)

    # -- on the device's thread ------------------------------------------------------

    def read(self) -> dict[str, Any]:
        """Blocking: the device's DPs, this read's answers merged. Raises TuyaError."""
        now = time.monotonic()
        if now < self._busy_until:
            raise DeviceBusy(
                f"busy with another client; left alone for {math.ceil(self._busy_until - now)} "
                "s more"
            )
        try:
            client = self._client or self._new_client()
            dps: dict[str, Any] = {}
            if self.persistent:
                self._take_pushed_reports(client, dps)
            dps.update(self._status(client) if self.version else self._detect_version(client))
            self._refresh(client, dps)
        except DeviceBusy as exc:
            self._busy_until = time.monotonic() + self.busy_backoff_s
            self._drop_client()
            raise DeviceBusy(f"{exc}; left alone for {self.busy_backoff_s:g} s") from None
        except TuyaError:
            self._drop_client()
            raise
        except Exception as exc:  # tinytuya failing in a way it does not report
            self._drop_client()
            message = collector.redact_secrets(str(exc).replace(self.entry.key, "<key>"))
            raise TuyaError(f"tinytuya failed: {exc.__class__.__name__}: {message}") from None
        self.answered = True
        return dps

    def _new_client(self) -> _Client:
        client = _Client(
            self.entry.id,
            self.address,
            self.entry.key,
            version=float(self.version or DETECT_ORDER[0]),
            port=self.port,
            connection_timeout=self.timeout_s,
            connection_retry_limit=1,  # 0 would never connect
            connection_retry_delay=0,
            persist=self.persistent,
        )
        self._client = client
        self._asked_by_name = False
        self._probed = False
        return client

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._last_power, self._unchanged = None, 0
        if client is not None:
            client.close()

    def _request(self, client: _Client, call: Callable[[], Any]) -> dict[str, Any] | None:
        """One tinytuya request: its DPs, None if nothing came back, or TuyaError."""
        client.receive_error = None
        answer = call()
        if answer is None:
            return None
        if not isinstance(answer, dict):
            raise TuyaError(f"malformed answer {_short(answer)}")
        if "Err" in answer:
            raise self._failure(client, str(answer.get("Err")))
        dps = answer.get("dps")
        if not isinstance(dps, dict):
            raise TuyaError(f"answer without DPs: {_short(answer, 80)}")
        return {str(dp): value for dp, value in dps.items()}

    def _status(self, client: _Client) -> dict[str, Any]:
        dps = self._request(client, client.status)
        # tinytuya spots a "device22" and asks again for DP 1 alone; such a
        # device must be asked for each DP by number.
        if client.dev_type == "device22" and not self._asked_by_name:
            client.set_dpsUsed(self.plan.wanted_dps())
            self._asked_by_name = True
            dps = self._request(client, client.status)
        if dps is None:
            raise TuyaError("no answer to STATUS")
        return dps

    def _detect_version(self, client: _Client) -> dict[str, Any]:
        reasons = []
        for version in DETECT_ORDER:
            client.set_version(float(version))
            try:
                dps = self._status(client)
            except DeviceBusy:
                raise
            except TuyaError as exc:
                reasons.append(f"{version}: {exc}")
                client.close()
                continue
            self.version = version
            log.info("%s speaks protocol %s", self.entry.label, version)
            return dps
        raise TuyaError(
            "no answer in any protocol version; set its version in TUYA_VERSIONS ("
            + "; ".join(reasons)
            + ")"
        )

    def _take_pushed_reports(self, client: _Client, dps: dict[str, Any]) -> None:
        """Reports the device sent on its own since the last read: take them in
        now, or the next request would take one for its answer."""
        for _ in range(32):
            sock = client.socket
            if sock is None:
                return
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable and not sock.recv(1, socket.MSG_PEEK):
                    readable = []
                    client.close()  # closed by the device: the next request reconnects
            except (OSError, ValueError):
                client.close()
                return
            if not readable:
                return
            pushed = client.receive()  # None: an empty acknowledgement
            if isinstance(pushed, dict) and "Err" in pushed:
                client.close()
                return
            if isinstance(pushed, dict) and isinstance(pushed.get("dps"), dict):
                dps.update((str(dp), value) for dp, value in pushed["dps"].items())

    def _refresh(self, client: _Client, dps: dict[str, Any]) -> None:
        plan = self.plan
        if plan.probe_layouts:
            resolved = resolve_layout(plan, dps)
            if resolved is None and not self._probed:
                self._probed = True
                dps.update(self._update_dps(client, LAYOUT_DPS) or {})
                resolved = resolve_layout(plan, dps)
            if resolved is not None:
                self.plan, self._power_dps = resolved, None
                log.info("%s: reading power from its %s", self.entry.label, resolved.source)
            return
        if self._power_dps is None:
            # First read: learn which power DPs the device has (a one-phase
            # meter has no phase B or C), asking once for any STATUS left out.
            wanted = [str(dp) for dp in plan.refresh_dps]
            if any(dp not in dps for dp in wanted):
                dps.update(self._update_dps(client, plan.refresh_dps) or {})
            self._power_dps = [dp for dp in wanted if dp in dps]
            self._last_power = tuple(dps.get(dp) for dp in self._power_dps)
            return
        known = self._power_dps
        current = tuple(dps.get(dp) for dp in known)
        self._unchanged = self._unchanged + 1 if current == self._last_power else 0
        self._last_power = current
        missing = [dp for dp in known if dp not in dps]
        if known and (missing or self._unchanged >= self.stale_polls):
            self._unchanged = 0
            fresh = self._update_dps(client, [int(dp) for dp in known])
            if fresh:
                dps.update(fresh)
                self._last_power = tuple(dps.get(dp) for dp in known)

    def _update_dps(self, client: _Client, dp_numbers: list[int]) -> dict[str, Any] | None:
        """UPDATEDPS: the device re-measures and reports; its values, or None.

        A device that twice reports nothing is not asked again: each silent
        request costs a timeout."""
        if self._updates_unanswered >= 2:
            return None
        try:
            fresh = self._request(client, lambda: client.updatedps(dp_numbers))
        except DeviceBusy:
            raise
        except TuyaError as exc:
            log.debug("%s: UPDATEDPS failed: %s", self.entry.label, exc)
            fresh = None
        self._updates_unanswered = 0 if fresh else self._updates_unanswered + 1
        if self._updates_unanswered == 2:
            log.info("%s does not answer UPDATEDPS: read from STATUS only", self.entry.label)
        return fresh

    def _failure(self, client: _Client, code: str) -> TuyaError:
        """tinytuya's error code, with what probably caused it."""
        cause = client.receive_error
        version = self.version or "?"
        seconds = f"{self.timeout_s:g} s"
        key_hint = (
            "it answered with this key earlier: restarting?"
            if self.answered
            else f"wrong local key (run the wizard again) or protocol version ({version}; "
            "see TUYA_VERSIONS)"
        )
        if isinstance(cause, ConnectionResetError):
            return DeviceBusy(
                "connection reset: busy with another client (the Tuya or Smart Life app, "
                "Home Assistant, another collector?)"
            )
        if code == "914":
            if isinstance(cause, socket.timeout):
                return NoAnswer(f"no answer to the session-key handshake within {seconds}")
            if isinstance(cause, tinytuya.DecodeError) and "closed" in str(cause):
                return TuyaError(f"closed the connection in the session-key handshake: {key_hint}")
            return TuyaError(f"session-key handshake failed: garbled answer, or {key_hint}")
        if code == "902" or isinstance(cause, socket.timeout):
            return NoAnswer(f"no answer within {seconds}")
        if code == "901":
            return NoAnswer(f"cannot connect to {self.where} (refused or unreachable)")
        if code == "905":
            return NoAnswer(f"{self.where} unreachable (no connection within {seconds})")
        if code in ("900", "904"):
            refused = any(b"data format error" in (msg.payload or b"") for msg in client.raw_recv)
            if refused:
                return TuyaError(f"the device cannot decrypt our request: {key_hint}")
            return TuyaError(f"unreadable answer: garbled, or {key_hint}")
        return TuyaError(f"tinytuya error {code}")


PROJECT_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TuyaSettings:
    """The TUYA_* settings, checked beyond their types (config.py explains each)."""

    devices_path: Path
    addresses: Mapping[str, str]
    versions: Mapping[str, str]
    exclude: Sequence[str]
    scaling: Mapping[str, tuple[dict[str, Channel], str | None]]
    ranges: Mapping[str, Mapping[str, tuple[float, float]]]
    timeout_s: float
    persistent: bool
    busy_backoff_s: float
    stale_polls: int
    announce_bind: str
    announce_ports: Sequence[int]
    announce_listen_s: float

    @classmethod
    def load(cls, settings: Any) -> TuyaSettings:
        """From ``settings.load_settings()``. Raises ConfigError."""
        ports = []
        for port in settings.tuya_announce_ports:
            number = as_number(port)
            if number is None or not number.is_integer() or not 1 <= number <= 65535:
                raise ConfigError("TUYA_ANNOUNCE_PORTS: must be a list of UDP ports, 1 to 65535")
            ports.append(int(number))
        if settings.tuya_stale_polls < 1:
            raise ConfigError("TUYA_STALE_POLLS: must be at least 1")
        if not all(isinstance(item, str) for item in settings.tuya_exclude):
            raise ConfigError("TUYA_EXCLUDE: must be a list of device ids or names")
        for key, value in settings.tuya_addresses.items():
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"TUYA_ADDRESSES[{key!r}]: must be 'host' or 'host:port'")
            parse_host_port(value, DEFAULT_PORT, f"TUYA_ADDRESSES[{key!r}]")
        versions = {}
        for key, value in settings.tuya_versions.items():
            try:
                versions[key] = normalize_version(value)
            except ValueError as exc:
                raise ConfigError(f"TUYA_VERSIONS[{key!r}]: {exc}") from None
        path = Path(settings.tuya_devices_file).expanduser()
        return cls(
            devices_path=path if path.is_absolute() else PROJECT_DIR / path,
            addresses=dict(settings.tuya_addresses),
            versions=versions,
            exclude=list(settings.tuya_exclude),
            scaling={
                key: parse_scaling(f"TUYA_SCALING[{key!r}]", spec)
                for key, spec in settings.tuya_scaling.items()
            },
            ranges=parse_ranges(settings.tuya_ranges),
            # One retry: a dead device costs about twice this, which the
            # runner's per-device timeout must not cut short.
            timeout_s=min(settings.tuya_timeout_s, settings.device_timeout_s / 4),
            persistent=settings.tuya_persistent,
            busy_backoff_s=settings.tuya_busy_backoff_s,
            stale_polls=settings.tuya_stale_polls,
            announce_bind=settings.tuya_announce_bind,
            announce_ports=ports,
            announce_listen_s=settings.tuya_announce_listen_s,
        )

    def address(self, entry: DeviceEntry, announced: Announcement | None) -> tuple[str, int]:
        """TUYA_ADDRESSES, else the device's latest announcement, else devices.json;
        ("", port) when none says."""
        configured = lookup(self.addresses, entry)
        if configured:
            return parse_host_port(configured, entry.port, "TUYA_ADDRESSES")
        if announced is not None and announced.ip:
            return announced.ip, entry.port
        return entry.ip, entry.port

    def version(self, entry: DeviceEntry, announced: Announcement | None) -> str:
        """TUYA_VERSIONS, else the device's announcement, else devices.json; '' to detect."""
        return (
            lookup(self.versions, entry)
            or (announced.version if announced is not None else "")
            or entry.version
        )

    def plan(self, entry: DeviceEntry) -> Plan:
        return plan_for(entry, lookup(self.scaling, entry))

    def connect(
        self, entry: DeviceEntry, address: str, port: int, version: str, plan: Plan
    ) -> TuyaConnection:
        """A connection with these settings (nothing is sent until it is polled)."""
        return TuyaConnection(
            entry,
            address,
            port,
            version,
            plan,
            timeout_s=self.timeout_s,
            persistent=self.persistent,
            busy_backoff_s=self.busy_backoff_s,
            stale_polls=self.stale_polls,
        )

    async def listen(self, wanted: set[str] | None) -> dict[str, Announcement]:
        """Announcements heard within TUYA_ANNOUNCE_LISTEN_S (early once all wanted are)."""
        return await listen_for_announcements(
            self.announce_bind, self.announce_ports, self.announce_listen_s, wanted
        )


class Connections:
    """Each device's one connection, and where its announcements say it is:
    what tuya_to_graphite.py and the circuit collector's Tuya reader both keep."""

    def __init__(self, settings: TuyaSettings) -> None:
        self.settings = settings
        self.by_id: dict[str, TuyaConnection] = {}
        self.announced: dict[str, Announcement] = {}

    def address(self, entry: DeviceEntry) -> tuple[str, int]:
        return self.settings.address(entry, self.announced.get(entry.id))

    def version(self, entry: DeviceEntry) -> str:
        return self.settings.version(entry, self.announced.get(entry.id))

    def failures(self, device_id: str) -> int:
        """Consecutive failed polls of the device's connection (0 without one)."""
        connection = self.by_id.get(device_id)
        return 0 if connection is None else connection.failures

    async def listen(self, wanted: set[str] | None) -> dict[str, Announcement]:
        """Announcements heard (see TuyaSettings.listen), remembered."""
        heard = await self.settings.listen(wanted)
        self.announced.update(heard)
        return heard

    def open(self, entry: DeviceEntry, host: str, port: int, plan: Plan) -> TuyaConnection:
        """The device's connection, a new one if where or how to reach it changed."""
        version = self.version(entry)
        old = self.by_id.get(entry.id)
        if old is not None and old.requested == (entry, host, port, version, plan):
            return old
        if old is not None:
            old.close()
        connection = self.settings.connect(entry, host, port, version, plan)
        self.by_id[entry.id] = connection
        return connection

    def close(self) -> None:
        for connection in self.by_id.values():
            connection.close()
