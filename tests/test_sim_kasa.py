"""The simulated Kasa devices against the real python-kasa (0.7.7 or 0.12), on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from kasa import Device, DeviceConfig, Discover, IotProtocol, KasaException, Module

from simulators.kasa import (
    ENERGY_FIXTURES,
    FIXTURES_DIR,
    LEGACY_FIXTURES,
    KasaSimulator,
    SimulatedKasaDevice,
    load_fixture,
    loopback_host,
    make_devices,
    xor_decrypt,
    xor_encrypt,
)

try:  # python-kasa >= 0.8 moved the transports into a package
    from kasa.transports import XorEncryption, XorTransport
except ImportError:  # 0.7.x
    from kasa.xortransport import XorEncryption, XorTransport

HOSTILE_ALIASES = ["Kitchen\nKettle", "  spaced   out  ", "a.b/c\\d", "Café ☕ 電気", "", "x" * 64]


@pytest.fixture
def start_simulator() -> Iterator[Callable[..., KasaSimulator]]:
    """Start simulators for a test and stop every one of them afterwards."""
    started: list[KasaSimulator] = []

    def start(devices: list[SimulatedKasaDevice], **kwargs: Any) -> KasaSimulator:
        sim = KasaSimulator(devices, **kwargs)
        started.append(sim)
        return sim.start()

    yield start
    for sim in started:
        sim.stop()


async def connect(device: SimulatedKasaDevice, timeout: float = 5) -> Device:
    # DeviceConfig.timeout is annotated int; python-kasa passes it to asyncio as is.
    config = DeviceConfig(host=device.host, port_override=device.port, timeout=timeout)  # type: ignore[arg-type]
    return await Device.connect(config=config)


def expected_si(realtime: dict[str, Any]) -> dict[str, float | None]:
    """A dump's realtime reading in W, V, A and kWh, whichever shape it uses."""
    milli = {
        "power": "power_mw",
        "voltage": "voltage_mv",
        "current": "current_ma",
        "total": "total_wh",
    }
    if "power_mw" in realtime:
        return {q: realtime[k] / 1000 if k in realtime else None for q, k in milli.items()}
    return {q: realtime.get(q) for q in milli}


def caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return False


def raw_query(device: SimulatedKasaDevice, request: dict[str, Any]) -> dict[str, Any]:
    """One request over the real python-kasa transport, no retries."""

    async def query() -> dict[str, Any]:
        config = DeviceConfig(host=device.host, port_override=device.port, timeout=5)
        protocol = IotProtocol(transport=XorTransport(config=config))
        try:
            return await protocol.query(request, retry_count=0)
        finally:
            await protocol.close()

    return asyncio.run(query())


# -- wire format and fixtures ---------------------------------------------------


def test_xor_cipher_matches_python_kasa() -> None:
    text = json.dumps({"system": {"set_dev_alias": {"alias": "Café ☕\n"}}}, ensure_ascii=False)
    ours = xor_encrypt(text.encode())
    assert XorEncryption.encrypt(text) == struct.pack(">I", len(ours)) + ours
    assert XorEncryption.decrypt(ours) == text
    assert xor_decrypt(ours) == text.encode()


def test_fixture_lists_match_the_dumps() -> None:
    legacy = sorted(p.name for p in FIXTURES_DIR.glob("*.json") if not p.name.startswith("smart_"))
    assert sorted(LEGACY_FIXTURES) == legacy
    metering = [
        name
        for name in LEGACY_FIXTURES
        if {"emeter", "smartlife.iot.common.emeter"} & set(load_fixture(name))
    ]
    assert sorted(ENERGY_FIXTURES) == sorted(metering)


def test_load_fixture_by_prefix() -> None:
    assert load_fixture("KP115")["system"]["get_sysinfo"]["model"] == "KP115(EU)"
    assert load_fixture("HS110(EU)_1.0")["emeter"]["get_realtime"]["power"] == 0.928511
    with pytest.raises(ValueError, match="HS110"):
        load_fixture("HS110")  # two hardware versions
    with pytest.raises(ValueError, match="not a legacy"):
        SimulatedKasaDevice("smart_P110")


def test_loopback_hosts_are_unique_and_skip_the_discovery_address() -> None:
    hosts = [loopback_host(i) for i in range(600)]
    assert len(set(hosts)) == 600
    assert "127.0.0.1" not in hosts
    assert all(not h.endswith((".0", ".255")) for h in hosts)
    with pytest.raises(ValueError, match="loopback"):
        SimulatedKasaDevice("KP115", host="192.168.1.20")


# -- polling with python-kasa ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fixture", [f for f in ENERGY_FIXTURES if not f.startswith("HS300")])
def test_energy_readings_match_the_dump(fixture: str, start_simulator: Callable) -> None:
    sim_dev = SimulatedKasaDevice(fixture, host="127.0.0.2", alias="Plug under test")
    start_simulator([sim_dev])
    dump = load_fixture(fixture)
    realtime = (dump.get("emeter") or dump["smartlife.iot.common.emeter"])["get_realtime"]
    expected = expected_si(realtime)

    async def poll() -> None:
        dev = await connect(sim_dev)
        try:
            await dev.update()
            energy = dev.modules[Module.Energy]
            assert energy.current_consumption == pytest.approx(expected["power"])
            assert energy.voltage == pytest.approx(expected["voltage"])
            assert energy.current == pytest.approx(expected["current"])
            assert energy.consumption_total == pytest.approx(expected["total"])
            assert energy.consumption_today == pytest.approx(sim_dev.energy_today_kwh())
            if expected["total"] is not None:
                assert energy.consumption_today <= energy.consumption_this_month
                assert energy.consumption_this_month <= energy.consumption_total
            assert dev.has_emeter
            assert dev.alias == "Plug under test"
            assert dev.mac.upper() == sim_dev.mac
            assert dev.model.startswith(dump["system"]["get_sysinfo"]["model"].split("(")[0])
            assert dev.is_on
        finally:
            await dev.disconnect()

    asyncio.run(poll())


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["HS100", "HS103"])
def test_plug_without_meter_has_no_energy_module(fixture: str, start_simulator: Callable) -> None:
    sim_dev = SimulatedKasaDevice(fixture, host="127.0.0.3", relay_on=True)
    start_simulator([sim_dev])

    async def poll() -> None:
        dev = await connect(sim_dev)
        try:
            await dev.update()
            assert not dev.has_emeter
            assert Module.Energy not in dev.modules
            assert dev.is_on
        finally:
            await dev.disconnect()

    asyncio.run(poll())


@pytest.mark.slow
def test_strip_children_have_their_own_alias_and_readings(start_simulator: Callable) -> None:
    strip = SimulatedKasaDevice(
        "HS300", host="127.0.0.4", alias="Desk strip", child_aliases=HOSTILE_ALIASES
    )
    start_simulator([strip])
    for i in range(6):
        strip.set_realtime(power_w=10.5 * (i + 1), voltage_v=120.1, current_a=0.1 * i, child=i)
    strip.set_relay(False, child=5)

    async def poll() -> None:
        dev = await connect(strip)
        try:
            await dev.update()
            assert dev.alias == "Desk strip"
            assert [child.alias for child in dev.children] == HOSTILE_ALIASES
            ids = [child.device_id for child in dev.children]
            assert len(set(ids)) == 6
            assert all(child_id.startswith(dev.mac) for child_id in ids)
            for i, child in enumerate(dev.children[:5]):
                energy = child.modules[Module.Energy]
                assert child.is_on
                assert energy.current_consumption == pytest.approx(10.5 * (i + 1))
                assert energy.voltage == pytest.approx(120.1)
                assert energy.current == pytest.approx(0.1 * i)
                assert energy.consumption_total == pytest.approx(26.889)
            off = dev.children[5]
            assert not off.is_on
            assert off.modules[Module.Energy].current_consumption == 0

            # python-kasa switches one socket with a child context.
            await dev.children[0].turn_off()
            await dev.update()
            assert not dev.children[0].is_on
            assert dev.children[0].modules[Module.Energy].current_consumption == 0
            assert not strip.is_on(0)
            assert strip.is_on(1)
        finally:
            await dev.disconnect()

    asyncio.run(poll())


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["KP115", "HS110(EU)_1.0"])
def test_set_realtime_is_seen_on_next_update(fixture: str, start_simulator: Callable) -> None:
    sim_dev = SimulatedKasaDevice(fixture, host="127.0.0.5")
    start_simulator([sim_dev])

    async def poll() -> None:
        dev = await connect(sim_dev)
        try:
            energy = dev.modules[Module.Energy]
            today_before = energy.consumption_today
            total_before = energy.consumption_total
            sim_dev.set_realtime(
                power_w=1234.5, voltage_v=241.2, current_a=5.12, total_kwh=total_before + 0.5
            )
            await dev.update()
            energy = dev.modules[Module.Energy]
            assert energy.current_consumption == pytest.approx(1234.5)
            assert energy.voltage == pytest.approx(241.2)
            assert energy.current == pytest.approx(5.12)
            assert energy.consumption_total == pytest.approx(total_before + 0.5)
            # The energy added to the total was used today (Wh resolution on the wire).
            assert energy.consumption_today == pytest.approx(today_before + 0.5, abs=0.002)

            sim_dev.set_relay(False)
            await dev.update()
            assert not dev.is_on
            assert dev.modules[Module.Energy].current_consumption == 0
        finally:
            await dev.disconnect()

    asyncio.run(poll())


@pytest.mark.slow
def test_daily_and_monthly_stats(start_simulator: Callable) -> None:
    sim_dev = SimulatedKasaDevice("KP125", host="127.0.0.6")
    start_simulator([sim_dev])
    sim_dev.set_realtime(total_kwh=500.0, today_kwh=1.25)

    async def poll() -> None:
        dev = await connect(sim_dev)
        try:
            energy = dev.modules[Module.Energy]
            days = await energy.get_daily_stats()
            months = await energy.get_monthly_stats()
            assert max(days) == max(days.keys())
            assert days[max(days)] == pytest.approx(1.25)
            assert energy.consumption_today == pytest.approx(1.25)
            assert sum(days.values()) == pytest.approx(months[max(months)], abs=0.05)
            assert sum(months.values()) <= 500.0
            assert await energy.get_daily_stats(year=2001, month=1) == {}
        finally:
            await dev.disconnect()

    asyncio.run(poll())


@pytest.mark.slow
def test_unknown_modules_and_commands_get_device_errors(start_simulator: Callable) -> None:
    plug = SimulatedKasaDevice("HS100", host="127.0.0.7")
    start_simulator([plug])
    answer = raw_query(
        plug,
        {
            "emeter": {"get_realtime": {}},
            "smartlife.iot.homekit": {"setup_info_get": {}},
            "system": {"get_sysinfo": {}, "no_such_command": {}},
            "time": {"get_time": {}},
        },
    )
    assert answer["emeter"] == {"err_code": -1, "err_msg": "module not support"}
    assert answer["smartlife.iot.homekit"] == {"err_code": -1, "err_msg": "module not support"}
    assert answer["system"]["no_such_command"]["err_code"] == -2
    assert answer["system"]["get_sysinfo"]["mac"] == plug.mac
    assert answer["time"]["get_time"]["err_code"] == 0


@pytest.mark.slow
def test_strip_context_queries(start_simulator: Callable) -> None:
    strip = SimulatedKasaDevice("HS300", host="127.0.0.8")
    start_simulator([strip])
    strip.set_realtime(power_w=42.0, child=3)
    child_id = strip.child_ids[3]
    answer = raw_query(
        strip, {"context": {"child_ids": [child_id]}, "emeter": {"get_realtime": {}}}
    )
    assert answer["emeter"]["get_realtime"]["power_mw"] == 42000
    unknown = raw_query(strip, {"context": {"child_ids": ["nope"]}, "emeter": {"get_realtime": {}}})
    assert unknown["emeter"]["err_code"] != 0


@pytest.mark.slow
def test_overrides_let_several_copies_run_at_once(start_simulator: Callable) -> None:
    plugs = [
        SimulatedKasaDevice("KP115", host="127.0.0.9", mac="AA:BB:CC:00:00:01", device_id="D1"),
        SimulatedKasaDevice("KP115", host="127.0.0.10"),
        SimulatedKasaDevice("KP115", host="127.0.0.11"),
    ]
    start_simulator(plugs)
    assert len({p.mac for p in plugs}) == 3
    assert len({p.device_id for p in plugs}) == 3
    assert len({p.alias for p in plugs}) == 3
    answer = raw_query(plugs[0], {"system": {"get_sysinfo": {}}})["system"]["get_sysinfo"]
    assert (answer["mac"], answer["deviceId"]) == ("AA:BB:CC:00:00:01", "D1")


# -- discovery -----------------------------------------------------------------------


@pytest.mark.slow
def test_discovery_finds_every_device_at_its_own_address(start_simulator: Callable) -> None:
    fixtures = ["KP115", "HS110(EU)_4.0", "HS300", "HS100", "KL130"]
    devices = [SimulatedKasaDevice(f, host=loopback_host(i)) for i, f in enumerate(fixtures)]
    devices.append(SimulatedKasaDevice("EP25", host=loopback_host(10), mode="hang"))
    devices.append(SimulatedKasaDevice("EP25", host=loopback_host(11), mode="refuse"))
    devices.append(SimulatedKasaDevice("EP25", host=loopback_host(12), mode="garbage"))
    sim = start_simulator(devices)

    async def discover() -> None:
        found = await Discover.discover(
            target=sim.discovery_host, port=sim.port, discovery_timeout=1
        )
        try:
            assert sorted(found) == sorted(d.host for d in devices[:5])
            for sim_dev in devices[:5]:
                dev = found[sim_dev.host]
                await dev.update()
                assert dev.host == sim_dev.host
                assert dev.port == sim.port
                assert dev.alias == sim_dev.alias
                assert dev.mac.upper() == sim_dev.mac
        finally:
            for dev in found.values():
                await dev.disconnect()

    asyncio.run(discover())


@pytest.mark.slow
def test_probe_sent_to_one_device_gets_one_answer(start_simulator: Callable) -> None:
    devices = [SimulatedKasaDevice("KP125", host=loopback_host(i)) for i in range(3)]
    sim = start_simulator(devices)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        sock.sendto(xor_encrypt(b'{"system":{"get_sysinfo":{}}}'), (devices[1].host, sim.port))
        data, sender = sock.recvfrom(65536)
    assert sender == (devices[1].host, sim.port)
    assert json.loads(xor_decrypt(data))["system"]["get_sysinfo"]["mac"] == devices[1].mac


# -- failure modes --------------------------------------------------------------------


@pytest.mark.slow
def test_hang_times_out(start_simulator: Callable) -> None:
    sim_dev = SimulatedKasaDevice("KP115", host="127.0.0.12", mode="hang")
    start_simulator([sim_dev])
    with pytest.raises(KasaException) as raised:
        asyncio.run(connect(sim_dev, timeout=0.25))
    assert caused_by(raised.value, asyncio.TimeoutError)


@pytest.mark.slow
def test_garbage_is_a_python_kasa_error(start_simulator: Callable) -> None:
    sim_dev = SimulatedKasaDevice("HS110(EU)_1.0", host="127.0.0.13", mode="garbage")
    start_simulator([sim_dev])
    with pytest.raises(KasaException) as raised:
        asyncio.run(connect(sim_dev, timeout=2))
    assert caused_by(raised.value, ValueError)  # the JSON decoder failed


@pytest.mark.slow
def test_refuse_then_recover(start_simulator: Callable) -> None:
    sim_dev = SimulatedKasaDevice("KP115", host="127.0.0.14", mode="refuse")
    start_simulator([sim_dev])
    with pytest.raises(KasaException) as raised:
        asyncio.run(connect(sim_dev, timeout=2))
    assert caused_by(raised.value, ConnectionRefusedError)

    sim_dev.mode = "normal"

    async def poll() -> float | None:
        dev = await connect(sim_dev)
        await dev.disconnect()
        return dev.modules[Module.Energy].current_consumption

    assert asyncio.run(poll()) == pytest.approx(63.499)


@pytest.mark.slow
def test_delay_still_answers(start_simulator: Callable) -> None:
    sim_dev = SimulatedKasaDevice("KP125", host="127.0.0.15", delay_s=0.2)
    start_simulator([sim_dev])

    async def poll() -> float | None:
        dev = await connect(sim_dev, timeout=5)
        await dev.disconnect()
        return dev.modules[Module.Energy].current_consumption

    assert asyncio.run(poll()) == pytest.approx(100.277)


@pytest.mark.slow
def test_mode_change_drops_a_live_connection(start_simulator: Callable) -> None:
    sim_dev = SimulatedKasaDevice("KP115", host="127.0.0.16")
    start_simulator([sim_dev])

    async def poll() -> None:
        dev = await connect(sim_dev, timeout=2)
        try:
            sim_dev.mode = "garbage"
            with pytest.raises(KasaException):
                await dev.update()
            sim_dev.mode = "normal"
            await dev.update()  # python-kasa reconnects
            assert dev.modules[Module.Energy].current_consumption == pytest.approx(63.499)
        finally:
            await dev.disconnect()

    asyncio.run(poll())


# -- lifecycle and scale ----------------------------------------------------------------


@pytest.mark.slow
def test_restart_many_times_on_the_same_port() -> None:
    sim_dev = SimulatedKasaDevice("KP115", host="127.0.0.17")
    sim = KasaSimulator([sim_dev])
    try:
        for _ in range(10):
            with sim:
                answer = raw_query(sim_dev, {"system": {"get_sysinfo": {}}})
                assert answer["system"]["get_sysinfo"]["relay_state"] == 1
            with pytest.raises(KasaException):
                raw_query(sim_dev, {"system": {"get_sysinfo": {}}})
    finally:
        sim.stop()


@pytest.mark.slow
def test_add_and_remove_while_running(start_simulator: Callable) -> None:
    sim = start_simulator([SimulatedKasaDevice("KP115", host="127.0.0.18")])
    late = sim.add(SimulatedKasaDevice("HS100", host="127.0.0.19"))
    assert late.port == sim.port
    assert raw_query(late, {"system": {"get_sysinfo": {}}})["system"]["get_sysinfo"]
    sim.remove(late)
    with pytest.raises(KasaException):
        raw_query(late, {"system": {"get_sysinfo": {}}})
    with pytest.raises(ValueError, match="discovery address"):
        sim.add(SimulatedKasaDevice("KP115", host="127.0.0.1"))


@pytest.mark.slow
def test_address_clash_is_reported(start_simulator: Callable) -> None:
    sim = start_simulator([SimulatedKasaDevice("KP115", host="127.0.0.20")])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.21", sim.port))
        with pytest.raises(OSError, match=r"[Aa]ddress already in use"):
            sim.add(SimulatedKasaDevice("KP115", host="127.0.0.21"))
    assert [d.host for d in sim.devices] == ["127.0.0.20"]


@pytest.mark.slow
def test_five_hundred_devices(start_simulator: Callable) -> None:
    devices = make_devices(ENERGY_FIXTURES, 500)
    sim = start_simulator(devices)
    assert len({(d.host, d.port) for d in devices}) == 500
    assert len({d.mac for d in devices}) == 500

    async def run() -> None:
        for sim_dev in (devices[0], devices[257], devices[-1]):
            dev = await connect(sim_dev)
            assert dev.mac.upper() == sim_dev.mac
            await dev.disconnect()
        found = await Discover.discover(
            target=sim.discovery_host, port=sim.port, discovery_timeout=2
        )
        for dev in found.values():
            await dev.disconnect()
        assert sorted(found) == sorted(d.host for d in devices)

    asyncio.run(run())
