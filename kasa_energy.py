"""A lifetime kWh total for smart (KLAP) plugs, built from their own counters.

Legacy Kasa plugs report a lifetime total; the smart protocol's plugs (Tapo
P110/P115, Kasa KP125M, ...) report only ``today_energy`` and
``month_energy`` (Wh), which reset at the device's local midnight and at the
start of each month, with the device's ``local_time``. python-kasa
therefore gives them no ``consumption_total``. ``energy_kwh`` must never
go down and never be a day's or a month's figure, so it is built here:

    energy_kwh = base_kwh + today_kwh

``base_kwh`` is the energy of the days before today (from the first day
this collector saw the plug: it starts at the month's energy before
today). When the device's date moves on, ``base_kwh`` grows by what the
device counted between the two readings' days, which the month counter
tells exactly: ``(month - today)`` is the month's energy before today, so
``(month - today) now - (month - today) then`` is yesterday's full energy
(and any day in between), including what was used after the last poll.
A new month, or a device without a month counter, adds the last figure
seen for the old day. A counter that goes down on the same day (a reset of
the device or of its statistics), or a date that goes back (its clock was
reset), is a device reset: what was counted stays in ``base_kwh`` and
counting starts again from the new figure.

The state is one JSON file, written atomically when ``base_kwh`` changes
and otherwise at most every ``SAVE_INTERVAL_S``: a restart loses nothing
within a month, since the month counter covers the gap.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from state import read_json, save_json

log = logging.getLogger("electricity.kasa")  # not "kasa": python-kasa's own

#: How often unchanged-base state is written (seconds): SD cards wear.
SAVE_INTERVAL_S = 600.0


@dataclass
class DayCounters:
    """What a plug's counters said at one reading; ``base_kwh`` is ours."""

    day: str  # the device's local date, YYYY-MM-DD
    today_kwh: float
    month_kwh: float | None
    base_kwh: float


def _earlier_this_month(counters: DayCounters) -> float | None:
    if counters.month_kwh is None:
        return None
    return counters.month_kwh - counters.today_kwh


def next_counters(
    last: DayCounters | None, day: str, today_kwh: float, month_kwh: float | None
) -> tuple[DayCounters, str]:
    """The counters after one reading, and what happened ("" or a reason)."""
    if last is None:
        earlier = 0.0 if month_kwh is None else max(0.0, month_kwh - today_kwh)
        return DayCounters(day, today_kwh, month_kwh, earlier), "first reading"
    base = last.base_kwh
    if day == last.day:
        reset = today_kwh < last.today_kwh or (
            month_kwh is not None and last.month_kwh is not None and month_kwh < last.month_kwh
        )
        if reset:
            return DayCounters(day, today_kwh, month_kwh, base + last.today_kwh), "device reset"
        return DayCounters(day, today_kwh, month_kwh, base), ""
    if day < last.day:
        return DayCounters(day, today_kwh, month_kwh, base + last.today_kwh), "clock went back"
    # A new day: yesterday's energy, all of it if the month counter says so.
    gained = last.today_kwh
    before_now = None if month_kwh is None else month_kwh - today_kwh
    before_then = _earlier_this_month(last)
    if day[:7] == last.day[:7] and before_now is not None and before_then is not None:
        gained = max(gained, before_now - before_then)
    elif day[:7] != last.day[:7] and before_now is not None:
        gained += max(0.0, before_now)  # days of the new month not seen
    return DayCounters(day, today_kwh, month_kwh, base + gained), "new day"


class SmartEnergyTotals:
    """``energy_kwh`` per smart plug (or outlet), kept across restarts."""

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: in memory only (dry runs)
        self._counters: dict[str, DayCounters] = {}
        self._dirty = False
        self._saved_at = -math.inf
        stored = read_json(path, {}) if path else {}
        for key, value in (stored if isinstance(stored, dict) else {}).items():
            counters = _parse(value)
            if counters is None:
                log.error("%s: ignoring bad energy state for %s", path, key)
                continue
            self._counters[str(key)] = counters

    def total_kwh(
        self, stable_id: str, day: str, today_kwh: float, month_kwh: float | None
    ) -> float:
        """The lifetime total after this reading of ``stable_id``."""
        last = self._counters.get(stable_id)
        counters, event = next_counters(last, day, today_kwh, month_kwh)
        if event in ("device reset", "clock went back"):
            log.info("%s: energy counter %s; the total carries on", stable_id, event)
        if last is None or counters.base_kwh != last.base_kwh:
            self._saved_at = -math.inf  # save at the end of this cycle
        self._counters[stable_id] = counters
        self._dirty = True
        return counters.base_kwh + counters.today_kwh

    def save(self, force: bool = False) -> None:
        """Write the state if it changed (bases at once, counters every
        ``SAVE_INTERVAL_S``)."""
        if self.path is None or not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._saved_at < SAVE_INTERVAL_S:
            return
        data = {k: asdict(v) for k, v in self._counters.items()}
        if not save_json(self.path, data, "smart plug energy totals", log):
            return
        self._dirty = False
        self._saved_at = now


def _parse(value: Any) -> DayCounters | None:
    if not isinstance(value, dict):
        return None
    day, today, month, base = (value.get(k) for k in ("day", "today_kwh", "month_kwh", "base_kwh"))
    numbers = [today, base] + ([] if month is None else [month])
    if not isinstance(day, str) or len(day) != 10 or today is None or base is None:
        return None
    if not all(
        isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) and n >= 0
        for n in numbers
    ):
        return None
    return DayCounters(day, float(today), None if month is None else float(month), float(base))
