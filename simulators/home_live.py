"""The simulated home in real time: the demo's, the soak's and the footprint
benchmark's.

Each source's devices start on loopback (``start_sources``), its collector
runs as a process as on a Pi (harness/collectors.py), and ``LiveHome.tick``
plays the home's loads (simulators/home.py) at TIME_LAPSE: a minute here is
twenty of the home's, so a short demo still sees the kettle boil and the
fridge cycle. Energy registers count at the real pace, so power and energy
agree. The ESP32 posts its pulses and the Glow display publishes from
threads of their own, as the devices do.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.carbon import free_port
from harness.collectors import Running, start_collector, write_config
from simulators.home import ESP32_ID, ESP32_TOKEN, GLOW_ID, HomeDevices, house_load

ROOT = Path(__file__).resolve().parents[1]

TIME_LAPSE = 20
# Where the home's day starts playing: the kettle is about to boil.
START_AGE_S = 5700.0


class Unavailable(Exception):
    """A source cannot run here; the message says how to make it run."""


@dataclass
class HomeSource:
    """A source of the home, running, and how its collector reads it."""

    name: str
    script: str
    what: str  # what is simulated, for the header
    args: list[str] = field(default_factory=list)  # the collector's own flags
    settings: dict[str, Any] = field(default_factory=dict)  # for config_local.py
    # The simulators behind it, by name, for benchmarks that play faults on them.
    controls: dict[str, Any] = field(default_factory=dict)


class LiveHome:
    """The home's devices and meters, their loads set by ``tick``."""

    def __init__(self, work_dir: Path, interval_s: float) -> None:
        self.devices = HomeDevices(work_dir)
        self.interval_s = interval_s
        self.house_watts = house_load(START_AGE_S)
        # The whole-house meters (ESP32, Glow): told the house's watts each tick.
        self.meters: list[Callable[[float], None]] = []
        self._last_elapsed_s = 0.0

    def tick(self, elapsed_s: float) -> None:
        """The loads ``elapsed_s`` seconds into the run."""
        age_s = START_AGE_S + elapsed_s * TIME_LAPSE
        # Tuya plugs are asked, not pushed to, every tick: a push each second
        # would be all a slow poll ever saw.
        self.devices.set_loads(age_s, elapsed_s - self._last_elapsed_s, push=False)
        self._last_elapsed_s = elapsed_s
        self.house_watts = house_load(age_s)
        for meter in self.meters:
            meter(self.house_watts)


def wait_for_port(address: tuple[str, int], timeout_s: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=0.5):
            return True
        stop.wait(0.2)
    return False


def background(stack: contextlib.ExitStack, run: Callable[[threading.Event], None]) -> None:
    """Run ``run(stop)`` in a thread until ``stack`` closes."""
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(stop,), daemon=True)
    thread.start()

    def end() -> None:
        stop.set()
        thread.join(timeout=10)

    stack.callback(end)


# --- One block per source: start its simulated devices ------------------------------


def kasa_source(home: LiveHome, stack: contextlib.ExitStack, work: Path) -> HomeSource:
    settings = home.devices.start_kasa(stack)
    return HomeSource(
        "kasa",
        "kasa_to_graphite.py",
        f"{len(home.devices.kasa)} Kasa plugs and a Tapo P110 (KLAP), found by discovery",
        settings=settings,
        controls={**home.devices.kasa, **home.devices.tapo},
    )


def tuya_source(home: LiveHome, stack: contextlib.ExitStack, work: Path) -> HomeSource:
    settings = home.devices.start_tuya(stack)
    return HomeSource(
        "tuya",
        "tuya_to_graphite.py",
        "2 Tuya plugs, protocols 3.3 and 3.4, from a wizard's devices.json",
        settings=settings,
        controls={"simulator": home.devices.tuya_simulator, **home.devices.tuya},
    )


def esp32_source(home: LiveHome, stack: contextlib.ExitStack, work: Path) -> HomeSource:
    from simulators.esp32 import SimulatedEsp32

    port = free_port()
    esp32 = SimulatedEsp32(
        f"http://127.0.0.1:{port}/api/v1/readings",
        ESP32_TOKEN,
        ESP32_ID,
        imp_per_kwh=1000,
        power_watts=home.house_watts,
        post_interval_s=home.interval_s,
    )

    def post_pulses(stop: threading.Event) -> None:
        # The device boots with the receiver: first posts go out once it listens.
        if wait_for_port(("127.0.0.1", port), 60, stop):
            esp32.flush()  # a first reading at once, not after a post interval
            esp32.run(24 * 3600, stop=stop)

    background(stack, post_pulses)
    home.meters.append(lambda watts: setattr(esp32, "power_watts", watts))
    return HomeSource(
        "esp32",
        "esp32_receiver.py",
        f"an ESP32 on the smart meter's LED (1000 imp/kWh), posting every {home.interval_s:g} s",
        args=["--bind", "127.0.0.1", "--port", str(port)],
        settings={"ESP32_TOKEN": ESP32_TOKEN},
    )


def mqtt_source(home: LiveHome, stack: contextlib.ExitStack, work: Path) -> HomeSource:
    from harness.mosquitto import MosquittoBroker, MosquittoNotFoundError
    from simulators.glow import Publisher, SimulatedGlow

    try:
        broker = MosquittoBroker(work / "mosquitto").start()
    except MosquittoNotFoundError:
        raise Unavailable(
            "Mosquitto is not installed: `sudo apt install mosquitto` (the others run)"
        ) from None
    stack.callback(broker.stop)
    interval_s = max(1, int(home.interval_s))
    glow = SimulatedGlow(GLOW_ID, start=int(time.time()) - interval_s, interval_s=interval_s)

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
    home.meters.append(lambda watts: setattr(glow, "power_kw", watts / 1000))
    return HomeSource(
        "mqtt",
        "mqtt_to_graphite.py",
        "a Glow display (electricity and gas) publishing through a local Mosquitto",
        args=["--broker", f"{broker.host}:{broker.port}"],
        settings={"MQTT_HEALTH_INTERVAL_S": home.interval_s},
        controls={"broker": broker},
    )


def circuit_source(home: LiveHome, stack: contextlib.ExitStack, work: Path) -> HomeSource:
    settings = home.devices.start_circuits(stack)
    return HomeSource(
        "circuit",
        "circuit_to_graphite.py",
        "an SDM120 (heat pump) and an SDM630 (EV charger) behind a Modbus TCP gateway",
        settings=settings,
        controls={
            "gateway": home.devices.gateway,
            "Heat pump": home.devices.heat_pump,
            "EV charger": home.devices.ev_charger,
        },
    )


SOURCES: list[Callable[[LiveHome, contextlib.ExitStack, Path], HomeSource]] = [
    kasa_source,
    tuya_source,
    esp32_source,
    mqtt_source,
    circuit_source,
]
SOURCE_NAMES = [make.__name__[: -len("_source")] for make in SOURCES]


def start_sources(
    stack: contextlib.ExitStack, work: Path, interval_s: float, say: Callable[[str], None]
) -> tuple[LiveHome, list[HomeSource]]:
    """Every source that can start here (``say`` tells which could not, and why)."""
    home = LiveHome(work, interval_s)
    sources = []
    for make, name in zip(SOURCES, SOURCE_NAMES):
        try:
            source = make(home, stack, work)
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
    home.tick(0.0)  # the first readings are of this home
    return home, sources


def write_home_config(
    path: Path, carbon_address: tuple[str, int], home: LiveHome, sources: list[HomeSource]
) -> None:
    """The home's config_local.py: Carbon, the home's intervals, then each
    source's devices."""
    host, port = carbon_address
    interval_s = home.interval_s
    sections: dict[str, dict[str, Any]] = {
        "Carbon and the intervals": {
            "CARBON_HOST": host,
            "CARBON_PORT": port,
            "PLUG_INTERVAL_S": interval_s,
            "METER_INTERVAL_S": interval_s,
            "CIRCUIT_INTERVAL_S": interval_s,
            "DEVICE_TIMEOUT_S": 4.0,
        }
    }
    for source in sources:
        sections[f"{source.name}: {source.what}"] = source.settings
    write_config(path, sections)


def start_source_collector(
    source: HomeSource, config: Path, state_dir: Path, logs: Path
) -> Running:
    """The source's collector script, its log in ``logs``."""
    return start_collector(
        source.name, source.script, source.args, config, state_dir, logs / f"{source.name}.log"
    )
