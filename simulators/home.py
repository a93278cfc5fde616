"""The simulated home: every source of a real home on loopback, read by the
real collectors, with its history backdated into a real carbon-cache.

Kasa plugs (one a Tapo P110 on KLAP), Tuya plugs and two Eastron circuit
meters answering the real collector code, an ESP32 pulse reader posting to
the real receiver, and a Glow display publishing to the real MQTT collector.
The ESP32 and the Glow display run on simulated clocks and stamp their own
readings; the plugs and circuit meters are polled by the collectors' own
poll loop (``collector.PollLoop.cycle``) with backdated cycle times.

Used by tools/render_dashboard_png.py (docs/dashboard.png), tests/test_grafana.py
(every panel's query against what the collectors sent) and the benchmarks.
Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import circuit_to_graphite
import collector
import kasa_to_graphite
import settings as settings_module
import tuya_to_graphite
from harness.carbon import CarbonServer, free_port, spawn, terminate
from harness.graphite_web import GraphiteWeb
from harness.mosquitto import MosquittoBroker
from runtime import Runtime, build_parser
from simulators.esp32 import SimClock, SimulatedEsp32
from simulators.glow import Publisher, SimulatedGlow
from simulators.kasa import KasaSimulator, SimulatedKasaDevice
from simulators.kasa_smart import SimulatedSmartDevice, SmartKasaSimulator
from simulators.sdm import ModbusMeterSimulator, SimulatedSDM120, SimulatedSDM630
from simulators.tuya import SimulatedTuyaDevice, TuyaSimulator, plug_dps

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "graphite" / "storage-schemas.conf"
AGGREGATION = ROOT / "graphite" / "storage-aggregation.conf"
FIXTURES_DIR = ROOT / "tests" / "fixtures"

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
