#!/usr/bin/env python3
"""ESP32 receiver under slow clients: how long a device's post waits.

esp32_receiver.py runs as users run it (--dry-run: no Carbon needed) while
``--attackers`` connections each start a POST and send one header line every
``--every`` seconds (no token needed for that), as a slow-loris client does.
With ``--reconnect`` each one connects again as soon as the receiver closes
it, so the receiver is always full. Meanwhile one device posts a reading
every second on a fresh connection, as the firmware does.

Printed: the device's posts answered, the slowest answer, and how many
attacker connections the receiver closed. Before the request deadline,
120 attackers at one line every 5 s held every connection slot: posts
waited 40 s and more.

    .venv/bin/python bench/bench_esp32_slow_clients.py [--attackers 120] [--every 5]
        [--seconds 30] [--reconnect] [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_esp32 import stop, wait_listening
from esp32 import pulse_logic
from harness.carbon import free_port
from harness.collectors import script_command

ROOT = Path(__file__).resolve().parents[1]

TOKEN = "bench-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


class Attackers:
    """``count`` slow-loris connections, kept by one thread."""

    def __init__(self, port: int, count: int, every_s: float, reconnect: bool) -> None:
        self.port, self.every_s, self.reconnect = port, every_s, reconnect
        self.closed_by_server = 0
        self.sockets: list[socket.socket | None] = [self._open() for _ in range(count)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(b"POST /api/v1/readings HTTP/1.1\r\nHost: x\r\n")
        return sock

    def _run(self) -> None:
        line = 0
        while not self._stop.wait(self.every_s):
            line += 1
            for index, sock in enumerate(self.sockets):
                if sock is None:
                    continue
                try:
                    sock.sendall(b"X-Slow-%d: y\r\n" % line)
                    continue
                except OSError:
                    pass
                sock.close()
                self.closed_by_server += 1
                self.sockets[index] = None
                if self.reconnect:
                    try:
                        self.sockets[index] = self._open()
                    except OSError:
                        pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.every_s + 5)
        for sock in self.sockets:
            if sock is not None:
                sock.close()


def post(port: int, seq: int, timeout_s: float) -> float:
    """One firmware post on a fresh connection: seconds to its answer (inf: none)."""
    body = json.dumps(pulse_logic.make_reading("esp32-bench", "b1", seq, seq * 1000, 1000, seq))
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("POST", "/api/v1/readings", body=body, headers=HEADERS)
        if connection.getresponse().status != 200:
            return float("inf")
    except OSError:
        return float("inf")
    finally:
        connection.close()
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attackers", type=int, default=120)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between header lines")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the device posts")
    parser.add_argument("--reconnect", action="store_true", help="attackers reconnect at once")
    parser.add_argument("--quick", action="store_true", help="a short run (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.every = 4.0, 1.0

    with tempfile.TemporaryDirectory() as work:
        empty_config = Path(work) / "config_local.py"
        empty_config.touch()
        port = free_port()
        env = {**os.environ, "ESP32_TOKEN": TOKEN, "ELECTRICITY_CONFIG": str(empty_config)}
        argv = script_command(
            "esp32_receiver.py",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dry-run",
            "--state-dir",
            str(Path(work) / "state"),
        )
        receiver = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_listening(receiver, port, "esp32_receiver.py")
            attackers = Attackers(port, args.attackers, args.every, args.reconnect)
            waits = []
            try:
                deadline = time.monotonic() + args.seconds
                while time.monotonic() < deadline:
                    waits.append(post(port, len(waits) + 1, timeout_s=60))
                    time.sleep(max(0.0, 1 - (waits[-1] if waits[-1] < 1 else 1)))
            finally:
                attackers.close()
        finally:
            stop(receiver)

    answered = [wait for wait in waits if wait != float("inf")]
    print(
        f"{args.attackers} slow clients, a header line every {args.every:g} s"
        f"{', reconnecting' if args.reconnect else ''}; one device posting each second"
        f" for {args.seconds:g} s"
    )
    print(f"posts answered: {len(answered)} of {len(waits)}")
    if answered:
        print(f"slowest answer: {max(answered) * 1000:.1f} ms")
    print(f"attacker connections closed by the receiver: {attackers.closed_by_server}")
    return 0 if waits and len(answered) == len(waits) else 1


if __name__ == "__main__":
    sys.exit(main())
