"""The MQTT rules engine: topic filters, payload decoding, rules and presets."""

from __future__ import annotations

import math

import pytest

from graphite_helper import format_device_name
from mqtt_rules import (
    MAX_PAYLOAD_BYTES,
    MISSING,
    PRESETS,
    PayloadError,
    Rule,
    RuleError,
    RuleTable,
    decode_json,
    decode_number,
    lookup,
    split_filter,
    to_number,
    topic_matches,
)
from simulators.glow import preset_samples


def matches(topic_filter: str, topic: str) -> bool:
    return topic_matches(split_filter(topic_filter), topic.split("/"))


# --- Topic filters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("tele/+/SENSOR", "tele/plug/SENSOR", True),
        ("tele/+/SENSOR", "tele/plug/STATE", False),
        ("tele/+/SENSOR", "tele/plug/SENSOR/extra", False),
        ("tele/+/SENSOR", "tele/SENSOR", False),
        ("glow/+/SENSOR/#", "glow/ABC/SENSOR/electricitymeter", True),
        ("glow/+/SENSOR/#", "glow/ABC/SENSOR", True),  # '#' includes the parent level
        ("glow/+/SENSOR/#", "glow/ABC/STATE", False),
        ("#", "anything/at/all", True),
        ("+/status/+", "shellyplus1pm-x/status/switch:0", True),
        ("+/+", "a/", True),  # an empty level is still a level
        ("#", "$SYS/broker/uptime", False),  # wildcards skip $ topics
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("emon/+/+", "emon/emontx4/P1", True),
        ("emon/+/+", "emonX/emontx4/P1", False),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a/+b/c", "a\0b", None])
def test_invalid_filters_are_refused(bad) -> None:
    with pytest.raises(RuleError):
        split_filter(bad)


# --- Payloads -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "value"),
    [(b"230.4", 230.4), (b" 12 \n", 12.0), (b"-0.5", -0.5), (b"1e3", 1000.0), (b".5", 0.5)],
)
def test_plain_numbers(payload: bytes, value: float) -> None:
    assert decode_number(payload) == value


@pytest.mark.parametrize(
    "payload",
    [
        b"nan",
        b"NaN",
        b"inf",
        b"-Infinity",
        b"1_000",
        b"",
        b"ON",
        b"12 W",
        b"0x1F",
        b"\xff\xfe\x00\x01",  # binary
        b"1" * (MAX_PAYLOAD_BYTES + 1),  # huge
        b"1e999",  # overflows to infinity
        b"1e300",  # finite but absurd
    ],
)
def test_bad_plain_numbers_are_refused(payload: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_number(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json at all",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1',
        b"\x80\x81binary",
        b'{"a": "\x00"}',
        b"[" * 100_000,  # nested beyond the parser's depth, within the size limit
        b'{"a": ' + b"9" * 5000 + b"}",  # beyond Python's int() limit
        b'{"a": -' + b"9" * 401 + b"}",  # more digits than any float holds
        b'{"a": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}',
    ],
)
def test_bad_json_is_refused(payload: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_json(payload)


def test_payload_errors_never_quote_the_payload() -> None:
    secretish = b'{"password": "hunter2", oops}'
    with pytest.raises(PayloadError) as caught:
        decode_json(secretish)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "number"),
    [(True, 1.0), (False, 0.0), (3, 3.0), (2.5, 2.5), ("230.1", 230.1), (" 7 ", 7.0)],
)
def test_to_number(value, number: float) -> None:
    assert to_number(value) == number


@pytest.mark.parametrize("value", [None, "abc", "nan", [1, 2], {"a": 1}, 10**400, math.inf, 1e16])
def test_to_number_refuses(value) -> None:
    with pytest.raises(PayloadError):
        to_number(value)


def test_lookup() -> None:
    document = {"ENERGY": {"Power": [10, 20], "Total": 1.5}, "a.b": 1}
    assert lookup(document, ("ENERGY", "Total")) == 1.5
    assert lookup(document, ("ENERGY", "Power", "1")) == 20
    assert lookup(document, ("ENERGY", "Power", "2")) is MISSING
    assert lookup(document, ("ENERGY", "Missing")) is MISSING
    assert lookup(document, ("ENERGY", "Total", "x")) is MISSING
    assert lookup([1], ("0",)) == 1


# --- Rules ------------------------------------------------------------------------


def test_rule_from_config() -> None:
    rule = Rule.from_dict(
        {
            "topic": "home/+/meter/+",
            "device": "{1}_{3}",
            "json": "a.b",
            "scale": 0.001,
            "metric": "energy_kwh",
        },
        "MQTT_RULES[0]",
    )
    assert rule.json_path == ("a", "b")
    assert rule.source == "mqtt"
    assert rule.name == "MQTT_RULES[0]"
    table = RuleTable([rule])
    extraction = table.extract("home/garage/meter/2", b'{"a": {"b": 1234.5}}')
    [value] = extraction.values
    assert (value.device_id, value.metric, value.value) == ("garage_2", "energy_kwh", 1.2345)


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("not a dict", "must be a dict"),
        ({"topic": "a/+", "device": 1}, "'metric' is missing"),
        ({"topic": "a/+", "device": 1, "metric": "x", "jsn": "a"}, "unknown keys ['jsn']"),
        ({"topic": "a/#/b", "device": 0, "metric": "x"}, "'#' must be a whole last level"),
        ({"topic": "a/+", "device": 2, "metric": "x"}, "names topic level 2"),
        ({"topic": "a/#", "device": 1, "metric": "x"}, "names topic level 1"),
        ({"topic": "a/+", "device": "fixed", "metric": "x"}, "at least one topic level"),
        ({"topic": "a/+", "device": 1, "metric": "x", "scale": "2"}, "'scale' must be a number"),
        ({"topic": "a/+", "device": 1, "metric": "x", "scale": 0}, "not 0"),
        ({"topic": "a/+", "device": 1, "metric": "x", "json": "a..b"}, "dotted path"),
        ({"topic": "a/+", "device": 1, "metric": "x", "source": "My Source"}, "one segment"),
        ({"topic": "a/+", "device": True, "metric": "x"}, "'device' must be"),
    ],
)
def test_bad_rules_are_refused_with_their_name(spec, complaint: str) -> None:
    with pytest.raises(RuleError) as caught:
        RuleTable.from_settings([], [spec])
    assert str(caught.value).startswith("MQTT_RULES[0]: ")
    assert complaint in str(caught.value)


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(RuleError, match="unknown preset 'tasmoto'"):
        RuleTable.from_settings(["tasmoto"], [])


def test_every_preset_is_valid() -> None:
    table = RuleTable.from_settings(list(PRESETS), [])
    assert table.names == list(PRESETS)
    assert len(table.subscriptions) == len(set(table.subscriptions))


@pytest.mark.parametrize("sample", preset_samples(), ids=lambda s: s.message.topic)
def test_preset_sample_gives_its_metrics(sample) -> None:
    """Each preset alone, on a real-format payload: exactly the expected figures."""
    table = RuleTable.from_settings([sample.preset], [])
    extraction = table.extract(sample.message.topic, sample.message.payload)
    assert extraction.problems == []
    got = {
        f"{v.rule.source}.{format_device_name(v.device_id)}.{v.metric}": v.value
        for v in extraction.values
    }
    assert got == pytest.approx(sample.expected)


def test_message_matched_by_a_rule_but_without_its_figures_gives_nothing() -> None:
    table = RuleTable.from_settings(["shelly_gen2"], [])
    extraction = table.extract(
        "shellyplus1pm-x/status/sys", b'{"mac": "A8032AB12345", "uptime": 5}'
    )
    assert extraction.rules
    assert not extraction.values
    assert not extraction.problems


def test_bad_figure_is_a_problem_and_the_good_ones_still_count() -> None:
    table = RuleTable.from_settings(["tasmota"], [])
    payload = b'{"ENERGY": {"Power": [10, 20], "Voltage": 230, "Total": "lots"}}'
    extraction = table.extract("tele/strip/SENSOR", payload)
    assert {v.metric: v.value for v in extraction.values} == {"voltage_volts": 230.0}
    assert len(extraction.problems) == 2
    assert any(problem.startswith("ENERGY.Power: ") for problem in extraction.problems)


def test_payload_is_decoded_once_per_kind() -> None:
    table = RuleTable.from_settings(["tasmota"], [])
    extraction = table.extract("tele/plug/SENSOR", b"not json")
    assert len(extraction.rules) == 6
    assert extraction.problems == ["not JSON (JSONDecodeError at char 0)"]


def test_metric_template_names_the_metric() -> None:
    table = RuleTable.from_settings(["esphome", "emonhub"], [])
    [value] = table.extract("esp-washer/sensor/Total Daily Energy/state", b"1.25").values
    assert (value.device_id, value.metric) == ("esp-washer", "total_daily_energy")
    [value] = table.extract("emon/emonpi/vrms", b"241.3").values
    assert (value.device_id, value.metric, value.value) == ("emonpi", "vrms", 241.3)
