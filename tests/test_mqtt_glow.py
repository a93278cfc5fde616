"""Glow extraction and the message handler, on the recorded Glow session (no broker)."""

from __future__ import annotations

import calendar
import time
from pathlib import Path

import pytest

from mqtt_glow import (
    GLOW_RESET_READINGS,
    RegisterGuard,
    glow_timestamp,
    parse_glow_electricity,
    parse_glow_gas,
    parse_glow_state,
    sample_time,
)
from mqtt_rules import PayloadError, RuleTable, decode_json
from mqtt_to_graphite import MAX_DEVICES, MessageHandler
from runtime import Runtime
from settings import ConfigError, load_settings
from simulators.glow import SimulatedGlow, load_session, preset_samples, retime


def at(clock: str) -> int:
    """Unix seconds of 2026-11-20 <clock> UTC, the day of the recorded session."""
    return calendar.timegm(time.strptime(f"2026-11-20T{clock}Z", "%Y-%m-%dT%H:%M:%SZ"))


@pytest.fixture
def session(fixtures_dir: Path) -> list:
    return load_session(fixtures_dir / "glow" / "glow_session.jsonl")


def make_handler(tmp_path: Path | None = None, dry_run: bool = True, **overrides) -> MessageHandler:
    settings = load_settings(
        env={"ELECTRICITY_STATE_DIR": str(tmp_path or "/nonexistent")},
        local_path="/nonexistent/config_local.py",
        overrides=overrides,
    )
    runtime = Runtime("mqtt", settings, dry_run=dry_run)
    rules = RuleTable.from_settings(settings.mqtt_presets, settings.mqtt_rules)
    return MessageHandler(runtime, rules)


def parsed_lines(lines: list[str]) -> dict[str, tuple[float, int]]:
    out = {}
    for line in lines:
        path, value, timestamp = line.split()
        out[path] = (float(value), int(timestamp))
    return out


# --- Pure extraction ----------------------------------------------------------------


def test_glow_timestamp() -> None:
    assert glow_timestamp("2026-11-20T18:00:06Z") == at("18:00:06")
    assert glow_timestamp("2026-11-20T18:00:06") == at("18:00:06")  # naive means UTC
    assert glow_timestamp("2026-11-20T19:00:06+01:00") == at("18:00:06")
    assert glow_timestamp("yesterday") is None
    assert glow_timestamp(1795716006) is None


def test_sample_time_prefers_the_meter_clock_when_plausible() -> None:
    received = at("18:00:10")
    assert sample_time(at("18:00:06"), received) == at("18:00:06")
    assert sample_time(None, received) == received
    assert sample_time(received + 3600, received) == received  # display clock far ahead
    assert sample_time(0, received) == received  # clock not set yet


def test_electricity_message(session) -> None:
    reading = parse_glow_electricity(decode_json(session[1].payload))
    assert reading.timestamp == at("18:00:06")
    assert reading.values == {"power_kw": 0.951, "power_watts": 951.0}
    assert not reading.power_invalid
    imported, exported = reading.registers
    assert (imported.metric, imported.cumulative) == ("energy_import_kwh", 6613.405)
    assert imported.companions == {"energy_today_kwh": 7.211}
    assert (exported.metric, exported.cumulative) == ("energy_export_kwh", 0.0)


def test_invalid_power_marker(session) -> None:
    reading = parse_glow_electricity(decode_json(session[3].payload))
    assert reading.power_invalid
    assert "power_watts" not in reading.values
    assert "power_kw" not in reading.values


def test_export_gives_negative_power(session) -> None:
    reading = parse_glow_electricity(decode_json(session[5].payload))
    assert reading.values == {"power_kw": -0.412, "power_watts": -412.0}
    assert reading.registers[1].cumulative == 12.004


def test_gas_message(session) -> None:
    reading = parse_glow_gas(decode_json(session[6].payload))
    assert reading.timestamp == at("18:00:50")
    assert {r.metric: r.cumulative for r in reading.registers} == {
        "energy_kwh": 10234.112,
        "volume_m3": 912.431,
    }
    assert reading.registers[0].companions == {"energy_today_kwh": 9.1}


def test_state_message(session) -> None:
    reading = parse_glow_state(decode_json(session[0].payload))
    assert reading.timestamp == at("18:00:02")
    assert reading.values == {"han_rssi_dbm": -74.0, "han_lqi": 160.0, "han_joined": 1.0}


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"electricitymeter": "x"},
        {"electricitymeter": {"power": {"value": "lots"}}},
        {"electricitymeter": {"power": {"value": None}}},
        [1, 2],
    ],
)
def test_malformed_electricity_is_refused(document) -> None:
    with pytest.raises(PayloadError, match=r"."):
        parse_glow_electricity(document)


# --- Registers: zeros and falls are glitches -------------------------------------


def test_register_guard(tmp_path: Path) -> None:
    guard = RegisterGuard(tmp_path / "registers.json")
    assert guard.check("m/import", 0.0) == "unused"  # never read more: export without solar
    assert guard.check("m/import", -3.0) == "unused"
    assert guard.check("m/import", 100.0) == "ok"
    assert guard.check("m/import", 0.0) == "glitch"
    assert guard.check("m/import", -3.0) == "glitch"
    assert guard.check("m/import", 99.0) == "glitch"
    assert guard.check("m/import", 100.5) == "ok"
    guard.save()
    # Remembered across a restart: a fall straight after it is still a glitch.
    again = RegisterGuard(tmp_path / "registers.json")
    assert again.check("m/import", 50.0) == "glitch"
    assert again.check("m/import", 100.5) == "ok"


def test_a_fall_that_stays_is_a_new_meter() -> None:
    guard = RegisterGuard(None)
    assert guard.check("m/import", 6000.0) == "ok"
    verdicts = [guard.check("m/import", 1.0 + i / 100) for i in range(GLOW_RESET_READINGS)]
    assert verdicts == ["glitch"] * (GLOW_RESET_READINGS - 1) + ["ok"]
    assert guard.check("m/import", 1.2) == "ok"


def test_scattered_low_glitches_never_become_a_new_meter() -> None:
    guard = RegisterGuard(None)
    guard.check("m/import", 6000.0)
    for i in range(3 * GLOW_RESET_READINGS):
        # Falling readings that do not form one rising series stay glitches.
        assert guard.check("m/import", 500.0 - i) == "glitch"


# --- The handler on the recorded session -----------------------------------------


def test_recorded_session_gives_the_right_lines(session) -> None:
    handler = make_handler()
    lines: list[str] = []
    statuses = []
    for message in session:
        outcome = handler.handle(message.topic, message.payload, False, at("18:01:00"))
        lines += outcome.lines
        statuses.append(outcome.status)
    assert statuses == ["ok"] * 7 + ["invalid"]
    electricity = "home.electricity.glow.1a2b3c4d5e6f."
    by_time: dict[str, dict[int, float]] = {}
    for line in lines:
        path, value, timestamp = line.split()
        by_time.setdefault(path, {})[int(timestamp)] = float(value)
    assert by_time[electricity + "power_watts"] == {
        at("18:00:06"): 951,
        at("18:00:16"): 2314,
        at("18:00:36"): 2298,  # 18:00:26 read -8388.608 kW: no reading
        at("18:00:46"): -412,
    }
    assert by_time[electricity + "power_kw"][at("18:00:16")] == 2.314
    assert by_time[electricity + "energy_import_kwh"] == {
        at("18:00:06"): 6613.405,
        at("18:00:16"): 6613.411,
        at("18:00:26"): 6613.418,
        at("18:00:46"): 6613.425,  # 18:00:36 read 0: a glitch
    }
    assert by_time[electricity + "energy_today_kwh"] == {
        at("18:00:06"): 7.211,
        at("18:00:16"): 7.217,
        at("18:00:26"): 7.224,
        at("18:00:46"): 7.231,  # the glitched message's day reading goes with its register
    }
    assert by_time[electricity + "energy_export_kwh"] == {at("18:00:46"): 12.004}
    gas = "home.gas.glow.1a2b3c4d5e6f."
    assert by_time[gas + "energy_kwh"] == {at("18:00:50"): 10234.112}
    assert by_time[gas + "volume_m3"] == {at("18:00:50"): 912.431}
    assert by_time[gas + "energy_today_kwh"] == {at("18:00:50"): 9.1}
    health = "home.electricity.health.mqtt.glow.1a2b3c4d5e6f."
    assert by_time[health + "han_rssi_dbm"] == {at("18:00:02"): -74}
    assert by_time[health + "han_lqi"] == {at("18:00:02"): 160}
    assert by_time[health + "han_joined"] == {at("18:00:02"): 1}
    assert len(by_time) == 3 + 5 + 3  # health, electricity, gas
    assert handler.counts == {
        "messages_ok": 7,
        "messages_invalid": 1,
        "messages_ignored": 0,
        "glow_power_invalid": 1,
        "glow_register_glitches": 1,
    }


def test_health_lines_carry_the_counters(session) -> None:
    handler = make_handler()
    for message in session:
        handler.handle(message.topic, message.payload, False, at("18:01:00"))
    got = parsed_lines(handler.health_lines(at("18:01:00"), connected=1))
    prefix = "home.electricity.health.mqtt."
    assert got[prefix + "messages_ok"][0] == 7
    assert got[prefix + "messages_invalid"][0] == 1
    assert got[prefix + "glow_power_invalid"][0] == 1
    assert got[prefix + "glow_register_glitches"][0] == 1
    assert got[prefix + "devices_ok"][0] == 1
    assert got[prefix + "connected"][0] == 1


def test_glow_prefix_is_configurable_and_gas_prefix_too() -> None:
    handler = make_handler(MQTT_GLOW_PREFIX="home/glow", MQTT_GAS_PREFIX="house.gas")
    assert handler.subscriptions == ["home/glow/+/SENSOR/#", "home/glow/+/STATE"]
    glow = SimulatedGlow(prefix="home/glow", glow_id="ABCDEF")
    lines = []
    for message in glow.step(10):
        lines += handler.handle(message.topic, message.payload, False, glow.clock).lines
    paths = {line.split()[0] for line in lines}
    assert "home.electricity.glow.abcdef.power_watts" in paths
    assert "house.gas.glow.abcdef.volume_m3" in paths


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("MQTT_GLOW_PREFIX", "glow/+"),
        ("MQTT_GLOW_PREFIX", "glow//x"),
        ("MQTT_GAS_PREFIX", "Home Gas"),
    ],
)
def test_bad_prefixes_are_config_errors(setting: str, value: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        make_handler(**{setting: value})


def test_simulated_glitches_are_dropped() -> None:
    handler = make_handler()
    glow = SimulatedGlow(gas=False)
    glow.power_kw = 3.0
    for kind in ("invalid_power", "zero_register"):
        handler.handle(*glow.step(10)[0][:2], False, glow.clock)
        glow.glitch_next(kind)
        lines = handler.handle(*glow.step(10)[0][:2], False, glow.clock).lines
        metrics = {line.split()[0].rsplit(".", 1)[1] for line in lines}
        dropped = {"power_watts", "power_kw"} if kind == "invalid_power" else {"energy_import_kwh"}
        assert not metrics & dropped
    assert handler.counts["glow_power_invalid"] == 1
    assert handler.counts["glow_register_glitches"] == 1


def test_retained_rule_messages_are_ignored_but_glow_ones_are_read() -> None:
    handler = make_handler(MQTT_PRESETS=["tasmota"])
    tasmota = preset_samples()[0].message
    assert handler.handle(tasmota.topic, tasmota.payload, True, time.time()).status == "ignored"
    state = SimulatedGlow().state()
    assert handler.handle(state.topic, state.payload, True, time.time()).status == "ok"


@pytest.mark.parametrize(
    "payload",
    [b"not json", b'{"ENERGY": {"Power": NaN}}', b'{"ENERGY": {"Power": 1e999}}', b"\xff" * 10],
)
def test_bad_payloads_never_become_lines(payload: bytes) -> None:
    handler = make_handler(MQTT_PRESETS=["tasmota"])
    for topic in ("tele/plug/SENSOR", "glow/ABC/SENSOR/electricitymeter"):
        outcome = handler.handle(topic, payload, False, time.time())
        assert (outcome.status, outcome.lines) == ("invalid", [])
    assert handler.counts["messages_invalid"] == 2


def test_unmatched_topics_are_ignored() -> None:
    handler = make_handler()
    assert (
        handler.handle("glow/ABC/SENSOR/heatmeter", b"{}", False, time.time()).status == "ignored"
    )
    assert handler.handle("other/topic", b"1", False, time.time()).status == "ignored"
    assert handler.counts["messages_ignored"] == 2


def test_device_names_override_and_persist(tmp_path: Path) -> None:
    handler = make_handler(tmp_path, dry_run=False, DEVICE_NAMES={"1A2B3C4D5E6F": "Smart meter"})
    glow = SimulatedGlow()
    message = glow.step(10)[0]
    [line, *_] = handler.handle(message.topic, message.payload, False, glow.clock).lines
    assert line.startswith("home.electricity.glow.smart_meter.")


def test_retime_moves_timestamps_and_keeps_values(session) -> None:
    moved = retime(session, end=at("18:00:50") + 1000)
    assert moved[-1] == session[-1]  # not JSON: untouched
    before = parse_glow_electricity(decode_json(session[1].payload))
    after = parse_glow_electricity(decode_json(moved[1].payload))
    assert after.timestamp == before.timestamp + 1000
    assert after.values == before.values


def test_devices_are_capped(caplog) -> None:
    """A rule naming its device from a level that keeps changing cannot grow the names for ever."""
    handler = make_handler(
        MQTT_RULES=[{"topic": "counter/+/power", "device": 1, "metric": "power_watts"}]
    )
    statuses = [
        handler.handle(f"counter/{i}/power", b"5", False, time.time()).status
        for i in range(MAX_DEVICES + 3)
    ]
    assert statuses == ["ok"] * MAX_DEVICES + ["ignored"] * 3
    assert handler.handle("counter/0/power", b"5", False, time.time()).status == "ok"
    assert caplog.text.count("more than 500 devices") == 1


def test_devices_in_other_scripts_get_distinct_stable_names(tmp_path: Path) -> None:
    topics = ["tele/кухня/SENSOR", "tele/спальня/SENSOR", "tele/台所/SENSOR", "tele/居間/SENSOR"]
    payload = b'{"ENERGY": {"Power": 5}}'

    def segments() -> list[str]:
        handler = make_handler(tmp_path, dry_run=False, MQTT_PRESETS=["tasmota"])
        found = []
        for topic in topics:
            [line] = handler.handle(topic, payload, False, time.time()).lines
            found.append(line.split(".")[3])
        return found

    first = segments()
    assert first[:2] == ["kukhnia", "spalnia"]
    assert len(set(first)) == 4
    assert "unknown" not in first
    assert segments() == first  # the same after a restart


def test_device_ids_that_name_alike_never_share_a_series(tmp_path: Path, caplog) -> None:
    payload = b'{"ENERGY": {"Power": 5}}'
    topics = ["tele/Kitchen/SENSOR", "tele/kitchen/SENSOR", "tele/kitchen!/SENSOR"]

    def paths(order: list[str]) -> dict[str, str]:
        handler = make_handler(tmp_path, dry_run=False, MQTT_PRESETS=["tasmota"])
        return {
            topic: handler.handle(topic, payload, False, time.time()).lines[0].split()[0]
            for topic in order
        }

    first = paths(topics)
    assert len(set(first.values())) == 3
    assert first["tele/Kitchen/SENSOR"] == "home.electricity.mqtt.kitchen.power_watts"
    assert caplog.text.count("would both write mqtt.kitchen") == 1
    caplog.clear()
    assert paths(topics[::-1]) == first  # the same whatever comes first after a restart
    assert "would both write" not in caplog.text  # said once


def test_a_replaced_device_named_as_its_predecessor_takes_its_series(
    tmp_path: Path, caplog
) -> None:
    caplog.set_level("INFO")
    payload = b'{"ENERGY": {"Power": 5}}'
    before = make_handler(tmp_path, dry_run=False, MQTT_PRESETS=["tasmota"])
    [line] = before.handle("tele/fridge/SENSOR", payload, False, time.time()).lines
    assert line.startswith("home.electricity.mqtt.fridge.")
    after = make_handler(
        tmp_path, dry_run=False, MQTT_PRESETS=["tasmota"], DEVICE_NAMES={"plug_new": "fridge"}
    )
    [line] = after.handle("tele/plug_new/SENSOR", payload, False, time.time()).lines
    assert line.startswith("home.electricity.mqtt.fridge.")
    assert "mqtt.fridge now belongs to 'plug_new', as DEVICE_NAMES says (it was 'fridge')" in (
        caplog.text
    )
    # The old device, should it report again, writes a series of its own.
    [line] = after.handle("tele/fridge/SENSOR", payload, False, time.time()).lines
    assert not line.startswith("home.electricity.mqtt.fridge.")


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("tele/plug/SENSOR", b'{"ENERGY": {"Power": ' + b"9" * 5000 + b"}}"),
        ("tele/plug/SENSOR", b'{"ENERGY": {"Power": ' + b"9" * 310 + b"}}"),
        ("tele/plug/SENSOR", b'{"ENERGY": {"Power": "' + b"9" * 5000 + b'"}}'),
        ("tele/plug/SENSOR", b'{"ENERGY": {"Power": -Infinity}}'),
        ("tele/plug/SENSOR", b"[" * 30_000 + b"]" * 30_000),
        ("tele/plug/SENSOR", b'{"ENERGY": {"Power": 5, "x": "\xff\xfe"}}'),
        ("tele/" + "p" * 600 + "/SENSOR", b'{"ENERGY": {"Power": 5}}'),
        (
            "glow/ABC/SENSOR/electricitymeter",
            b'{"electricitymeter": {"power": {"value": ' + b"1" * 4301 + b"}}}",
        ),
        ("glow/ABC/SENSOR/electricitymeter", b"\xc3\x28 not utf-8"),
    ],
)
def test_hostile_payloads_are_counted_never_a_line(topic: str, payload: bytes, caplog) -> None:
    handler = make_handler(MQTT_PRESETS=["tasmota"])
    for _ in range(3):
        outcome = handler.handle(topic, payload, False, time.time())
        assert (outcome.status, outcome.lines) == ("invalid", [])
    assert handler.counts["messages_invalid"] == 3
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "message refused" in warnings[0]
    assert len(warnings[0]) < 400  # neither a huge topic nor the payload in the log
