"""tuya_devicefile, tuya_scaling, tuya_link: devices.json, what each device
measures and in which scale, decoding and sanity checks (pure), and
TuyaConnection against simulated
devices speaking the real protocols to the real tinytuya, on loopback only."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from pathlib import Path

import pytest
import tinytuya

import tuya_devicefile as devicefile
import tuya_link as link
import tuya_scaling as scaling
from service import SecretFilter
from settings import ConfigError, load_settings
from simulators.tuya import (
    PLUG_MAPPING,
    SimulatedTuyaDevice,
    din_meter_dps,
    encode_phase,
    plug_dps,
)

KEY = "0123456789abcdef"
OTHER_KEY = "fedcba9876543210"
VERSIONS = ("3.1", "3.3", "3.4", "3.5")
TIMEOUT_S = 0.5
NO_HANG_S = 30.0  # a ceiling that only catches a hang, never a slow machine


@pytest.fixture(scope="module")
def wizard(fixtures_dir: Path) -> list[devicefile.DeviceEntry]:
    entries, problems = devicefile.load_devices_file(fixtures_dir / "tuya" / "devices.json")
    assert problems == []
    return entries


def by_name(entries: list[devicefile.DeviceEntry], name: str) -> devicefile.DeviceEntry:
    return next(entry for entry in entries if entry.name == name)


def entry(**fields) -> devicefile.DeviceEntry:
    base = {"id": "bf0000000000000000test", "name": "Test", "key": KEY, "category": "cz"}
    return devicefile.parse_entry({**base, **fields})


# --- devices.json -------------------------------------------------------------------


def test_both_wizard_forms_load_the_same(tmp_path, fixtures_dir):
    raw = json.loads((fixtures_dir / "tuya" / "devices.json").read_text(encoding="utf-8"))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"devices": raw}), encoding="utf-8")
    listed, _ = devicefile.load_devices_file(fixtures_dir / "tuya" / "devices.json")
    assert devicefile.load_devices_file(wrapped) == (listed, [])
    assert len(listed) == 21
    kettle = by_name(listed, "Kettle")
    assert (kettle.ip, kettle.version, kettle.port, kettle.category) == (
        "127.0.0.13",
        "3.4",
        6668,
        "cz",
    )
    assert by_name(listed, "Main Oven").version == ""  # no address, no version


def test_bad_entries_are_left_out_with_a_reason_and_never_the_key():
    entries, problems = devicefile.parse_devices(
        [
            {"id": "a1", "name": "Good", "key": KEY, "ip": "127.0.0.1", "version": 3.3},
            {"name": "No id", "key": KEY},
            {"id": "a2", "name": "Bad version", "key": KEY, "version": "2.9"},
            {"id": "a1", "name": "Twice", "key": KEY},
            "not an object",
        ]
    )
    assert [e.name for e in entries] == ["Good"]
    assert entries[0].version == "3.3"
    assert len(problems) == 4
    assert "No id" in problems[0]
    assert "2.9" in problems[1]
    assert "twice" in problems[2]
    assert not any(KEY in problem for problem in problems)
    assert KEY not in repr(entries[0])


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not found"), ("{not json", "not valid JSON"), ('{"x": 1}', "expected a list")],
)
def test_unusable_devices_file_is_a_config_error(tmp_path, content, message):
    path = tmp_path / "devices.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as info:
        devicefile.load_devices_file(path)
    assert str(info.value).startswith("TUYA_DEVICES_FILE:")


def test_sub_devices_are_marked(wizard):
    assert by_name(wizard, "Diivoo smart dual water timer").node_id == "3980b14ccbf2c6ef"
    assert [e.name for e in wizard if e.node_id] == ["Diivoo smart dual water timer"]


def test_per_device_settings_match_id_or_name(wizard):
    kettle = by_name(wizard, "Kettle")
    assert devicefile.lookup({"kettle ": "127.0.0.9"}, kettle) == "127.0.0.9"
    assert devicefile.lookup({kettle.id: "a", "Kettle": "b"}, kettle) == "a"
    assert devicefile.matches(["KETTLE"], kettle)
    assert not devicefile.matches(["Shed"], kettle)


# --- what each device of the real home measures ---------------------------------------

EXPECTED_KINDS = {
    "Diivoo smart dual water timer": scaling.SKIP,
    "Gateway": scaling.SKIP,
    "Multifunction alarm": scaling.SKIP,
    "Electric blanket": scaling.SWITCH,
    "Dining room lights": scaling.SWITCH,
    "Amaryllis Fridge": scaling.SWITCH,
    "Front room fairy lights": scaling.SWITCH,
    "Towel Rail": scaling.SWITCH,
    "Dishwasher": scaling.SWITCH,  # no mapping: power if its DPs show it
    "Boot room freezer": scaling.SWITCH,
    "Garage power A": scaling.SWITCH,
    "Main Oven": scaling.METER,
    "Top Oven": scaling.METER,
}


def test_every_wizard_device_gets_the_right_plan(wizard):
    for device in wizard:
        plan = scaling.plan_for(device)
        assert plan.kind == EXPECTED_KINDS.get(device.name, scaling.PLUG), device.name
        if plan.kind == scaling.PLUG:  # mapped plugs: 18 mA, 19 W x10, 20 V x10
            assert plan.channels == {
                "current_amps": scaling.Channel("18", 0, 1, 1000),
                "power_watts": scaling.Channel("19", 1),
                "voltage_volts": scaling.Channel("20", 1),
            }
            assert plan.switch_dp == "1"
            assert plan.source == "mapping"
            assert not plan.has_counter  # add_ele is an increment, not a total
    oven = scaling.plan_for(by_name(wizard, "Main Oven"))
    assert oven.phase_dps == ("6", "7", "8")
    assert oven.switch_dp == "16"
    assert oven.channels == {"energy_kwh": scaling.Channel("1", scale=2)}
    assert "profile" in oven.source
    timer = scaling.plan_for(by_name(wizard, "Diivoo smart dual water timer"))
    assert "water timer" in timer.describe()


def test_scaling_precedence_override_then_mapping_then_profile_then_defaults(wizard):
    kettle = by_name(wizard, "Kettle")
    override = scaling.parse_scaling("TUYA_SCALING['Kettle']", {"power_watts": {"dp": 19}})
    plan = scaling.plan_for(kettle, override)
    assert plan.channels["power_watts"] == scaling.Channel("19", 0)  # override
    assert plan.channels["voltage_volts"] == scaling.Channel("20", 1)  # mapping
    assert plan.source.startswith("TUYA_SCALING")
    # A dlq with a mapping of its own follows the mapping, not the profile.
    mapped_meter = entry(
        category="dlq",
        mapping={
            "1": {"code": "total_forward_energy", "values": {"unit": "kW·h", "scale": 3}},
            "6": {"code": "phase_a", "type": "Raw", "values": {}},
            "16": {"code": "switch", "type": "Boolean", "values": {}},
        },
    )
    plan = scaling.plan_for(mapped_meter)
    assert plan.channels == {"energy_kwh": scaling.Channel("1", 3)}
    assert plan.phase_dps == ("6",)
    assert plan.source == "mapping"
    assert plan.kind == scaling.METER
    # No mapping, no profile: a socket is read with the usual DPs once seen.
    bare = scaling.plan_for(entry())
    assert bare.kind == scaling.SWITCH
    assert bare.probe_layouts
    assert bare.switch_dp == "1"
    resolved = scaling.resolve_layout(bare, plug_dps(40.0, legacy=True))
    assert resolved is not None
    assert resolved.channels["power_watts"] == scaling.Channel("5", 1)
    assert scaling.resolve_layout(bare, {"1": True}) is None


def test_usual_dps_are_not_taken_when_the_mapping_gives_them_another_meaning():
    device = entry(
        mapping={
            "1": {"code": "switch_1", "type": "Boolean"},
            "19": {"code": "countdown_1", "type": "Integer", "values": {"scale": 0}},
        }
    )
    plan = scaling.plan_for(device)
    assert scaling.resolve_layout(plan, plug_dps(40.0)) is None
    assert scaling.resolve_layout(plan, plug_dps(40.0, legacy=True)) is not None


@pytest.mark.parametrize(
    ("code", "values", "raw", "expected"),
    [
        ("cur_power", {"unit": "W", "scale": 1}, 405, 40.5),
        ("cur_power", {"unit": "W", "scale": 0}, 40, 40.0),
        ("cur_power", {"unit": "kW", "scale": 3}, 40, 40.0),
        ("cur_current", {"unit": "mA", "scale": 0}, 170, 0.17),
        ("cur_current", {"unit": "A", "scale": 3}, 170, 0.17),
        ("cur_current", {"scale": 0}, 170, 0.17),  # no unit: mA, the convention
        ("cur_voltage", {"unit": "V", "scale": 1}, 2398, 239.8),
        ("cur_voltage", '{"unit":"V","scale":2}', 23980, 239.8),  # values as JSON text
        ("forward_energy_total", {"unit": "kW·h", "scale": 2}, 123456, 1234.56),
        ("forward_energy_total", {"unit": "W·h", "scale": 0}, 1234560, 1234.56),
    ],
)
def test_mapping_scale_and_unit(code, values, raw, expected):
    metric, channel = scaling.channel_from_mapping("9", code, {"code": code, "values": values})
    assert channel.convert(raw) == pytest.approx(expected, rel=1e-12)
    assert metric == scaling.UNITS[scaling.CONVENTIONAL_UNITS[code]][0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("19", "must be a dict"),
        ({"watts": {"dp": 19}}, "unknown metric"),
        ({"power_watts": {"dp": "x"}}, "'dp' must be a DP number"),
        ({"power_watts": {"dp": 19, "scale": 1.5}}, "'scale'"),
        ({"power_watts": {"dp": 19, "unit": "mA"}}, "unit 'ma'"),
        ({"power_watts": {"dp": 19, "factor": 10}}, "must be"),
        ({"is_on": {"dp": 1, "scale": 1}}, "only 'dp'"),
    ],
)
def test_bad_scaling_override_is_a_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        scaling.parse_scaling("TUYA_SCALING['Kettle']", spec)


# --- decoding and checks -----------------------------------------------------------------


def test_phase_decoding_known_bytes():
    raw = bytes.fromhex("08fc0005dc000159")  # 230.0 V, 1.500 A, 345 W
    assert scaling.decode_phase(base64.b64encode(raw).decode()) == (230.0, 1.5, 345.0)
    assert scaling.decode_phase(encode_phase(241.3, 12.345, 2980)) == (241.3, 12.345, 2980.0)
    for bad in ("not base64!", base64.b64encode(b"1234567").decode(), 12):
        with pytest.raises(ValueError, match="phase DP"):
            scaling.decode_phase(bad)


def test_meter_values_one_and_three_phases(wizard):
    plan = scaling.plan_for(by_name(wizard, "Main Oven"))
    values, problems = scaling.extract_values(plan, din_meter_dps([(230.0, 1.5, 345.0)], 1234.56))
    assert problems == []
    assert scaling.combine_phases(values) == {
        "is_on": 1.0,
        "energy_kwh": 1234.56,
        "voltage_volts": 230.0,
        "current_amps": 1.5,
        "power_watts": 345.0,
    }
    phases = [(230.0, 10.0, 2300.0), (231.0, 2.0, 462.0), (229.0, 0.5, 100.0)]
    values, _ = scaling.extract_values(plan, din_meter_dps(phases, 10.0, on=False))
    combined = scaling.combine_phases(values)
    assert combined["l2_power_watts"] == 462.0
    assert combined["l3_current_amps"] == 0.5
    assert combined["power_watts"] == 2862.0
    assert combined["current_amps"] == 12.5
    assert combined["voltage_volts"] == pytest.approx(230.0)
    assert combined["is_on"] == 0.0


def test_single_phase_meter_reporting_empty_phases_stays_single(wizard):
    plan = scaling.plan_for(by_name(wizard, "Main Oven"))
    dps = din_meter_dps([(230.0, 1.0, 230.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)], 1.0)
    values, _ = scaling.extract_values(plan, dps)
    assert set(scaling.combine_phases(values)) == {
        "is_on",
        "energy_kwh",
        "voltage_volts",
        "current_amps",
        "power_watts",
    }


def test_unreadable_dps_are_reported_not_sent(wizard):
    plan = scaling.plan_for(by_name(wizard, "Kettle"))
    dps = {"1": "on", "18": None, "19": "lots", "20": 2401, "17": 3}
    values, problems = scaling.extract_values(plan, dps)
    assert values == {"voltage_volts": 240.1}
    assert len(problems) == 3
    assert all(p.startswith("DP ") for p in problems)


def test_values_outside_physical_sense_are_dropped():
    ranges = scaling.parse_ranges(load_settings(env={}, local_path="/nonexistent").tuya_ranges)
    values = {"power_watts": 4400.0, "voltage_volts": 40.0, "current_amps": 0.2, "is_on": 1.0}
    kept, dropped = scaling.check_ranges(values, ranges["plug"])
    assert kept == {"current_amps": 0.2, "is_on": 1.0}
    assert [line.split()[0] for line in dropped] == ["power_watts", "voltage_volts"]
    kept, dropped = scaling.check_ranges(
        {"l2_voltage_volts": 500.0, "energy_kwh": -1.0}, ranges["meter"]
    )
    assert kept == {}
    assert len(dropped) == 2


def test_power_above_voltage_times_current_is_the_classic_scaling_mistake():
    # 400 W read for a 40 W plug (power taken as whole watts instead of W x10).
    wrong = {"power_watts": 400.0, "voltage_volts": 240.0, "current_amps": 0.17, "is_on": 1.0}
    kept, dropped = scaling.check_apparent_power(wrong)
    assert kept == {"voltage_volts": 240.0, "is_on": 1.0}
    assert "disagree" in dropped[0]
    right = {"power_watts": 40.0, "voltage_volts": 240.0, "current_amps": 0.17}
    assert scaling.check_apparent_power(right) == (right, [])
    low_power_factor = {"power_watts": 3.0, "voltage_volts": 240.0, "current_amps": 0.05}
    assert scaling.check_apparent_power(low_power_factor)[1] == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"plug": {"power_watts": [10, 1]}}, "min, max"),
        ({"plug": {"watts": [0, 1]}}, "power_watts"),
        ({"oven": {}}, "keys are"),
        ([], "must be a dict"),
    ],
)
def test_bad_ranges_are_a_config_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        scaling.parse_ranges(raw)


# --- announcements -------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_announcements_of_every_version_decode(version):
    device = SimulatedTuyaDevice("bf0123456789abcdefghij", KEY, version, host="127.0.0.1")
    announcement = link.parse_announcement(device.announcement(), "127.0.0.99")
    assert announcement == link.Announcement(
        "bf0123456789abcdefghij", "127.0.0.1", version, device.product_key
    )


def test_garbage_datagrams_are_not_announcements():
    rng = random.Random(7)
    for size in (0, 1, 20, 100, 600):
        assert link.parse_announcement(bytes(rng.randrange(256) for _ in range(size)), "x") is None
    assert link.parse_announcement(b'{"gwId": 5}', "127.0.0.1") is None
    assert link.parse_announcement(b"\x00" * 5000, "127.0.0.1") is None


def test_listening_hears_devices_and_stops_once_all_wanted_are_heard(free_udp_port):
    devices = [
        SimulatedTuyaDevice(f"bf{n:020d}", KEY, version, host=f"127.0.0.{n + 1}")
        for n, version in enumerate(VERSIONS)
    ]

    async def scenario():
        listening = asyncio.ensure_future(
            link.listen_for_announcements(
                "127.0.0.1", [free_udp_port], NO_HANG_S, {d.dev_id for d in devices}
            )
        )
        await asyncio.sleep(0.2)
        for device in devices:
            device.announce(("127.0.0.1", free_udp_port))
        return await asyncio.wait_for(listening, NO_HANG_S)

    heard = asyncio.run(scenario())
    assert {dev_id: a.version for dev_id, a in heard.items()} == {
        d.dev_id: d.version for d in devices
    }
    assert heard[devices[2].dev_id].ip == "127.0.0.3"


@pytest.fixture
def free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- keys stay secret -------------------------------------------------------------------


def test_secret_filter_scrubs_messages_arguments_and_tracebacks():
    keys = SecretFilter()
    keys.add([KEY, "short"])
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "key %s and %r", (KEY, KEY), None)
    keys.filter(record)
    assert KEY not in record.getMessage()
    assert "<key>" in record.getMessage()
    try:
        raise ValueError(f"bad {KEY}")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    keys.filter(record)
    assert KEY not in record.exc_text
    short = logging.LogRecord("x", logging.INFO, __file__, 1, "short words", (), None)
    keys.filter(short)
    assert short.getMessage() == "short words"  # too short to be a key: left alone


def test_tinytuya_device_repr_leaves_the_key_out():
    client = link._Client("bfa1b2c3d4e5f6a7b8c9zz", "127.0.0.1", KEY, version=3.3)
    assert KEY not in repr(client)
    assert KEY in tinytuya.OutletDevice.__repr__(client)  # why _Client overrides it
    client.close()


# --- TuyaConnection against simulated devices ------------------------------------------------


@pytest.fixture
def connect():
    made: list[link.TuyaConnection] = []

    def _connect(device: SimulatedTuyaDevice, key: str = KEY, version=None, plan=None, **kw):
        raw = {
            "id": device.dev_id,
            "name": f"plug {device.version}",
            "key": key,
            "category": "cz",
            "mapping": MAPPED_PLUG,
        }
        device_entry = devicefile.parse_entry(raw)
        kw.setdefault("timeout_s", TIMEOUT_S)
        connection = link.TuyaConnection(
            device_entry,
            device.host,
            device.port,
            device.version if version is None else version,
            plan or scaling.plan_for(device_entry),
            **kw,
        )
        made.append(connection)
        return connection

    yield _connect
    for connection in made:
        connection.close()


MAPPED_PLUG = PLUG_MAPPING


def make_plug(host: str, version: str, **kwargs) -> SimulatedTuyaDevice:
    kwargs.setdefault("dps", plug_dps(42.5, 239.0))
    return SimulatedTuyaDevice("bf11db5eb189bb21e7uscg", KEY, version, host=host, port=0, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_reads_over_one_persistent_connection(version, hosts, serve, connect):
    device = make_plug(next(hosts), version)
    serve(device)
    connection = connect(device)
    assert asyncio.run(connection.poll()) == device.dps
    device.set_dps(plug_dps(1500.0, 231.0))  # pushed to the open connection
    dps = connection.read()
    assert dps == device.dps
    assert device.counts["connect"] == 1
    assert connection.answered
    assert connection.failures == 0


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.3", "3.4", "3.5"])
def test_wrong_key_says_so_and_never_shows_a_key(version, hosts, serve, connect):
    device = make_plug(next(hosts), version)
    serve(device)
    with pytest.raises(link.TuyaError, match="wrong local key") as info:
        connect(device, key=OTHER_KEY).read()
    message = str(info.value)
    assert "wrong local key" in message
    assert version in message
    assert KEY not in message
    assert OTHER_KEY not in message
    assert not isinstance(info.value, link.NoAnswer)


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_hung_device_is_no_answer_within_the_timeout(version, hosts, serve, connect):
    device = make_plug(next(hosts), version, mode="hang")
    serve(device)
    started = time.monotonic()
    with pytest.raises(link.NoAnswer, match="no answer"):
        connect(device).read()
    assert time.monotonic() - started < NO_HANG_S


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_garbage_is_an_error_not_a_crash(version, hosts, serve, connect):
    device = make_plug(next(hosts), version, mode="garbage")
    serve(device)
    with pytest.raises(link.TuyaError, match=r"garbled|wrong local key"):
        connect(device).read()


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_busy_device_is_left_alone_for_the_backoff(version, hosts, serve, connect):
    device = make_plug(next(hosts), version, mode="busy")
    serve(device)
    connection = connect(device, busy_backoff_s=3600)
    with pytest.raises(link.DeviceBusy, match="another client"):
        connection.read()
    attempts = device.counts["reject"]
    device.mode = "normal"
    with pytest.raises(link.DeviceBusy, match="left alone"):
        connection.read()
    assert device.counts["reject"] == attempts
    assert "connect" not in device.counts


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_stale_power_is_refreshed_with_updatedps(version, hosts, serve, connect):
    device = make_plug(next(hosts), version, mode="stale", power_dps=["18", "19", "20"])
    serve(device)
    connection = connect(device, stale_polls=2)
    assert connection.read() == device.dps  # missing from STATUS: asked for
    assert device.counts["UPDATEDPS"] == 1
    connection.read()
    connection.read()  # unchanged twice: asked again
    assert device.counts["UPDATEDPS"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.3", "3.4"])
def test_device22_is_asked_for_its_dps_by_number(version, hosts, serve, connect):
    device = make_plug(next(hosts), version, device22=True)
    serve(device)
    connection = connect(device)
    assert connection.read() == {k: v for k, v in device.dps.items() if k != "17"}


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_unknown_version_is_detected(version, hosts, serve, connect):
    device = make_plug(next(hosts), version)
    serve(device)
    connection = connect(device, version="")
    assert connection.read() == device.dps
    assert connection.version == version


@pytest.mark.slow
def test_plug_without_mapping_is_read_with_the_usual_dps(hosts, serve, connect):
    device = make_plug(next(hosts), "3.3", dps=plug_dps(40.0, legacy=True), mode="stale")
    serve(device)
    plan = scaling.plan_for(entry())
    connection = connect(device, plan=plan)
    dps = connection.read()
    assert connection.plan.kind == scaling.PLUG
    values, _ = scaling.extract_values(connection.plan, dps)
    assert values["power_watts"] == 40.0
    assert values["current_amps"] == 0.167


@pytest.mark.slow
def test_a_second_poll_while_one_hangs_fails_at_once(hosts, serve, connect):
    device = make_plug(next(hosts), "3.3", mode="hang")
    serve(device)
    connection = connect(device)

    async def scenario():
        first = asyncio.ensure_future(connection.poll())
        await asyncio.sleep(0.1)
        with pytest.raises(link.NoAnswer, match="previous answer"):
            await connection.poll()
        with pytest.raises(link.NoAnswer):
            await first

    asyncio.run(scenario())


def test_refuses_what_would_make_tinytuya_scan_or_read_files():
    device = entry()
    plan = scaling.plan_for(device)
    for address in ("", "Auto", "0.0.0.0"):
        with pytest.raises(ValueError, match="no address"):
            link.TuyaConnection(device, address, 6668, "3.3", plan, timeout_s=1)
    with pytest.raises(ValueError, match="no local key"):
        link.TuyaConnection(entry(key=""), "127.0.0.1", 6668, "3.3", plan, timeout_s=1)


@pytest.mark.slow
def test_power_dps_a_device_never_reports_do_not_cost_a_refresh_each_read(
    wizard, fixtures_dir, hosts, serve, connect
):
    meter_entry = by_name(wizard, "Main Oven")
    raw = json.loads((fixtures_dir / "tuya" / "devices.json").read_text(encoding="utf-8"))
    meter = SimulatedTuyaDevice.from_devices_json(
        next(e for e in raw if e["id"] == meter_entry.id), host=next(hosts), version="3.4", port=0
    )
    serve(meter)
    connection = connect(meter, key=meter_entry.key, plan=scaling.plan_for(meter_entry))
    for _ in range(3):
        meter.set_dps(din_meter_dps([(230.0 + _, 1.0, 230.0)], 1.0), push=False)
        values, _problems = scaling.extract_values(connection.plan, connection.read())
        assert values["l1_voltage_volts"] == 230.0 + _
    assert meter.counts["UPDATEDPS"] == 1  # the first read learns it has phase A only


def test_a_device_that_never_answers_updatedps_is_not_asked_again():
    class SilentClient:  # narrow: only what _update_dps touches
        receive_error = None
        calls = 0

        def updatedps(self, dps):
            SilentClient.calls += 1
            return None  # tinytuya after waiting its timeout for a report

    connection = link.TuyaConnection(
        entry(), "127.0.0.1", 6668, "3.3", scaling.plan_for(entry()), timeout_s=1
    )
    try:
        for _ in range(5):
            assert connection._update_dps(SilentClient(), [19]) is None
    finally:
        connection.close()
    assert SilentClient.calls == 2


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"mapping": {"19": {"code": ["cur_power"]}}}, "mapping DP 19: code is a list"),
        ({"mapping": {"19": {"code": {"x": 1}}}}, "mapping DP 19: code is an object"),
        ({"mapping": {"19": {"code": 19}}}, "mapping DP 19: code is a number"),
        ({"mapping": {"19": {"code": "cur_power", "values": [1]}}}, "values is a list"),
        ({"mapping": {"19": {"code": "cur_power", "type": 3}}}, "type is a number"),
        ({"mapping": {"19": ["cur_power"]}}, "mapping DP 19: is a list"),
        ({"mapping": ["cur_power"]}, "mapping is a list"),
        ({"key": 1234567890123456}, "key is a number"),
        ({"name": ["Kettle"]}, "name is a list"),
        ({"ip": 127}, "ip is a number"),
        ({"category": ["cz"]}, "category is a list"),
        ({"product_id": True}, "product_id is true/false"),
        ({"node_id": {"a": 1}}, "node_id is an object"),
    ],
)
def test_a_wrong_type_anywhere_leaves_out_only_that_entry(fields, said):
    good = {"id": "a1", "name": "Good", "key": KEY, "mapping": MAPPED_PLUG, "category": "cz"}
    bad = {"id": "a2", "name": "Bad", "key": KEY, "category": "cz", **fields}
    entries, problems = devicefile.parse_devices([bad, good])
    assert [entry.id for entry in entries] == ["a1"]
    assert len(problems) == 1
    assert said in problems[0]
    assert "left out" in problems[0]
    assert not any(KEY in problem or "1234567890123456" in problem for problem in problems)
    # The good entry is planned as usual (the bad one would have raised here).
    assert scaling.plan_for(entries[0]).measures_power


def test_null_fields_are_as_good_as_missing():
    entry = devicefile.parse_entry(
        {"id": "a1", "key": None, "name": None, "ip": None, "mapping": None, "category": None}
    )
    assert (entry.key, entry.name, entry.ip, entry.category, dict(entry.mapping)) == (
        "",
        "a1",
        "",
        "",
        {},
    )
