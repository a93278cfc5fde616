#!/usr/bin/env python3
"""Soak: the five collectors against the simulated home while Carbon misbehaves.

All five collectors (demo.py's simulated home: Kasa, Tuya, ESP32, MQTT via a
real Mosquitto, Modbus circuit meters) run as processes at a 1 s interval,
sending through a fault proxy in front of a real carbon-cache. A schedule
repeats every minute: Carbon answering, silent (accepts, never reads), slow
(~20 KB/s), chattering (reads, talks back, never closes), and killed then
restarted (carbon-cache itself, losing its cache); every 15 s one collector,
in turn, is SIGKILLed and started again.

What each collector produced is read from its write-ahead spool as it is
written (every line enters the spool before any send). At the end, with
Carbon answering again:

- every (path, timestamp) produced is in whisper with the value produced;
- no cycle boundary of a polled device (Kasa, Tuya, circuits) is missing a
  sample, except across a SIGKILL of its collector (nothing polls while it
  is dead);
- RSS, open file descriptors and threads of each collector, at checkpoints.

    .venv/bin/python bench/bench_soak.py --minutes 30    # recorded figures
    .venv/bin/python bench/bench_soak.py --quick         # 2 minutes, for CI

Not played (yet): broker restarts, devices dropping out, the state disk
filling up. Loopback only; every process started here is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402
from harness.carbon import CarbonNotFoundError, CarbonServer  # noqa: E402
from spool import SEGMENT_NAME  # noqa: E402

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
                path, value, stamp = raw.split(" ")
                self.produced[source].setdefault((path, int(stamp)), set()).add(value)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.scan()


def resources(pid: int) -> tuple[int, int, int] | None:
    """(RSS KiB, open fds, threads) of a running process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), fds, int(fields["Threads"])


def missing_boundaries(stamps: list[int], kills: list[float]) -> list[int]:
    """Seconds between the first and last sample with no sample, except in
    gaps that a SIGKILL of the collector explains."""
    missing = []
    for before, after in zip(stamps, stamps[1:]):
        if after - before > 1 and not any(before <= k <= after for k in kills):
            missing.extend(range(before + 1, after))
    return missing


def run(duration_s: float, checkpoints_s: list[float], work: Path) -> int:
    demo.INTERVAL_S = 1.0
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
        sources = demo.start_sources(stack, work)
        config = work / "config_local.py"
        demo.write_config(config, proxy, sources)  # type: ignore[arg-type]
        with open(config, "a") as extra:
            extra.write("CARBON_TIMEOUT_S = 2.0\nMQTT_FLUSH_INTERVAL_S = 1.0\n")
        state, logs = work / "state", work / "logs"
        logs.mkdir()
        for source in sources:
            source.tick(0.0)
        running = {s.name: demo.start_collector(s, config, state, logs) for s in sources}
        stack.callback(lambda: [demo.terminate(r.process, 30) for r in running.values()])
        tailer = SpoolTailer(state)
        stack.callback(tailer.stop)
        kills: dict[str, list[float]] = defaultdict(list)
        figures: list[tuple[float, dict[str, tuple[int, int, int] | None]]] = []
        started = time.time()
        next_kill, turn, pending = KILL_EVERY_S, 0, list(checkpoints_s)
        schedule_s = sum(s for _, s in SCHEDULE)
        print(f"# bench_soak: {len(sources)} collectors, 1 s interval, {duration_s:g} s")
        while (elapsed := time.time() - started) < duration_s:
            for source in sources:
                source.tick(elapsed)
            into = elapsed % schedule_s
            mode = next(m for m, until in _ends(SCHEDULE) if into < until)
            if mode != proxy.mode:
                if proxy.mode == "killed":
                    carbon.start()
                if mode == "killed":
                    carbon.kill()
                proxy.mode = mode
            if elapsed >= next_kill:
                name = sorted(running)[turn % len(running)]
                turn += 1
                running[name].process.send_signal(signal.SIGKILL)
                running[name].process.wait()
                kills[name].append(time.time())
                running[name] = demo.start_collector(running[name].source, config, state, logs)
                next_kill += KILL_EVERY_S
            if pending and elapsed >= pending[0]:
                pending.pop(0)
                figures.append((elapsed, {n: resources(r.process.pid) for n, r in running.items()}))
            time.sleep(0.2)
        if proxy.mode == "killed":
            carbon.start()
        proxy.mode = "answering"
        ended = time.time()
        for item in running.values():  # SIGTERM: each stops; the spool keeps the rest
            demo.terminate(item.process, timeout_s=30)
        tailer.stop()
        # What is left in the spools goes out at the next start: start them
        # once more and let them catch up.
        running = {s.name: demo.start_collector(s, config, state, logs) for s in sources}
        return verify(carbon, tailer, kills, figures, started, ended)


def _ends(schedule: list[tuple[str, int]]) -> list[tuple[str, int]]:
    total, ends = 0, []
    for mode, seconds in schedule:
        total += seconds
        ends.append((mode, total))
    return ends


def verify(carbon, tailer, kills, figures, started: float, ended: float) -> int:
    produced = tailer.produced
    wanted = sum(len(points) for points in produced.values())
    print(f"lines produced (read from the spools): {wanted:,}")
    deadline = time.monotonic() + 180
    while True:
        absent, wrong, gaps = _compare(carbon, produced, kills, started, ended)
        if (not absent and not wrong) or time.monotonic() > deadline:
            break
        time.sleep(2)
    print(
        "\n| collector | (path, ts) produced | not in whisper | other value | missing boundaries |"
    )
    print("|---|---|---|---|---|")
    for source in sorted(produced):
        print(
            f"| {source} | {len(produced[source]):,} | {absent.get(source, 0):,} "
            f"| {wrong.get(source, 0):,} | {gaps.get(source, '-') if source in POLLED else '-'} |"
        )
    print(f"\nSIGKILLs: {sum(map(len, kills.values()))}")
    print("\n| at | collector | RSS MiB | fds | threads |")
    print("|---|---|---|---|---|")
    for at, per in figures:
        for name, res in sorted(per.items()):
            if res is not None:
                print(f"| {at / 60:.1f} min | {name} | {res[0] / 1024:.1f} | {res[1]} | {res[2]} |")
    ok = not any(absent.values()) and not any(wrong.values()) and not any(gaps.values())
    print(f"\nevery line in whisper, no boundary missing: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def _compare(carbon, produced, kills, started: float, ended: float):
    absent: dict[str, int] = defaultdict(int)
    wrong: dict[str, int] = defaultdict(int)
    gaps: dict[str, int] = {}
    for source, points in produced.items():
        by_path: dict[str, dict[int, set[str]]] = defaultdict(dict)
        for (path, stamp), values in points.items():
            by_path[path][stamp] = values
        missing = 0
        for path, stamps in by_path.items():
            stored = dict(carbon.fetch(path, from_ts=min(stamps)))
            for stamp, values in stamps.items():
                if stamp not in stored:
                    absent[source] += 1
                elif not any(
                    abs(stored[stamp] - float(v)) <= 1e-9 * max(1, abs(float(v))) for v in values
                ):
                    wrong[source] += 1
            if source in POLLED and path.endswith("power_watts") and ".health." not in path:
                inside = sorted(s for s in stamps if started + 2 < s < ended - 2)
                missing += len(missing_boundaries(inside, kills.get(source, [])))
        gaps[source] = missing
    return absent, wrong, gaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="2 minutes")
    args = parser.parse_args(argv)
    duration_s = 120.0 if args.quick else args.minutes * 60
    checkpoints = [c for c in (60.0, 600.0, 1800.0) if c <= duration_s] or [duration_s / 2]
    if args.quick:
        checkpoints = [20.0, 60.0, 110.0]
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as temp:
        return run(duration_s, checkpoints, Path(temp))


if __name__ == "__main__":
    sys.exit(main())
