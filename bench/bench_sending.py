#!/usr/bin/env python3
"""Sending benchmark: carbon_client.CarbonClient against raw sendall, and spool replay.

1. Lines per second through ``CarbonClient.send_lines`` (confirmed delivery,
   50,000-line batches) into a real carbon-cache and into a plain loopback
   socket that reads, discards and closes on end of stream, against a raw
   ``sendall`` of the same bytes over one connection, waited for the same way
   (end of stream, then the receiver's close): the limit. Target: at least
   70% of raw. Both receivers run in processes of their own, so the sender's
   figures are the sender's.
2. Spool replay: 1,000,000 lines (1000 metrics x 1000 timestamps) written to
   a ``Spool``, then replayed by ``CarbonClient.flush_spool`` into a fresh
   carbon-cache (retention 1s:1h); the points that reached whisper are
   counted with ``whisper.fetch``. Target: all of them.
3. A live line behind a full spool: 2,000,000 spooled lines (200,000 with
   --quick) from an earlier run, then one live line handed over
   (``CarbonClient.submit``): seconds to open the spool, for ``submit`` to
   return, and until carbon-cache confirmed the live line. Target: confirmed
   within 1 s (the backlog goes after it).

    .venv/bin/python bench/bench_sending.py [--quick]

Loopback only; every process started here is stopped before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import socketserver
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import carbon_client
import graphite_helper
import spool
from carbon_client import CarbonClient
from harness.carbon import CarbonNotFoundError, CarbonServer
from spool import Spool

TARGET_RATIO = 0.70
LOOPBACK = "127.0.0.1"


# --- A receiver that reads and discards ----------------------------------------


class _DiscardHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while self.request.recv(1 << 20):
            pass  # closing on end of stream is the whole protocol


class _DiscardServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def serve_discard(host: str = LOOPBACK) -> tuple[socketserver.TCPServer, tuple[str, int]]:
    """A TCP server in a thread of this process that reads everything and
    closes on end of stream, as carbon-cache does. Returns (server, address);
    ``server.shutdown()`` stops it."""
    server = _DiscardServer((host, 0), _DiscardHandler)
    threading.Thread(target=server.serve_forever, name="discard-sink", daemon=True).start()
    return server, server.server_address[:2]


def _discard_child(conn) -> None:
    server, address = serve_discard()
    try:
        conn.send(address)
        conn.recv()  # any message ends it
    except EOFError:  # the parent is gone
        pass
    finally:
        server.shutdown()
        server.server_close()


class DiscardSink:
    """``serve_discard`` in a process of its own (its CPU is not the sender's)."""

    def __init__(self) -> None:
        self.address: tuple[str, int] = ("", 0)
        self._process = None
        self._conn = None

    def __enter__(self) -> DiscardSink:
        self._process, self._conn, address = start_child(_discard_child)
        self.address = tuple(address)
        return self

    def __exit__(self, *exc_info: object) -> None:
        stop_child(self._process, self._conn)


def start_child(target, *args):
    """Run ``target(conn, *args)`` in a spawned process of its own: (process,
    conn, its first message), which says what it serves once it is ready."""
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    process = context.Process(target=target, args=(child_conn, *args), daemon=True)
    process.start()
    child_conn.close()
    try:
        first = conn.recv()
    except BaseException:  # the child died starting up (its traceback is on stderr)
        stop_child(process, conn)
        raise
    return process, conn, first


def stop_child(process, conn) -> None:
    """Ask a child to stop, then terminate and kill it if it lingers."""
    if process is None:
        return
    try:
        conn.send("stop")
    except (OSError, ValueError):
        pass
    process.join(10)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()


# --- Test data -------------------------------------------------------------------


def make_lines(metrics: int, timestamps: int, newest_ts: int) -> list[str]:
    """``metrics`` x ``timestamps`` distinct points, oldest first, newest at ``newest_ts``."""
    first_ts = newest_ts - timestamps + 1
    return [
        f"home.electricity.bench.plug_{m:04d}.power_watts {t % 1000 + m / 1000:g} {first_ts + t}\n"
        for t in range(timestamps)
        for m in range(metrics)
    ]


# --- 1. Lines per second ---------------------------------------------------------


def raw_sendall(address: tuple[str, int], payload: bytes, timeout_s: float = 300.0) -> float:
    """Seconds to send ``payload`` over one connection until the receiver has
    read it all (its close after our end of stream): the limit."""
    started = time.perf_counter()
    with socket.create_connection(address, timeout=timeout_s) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
    return time.perf_counter() - started


def client_send(address: tuple[str, int], lines: Sequence[str]) -> float:
    """Seconds for ``CarbonClient.send_lines`` (no spool) to deliver ``lines``."""
    client = CarbonClient([address], timeout_s=300.0)
    started = time.perf_counter()
    delivered = client.send_lines(lines)
    elapsed = time.perf_counter() - started
    if not delivered:
        raise RuntimeError(f"CarbonClient did not deliver: {client.last_error}")
    return elapsed


@contextlib.contextmanager
def validation_skipped():
    """What-if: CarbonClient trusting its lines (format_line checked them when made)."""
    checked = graphite_helper.is_valid_line
    carbon_client.is_valid_line = spool.is_valid_line = lambda line: True
    try:
        yield
    finally:
        carbon_client.is_valid_line = spool.is_valid_line = checked


def client_breakdown(lines: Sequence[str]) -> dict[str, float]:
    """Where CarbonClient's time goes on the sending side, in seconds."""
    started = time.perf_counter()
    valid = [line for line in lines if graphite_helper.is_valid_line(line)]
    validated = time.perf_counter()
    payload = "".join(valid).encode("ascii")
    joined = time.perf_counter()
    del payload
    return {"validate": validated - started, "join_encode": joined - validated}


@dataclass
class Comparison:
    """Seconds per run of each sender, the runs taken in turn."""

    raw: list[float]
    client: list[float]
    unchecked: list[float]  # what-if: CarbonClient without re-validation

    def ratio(self, sender: list[float]) -> float:
        """Median over the runs of raw time / sender time, each run against
        the raw send just before it (carbon-cache slows as its writer fills)."""
        return statistics.median(raw / other for raw, other in zip(self.raw, sender))


def compare(address: tuple[str, int], lines: Sequence[str], runs: int) -> Comparison:
    payload = "".join(lines).encode("ascii")
    raw_sendall(address, payload)  # warm-up: carbon-cache creates its files
    result = Comparison([], [], [])
    for _ in range(runs):
        result.raw.append(raw_sendall(address, payload))
        result.client.append(client_send(address, lines))
        with validation_skipped():
            result.unchecked.append(client_send(address, lines))
    return result


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}" if seconds > 0 else "inf"


def bench_throughput(lines: list[str], runs: int, work_dir: Path) -> bool:
    count = len(lines)
    megabytes = sum(map(len, lines)) / 1e6
    print(f"\n## Sending: {count:,} lines ({megabytes:.1f} MB), medians of {runs} runs")
    print(
        f"{'receiver':<24}{'raw lines/s':>14}{'client lines/s':>16}{'client/raw':>12}  "
        f"{'target':<18}{'what-if: no re-validation':>27}"
    )
    met = True
    receivers = []
    with DiscardSink() as sink:
        receivers.append(("plain loopback socket", compare(sink.address, lines, runs)))
    try:
        with CarbonServer(work_dir / "carbon-throughput", retentions="1s:1h") as carbon:
            receivers.append(("carbon-cache", compare(carbon.line_address, lines, runs)))
    except CarbonNotFoundError as exc:
        print(f"{'carbon-cache':<24}skipped: {exc}")
    for name, runs_s in receivers:
        ratio = runs_s.ratio(runs_s.client)
        ok = ratio >= TARGET_RATIO
        met &= ok
        target = f">= {TARGET_RATIO:.0%} {'met' if ok else 'MISSED'}"
        print(
            f"{name:<24}{rate(count, statistics.median(runs_s.raw)):>14}"
            f"{rate(count, statistics.median(runs_s.client)):>16}{ratio:>11.0%}  {target:<18}"
            f"{rate(count, statistics.median(runs_s.unchecked)):>16} = "
            f"{runs_s.ratio(runs_s.unchecked):>4.0%} of raw"
        )
    parts = client_breakdown(lines)
    raw_ns = statistics.median(receivers[0][1].raw) / count * 1e9
    print(
        f"CarbonClient's own work per line: validation {parts['validate'] / count * 1e9:,.0f} ns, "
        f"join+encode {parts['join_encode'] / count * 1e9:,.0f} ns; raw sendall into the "
        f"plain socket: {raw_ns:,.0f} ns"
    )
    return met


# --- 2. Spool replay ---------------------------------------------------------------


def count_points(carbon: CarbonServer, paths: Sequence[str], since_ts: int) -> int:
    """Points stored in whisper for ``paths`` at or after ``since_ts``."""
    return sum(
        sum(1 for ts, _ in carbon.fetch(path, from_ts=since_ts) if ts >= since_ts) for path in paths
    )


def wait_for_whisper(
    carbon: CarbonServer, paths: Sequence[str], since_ts: int, expected: int, timeout_s: float
) -> int:
    """Poll whisper until ``expected`` points are there, or no progress for a while."""
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    while True:
        count = count_points(carbon, paths, since_ts)
        if count >= expected or time.monotonic() > deadline:
            return count
        if count != last:
            last, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > 30:
            return count
        time.sleep(0.5)


def bench_spool_replay(metrics: int, timestamps: int, work_dir: Path) -> bool:
    expected = metrics * timestamps
    print(f"\n## Spool replay: {expected:,} lines ({metrics} metrics x {timestamps} timestamps)")
    newest_ts = int(time.time()) - 1
    lines = make_lines(metrics, timestamps, newest_ts)
    paths = [line.split(" ", 1)[0] for line in lines[:metrics]]
    spool = Spool(work_dir / "spool", max_lines=max(2_000_000, expected))
    started = time.perf_counter()
    spool.append(lines)
    spooled_s = time.perf_counter() - started
    del lines
    print(f"spooled in {spooled_s:.2f} s ({rate(expected, spooled_s)} lines/s, fsynced)")
    try:
        carbon = CarbonServer(work_dir / "carbon-replay", retentions="1s:1h").start()
    except CarbonNotFoundError as exc:
        print(f"replay skipped: {exc}")
        return True
    try:
        client = CarbonClient([carbon.line_address], timeout_s=300.0, spool=spool)
        started = time.perf_counter()
        replayed = client.flush_spool()
        replay_s = time.perf_counter() - started
        count = wait_for_whisper(carbon, paths, newest_ts - timestamps + 1, expected, 600.0)
        stored_s = time.perf_counter() - started
    finally:
        carbon.stop()
    ok = replayed == expected and count == expected and len(spool) == 0
    print(f"{'replayed (confirmed by carbon)':<34}{replayed:>12,} lines in {replay_s:7.2f} s")
    print(f"{'replay rate':<34}{rate(expected, replay_s):>12} lines/s")
    print(f"{'in whisper':<34}{count:>12,} points after {stored_s:7.2f} s")
    print(f"{'left in the spool':<34}{len(spool):>12,}")
    print(f"target: all {expected:,} lines in whisper: {'met' if ok else 'MISSED'}")
    return ok


def bench_live_behind_backlog(backlog_lines: int, work_dir: Path) -> bool:
    print(f"\n## A live line behind a {backlog_lines:,}-line spool")
    directory = work_dir / "backlog-spool"
    earlier = Spool(directory, max_lines=backlog_lines + 1000)
    earlier.append(make_lines(1000, backlog_lines // 1000, int(time.time()) - 3600))
    earlier.close()
    try:
        carbon = CarbonServer(work_dir / "carbon-live", retentions="1s:1h").start()
    except CarbonNotFoundError as exc:
        print(f"skipped: {exc}")
        return True
    try:
        started = time.perf_counter()
        client = CarbonClient(
            [carbon.line_address], spool=Spool(directory, max_lines=backlog_lines + 1000)
        )
        opened_s = time.perf_counter() - started
        live = f"home.electricity.bench.live.power_watts 1 {int(time.time())}\n"
        started = time.perf_counter()
        client.submit([live])
        submit_s = time.perf_counter() - started
        while not client.spool.appended_confirmed() and time.perf_counter() - started < 60:
            time.sleep(0.001)
        confirmed_s = time.perf_counter() - started
        waiting = len(client.spool)
        client.close()
    finally:
        carbon.stop()
    ok = confirmed_s < 1.0
    print(f"{'spool opened in':<34}{opened_s:>10.3f} s")
    print(f"{'submit returned after':<34}{submit_s:>10.4f} s")
    print(f"{'live line confirmed after':<34}{confirmed_s:>10.3f} s")
    print(f"{'spooled lines still waiting then':<34}{waiting:>10,}")
    print(f"target: live line confirmed within 1 s: {'met' if ok else 'MISSED'}")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run (seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        metrics, timestamps, runs = 100, 200, 1
    else:
        metrics, timestamps, runs = 1000, 1000, 3
    print(f"# bench_sending (Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory(prefix="bench-sending-") as tmp:
        work_dir = Path(tmp)
        lines = make_lines(metrics, timestamps, int(time.time()) - 1)
        met = bench_throughput(lines, runs, work_dir)
        del lines
        met &= bench_spool_replay(metrics, timestamps, work_dir)
        met &= bench_live_behind_backlog(200_000 if args.quick else 2_000_000, work_dir)
    print(f"\nall targets met: {'yes' if met else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
