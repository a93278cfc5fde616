#!/usr/bin/env python3
"""Running it for years: delivery through a relay, failover cost, and what the
five collectors take on a small machine.

1. Confirmed delivery (CarbonClient: one connection per batch, half-close,
   wait for the peer's close) straight to a carbon-cache and through Debian's
   carbon-c-relay to two carbon-caches: milliseconds per batch and lines/s.
2. Failover: what a batch costs when the first destination refuses
   connections, or hangs (accepts, never reads; CARBON_TIMEOUT_S = 1 s here).
3. Footprint: the five collectors against the simulated home at the demo's
   5 s interval (simulators/home_live.py) for --seconds: resident memory
   (now and peak) and CPU time of each process.

Real servers on loopback only. Prints figures; see bench/README.md.

    .venv/bin/python bench/bench_running.py [--seconds 60] [--batches 20] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from carbon_client import CarbonClient
from graphite_helper import format_line
from harness.carbon import CarbonServer, free_port, terminate
from harness.relay import CarbonRelay
from simulators.home_live import (
    start_source_collector,
    start_sources,
    write_home_config,
)

ROOT = Path(__file__).resolve().parents[1]

INTERVAL_S = 5.0  # the demo's


def batch(size: int, offset: int) -> list[str]:
    stamp = int(time.time()) - 60
    return [
        format_line(f"home.electricity.bench.d{i % 500}.m{i // 500}", float(i), stamp + offset)
        for i in range(size)
    ]


def time_batches(
    destinations: list, size: int, batches: int, timeout_s: float = 5.0
) -> list[float]:
    client = CarbonClient(destinations, timeout_s=timeout_s)
    times = []
    for n in range(batches):
        lines = batch(size, n)
        started = time.perf_counter()
        if not client.send_lines(lines):
            raise RuntimeError(f"not delivered: {client.last_error}")
        times.append(time.perf_counter() - started)
    return times


def report(title: str, size: int, times: list[float]) -> None:
    median = statistics.median(times)
    print(
        f"  {title:34} {size:6d} lines/batch: median {median * 1000:8.2f} ms, "
        f"worst {max(times) * 1000:8.2f} ms, {size / median:10,.0f} lines/s"
    )


def delivery(work: Path, batches: int, sizes: tuple[int, ...]) -> None:
    print("1. confirmed delivery, one connection per batch")
    with contextlib.ExitStack() as stack:
        direct = stack.enter_context(CarbonServer(work / "direct"))
        caches = [stack.enter_context(CarbonServer(work / name)) for name in ("a", "b")]
        relay = stack.enter_context(
            CarbonRelay(work / "relay", [cache.line_address for cache in caches])
        )
        for size in sizes:
            report("carbon-cache", size, time_batches([direct.line_address], size, batches))
            report(
                "carbon-c-relay -> 2 carbon-caches",
                size,
                time_batches([relay.address], size, batches),
            )


def failover(work: Path, batches: int) -> None:
    print("2. failover: the first destination down, the second a carbon-cache")
    with contextlib.ExitStack() as stack:
        hung = stack.enter_context(CarbonServer(work / "hung"))
        second = stack.enter_context(CarbonServer(work / "second"))
        refused = ("127.0.0.1", free_port())
        report(
            "first refuses",
            100,
            time_batches([refused, second.line_address], 100, batches),
        )
        hung.pause()
        try:
            times = time_batches([hung.line_address, second.line_address], 100, 3, timeout_s=1.0)
            report("first hangs (CARBON_TIMEOUT_S=1)", 100, times)
        finally:
            hung.resume()


def process_figures(pid: int) -> tuple[float, float, float]:
    """RSS now and peak (MiB), and CPU seconds so far, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = {
        line.split(":")[0]: int(line.split()[1])
        for line in status.splitlines()
        if line.startswith(("VmRSS", "VmHWM"))
    }
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return kib["VmRSS"] / 1024, kib["VmHWM"] / 1024, cpu_s


def footprint(work: Path, seconds: float) -> None:
    print(f"3. the five collectors against the simulated home for {seconds:g} s")
    with contextlib.ExitStack() as stack:
        carbon = stack.enter_context(CarbonServer(work / "carbon"))
        home, sources = start_sources(stack, work, INTERVAL_S, print)
        config = work / "config_local.py"
        write_home_config(config, carbon.line_address, home, sources)
        (work / "logs").mkdir()
        running = [
            start_source_collector(source, config, work / "state", work / "logs")
            for source in sources
        ]
        try:
            started = time.time()
            warm: dict[int, tuple[float, float]] = {}  # pid -> (time, CPU s) after start-up
            while time.time() - started < seconds:
                home.tick(time.time() - started)
                if not warm and time.time() - started >= seconds / 4:
                    warm = {
                        item.process.pid: (time.time(), process_figures(item.process.pid)[2])
                        for item in running
                        if item.process.poll() is None
                    }
                time.sleep(1)
            for item in running:
                if item.process.poll() is not None or item.process.pid not in warm:
                    print(f"  {item.name}: exited early, see {item.log_path}")
                    continue
                rss, peak, cpu_s = process_figures(item.process.pid)
                warm_at, warm_cpu_s = warm[item.process.pid]
                steady = (cpu_s - warm_cpu_s) / (time.time() - warm_at)
                print(
                    f"  {item.name:8} RSS {rss:6.1f} MiB (peak {peak:6.1f}), "
                    f"CPU {cpu_s:5.2f} s in all, {100 * steady:4.2f} % of one core once started"
                )
        finally:
            for item in running:
                terminate(item.process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="footprint run (default 60)")
    parser.add_argument("--batches", type=int, default=20, help="batches per delivery figure")
    parser.add_argument("--quick", action="store_true", help="a run of seconds (smoke test)")
    args = parser.parse_args()
    sizes = (100, 5000, 50000)
    if args.quick:
        args.seconds, args.batches, sizes = 10.0, 3, (100, 5000)
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-running-") as temp:
        work = Path(temp)
        delivery(work / "delivery", args.batches, sizes)
        failover(work / "failover", args.batches)
        footprint(work / "footprint", args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
