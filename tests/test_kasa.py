"""kasa_to_graphite end to end: simulated devices speaking the real legacy
protocol to the real python-kasa, lines into a real carbon-cache."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import collector
import kasa_to_graphite
from runtime import Runtime
from simulators.kasa import (
    ENERGY_FIXTURES,
    KasaSimulator,
    SimulatedKasaDevice,
    load_fixture,
    loopback_host,
)
from tests.helpers import carbon_arg, run_collector, start_collector, stop_collector

# Every test here starts a server, a simulated device or a process.
pytestmark = pytest.mark.slow

PREFIX = "home.electricity.kasa"


def expected_si(fixture: str) -> dict[str, float]:
    """The dump's realtime reading in SI units, whatever shape it uses."""
    dump = load_fixture(fixture)
    module = "emeter" if "emeter" in dump else "smartlife.iot.common.emeter"
    realtime = dump[module]["get_realtime"]
    figures = {}
    for name, milli, plain in (
        ("power_watts", "power_mw", "power"),
        ("voltage_volts", "voltage_mv", "voltage"),
        ("current_amps", "current_ma", "current"),
        ("energy_kwh", "total_wh", "total"),
    ):
        if milli in realtime:
            figures[name] = realtime[milli] / 1000
        elif plain in realtime:
            figures[name] = realtime[plain]
    return figures


@pytest.fixture
def env(collector_env):
    """Environment for a collector process: no user config, short timeouts."""
    return {**collector_env, "KASA_DISCOVERY_TIMEOUT_S": "1", "DEVICE_TIMEOUT_S": "3"}


def run_kasa(args, env, timeout_s=60):
    return run_collector("kasa_to_graphite.py", args, env, timeout_s)


def start_kasa(args, env):
    return start_collector("kasa_to_graphite.py", args, env)


METERING_PLUGS = [fixture for fixture in ENERGY_FIXTURES if "HS300" not in fixture]


@pytest.mark.parametrize("fixture", METERING_PLUGS, ids=lambda name: name.removesuffix(".json"))
def test_every_metering_dump_lands_in_si_units(fixture, carbon_server, env):
    device = SimulatedKasaDevice(fixture, host=loopback_host(0), alias="plug")
    with KasaSimulator([device]) as sim:
        result = run_kasa(
            ["--once", "--target", f"127.0.0.1:{sim.port}", "--carbon", carbon_arg(carbon_server)],
            env,
        )
        assert result.returncode == 0, result.stderr
        for metric, value in expected_si(fixture).items():
            points = carbon_server.wait_for_points(f"{PREFIX}.plug.{metric}")
            assert points[-1][1] == pytest.approx(value, rel=1e-6), metric
        today = carbon_server.wait_for_points(f"{PREFIX}.plug.energy_today_kwh")
        assert today[-1][1] == pytest.approx(device.energy_today_kwh(), abs=1e-3)
        is_on = carbon_server.wait_for_points(f"{PREFIX}.plug.is_on")
        assert is_on[-1][1] == (1.0 if device.is_on() else 0.0)


def test_float_and_milli_shapes(carbon_server, env):
    """HS110 v1 reports float W/V/A/kWh, KP115 integer mW/mV/mA/Wh: same SI out."""
    hs110 = SimulatedKasaDevice("HS110(EU)_1.0_1.2.5.json", host=loopback_host(0), alias="old")
    kp115 = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(1), alias="new")
    with KasaSimulator([hs110, kp115]) as sim:
        hs110.set_realtime(power_w=1234.5, voltage_v=239.9, current_a=5.15, total_kwh=812.25)
        kp115.set_realtime(power_w=1234.5, voltage_v=239.9, current_a=5.15, total_kwh=812.25)
        hosts = [f"{d.host}:{sim.port}" for d in (hs110, kp115)]
        args = ["--once", "--carbon", carbon_arg(carbon_server)]
        for host in hosts:
            args += ["--host", host]
        result = run_kasa(args, env)
        assert result.returncode == 0, result.stderr
        for name in ("old", "new"):
            got = {
                metric: carbon_server.wait_for_points(f"{PREFIX}.{name}.{metric}")[-1][1]
                for metric in ("power_watts", "voltage_volts", "current_amps", "energy_kwh")
            }
            assert got == pytest.approx(
                {
                    "power_watts": 1234.5,
                    "voltage_volts": 239.9,
                    "current_amps": 5.15,
                    "energy_kwh": 812.25,
                },
                rel=1e-3,
            )


HOSTILE_ALIASES = ["Desk\nlamp 9 1", "TV. set/box", "Küche Kühl", "a b c 1 2", "../..", ""]


def test_strip_outlets_are_devices_and_aliases_cannot_inject(carbon_server, env):
    strip = SimulatedKasaDevice(
        "HS300(US)_1.0_1.0.21.json",
        host=loopback_host(0),
        alias="Strip",
        child_aliases=HOSTILE_ALIASES,
    )
    with KasaSimulator([strip]) as sim:
        for index in range(6):
            strip.set_realtime(power_w=10.0 * (index + 1), child=index)
        result = run_kasa(
            ["--once", "--host", f"{strip.host}:{sim.port}", "--carbon", carbon_arg(carbon_server)],
            env,
        )
        assert result.returncode == 0, result.stderr
    names = ["desk_lamp_9_1", "tv_setbox", "kuche_kuhl", "a_b_c_1_2"]
    for index, name in enumerate(names):
        points = carbon_server.wait_for_points(f"{PREFIX}.{name}.power_watts")
        assert points[-1][1] == pytest.approx(10.0 * (index + 1))
    # "../.." and "" have no usable characters: the outlet's stable id names them.
    carbon_server.wait_for_total(6 * 6, [p for p in carbon_server.metric_paths()])
    paths = carbon_server.metric_paths()
    device_segments = {p.split(".")[3] for p in paths if p.startswith(PREFIX + ".")}
    assert len(device_segments) == 6
    for path in paths:
        assert all(segment and segment.isascii() for segment in path.split("."))
        assert len(path.split(".")) in (5,), path


def test_dead_device_does_not_delay_the_others(carbon_server, tmp_path):
    """A plug that accepts TCP and never answers: the live plugs' lines are
    sent before its timeout expires."""
    live = [
        SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(i), alias=f"live {i}")
        for i in range(3)
    ]
    dead = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(3), alias="dead")
    timeout_s = 4.0
    with KasaSimulator([*live, dead]) as sim:
        settings_env = {
            "ELECTRICITY_STATE_DIR": str(tmp_path / "state"),
            "DEVICE_TIMEOUT_S": str(timeout_s),
            "KASA_DISCOVERY_TIMEOUT_S": "1",
        }
        local = tmp_path / "config_local.py"
        local.write_text("")
        from settings import load_settings

        settings = load_settings(
            env=settings_env,
            local_path=local,
            overrides={
                "KASA_HOSTS": [f"{d.host}:{sim.port}" for d in [*live, dead]],
                "KASA_DISCOVERY_ENABLED": False,
                "CARBON_DESTINATIONS": [carbon_arg(carbon_server)],
            },
        )
        runtime = Runtime("kasa", settings)
        sent_at = []
        original = runtime.sink.submit  # hands lines to the spool and the sender

        def recording_send(lines):
            sent_at.append((time.monotonic(), list(lines)))
            return original(lines)

        runtime.sink.submit = recording_send

        async def scenario():
            kasa = kasa_to_graphite.KasaCollector(runtime, args=None)
            loop = collector.PollLoop(kasa, interval_s=30)
            await loop.rediscover()
            assert len(loop.devices) == 4
            dead.mode = "hang"
            started = time.monotonic()
            ok, failed, delivered = await loop.cycle(int(time.time()))
            finished = time.monotonic()
            await kasa.close()
            return started, finished, ok, failed, delivered

        try:
            started, finished, ok, failed, delivered = asyncio.run(scenario())
        finally:
            runtime.close()
    assert (ok, failed, delivered) == (3, 1, True)
    # The cycle waited for the dead plug, once (python-kasa must not retry past it).
    assert timeout_s <= finished - started < 2 * timeout_s
    device_sends = [(at, lines) for at, lines in sent_at if "health" not in lines[0]]
    live_lines = [line for _, lines in device_sends for line in lines]
    assert {line.split(".")[3] for line in live_lines} == {"live_0", "live_1", "live_2"}
    # ...but the live plugs' lines had gone out long before.
    assert all(at - started < timeout_s / 2 for at, _ in device_sends)
    carbon_server.wait_for_points(f"{PREFIX}.live_2.power_watts")


def contiguous(points, step):
    stamps = [ts for ts, _ in points]
    return stamps == list(range(stamps[0], stamps[-1] + step, step))


def test_carbon_outage_then_back_every_sample_lands(carbon_server, env):
    plug = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(0), alias="p")
    path = f"{PREFIX}.p.power_watts"
    with KasaSimulator([plug]) as sim:
        process = start_kasa(
            [
                "--host",
                f"{plug.host}:{sim.port}",
                "--interval",
                "1",
                "--carbon",
                carbon_arg(carbon_server),
            ],
            {**env, "CARBON_TIMEOUT_S": "1"},
        )
        try:
            carbon_server.wait_for_points(path, count=2, timeout_s=20)
            carbon_server.stop()
            time.sleep(5)  # several cycles with Carbon down: they go to the spool
            outage_end = int(time.time())
            carbon_server.start()
            points = carbon_server.wait_for(
                lambda: [p for p in [carbon_server.fetch(path)] if p and p[-1][0] > outage_end + 1],
                timeout_s=20,
                what="points after the outage",
            )[0]
        finally:
            code = stop_collector(process)
        stderr = process.stderr.read()
    assert code == 0, stderr
    assert "Carbon unreachable" in stderr
    if "overran" not in stderr:  # a loaded machine may skip a boundary; that is logged
        assert contiguous(points, 1), points


def test_killed_during_outage_replays_spool_after_restart(carbon_server, env, tmp_path):
    plug = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(0), alias="p")
    path = f"{PREFIX}.p.power_watts"
    args = ["--host", "", "--interval", "1", "--carbon", carbon_arg(carbon_server)]
    with KasaSimulator([plug]) as sim:
        args[1] = f"{plug.host}:{sim.port}"
        first = start_kasa(args, {**env, "CARBON_TIMEOUT_S": "1"})
        try:
            carbon_server.wait_for_points(path, count=1, timeout_s=20)
            carbon_server.stop()
            outage_start = int(time.time())
            time.sleep(4)
        finally:
            first.kill()  # a crash: no chance to flush anything
            first.wait()
        outage_end = int(time.time())
        spool = Path(env["ELECTRICITY_STATE_DIR"]) / "kasa" / "spool"
        spooled = sum(f.read_text().count("\n") for f in spool.glob("*.spool"))
        assert spooled > 0
        carbon_server.start()
        second = start_kasa(args, env)
        try:
            points = carbon_server.wait_for(
                lambda: [
                    p
                    for p in [carbon_server.fetch(path)]
                    if sum(outage_start < ts < outage_end for ts, _ in p) >= 2
                ],
                timeout_s=20,
                what="spooled points replayed",
            )[0]
        finally:
            assert stop_collector(second) == 0
    assert sum(outage_start < ts < outage_end for ts, _ in points) >= 2


def test_discover_lists_devices_and_sends_nothing(carbon_server, env):
    devices = [
        SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(0), alias="Kettle"),
        SimulatedKasaDevice("HS100(UK)_1.0_1.2.6.json", host=loopback_host(1), alias="Lamp"),
        SimulatedKasaDevice("HS300(US)_1.0_1.0.21.json", host=loopback_host(2), alias="Strip"),
    ]
    with KasaSimulator(devices) as sim:
        result = run_kasa(
            [
                "--discover",
                "--target",
                f"127.0.0.1:{sim.port}",
                "--carbon",
                carbon_arg(carbon_server),
            ],
            env,
        )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "mac", "address", "model", "energy", "meter"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"Kettle", "Lamp", "Strip"}
    assert rows["Kettle"].rstrip().endswith("yes")
    assert rows["Lamp"].rstrip().endswith("no")
    assert devices[0].mac in rows["Kettle"]
    time.sleep(1)
    assert carbon_server.metric_paths() == []


def test_dry_run_prints_only_lines(env):
    plug = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(0), alias="p")
    with KasaSimulator([plug]) as sim:
        result = run_kasa(["--once", "--dry-run", "--host", f"{plug.host}:{sim.port}"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines
    assert all(len(line.split()) == 3 for line in lines)
    assert f"{PREFIX}.p.power_watts 63.499" in result.stdout


def test_exit_codes(env, tmp_path):
    from harness.carbon import free_port

    plug = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(0), alias="p")
    with KasaSimulator([plug]) as sim:
        host = f"{plug.host}:{sim.port}"
        # Carbon unreachable: 1, one line on stderr, the lines in the spool.
        result = run_kasa(
            ["--once", "--host", host, "--carbon", f"127.0.0.1:{free_port()}"],
            {**env, "CARBON_TIMEOUT_S": "1"},
        )
        assert result.returncode == 1
        assert "lines kept in the spool" in result.stderr.splitlines()[-1]
    # No device answered: 3.
    result = run_kasa(["--once", "--dry-run", "--host", f"127.0.0.9:{free_port()}"], env)
    assert result.returncode == 3, result.stderr
    # A bad setting: 2, one line naming it, before any polling.
    result = run_kasa(["--once"], {**env, "CARBON_PORT": "twenty"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kasa: CARBON_PORT:"), lines
