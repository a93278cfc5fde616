"""The real-server harness: carbon-cache, graphite-web, Mosquitto and carbon-c-relay."""

from __future__ import annotations

import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import carbon as carbon_module
from harness.carbon import CarbonServer, find_carbon_cache, send_lines
from harness.graphite_web import GraphiteWeb
from harness.mosquitto import MosquittoBroker
from harness.relay import CarbonRelay

pytestmark = pytest.mark.slow


def _children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the ")" that ends the command name: state, ppid, ...
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every server a test starts is gone when its fixtures have finished."""
    before = _children(os.getpid()) if sys.platform.startswith("linux") else set()
    yield
    assert not carbon_module._live_processes
    if sys.platform.startswith("linux"):
        assert _children(os.getpid()) <= before


# -- carbon-cache ---------------------------------------------------------------


def test_find_carbon_cache_names_a_runnable_command() -> None:
    command = find_carbon_cache()
    assert Path(command[-1]).is_file()


def test_carbon_stores_a_plaintext_line(carbon_server: CarbonServer) -> None:
    ts = int(time.time()) - 10
    with socket.create_connection(carbon_server.line_address, timeout=10) as sock:
        sock.sendall(f"home.electricity.test.plug.power_watts 42.5 {ts}\n".encode())

    points = carbon_server.wait_for_points("home.electricity.test.plug.power_watts")

    assert points == [(ts, 42.5)]
    assert carbon_server.metric_paths() == ["home.electricity.test.plug.power_watts"]
    assert carbon_server.fetch("home.electricity.test.plug.power_watts", ts, ts) == [(ts, 42.5)]


def test_carbon_closes_its_side_after_reading_a_half_closed_stream(
    carbon_server: CarbonServer,
) -> None:
    ts = int(time.time()) - 5
    lines = [f"test.half_close.m{i} {i} {ts}" for i in range(100)]

    # EOF (b"") once carbon has read every line: no data, no reset.
    assert send_lines(carbon_server.line_address, lines) == b""

    stored = carbon_server.wait_for_total(100)
    assert stored == {f"test.half_close.m{i}": [(ts, float(i))] for i in range(100)}


def test_carbon_eof_does_not_mean_every_line_was_accepted(carbon_server: CarbonServer) -> None:
    """A line over 16 KiB makes carbon drop the rest of the stream, yet it closes cleanly."""
    ts = int(time.time()) - 5
    before = [f"test.dropped.before{i} 1 {ts}" for i in range(3)]
    after = [f"test.dropped.after{i} 1 {ts}" for i in range(3)]

    reply = send_lines(carbon_server.line_address, [*before, "test.long " + "9" * 17000, *after])

    assert reply == b""
    carbon_server.wait_for_total(3)
    # The lines after the long one were never parsed, so they cannot turn up later.
    assert carbon_server.metric_paths() == sorted(line.split()[0] for line in before)


def test_carbon_restart_keeps_data_and_port(carbon_server: CarbonServer) -> None:
    ts = int(time.time()) - 20
    send_lines(carbon_server.line_address, [f"test.restart.a 1.5 {ts}"])
    carbon_server.wait_for_points("test.restart.a")
    address = carbon_server.line_address

    carbon_server.restart()

    assert carbon_server.line_address == address
    assert carbon_server.fetch("test.restart.a") == [(ts, 1.5)]
    send_lines(carbon_server.line_address, [f"test.restart.a 2.5 {ts + 1}"])
    assert carbon_server.wait_for_points("test.restart.a", count=2) == [(ts, 1.5), (ts + 1, 2.5)]


def test_carbon_pause_resume_and_kill(carbon_server: CarbonServer) -> None:
    ts = int(time.time()) - 5
    carbon_server.pause()
    # A hung server: the kernel still accepts the connection, but no EOF comes.
    sock = socket.create_connection(carbon_server.line_address, timeout=10)
    try:
        sock.sendall(f"test.paused 7 {ts}\n".encode())
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(100)

        carbon_server.resume()
        sock.settimeout(10)
        assert sock.recv(100) == b""
    finally:
        sock.close()
    assert carbon_server.wait_for_points("test.paused") == [(ts, 7.0)]

    carbon_server.kill()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(carbon_server.line_address, timeout=10).close()

    carbon_server.start()  # after a crash, on the same port, with the data
    assert carbon_server.fetch("test.paused") == [(ts, 7.0)]


def test_carbon_reads_given_schema_files(tmp_path: Path) -> None:
    schemas = tmp_path / "schemas.conf"
    schemas.write_text("[all]\npattern = .*\nretentions = 10s:1h\n")
    ts = int(time.time()) // 10 * 10 - 30
    with CarbonServer(tmp_path / "carbon", storage_schemas=schemas) as server:
        send_lines(server.line_address, [f"test.schema 3 {ts + 4}"])
        # 10 s buckets: the point is stored at the start of its bucket.
        assert server.wait_for_points("test.schema") == [(ts, 3.0)]


# -- graphite-web ---------------------------------------------------------------


def test_graphite_web_renders_carbon_data_as_json(
    carbon_server: CarbonServer, graphite_web: GraphiteWeb
) -> None:
    ts = int(time.time()) - 30
    path = "home.electricity.kasa.lamp.power_watts"
    send_lines(
        carbon_server.line_address, [f"{path} {v} {ts + i}" for i, v in enumerate((1, 2, 4))]
    )
    carbon_server.wait_for_points(path, count=3)

    series = graphite_web.render("home.electricity.kasa.*.power_watts", from_="-10min")

    assert [s["target"] for s in series] == [path]
    points = [(ts_, value) for value, ts_ in series[0]["datapoints"] if value is not None]
    assert points == [(ts, 1.0), (ts + 1, 2.0), (ts + 2, 4.0)]
    summed = graphite_web.render(f"sumSeries({path})", from_="-10min")
    assert sum(v for v, _ in summed[0]["datapoints"] if v is not None) == 7.0
    assert [node["text"] for node in graphite_web.find("home.electricity.kasa.*")] == ["lamp"]


# -- Mosquitto ------------------------------------------------------------------


def _mqtt_client(broker: MosquittoBroker, username: str | None = None, password: str = ""):
    """A connected paho client with its network loop running, and its CONNACK reason code."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    if username is not None:
        client.username_pw_set(username, password)
    connack: queue.Queue = queue.Queue()
    client.on_connect = lambda _c, _u, _f, reason_code, _p: connack.put(reason_code)
    client.connect(*broker.address)
    client.loop_start()
    try:
        return client, connack.get(timeout=10)
    except BaseException:
        client.loop_stop()
        raise


def test_mosquitto_publish_subscribe_round_trip(mosquitto_broker: MosquittoBroker) -> None:
    received: queue.Queue = queue.Queue()
    subscribed = threading.Event()
    subscriber, code = _mqtt_client(mosquitto_broker)
    try:
        assert not code.is_failure
        subscriber.on_subscribe = lambda *_args: subscribed.set()
        subscriber.on_message = lambda _c, _u, message: received.put(
            (message.topic, message.payload)
        )
        subscriber.subscribe("glow/+/SENSOR/#", qos=1)
        assert subscribed.wait(10)

        publisher, code = _mqtt_client(mosquitto_broker)
        try:
            assert not code.is_failure
            publisher.publish("glow/abc/SENSOR/electricitymeter", b'{"x": 1}', qos=1)
            assert received.get(timeout=10) == ("glow/abc/SENSOR/electricitymeter", b'{"x": 1}')
        finally:
            publisher.disconnect()
            publisher.loop_stop()
    finally:
        subscriber.disconnect()
        subscriber.loop_stop()


def test_mosquitto_password_auth(start_server, tmp_path: Path) -> None:
    broker = start_server(MosquittoBroker(tmp_path / "mqtt", users={"glow": "correct horse"}))

    for username, password, accepted in (
        ("glow", "correct horse", True),
        ("glow", "wrong", False),
        (None, "", False),
    ):
        client, code = _mqtt_client(broker, username, password)
        try:
            assert code.is_failure != accepted, (username, password, str(code))
        finally:
            client.disconnect()
            client.loop_stop()


def test_mosquitto_restart_keeps_port(mosquitto_broker: MosquittoBroker) -> None:
    address = mosquitto_broker.address
    mosquitto_broker.restart()
    client, code = _mqtt_client(mosquitto_broker)
    client.disconnect()
    client.loop_stop()
    assert mosquitto_broker.address == address
    assert not code.is_failure


# -- carbon-c-relay -------------------------------------------------------------


def test_relay_spreads_lines_so_each_lands_in_exactly_one_cache(
    start_server, tmp_path: Path
) -> None:
    caches = [start_server(CarbonServer(tmp_path / name)) for name in ("a", "b")]
    relay = start_server(CarbonRelay(tmp_path / "relay", [c.line_address for c in caches]))
    ts = int(time.time()) - 5
    names = [f"home.electricity.circuit.c{i}.power_watts" for i in range(40)]

    # The relay, too, closes its side once it has read a half-closed stream.
    assert send_lines(relay.address, [f"{name} {i} {ts}" for i, name in enumerate(names)]) == b""

    deadline = time.monotonic() + 20
    while sum(len(c.metric_paths()) for c in caches) < len(names):
        assert time.monotonic() < deadline, [c.metric_paths() for c in caches]
        time.sleep(0.1)
    per_cache = [set(c.metric_paths()) for c in caches]
    assert per_cache[0].isdisjoint(per_cache[1])
    assert per_cache[0] | per_cache[1] == set(names)
    assert all(per_cache), "consistent hashing put every metric on one cache"
    for i, name in enumerate(names):
        owner = caches[0] if name in per_cache[0] else caches[1]
        assert owner.wait_for_points(name) == [(ts, float(i))]
