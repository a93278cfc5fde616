"""MQTT rules: which topics carry which figures, and how to read them.

One rule turns one figure of one kind of message into one metric::

    {"topic": "tele/+/SENSOR", "device": 1, "json": "ENERGY.Power", "metric": "power_watts"}

``topic``
    An MQTT topic filter (``+`` one level, ``#`` the rest); it is also what
    the collector subscribes to.
``device``
    Which topic level (counted from 0) names the device, or a template of
    levels such as ``"{1}_relay_{3}"``. The rendered text is the device's
    stable id (a ``DEVICE_NAMES`` key); its metric segment is formatted from it.
``json``
    A dotted path into a JSON payload (``"aenergy.total"``; list items by
    index, ``"ENERGY.Power.0"``). Without it the payload is a plain number.
``scale``
    Multiplier to the metric's unit (Wh to kWh: 0.001). Default 1.
``metric``
    The metric name with its unit (``"power_watts"``), or a template of
    levels (``"{2}"``).
``source``
    The path segment after the prefix: ``<prefix>.<source>.<device>.<metric>``.
    Default ``"mqtt"``.
``name``
    What ``--discover`` and the logs call the rule. Default ``MQTT_RULES[i]``.

The built-in presets below are lists of such rules, switched on by name.
A value is sent only when it is a finite number (JSON booleans count as
0/1); a payload that is not UTF-8, not JSON, too large, or holds NaN or
infinity never becomes a line.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphite_helper import format_device_name

# Real payloads are a few hundred bytes (Glow, Tasmota) to a few KiB (Shelly).
MAX_PAYLOAD_BYTES = 65536
# Beyond this a float no longer holds whole numbers exactly: a garbled reading.
MAX_ABS_VALUE = 1e15
DEFAULT_SOURCE = "mqtt"

# A plain-number payload, the way devices print them: no "nan", "inf", "1_000".
_NUMBER = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_LEVEL_REFERENCE = re.compile(r"\{([0-9]+)\}")
_RULE_KEYS = {"topic", "device", "json", "scale", "metric", "source", "name"}


class RuleError(ValueError):
    """A rule in the configuration is wrong; the message says which and why."""


class PayloadError(ValueError):
    """A payload or value that must not become a line (the message never quotes it)."""


# --- Presets --------------------------------------------------------------------

PRESETS: dict[str, list[dict[str, Any]]] = {
    # Tasmota energy monitoring plugs: tele/<topic>/SENSOR every TelePeriod.
    "tasmota": [
        {"topic": "tele/+/SENSOR", "device": 1, "json": f"ENERGY.{key}", "metric": metric}
        for key, metric in (
            ("Power", "power_watts"),
            ("Voltage", "voltage_volts"),
            ("Current", "current_amps"),
            ("Factor", "power_factor"),
            ("Total", "energy_kwh"),
            ("Today", "energy_today_kwh"),
        )
    ],
    # Shelly Gen2/Gen3 (Plus, Pro): <prefix>/status/switch:N, one device per
    # channel. Other status topics (sys, wifi, input:N) hold none of these keys.
    "shelly_gen2": [
        {"topic": "+/status/+", "device": "{0}_{2}", "json": key, "metric": metric, "scale": scale}
        for key, metric, scale in (
            ("apower", "power_watts", 1),
            ("voltage", "voltage_volts", 1),
            ("current", "current_amps", 1),
            ("aenergy.total", "energy_kwh", 0.001),  # Wh
            ("output", "is_on", 1),
        )
    ],
    # Shelly Gen1: plain numbers per relay; energy in watt-minutes since the
    # device's last reboot.
    "shelly_gen1": [
        {"topic": "shellies/+/relay/+/power", "device": "{1}_relay_{3}", "metric": "power_watts"},
        {
            "topic": "shellies/+/relay/+/energy",
            "device": "{1}_relay_{3}",
            "metric": "energy_kwh",
            "scale": 1 / 60000,
        },
    ],
    # ESPHome: <node>/sensor/<sensor>/state, plain numbers; the metric is the
    # sensor's object id (name the sensors with their unit, e.g. power_watts).
    "esphome": [{"topic": "+/sensor/+/state", "device": 0, "metric": "{2}"}],
    # emonhub's MQTT interfacer: emon/<node>/<input>, plain numbers.
    "emonhub": [{"topic": "emon/+/+", "device": 1, "metric": "{2}"}],
}


# --- Topics -----------------------------------------------------------------------


def split_filter(topic_filter: str) -> tuple[str, ...]:
    """The levels of a valid MQTT topic filter. Raises RuleError."""
    if not isinstance(topic_filter, str) or not topic_filter:
        raise RuleError("topic must be a non-empty string")
    if "\0" in topic_filter:
        raise RuleError(f"topic {topic_filter!r} holds a NUL character")
    levels = tuple(topic_filter.split("/"))
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise RuleError(f"topic {topic_filter!r}: '#' must be a whole last level")
        if "+" in level and level != "+":
            raise RuleError(f"topic {topic_filter!r}: '+' must be a whole level")
    return levels


def topic_matches(filter_levels: Sequence[str], topic_levels: Sequence[str]) -> bool:
    """MQTT matching of a topic against a filter, both split into levels.

    Wildcards do not match topics starting with ``$`` (``$SYS``), as brokers do.
    """
    if topic_levels and topic_levels[0].startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for index, wanted in enumerate(filter_levels):
        if wanted == "#":
            return True  # also matches the parent level itself ("a/#" matches "a")
        if index >= len(topic_levels):
            return False
        if wanted != "+" and wanted != topic_levels[index]:
            return False
    return len(topic_levels) == len(filter_levels)


# Metric names repeat with every message: format each once.
metric_segment = functools.lru_cache(maxsize=4096)(format_device_name)


def render(template: str, topic_levels: Sequence[str]) -> str:
    """``"{1}_relay_{3}"`` with the topic's levels put in."""
    return _LEVEL_REFERENCE.sub(lambda match: topic_levels[int(match.group(1))], template)


# --- Payloads ---------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise PayloadError(f"{name} in JSON")


# More digits than any float holds: never made an int (Python refuses
# int() of over 4,300 digits, and the work grows with the square of them).
MAX_NUMBER_DIGITS = 400


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:
        raise PayloadError(f"a number of {len(text)} digits in JSON")
    return int(text)


def payload_text(payload: bytes) -> str:
    """The payload as text: UTF-8, not too large, no NUL. Raises PayloadError."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload of {len(payload)} bytes is too large")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("payload is not UTF-8 text") from None
    if "\0" in text:
        raise PayloadError("payload holds NUL characters")
    return text


def decode_json(payload: bytes) -> Any:
    """A JSON payload, NaN and Infinity refused. Raises PayloadError."""
    text = payload_text(payload)
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except RecursionError:
        raise PayloadError("JSON nested too deeply") from None
    except ValueError as exc:
        if isinstance(exc, PayloadError):
            raise
        where = getattr(exc, "pos", None)
        raise PayloadError(
            f"not JSON ({exc.__class__.__name__}{'' if where is None else f' at char {where}'})"
        ) from None


def decode_number(payload: bytes) -> float:
    """A plain-number payload ("230.4"). Raises PayloadError."""
    text = payload_text(payload).strip()
    if not _NUMBER.fullmatch(text):
        raise PayloadError("payload is not a plain number")
    return to_number(float(text))


def to_number(value: Any) -> float:
    """A JSON value as a finite float: numbers, booleans (0/1), numeric strings.

    Raises PayloadError for anything else, NaN, infinity or an absurd size.
    """
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    if not isinstance(value, (int, float)):
        raise PayloadError(f"value is a {type(value).__name__}, not a number")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer of hundreds of digits
        raise PayloadError("value is too large") from None
    if not math.isfinite(number):
        raise PayloadError("value is not finite")
    if abs(number) > MAX_ABS_VALUE:
        raise PayloadError("value is too large")
    return number


MISSING = object()  # what ``lookup`` returns for a path the document lacks


def lookup(document: Any, path: Sequence[str]) -> Any:
    """The value at a dotted path (already split), or ``MISSING``."""
    value = document
    for key in path:
        if isinstance(value, Mapping):
            value = value.get(key, MISSING)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return MISSING
        if value is MISSING:
            return MISSING
    return value


def tidy(number: float) -> float:
    """12 significant digits: 1234.5 Wh * 0.001 is 1.2345, not 1.2345000000000002."""
    return float(f"{number:.12g}")


# --- Rules ----------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One figure of one kind of message (see the module's docstring)."""

    name: str
    topic: str
    device: str
    metric: str
    json_path: tuple[str, ...] | None = None
    scale: float = 1.0
    source: str = DEFAULT_SOURCE
    levels: tuple[str, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", split_filter(self.topic))

    @classmethod
    def from_dict(cls, spec: Any, name: str) -> Rule:
        """A rule from its configuration dict. Raises RuleError naming ``name``."""
        try:
            return cls._from_dict(spec, name)
        except RuleError as exc:
            raise RuleError(f"{name}: {exc}") from None

    @classmethod
    def _from_dict(cls, spec: Any, name: str) -> Rule:
        if not isinstance(spec, Mapping):
            raise RuleError(f"must be a dict, got {type(spec).__name__}")
        unknown = set(spec) - _RULE_KEYS
        if unknown:
            raise RuleError(f"unknown keys {sorted(unknown)} (known: {sorted(_RULE_KEYS)})")
        for key in ("topic", "device", "metric"):
            if key not in spec:
                raise RuleError(f"'{key}' is missing")
        topic = spec["topic"]
        levels = split_filter(topic)
        # Levels a template may name: the fixed ones before any '#'.
        nameable = len(levels) - 1 if levels[-1] == "#" else len(levels)

        device = spec["device"]
        if isinstance(device, int) and not isinstance(device, bool):
            device = f"{{{device}}}"
        for key, template in (("device", device), ("metric", spec["metric"])):
            if not isinstance(template, str) or not template.strip():
                raise RuleError(f"'{key}' must be a level number or a non-empty template")
            for reference in _LEVEL_REFERENCE.findall(template):
                if int(reference) >= nameable:
                    raise RuleError(
                        f"'{key}' names topic level {reference}, but {topic!r} "
                        f"has levels 0 to {nameable - 1}"
                    )
        if not _LEVEL_REFERENCE.search(device):
            raise RuleError("'device' must name at least one topic level")

        json_path = spec.get("json")
        if json_path is not None:
            if not isinstance(json_path, str) or not all(json_path.split(".")):
                raise RuleError("'json' must be a dotted path such as 'ENERGY.Power'")
            json_path = tuple(json_path.split("."))

        scale = spec.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise RuleError("'scale' must be a number")
        if not math.isfinite(scale) or scale == 0:
            raise RuleError("'scale' must be finite and not 0")

        source = spec.get("source", DEFAULT_SOURCE)
        if not isinstance(source, str) or format_device_name(source, "") != source:
            raise RuleError("'source' must be one segment of [a-z0-9_]")
        return cls(
            name=str(spec.get("name") or name),
            topic=topic,
            device=device,
            metric=spec["metric"],
            json_path=json_path,
            scale=float(scale),
            source=source,
        )


@dataclass
class Value:
    """One figure read by one rule."""

    rule: Rule
    device_id: str  # the rendered device template: a stable id
    metric: str  # a metric segment
    value: float


@dataclass
class Extraction:
    """What the rules made of one message."""

    rules: list[Rule]  # every rule whose topic matched
    values: list[Value]
    problems: list[str]  # why figures were refused, for the debug log


class RuleTable:
    """The configured rules, matched against each message's topic."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)

    @classmethod
    def from_settings(cls, presets: Sequence[str], rules: Sequence[Any]) -> RuleTable:
        """Presets by name, then the user's own rules. Raises RuleError."""
        table: list[Rule] = []
        for preset in presets:
            if preset not in PRESETS:
                raise RuleError(
                    f"MQTT_PRESETS: unknown preset {preset!r} (known: {sorted(PRESETS)})"
                )
            table.extend(Rule.from_dict(spec, preset) for spec in PRESETS[preset])
        table.extend(Rule.from_dict(spec, f"MQTT_RULES[{i}]") for i, spec in enumerate(rules))
        return cls(table)

    @property
    def subscriptions(self) -> list[str]:
        """The distinct topic filters, in rule order."""
        return list(dict.fromkeys(rule.topic for rule in self.rules))

    @property
    def names(self) -> list[str]:
        """Distinct rule names: the sources ``--once`` waits for."""
        return list(dict.fromkeys(rule.name for rule in self.rules))

    def match(self, topic_levels: Sequence[str]) -> list[Rule]:
        return [rule for rule in self.rules if topic_matches(rule.levels, topic_levels)]

    def extract(self, topic: str, payload: bytes) -> Extraction:
        """Apply every matching rule to one message; the payload is decoded once."""
        levels = topic.split("/")
        matched = self.match(levels)
        result = Extraction(matched, [], [])
        decoded: dict[str, Any] = {}  # "json" / "number" -> document, or the PayloadError
        for rule in matched:
            kind = "number" if rule.json_path is None else "json"
            if kind not in decoded:
                try:
                    decoded[kind] = (
                        decode_number(payload) if kind == "number" else decode_json(payload)
                    )
                except PayloadError as exc:
                    decoded[kind] = exc
            document = decoded[kind]
            if isinstance(document, PayloadError):
                if str(document) not in result.problems:
                    result.problems.append(str(document))
                continue
            raw = document if rule.json_path is None else lookup(document, rule.json_path)
            if raw is MISSING:
                continue  # another kind of message on the same topic filter
            try:
                number = to_number(raw)
                if rule.scale != 1:
                    number = to_number(tidy(number * rule.scale))
            except PayloadError as exc:
                where = ".".join(rule.json_path or ()) or "payload"
                result.problems.append(f"{where}: {exc}")
                continue
            result.values.append(
                Value(
                    rule=rule,
                    device_id=render(rule.device, levels),
                    metric=metric_segment(render(rule.metric, levels)),
                    value=number,
                )
            )
        return result
