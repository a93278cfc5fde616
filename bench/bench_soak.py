#!/usr/bin/env python3
"""Soak: the five collectors against the simulated home while everything fails.

All five collectors (the simulated home, simulators/home_live.py: Kasa, Tuya, ESP32, MQTT via a
real Mosquitto, Modbus circuit meters) run as processes at a 1 s interval,
sending through a fault proxy in front of a real carbon-cache. Three
schedules play at once:

- Carbon, every minute: answering, silent (accepts, never reads), slow
  (~20 KB/s), chattering (reads, talks back, never closes), and killed then
  restarted (carbon-cache itself, losing its cache).
- The home, every two minutes (DEVICE_FAULTS): a Kasa plug hangs, a Tuya
  plug hangs, a Modbus meter goes silent, the MQTT broker is killed and
  restarted, a Kasa plug drops off the network (port closed), the Tuya
  devices are switched off and on (simulator stopped and started on the same
  ports), the Modbus gateway is stopped and started; and the state disk
  fills up and is freed: the collectors' state dir is a small tmpfs (in a
  private mount namespace, as root) that a filler file tops up to full.
- SIGKILLs: every 15 s one collector, in turn, is SIGKILLed and started
  again, during the first quarter of the run (half in --quick), so that the
  same processes then run long enough for RSS, fds and threads to tell a
  leak. No SIGKILL is played while the disk is full (see docs/delivery.md:
  lines held in memory then are lost to a SIGKILL, by design).

What each collector produced is read from its write-ahead spool as it is
written (every line enters the spool before any send). At the end, with
Carbon answering again:

- every (path, timestamp) produced is in whisper with the value produced;
- no cycle boundary of a polled device (Kasa, Tuya, circuits) is missing a
  sample (in the spool, or in whisper: lines delivered from memory while the
  disk was full never reach the spool), except while that device was down
  by the schedule (its fault window plus RECOVERY_S) or its collector was
  dead (from the SIGKILL to RESTART_S later);
- no collector exited on its own, no log has a traceback;
- RSS, open file descriptors and threads of each collector, at checkpoints.

    .venv/bin/python bench/bench_soak.py --minutes 30    # recorded figures
    .venv/bin/python bench/bench_soak.py --quick         # 2 minutes, for CI

Loopback only; every process and mount started here is stopped (the tmpfs
lives in a mount namespace that ends with the soak's last process).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.carbon import (
    CarbonNotFoundError,
    CarbonServer,
    terminate,
)
from harness.collectors import Running
from harness.disk import fill_until_full
from simulators.home_live import (
    SOURCE_NAMES,
    HomeSource,
    start_source_collector,
    start_sources,
    write_home_config,
)
from spool import SEGMENT_NAME

ROOT = Path(__file__).resolve().parents[1]

POLLED = ("kasa", "tuya", "circuit")
# One minute of Carbon faults, repeated: (mode, seconds).
SCHEDULE = [
    ("answering", 12),
    ("silent", 8),
    ("answering", 6),
    ("slow", 8),
    ("answering", 6),
    ("chattering", 8),
    ("answering", 4),
    ("killed", 8),
]
KILL_EVERY_S = 15.0
DEVICE_PERIOD_S = 120.0
# A device back from a fault is polled again within this (Kasa reconnects,
# Tuya's backoff, Modbus reconnect); a collector SIGKILLed is sampling again
# within RESTART_S (Python start, imports, Kasa discovery). Boundaries in
# those windows are excluded from the check, and counted apart.
RECOVERY_S = 5.0
RESTART_S = 8.0
STATE_DISK_BYTES = 64 * 1024 * 1024
NAMESPACE_MARK = "BENCH_SOAK_IN_NAMESPACE"


class FaultProxy:
    """Plaintext proxy to carbon-cache whose behaviour ``mode`` sets (taken
    by each connection as it is accepted)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "answering"
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.line_address = self.listener.getsockname()
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, self.mode), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str) -> None:
        with client, contextlib.suppress(OSError):
            if mode == "silent":  # accepts, never reads, until the mode changes
                while self.mode == "silent" and not self.stopping.wait(0.5):
                    pass
                return
            if mode == "chattering":
                client.settimeout(0.01)
                while not self.stopping.is_set() and self.mode == "chattering":
                    with contextlib.suppress(socket.timeout):
                        client.recv(65536)
                    client.sendall(b"chatter\n")
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=30)
            except OSError:  # carbon-cache is down: reset, as a refused connect would
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            with upstream:
                back = threading.Thread(target=self._pump, args=(upstream, client, 0), daemon=True)
                back.start()
                self._pump(client, upstream, 20_000 if mode == "slow" else 0)
                back.join(30)

    def _pump(self, source: socket.socket, sink: socket.socket, rate_bytes_s: int) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(rate_bytes_s // 10 if rate_bytes_s else 65536)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
                if rate_bytes_s:
                    time.sleep(0.1)

    def close(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


class SpoolTailer:
    """Reads every line the collectors write to their spools, as they write
    them: what each produced. (path, timestamp) -> set of values."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.offsets: dict[Path, int] = {}
        self.produced: dict[str, dict[tuple[str, int], set[str]]] = defaultdict(dict)
        self.torn: dict[str, int] = defaultdict(int)  # lines not "path value timestamp"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(0.1):
            self.scan()

    def scan(self) -> None:
        for segment in sorted(self.state_dir.glob("*/spool/*.spool")):
            if not SEGMENT_NAME.fullmatch(segment.name):
                continue
            offset = self.offsets.get(segment, 0)
            try:
                with open(segment, "rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
            except OSError:
                continue
            complete = data.rfind(b"\n") + 1
            self.offsets[segment] = offset + complete
            source = segment.parent.parent.name
            for raw in data[:complete].decode("ascii", "replace").splitlines():
                fields = raw.split(" ")
                if len(fields) != 3 or not fields[2].isdigit():
                    self.torn[source] += 1
                    continue
                path, value, stamp = fields
                self.produced[source].setdefault((path, int(stamp)), set()).add(value)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.scan()


class StateDisk:
    """The collectors' state dir on a small tmpfs, and a filler file that
    keeps it full while ``full``. Needs root in a private mount namespace
    (main() re-runs the soak under ``unshare --mount``)."""

    def __init__(self, directory: Path, size_bytes: int) -> None:
        self.directory = directory
        self.filler = directory / "filler"
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(directory)],
            check=True,
            capture_output=True,
            text=True,
        )
        self.full = False

    def fill(self) -> None:
        """Write until the disk refuses (again: collectors free space too)."""
        self.full = True
        self.top_up()

    def top_up(self) -> None:
        if not self.full:
            return
        fill_until_full(self.filler)

    def free(self) -> None:
        self.full = False
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def unmount(self) -> None:
        self.free()
        subprocess.run(["umount", "-l", str(self.directory)], check=False, capture_output=True)


@dataclass
class Fault:
    """One fault of the home's schedule, played from ``at_s`` into each
    DEVICE_PERIOD_S for ``seconds``."""

    name: str
    at_s: float
    seconds: float
    begin: Callable[[], None]
    end: Callable[[], None]
    source: str = ""  # the collector whose devices it takes down
    devices: tuple[str, ...] = ()  # their metric segments (source.device)
    played: list[tuple[float, float]] = field(default_factory=list)  # (began, ended) wall time


def device_faults(sources: list[HomeSource], disk: StateDisk | None) -> list[Fault]:
    """The home's fault schedule, for the sources that run here."""
    controls = {source.name: source.controls for source in sources}
    faults = []
    kasa = controls.get("kasa")
    if kasa:
        kettle, office = kasa["Kettle"], kasa["Office"]
        faults.append(
            Fault(
                "Kasa plug hangs",
                5,
                10,
                lambda: setattr(kettle, "mode", "hang"),
                lambda: setattr(kettle, "mode", "normal"),
                "kasa",
                ("kasa.kettle",),
            )
        )
        faults.append(
            Fault(
                "Kasa plug off the network",
                65,
                10,
                lambda: setattr(office, "mode", "refuse"),
                lambda: setattr(office, "mode", "normal"),
                "kasa",
                ("kasa.office",),
            )
        )
    tuya = controls.get("tuya")
    if tuya:
        washer, simulator = tuya["Washing machine"], tuya["simulator"]
        faults.append(
            Fault(
                "Tuya plug hangs",
                20,
                10,
                lambda: setattr(washer, "mode", "hang"),
                lambda: setattr(washer, "mode", "normal"),
                "tuya",
                ("tuya.washing_machine",),
            )
        )
        faults.append(
            Fault(
                "Tuya plugs switched off and on",
                80,
                10,
                simulator.stop,
                simulator.start,
                "tuya",
                ("tuya.washing_machine", "tuya.freezer"),
            )
        )
    circuit = controls.get("circuit")
    if circuit:
        heat_pump, gateway = circuit["Heat pump"], circuit["gateway"]
        faults.append(
            Fault(
                "Modbus meter silent",
                35,
                10,
                lambda: setattr(heat_pump, "silent", True),
                lambda: setattr(heat_pump, "silent", False),
                "circuit",
                ("circuit.heat_pump",),
            )
        )
        faults.append(
            Fault(
                "Modbus gateway stopped and started",
                95,
                10,
                gateway.stop,
                gateway.start,
                "circuit",
                ("circuit.heat_pump", "circuit.ev_charger"),
            )
        )
    mqtt = controls.get("mqtt")
    if mqtt:
        broker = mqtt["broker"]
        faults.append(Fault("MQTT broker killed and restarted", 50, 6, broker.kill, broker.start))
    if disk is not None:
        faults.append(Fault("state disk full", 108, 10, disk.fill, disk.free))
    return faults


def resources(pid: int) -> tuple[int, int, int] | None:
    """(RSS KiB, open fds, threads) of a running process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), fds, int(fields["Threads"])


def missing_boundaries(stamps: list[int], down: list[tuple[float, float]]) -> tuple[list[int], int]:
    """(missing, excused): seconds between the first and last sample with no
    sample, split by whether a window in ``down`` (start, end) covers them."""
    missing, excused = [], 0
    for before, after in zip(stamps, stamps[1:]):
        for boundary in range(before + 1, after):
            if any(start <= boundary <= end for start, end in down):
                excused += 1
            else:
                missing.append(boundary)
    return missing, excused


@dataclass
class Collector:
    """A collector process and its life: when it was killed, its logs."""

    source: HomeSource
    running: Running
    logs: list[Path] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    crashes: list[str] = field(default_factory=list)


def start(source: HomeSource, config: Path, state: Path, logs: Path, count: int) -> Running:
    """A collector, with a log of its own for each start (the start truncates its log)."""
    directory = logs / f"{source.name}.{count:03d}"
    directory.mkdir()
    return start_source_collector(source, config, state, directory)


def run(duration_s: float, kill_until_s: float, checkpoints_s: list[float], work: Path) -> int:
    stack = contextlib.ExitStack()
    with stack:
        try:
            carbon = CarbonServer(work / "carbon", retentions="1s:3h").start()
        except CarbonNotFoundError as exc:
            print(f"soak skipped: {exc}")
            return 0
        stack.callback(carbon.stop)
        proxy = FaultProxy(carbon.line_address)
        stack.callback(proxy.close)
        state, logs = work / "state", work / "logs"
        disk = None
        if os.environ.get(NAMESPACE_MARK):
            try:
                disk = StateDisk(state, STATE_DISK_BYTES)
                stack.callback(disk.unmount)
            except (OSError, subprocess.CalledProcessError) as exc:
                print(f"# state disk full: not played (tmpfs mount failed: {exc})")
        home, sources = start_sources(stack, work, 1.0, print)
        config = work / "config_local.py"
        write_home_config(config, proxy.line_address, home, sources)
        with open(config, "a") as extra:
            extra.write("CARBON_TIMEOUT_S = 2.0\nMQTT_FLUSH_INTERVAL_S = 1.0\n")
            # A Modbus bus carries one request at a time: a silent meter holds it
            # for this long, which must fit in the 1 s cycle beside its neighbours.
            extra.write("CIRCUIT_MODBUS_TIMEOUT_S = 0.4\n")
        logs.mkdir()
        starts = defaultdict(int)
        collectors = {}
        for source in sources:
            collectors[source.name] = Collector(source, start(source, config, state, logs, 0))
        stack.callback(lambda: [terminate(c.running.process, 30) for c in collectors.values()])
        tailer = SpoolTailer(state)
        stack.callback(tailer.stop)
        faults = device_faults(sources, disk)
        stack.callback(lambda: [f.end() for f in faults if f.played and f.played[-1][1] == 0])
        figures: list[tuple[float, dict[str, Any]]] = []
        started = time.time()
        next_kill, turn, pending = KILL_EVERY_S, 0, list(checkpoints_s)
        schedule_s = sum(s for _, s in SCHEDULE)
        print(
            f"# bench_soak: {len(sources)} collectors, 1 s interval, {duration_s:g} s;"
            f" SIGKILLs until {kill_until_s:g} s; home faults: "
            + ", ".join(f.name for f in faults),
            flush=True,
        )
        while (elapsed := time.time() - started) < duration_s:
            home.tick(elapsed)
            into = elapsed % schedule_s
            mode = next(m for m, until in _ends(SCHEDULE) if into < until)
            if mode != proxy.mode:
                if proxy.mode == "killed":
                    carbon.start()
                if mode == "killed":
                    carbon.kill()
                proxy.mode = mode
            _play(faults, elapsed)
            if disk is not None:
                disk.top_up()
            for name, item in collectors.items():
                if item.running.process.poll() is not None:  # it exited on its own
                    code = item.running.process.returncode
                    item.crashes.append(f"{elapsed:.0f} s: exit {code}")
                    print(f"!! {name} exited with status {code} at {elapsed:.0f} s", flush=True)
                    starts[name] += 1
                    item.running = start(item.source, config, state, logs, starts[name])
                    item.started_at = time.time()
            disk_full = disk is not None and disk.full
            if elapsed >= next_kill and elapsed < kill_until_s and not disk_full:
                name = sorted(collectors)[turn % len(collectors)]
                turn += 1
                item = collectors[name]
                item.running.process.send_signal(signal.SIGKILL)
                item.running.process.wait()
                item.kills.append(time.time())
                starts[name] += 1
                item.running = start(item.source, config, state, logs, starts[name])
                item.started_at = time.time()
                next_kill += KILL_EVERY_S
            if pending and elapsed >= pending[0]:
                pending.pop(0)
                now = time.time()
                figures.append(
                    (
                        elapsed,
                        {
                            n: (resources(c.running.process.pid), now - c.started_at)
                            for n, c in collectors.items()
                        },
                    )
                )
                print(f"# checkpoint {elapsed / 60:.1f} min", flush=True)
            time.sleep(0.2)
        for fault in faults:  # everything back up
            if fault.played and fault.played[-1][1] == 0:
                fault.end()
                fault.played[-1] = (fault.played[-1][0], time.time())
        if proxy.mode == "killed":
            carbon.start()
        proxy.mode = "answering"
        ended = time.time()
        for item in collectors.values():  # SIGTERM: each stops; the spool keeps the rest
            terminate(item.running.process, timeout_s=30)
        tailer.stop()
        # What is left in the spools goes out at the next start: start them
        # once more and let them catch up.
        for name, item in collectors.items():
            starts[name] += 1
            item.running = start(item.source, config, state, logs, starts[name])
        code = verify(carbon, tailer, collectors, faults, figures, started, ended)
        code = max(code, check_logs(logs, collectors, faults))
        skipped = [name for name in SOURCE_NAMES if name not in collectors]
        if skipped:  # a collector that did not run proves nothing
            print(f"not played (their simulators did not start): {', '.join(skipped)}")
            code = 1
        return code


def _play(faults: list[Fault], elapsed: float) -> None:
    """Begin or end the home's faults due at ``elapsed``."""
    into = elapsed % DEVICE_PERIOD_S
    for fault in faults:
        active = fault.at_s <= into < fault.at_s + fault.seconds
        playing = bool(fault.played) and fault.played[-1][1] == 0
        if active and not playing:
            fault.played.append((time.time(), 0))
            fault.begin()
        elif playing and not active:
            fault.end()
            fault.played[-1] = (fault.played[-1][0], time.time())


def _ends(schedule: list[tuple[str, int]]) -> list[tuple[str, int]]:
    total, ends = 0, []
    for mode, seconds in schedule:
        total += seconds
        ends.append((mode, total))
    return ends


def down_windows(
    path: str, source: str, collectors: dict[str, Collector], faults: list[Fault]
) -> list[tuple[float, float]]:
    """When ``path``'s device or collector was down by the schedule: from the
    boundary whose poll may be in flight when the fault or SIGKILL comes (a
    Modbus request the stopped gateway never answers) to the recovery after."""
    windows = [(math.floor(k), k + RESTART_S) for k in collectors[source].kills]
    for fault in faults:
        if fault.source == source and any(f".{d}." in path for d in fault.devices):
            windows.extend((math.floor(begin), end + RECOVERY_S) for begin, end in fault.played)
    return windows


def verify(carbon, tailer, collectors, faults, figures, started: float, ended: float) -> int:
    produced = tailer.produced
    wanted = sum(len(points) for points in produced.values())
    print(f"lines produced (read from the spools): {wanted:,}")
    deadline = time.monotonic() + 180
    while True:
        absent, wrong, gaps, absent_points = _compare(
            carbon, produced, collectors, faults, started, ended
        )
        if (not any(absent.values()) and not any(wrong.values())) or time.monotonic() > deadline:
            break
        time.sleep(2)
    print(
        "\n| collector | (path, ts) produced | not in whisper | other value "
        "| missing boundaries | excused (device or collector down) | SIGKILLs |"
    )
    print("|---|---|---|---|---|---|---|")
    for source in sorted(produced):
        missing, excused = gaps.get(source, ([], 0))
        polled = source in POLLED
        print(
            f"| {source} | {len(produced[source]):,} | {absent.get(source, 0):,} "
            f"| {wrong.get(source, 0):,} | {len(missing) if polled else '-'} "
            f"| {excused if polled else '-'} | {len(collectors[source].kills)} |"
        )
    for _source, (missing, _) in sorted(gaps.items()):
        for path, boundary in sorted(missing, key=lambda m: m[1])[:10]:
            print(f"  missing: {path} at {boundary - started:.0f} s")
    for path, stamp in sorted(absent_points, key=lambda p: p[1])[:10]:
        print(f"  not in whisper: {path} at {stamp - started:.0f} s")
    torn = sum(tailer.torn.values())
    print(f"torn or invalid lines in the spools: {torn}")
    print("\n| home fault | played | device back (s after the fault ended, max) |")
    print("|---|---|---|")
    for fault in faults:
        back = _recovery(fault, produced)
        print(f"| {fault.name} | {len(fault.played)} | {back} |")
    print("\n| at | collector | RSS MiB | fds | threads | process age |")
    print("|---|---|---|---|---|---|")
    for at, per in figures:
        for name, (res, age_s) in sorted(per.items()):
            if res is not None:
                print(
                    f"| {at / 60:.1f} min | {name} | {res[0] / 1024:.1f} | {res[1]} "
                    f"| {res[2]} | {age_s / 60:.1f} min |"
                )
    ok = (
        not any(absent.values())
        and not any(wrong.values())
        and not any(m for m, _ in gaps.values())
        and not torn
    )
    print(f"\nevery line in whisper, no boundary missing: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def _recovery(fault: Fault, produced) -> str:
    """Seconds from each end of ``fault`` to its devices' next power sample."""
    if not fault.devices:
        return "-"
    stamps = sorted(
        {
            stamp
            for (path, stamp) in produced.get(fault.source, {})
            if path.endswith("power_watts") and any(f".{d}." in path for d in fault.devices)
        }
    )
    worst = 0.0
    for _, end in fault.played:
        after = [s for s in stamps if s >= end]
        if after:
            worst = max(worst, after[0] - end)
    return f"{worst:.1f}"


def _compare(carbon, produced, collectors, faults, started: float, ended: float):
    absent: dict[str, int] = defaultdict(int)
    wrong: dict[str, int] = defaultdict(int)
    absent_points: list[tuple[str, int]] = []
    gaps: dict[str, tuple[list[tuple[str, int]], int]] = {}
    for source, points in produced.items():
        by_path: dict[str, dict[int, set[str]]] = defaultdict(dict)
        for (path, stamp), values in points.items():
            by_path[path][stamp] = values
        missing: list[tuple[str, int]] = []
        excused = 0
        for path, stamps in by_path.items():
            stored = dict(carbon.fetch(path, from_ts=min(stamps)))
            for stamp, values in stamps.items():
                if stamp not in stored:
                    absent[source] += 1
                    absent_points.append((path, stamp))
                elif not any(
                    abs(stored[stamp] - float(v)) <= 1e-9 * max(1, abs(float(v))) for v in values
                ):
                    wrong[source] += 1
            if source in POLLED and path.endswith("power_watts") and ".health." not in path:
                # Lines delivered from memory while the disk was full never
                # reach the spool: whisper has them, and only the collector
                # can have written them there.
                sampled = set(stamps) | set(stored)
                inside = sorted(s for s in sampled if started + 2 < s < ended - 2)
                down = down_windows(path, source, collectors, faults)
                m, e = missing_boundaries(inside, down)
                missing.extend((path, boundary) for boundary in m)
                excused += e
        gaps[source] = (missing, excused)
    return absent, wrong, gaps, absent_points


TRACEBACK = re.compile(r"^Traceback \(most recent call last\)", re.M)
DISK_WORDS = ("No space left", "ENOSPC", "writable again", "spool")


def check_logs(logs: Path, collectors: dict[str, Collector], faults: list[Fault]) -> int:
    """No traceback, no collector that exited on its own; what each said
    about the full disk (each distinct message, how often)."""
    bad = 0
    disk_episodes = sum(len(f.played) for f in faults if f.name == "state disk full")
    print(f"\nstate disk full episodes: {disk_episodes}")
    print("\n| collector | starts | exited on its own | tracebacks | disk-full log lines |")
    print("|---|---|---|---|---|")
    said: dict[str, dict[str, int]] = {}
    for name, item in sorted(collectors.items()):
        texts = [p.read_text(errors="replace") for p in sorted(logs.glob(f"{name}.*/{name}.log"))]
        tracebacks = sum(len(TRACEBACK.findall(t)) for t in texts)
        disk_lines = [
            line
            for t in texts
            for line in t.splitlines()
            if "No space left" in line or "writable again" in line
        ]
        said[name] = defaultdict(int)
        for line in disk_lines:
            said[name][_shape(line)] += 1
        bad += tracebacks + len(item.crashes)
        print(f"| {name} | {len(texts)} | {len(item.crashes)} | {tracebacks} | {len(disk_lines)} |")
    for name, shapes in sorted(said.items()):
        for shape, count in sorted(shapes.items()):
            print(f"  {name}: {count} x {shape}")
    return 1 if bad else 0


def _shape(line: str) -> str:
    """A log line without its time, numbers and paths: one per kind of message."""
    text = re.sub(r"^\S+ \S+ ", "", line)
    text = re.sub(r"/\S+", "<path>", text)
    return re.sub(r"\d+", "N", text)[:160]


def in_namespace(argv: list[str]) -> int | None:
    """As root, run the soak again in a private mount namespace (for the
    state disk's tmpfs); None when that cannot be done here."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"# state disk full: not played (unshare: {probe.stderr.strip()})", flush=True)
        return None
    command = ["unshare", "--mount", "--propagation", "private", "--"]
    command += [sys.executable, str(Path(__file__).resolve()), *argv]
    return subprocess.call(command, env={**os.environ, NAMESPACE_MARK: "1"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="2 minutes")
    parser.add_argument("--work", type=Path, help="keep logs and whisper files here")
    parser.add_argument(
        "--no-disk-full", action="store_true", help="do not fill the state disk (needs root)"
    )
    args = parser.parse_args(argv)
    if args.no_disk_full:
        print("# state disk full: not played (--no-disk-full)")
    elif not os.environ.get(NAMESPACE_MARK):
        code = in_namespace(argv)
        if code is not None:
            return code
        if os.geteuid() != 0:
            print("# state disk full: not played (a tmpfs needs root)")
    duration_s = 120.0 if args.quick else args.minutes * 60
    # The last figure just before the end (the loop ends at duration_s).
    checkpoints = [c for c in (60.0, 600.0) if c < duration_s - 10] + [duration_s - 5]
    if args.quick:
        checkpoints = [20.0, 60.0, 110.0]
    kill_until_s = duration_s * (0.5 if args.quick else 0.25)
    if args.work is not None:
        args.work.mkdir(parents=True)  # a new directory: the soak's own
        return run(duration_s, kill_until_s, checkpoints, args.work.resolve())
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as temp:
        return run(duration_s, kill_until_s, checkpoints, Path(temp))


if __name__ == "__main__":
    sys.exit(main())
