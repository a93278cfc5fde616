"""The simulated home's history, backdated into a real carbon-cache by the
real collectors: what the dashboard PNG and the Grafana tests read.

The home (simulators/home.py) on loopback: its plugs and circuit meters
are polled by the collectors' own poll loop (``collector.PollLoop.cycle``)
with backdated cycle times; the ESP32 and the Glow display run on simulated
clocks and stamp their own readings, posting to the real receiver and
publishing to the real MQTT collector. Then the scripts run ``--once`` as
users run them.

Used by tools/render_dashboard_png.py (docs/dashboard.png) and
tests/test_grafana.py (every panel's query against what the collectors
sent). Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import circuit_to_graphite
import collector
import kasa_to_graphite
import settings as settings_module
import tuya_to_graphite
from harness.carbon import CarbonServer, free_port, spawn, terminate
from harness.collectors import collector_environment, script_command
from harness.graphite_web import GraphiteWeb
from harness.mosquitto import MosquittoBroker
from runtime import Runtime, build_parser
from simulators.esp32 import SimClock, SimulatedEsp32
from simulators.glow import Publisher, SimulatedGlow
from simulators.home import (
    ESP32_ID,
    ESP32_TOKEN,
    FIXTURES_DIR,
    GLOW_ID,
    HomeDevices,
    earlier_house_load,
    house_load,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "graphite" / "storage-schemas.conf"
AGGREGATION = ROOT / "graphite" / "storage-aggregation.conf"

STEP_S = 10  # the meters' reading interval, and the circuits' poll interval
PLUG_STEP_S = 30

# --- The simulated home, filled in through the real collectors -------------------------------


class _SimulatedWallClock:
    """Stands in for the ``time`` module of a collector whose polls are backdated:
    the Tuya plugs' energy is integrated over the poll's wall-clock time."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


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
        self.state_dir = self.work_dir / "state"
        self.config_file = self.work_dir / "config_local.py"
        self.devices = HomeDevices(self.work_dir, fixtures_dir)
        self._stack = contextlib.ExitStack()
        self.settings: dict[str, Any] = {}
        self.processes: dict[str, Any] = {}
        self.once_results: dict[str, tuple[int, str]] = {}  # source: (exit status, log)
        self.push_results: dict[str, int] = {}  # esp32, mqtt: exit status

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
        env = collector_environment(
            self._collector_settings(
                ESP32_TOKEN=ESP32_TOKEN,
                ESP32_MAX_READING_AGE_S=max_age_s,
                METER_INTERVAL_S=0.5,
            ),
            self.config_file,
        )
        self.processes["esp32"] = spawn(
            script_command("esp32_receiver.py", "--bind", "127.0.0.1", "--port", str(port)),
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
        env = collector_environment(
            self._collector_settings(MQTT_FLUSH_INTERVAL_S=0.5, MQTT_HEALTH_INTERVAL_S=5.0),
            self.config_file,
        )
        self.processes["mqtt"] = spawn(
            script_command(
                "mqtt_to_graphite.py", "--broker", f"{self.broker.host}:{self.broker.port}"
            ),
            self.work_dir / "mqtt_to_graphite.log",
            env=env,
            cwd=ROOT,
        )
        self.publisher = self._stack.enter_context(Publisher(self.broker.host, self.broker.port))

    def __enter__(self) -> SimulatedHome:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("# the simulated home: settings come from the environment\n")
        try:
            self.settings.update(self.devices.start_kasa(self._stack))
            # Polled at the plugs' known addresses: the lamp that goes silent
            # near the end is still a device of the --once runs.
            self.settings.update(KASA_HOSTS=self.devices.kasa_hosts, KASA_DISCOVERY_ENABLED=False)
            self.settings.update(self.devices.start_tuya(self._stack))
            self.settings.update(self.devices.start_circuits(self._stack))
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
            ESP32_ID,
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
        esp32 = SimulatedEsp32(self.esp32_url, ESP32_TOKEN, ESP32_ID, clock=SimClock(start), seed=2)
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
                self.devices.set_loads(age_s, STEP_S if when > start else 0)
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
        env = collector_environment(self._collector_settings(), self.config_file)
        started = {
            cls.source: spawn(
                script_command(f"{cls.source}_to_graphite.py", "--once"),
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
