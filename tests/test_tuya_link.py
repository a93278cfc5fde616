"""tuya_link: announcements, keys kept out of logs, and TuyaConnection against
simulated devices speaking the real protocols to the real tinytuya, on
loopback only."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time

import pytest
import tinytuya

import tuya_devicefile as devicefile
import tuya_link as link
import tuya_scaling as scaling
from service import SecretFilter
from simulators.tuya import (
    PLUG_MAPPING,
    SimulatedTuyaDevice,
    din_meter_dps,
    plug_dps,
)
from tests.helpers import TUYA_KEY, by_name, tuya_entry

OTHER_KEY = "fedcba9876543210"
VERSIONS = ("3.1", "3.3", "3.4", "3.5")
TIMEOUT_S = 0.5
NO_HANG_S = 30.0  # a ceiling that only catches a hang, never a slow machine


# --- announcements -------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_announcements_of_every_version_decode(version):
    device = SimulatedTuyaDevice("bf0123456789abcdefghij", TUYA_KEY, version, host="127.0.0.1")
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
        SimulatedTuyaDevice(f"bf{n:020d}", TUYA_KEY, version, host=f"127.0.0.{n + 1}")
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
    keys.add([TUYA_KEY, "short"])
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "key %s and %r", (TUYA_KEY, TUYA_KEY), None
    )
    keys.filter(record)
    assert TUYA_KEY not in record.getMessage()
    assert "<key>" in record.getMessage()
    try:
        raise ValueError(f"bad {TUYA_KEY}")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    keys.filter(record)
    assert TUYA_KEY not in record.exc_text
    short = logging.LogRecord("x", logging.INFO, __file__, 1, "short words", (), None)
    keys.filter(short)
    assert short.getMessage() == "short words"  # too short to be a key: left alone


def test_tinytuya_device_repr_leaves_the_key_out():
    client = link._Client("bfa1b2c3d4e5f6a7b8c9zz", "127.0.0.1", TUYA_KEY, version=3.3)
    assert TUYA_KEY not in repr(client)
    assert TUYA_KEY in tinytuya.OutletDevice.__repr__(client)  # why _Client overrides it
    client.close()


# --- TuyaConnection against simulated devices ------------------------------------------------


@pytest.fixture
def connect():
    made: list[link.TuyaConnection] = []

    def _connect(device: SimulatedTuyaDevice, key: str = TUYA_KEY, version=None, plan=None, **kw):
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
    return SimulatedTuyaDevice(
        "bf11db5eb189bb21e7uscg", TUYA_KEY, version, host=host, port=0, **kwargs
    )


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
    assert TUYA_KEY not in message
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
    plan = scaling.plan_for(tuya_entry())
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
    device = tuya_entry()
    plan = scaling.plan_for(device)
    for address in ("", "Auto", "0.0.0.0"):
        with pytest.raises(ValueError, match="no address"):
            link.TuyaConnection(device, address, 6668, "3.3", plan, timeout_s=1)
    with pytest.raises(ValueError, match="no local key"):
        link.TuyaConnection(tuya_entry(key=""), "127.0.0.1", 6668, "3.3", plan, timeout_s=1)


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
        tuya_entry(), "127.0.0.1", 6668, "3.3", scaling.plan_for(tuya_entry()), timeout_s=1
    )
    try:
        for _ in range(5):
            assert connection._update_dps(SilentClient(), [19]) is None
    finally:
        connection.close()
    assert SilentClient.calls == 2
