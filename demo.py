#!/usr/bin/env python3
"""See it work before owning a device: all five collectors against simulated
devices, into a real carbon-cache and graphite-web, on loopback.

    ./electricity demo                          a minute, or until Ctrl-C
    ./electricity demo --duration 15 --output /tmp/demo

Simulated, each speaking its real protocol: a Kasa power strip and plugs, two
Tuya plugs (protocols 3.3 and 3.4), an ESP32 posting meter pulses, a Glow
display publishing through a local Mosquitto broker, and Eastron SDM120 and
SDM630 meters behind a Modbus gateway. Each collector runs as its own
process, as on a Raspberry Pi, with the demo's settings in
<output>/config_local.py. A progress line shows series and points arriving;
at the end a table lists every series (points, last value) and a chart goes
to <output>/demo.png, the collectors' logs to <output>/logs/.

Nothing leaves 127.0.0.0/8: every simulator, server and collector binds to or
talks to loopback only, and settings from the environment are not passed on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import settings  # noqa: E402
from collector import format_table  # noqa: E402
from harness.carbon import (  # noqa: E402
    CarbonNotFoundError,
    CarbonServer,
    free_port,
    log_tail,
    spawn,
    terminate,
)

# Every collector polls or flushes this often in the demo (at home: 5 to 30 s).
INTERVAL_S = 5.0
PREFIX = "home.electricity"


def say(message: str) -> None:
    """Progress and notes go to stderr; stdout holds the summary table."""
    print(message, file=sys.stderr, flush=True)


class Unavailable(Exception):
    """A source cannot run here; the message says how to make it run."""


@dataclass
class Source:
    """A running simulated source and how its collector reads it."""

    name: str
    script: str
    what: str  # what is simulated, for the header
    args: list[str] = field(default_factory=list)  # the collector's own flags
    settings: dict[str, Any] = field(default_factory=dict)  # for config_local.py
    tick: Callable[[float], None] = lambda elapsed_s: None  # vary the load
    # The simulators behind it, by name, for benchmarks that play faults on them.
    controls: dict[str, Any] = field(default_factory=dict)


# --- The simulated home -----------------------------------------------------------

BASE_LOAD_W = 240.0  # lights, routers, standby


def appliance_watts(elapsed_s: float) -> dict[str, float]:
    """What each appliance draws ``elapsed_s`` into the demo: a busy minute."""
    t = elapsed_s % 60
    return {
        "kettle": 2950.0 if 8 <= t < 23 else 0.0,
        "fridge": 92.0 if int(elapsed_s // 20) % 2 == 0 else 3.0,
        "washing machine": 2100.0 if t < 30 else 320.0,
        "dishwasher": 1850.0 if 30 <= t < 50 else 12.0,
        "heat pump": 1100.0 + 350.0 * math.sin(elapsed_s / 9),
        "ev charger": 7200.0 if t >= 20 else 0.0,
    }


def house_watts(elapsed_s: float) -> float:
    """The whole-house meter: every appliance plus the base load."""
    return BASE_LOAD_W + sum(appliance_watts(elapsed_s).values())


class EnergyCounter:
    """kWh from the power a tick reports, for simulated meters' registers."""

    def __init__(self, start_kwh: float) -> None:
        self.kwh = start_kwh
        self._last_s: float | None = None

    def add(self, watts: float, elapsed_s: float) -> float:
        if self._last_s is not None:
            self.kwh += watts * (elapsed_s - self._last_s) / 3.6e6
        self._last_s = elapsed_s
        return self.kwh


def wait_for_port(address: tuple[str, int], timeout_s: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=0.5):
            return True
        stop.wait(0.2)
    return False


def background(stack: contextlib.ExitStack, run: Callable[[threading.Event], None]) -> None:
    """Run ``run(stop)`` in a thread until the demo ends."""
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(stop,), daemon=True)
    thread.start()

    def end() -> None:
        stop.set()
        thread.join(timeout=10)

    stack.callback(end)


# --- One block per source: start its simulated devices ------------------------------


def kasa_source(stack: contextlib.ExitStack, work: Path) -> Source:
    from simulators.kasa import KasaSimulator, SimulatedKasaDevice, loopback_host
    from simulators.kasa_smart import SimulatedSmartDevice, SmartKasaSimulator

    kettle = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(0), alias="Kettle")
    fridge = SimulatedKasaDevice("HS110(EU)_1.0_1.2.5.json", host=loopback_host(1), alias="Fridge")
    lamp = SimulatedKasaDevice("HS100(UK)_1.0_1.2.6.json", host=loopback_host(2), alias="Lamp")
    strip = SimulatedKasaDevice(
        "HS300(US)_1.0_1.0.21.json",
        host=loopback_host(3),
        alias="Office strip",
        child_aliases=["Desk", "Monitor", "Printer", "Router", "Charger", "Speaker"],
    )
    outlets_w = [24.5, 31.0, 3.2, 9.8, 0.0, 4.1]
    for outlet, watts in enumerate(outlets_w):
        strip.set_realtime(power_w=watts, voltage_v=240.5, current_a=watts / 240.5, child=outlet)
    counters = {kettle: EnergyCounter(412.5), fridge: EnergyCounter(1893.2)}
    for device, counter in counters.items():
        device.set_realtime(total_kwh=counter.kwh, today_kwh=0.8)
    simulator = stack.enter_context(KasaSimulator([kettle, fridge, lamp, strip]))
    # A Tapo plug (smart protocol over KLAP, the owner's TP-Link account),
    # found by the same discovery.
    account = {"username": "demo@example.com", "password": "demo-password"}
    tv = SimulatedSmartDevice(
        "smart_P110(UK)_1.0_1.3.0.json",
        host=loopback_host(4),
        alias="TV",
        username=account["username"],
        password=account["password"],
    )
    stack.enter_context(
        SmartKasaSimulator([tv], port=simulator.port, discovery_host=simulator.discovery_host)
    )
    tv.set_relay(True)

    def tick(elapsed_s: float) -> None:
        loads = appliance_watts(elapsed_s)
        for device, watts in ((kettle, loads["kettle"]), (fridge, loads["fridge"])):
            voltage = 241.0 + math.sin(elapsed_s / 7)
            device.set_realtime(
                power_w=watts,
                voltage_v=voltage,
                current_a=watts / voltage,
                total_kwh=counters[device].add(watts, elapsed_s),
            )
        lamp.set_relay(int(elapsed_s // 15) % 2 == 0)
        tv.set_energy(power_w=85.0 + 5.0 * math.sin(elapsed_s / 5))

    return Source(
        "kasa",
        "kasa_to_graphite.py",
        "a Kasa HS300 strip (6 outlets), 2 metering plugs, a plain one and a Tapo P110,"
        " found by discovery",
        args=["--target", f"{simulator.discovery_host}:{simulator.port}"],
        settings={
            "KASA_DISCOVERY_TIMEOUT_S": 1.0,
            "KASA_USERNAME": account["username"],
            "KASA_PASSWORD": account["password"],
        },
        tick=tick,
        controls={"kettle": kettle, "fridge": fridge, "lamp": lamp, "strip": strip, "tv": tv},
    )


def tuya_plug_entry(name: str, dev_id: str, key: str, version: str) -> dict[str, Any]:
    """A metering plug as `python -m tinytuya wizard` writes it in devices.json."""

    def integer(code: str, unit: str, scale: int) -> dict[str, Any]:
        values = {"unit": unit, "min": 0, "max": 100000, "scale": scale, "step": 1}
        return {"code": code, "type": "Integer", "values": values}

    return {
        "name": name,
        "id": dev_id,
        "key": key,
        "category": "cz",
        "product_name": "Smart plug (simulated)",
        "mapping": {
            "1": {"code": "switch_1", "type": "Boolean", "values": {}},
            "17": integer("add_ele", "", 3),
            "18": integer("cur_current", "mA", 0),
            "19": integer("cur_power", "W", 1),
            "20": integer("cur_voltage", "V", 1),
        },
        "ip": "127.0.0.1",
        "version": version,
    }


def tuya_source(stack: contextlib.ExitStack, work: Path) -> Source:
    from simulators.tuya import SimulatedTuyaDevice, TuyaSimulator, plug_dps

    entries = [
        tuya_plug_entry("Washing machine", "bf0demo33washer00000x", "0123456789abcdef", "3.3"),
        tuya_plug_entry("Dishwasher", "bf0demo34dishwash000x", "fedcba9876543210", "3.4"),
    ]
    appliances = {"Washing machine": "washing machine", "Dishwasher": "dishwasher"}
    # Ports of their own (not 0), so the simulator can stop and start again on them.
    plugs = {
        entry["name"]: SimulatedTuyaDevice.from_devices_json(
            entry, dps=plug_dps(0.0), port=free_port()
        )
        for entry in entries
    }
    simulator = TuyaSimulator(list(plugs.values())).start()
    stack.callback(simulator.stop)
    devices_json = work / "devices.json"
    devices_json.write_text(json.dumps(entries, indent=1), encoding="utf-8")

    def tick(elapsed_s: float) -> None:
        loads = appliance_watts(elapsed_s)
        for name, plug in plugs.items():
            plug.set_dps(plug_dps(loads[appliances[name]], 239.0), push=False)

    return Source(
        "tuya",
        "tuya_to_graphite.py",
        "2 Tuya plugs, protocols 3.3 and 3.4, from a wizard-style devices.json",
        args=["--devices", str(devices_json)],
        settings={
            "TUYA_ADDRESSES": {p.dev_id: f"{p.host}:{p.port}" for p in plugs.values()},
            # Devices announce themselves over UDP; the demo's have addresses.
            "TUYA_ANNOUNCE_BIND": "127.0.0.1",
            "TUYA_ANNOUNCE_PORTS": [free_port()],
            "TUYA_ANNOUNCE_LISTEN_S": 1.0,
        },
        tick=tick,
        controls={"simulator": simulator, **plugs},
    )


def esp32_source(stack: contextlib.ExitStack, work: Path) -> Source:
    from simulators.esp32 import SimulatedEsp32

    port = free_port()
    token = "demo-token-not-a-secret"
    esp32 = SimulatedEsp32(
        f"http://127.0.0.1:{port}/api/v1/readings",
        token,
        "esp32-meter",
        imp_per_kwh=1000,
        power_watts=house_watts(0),
        post_interval_s=INTERVAL_S,
    )

    def post_pulses(stop: threading.Event) -> None:
        # The device boots with the receiver: first posts go out once it listens.
        if wait_for_port(("127.0.0.1", port), 60, stop):
            esp32.flush()  # a first reading at once, not after a post interval
            esp32.run(24 * 3600, stop=stop)

    background(stack, post_pulses)

    def tick(elapsed_s: float) -> None:
        esp32.power_watts = house_watts(elapsed_s)

    return Source(
        "esp32",
        "esp32_receiver.py",
        "an ESP32 on the smart meter's LED (1000 imp/kWh), posting every 5 s",
        args=["--bind", "127.0.0.1", "--port", str(port)],
        settings={"ESP32_TOKEN": token},
        tick=tick,
    )


def mqtt_source(stack: contextlib.ExitStack, work: Path) -> Source:
    from harness.mosquitto import MosquittoBroker, MosquittoNotFoundError
    from simulators.glow import Publisher, SimulatedGlow

    try:
        broker = MosquittoBroker(work / "mosquitto").start()
    except MosquittoNotFoundError:
        raise Unavailable(
            "Mosquitto is not installed: `sudo apt install mosquitto` (the others run)"
        ) from None
    stack.callback(broker.stop)
    interval_s = int(INTERVAL_S)
    glow = SimulatedGlow(start=int(time.time()) - interval_s, interval_s=interval_s)

    def publish(stop: threading.Event) -> None:
        with Publisher(broker.host, broker.port) as publisher:
            while not stop.wait(interval_s):
                try:
                    publisher.publish_all(glow.step(interval_s))
                except (RuntimeError, ValueError):
                    # The broker restarted: paho reconnects and sends what it queued,
                    # as a real display goes on publishing.
                    continue

    background(stack, publish)

    def tick(elapsed_s: float) -> None:
        glow.power_kw = house_watts(elapsed_s) / 1000

    return Source(
        "mqtt",
        "mqtt_to_graphite.py",
        "a Glow display (electricity and gas) publishing through a local Mosquitto",
        args=["--broker", f"{broker.host}:{broker.port}"],
        settings={"MQTT_HEALTH_INTERVAL_S": INTERVAL_S},
        tick=tick,
        controls={"broker": broker},
    )


def circuit_source(stack: contextlib.ExitStack, work: Path) -> Source:
    from simulators.sdm import ModbusMeterSimulator, SimulatedSDM120, SimulatedSDM630

    heat_pump = SimulatedSDM120(voltage_v=238.5, power_factor=0.97, import_kwh=5210.3)
    ev_charger = SimulatedSDM630(import_kwh=3120.8)
    gateway = stack.enter_context(ModbusMeterSimulator(meters={1: heat_pump, 2: ev_charger}))
    host, port = gateway.address
    heat_pump_kwh, ev_kwh = EnergyCounter(5210.3), EnergyCounter(3120.8)

    def tick(elapsed_s: float) -> None:
        loads = appliance_watts(elapsed_s)
        heat_pump.set(
            power_w=loads["heat pump"],
            import_kwh=heat_pump_kwh.add(loads["heat pump"], elapsed_s),
        )
        for phase in (1, 2, 3):
            ev_charger.set_phase(phase, voltage_v=237.0 + phase, power_w=loads["ev charger"] / 3)
        ev_charger.set(import_kwh=ev_kwh.add(loads["ev charger"], elapsed_s))

    def circuit(name: str, unit: int, profile: str) -> dict[str, Any]:
        """One CIRCUITS entry, as in a home's config_local.py."""
        return {
            "name": name,
            "kind": "modbus-tcp",
            "connection": f"{host}:{port}",
            "unit": unit,
            "profile": profile,
        }

    return Source(
        "circuit",
        "circuit_to_graphite.py",
        "an SDM120 (heat pump) and an SDM630 (EV charger) behind a Modbus TCP gateway",
        settings={
            "CIRCUITS": [circuit("Heat pump", 1, "sdm120"), circuit("EV charger", 2, "sdm630")]
        },
        tick=tick,
        controls={"gateway": gateway, "heat pump": heat_pump, "ev charger": ev_charger},
    )


SOURCES: list[Callable[[contextlib.ExitStack, Path], Source]] = [
    kasa_source,
    tuya_source,
    esp32_source,
    mqtt_source,
    circuit_source,
]
SOURCE_NAMES = [make.__name__[: -len("_source")] for make in SOURCES]


# --- The collectors -------------------------------------------------------------------


def write_config(path: Path, carbon: CarbonServer, sources: list[Source]) -> None:
    """The demo's config_local.py: the same names a home's own file uses."""
    host, port = carbon.line_address
    lines = [
        "# The demo's settings (written by demo.py): your own config_local.py",
        "# uses the same names, see config.py.",
        f"CARBON_HOST = {host!r}",
        f"CARBON_PORT = {port!r}",
        f"PLUG_INTERVAL_S = {INTERVAL_S!r}",
        f"METER_INTERVAL_S = {INTERVAL_S!r}",
        f"CIRCUIT_INTERVAL_S = {INTERVAL_S!r}",
        "DEVICE_TIMEOUT_S = 4.0",
    ]
    for source in sources:
        lines.append(f"\n# {source.name}: {source.what}")
        lines.extend(f"{name} = {value!r}" for name, value in source.settings.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def collector_environment() -> dict[str, str]:
    """This environment without settings: a CARBON_HOST or KASA_HOSTS exported
    for the home must not send the demo to the LAN."""
    names = set(settings.defaults()) | set(settings.ENV_ALIASES.values())
    names.add(settings.LOCAL_CONFIG_ENV)
    env = {key: value for key, value in os.environ.items() if key not in names}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Running:
    source: Source
    process: subprocess.Popen
    log_path: Path
    reported: bool = False  # an early exit was reported


def start_collector(source: Source, config: Path, state_dir: Path, logs: Path) -> Running:
    log_path = logs / f"{source.name}.log"
    log_path.write_bytes(b"")
    command = [
        sys.executable,
        str(ROOT / source.script),
        "--config",
        str(config),
        "--state-dir",
        str(state_dir),
        *source.args,
    ]
    process = spawn(command, log_path, env=collector_environment(), cwd=ROOT)
    return Running(source, process, log_path)


# --- Reading back: progress, summary, chart ----------------------------------------


def source_of(path: str) -> str:
    """The collector behind a metric path."""
    parts = path.split(".")
    if parts[:2] == ["home", "gas"]:
        return "mqtt"  # the Glow display's gas meter
    group = parts[2] if len(parts) > 2 else ""
    if group == "health" and len(parts) > 3:
        return parts[3]
    return {"meter": "esp32", "glow": "mqtt"}.get(group, group)


def is_health(path: str) -> bool:
    return path.startswith(f"{PREFIX}.health.")


Series = dict[str, list[tuple[int, float]]]


def read_whisper(carbon: CarbonServer, since: int) -> Series:
    series = {}
    for path in carbon.metric_paths():
        with contextlib.suppress(Exception):  # a file carbon is creating right now
            series[path] = carbon.fetch(path, from_ts=since)
    return series


def read_graphite_web(graphite: Any, since: int) -> Series:
    """Every series through graphite-web's /render, as Grafana reads it."""
    window = f"-{int(time.time()) - since + 5}s"
    series = {}
    for item in graphite.render(["home.*.*.*", "home.*.*.*.*"], from_=window):
        points = [(int(ts), value) for value, ts in item["datapoints"] if value is not None]
        if points:
            series[item["target"]] = points
    return series


def progress(elapsed_s: float, duration_s: float, series: Series, names: list[str]) -> str:
    counts = {name: [0, 0] for name in names}
    for path, points in series.items():
        if not is_health(path) and source_of(path) in counts:
            counts[source_of(path)][0] += 1
            counts[source_of(path)][1] += len(points)
    parts = "  ".join(f"{name} {n}/{p}" for name, (n, p) in counts.items())
    return f"{elapsed_s:3.0f}/{duration_s:g} s  series/points: {parts}"


def summary_tables(series: Series) -> str:
    """Every series (points, last value), then each collector's own health."""

    def order(path: str) -> tuple[int, str]:
        name = source_of(path)
        return (SOURCE_NAMES.index(name) if name in SOURCE_NAMES else len(SOURCE_NAMES), path)

    rows = [
        (path, str(len(series[path])), f"{series[path][-1][1]:g}")
        for path in sorted(series, key=order)
        if not is_health(path)
    ]
    health = []
    for name in SOURCE_NAMES:
        figures = [
            series.get(f"{PREFIX}.health.{name}.{figure}")
            for figure in ("devices_ok", "devices_failed", "metrics_sent", "spool_lines")
        ]
        if any(figures):
            health.append((name, *(f"{f[-1][1]:g}" if f else "-" for f in figures)))
    return (
        format_table(("series", "points", "last value"), rows)
        + "\n"
        + format_table(("collector", "devices ok", "failed", "lines sent", "in spool"), health)
    )


def write_chart(series: Series, names: list[str], path: Path, started: int) -> bool:
    """Power of every device, one panel per collector. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = []
    for name in names:
        found = {
            path: points
            for path, points in series.items()
            if source_of(path) == name and path.endswith(".power_watts") and not is_health(path)
        }
        if found:
            panels.append((name, found))
    if not panels:
        return False
    figure, _ = plt.subplots(len(panels), 1, figsize=(10, 2.4 * len(panels)), sharex=True)
    for axis, (name, found) in zip(list(figure.axes), panels):
        for metric_path, points in sorted(found.items()):
            label = ".".join(metric_path.split(".")[2:-1])
            times = [ts - started for ts, _ in points]
            axis.plot(times, [v for _, v in points], marker=".", label=label)
        axis.set_title(f"{name}: power_watts", fontsize=9, loc="left")
        axis.set_ylabel("W")
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axis.grid(alpha=0.3)
    figure.axes[-1].set_xlabel("seconds into the demo")
    figure.suptitle("Home electricity demo: simulated devices, real collectors, real Carbon")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


# --- Run it ------------------------------------------------------------------------------


def start_graphite_web(stack: contextlib.ExitStack, work: Path, carbon: CarbonServer) -> Any:
    """graphite-web over the carbon-cache, or None (the summary then reads the
    whisper files, as graphite-web would)."""
    from harness.graphite_web import GraphiteWeb, GraphiteWebNotFoundError

    try:
        graphite = GraphiteWeb(work / "graphite-web", carbon).start()
    except GraphiteWebNotFoundError as exc:
        say(f"  graphite-web skipped: {exc}")
        return None
    except Exception as exc:  # the demo goes on with the whisper files
        say(f"  graphite-web skipped: it did not start: {exc}")
        return None
    stack.callback(graphite.stop)
    return graphite


def start_sources(stack: contextlib.ExitStack, work: Path) -> list[Source]:
    sources = []
    for make, name in zip(SOURCES, SOURCE_NAMES):
        try:
            source = make(stack, work)
        except Unavailable as exc:
            say(f"  {name:8} skipped: {exc}")
            continue
        except Exception as exc:  # one source that cannot start never takes down the others
            say(f"  {name:8} skipped: it did not start: {exc.__class__.__name__}: {exc}")
            continue
        if not (ROOT / source.script).is_file():
            say(f"  {name:8} skipped: {source.script} is not in this checkout")
            continue
        sources.append(source)
        say(f"  {name:8} {source.what}")
    return sources


def watch(
    sources: list[Source], running: list[Running], carbon: CarbonServer, duration_s: float
) -> float:
    """Vary the load and show what arrives, until the time is up or Ctrl-C.
    Returns the wall time the demo started."""
    names = [source.name for source in sources]
    interactive = sys.stderr.isatty()
    started = time.time()
    last_shown = -math.inf
    try:
        while (elapsed := time.time() - started) < duration_s:
            for source in sources:
                source.tick(elapsed)
            for item in running:
                if item.process.poll() is not None and not item.reported:
                    item.reported = True
                    say(
                        f"\n{item.source.name}: collector exited with status "
                        f"{item.process.returncode}:\n{log_tail(item.log_path, 5)}"
                    )
            line = progress(elapsed, duration_s, read_whisper(carbon, int(started)), names)
            if interactive:
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
            elif elapsed - last_shown >= 10:  # a log, not a terminal: a line now and then
                say(line)
                last_shown = elapsed
            time.sleep(1.0 - (time.time() - started) % 1.0)
    except KeyboardInterrupt:
        say("\nstopping early")
    if interactive:
        say("")
    return started


def read_back(carbon: CarbonServer, graphite: Any, since: int) -> Series:
    """Every series, through graphite-web when it runs (as Grafana reads them)."""
    series = settle(carbon, since)
    if graphite is not None:
        try:
            series = read_graphite_web(graphite, since)
            say(f"read back through graphite-web ({graphite.url})")
        except Exception as exc:  # the whisper files hold the same
            say(f"graphite-web did not answer ({exc}); read back from the whisper files")
    return series


def settle(
    carbon: CarbonServer, since: int, quiet_s: float = 2.0, timeout_s: float = 15.0
) -> Series:
    """The whisper files once carbon has written what it was sent (no new
    point for ``quiet_s``)."""
    deadline = time.monotonic() + timeout_s
    last_total, last_change = -1, time.monotonic()
    while True:
        series = read_whisper(carbon, since)
        total = sum(map(len, series.values()))
        if total != last_total:
            last_total, last_change = total, time.monotonic()
        if time.monotonic() - last_change >= quiet_s or time.monotonic() > deadline:
            return series
        time.sleep(0.25)


def report(series: Series, names: list[str], output: Path, started: int) -> int:
    """The summary on stdout and the chart; 1 when a collector sent nothing."""
    print(summary_tables(series))
    chart = output / "demo.png"
    if write_chart(series, names, chart, started):
        say(f"chart: {chart}")
    else:
        say("no chart: matplotlib is missing (pip install -r requirements-dev.txt)")
    sent = {source_of(path) for path in series if not is_health(path)}
    for name in names:
        if name not in sent:
            say(f"demo: {name} sent nothing; see {output / 'logs' / (name + '.log')}")
    return 0 if sent >= set(names) else 1


def run(duration_s: float, output: Path) -> int:
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()  # closed first: servers stop before their files go
    with tempfile.TemporaryDirectory(prefix="electricity-demo-") as temp, stack:
        work = Path(temp)
        try:
            carbon = CarbonServer(work / "carbon").start()
        except CarbonNotFoundError as exc:
            say(f"demo: {exc}")
            return 2
        stack.callback(carbon.stop)
        graphite = start_graphite_web(stack, work, carbon)
        sources = start_sources(stack, work)

        config = output / "config_local.py"
        write_config(config, carbon, sources)
        for source in sources:  # the first readings are of the demo's home
            source.tick(0.0)
        running = [start_collector(s, config, work / "state", logs) for s in sources]
        stack.callback(lambda: [terminate(item.process) for item in running])
        say(f"collectors sending to carbon-cache at {carbon.host}:{carbon.port}")
        if graphite is not None:
            say(f"graphite-web: {graphite.url}/render?format=json&target={PREFIX}.*.*.power_watts")
        say(f"settings: {config}; logs: {logs}/; Ctrl-C ends early")

        started = int(watch(sources, running, carbon, duration_s))
        # SIGTERM: each collector sends (or spools) what it holds, then exits.
        for item in running:
            terminate(item.process, timeout_s=30)
        series = read_back(carbon, graphite, started)
        return report(series, [source.name for source in sources], output, started)


def stop_early(signum: int, frame: Any) -> None:
    """SIGTERM ends the demo as Ctrl-C does: summary, chart, everything stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "demo-output",
        help="where the chart, the logs and the demo's settings go (default demo-output/)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, stop_early)
    say("Simulated on 127.0.0.0/8, read by the real collectors:")
    return run(args.duration, args.output)


if __name__ == "__main__":
    sys.exit(main())
