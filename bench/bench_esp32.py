#!/usr/bin/env python3
"""ESP32 receiver: requests per second and p99 latency, against a bare Flask app.

Both servers run as processes of their own under waitress with the same
threads and body limit, on loopback, and face the same load generator:
worker processes of keep-alive http.client threads posting firmware-shaped
readings (each thread its own device, seq and pulse count rising, so every
post is accepted and makes five Carbon lines).

- bare: a Flask app that reads the body and answers 200 {"ok": true};
- receiver: esp32_receiver.py as users run it: token check, validation,
  accounting, lines batched and sent (confirmed) every second to a loopback
  line receiver standing in for Carbon, state saved every flush.

Printed: requests/s, p50 and p99 latency of each, the receiver/bare ratios,
the receiver's resident memory after the run, and the lines that reached
the stand-in Carbon (all of them should).

    .venv/bin/python bench/bench_esp32.py [--seconds 5] [--processes 2] [--threads 4] [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from esp32_http import SERVER_THREADS
from harness.carbon import free_port
from harness.collectors import script_command

ROOT = Path(__file__).resolve().parents[1]

TOKEN = "bench-token-0123456789abcdef"
MAX_BODY_BYTES = 65536
LINES_PER_POST = 5  # power_kw, power_watts, energy_kwh, pulses_total, rssi


# --- The bare app ---------------------------------------------------------------


def serve_bare(port: int) -> None:
    """The baseline: the same route under the same server, doing nothing."""
    import logging

    import waitress
    from flask import Flask, request

    # As esp32_receiver.py sets it up: waitress's warnings only.
    logging.basicConfig(level=logging.WARNING)
    app = Flask(__name__)

    @app.post("/api/v1/readings")
    def readings():
        request.get_data()
        return app.response_class(b'{"ok":true}', status=200, mimetype="application/json")

    server = waitress.create_server(
        app,
        host="127.0.0.1",
        port=port,
        threads=SERVER_THREADS,
        max_request_body_size=MAX_BODY_BYTES,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()


# --- A stand-in Carbon: reads lines until end of stream, then closes ---------------------


class LineSink(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.lines = 0
        self.count_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), LineHandler)


class LineHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        count = 0
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            count += data.count(b"\n")
        with self.server.count_lock:
            self.server.lines += count


# --- The load generator ------------------------------------------------------------------


def load_worker(args: tuple[int, int, int, float, float]) -> tuple[list[float], int, int]:
    """One process: ``threads`` keep-alive clients posting until ``stop_at``.
    Returns latencies (s) of posts answered 200 after ``measure_from``, and
    counts of errors and posts made."""
    port, process_no, threads, measure_from, stop_at = args
    latencies: list[float] = []
    errors = [0]
    made = [0]
    lock = threading.Lock()

    def client(thread_no: int) -> None:
        device_id = f"bench-{process_no}-{thread_no}"
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        mine: list[float] = []
        seq = 0
        failures = 0
        while time.time() < stop_at:
            seq += 1
            body = json.dumps(
                {
                    "device_id": device_id,
                    "boot_id": "bench",
                    "seq": seq,
                    "uptime_ms": seq * 10_000,
                    "ts": int(time.time()),
                    "imp_per_kwh": 1000,
                    "pulses_total": seq * 3,
                    "last_interval_ms": 1200,
                    "rssi": -60,
                    "fw": "bench/1.0",
                }
            )
            started = time.perf_counter()
            try:
                connection.request("POST", "/api/v1/readings", body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                ok = False
            elapsed = time.perf_counter() - started
            if not ok:
                failures += 1
            elif time.time() >= measure_from:
                mine.append(elapsed)
        connection.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failures
            made[0] += seq

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return latencies, errors[0], made[0]


def run_load(port: int, seconds: float, processes: int, threads: int, warmup_s: float) -> dict:
    start = time.time() + 0.5  # let every worker process start first
    measure_from, stop_at = start + warmup_s, start + warmup_s + seconds
    jobs = [(port, n, threads, measure_from, stop_at) for n in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(load_worker, jobs)
    latencies = sorted(latency for result in results for latency in result[0])
    errors = sum(result[1] for result in results)
    made = sum(result[2] for result in results)

    def percentile(fraction: float) -> float:
        return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] * 1000

    return {
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "errors": errors,
        "posts": made,
    }


# --- The servers as processes ---------------------------------------------------------------


def wait_listening(proc: subprocess.Popen, port: int, what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port}")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per server")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--threads", type=int, default=4, help="client threads per process")
    parser.add_argument("--quick", action="store_true", help="a short run (a smoke test)")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.processes, args.threads = 1.0, 0.3, 1, 2
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return

    clients = args.processes * args.threads
    print(
        f"{clients} keep-alive clients ({args.processes} processes x {args.threads} threads), "
        f"{args.seconds:g} s measured after {args.warmup:g} s warm-up; waitress with "
        f"{SERVER_THREADS} threads; {os.cpu_count()} CPUs"
    )
    results = {}

    bare_port = free_port()
    bare = subprocess.Popen(
        [sys.executable, __file__, "--serve-bare", str(bare_port)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,  # waitress's "Task queue depth" warnings under load
    )
    try:
        wait_listening(bare, bare_port, "bare app")
        results["bare Flask app"] = run_load(
            bare_port, args.seconds, args.processes, args.threads, args.warmup
        )
    finally:
        stop(bare)

    sink = LineSink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as work:
        empty_config = Path(work) / "config_local.py"
        empty_config.touch()
        port = free_port()
        env = {
            **os.environ,
            "ESP32_TOKEN": TOKEN,
            "ESP32_MAX_DEVICES": "1000",
            "ELECTRICITY_CONFIG": str(empty_config),
        }
        argv = script_command(
            "esp32_receiver.py",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--carbon",
            f"127.0.0.1:{sink.server_address[1]}",
            "--state-dir",
            str(Path(work) / "state"),
            "--interval",
            "1",
        )
        with open(Path(work) / "receiver.log", "w") as log:
            receiver = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=log)
        try:
            wait_listening(receiver, port, "esp32_receiver.py")
            results["esp32_receiver.py"] = run_load(
                port, args.seconds, args.processes, args.threads, args.warmup
            )
            rss = resident_mib(receiver.pid)
        finally:
            status = stop(receiver)
        sink.shutdown()
        log_text = (Path(work) / "receiver.log").read_text()

    print(f"{'server':<20} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, figures in results.items():
        print(
            f"{name:<20} {figures['requests_per_s']:>11.0f} {figures['p50_ms']:>8.2f} "
            f"{figures['p99_ms']:>8.2f} {figures['errors']:>7d}"
        )
    bare_figures, receiver_figures = results["bare Flask app"], results["esp32_receiver.py"]
    rate_ratio = receiver_figures["requests_per_s"] / bare_figures["requests_per_s"]
    p99_ratio = receiver_figures["p99_ms"] / bare_figures["p99_ms"]
    print(f"receiver / bare: {rate_ratio:.2f} x the requests per second, {p99_ratio:.2f} x the p99")
    expected_lines = receiver_figures["posts"] * LINES_PER_POST
    print(
        f"receiver: {rss:.0f} MiB resident after the run; exit status {status}; "
        f"{sink.lines} lines reached the stand-in Carbon "
        f"({receiver_figures['posts']} posts x {LINES_PER_POST} = {expected_lines}, "
        "plus health)"
    )
    if status != 0:
        print(log_text[-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
