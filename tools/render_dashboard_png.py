#!/usr/bin/env python3
"""docs/dashboard.png: the dashboard's key graphs, drawn from a real graphite-web
that the real collectors filled from a simulated home.

    .venv/bin/python tools/render_dashboard_png.py [--hours 6] [--days 7] [--out FILE]

Starts carbon-cache (with graphite/'s storage configs), graphite-web and
Mosquitto on loopback in a temporary directory, and simulates a home:
Kasa plugs (one a Tapo P110 on KLAP), Tuya plugs and two Eastron circuit
meters answering the real collector code, an ESP32 pulse reader posting to the real receiver, and a
Glow display publishing to the real MQTT collector. The history is
backdated: the ESP32 and the Glow display run on simulated clocks and stamp
their own readings; the plugs and circuit meters are polled by the
collectors' own poll loop (``collector.PollLoop.cycle``) with backdated
cycle times. The figures are then drawn from graphite-web's JSON renders of
the dashboard's own queries (grafana/dashboards/home-electricity.json).

tests/test_grafana.py fills its graphite-web with the same ``SimulatedHome``.
Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import random
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's modules are one level up
    sys.path.insert(0, str(ROOT))

import circuit_to_graphite  # noqa: E402
import collector  # noqa: E402
import kasa_to_graphite  # noqa: E402
import settings as settings_module  # noqa: E402
import tuya_to_graphite  # noqa: E402
from harness.carbon import CarbonServer, free_port, spawn, terminate  # noqa: E402
from harness.graphite_web import GraphiteWeb  # noqa: E402
from harness.mosquitto import MosquittoBroker  # noqa: E402
from runtime import Runtime, build_parser  # noqa: E402
from simulators.esp32 import SimClock, SimulatedEsp32  # noqa: E402
from simulators.glow import Publisher, SimulatedGlow  # noqa: E402
from simulators.kasa import KasaSimulator, SimulatedKasaDevice  # noqa: E402
from simulators.kasa_smart import SimulatedSmartDevice, SmartKasaSimulator  # noqa: E402
from simulators.sdm import ModbusMeterSimulator, SimulatedSDM120, SimulatedSDM630  # noqa: E402
from simulators.tuya import SimulatedTuyaDevice, TuyaSimulator, plug_dps  # noqa: E402
from tools import build_dashboard  # noqa: E402

FIXTURES_DIR = ROOT / "tests" / "fixtures"
DASHBOARD = ROOT / "grafana" / "dashboards" / "home-electricity.json"
SCHEMAS = ROOT / "graphite" / "storage-schemas.conf"
AGGREGATION = ROOT / "graphite" / "storage-aggregation.conf"
OUTPUT = ROOT / "docs" / "dashboard.png"

STEP_S = 10  # the meters' reading interval, and the circuits' poll interval
PLUG_STEP_S = 30
ESP32_TOKEN = "simulated-home-token-0123456789"
VOLTS = 240.0
GLOW_ID = "1A2B3C4D5E6F"

# --- The home's loads -------------------------------------------------------------------

# Device name -> (collector, fixture). The monitor is plugged into the office plug.
KASA_DEVICES = {
    "Kettle": "KP115(EU)_1.0_1.0.16.json",
    "Office": "KP125(US)_1.0_1.0.6.json",
    "Monitor": "EP25(US)_1.0_1.0.14.json",
    "Lamp": "HS110(EU)_1.0_1.2.5.json",
}
# A Tapo plug (smart protocol over KLAP, the owner's TP-Link account).
TAPO_DEVICES = {"Fridge": "smart_P110(UK)_1.0_1.3.0.json"}
TAPO_ACCOUNT = {"username": "home@example.com", "password": "simulated-home-password"}
# Device name -> the devices.json entry it is served from (a mapped 3.3 and 3.4 plug).
TUYA_DEVICES = {"Washing machine": "Amaryllis Fridge", "Freezer": "Kettle"}
CIRCUITS = {"Heat pump": 1, "EV charger": 2}  # name -> Modbus unit
NESTED_DEVICES = ["kasa.monitor"]  # DASHBOARD_NESTED_DEVICES for this home
LAMP_SILENT_S = 720  # the lamp is unplugged this long before the end: a silent device
STEADY_S = 240  # no load changes in the last minutes: what the tests compare is settled


def _on(age_s: float, period_s: float, start_s: float, length_s: float) -> bool:
    """True while ``age_s`` (seconds before the end) is in [start, start+length) of each period."""
    return start_s <= age_s % period_s < start_s + length_s


def device_loads(age_s: float) -> dict[str, float]:
    """Watts of each device ``age_s`` seconds before the end of the history.

    Piecewise constant, and steady for the last STEADY_S seconds. The office
    plug measures the monitor behind it too.
    """
    monitor = 28.0
    return {
        "Kettle": 2900.0 if _on(age_s, 5400, 420, 180) else 0.0,
        "Fridge": 85.0 if _on(age_s, 2400, 0, 600) or _on(age_s, 2400, 1800, 600) else 2.0,
        "Office": 65.0 + monitor,
        "Monitor": monitor,
        "Lamp": 40.0 if age_s >= LAMP_SILENT_S else 0.0,
        "Washing machine": 2000.0
        if _on(age_s, 7200, 2700, 600)
        else (350.0 if _on(age_s, 7200, 1500, 1200) else 1.0),
        "Freezer": 70.0 if _on(age_s, 1800, 0, 600) or _on(age_s, 1800, 1500, 300) else 1.0,
        "Heat pump": 1800.0 if _on(age_s, 3600, 0, 900) or _on(age_s, 3600, 2700, 900) else 450.0,
        "EV charger": 7200.0 if _on(age_s, 21600, 3600, 10800) else 0.0,
    }


def unmonitored_load(age_s: float) -> float:
    """What no plug or circuit meter sees (lights, oven, ...)."""
    return 260.0 + (180.0 if _on(age_s, 4000, 1000, 2000) else 0.0)


def house_load(age_s: float) -> float:
    """The whole house: every device not behind another one, plus the unmonitored rest."""
    loads = device_loads(age_s)
    return unmonitored_load(age_s) + sum(w for name, w in loads.items() if name != "Monitor")


def earlier_house_load(when: float) -> float:
    """The whole house on the days before the detailed history: a daily rhythm."""
    hour = time.localtime(when).tm_hour + time.localtime(when).tm_min / 60
    day = int(when // 86400)
    watts = 300.0 + 120 * math.sin(when / 1500)
    if 7 <= hour < 8.5 or 17.5 <= hour < 22:
        watts += 900.0 + 400 * (day % 3)
    if 1 <= hour < 4 and day % 2:
        watts += 7200.0  # the car, every other night
    return watts


# --- The simulated home, filled in through the real collectors -------------------------------


def _collector_env(settings: Mapping[str, Any], config_file: Path) -> dict[str, str]:
    """A collector process's environment: no developer's own settings, ``settings`` as strings."""
    setting_names = set(settings_module.defaults())
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in setting_names and not name.startswith("ELECTRICITY_")
    }
    env["ELECTRICITY_CONFIG"] = str(config_file)
    for name, value in settings.items():
        name = settings_module.ENV_ALIASES.get(name, name)  # STATE_DIR: ELECTRICITY_STATE_DIR
        if isinstance(value, bool):
            env[name] = "1" if value else "0"
        elif isinstance(value, (list, dict)):
            env[name] = json.dumps(value)
        else:
            env[name] = str(value)
    return env


class _SimulatedWallClock:
    """Stands in for the ``time`` module of a collector whose polls are backdated:
    the Tuya plugs' energy is integrated over the poll's wall-clock time."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def random_subnet() -> str:
    """A random 127.a.b. so parallel runs never share simulated addresses."""
    return f"127.{random.randrange(100, 255)}.{random.randrange(256)}."


class SimulatedHome:
    """Simulated devices, and the real collectors reading them into ``carbon``.

    ``fill(start, end)`` makes the history from ``start`` to ``end`` (epoch
    seconds, ``end`` at most now); ``run_scripts_once()`` then runs
    kasa_to_graphite.py, tuya_to_graphite.py and circuit_to_graphite.py with
    ``--once`` as users run them. Use as a context manager.
    """

    def __init__(
        self,
        work_dir: Path,
        carbon: CarbonServer,
        broker: MosquittoBroker,
        fixtures_dir: Path = FIXTURES_DIR,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.carbon = carbon
        self.broker = broker
        self.fixtures_dir = fixtures_dir
        self.state_dir = self.work_dir / "state"
        self.config_file = self.work_dir / "config_local.py"
        self.energy_kwh = {name: 100.0 + 10 * i for i, name in enumerate(device_loads(0))}
        self._stack = contextlib.ExitStack()
        self._subnet = random_subnet()
        self.settings: dict[str, Any] = {}
        self.processes: dict[str, Any] = {}
        self.once_results: dict[str, tuple[int, str]] = {}  # source: (exit status, log)
        self.push_results: dict[str, int] = {}  # esp32, mqtt: exit status

    # -- devices --

    def _start_kasa(self) -> None:
        self.kasa = {
            name: SimulatedKasaDevice(fixture, host=f"{self._subnet}{i + 2}", alias=name)
            for i, (name, fixture) in enumerate(KASA_DEVICES.items())
        }
        simulator = KasaSimulator(self.kasa.values())
        self._stack.enter_context(simulator)
        self.tapo = {
            name: SimulatedSmartDevice(
                fixture, host=f"{self._subnet}{i + 10}", alias=name, voltage_v=VOLTS, **TAPO_ACCOUNT
            )
            for i, (name, fixture) in enumerate(TAPO_DEVICES.items())
        }
        smart = SmartKasaSimulator(
            self.tapo.values(), port=simulator.port, discovery_host=f"{self._subnet}1"
        )
        self._stack.enter_context(smart)
        self._tapo_start_kwh = {name: self.energy_kwh[name] for name in self.tapo}
        self.settings.update(
            KASA_HOSTS=[
                f"{d.host}:{simulator.port}" for d in (*self.kasa.values(), *self.tapo.values())
            ],
            KASA_DISCOVERY_ENABLED=False,
            KASA_DISCOVERY_TIMEOUT_S=1.0,
            KASA_USERNAME=TAPO_ACCOUNT["username"],
            KASA_PASSWORD=TAPO_ACCOUNT["password"],
        )

    def _start_tuya(self) -> None:
        entries = json.loads((self.fixtures_dir / "tuya" / "devices.json").read_text("utf-8"))
        by_name = {entry["name"]: entry for entry in entries}
        written, self.tuya = [], {}
        for i, (name, source) in enumerate(TUYA_DEVICES.items()):
            entry = {**by_name[source], "name": name, "ip": f"{self._subnet}{i + 20}"}
            self.tuya[name] = SimulatedTuyaDevice.from_devices_json(
                entry, dps=plug_dps(1.0, VOLTS), port=0
            )
            written.append(entry)
        devices_file = self.work_dir / "devices.json"
        devices_file.write_text(json.dumps(written, indent=1), encoding="utf-8")
        self._stack.enter_context(TuyaSimulator(self.tuya.values()))
        announce = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        announce.bind(("127.0.0.1", 0))
        announce_port = announce.getsockname()[1]
        announce.close()
        self.settings.update(
            TUYA_DEVICES_FILE=str(devices_file),
            TUYA_ADDRESSES={d.dev_id: f"{d.host}:{d.port}" for d in self.tuya.values()},
            TUYA_ANNOUNCE_BIND="127.0.0.1",
            TUYA_ANNOUNCE_PORTS=[announce_port],
            TUYA_TIMEOUT_S=1.0,
        )

    def _start_circuits(self) -> None:
        self.heat_pump = SimulatedSDM120(voltage_v=VOLTS, power_factor=0.97, frequency_hz=50.0)
        self.ev_charger = SimulatedSDM630(frequency_hz=50.0)
        gateway = ModbusMeterSimulator(
            meters={CIRCUITS["Heat pump"]: self.heat_pump, CIRCUITS["EV charger"]: self.ev_charger}
        )
        self._stack.enter_context(gateway)
        host, port = gateway.address
        self.settings["CIRCUITS"] = [
            {
                "name": name,
                "kind": "modbus-tcp",
                "connection": f"{host}:{port}",
                "unit": unit,
                "profile": "sdm120" if unit == CIRCUITS["Heat pump"] else "sdm630",
            }
            for name, unit in CIRCUITS.items()
        ]

    def set_loads(self, age_s: float, elapsed_s: float) -> dict[str, float]:
        """Every simulated device reads its load ``age_s`` before the end; energy
        counters advance by the last ``elapsed_s`` seconds at the previous loads."""
        loads = device_loads(age_s)
        previous = getattr(self, "_loads", loads)
        for name in loads:
            self.energy_kwh[name] += previous[name] * elapsed_s / 3.6e6
        self._loads = loads
        for name, device in self.kasa.items():
            if name == "Lamp":
                device.mode = "normal" if age_s >= LAMP_SILENT_S else "refuse"
            watts = loads[name]
            device.set_realtime(
                power_w=watts,
                voltage_v=VOLTS,
                current_a=round(watts / VOLTS, 3),
                total_kwh=self.energy_kwh[name],
            )
        for name, tapo in self.tapo.items():
            # Its own counters: today's energy (the history fits in one day)
            # and the month's; the collector makes energy_kwh from them.
            tapo.set_relay(True)
            tapo.set_energy(
                power_w=loads[name],
                today_kwh=self.energy_kwh[name] - self._tapo_start_kwh[name],
                month_kwh=self.energy_kwh[name],
            )
        for name, device in self.tuya.items():
            device.set_dps(plug_dps(loads[name], VOLTS, energy_kwh=self.energy_kwh[name]))
        watts = loads["Heat pump"]
        self.heat_pump.set(
            power_w=watts, current_a=watts / VOLTS / 0.97, import_kwh=self.energy_kwh["Heat pump"]
        )
        per_phase = loads["EV charger"] / 3
        for phase in (1, 2, 3):
            self.ev_charger.set_phase(
                phase, voltage_v=VOLTS, current_a=per_phase / VOLTS, power_w=per_phase
            )
        self.ev_charger.set(import_kwh=self.energy_kwh["EV charger"])
        return loads

    # -- the collectors --

    def _collector_settings(self, **extra: Any) -> dict[str, Any]:
        host, port = self.carbon.line_address
        return {
            "CARBON_DESTINATIONS": [f"{host}:{port}"],
            "CARBON_TIMEOUT_S": 5.0,
            "STATE_DIR": str(self.state_dir),
            "DEVICE_TIMEOUT_S": 5.0,
            "REDISCOVER_INTERVAL_S": 86400.0,
            **self.settings,
            **extra,
        }

    def _poll_loop(self, collector_cls: type) -> collector.PollLoop:
        """A collector as ``--once`` builds it, in this process."""
        settings = settings_module.load_settings(
            env={}, local_path=self.config_file, overrides=self._collector_settings()
        )
        parser = build_parser(collector_cls.source, collector_cls.description)
        collector_cls.add_arguments(parser)
        runtime = Runtime(collector_cls.source, settings)
        instance = collector_cls(runtime, parser.parse_args([]))
        interval_s = float(getattr(settings, instance.interval_setting))
        return collector.PollLoop(instance, interval_s)

    def _start_receiver(self, max_age_s: float) -> None:
        port = free_port()
        env = _collector_env(
            self._collector_settings(
                ESP32_TOKEN=ESP32_TOKEN,
                ESP32_MAX_READING_AGE_S=max_age_s,
                METER_INTERVAL_S=0.5,
            ),
            self.config_file,
        )
        self.processes["esp32"] = spawn(
            [
                sys.executable,
                str(ROOT / "esp32_receiver.py"),
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            self.work_dir / "esp32_receiver.log",
            env=env,
            cwd=ROOT,
        )
        self.esp32_url = f"http://127.0.0.1:{port}/api/v1/readings"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    return
            except OSError:
                if self.processes["esp32"].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "esp32_receiver.py did not start: "
                        + (self.work_dir / "esp32_receiver.log").read_text(errors="replace")
                    ) from None
                time.sleep(0.05)

    def _start_mqtt(self) -> None:
        env = _collector_env(
            self._collector_settings(MQTT_FLUSH_INTERVAL_S=0.5, MQTT_HEALTH_INTERVAL_S=5.0),
            self.config_file,
        )
        self.processes["mqtt"] = spawn(
            [
                sys.executable,
                str(ROOT / "mqtt_to_graphite.py"),
                "--broker",
                f"{self.broker.host}:{self.broker.port}",
            ],
            self.work_dir / "mqtt_to_graphite.log",
            env=env,
            cwd=ROOT,
        )
        self.publisher = self._stack.enter_context(Publisher(self.broker.host, self.broker.port))

    def __enter__(self) -> SimulatedHome:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("# the simulated home: settings come from the environment\n")
        try:
            self._start_kasa()
            self._start_tuya()
            self._start_circuits()
            self._start_mqtt()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self.processes.values():
            terminate(process)
        self._stack.close()

    # -- history --

    def _earlier_meter_history(self, start: int, end: int) -> None:
        """Days of the whole-house meter alone, a reading every 5 minutes (its
        boot before the detailed history)."""
        sim = SimulatedEsp32(
            self.esp32_url,
            ESP32_TOKEN,
            "esp32-house",
            clock=SimClock(start),
            post_interval_s=300,
            seed=1,
        )
        for when in range(start, end, 300):
            sim.power_watts = earlier_house_load(when)
            sim.step(300)
        sim.flush()

    def _glow_until_heard(self, glow: SimulatedGlow) -> None:
        """Publish the Glow display's first reading until the collector has it (the
        broker may see it before the collector's subscription)."""
        path = f"home.electricity.glow.{GLOW_ID.lower()}.energy_import_kwh"
        deadline = time.monotonic() + 30
        while True:
            self.publisher.publish_all([glow.electricity()])
            with contextlib.suppress(TimeoutError):
                self.carbon.wait_for(lambda: self.carbon.fetch(path), 0.5, path)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "mqtt_to_graphite.py read nothing: "
                    + (self.work_dir / "mqtt_to_graphite.log").read_text(errors="replace")
                )

    def fill(self, start: int, end: int, earlier_days: float = 0.0) -> None:
        """The history from ``start`` to ``end``: every source, every STEP_S seconds
        (the plugs every PLUG_STEP_S), each at its own backdated time."""
        start -= start % PLUG_STEP_S
        earlier_s = int(earlier_days * 86400)
        self._start_receiver(max_age_s=float(end - start + earlier_s + 3600))
        if earlier_s:
            self._earlier_meter_history(start - earlier_s, start)
        esp32 = SimulatedEsp32(
            self.esp32_url, ESP32_TOKEN, "esp32-house", clock=SimClock(start), seed=2
        )
        glow = SimulatedGlow(GLOW_ID, start=start, interval_s=STEP_S, gas=True)
        glow.power_kw = house_load(end - start) / 1000
        self._glow_until_heard(glow)
        asyncio.run(self._fill(start, end, esp32, glow))
        esp32.flush()
        self._wait_for_last_points(end)

    async def _fill(self, start: int, end: int, esp32: SimulatedEsp32, glow: SimulatedGlow):
        loops = {cls.source: self._poll_loop(cls) for cls in POLLED}
        clock = _SimulatedWallClock()
        real_time, tuya_to_graphite.time = tuya_to_graphite.time, clock
        try:
            for loop in loops.values():
                await loop.rediscover()
            for when in range(start, end + 1, STEP_S):
                age_s = end - when
                self.set_loads(age_s, STEP_S if when > start else 0)
                clock.now = when
                polls = [loops["circuit"].cycle(when)]
                if when % PLUG_STEP_S == 0:
                    polls += [loops["kasa"].cycle(when), loops["tuya"].cycle(when)]
                await asyncio.gather(*polls)
                if when < end:  # the meters' readings cover the next STEP_S seconds
                    house_w = house_load(age_s)
                    esp32.power_watts = house_w
                    esp32.step(STEP_S)
                    glow.power_kw = house_w / 1000
                    self.publisher.publish_all(glow.step(STEP_S))
        finally:
            tuya_to_graphite.time = real_time
            for loop in loops.values():
                await loop.collector.close()
                loop.runtime.drain(60)  # the sender delivers from the spool
                loop.runtime.close()

    def _wait_for_last_points(self, end: int) -> None:
        """Until the ESP32's and the Glow display's last readings are in Carbon."""
        for path in (
            "home.electricity.meter.energy_kwh",
            f"home.electricity.glow.{GLOW_ID.lower()}.energy_import_kwh",
        ):
            self.carbon.wait_for(
                lambda path=path: any(ts >= end - STEP_S for ts, _ in self.carbon.fetch(path)),
                30,
                f"{path} up to {end}",
            )

    def run_scripts_once(self) -> dict[str, tuple[int, str]]:
        """kasa_to_graphite.py, tuya_to_graphite.py and circuit_to_graphite.py
        ``--once``, side by side, as users run them: {source: (exit status, log)}."""
        env = _collector_env(self._collector_settings(), self.config_file)
        started = {
            cls.source: spawn(
                [sys.executable, str(ROOT / f"{cls.source}_to_graphite.py"), "--once"],
                self.work_dir / f"{cls.source}-once.log",
                env=env,
                cwd=ROOT,
            )
            for cls in POLLED
        }
        results = {}
        for source, process in started.items():
            try:
                process.wait(timeout=60)
            finally:
                terminate(process)
            log = (self.work_dir / f"{source}-once.log").read_text(errors="replace")
            results[source] = (process.returncode, log)
        return results

    def stop_push_collectors(self) -> dict[str, int]:
        """SIGTERM the ESP32 receiver and the MQTT collector: they send what is pending."""
        return {name: terminate(process, 30) for name, process in self.processes.items()}


POLLED = (
    kasa_to_graphite.KasaCollector,
    tuya_to_graphite.TuyaCollector,
    circuit_to_graphite.CircuitCollector,
)


@contextlib.contextmanager
def filled_graphite(
    work_dir: Path, hours: float, days: float, fixtures_dir: Path = FIXTURES_DIR
) -> Iterator[tuple[GraphiteWeb, SimulatedHome, int]]:
    """carbon-cache, graphite-web and Mosquitto, and the simulated home's history
    in them: (graphite-web, the home, the history's end)."""
    with contextlib.ExitStack() as stack:
        carbon = stack.enter_context(
            CarbonServer(
                work_dir / "carbon", storage_schemas=SCHEMAS, storage_aggregation=AGGREGATION
            )
        )
        broker = stack.enter_context(MosquittoBroker(work_dir / "mosquitto"))
        web = stack.enter_context(GraphiteWeb(work_dir / "graphite-web", carbon))
        home = stack.enter_context(SimulatedHome(work_dir / "home", carbon, broker, fixtures_dir))
        end = int(time.time()) // PLUG_STEP_S * PLUG_STEP_S
        home.fill(end - int(hours * 3600), end, earlier_days=days)
        home.push_results = home.stop_push_collectors()
        home.once_results = home.run_scripts_once()
        yield web, home, end


# --- Drawing -------------------------------------------------------------------------------

BACKGROUND = "#111217"
PANEL = "#181b1f"
TEXT = "#ccccdc"
GRID = "#2c3235"
# Grafana's classic palette.
PALETTE = [
    "#7eb26d",
    "#eab839",
    "#6ed0e0",
    "#ef843c",
    "#e24d42",
    "#1f78c1",
    "#ba43a9",
    "#705da0",
    "#508642",
    "#cca300",
    "#447ebc",
    "#c15c17",
]


def _render(web: GraphiteWeb, dashboard: dict, title: str, now: datetime.datetime) -> list[dict]:
    """graphite-web's answer to every target of the panel titled ``title``."""
    series = []
    for panel, target, start in build_dashboard.panel_queries(dashboard, now):
        if panel["title"] == title:
            series += web.render(target, from_=start, until="now", max_data_points=800)
    return series


def _points(series: dict) -> tuple[list[datetime.datetime], list[float]]:
    pairs = [(ts, v) for v, ts in series["datapoints"] if v is not None]
    return [datetime.datetime.fromtimestamp(ts) for ts, _ in pairs], [v for _, v in pairs]


def _last(series: list[dict]) -> float | None:
    values = [v for s in series for v, _ in s["datapoints"] if v is not None]
    return values[-1] if values else None


def _style(ax, title: str, window: tuple[datetime.datetime, datetime.datetime] | None = None):
    import matplotlib.dates as mdates

    if window is not None:
        ax.set_xlim(*window)
    ax.set_facecolor(PANEL)
    ax.set_title(title, color=TEXT, loc="left", fontsize=11, pad=8)
    ax.tick_params(colors=TEXT, labelsize=8)
    ax.grid(color=GRID, linewidth=0.6)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if ax.xaxis.get_major_formatter().__class__.__name__ in ("AutoDateFormatter", "DateFormatter"):
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))


def _legend(ax) -> None:
    legend = ax.legend(loc="upper left", fontsize=8, frameon=False, ncol=4)
    for text in legend.get_texts():
        text.set_color(TEXT)


def draw(web: GraphiteWeb, dashboard: dict, out: Path, hours: float) -> None:
    """The dashboard's key panels, drawn with matplotlib from graphite-web's JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    now = datetime.datetime.now().astimezone()
    window = (now - datetime.timedelta(hours=hours), now)
    currency = {"currencyGBP": "£", "currencyEUR": "€", "currencyUSD": "$"}
    cost_panel = next(p for p in dashboard["panels"] if p["title"] == "Cost today")
    money = currency.get(cost_panel["fieldConfig"]["defaults"]["unit"], "")
    figure = plt.figure(figsize=(16, 13), facecolor=BACKGROUND)
    grid = figure.add_gridspec(
        4,
        6,
        height_ratios=[0.42, 1, 1.15, 1],
        hspace=0.42,
        wspace=0.35,
        left=0.04,
        right=0.99,
        top=0.94,
        bottom=0.03,
    )

    # Stat tiles
    tiles = [
        ("Whole house now", "W", 0),
        ("Used today", "kWh", 2),
        ("Cost today", money, 2),
        ("Cost this week", money, 2),
        ("Cost this month", money, 2),
    ]
    for column, (title, unit, decimals) in enumerate(tiles):
        ax = figure.add_subplot(grid[0, column])
        ax.set_facecolor(PANEL)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        series = _render(web, dashboard, title, now)
        values = [(s["target"], _last([s])) for s in series if _last([s]) is not None]
        text = "   ".join(
            (f"{money}{v:,.{decimals}f}" if unit == money else f"{v:,.{decimals}f} {unit}")
            for _, v in values
        )
        ax.text(0.5, 0.45, text, color="#73bf69", fontsize=17, ha="center", va="center")
        if len(values) > 1:  # the two whole-house meters: say which is which
            names = "    ".join(name for name, _ in values)
            ax.text(0.5, 0.12, names, color=TEXT, fontsize=8, ha="center", va="center")
        ax.set_title(title, color=TEXT, fontsize=10, loc="left")
    ax = figure.add_subplot(grid[0, 5])
    ax.axis("off")
    ax.text(
        0,
        0.5,
        "A simulated home, the real\ncollectors, a real carbon-cache\nand graphite-web.\n\n"
        + "\n".join(
            f"{v['label']}: {v['current']['value']}" for v in dashboard["templating"]["list"][1:]
        ),
        color=TEXT,
        fontsize=8,
        va="center",
    )

    # Whole-house power, both meters
    ax = figure.add_subplot(grid[1, :4])
    styles = [{"linewidth": 3.2, "alpha": 0.7}, {"linewidth": 1.0, "linestyle": "--"}]
    meters = _render(web, dashboard, "Whole-house power", now)
    for color, style, series in zip(PALETTE, styles, meters):
        x, y = _points(series)
        ax.plot(x, y, color=color, label=series["target"], **style)
    _style(ax, f"Whole-house power (W), last {hours:g} h", window)
    _legend(ax)

    # Energy and cost per day
    ax = figure.add_subplot(grid[1, 4:])
    energy = _render(web, dashboard, "Energy per day, last 7 days", now)
    cost = _render(web, dashboard, "Cost per day, last 7 days", now)
    if energy:
        days = [
            (datetime.datetime.fromtimestamp(ts), v)
            for v, ts in energy[0]["datapoints"]
            if v is not None
        ]
        costs = {ts: v for v, ts in cost[0]["datapoints"] if v is not None} if cost else {}
        labels = [day.strftime("%a %d") for day, _ in days]
        bars = ax.bar(labels, [v for _, v in days], color="#5794f2")
        for bar, (day, _) in zip(bars, days):
            paid = costs.get(int(day.timestamp()))
            if paid is not None:
                ax.annotate(
                    f"{money}{paid:.2f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    color=TEXT,
                    fontsize=8,
                )
    _style(ax, "Energy (kWh) and cost per day")

    # Stacked power per device, unmonitored on top
    ax = figure.add_subplot(grid[2, :4])
    stacked = _render(web, dashboard, "Power per device (stacked)", now)
    stamps = sorted({ts for s in stacked for _, ts in s["datapoints"]})
    layers = []
    for series in stacked:
        by_time = {ts: v for v, ts in series["datapoints"]}
        layers.append([by_time.get(ts) or 0.0 for ts in stamps])
    if stamps:
        ax.stackplot(
            [datetime.datetime.fromtimestamp(ts) for ts in stamps],
            layers,
            labels=[s["target"] for s in stacked],
            colors=[*(PALETTE * 3)[: len(stacked) - 1], "#464c54"],
            linewidth=0,
        )
    _style(ax, "Power per device, stacked, unmonitored load on top (W)", window)
    _legend(ax)

    # The device table
    ax = figure.add_subplot(grid[2, 4:])
    ax.axis("off")
    ax.set_title("Devices now and today", color=TEXT, loc="left", fontsize=11)
    table = device_table(_render(web, dashboard, "Devices now and today", now))
    rows = sorted(table.items(), key=lambda item: -(item[1].get("watts") or 0))
    cells = [
        [device, f"{row.get('watts', 0):,.0f} W", f"{row.get('kwh_today', 0):.2f} kWh"]
        for device, row in rows
    ]
    if cells:
        drawn = ax.table(
            cellText=cells, colLabels=["Device", "Watts now", "kWh today"], loc="upper center"
        )
        drawn.auto_set_font_size(False)
        drawn.set_fontsize(8.5)
        drawn.scale(1, 1.25)
        for cell in drawn.get_celld().values():
            cell.set_facecolor(PANEL)
            cell.set_edgecolor(GRID)
            cell.get_text().set_color(TEXT)

    # Circuits
    ax = figure.add_subplot(grid[3, :3])
    for color, series in zip(PALETTE[2:], _render(web, dashboard, "Circuits", now)):
        x, y = _points(series)
        ax.plot(x, y, color=color, linewidth=1.1, label=series["target"])
    _style(ax, "Circuits (W)", window)
    _legend(ax)

    # Collector health
    ax = figure.add_subplot(grid[3, 3:])
    ax.axis("off")
    ax.set_title("Collector health", color=TEXT, loc="left", fontsize=11)
    health: dict[str, dict[str, str]] = {}
    for title, key in (
        ("Devices answering", "ok"),
        ("Devices failing", "failed"),
        ("Newest point", "age"),
        ("Spool: lines waiting for Carbon", "spool"),
    ):
        for series in _render(web, dashboard, title, now):
            value = _last([series])
            if value is not None:
                shown = f"{value:.0f} s" if key == "age" else f"{value:.0f}"
                health.setdefault(series["target"], {})[key] = shown
    columns = ("ok", "failed", "age", "spool")
    cells = [
        [source, *(row.get(column, "-") for column in columns)]
        for source, row in sorted(health.items())
    ]
    if cells:
        drawn = ax.table(
            cellText=cells,
            colLabels=["Collector", "Answering", "Failing", "Newest point", "Spooled"],
            loc="upper center",
        )
        drawn.auto_set_font_size(False)
        drawn.set_fontsize(9)
        drawn.scale(1, 1.4)
        for (row, column), cell in drawn.get_celld().items():
            cell.set_facecolor(PANEL)
            cell.set_edgecolor(GRID)
            text = cell.get_text()
            text.set_color(TEXT)
            if row and column == 2 and text.get_text() not in ("0", "-"):
                text.set_color("#f2495c")

    figure.suptitle(
        "Home electricity: grafana/dashboards/home-electricity.json, queries rendered by "
        "graphite-web",
        color=TEXT,
        fontsize=13,
        x=0.01,
        ha="left",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80, facecolor=BACKGROUND, bbox_inches="tight")
    plt.close(figure)


def device_table(series: Sequence[dict]) -> dict[str, dict[str, float]]:
    """What the table panel's transformations make of its series: the last
    value of each, its name's key=value pairs pivoted into {device: {column: value}}."""
    table: dict[str, dict[str, float]] = {}
    for item in series:
        fields = dict(pair.split("=", 1) for pair in item["target"].split(","))
        last = _last([item])
        if last is not None:
            table.setdefault(fields["device"], {})[fields["column"]] = last
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=6, help="detailed history (default 6)")
    parser.add_argument(
        "--days", type=float, default=7, help="days of meter history before it (default 7)"
    )
    parser.add_argument("--out", type=Path, default=OUTPUT, help="the PNG (docs/dashboard.png)")
    args = parser.parse_args(argv)
    if not 0 < args.hours <= 23:
        parser.error("--hours: 0 to 23 (the Glow display's readings are kept up to a day old)")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dashboard-png-")))
        web, _home, _end = stack.enter_context(filled_graphite(work, args.hours, args.days))
        filled = time.monotonic() - started
        draw(web, dashboard, args.out, args.hours)
    print(
        f"{args.out}: {args.hours:g} h of history ({args.days:g} days of meter before it) "
        f"filled in {filled:.0f} s, drawn in {time.monotonic() - started - filled:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
