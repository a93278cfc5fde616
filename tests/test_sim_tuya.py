"""The simulated Tuya devices against the real tinytuya 1.20 client, on loopback only."""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path

import pytest
import tinytuya
from hypothesis import given
from hypothesis import strategies as st

from simulators.tuya import (
    MODES,
    UDP_PORT_BY_VERSION,
    VERSIONS,
    SimulatedTuyaDevice,
    TuyaSimulator,
    decode_phase,
    default_dps,
    din_meter_dps,
    encode_phase,
    plug_dps,
)

DEVICES_JSON = Path(__file__).resolve().parent / "fixtures" / "tuya" / "devices.json"
KEY = "0123456789abcdef"
OTHER_KEY = "fedcba9876543210"
DEV_ID = "bf11db5eb189bb21e7uscg"
# Only a generous ceiling to catch a hang: every failure below normally takes about
# (retry limit + 1) x connection timeout, i.e. about one second.
NO_HANG_S = 30.0


@pytest.fixture
def connect():
    """tinytuya clients for a simulated device, with low retries; all closed afterwards.

    Only hang mode waits for the timeout, so the long default costs nothing and keeps
    a loaded machine from turning a reset into a timeout.
    """
    made: list[tinytuya.OutletDevice] = []

    def _connect(device: SimulatedTuyaDevice, key: str = KEY, timeout: float = 5.0, **kwargs):
        client = tinytuya.OutletDevice(
            device.dev_id,
            device.host,  # always an address: None or "Auto" makes tinytuya scan the LAN
            key,
            version=float(device.version),
            port=device.port,
            connection_timeout=timeout,
            connection_retry_limit=1,
            connection_retry_delay=0,
            **kwargs,
        )
        made.append(client)
        return client

    yield _connect
    for client in made:
        client.close()


@pytest.fixture
def udp_listener():
    """A UDP socket on a free loopback port, standing in for a collector's listener."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5.0)
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def wizard_entries() -> list[dict]:
    return json.loads(DEVICES_JSON.read_text(encoding="utf-8"))


def make_plug(host: str, version: str, **kwargs) -> SimulatedTuyaDevice:
    kwargs.setdefault("dps", plug_dps(100.0))
    return SimulatedTuyaDevice(DEV_ID, KEY, version, host=host, port=0, **kwargs)


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# --- pure helpers -------------------------------------------------------------------


def test_encode_phase_known_value():
    # 230.0 V -> 2300 (0x08FC), 1.5 A -> 1500 (0x0005DC), 345 W -> 0x000159
    raw = bytes.fromhex("08fc0005dc000159")
    assert encode_phase(230.0, 1.5, 345.0) == base64.b64encode(raw).decode()
    assert decode_phase(base64.b64encode(raw).decode()) == (230.0, 1.5, 345.0)


@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFF),
    st.integers(0, 0xFFFFFF),
)
def test_phase_round_trip(decivolts, milliamps, watts):
    encoded = encode_phase(decivolts / 10, milliamps / 1000, watts)
    assert len(base64.b64decode(encoded)) == 8
    assert decode_phase(encoded) == (decivolts / 10, milliamps / 1000, float(watts))


@pytest.mark.parametrize(
    "args", [(-1.0, 1.0, 1.0), (6553.6, 1.0, 1.0), (230.0, 16777.216, 1.0), (230.0, 1.0, 2**24)]
)
def test_encode_phase_rejects_values_that_do_not_fit(args):
    with pytest.raises(ValueError, match="does not fit in"):
        encode_phase(*args)


def test_decode_phase_rejects_wrong_length():
    with pytest.raises(ValueError, match="holds 8 bytes, got 7"):
        decode_phase(base64.b64encode(b"1234567").decode())


def test_plug_and_meter_dp_sets():
    assert plug_dps(60.0, 240.0, energy_kwh=0.012) == {
        "1": True,
        "17": 12,
        "18": 250,
        "19": 600,
        "20": 2400,
    }
    assert plug_dps(60.0, legacy=True) == {"1": True, "4": 250, "5": 600, "6": 2400}
    assert plug_dps(60.0, on=False)["19"] == 0
    three = din_meter_dps([(230.0, 1.0, 230.0), (231.0, 2.0, 462.0), (229.5, 0.0, 0.0)], 12.34)
    assert three["1"] == 1234
    assert three["16"] is True
    assert [decode_phase(three[dp]) for dp in ("6", "7", "8")] == [
        (230.0, 1.0, 230.0),
        (231.0, 2.0, 462.0),
        (229.5, 0.0, 0.0),
    ]


def test_default_dps_follow_mapping_and_category(wizard_entries):
    by_name = {entry["name"]: entry for entry in wizard_entries}
    mapped_plug = default_dps(by_name["Garage lights"])  # mapping with 17/18/19/20
    assert mapped_plug["1"] is True
    assert (mapped_plug["18"], mapped_plug["19"], mapped_plug["20"]) == (250, 600, 2400)
    assert set(default_dps(by_name["Dishwasher"])) == {"1", "4", "5", "6"}  # cz, no mapping
    meter = default_dps(by_name["Main Oven"])  # dlq, no mapping
    assert decode_phase(meter["6"]) == (230.0, 1.5, 345.0)
    assert meter["1"] == 123456
    assert meter["16"] is True
    assert default_dps(by_name["Gateway"]) == {"1": False}  # empty mapping, not a plug
    alarm = default_dps(by_name["Multifunction alarm"])
    assert set(alarm) == set(by_name["Multifunction alarm"]["mapping"])


def test_constructor_refuses_what_a_device_cannot_be():
    with pytest.raises(ValueError, match=r"unsupported Tuya protocol version '3\.2'"):
        SimulatedTuyaDevice(DEV_ID, KEY, "3.2")
    with pytest.raises(ValueError, match="needs a 16-character local key"):
        SimulatedTuyaDevice(DEV_ID, "short", "3.3")
    with pytest.raises(ValueError, match="unknown mode 'sleepy'"):
        SimulatedTuyaDevice(DEV_ID, KEY, "3.3", mode="sleepy")
    with pytest.raises(ValueError, match=r"device22 behaviour exists for protocol 3\.3 and 3\.4"):
        SimulatedTuyaDevice(DEV_ID, KEY, "3.5", device22=True)
    for address in ("192.168.86.20", "10.0.0.1", "0.0.0.0", "example.com"):
        with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
            SimulatedTuyaDevice(DEV_ID, KEY, "3.3", host=address)


# --- the protocol against tinytuya ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_status_returns_the_simulated_dps(version, hosts, serve, connect):
    device = make_plug(next(hosts), version)
    serve(device)
    result = connect(device).status()
    assert result["dps"] == device.dps
    device.set_dps(plug_dps(2000.0, 230.0))
    assert connect(device).status()["dps"] == device.dps


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_turn_off_and_on(version, hosts, serve, connect):
    device = make_plug(next(hosts), version)
    serve(device)
    client = connect(device)
    assert client.turn_off()["dps"] == {"1": False}
    assert device.dps["1"] is False
    assert client.status()["dps"]["1"] is False
    assert client.turn_on()["dps"] == {"1": True}
    assert device.dps["1"] is True
    assert device.counts["CONTROL"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_updatedps_answers_with_fresh_values(version, hosts, serve, connect):
    device = make_plug(next(hosts), version)
    serve(device)
    device.set_dps(plug_dps(1500.0, 230.0))
    result = connect(device).updatedps([18, 19, 20])
    assert result["dps"] == {"18": 6522, "19": 15000, "20": 2300}
    assert device.counts["UPDATEDPS"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_persistent_client_gets_status_reports(version, hosts, serve, connect):
    device = make_plug(next(hosts), version)
    serve(device)
    client = connect(device, persist=True)
    client.status()
    client.heartbeat()  # no answer awaited; its empty ack is skipped by the next read
    assert client.status()["dps"] == device.dps
    device.set_dps({"19": 1234})  # the device reports the change on its own
    assert client.receive()["dps"] == {"19": 1234}
    assert device.counts["connect"] == 1
    assert device.counts["HEART_BEAT"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_wrong_key_is_a_tinytuya_error_and_the_device_survives(version, hosts, serve, connect):
    device = make_plug(next(hosts), version)
    serve(device)
    intruder = connect(device, key=OTHER_KEY)
    if version == "3.1":
        # 3.1 queries are plain JSON: reading needs no key, only control does.
        assert intruder.status()["dps"] == device.dps
        result = intruder.turn_off()
    else:
        result = intruder.status()
    # 3.1/3.3 devices answer "data format error"; 3.4/3.5 fail the session handshake.
    assert result["Err"] == ("904" if version in ("3.1", "3.3") else "914")
    assert device.dps["1"] is True
    assert connect(device).status()["dps"] == device.dps


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_hang_mode_errors_within_the_timeout(version, hosts, serve, connect):
    device = make_plug(next(hosts), version, mode="hang")
    serve(device)
    started = time.monotonic()
    result = connect(device, timeout=0.5).status()
    assert time.monotonic() - started < NO_HANG_S
    # 3.1/3.3 time out waiting for the answer; 3.4/3.5 already in the handshake.
    assert result["Err"] == ("902" if version in ("3.1", "3.3") else "914")
    device.mode = "normal"
    assert connect(device).status()["dps"] == device.dps


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_garbage_mode_is_an_error(version, hosts, serve, connect):
    device = make_plug(next(hosts), version, mode="garbage")
    serve(device)
    result = connect(device).status()
    expected = {"900", "904"} if version in ("3.1", "3.3") else {"914"}
    assert result["Err"] in expected
    assert device.counts["garbage"] >= 1
    device.mode = "normal"
    assert connect(device).status()["dps"] == device.dps


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_second_client_is_refused_while_one_is_connected(version, hosts, serve, connect):
    device = make_plug(next(hosts), version)
    serve(device)
    first = connect(device, persist=True)
    assert first.status()["dps"] == device.dps
    assert device.connected_clients == 1
    second = connect(device)
    result = second.status()
    # The device resets the newcomer: tinytuya reports it as a connection error (901),
    # or on 3.4/3.5, where it happens inside the handshake, as 914.
    assert result["Err"] == ("901" if version in ("3.1", "3.3") else "914")
    assert device.counts["reject"] >= 1
    assert first.status()["dps"] == device.dps  # the first client is undisturbed
    first.close()
    wait_until(lambda: device.connected_clients == 0)
    assert second.status()["dps"] == device.dps


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_busy_mode_refuses_every_client(version, hosts, serve, connect):
    device = make_plug(next(hosts), version, mode="busy")
    serve(device)
    result = connect(device).status()
    assert result["Err"] == ("901" if version in ("3.1", "3.3") else "914")
    assert device.counts["reject"] >= 1
    assert "connect" not in device.counts
    device.mode = "normal"
    assert connect(device).status()["dps"] == device.dps


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_stale_mode_hides_power_until_updatedps(version, hosts, serve, connect):
    device = make_plug(next(hosts), version, mode="stale")
    serve(device)
    assert set(connect(device).status()["dps"]) == {"1", "17"}
    refreshed = connect(device).updatedps([18, 19, 20])
    assert refreshed["dps"] == {"18": 417, "19": 1000, "20": 2400}
    assert connect(device).status()["dps"] == device.dps
    device.mark_stale()
    assert "19" not in connect(device).status()["dps"]


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.3", "3.4"])
def test_device22_is_detected_by_tinytuya(version, hosts, serve, connect):
    device = make_plug(next(hosts), version, device22=True)
    serve(device)
    client = connect(device)
    # tinytuya sees "data unvalid", switches to device22 and asks again for DP 1 only.
    assert client.status()["dps"] == {"1": True}
    assert client.dev_type == "device22"
    client.set_dpsUsed({"1": None, "18": None, "19": None, "20": None})
    assert client.status()["dps"] == {"1": True, "18": 417, "19": 1000, "20": 2400}


# --- the real devices.json -----------------------------------------------------------


@pytest.mark.slow
def test_every_addressed_wizard_entry_starts_and_answers(wizard_entries, serve, connect):
    addressed = [e for e in wizard_entries if e.get("ip") and e.get("version")]
    assert len(addressed) == 11
    # The entries' own 127.0.0.x addresses, with free ports so parallel runs never clash.
    devices = [SimulatedTuyaDevice.from_devices_json(entry, port=0) for entry in addressed]
    serve(*devices)
    for entry, device in zip(addressed, devices):
        assert (device.host, device.version) == (entry["ip"], entry["version"])
        client = connect(device, key=entry["key"])
        assert client.status()["dps"] == device.dps, entry["name"]


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_unaddressed_meter_entry_served_on_a_given_host(
    version, wizard_entries, hosts, serve, connect
):
    entry = next(e for e in wizard_entries if e.get("category") == "dlq")
    with pytest.raises(ValueError, match="has no ip"):
        SimulatedTuyaDevice.from_devices_json(entry)  # no ip, no version
    device = SimulatedTuyaDevice.from_devices_json(
        entry, host=next(hosts), version=version, port=0, mode="stale"
    )
    serve(device)
    assert "6" not in connect(device, key=entry["key"]).status()["dps"]
    device.mode = "normal"
    dps = connect(device, key=entry["key"]).status()["dps"]
    assert decode_phase(dps["6"]) == (230.0, 1.5, 345.0)


# --- discovery -----------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_announcement_decodes_with_tinytuya(version, hosts, udp_listener):
    device = make_plug(next(hosts), version)
    device.announce(to=udp_listener.getsockname())
    data, source = udp_listener.recvfrom(4096)
    assert source[0] == device.host  # sent from the device's own address
    info = json.loads(tinytuya.decrypt_udp(data))
    assert info == device.discovery_info()
    assert {"ip", "gwId", "active", "ability", "mode", "encrypt", "productKey", "version"} <= set(
        info
    )
    assert (info["ip"], info["gwId"], info["version"]) == (device.host, DEV_ID, version)
    prefix = tinytuya.PREFIX_6699_BIN if version == "3.5" else tinytuya.PREFIX_55AA_BIN
    assert data.startswith(prefix)
    assert (b'"gwId"' in data) == (version == "3.1")  # only 3.1 announces in clear


def test_default_announcement_ports():
    assert UDP_PORT_BY_VERSION == {"3.1": 6666, "3.3": 6667, "3.4": 6667, "3.5": 7000}


def test_announcements_never_leave_loopback(hosts):
    device = make_plug(next(hosts), "3.3")
    for target in ("255.255.255.255", "192.168.86.255", "10.0.0.255", "8.8.8.8"):
        with pytest.raises(ValueError, match="is not a loopback address"):
            device.announce(to=(target, 6667))
    with pytest.raises(ValueError, match="is not a loopback address"):
        TuyaSimulator([device], announce_to=("255.255.255.255", 6667))


@pytest.mark.slow
def test_simulator_announces_idle_devices(hosts, serve, udp_listener):
    devices = [
        SimulatedTuyaDevice(f"sim{n:019d}", KEY, version, host=next(hosts), port=0)
        for n, version in enumerate(VERSIONS)
    ]
    serve(*devices, announce_to=udp_listener.getsockname(), announce_interval_s=0.05)
    seen: set[str] = set()
    deadline = time.monotonic() + NO_HANG_S
    while seen != {d.dev_id for d in devices} and time.monotonic() < deadline:
        data, _ = udp_listener.recvfrom(4096)
        seen.add(json.loads(tinytuya.decrypt_udp(data))["gwId"])
    assert seen == {d.dev_id for d in devices}


# --- the server ----------------------------------------------------------------------


@pytest.mark.slow
def test_fifty_devices_on_the_default_port(hosts, serve, connect):
    devices = [
        SimulatedTuyaDevice(
            f"bench{n:017d}",
            KEY,
            VERSIONS[n % len(VERSIONS)],
            host=next(hosts),
            dps=plug_dps(10.0 * n),
        )
        for n in range(50)
    ]
    serve(*devices)
    for device in devices:
        assert device.port == 6668
        assert connect(device).status()["dps"] == device.dps


@pytest.mark.slow
def test_start_and_stop_many_times_on_the_same_address(hosts, connect):
    # The real default port on a fixed address: rebinding relies on SO_REUSEADDR.
    device = SimulatedTuyaDevice(DEV_ID, KEY, "3.4", host=next(hosts), dps=plug_dps(5.0))
    simulator = TuyaSimulator([device])
    for _ in range(5):
        with simulator:
            assert simulator.running
            assert connect(device, persist=True).status()["dps"] == device.dps
        assert not simulator.running
    with device:  # and on its own
        assert connect(device).status()["dps"] == device.dps


@pytest.mark.slow
def test_a_device_is_served_by_one_simulator_at_a_time(hosts, serve):
    device = make_plug(next(hosts), "3.3")
    serve(device)
    with pytest.raises(RuntimeError, match="is already served by another simulator"):
        TuyaSimulator([device]).start()


def test_modes_are_listed():
    assert MODES == ("normal", "hang", "garbage", "busy", "stale")
