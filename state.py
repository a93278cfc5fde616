"""State kept across restarts: stable device names, energy counters, the lock.

Everything is written atomically (temporary file, fsync, rename), so a crash
or a power cut on the Pi leaves either the old file or the new one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from graphite_helper import format_device_name
from settings import ConfigError, check_device_names, one_line, usable_name

log = logging.getLogger("electricity.state")


# A disk that is full (or over quota) is a passing state, not a setting to fix.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def atomic_write_json(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON, never leaving a half-written file.

    Raises OSError when the disk refuses; the temporary file is removed then,
    so a full disk is not left fuller by a half-written copy.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            temporary.unlink()
        except OSError:
            pass
        raise


# Paths whose last write failed: said once until a write succeeds again.
_failing: dict[Path, str] = {}


def save_json(path: Path, data: Any, what: str, logger: logging.Logger | None = None) -> bool:
    """Write ``data`` to ``path`` atomically; False if the disk refused.

    A refusal (a full disk, a read-only one) is logged once, with ``what``
    (e.g. "device names"), and once more when a write succeeds again; the
    caller keeps ``data`` in memory and simply tries again later.
    """
    logger = logger or log
    try:
        atomic_write_json(path, data)
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        if _failing.get(path) != reason:
            logger.error(
                "cannot save %s to %s: %s; kept in memory, retried at each change",
                what,
                path,
                reason,
            )
        _failing[path] = reason
        return False
    if _failing.pop(path, None) is not None:
        logger.warning("%s saved to %s again", what, path)
    return True


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


def prepare_state_dir(path: Path) -> None:
    """Make ``path`` and check that files can be written in it.

    Raises ConfigError (a read-only disk, a file where the directory should
    be, no permission) so a collector stops with one line, not a traceback.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        # os.access proves little (root passes any chmod; a full inode table
        # is not a permission): only writing a file tells.
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            # Not a setting: start anyway (lines wait in memory, state files
            # are retried) rather than exit and be restarted every 10 s.
            log.error("%s: the disk is full; starting anyway, writing once space is back", path)
            return
        raise state_dir_error(path, exc) from None


def state_dir_error(path: Path, exc: OSError) -> ConfigError:
    """The one-line error for a state directory that cannot be used."""
    reason = exc.strerror or exc.__class__.__name__
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        reason = "a file is in the way of the directory"
    return ConfigError(f"STATE_DIR: cannot write in {path}: {reason}")


class NameMap:
    """Stable device id -> metric segment, so a rename in a phone app does not
    split a device's history.

    The name configured in DEVICE_NAMES wins; otherwise the first name seen
    for an id is kept. Two devices never share a segment: the second gets
    its id appended. Names read back from ``path`` (which people edit by
    hand) are cleaned like the names devices report; an entry that cannot be
    used is said once and corrected in the file.
    """

    def __init__(self, path: Path | None, overrides: Mapping[str, str] | None = None) -> None:
        self.path = path  # None: keep in memory only (dry runs)
        overrides = dict(overrides or {})
        check_device_names(overrides)
        self.overrides = {
            str(key).lower(): format_device_name(value, fallback=str(key))
            for key, value in overrides.items()
        }
        self._names: dict[str, str] = {}
        stored = read_json(path, {}) if path else {}
        if self._load(stored):
            self._save()
        self._yield_to_overrides()

    def _load(self, stored: Any) -> bool:
        """Take the usable entries of names.json; True if any was corrected."""
        if not isinstance(stored, dict):
            log.warning(
                "%s: not a JSON object of device id -> name; devices are named afresh", self.path
            )
            return False
        corrected = False
        for raw_key, raw_name in stored.items():
            key = raw_key.lower()
            name = usable_name(raw_name)
            if not name or key in self._names:
                why = (
                    "a second entry for that device"
                    if name
                    else f"{one_line(repr(raw_name), 60)} is not a name"
                )
                log.warning("%s: entry %r: %s; entry ignored", self.path, raw_key, why)
                corrected = True
                continue
            unique = self._unique(name, key)
            if unique != raw_name:
                log.warning(
                    "%s: entry %r: %r is not a usable metric name%s; using %r",
                    self.path,
                    raw_key,
                    raw_name,
                    " (another device has it)" if unique != name else "",
                    unique,
                )
                corrected = True
            self._names[key] = unique
        return corrected

    def _unique(self, name: str, key: str) -> str:
        """``name``, or ``name`` with ``key`` appended (then a number) if
        another device has it."""
        taken = {n for k, n in self._names.items() if k != key}
        taken.update(n for k, n in self.overrides.items() if k != key)
        candidate = name
        number = 1
        while candidate in taken:
            suffix = key if number == 1 else f"{key}_{number}"
            candidate = format_device_name(f"{name}_{suffix}")
            number += 1
        return candidate

    def _yield_to_overrides(self) -> None:
        """A name the user gives one device in DEVICE_NAMES is taken from any
        other device that had it, so two devices never write one path."""
        claimed = {name: key for key, name in self.overrides.items()}
        for key, name in list(self._names.items()):
            owner = claimed.get(name)
            if owner is not None and owner != key:
                renamed = self._unique(name, key)
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
        key = stable_id.lower()
        if key not in self.overrides:
            wanted = format_device_name(name, fallback=stable_id)
            self.overrides[key] = unique = self._unique(wanted, key)
            if unique != wanted:
                log.warning("%s: %r is another device's name: now %r", stable_id, wanted, unique)
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
        name = self._unique(format_device_name(reported_name, fallback=stable_id), key)
        self._names[key] = name
        log.info("device %s is named %r", stable_id, name)
        self._save()
        return name

    def _save(self) -> None:
        # Never write an empty map over a good one.
        if self.path is None or not self._names:
            return
        save_json(self.path, self._names, "device names")


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
            save_json(self.path, self._state, "energy state")


class StateLock:
    """One running collector per state directory: a second one would spool
    and rename on top of the first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held for the process lifetime)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        # The pid is for people; the lock is the flock. A full disk that
        # refuses the few bytes does not stop the collector.
        try:  # unbuffered: nothing left to fail again at close
            os.ftruncate(handle.fileno(), 0)
            os.write(handle.fileno(), f"{os.getpid()}\n".encode("ascii"))
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                handle.close()
                raise
            log.error("%s: the disk is full; the lock holds, without its pid", self.path)
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
