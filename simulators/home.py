"""The simulated home: one home for the demo, the benchmarks, the dashboard
tools and the tests.

Who lives here (Kasa plugs and a Tapo P110, two Tuya plugs, two Eastron
circuit meters behind a Modbus gateway, the ESP32 on the smart meter's LED, a
Glow display), what each device draws at any moment (``device_loads``), and
``HomeDevices``: the plugs and meters started on loopback, speaking their
real protocols, with the settings that point the real collectors at them.

Two players run it: ``home_live.py`` in real time (the demo, the soak and
footprint benchmarks: collectors as processes) and ``home_history.py``
backdated (hours of history in a real carbon-cache for the dashboard PNG and
the Grafana tests). Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from harness.carbon import free_port
from simulators.kasa import KasaSimulator, SimulatedKasaDevice
from simulators.kasa_smart import SimulatedSmartDevice, SmartKasaSimulator
from simulators.sdm import ModbusMeterSimulator, SimulatedSDM120, SimulatedSDM630
from simulators.tuya import SimulatedTuyaDevice, TuyaSimulator, plug_dps

ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = ROOT / "tests" / "fixtures"

ESP32_TOKEN = "simulated-home-token-0123456789"
ESP32_ID = "esp32-house"
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


def random_subnet() -> str:
    """A random 127.a.b. so parallel runs never share simulated addresses."""
    return f"127.{random.randrange(100, 255)}.{random.randrange(256)}."


class HomeDevices:
    """The home's plugs and circuit meters, simulated on loopback.

    ``start_kasa``, ``start_tuya`` and ``start_circuits`` start one source's
    devices (stopped when ``stack`` closes) and return the settings that point
    its collector at them; ``set_loads`` sets every started device to the
    home's loads at a moment. Energy registers count up from different
    lifetimes (100 kWh, 110 kWh, ...).
    """

    def __init__(self, work_dir: Path, fixtures_dir: Path = FIXTURES_DIR) -> None:
        self.work_dir = Path(work_dir)
        self.fixtures_dir = fixtures_dir
        self.subnet = random_subnet()
        self.energy_kwh = {name: 100.0 + 10 * i for i, name in enumerate(device_loads(0))}
        self.kasa: dict[str, SimulatedKasaDevice] = {}
        self.tapo: dict[str, SimulatedSmartDevice] = {}
        self.tuya: dict[str, SimulatedTuyaDevice] = {}
        self.heat_pump: SimulatedSDM120 | None = None
        self.ev_charger: SimulatedSDM630 | None = None
        self.kasa_hosts: list[str] = []  # host:port of every plug, for KASA_HOSTS
        self._loads: dict[str, float] | None = None
        self._tapo_start_kwh: dict[str, float] = {}

    def start_kasa(self, stack: contextlib.ExitStack) -> dict[str, Any]:
        """The Kasa plugs and the Tapo plug, found by discovery at one address."""
        self.kasa = {
            name: SimulatedKasaDevice(fixture, host=f"{self.subnet}{i + 2}", alias=name)
            for i, (name, fixture) in enumerate(KASA_DEVICES.items())
        }
        discovery_host = f"{self.subnet}1"
        simulator = stack.enter_context(
            KasaSimulator(self.kasa.values(), discovery_host=discovery_host)
        )
        self.tapo = {
            name: SimulatedSmartDevice(
                fixture,
                host=f"{self.subnet}{i + 10}",
                alias=name,
                voltage_v=VOLTS,
                username=TAPO_ACCOUNT["username"],
                password=TAPO_ACCOUNT["password"],
            )
            for i, (name, fixture) in enumerate(TAPO_DEVICES.items())
        }
        stack.enter_context(
            SmartKasaSimulator(
                self.tapo.values(), port=simulator.port, discovery_host=discovery_host
            )
        )
        self._tapo_start_kwh = {name: self.energy_kwh[name] for name in self.tapo}
        hosts = [d.host for d in self.kasa.values()] + [d.host for d in self.tapo.values()]
        self.kasa_hosts = [f"{host}:{simulator.port}" for host in hosts]
        return {
            "KASA_DISCOVERY_ENABLED": True,
            "KASA_DISCOVERY_TARGET": f"{discovery_host}:{simulator.port}",
            "KASA_DISCOVERY_TIMEOUT_S": 1.0,
            "KASA_USERNAME": TAPO_ACCOUNT["username"],
            "KASA_PASSWORD": TAPO_ACCOUNT["password"],
        }

    def start_tuya(self, stack: contextlib.ExitStack) -> dict[str, Any]:
        """Two plugs of a wizard's devices.json (protocols 3.3 and 3.4), on ports
        of their own so that they can be switched off and on again."""
        entries = json.loads((self.fixtures_dir / "tuya" / "devices.json").read_text("utf-8"))
        by_name = {entry["name"]: entry for entry in entries}
        written, self.tuya = [], {}
        for i, (name, source) in enumerate(TUYA_DEVICES.items()):
            entry = {**by_name[source], "name": name, "ip": f"{self.subnet}{i + 20}"}
            self.tuya[name] = SimulatedTuyaDevice.from_devices_json(
                entry, dps=plug_dps(1.0, VOLTS), port=free_port()
            )
            written.append(entry)
        devices_file = self.work_dir / "devices.json"
        devices_file.write_text(json.dumps(written, indent=1), encoding="utf-8")
        self.tuya_simulator = stack.enter_context(TuyaSimulator(self.tuya.values()))
        return {
            "TUYA_DEVICES_FILE": str(devices_file),
            "TUYA_ADDRESSES": {d.dev_id: f"{d.host}:{d.port}" for d in self.tuya.values()},
            # Devices announce themselves over UDP; these have addresses.
            "TUYA_ANNOUNCE_BIND": "127.0.0.1",
            "TUYA_ANNOUNCE_PORTS": [free_port()],
            "TUYA_ANNOUNCE_LISTEN_S": 1.0,
            "TUYA_TIMEOUT_S": 1.0,
        }

    def start_circuits(self, stack: contextlib.ExitStack) -> dict[str, Any]:
        """An SDM120 (the heat pump) and an SDM630 (the EV charger) behind one gateway."""
        self.heat_pump = SimulatedSDM120(voltage_v=VOLTS, power_factor=0.97, frequency_hz=50.0)
        self.ev_charger = SimulatedSDM630(frequency_hz=50.0)
        self.gateway = stack.enter_context(
            ModbusMeterSimulator(
                meters={
                    CIRCUITS["Heat pump"]: self.heat_pump,
                    CIRCUITS["EV charger"]: self.ev_charger,
                }
            )
        )
        host, port = self.gateway.address
        return {
            "CIRCUITS": [
                {
                    "name": name,
                    "kind": "modbus-tcp",
                    "connection": f"{host}:{port}",
                    "unit": unit,
                    "profile": "sdm120" if unit == CIRCUITS["Heat pump"] else "sdm630",
                }
                for name, unit in CIRCUITS.items()
            ]
        }

    def set_loads(self, age_s: float, elapsed_s: float, push: bool = True) -> dict[str, float]:
        """Every started device reads its load ``age_s`` before the end; energy
        registers advance by the last ``elapsed_s`` seconds at the previous
        loads. ``push``: Tuya plugs report the change to connected clients."""
        loads = device_loads(age_s)
        previous = self._loads if self._loads is not None else loads
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
            # Its own counters: today's energy and the month's; the collector
            # makes energy_kwh from them.
            tapo.set_relay(True)
            tapo.set_energy(
                power_w=loads[name],
                today_kwh=self.energy_kwh[name] - self._tapo_start_kwh[name],
                month_kwh=self.energy_kwh[name],
            )
        for name, plug in self.tuya.items():
            plug.set_dps(plug_dps(loads[name], VOLTS, energy_kwh=self.energy_kwh[name]), push=push)
        if self.heat_pump is not None:
            watts = loads["Heat pump"]
            self.heat_pump.set(
                power_w=watts,
                current_a=watts / VOLTS / 0.97,
                import_kwh=self.energy_kwh["Heat pump"],
            )
        if self.ev_charger is not None:
            per_phase = loads["EV charger"] / 3
            for phase in (1, 2, 3):
                self.ev_charger.set_phase(
                    phase, voltage_v=VOLTS, current_a=per_phase / VOLTS, power_w=per_phase
                )
            self.ev_charger.set(import_kwh=self.energy_kwh["EV charger"])
        return loads
