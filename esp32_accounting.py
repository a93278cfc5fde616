"""Whole-house energy and power from an ESP32's cumulative LED pulse counts.

Each reading carries ``pulses_total``, the pulses the device has counted since
it booted (``boot_id``), numbered by ``seq`` within the boot. A boot's energy
is its highest ``pulses_total`` / ``imp_per_kwh``, and a device's energy is
the sum over its boots. Energy is therefore a high-water mark, never a sum of
posts: a repeated, retried or late reading adds nothing, a lost one loses
nothing (the next carries the count), a reboot starts a new boot counted from
0, and replaying readings after a receiver restart cannot count them twice.

Power comes from the time between the last two pulses when the device sends
it (``last_interval_ms``), else from the pulses between readings. Either way
it is capped by what the silence since the last pulse allows (the next pulse
has not come yet, so the interval is already longer) and reads 0 once no
pulse has come for ``idle_timeout_s``.

Times here are the device's uptime, so none of this needs the device's clock.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from state import read_json

log = logging.getLogger("electricity.esp32")

# One pulse is 1/imp_per_kwh kWh = 3.6e6/imp_per_kwh J: P[W] = 3.6e9 / (imp x ms).
JOULE_MS_PER_KWH = 3.6e9
# Recent boots kept whole, so a late reading of the previous boot still lands
# in it. Older boots fold into ``retired_kwh``; their ids are remembered so a
# very late reading of one is recognised (and ignored) rather than counted anew.
BOOTS_KEPT = 8
RETIRED_BOOT_IDS_KEPT = 256
# Pulses a reading may bring beyond what the maximum power allows: a pulse
# can land just before a reading and the next just after the following one.
PULSE_SLACK = 2
STATE_VERSION = 1

ACCEPTED = "accepted"
DUPLICATE = "duplicate"  # (device, boot, seq) seen already, superseded, or of a retired boot
REGRESSION = "regression"  # a newer reading with fewer pulses: the change is ignored
IMPLAUSIBLE = "implausible"  # more pulses than any house makes, or imp_per_kwh changed mid-boot
OUTCOMES = (ACCEPTED, DUPLICATE, REGRESSION, IMPLAUSIBLE)


@dataclass(frozen=True)
class MeterReading:
    """One reading as the ESP32 posts it (already validated)."""

    device_id: str
    boot_id: str
    seq: int
    uptime_ms: int
    imp_per_kwh: float
    pulses_total: int
    ts: float | None = None
    last_interval_ms: float | None = None
    rssi: float | None = None
    fw: str | None = None


@dataclass
class Applied:
    """What one reading did: its outcome and, when accepted, the figures to send."""

    outcome: str
    energy_kwh: float | None = None  # the device's cumulative energy after this reading
    power_watts: float | None = None
    reason: str = ""  # why an implausible reading was refused, for the log


def watts_from_interval(imp_per_kwh: float, interval_ms: float) -> float:
    """Power from the time between two pulses: P = 3.6e6 / (imp_per_kwh x seconds)."""
    return JOULE_MS_PER_KWH / (imp_per_kwh * interval_ms)


def max_new_pulses(imp_per_kwh: float, elapsed_ms: float, max_power_watts: float) -> float:
    """The most pulses ``max_power_watts`` can make in ``elapsed_ms``, plus slack."""
    return max_power_watts * imp_per_kwh * max(elapsed_ms, 0) / JOULE_MS_PER_KWH + PULSE_SLACK


def estimate_power_watts(
    imp_per_kwh: float,
    last_interval_ms: float | None,
    new_pulses: int,
    window_ms: float,
    held_watts: float | None,
    silent_ms: float,
    idle_timeout_ms: float,
    max_power_watts: float = math.inf,
) -> float | None:
    """Power now, or None when nothing says it yet.

    ``new_pulses`` came in ``window_ms`` (used when the device sends no
    ``last_interval_ms``); ``held_watts`` is the previous estimate, kept while
    no pulse comes; ``silent_ms`` is how long at least since the last pulse.
    An average over a short window can exceed ``max_power_watts`` only by the
    pulse slack, so it is capped there (an interval beyond it is refused by
    the caller).
    """
    if silent_ms >= idle_timeout_ms:
        return 0.0
    if last_interval_ms is not None:
        estimate: float | None = watts_from_interval(imp_per_kwh, last_interval_ms)
    elif new_pulses > 0 and window_ms > 0:
        average = new_pulses * JOULE_MS_PER_KWH / (imp_per_kwh * window_ms)
        estimate = min(average, max_power_watts)
    else:
        estimate = held_watts
    if estimate is not None and silent_ms > 0:
        # The next pulse is at least silent_ms away, so the power is at most this.
        estimate = min(estimate, watts_from_interval(imp_per_kwh, silent_ms))
    return estimate


@dataclass
class Boot:
    """One boot of a device: its pulse count's high-water mark and where it stood."""

    boot_id: str
    imp_per_kwh: float
    seq: int  # newest seq seen
    uptime_ms: int  # uptime of the last accepted reading
    pulses: int  # highest pulses_total: this boot's energy
    count_since_ms: int  # uptime of the first reading that showed ``pulses``
    power_watts: float | None = None  # last estimate, held between pulses

    @property
    def energy_kwh(self) -> float:
        return self.pulses / self.imp_per_kwh


@dataclass
class MeterDevice:
    device_id: str
    boots: list[Boot] = field(default_factory=list)  # oldest first
    retired_kwh: float = 0.0
    retired_boot_ids: list[str] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)  # the last accepted reading, for people
    # The newest timestamp energy_kwh was sent at: the next total is sent
    # later (esp32_receiver.energy_timestamp), so the series never goes down.
    energy_ts: int = 0

    @property
    def energy_kwh(self) -> float:
        return self.retired_kwh + sum(boot.energy_kwh for boot in self.boots)

    def boot(self, boot_id: str) -> Boot | None:
        for boot in self.boots:
            if boot.boot_id == boot_id:
                return boot
        return None

    def add_boot(self, boot: Boot) -> None:
        self.boots.append(boot)
        while len(self.boots) > BOOTS_KEPT:
            oldest = self.boots.pop(0)
            self.retired_kwh += oldest.energy_kwh
            self.retired_boot_ids.append(oldest.boot_id)
        del self.retired_boot_ids[:-RETIRED_BOOT_IDS_KEPT]


class MeterAccounts:
    """Every device's boots and energy; persisted in ``path`` (None: memory only).

    Not thread-safe: the caller serialises ``apply`` and ``to_state``.
    """

    def __init__(
        self,
        path: Path | None,
        idle_timeout_s: float = 300.0,
        max_power_watts: float = 100_000.0,
    ) -> None:
        self.path = path
        self.idle_timeout_ms = idle_timeout_s * 1000
        self.max_power_watts = max_power_watts
        self.devices: dict[str, MeterDevice] = {}
        self.changed = False  # since the last to_state()
        if path is not None:
            self._load(read_json(path, {}))

    # --- accounting -------------------------------------------------------------

    def apply(self, reading: MeterReading, received_at: float) -> Applied:
        """Account one reading; never raises for any validated reading."""
        device = self.devices.get(reading.device_id)
        if device is None:
            device = self.devices[reading.device_id] = MeterDevice(reading.device_id)
        boot = device.boot(reading.boot_id)
        if boot is None:
            if reading.boot_id in device.retired_boot_ids:
                return Applied(DUPLICATE)
            applied = self._first_of_boot(device, reading)
        else:
            applied = self._next_in_boot(boot, reading)
        if applied.outcome == ACCEPTED:
            applied.energy_kwh = device.energy_kwh
            device.last = _status(reading, applied, received_at)
        self.changed = True
        return applied

    def _first_of_boot(self, device: MeterDevice, reading: MeterReading) -> Applied:
        # The counter started from 0 at boot, so all its pulses are new.
        limit = max_new_pulses(reading.imp_per_kwh, reading.uptime_ms, self.max_power_watts)
        if reading.pulses_total > limit:
            return Applied(IMPLAUSIBLE)
        if reading.pulses_total > 0:
            silent_ms, count_since_ms = 0, reading.uptime_ms
        else:
            silent_ms, count_since_ms = reading.uptime_ms, 0  # no pulse since boot
        # A whole boot is no window for an average: no new pulses, no window.
        power = self._power(reading, reading.imp_per_kwh, 0, 0, None, silent_ms)
        if isinstance(power, Applied):
            return power
        device.add_boot(
            Boot(
                boot_id=reading.boot_id,
                imp_per_kwh=reading.imp_per_kwh,
                seq=reading.seq,
                uptime_ms=reading.uptime_ms,
                pulses=reading.pulses_total,
                count_since_ms=count_since_ms,
                power_watts=power,
            )
        )
        return Applied(ACCEPTED, power_watts=power)

    def _next_in_boot(self, boot: Boot, reading: MeterReading) -> Applied:
        if reading.seq <= boot.seq:
            return Applied(DUPLICATE)
        if reading.imp_per_kwh != boot.imp_per_kwh:
            return Applied(IMPLAUSIBLE)  # the meter constant cannot change without a reboot
        new_pulses = reading.pulses_total - boot.pulses
        if new_pulses < 0:
            boot.seq = reading.seq
            return Applied(REGRESSION)
        elapsed_ms = reading.uptime_ms - boot.uptime_ms
        if new_pulses > max_new_pulses(boot.imp_per_kwh, elapsed_ms, self.max_power_watts):
            return Applied(IMPLAUSIBLE)
        if new_pulses > 0:
            window_ms, silent_ms = reading.uptime_ms - boot.count_since_ms, 0
        else:
            window_ms, silent_ms = 0, reading.uptime_ms - boot.count_since_ms
        power = self._power(
            reading, boot.imp_per_kwh, new_pulses, window_ms, boot.power_watts, silent_ms
        )
        if isinstance(power, Applied):
            return power
        boot.seq, boot.uptime_ms, boot.power_watts = reading.seq, reading.uptime_ms, power
        if new_pulses > 0:
            boot.pulses, boot.count_since_ms = reading.pulses_total, reading.uptime_ms
        return Applied(ACCEPTED, power_watts=power)

    def _power(
        self,
        reading: MeterReading,
        imp_per_kwh: float,
        new_pulses: int,
        window_ms: float,
        previous_watts: float | None,
        silent_ms: float,
    ) -> float | Applied | None:
        """The power this reading shows, or the refusal of a reading whose pulse
        interval means more than the maximum power (a bounce on the LED line,
        or a garbled field): nothing of it counts."""
        power = estimate_power_watts(
            imp_per_kwh,
            reading.last_interval_ms,
            new_pulses,
            window_ms,
            previous_watts,
            silent_ms,
            self.idle_timeout_ms,
            self.max_power_watts,
        )
        if power is None or power <= self.max_power_watts:
            return power
        return Applied(
            IMPLAUSIBLE,
            reason=f"last_interval_ms {reading.last_interval_ms:g} means {power:.4g} W,"
            f" more than the maximum {self.max_power_watts:g} W",
        )

    def energy_kwh(self, device_id: str) -> float | None:
        device = self.devices.get(device_id)
        return None if device is None else device.energy_kwh

    # --- persistence --------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Everything needed to go on after a restart, as JSON-ready data."""
        self.changed = False
        return {
            "version": STATE_VERSION,
            "devices": {
                device_id: {
                    "boots": [asdict(boot) for boot in device.boots],
                    "retired_kwh": device.retired_kwh,
                    "retired_boot_ids": list(device.retired_boot_ids),
                    "last": dict(device.last),
                    "energy_ts": device.energy_ts,
                }
                for device_id, device in self.devices.items()
            },
        }

    def _load(self, data: Any) -> None:
        if not data:
            return
        devices = data.get("devices") if isinstance(data, dict) else None
        if not isinstance(devices, dict):
            log.error("%s: not an energy state file; starting from empty", self.path)
            return
        for device_id, stored in devices.items():
            device, problem = load_device(str(device_id), stored)
            if problem:
                # Said once, at start; the repaired entry is saved with the next reading.
                log.error(
                    "%s: device %r: %s; kept its total of %.3f kWh and goes on from there",
                    self.path,
                    device_id,
                    problem,
                    device.energy_kwh,
                )
                self.changed = True
            self.devices[device.device_id] = device


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{_shown(value)} is not a whole number")
    return value


def _finite(value: Any, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{_shown(value)} is not a number")
    try:
        finite = math.isfinite(value) and value >= low
    except OverflowError:
        finite = False
    if not finite:
        raise ValueError(f"{_shown(value)} is out of range")
    return float(value)


def load_boot(stored: Any) -> Boot:
    """A saved boot, every field checked. Raises ValueError."""
    if not isinstance(stored, dict):
        raise ValueError("a boot is not an object")
    if not isinstance(stored.get("boot_id"), str):
        raise ValueError("a boot has no boot_id")
    power = stored.get("power_watts")
    return Boot(
        boot_id=stored["boot_id"],
        imp_per_kwh=_finite(stored.get("imp_per_kwh"), low=1e-9),
        seq=_whole(stored.get("seq")),
        uptime_ms=_whole(stored.get("uptime_ms")),
        pulses=_whole(stored.get("pulses")),
        count_since_ms=_whole(stored.get("count_since_ms")),
        power_watts=None if power is None else _finite(power),
    )


def load_device(device_id: str, stored: Any) -> tuple[MeterDevice, str]:
    """A saved device, and what was wrong with it ("" when nothing).

    What is readable is kept; what is not is repaired so the device's total
    never falls below the last one sent (``last.energy_kwh``): an unreadable
    boot's energy is folded into ``retired_kwh`` and its id retired, so a late
    reading of it is not counted again.
    """
    device = MeterDevice(device_id)
    problems = [] if isinstance(stored, dict) else ["not an object"]
    if not isinstance(stored, dict):
        stored = {}
    last = stored.get("last", {})
    if not isinstance(last, dict):
        last = {}
        problems.append("last is not an object")
    device.last = dict(last)
    for key in ("received_at", "energy_kwh"):
        if key in device.last:
            try:
                _finite(device.last[key])
            except ValueError as exc:
                problems.append(f"last.{key}: {exc}")
                del device.last[key]
    retired = stored.get("retired_boot_ids", [])
    if isinstance(retired, list):
        device.retired_boot_ids = [boot_id for boot_id in retired if isinstance(boot_id, str)]
    else:
        problems.append("retired_boot_ids is not a list")
    try:
        device.retired_kwh = _finite(stored.get("retired_kwh", 0.0))
    except ValueError as exc:
        problems.append(f"retired_kwh: {exc}")
    try:
        device.energy_ts = _whole(stored.get("energy_ts", 0))
    except ValueError as exc:
        problems.append(f"energy_ts: {exc}")
    boots = stored.get("boots", [])
    if not isinstance(boots, list):
        boots = []
        problems.append("boots is not a list")
    for item in boots:
        try:
            device.add_boot(load_boot(item))
        except ValueError as exc:
            problems.append(f"boot: {exc}")
            boot_id = item.get("boot_id") if isinstance(item, dict) else None
            # The boot of the last reading is restored from it below.
            if isinstance(boot_id, str) and boot_id != device.last.get("boot_id"):
                device.retired_boot_ids.append(boot_id)
    del device.retired_boot_ids[:-RETIRED_BOOT_IDS_KEPT]
    _restore_last_boot(device)
    # What the unreadable parts held: never count less than was last sent.
    last_sent_kwh = device.last.get("energy_kwh", 0.0)
    if last_sent_kwh > device.energy_kwh + 1e-9:
        problems.append(f"its boots hold less than the {last_sent_kwh:.3f} kWh last sent")
        device.retired_kwh += last_sent_kwh - device.energy_kwh
    return device, "; ".join(problems)


def _restore_last_boot(device: MeterDevice) -> None:
    """The boot of the last accepted reading, from ``last``, when the boots
    were unreadable: its next readings then count from where it stood."""
    last = device.last
    boot_id = last.get("boot_id")
    if not isinstance(boot_id, str) or device.boot(boot_id) or boot_id in device.retired_boot_ids:
        return
    try:
        boot = load_boot(
            {
                "boot_id": boot_id,
                "imp_per_kwh": last.get("imp_per_kwh"),
                "seq": last.get("seq"),
                "uptime_ms": last.get("uptime_ms"),
                "pulses": last.get("pulses_total"),
                "count_since_ms": last.get("uptime_ms"),
            }
        )
    except ValueError:
        return
    device.add_boot(boot)


def _status(reading: MeterReading, applied: Applied, received_at: float) -> dict[str, Any]:
    figures = {
        "boot_id": reading.boot_id,
        "seq": reading.seq,
        "uptime_ms": reading.uptime_ms,
        "imp_per_kwh": reading.imp_per_kwh,
        "pulses_total": reading.pulses_total,
        "ts": reading.ts,
        "last_interval_ms": reading.last_interval_ms,
        "rssi": reading.rssi,
        "fw": reading.fw,
        "received_at": round(received_at, 3),
        "power_watts": None if applied.power_watts is None else round(applied.power_watts, 3),
        "energy_kwh": applied.energy_kwh,
    }
    return {name: value for name, value in figures.items() if value is not None}
