"""What a Tuya device measures, and in which scale; decoding and checking its values.

Where a value's scale comes from, first match wins: the user's TUYA_SCALING,
the device's own ``mapping`` in devices.json (``values.scale`` and ``unit``),
the built-in ``PROFILES`` (by product id, then category), and last the usual
DP numbers (18 mA, 19 W x10, 20 V x10; older plugs 4, 5, 6) when the
device's status shows them. Pure functions: ``plan_for`` decides, then
``extract_values`` decodes a status and the checks (ranges, power <= V x A,
phase totals) catch a scale off by ten.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import circuit_model
from settings import ConfigError
from tuya_devicefile import DeviceEntry

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
        raise ValueError(f"phase DP {short_text(value)} is not base64") from None
    if len(raw) != 8:
        raise ValueError(f"a phase DP holds 8 bytes, this one {len(raw)}")
    return (
        int.from_bytes(raw[0:2], "big") / 10,
        int.from_bytes(raw[2:5], "big") / 1000,
        float(int.from_bytes(raw[5:8], "big")),
    )


def short_text(value: Any, limit: int = 40) -> str:
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
            problems.append(f"DP {plan.switch_dp} (switch) is {short_text(state)}, not true/false")
    for metric, channel in plan.channels.items():
        if channel.dp not in dps:
            continue
        number = as_number(dps[channel.dp])
        if number is None:
            problems.append(f"DP {channel.dp} ({metric}) is {short_text(dps[channel.dp])}")
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
    limits: dict[str, tuple[float, float]] = {
        metric: (float(low), float(high)) for metric, (low, high) in ranges.items()
    }
    limits["energy_kwh"] = (0.0, math.inf)
    kept, dropped = circuit_model.check_ranges(values, limits, phases=1)
    lines = []
    for metric, value in dropped.items():
        low, high = circuit_model.range_for(metric, limits, phases=1) or (-math.inf, math.inf)
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
    return circuit_model.complete_totals(values, phases)


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
