"""State kept across restarts: stable device names, energy counters, the lock.

Everything is written atomically (temporary file, fsync, rename), so a crash
or a power cut on the Pi leaves either the old file or the new one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphite_helper import format_device_name

log = logging.getLogger("state")


def atomic_write_json(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON, never leaving a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_json(path: Path, default: Any) -> Any:
    """The JSON in ``path``, or ``default`` if missing or unreadable (logged)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        log.error("cannot read %s (%s); starting from empty", path, exc)
        return default


class NameMap:
    """Stable device id -> metric segment, so a rename in a phone app does not
    split a device's history.

    The name configured in DEVICE_NAMES wins; otherwise the first name seen
    for an id is kept. Two devices never share a segment: the second gets
    its id appended.
    """

    def __init__(self, path: Path | None, overrides: Mapping[str, str] | None = None) -> None:
        self.path = path  # None: keep in memory only (dry runs)
        self.overrides = {
            str(key).lower(): format_device_name(value, fallback=str(key))
            for key, value in (overrides or {}).items()
        }
        stored = read_json(path, {}) if path else {}
        self._names: dict[str, str] = stored if isinstance(stored, dict) else {}
        self._yield_to_overrides()

    def _yield_to_overrides(self) -> None:
        """A name the user gives one device in DEVICE_NAMES is taken from any
        other device that had it, so two devices never write one path."""
        claimed = {name: key for key, name in self.overrides.items()}
        for key, name in list(self._names.items()):
            owner = claimed.get(name)
            if owner is not None and owner != key:
                renamed = format_device_name(f"{name}_{key}")
                log.warning(
                    "device %s was named %r, which DEVICE_NAMES gives %s: now %r",
                    key,
                    name,
                    owner,
                    renamed,
                )
                self._names[key] = renamed
                self._save()

    def pin(self, stable_id: str, name: str) -> None:
        """Name ``stable_id`` as configured elsewhere (e.g. a circuit's own
        name), unless DEVICE_NAMES already names it."""
        self.overrides.setdefault(stable_id.lower(), format_device_name(name, fallback=stable_id))
        self._yield_to_overrides()

    def name_for(self, stable_id: str, reported_name: str = "") -> str:
        """The segment for ``stable_id``; remembers it the first time."""
        key = stable_id.lower()
        override = self.overrides.get(key)
        if override:
            return override
        known = self._names.get(key)
        if known:
            return known
        name = format_device_name(reported_name, fallback=stable_id)
        taken = set(self._names.values()) | set(self.overrides.values())
        if name in taken:
            name = format_device_name(f"{name}_{stable_id}")
        self._names[key] = name
        log.info("device %s is named %r", stable_id, name)
        self._save()
        return name

    def _save(self) -> None:
        # Never write an empty map over a good one.
        if self.path is None or not self._names:
            return
        try:
            atomic_write_json(self.path, self._names)
        except OSError as exc:
            log.error("cannot save device names to %s: %s", self.path, exc)


class EnergyIntegrator:
    """Cumulative kWh from power samples, for devices without a counter.

    Trapezoids between consecutive samples; a gap longer than ``max_gap_s``
    is not bridged (the device was off-line: guessing would invent energy).
    The totals persist in ``path`` across restarts.
    """

    def __init__(self, path: Path | None, max_gap_s: float) -> None:
        self.path = path
        self.max_gap_s = max_gap_s
        stored = read_json(path, {}) if path else {}
        self._state: dict[str, dict[str, float]] = stored if isinstance(stored, dict) else {}

    def add(self, device_id: str, timestamp: float, power_watts: float) -> float:
        """Record a sample; returns the device's cumulative kWh."""
        if not math.isfinite(power_watts):
            raise ValueError(f"power {power_watts!r} is not finite")
        state = self._state.get(device_id)
        if state is None:
            state = {"energy_kwh": 0.0, "timestamp": timestamp, "power_watts": power_watts}
            self._state[device_id] = state
            return 0.0
        elapsed_s = timestamp - state["timestamp"]
        if elapsed_s <= 0:
            return state["energy_kwh"]  # a repeat or out-of-order sample adds nothing
        if elapsed_s <= self.max_gap_s:
            mean_watts = (state["power_watts"] + power_watts) / 2
            state["energy_kwh"] += max(mean_watts, 0.0) * elapsed_s / 3_600_000
        state["timestamp"], state["power_watts"] = timestamp, power_watts
        return state["energy_kwh"]

    def total_kwh(self, device_id: str) -> float | None:
        state = self._state.get(device_id)
        return None if state is None else state["energy_kwh"]

    def save(self) -> None:
        if self.path is not None and self._state:
            try:
                atomic_write_json(self.path, self._state)
            except OSError as exc:
                log.error("cannot save energy state to %s: %s", self.path, exc)


class StateLock:
    """One running collector per state directory: a second one would spool
    and rename on top of the first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held for the process lifetime)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
