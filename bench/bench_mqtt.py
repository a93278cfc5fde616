#!/usr/bin/env python3
"""MQTT collector throughput and memory, against a bare paho subscriber.

A real Mosquitto on loopback; a publisher process floods it with Tasmota
SENSOR messages (6 metrics each, spread over 100 devices). Measured, each
from the first publish to the last message handled:

- a bare paho subscriber (VERSION2 callbacks, QoS 1, counting only):
  messages received per second;
- mqtt_to_graphite.py as users run it (a process, the tasmota preset):
  messages per second turned into Carbon lines that a loopback line
  receiver confirmed, with the ratio to the bare subscriber, and its
  resident memory (peak, and after the run).

The line receiver stands in for carbon-cache so that Carbon's own speed
does not limit the figure (it closes after end of stream, as Carbon does,
so delivery is confirmed the same way).

    .venv/bin/python bench/bench_mqtt.py [--messages 100000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness.mosquitto import MosquittoBroker

ROOT = Path(__file__).resolve().parents[1]

DEVICES = 100
LINES_PER_MESSAGE = 6  # the tasmota preset's figures


def tasmota_payload(i: int) -> bytes:
    energy = {
        "Total": 100 + i / 1000,
        "Today": 1.5,
        "Power": i % 3000,
        "Factor": 0.9,
        "Voltage": 230,
        "Current": 0.5,
    }
    return json.dumps({"Time": "2026-11-20T18:00:00", "ENERGY": energy}).encode()


# --- The processes: publisher and bare subscriber ------------------------------


def publish(port: int, count: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    client.connect("127.0.0.1", port)
    client.loop_start()
    payloads = [tasmota_payload(i) for i in range(1000)]
    started = time.time()
    info = None
    for i in range(count):
        info = client.publish(f"tele/plug_{i % DEVICES:03d}/SENSOR", payloads[i % 1000], qos=1)
        if i % 1000 == 999:
            info.wait_for_publish(60)  # keep paho's outgoing queue bounded
    if info is not None:
        info.wait_for_publish(60)
    print(json.dumps({"started": started, "finished": time.time()}), flush=True)
    client.disconnect()
    client.loop_stop()


def bare_subscriber(port: int, count: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    received = 0
    last = 0.0
    done = threading.Event()
    ready = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe("tele/+/SENSOR", qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        ready.set()

    def on_message(client, userdata, message):
        nonlocal received, last
        received += 1
        last = time.time()
        if received >= count:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare")
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    ready.wait(10)
    cpu_before = time.process_time()
    print("ready", flush=True)
    # Stop at the count, or once nothing has come for 5 s (messages lost).
    while not done.wait(0.5):
        if last and time.time() - last > 5:
            break
    cpu_s = time.process_time() - cpu_before
    print(json.dumps({"received": received, "last": last, "cpu_s": cpu_s}), flush=True)
    client.disconnect()
    client.loop_stop()


# --- A line receiver that confirms like Carbon --------------------------------------


class LineCounter(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CountLines)
        self.lines = 0
        self.last = 0.0
        self.lock = threading.Lock()


class _CountLines(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data = []
        while True:
            chunk = self.request.recv(1 << 16)
            if not chunk:
                break
            data.append(chunk)
        body = b"".join(data)
        wanted = body.count(b"\nhome.electricity.mqtt.") + body.startswith(
            b"home.electricity.mqtt."
        )
        if wanted:  # health lines (sent at stop too) do not count
            with self.server.lock:
                self.server.lines += wanted
                self.server.last = time.time()
        # Closing after end of stream is Carbon's confirmation.


# --- Runs ----------------------------------------------------------------------------


def wait_for_lines(counter: LineCounter, wanted: int) -> None:
    """Until ``wanted`` lines came, or none for 5 s (messages lost on the way)."""
    quiet_since = time.time()
    seen = 0
    while counter.lines < wanted and time.time() - quiet_since < 5:
        if counter.lines != seen:
            seen, quiet_since = counter.lines, time.time()
        time.sleep(0.05)


def spawn_publisher(port: int, count: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--publish", str(port), str(count)], stdout=subprocess.PIPE
    )


def run_bare(port: int, count: int) -> dict:
    subscriber = subprocess.Popen(
        [sys.executable, __file__, "--bare", str(port), str(count)], stdout=subprocess.PIPE
    )
    assert subscriber.stdout.readline().strip() == b"ready"
    publisher = spawn_publisher(port, count)
    started = json.loads(publisher.stdout.readline())["started"]
    publisher.wait()
    result = json.loads(subscriber.stdout.readline())
    subscriber.wait()
    elapsed = result["last"] - started
    received = result["received"]
    return {
        "messages": received,
        "seconds": elapsed,
        "rate": received / elapsed,
        "cpu_us": result["cpu_s"] / received * 1e6,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def run_collector(port: int, count: int, work: Path) -> dict:
    counter = LineCounter()
    threading.Thread(target=counter.serve_forever, daemon=True).start()
    (work / "config_local.py").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "CARBON_"))}
    env.update(
        ELECTRICITY_CONFIG=str(work / "config_local.py"),
        MQTT_PRESETS="tasmota",
        MQTT_GLOW_PREFIX="",
        MQTT_FLUSH_INTERVAL_S="0.1",
        MQTT_CLIENT_ID="bench-collector",
    )
    stderr = open(work / "collector.log", "wb")  # noqa: SIM115
    collector = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "mqtt_to_graphite.py"),
            "--broker",
            f"127.0.0.1:{port}",
            "--carbon",
            f"127.0.0.1:{counter.server_address[1]}",
            "--state-dir",
            str(work / "state"),
        ],
        env=env,
        stderr=stderr,
    )
    try:
        deadline = time.monotonic() + 20
        while b"subscribed to" not in (work / "collector.log").read_bytes():
            if time.monotonic() > deadline or collector.poll() is not None:
                raise RuntimeError((work / "collector.log").read_text())
            time.sleep(0.05)
        idle = memory_kib(collector.pid)["VmRSS"]
        # Warm-up: a device's first message names it (names.json is written
        # and fsynced once per new device); the flood measures what follows.
        spawn_publisher(port, DEVICES).wait()
        wait_for_lines(counter, DEVICES * LINES_PER_MESSAGE)
        counter.lines = 0
        cpu_before = cpu_seconds(collector.pid)
        publisher = spawn_publisher(port, count)
        started = json.loads(publisher.stdout.readline())["started"]
        publisher.wait()
        wait_for_lines(counter, count * LINES_PER_MESSAGE)
        memory = memory_kib(collector.pid)
        cpu_s = cpu_seconds(collector.pid) - cpu_before
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)
        stderr.close()
        counter.shutdown()
        counter.server_close()
    messages = counter.lines / LINES_PER_MESSAGE
    elapsed = counter.last - started
    return {
        "messages": messages,
        "lines": counter.lines,
        "seconds": elapsed,
        "rate": messages / elapsed,
        "cpu_us": cpu_s / messages * 1e6,
        "rss_idle_kib": idle,
        "rss_kib": memory["VmRSS"],
        "rss_peak_kib": memory["VmHWM"],
        "exit": collector.returncode,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="a small run (5,000 messages)")
    parser.add_argument(
        "--publish", nargs=2, type=int, metavar=("PORT", "COUNT"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--bare", nargs=2, type=int, metavar=("PORT", "COUNT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.publish:
        publish(*args.publish)
        return 0
    if args.bare:
        bare_subscriber(*args.bare)
        return 0
    if args.quick:
        args.messages = 5000

    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        work = Path(tmp)
        with MosquittoBroker(work / "mosquitto") as broker:
            bare = run_bare(broker.port, args.messages)
            collected = run_collector(broker.port, args.messages, work)
    print(
        f"Python {sys.version.split()[0]}, {args.messages} Tasmota messages (6 metrics each), QoS 1"
    )
    print(
        f"bare paho subscriber:  {bare['rate']:8.0f} messages/s "
        f"({bare['messages']} received in {bare['seconds']:.2f} s)"
    )
    print(
        f"mqtt_to_graphite.py:   {collected['rate']:8.0f} messages/s to Carbon lines "
        f"({collected['lines']} lines confirmed in {collected['seconds']:.2f} s), "
        f"{collected['rate'] * LINES_PER_MESSAGE:.0f} lines/s"
    )
    print(f"ratio collector / bare subscriber: {collected['rate'] / bare['rate']:.2f}")
    # Wall-clock rates depend on what else the cores run (the publisher, the
    # broker); CPU time per message is the collector's own cost.
    print(
        f"CPU per message: bare {bare['cpu_us']:.0f} us, collector {collected['cpu_us']:.0f} us "
        f"(ratio {bare['cpu_us'] / collected['cpu_us']:.2f}; one core would sustain "
        f"{1e6 / collected['cpu_us']:.0f} messages/s)"
    )
    print(
        f"collector resident memory: {collected['rss_idle_kib'] / 1024:.1f} MiB idle, "
        f"{collected['rss_peak_kib'] / 1024:.1f} MiB peak, "
        f"{collected['rss_kib'] / 1024:.1f} MiB after the run"
    )
    lost = args.messages - collected["messages"]
    if lost or bare["messages"] != args.messages:
        print(f"messages lost: collector {lost:.0f}, bare {args.messages - bare['messages']}")
    return 0 if collected["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
