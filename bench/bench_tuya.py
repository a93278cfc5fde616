#!/usr/bin/env python3
"""Tuya collector benchmark: cycle time and CPU for 50 devices, and a dead one.

50 simulated devices on 127.x addresses (40 metering plugs with a wizard
mapping, 10 metering DIN breakers without one; protocols 3.1, 3.3, 3.4 and
3.5 in turn), served by a separate process so that the CPU measured here is
the collector's alone. The real TuyaCollector polls them in the shared poll
loop (a dry run, lines discarded), cycles back to back:

- persistent connections (the default): first cycle (connect, 3.4/3.5 session
  keys) and steady cycles;
- a new connection per poll (TUYA_PERSISTENT = False);
- the 50 plus one device that accepts and never answers: what it adds to the
  cycle, and whether the others' lines wait for it.

    .venv/bin/python bench/bench_tuya.py [--cycles N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import collector
from runtime import DryRunSink, Runtime
from settings import load_settings
from simulators.tuya import PLUG_MAPPING
from tuya_to_graphite import TuyaCollector

ROOT = Path(__file__).resolve().parents[1]

DEVICES = 50
VERSIONS = ("3.1", "3.3", "3.4", "3.5")
KEY = "0123456789abcdef"
MAPPED_PLUG = PLUG_MAPPING


def wizard_entries(count: int, subnet: str) -> list[dict]:
    entries = []
    for n in range(count):
        entry = {
            "id": f"bfbench{n:015d}",
            "name": f"Device {n}",
            "key": KEY,
            "ip": f"{subnet}{n + 1}",
            "version": VERSIONS[n % len(VERSIONS)],
        }
        if n % 5 == 4:
            entry.update(category="dlq", product_id="odhgp5hewa1o7mdn")
        else:
            entry.update(category="cz", mapping=MAPPED_PLUG)
        entries.append(entry)
    return entries


def serve(spec_path: str) -> int:
    """--serve: run the simulated devices until stdin closes, then print counts."""
    from simulators.tuya import SimulatedTuyaDevice, TuyaSimulator, din_meter_dps, plug_dps

    spec = json.loads(Path(spec_path).read_text())
    devices = []
    for n, entry in enumerate(spec["entries"]):
        if entry.get("category") == "dlq":
            dps = din_meter_dps([(230.0, 2.0 + n / 10, 460.0 + 23 * n)], 100.0 + n)
        else:
            dps = plug_dps(10.0 + 7.5 * n, 230.0 + n / 10)
        mode = "hang" if entry["id"] in spec["hang"] else "normal"
        devices.append(SimulatedTuyaDevice.from_devices_json(entry, dps=dps, mode=mode))
    with TuyaSimulator(devices):
        print("ready", flush=True)
        sys.stdin.read()
    totals: dict[str, int] = {}
    for device in devices:
        for event, count in device.counts.items():
            totals[event] = totals.get(event, 0) + count
    print(json.dumps(totals), flush=True)
    return 0


class TimedSink(DryRunSink):
    """Lines go nowhere; when each batch went is kept."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.sent: list[tuple[float, list[str]]] = []

    def send_lines(self, lines):  # type: ignore[no-untyped-def]
        self.sent.append((time.perf_counter(), list(lines)))
        return True


def run(entries: list[dict], hang: list[str], cycles: int, persistent: bool, work: Path) -> dict:
    spec = work / "spec.json"
    spec.write_text(json.dumps({"entries": entries, "hang": hang}))
    devices_json = work / "devices.json"
    devices_json.write_text(json.dumps(entries))
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the simulated devices did not start")
        figures = poll_cycles(devices_json, cycles, persistent, work)
    finally:
        out, _ = server.communicate("", timeout=60)
    figures["device_events"] = json.loads(out.strip().splitlines()[-1])
    return figures


def poll_cycles(devices_json: Path, cycles: int, persistent: bool, work: Path) -> dict:
    settings = load_settings(
        env={"ELECTRICITY_STATE_DIR": str(work / "state")},
        local_path=work / "no_config_local.py",
        overrides={"TUYA_DEVICES_FILE": str(devices_json), "TUYA_PERSISTENT": persistent},
    )
    runtime = Runtime("tuya", settings, dry_run=True)
    sink = runtime.sink = TimedSink()
    tuya = TuyaCollector(runtime, argparse.Namespace(discover=False))

    async def cycles_run() -> list[dict]:
        loop = collector.PollLoop(tuya, interval_s=30)
        await loop.rediscover()
        results = []
        try:
            for n in range(cycles):
                sink.sent.clear()
                cpu, started = time.process_time(), time.perf_counter()
                ok, failed, _ = await loop.cycle(1_800_000_000 + 30 * n)
                ended = time.perf_counter()
                device_batches = [at for at, lines in sink.sent if ".health." not in lines[0]]
                results.append(
                    {
                        "wall_s": ended - started,
                        "cpu_s": time.process_time() - cpu,
                        "ok": ok,
                        "failed": failed,
                        "lines_out_s": (max(device_batches) - started) if device_batches else 0,
                        "threads": threading.active_count(),
                    }
                )
        finally:
            await tuya.close()
        return results

    results = asyncio.run(cycles_run())
    return {"cycles": results}


def report(title: str, figures: dict) -> None:
    cycles = figures["cycles"]
    first, steady = cycles[0], cycles[1:] or cycles
    walls = [c["wall_s"] for c in steady]
    cpus = [c["cpu_s"] for c in steady]
    print(title)
    print(
        f"  first cycle {first['wall_s'] * 1000:7.1f} ms wall, {first['cpu_s'] * 1000:6.1f} ms CPU;"
        f" steady: median {statistics.median(walls) * 1000:7.1f} ms wall (worst "
        f"{max(walls) * 1000:.1f}), {statistics.median(cpus) * 1000:6.1f} ms CPU per cycle"
    )
    lines_out = statistics.median(c["lines_out_s"] for c in steady)
    events = figures["device_events"]
    print(
        f"  devices ok {steady[-1]['ok']}, failed {steady[-1]['failed']}; every device line out "
        f"after {lines_out * 1000:.1f} ms (median); threads {steady[-1]['threads']}; "
        f"connections made {events.get('connect', 0)}, UPDATEDPS sent "
        f"{events.get('UPDATEDPS', 0)} in {len(cycles)} cycles"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 cycles")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    logging.basicConfig(level=logging.ERROR)  # the dead device's warning is expected
    cycles = 3 if args.quick else args.cycles
    subnet = f"127.{random.randrange(100, 255)}.{random.randrange(256)}."
    entries = wizard_entries(DEVICES, subnet)
    settings = load_settings(env={}, local_path="/nonexistent")
    print(
        f"{DEVICES} devices (40 mapped plugs, 10 DIN breakers; protocols {', '.join(VERSIONS)}), "
        f"{cycles} cycles back to back, TUYA_TIMEOUT_S {settings.tuya_timeout_s:g} s, "
        f"DEVICE_TIMEOUT_S {settings.device_timeout_s:g} s, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as work:
        report("persistent connections", run(entries, [], cycles, True, Path(work)))
    with tempfile.TemporaryDirectory() as work:
        report("a new connection per poll", run(entries, [], cycles, False, Path(work)))
    dead = wizard_entries(DEVICES + 1, subnet)
    dead[-1]["version"] = "3.3"
    with tempfile.TemporaryDirectory() as work:
        figures = run(dead, [dead[-1]["id"]], cycles, True, Path(work))
        report("persistent, plus one device that accepts and never answers", figures)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"collector peak RSS {rss_mb:.0f} MB (Python, tinytuya and the poll loop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
