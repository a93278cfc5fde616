#!/usr/bin/env python3
"""See it work before owning a device: simulated Kasa plugs and a strip on
loopback, polled by the real kasa_to_graphite.py, Carbon lines printed.

    ./electricity demo

Nothing leaves 127.0.0.0/8 and nothing is sent to Carbon (--dry-run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from simulators.kasa import KasaSimulator, SimulatedKasaDevice, loopback_host  # noqa: E402


def demo_devices() -> list[SimulatedKasaDevice]:
    kettle = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(0), alias="Kettle")
    fridge = SimulatedKasaDevice("HS110(EU)_1.0_1.2.5.json", host=loopback_host(1), alias="Fridge")
    lamp = SimulatedKasaDevice("HS100(UK)_1.0_1.2.6.json", host=loopback_host(2), alias="Lamp")
    strip = SimulatedKasaDevice(
        "HS300(US)_1.0_1.0.21.json",
        host=loopback_host(3),
        alias="Office strip",
        child_aliases=["Desk", "Monitor", "Printer", "Router", "Charger", "Speaker"],
    )
    kettle.set_realtime(power_w=2950.0, voltage_v=241.2, current_a=12.23, total_kwh=412.5)
    fridge.set_realtime(power_w=88.4, voltage_v=240.8, current_a=0.52, total_kwh=1893.2)
    for outlet, watts in enumerate([24.5, 31.0, 3.2, 9.8, 0.0, 4.1]):
        strip.set_realtime(
            power_w=watts, voltage_v=240.5, current_a=round(watts / 240.5, 3), child=outlet
        )
    return [kettle, fridge, lamp, strip]


def main() -> int:
    devices = demo_devices()
    with KasaSimulator(devices) as simulator, tempfile.TemporaryDirectory() as state_dir:
        empty_config = Path(state_dir) / "config_local.py"
        empty_config.write_text("")
        environment = {
            **os.environ,
            "ELECTRICITY_CONFIG": str(empty_config),
            "KASA_DISCOVERY_TIMEOUT_S": "1",
        }
        print(
            f"Polling {len(devices)} simulated Kasa devices on 127.0.0.x:{simulator.port} "
            "(a strip of 6 outlets, 2 metering plugs, 1 plain plug); Carbon lines follow:",
            file=sys.stderr,
        )
        command = [
            sys.executable,
            str(ROOT / "kasa_to_graphite.py"),
            "--once",
            "--dry-run",
            "--target",
            f"127.0.0.1:{simulator.port}",
            "--state-dir",
            state_dir,
        ]
        return subprocess.run(command, env=environment).returncode


if __name__ == "__main__":
    sys.exit(main())
