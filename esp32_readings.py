"""The ESP32's POST body: every field checked before anything is counted.

A reading is ``{device_id, boot_id, seq, uptime_ms, ts?, imp_per_kwh,
pulses_total, last_interval_ms?, rssi?, fw?}``, alone or in
``{"readings": [...]}``. A body the contract does not allow is a
``BadReading`` naming the field (the receiver answers 400 with it): numbers
beyond any float, meter constants no meter has, identifiers that could not be
metric names. docs/esp32.md has the contract.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from esp32_accounting import MeterReading

MAX_READINGS_PER_BODY = 1000
# Whole numbers below 2**53 come through any JSON parser exactly.
MAX_COUNT = 2**53
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
# Real LED meters flash 100 to 100,000 times per kWh; outside that a reading
# is garbage (1e-300 imp/kWh would make 1e300 kWh of one pulse).
MIN_IMP_PER_KWH = 100
MAX_IMP_PER_KWH = 100_000
# More digits than any float holds (about 1.8e308): refused as a number, and
# never turned into an int (Python limits int() to 4,300 digits).
MAX_NUMBER_DIGITS = 310


# --- The body: check every field ---------------------------------------------


class BadReading(ValueError):
    """A body the contract does not allow; ``field`` names what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


class HugeNumber:
    """A JSON number with more digits than any float holds; the field that
    holds it is refused by name."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"a number of {self.digits} digits"


def _parse_int(text: str) -> int | HugeNumber:
    return HugeNumber(len(text)) if len(text) > MAX_NUMBER_DIGITS else int(text)


def _parse_float(text: str) -> float | HugeNumber:
    return HugeNumber(len(text)) if len(text) > MAX_NUMBER_DIGITS else float(text)


def parse_body(body: bytes) -> list[MeterReading]:
    """The readings in a POST body: one reading or {"readings": [...]}.

    Raises BadReading naming the first bad field; nothing is accepted from a
    body with any bad reading (the firmware then drops it, and the next
    reading's cumulative count carries its energy).
    """
    try:
        payload = json.loads(
            body.decode("utf-8"),
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except UnicodeDecodeError:
        raise BadReading("body", "not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise BadReading("body", f"not JSON ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict):
        raise BadReading("body", "must be a JSON object")
    if "readings" not in payload:
        return [parse_reading(payload, "")]
    items = payload["readings"]
    if not isinstance(items, list) or not items:
        raise BadReading("readings", "must be a non-empty list")
    if len(items) > MAX_READINGS_PER_BODY:
        raise BadReading("readings", f"more than {MAX_READINGS_PER_BODY} readings")
    return [parse_reading(item, f"readings[{index}].") for index, item in enumerate(items)]


def parse_reading(item: Any, where: str = "") -> MeterReading:
    """One reading; ``where`` prefixes field names (``readings[3].``)."""
    if not isinstance(item, dict):
        raise BadReading(where.rstrip(".") or "body", "must be a JSON object")

    def required(name: str) -> Any:
        if item.get(name) is None:
            raise BadReading(where + name, "missing")
        return item[name]

    return MeterReading(
        device_id=_identifier(where + "device_id", required("device_id")),
        boot_id=_identifier(where + "boot_id", required("boot_id")),
        seq=_count(where + "seq", required("seq")),
        uptime_ms=_count(where + "uptime_ms", required("uptime_ms")),
        imp_per_kwh=_number(
            where + "imp_per_kwh",
            required("imp_per_kwh"),
            MIN_IMP_PER_KWH,
            MAX_IMP_PER_KWH,
            low_open=False,
        ),
        pulses_total=_count(where + "pulses_total", required("pulses_total")),
        ts=_optional(item, "ts", where, lambda f, v: _number(f, v, 0, math.inf, low_open=False)),
        last_interval_ms=_optional(
            item, "last_interval_ms", where, lambda f, v: _number(f, v, 0, MAX_COUNT)
        ),
        rssi=_optional(item, "rssi", where, lambda f, v: _number(f, v, -200, 50, low_open=False)),
        fw=_optional(item, "fw", where, _firmware),
    )


def _optional(item: dict, name: str, where: str, check: Any) -> Any:
    value = item.get(name)
    return None if value is None else check(where + name, value)


def _identifier(field: str, value: Any) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise BadReading(field, f"must be 1 to 64 of A-Z a-z 0-9 . _ : - , got {shown(value)}")
    return value


def _is_finite_number(value: Any) -> bool:
    """An int or float that a float holds and that is not NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _count(field: str, value: Any) -> int:
    """A whole number 0 <= n < 2**53 (an integral float such as 12.0 passes)."""
    if not _is_finite_number(value) or value != int(value):
        raise BadReading(field, f"must be a whole number, got {shown(value)}")
    if not 0 <= value < MAX_COUNT:
        raise BadReading(field, f"must be from 0 to 2**53, got {shown(value)}")
    return int(value)


def _number(field: str, value: Any, low: float, high: float, low_open: bool = True) -> float:
    """A finite number in (low, high] (or [low, high] when not ``low_open``)."""
    if not _is_finite_number(value):
        raise BadReading(field, f"must be a number, got {shown(value)}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise BadReading(field, f"must be in {bracket}{low:g}, {high:g}], got {shown(value)}")
    return value


def _firmware(field: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64 or not value.isprintable():
        raise BadReading(field, f"must be printable text up to 64 characters, got {shown(value)}")
    return value
