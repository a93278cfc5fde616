"""The Hildebrand Glow display's local MQTT messages: parse and check.

``glow/<id>/SENSOR/electricitymeter`` and ``.../gasmeter`` carry the smart
meter's power (kW) and cumulative registers (kWh, m³) with the meter's own
timestamp; ``glow/<id>/STATE`` the display's Zigbee link. Pure parsing here;
``RegisterGuard`` keeps each register's last value across restarts, because
the meter's quirks (power ``-8388.608`` kW for no reading, a register reading
0 or less than before) must be dropped, not sent. mqtt_to_graphite.py
matches the topics and sends the figures.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqtt_rules import MISSING, PayloadError, lookup, to_number
from state import read_json, save_json

log = logging.getLogger("electricity.mqtt")


# The meter's "no reading" marker: the most negative 24-bit value, in kW.
GLOW_INVALID_POWER_KW = -8388.608
# A register that stays below its last value for this many readings in a row
# is a new or reset meter, not a glitch: it is taken from then on.
GLOW_RESET_READINGS = 5
# The meter's timestamp is used when at most this far ahead of our clock and
# this far behind it (a retained or queued message); otherwise the receive time.
GLOW_MAX_CLOCK_AHEAD_S = 300
GLOW_MAX_AGE_S = 86400


@dataclass
class Register:
    """A cumulative meter register and the figures that are only as good as it."""

    key: str  # "import", "export", "gas_energy", "gas_volume"
    metric: str
    cumulative: float
    companions: dict[str, float] = field(default_factory=dict)  # e.g. today's kWh


@dataclass
class GlowReading:
    """One Glow message, extracted; the quirks are decided later (they need history)."""

    timestamp: int | None
    values: dict[str, float] = field(default_factory=dict)
    registers: list[Register] = field(default_factory=list)
    power_invalid: bool = False


def glow_timestamp(text: Any) -> int | None:
    """'2026-11-20T18:00:06Z' -> unix seconds; None when absent or unreadable."""
    if not isinstance(text, str):
        return None
    try:
        stamp = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:  # the display speaks UTC
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return int(stamp.timestamp())


def sample_time(payload_timestamp: int | None, received: int) -> int:
    """The meter's own timestamp when it is plausible, else the receive time."""
    if payload_timestamp is None:
        return received
    if not -GLOW_MAX_AGE_S <= payload_timestamp - received <= GLOW_MAX_CLOCK_AHEAD_S:
        return received
    return payload_timestamp


def _figure(block: Any, *path: str) -> float | None:
    """A number inside a Glow block, None when absent. Raises PayloadError when not a number."""
    value = lookup(block, path)
    return None if value is MISSING else to_number(value)


def _meter_block(document: Any, name: str) -> Mapping:
    """``{"electricitymeter": {...}}`` -> the inner block. Raises PayloadError."""
    meter = document.get(name) if isinstance(document, Mapping) else None
    if not isinstance(meter, Mapping):
        raise PayloadError(f"no {name} block")
    return meter


def _import_register(meter: Mapping, key: str, metric: str) -> Register | None:
    """The meter's import register, with today's figure that is only as good as it."""
    cumulative = _figure(meter, "energy", "import", "cumulative")
    if cumulative is None:
        return None
    today = _figure(meter, "energy", "import", "day")
    return Register(key, metric, cumulative, {} if today is None else {"energy_today_kwh": today})


def parse_glow_electricity(document: Any) -> GlowReading:
    """``{"electricitymeter": {...}}`` -> power and the import/export registers."""
    meter = _meter_block(document, "electricitymeter")
    reading = GlowReading(glow_timestamp(meter.get("timestamp")))
    power_kw = _figure(meter, "power", "value")
    if power_kw is not None:
        if math.isclose(power_kw, GLOW_INVALID_POWER_KW, abs_tol=1e-6):
            reading.power_invalid = True
        else:
            reading.values["power_kw"] = power_kw
            reading.values["power_watts"] = round(power_kw * 1000, 3)
    registers = [_import_register(meter, "import", "energy_import_kwh")]
    exported = _figure(meter, "energy", "export", "cumulative")
    if exported is not None:
        registers.append(Register("export", "energy_export_kwh", exported))
    reading.registers = [register for register in registers if register is not None]
    return reading


def parse_glow_gas(document: Any) -> GlowReading:
    """``{"gasmeter": {...}}`` -> the energy (kWh) and volume (m3) registers."""
    meter = _meter_block(document, "gasmeter")
    reading = GlowReading(glow_timestamp(meter.get("timestamp")))
    registers = [_import_register(meter, "gas_energy", "energy_kwh")]
    volume = _figure(meter, "energy", "import", "cumulativevol")
    units = lookup(meter, ("energy", "import", "cumulativevolunits"))
    if volume is not None and units in ("m3", MISSING):
        registers.append(Register("gas_volume", "volume_m3", volume))
    reading.registers = [register for register in registers if register is not None]
    return reading


def parse_glow_state(document: Any) -> GlowReading:
    """``glow/<id>/STATE`` -> the display's Zigbee link to the meter, as health."""
    if not isinstance(document, Mapping):
        raise PayloadError("STATE is not a JSON object")
    reading = GlowReading(glow_timestamp(document.get("timestamp")))
    han = document.get("han")
    if isinstance(han, Mapping):
        for key, metric in (("rssi", "han_rssi_dbm"), ("lqi", "han_lqi")):
            value = _figure(han, key)
            if value is not None:
                reading.values[metric] = value
        if "status" in han:
            reading.values["han_joined"] = 1.0 if han["status"] == "joined" else 0.0
    return reading


class RegisterGuard:
    """Glow's cumulative registers only rise: a 0 or a fall is a glitch.

    A glitch is dropped and counted. A 0 from a register that never read more
    (the export register of a home without solar) is not sent either, but is
    no glitch. A fall that holds for GLOW_RESET_READINGS readings in a row is a
    new meter: taken, and logged. Last values persist across restarts.
    """

    SAVE_EVERY_S = 60.0

    def __init__(self, path: Path | None) -> None:
        self.path = path
        stored = read_json(path, {}) if path else {}
        self._last: dict[str, float] = {
            key: float(value)
            for key, value in (stored.items() if isinstance(stored, dict) else ())
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        self._falling: dict[str, list[float]] = {}
        self._saved_at = time.monotonic()
        self._dirty = False

    def check(self, key: str, value: float) -> str:
        """'ok' (send it), 'unused' (a register that reads 0, never more) or 'glitch'."""
        last = self._last.get(key)
        if value <= 0:  # a register never reads below 0; 0 is the display's blank
            return "glitch" if last else "unused"
        if last is None or value >= last:
            self._falling.pop(key, None)
            self._remember(key, value)
            return "ok"
        falling = self._falling.setdefault(key, [])
        if falling and value < falling[-1]:
            falling.clear()  # not one steady new series: still glitches
        falling.append(value)
        if len(falling) < GLOW_RESET_READINGS:
            return "glitch"
        log.warning(
            "glow register %s went from %g to %g and stays there: a new meter?", key, last, value
        )
        del self._falling[key]
        self._remember(key, value)
        return "ok"

    def _remember(self, key: str, value: float) -> None:
        self._last[key] = value
        self._dirty = True
        if time.monotonic() - self._saved_at >= self.SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        self._saved_at = time.monotonic()
        if self.path is not None and self._dirty:
            # Not written (a full disk): still dirty, tried again at the next save.
            self._dirty = not save_json(self.path, self._last, "Glow registers", log)
