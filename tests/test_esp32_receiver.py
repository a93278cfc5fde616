"""ESP32 meter receiver: the body contract, tokens, energy accounting, the HTTP
server on loopback, and the script end to end into a real carbon-cache."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from esp32 import pulse_logic as pl
from esp32_accounting import (
    ACCEPTED,
    BOOTS_KEPT,
    DUPLICATE,
    IMPLAUSIBLE,
    REGRESSION,
    MeterAccounts,
    MeterReading,
    estimate_power_watts,
)
from esp32_http import ReceiverServer
from esp32_readings import BadReading, parse_body
from esp32_receiver import (
    SOURCE,
    MeterReceiver,
    create_app,
    energy_timestamp,
    sample_timestamp,
)
from esp32_tokens import TokenCheck, check_tokens
from graphite_helper import is_valid_line
from runtime import EXIT_CONFIG, EXIT_NO_DEVICE, Runtime
from settings import ConfigError, load_settings
from simulators.esp32 import SimClock, SimulatedEsp32
from tests.helpers import collector_environment, run_collector, start_collector, stop_collector

TOKEN = "test-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


# --- Helpers: a receiver on a loopback port, lines captured -------------------------


class CapturingSink:
    """Stands in for Carbon in the in-process tests: keeps every line sent."""

    spool = None

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def send_lines(self, lines: list[str]) -> bool:
        with self._lock:
            self.lines.extend(lines)
        return True

    def flush_spool(self) -> int:
        return 0


def receiver_settings(state_dir: Path, **overrides: Any) -> Any:
    values = {
        "ESP32_TOKEN": TOKEN,
        "ESP32_BIND": "127.0.0.1",
        "METER_INTERVAL_S": 0.1,
        "STATE_DIR": str(state_dir),
        **overrides,
    }
    return load_settings(env={}, local_path=state_dir / "no_config_local.py", overrides=values)


class RunningReceiver:
    """The receiver's app under waitress in this process, with its state in
    ``state_dir`` (so a new one over the same dir is a receiver restart)."""

    def __init__(
        self, state_dir: Path, server_options: dict | None = None, **overrides: Any
    ) -> None:
        settings = receiver_settings(state_dir, **overrides)
        self.runtime = Runtime(SOURCE, settings)
        self.sink = CapturingSink()
        self.runtime.sink = self.sink
        self.receiver = MeterReceiver(self.runtime, check_tokens(settings))
        self.server = ReceiverServer(
            create_app(self.receiver),
            "127.0.0.1",
            0,
            settings.esp32_max_body_bytes,
            on_dropped=self.receiver.dropped_connection,
            **(server_options or {}),
        )
        self.url = f"{self.server.url}/api/v1/readings"

    def start(self) -> RunningReceiver:
        self.receiver.batcher.start()
        self.server.start()
        return self

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            self.receiver.batcher.stop()

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict | None = None
    ) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data

    def post(self, payload: Any, headers: dict | None = None) -> tuple[int, Any]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request(
            "POST", "/api/v1/readings", body, HEADERS if headers is None else headers
        )

    def points(self, metric: str, segment: str = "meter") -> list[tuple[int, float]]:
        self.receiver.batcher.flush()
        path = f"home.electricity.{segment}.{metric}"
        points = []
        for line in list(self.sink.lines):
            name, value, timestamp = line.split()
            if name == path:
                points.append((int(timestamp), float(value)))
        return points


@pytest.fixture
def running(tmp_path: Path):
    started: list[RunningReceiver] = []

    def start(**overrides: Any) -> RunningReceiver:
        receiver = RunningReceiver(tmp_path / "state", **overrides).start()
        started.append(receiver)
        return receiver

    try:
        yield start
    finally:
        for receiver in started:
            receiver.stop()


def reading(seq: int, pulses: int, boot: str = "boot1", device: str = "esp32-a", **extra: Any):
    """A reading exactly as the firmware's pure logic makes it."""
    fields = {"uptime_ms": seq * 10_000, **extra}
    return pl.make_reading(device, boot, seq, imp_per_kwh=1000, pulses_total=pulses, **fields)


def as_reading(raw: dict) -> MeterReading:
    return parse_body(json.dumps(raw).encode())[0]


# --- The body contract -------------------------------------------------------------------


def test_firmware_readings_and_batches_parse():
    now = int(time.time())
    single = reading(3, 42, ts=now, last_interval_ms=1800, rssi=-67, fw="pulse-reader/1.0")
    [parsed] = parse_body(json.dumps(pl.body_for([single])).encode())
    assert parsed == MeterReading(
        "esp32-a", "boot1", 3, 30_000, 1000, 42, now, 1800, -67, "pulse-reader/1.0"
    )
    batch = [reading(seq, seq * 5) for seq in (1, 2, 3)]
    parsed = parse_body(json.dumps(pl.body_for(batch)).encode())
    assert [r.seq for r in parsed] == [1, 2, 3]
    assert parsed[0].ts is None
    assert parsed[0].rssi is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"device_id": ""}, "device_id"),
        ({"device_id": "has space"}, "device_id"),
        ({"device_id": "x" * 65}, "device_id"),
        ({"device_id": 7}, "device_id"),
        ({"boot_id": None}, "boot_id"),
        ({"seq": -1}, "seq"),
        ({"seq": 1.5}, "seq"),
        ({"seq": True}, "seq"),
        ({"seq": "3"}, "seq"),
        ({"seq": 2**53}, "seq"),
        ({"uptime_ms": None}, "uptime_ms"),
        ({"imp_per_kwh": 0}, "imp_per_kwh"),
        ({"imp_per_kwh": -1000}, "imp_per_kwh"),
        ({"imp_per_kwh": 1e9}, "imp_per_kwh"),
        ({"pulses_total": -5}, "pulses_total"),
        ({"pulses_total": 1e300}, "pulses_total"),
        ({"ts": "yesterday"}, "ts"),
        ({"ts": -1}, "ts"),
        ({"last_interval_ms": 0}, "last_interval_ms"),
        ({"last_interval_ms": [1]}, "last_interval_ms"),
        ({"rssi": -500}, "rssi"),
        ({"fw": "x\n"}, "fw"),
        ({"fw": 1.0}, "fw"),
    ],
)
def test_each_bad_field_is_named(change, field):
    raw = {**reading(1, 0), **change}
    with pytest.raises(BadReading, match=f"^{re.escape(field)}: ") as caught:
        parse_body(json.dumps(raw).encode())
    assert caught.value.field == field
    with pytest.raises(BadReading, match=re.escape(f"readings[1].{field}: ")) as caught:
        parse_body(json.dumps({"readings": [reading(1, 0), raw]}).encode())
    assert caught.value.field == f"readings[1].{field}"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"", "body"),
        (b"\xff\xfe{}", "body"),
        (b"[1, 2]", "body"),
        (b'"reading"', "body"),
        (b"{", "body"),
        (b"[" * 100_000, "body"),
        (b'{"readings": []}', "readings"),
        (b'{"readings": {"seq": 1}}', "readings"),
        (b'{"readings": [7]}', "readings[0]"),
        (b"{}", "device_id"),
    ],
)
def test_malformed_bodies_are_refused(body, field):
    with pytest.raises(BadReading, match=f"^{re.escape(field)}: ") as caught:
        parse_body(body)
    assert caught.value.field == field


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_refused(constant):
    body = (
        json.dumps(reading(1, 0))
        .encode()
        .replace(b'"pulses_total": 0', b'"pulses_total": ' + constant)
    )
    with pytest.raises(BadReading, match=r"^(body|pulses_total): ") as caught:
        parse_body(body)
    assert caught.value.field in ("body", "pulses_total")


def test_unknown_fields_and_integral_floats_are_accepted():
    raw = {**reading(2, 10), "seq": 2.0, "heap_free": 12345, "rssi": None}
    [parsed] = parse_body(json.dumps(raw).encode())
    assert parsed.seq == 2
    assert isinstance(parsed.seq, int)
    assert parsed.rssi is None


# --- Tokens ------------------------------------------------------------------------------


def test_shared_token_admits_every_device():
    tokens = TokenCheck(TOKEN)
    assert tokens.allowed(f"Bearer {TOKEN}").may_post("anything")
    assert tokens.allowed(f"bearer   {TOKEN}  ").may_post("anything")
    for header in (None, "", "Bearer", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer wrong"):
        assert tokens.allowed(header) is None


def test_device_tokens_bind_devices_to_their_own_token():
    tokens = TokenCheck(
        TOKEN, {"esp32-a": "a-token-0123456789abcdef", "esp32-b": "b-token-0123456789abcdef"}
    )
    own = tokens.allowed("Bearer a-token-0123456789abcdef")
    assert own.may_post("esp32-a")
    assert not own.may_post("esp32-b")
    assert not own.may_post("esp32-c")
    shared = tokens.allowed(f"Bearer {TOKEN}")
    assert shared.may_post("esp32-c")
    assert not shared.may_post("esp32-a")
    only_devices = TokenCheck("", {"esp32-a": "a-token-0123456789abcdef"})
    assert only_devices.allowed(f"Bearer {TOKEN}") is None


def test_no_token_means_no_check():
    assert not TokenCheck().enabled
    assert TokenCheck().allowed(None).may_post("esp32-a")


def test_weak_tokens_are_refused_without_showing_them(tmp_path):
    for overrides in (
        {"ESP32_TOKEN": "change-me"},
        {"ESP32_DEVICE_TOKENS": {"esp32-a": "short secret"}},
    ):
        settings = receiver_settings(tmp_path, **overrides)
        with pytest.raises(ConfigError, match="a token must be at least") as caught:
            check_tokens(settings)
        assert "change-me" not in str(caught.value)
        assert "short secret" not in str(caught.value)


# --- Timestamps --------------------------------------------------------------------------


def test_device_ts_is_used_within_the_skew_else_the_receive_time():
    now = 1_800_000_000.4
    assert sample_timestamp(now - 5, now, 0, 300, 86400) == (1_799_999_995, True)
    assert sample_timestamp(now - 3600, now, 0, 300, 86400) == (1_799_996_400, True)  # buffered
    assert sample_timestamp(now + 301, now, 0, 300, 86400) == (1_800_000_000, False)
    assert sample_timestamp(now - 86401, now, 0, 300, 86400) == (1_800_000_000, False)
    assert sample_timestamp(None, now, 20_000, 300, 86400) == (1_799_999_980, False)


# --- Accounting ------------------------------------------------------------------------------


def accounts(tmp_path: Path | None = None, **kwargs: Any) -> MeterAccounts:
    return MeterAccounts(tmp_path / "meter.json" if tmp_path else None, **kwargs)


def apply(book: MeterAccounts, raw: dict, received_at: float = 1_800_000_000.0) -> str:
    return book.apply(as_reading(raw), received_at).outcome


def test_energy_is_the_pulse_count_and_repeats_add_nothing():
    book = accounts()
    assert apply(book, reading(1, 100)) == ACCEPTED
    assert apply(book, reading(2, 250)) == ACCEPTED
    assert apply(book, reading(2, 250)) == DUPLICATE
    assert apply(book, reading(1, 100)) == DUPLICATE
    assert book.energy_kwh("esp32-a") == pytest.approx(0.25)


def test_lost_readings_lose_no_energy():
    book = accounts()
    apply(book, reading(1, 100))
    apply(book, reading(7, 900))  # 2 to 6 never arrived
    assert book.energy_kwh("esp32-a") == pytest.approx(0.9)


def test_a_reboot_starts_a_new_count_from_zero():
    book = accounts()
    apply(book, reading(1, 100))
    apply(book, reading(2, 300))
    assert apply(book, reading(1, 40, boot="boot2")) == ACCEPTED
    assert book.energy_kwh("esp32-a") == pytest.approx(0.34)
    # A late reading of the previous boot still counts, once.
    assert apply(book, reading(3, 320)) == ACCEPTED
    assert apply(book, reading(3, 320)) == DUPLICATE
    assert book.energy_kwh("esp32-a") == pytest.approx(0.36)


def test_a_negative_change_is_ignored_and_counted():
    book = accounts()
    assert apply(book, reading(1, 50)) == ACCEPTED
    assert apply(book, reading(2, 20)) == REGRESSION
    assert apply(book, reading(3, 60)) == ACCEPTED
    assert book.energy_kwh("esp32-a") == pytest.approx(0.06)


def test_impossible_pulse_counts_are_refused():
    book = accounts(max_power_watts=30_000)
    # 30 kW at 1000 imp/kWh is 83 pulses in 10 s: 10,000 is a glitch.
    assert apply(book, reading(1, 10_000)) == IMPLAUSIBLE
    assert apply(book, reading(1, 80)) == ACCEPTED
    assert apply(book, reading(2, 5_000_000)) == IMPLAUSIBLE
    assert apply(book, reading(3, 200)) == ACCEPTED
    assert apply(book, {**reading(4, 210), "imp_per_kwh": 3200}) == IMPLAUSIBLE
    assert book.energy_kwh("esp32-a") == pytest.approx(0.2)


def test_old_boots_retire_and_their_late_readings_are_ignored():
    book = accounts()
    for boot in range(BOOTS_KEPT + 3):
        apply(book, reading(1, 10, boot=f"boot{boot}"))
    assert book.energy_kwh("esp32-a") == pytest.approx(0.01 * (BOOTS_KEPT + 3))
    assert apply(book, reading(2, 20, boot="boot0")) == DUPLICATE  # retired
    assert book.energy_kwh("esp32-a") == pytest.approx(0.01 * (BOOTS_KEPT + 3))


def test_the_state_survives_a_restart_without_double_counting(tmp_path):
    book = accounts(tmp_path)
    for seq in range(1, 4):
        apply(book, reading(seq, seq * 100))
    apply(book, reading(1, 50, boot="boot2"))
    from state import atomic_write_json

    atomic_write_json(tmp_path / "meter.json", book.to_state())
    again = accounts(tmp_path)
    assert again.energy_kwh("esp32-a") == pytest.approx(0.35)
    assert apply(again, reading(3, 300)) == DUPLICATE
    assert apply(again, reading(1, 50, boot="boot2")) == DUPLICATE
    assert apply(again, reading(2, 90, boot="boot2")) == ACCEPTED
    assert again.energy_kwh("esp32-a") == pytest.approx(0.39)


def test_a_damaged_state_file_starts_empty(tmp_path):
    (tmp_path / "meter.json").write_text("not json")
    assert accounts(tmp_path).devices == {}
    (tmp_path / "meter.json").write_text('{"version": 1, "devices": [1, 2]}')
    assert accounts(tmp_path).devices == {}


WRONG_TYPES = [
    ("boots", 3),
    ("boots", ["b"]),
    ("boots", [{"boot_id": "boot1", "pulses": "50"}]),
    ("retired_kwh", "lots"),
    ("retired_kwh", float("nan")),
    ("retired_boot_ids", 7),
    ("last", "x"),
    ("energy_ts", -1),
]


@pytest.mark.parametrize(("key", "value"), WRONG_TYPES)
def test_a_damaged_device_entry_is_repaired_without_going_back(tmp_path, caplog, key, value):
    book = accounts(tmp_path)
    apply(book, reading(1, 50))
    apply(book, reading(1, 20, boot="boot2"))
    state = json.loads(json.dumps(book.to_state()))
    sent_kwh = state["devices"]["esp32-a"]["last"]["energy_kwh"]
    assert sent_kwh == pytest.approx(0.07)
    state["devices"]["esp32-a"][key] = value
    (tmp_path / "meter.json").write_text(json.dumps(state))

    repaired = accounts(tmp_path)
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "esp32-a" in r.message]
    assert len(errors) == 1
    total = repaired.energy_kwh("esp32-a")
    assert total >= sent_kwh - 1e-9 or key == "last"  # "last" held the total sent
    # Posts go on: nothing raises, nothing is counted twice, the total only grows.
    assert apply(repaired, reading(1, 20, boot="boot2")) == DUPLICATE
    assert apply(repaired, reading(2, 30, boot="boot2")) == ACCEPTED
    assert repaired.energy_kwh("esp32-a") == pytest.approx(total + 0.01)
    json.dumps(repaired.to_state())  # and it saves again


@pytest.mark.slow
def test_a_device_whose_state_has_a_wrong_type_is_answered_not_500(tmp_path, running):
    receiver = running()
    assert receiver.post(reading(1, 50))[0] == 200
    receiver.stop()
    path = tmp_path / "state" / "esp32" / "meter.json"
    state = json.loads(path.read_text())
    state["devices"]["esp32-a"]["boots"][0]["pulses"] = "50"
    state["devices"]["esp32-a"]["last"]["received_at"] = "yesterday"
    path.write_text(json.dumps(state))
    receiver = running()
    for seq in (2, 3):
        assert receiver.post(reading(seq, 50 + seq))[0] == 200
    assert receiver.request("GET", "/api/v1/status")[0] == 200
    energy = [value for _ts, value in receiver.points("energy_kwh")]
    assert energy
    assert energy[0] >= 0.05
    assert energy == sorted(energy)


def test_power_from_the_pulse_interval():
    book = accounts()
    result = book.apply(as_reading(reading(1, 10, last_interval_ms=1800)), 0)
    assert result.power_watts == pytest.approx(2000)  # 3.6e6 / (1000 x 1.8 s)
    result = book.apply(as_reading(reading(2, 30, last_interval_ms=450)), 0)
    assert result.power_watts == pytest.approx(8000)


def test_power_falls_when_pulses_stop():
    book = accounts(idle_timeout_s=300)
    book.apply(as_reading(reading(1, 10, last_interval_ms=1800)), 0)
    # The same count 30 s later: the next pulse is over 30 s away, so at most 120 W.
    later = book.apply(
        as_reading({**reading(2, 10, last_interval_ms=1800), "uptime_ms": 40_000}), 0
    )
    assert later.power_watts == pytest.approx(120)
    idle = book.apply(
        as_reading({**reading(3, 10, last_interval_ms=1800), "uptime_ms": 400_000}), 0
    )
    assert idle.power_watts == 0


def test_power_from_pulses_over_time_without_intervals():
    book = accounts()
    assert book.apply(as_reading(reading(1, 10)), 0).power_watts is None  # no window yet
    # 5 pulses in the 10 s since the count last changed: 1800 W at 1000 imp/kWh.
    assert book.apply(as_reading(reading(2, 15)), 0).power_watts == pytest.approx(1800)
    # No pulse for 10 s: held, but capped by the silence (3.6e6 / 10 s / 1000 = 360 W).
    assert book.apply(as_reading(reading(3, 15)), 0).power_watts == pytest.approx(360)


def test_power_from_any_path_is_bounded_by_the_maximum():
    book = accounts(max_power_watts=25_000)
    # 3.6 GW from a 1 us interval: refused, nothing of it counted.
    bounce = apply_full(book, {**reading(1, 10), "last_interval_ms": 0.001})
    assert bounce.outcome == IMPLAUSIBLE
    assert "last_interval_ms" in bounce.reason
    assert book.energy_kwh("esp32-a") is None or book.energy_kwh("esp32-a") == 0
    assert apply(book, reading(1, 10, last_interval_ms=1800)) == ACCEPTED
    bounce = apply_full(book, {**reading(2, 11), "last_interval_ms": 0.001})
    assert bounce.outcome == IMPLAUSIBLE
    assert book.energy_kwh("esp32-a") == pytest.approx(0.010)
    # Pulses over a short window (within the slack): the average is capped.
    fast = MeterReading("esp32-a", "boot1", 3, 20_100, 1000, 12)
    applied = book.apply(fast, 0)
    assert applied.outcome == ACCEPTED
    assert applied.power_watts <= 25_000


def apply_full(book: MeterAccounts, raw: dict):
    return book.apply(as_reading(raw), 1_800_000_000.0)


def test_estimate_power_edges():
    assert estimate_power_watts(1000, None, 0, 0, None, 0, 300_000) is None
    assert estimate_power_watts(1000, None, 0, 0, None, 300_000, 300_000) == 0.0
    assert estimate_power_watts(3200, 45, 0, 0, None, 0, 300_000) == pytest.approx(25_000)


# --- Over HTTP, on loopback ---------------------------------------------------------------


@pytest.mark.slow
def test_answers_for_each_kind_of_post(running):
    receiver = running()
    assert receiver.post(reading(1, 5)) == (200, {"ok": True, "seq": 1, "accepted": 1})
    assert receiver.post(reading(1, 5)) == (200, {"ok": True, "seq": 1, "accepted": 0})

    status, answer = receiver.post({**reading(2, 9), "pulses_total": "nine"})
    assert status == 400
    assert answer["field"] == "pulses_total"
    assert "pulses_total" in answer["error"]

    for headers in ({}, {"Authorization": "Bearer nope", "Content-Type": "application/json"}):
        status, answer = receiver.post(reading(2, 9), headers=headers)
        assert status == 401
        assert answer["ok"] is False
        assert TOKEN not in json.dumps(answer)

    status, _ = receiver.post(reading(2, 9), headers={**HEADERS, "Content-Type": "text/plain"})
    assert status == 415
    status, _ = receiver.post(b"x" * 70_000)
    assert status == 413
    status, answer = receiver.post(b"{not json")
    assert status == 400
    assert answer["field"] == "body"

    assert receiver.request("GET", "/healthz") == (200, {"ok": True})
    assert receiver.request("GET", "/api/v1/readings")[0] == 405
    assert receiver.request("GET", "/nothing/here")[0] == 404
    counters = receiver.receiver.counters
    assert counters["requests_ok"] == 2
    assert counters["requests_bad"] == 2
    assert counters["requests_unauthorized"] == 2
    assert counters["requests_wrong_type"] == 1
    assert counters["readings_accepted"] == 1
    assert counters["readings_duplicate"] == 1


@pytest.mark.slow
def test_a_chunked_body_is_read_and_limited(running):
    receiver = running(ESP32_MAX_BODY_BYTES=2048)

    def chunked(body: bytes) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", receiver.server.port, timeout=10)
        try:
            connection.request(
                "POST",
                "/api/v1/readings",
                body=iter([body[:10], body[10:]]),
                headers=HEADERS,
                encode_chunked=True,
            )
            return connection.getresponse().status
        finally:
            connection.close()

    assert chunked(json.dumps(reading(1, 5)).encode()) == 200
    batch = {"readings": [reading(seq, seq) for seq in range(2, 40)]}
    assert chunked(json.dumps(batch).encode()) == 413


@pytest.mark.slow
def test_broken_http_gets_a_4xx_not_a_5xx(running):
    receiver = running()
    for request in (
        b"POST /api/v1/readings HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\nxx",
        b"POST /api/v1/readings HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"\x00 / HTTP/1.1\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", receiver.server.port), timeout=5) as sock:
            sock.sendall(request)
            status_line = sock.makefile("rb").readline()
        assert status_line.split()[1] == b"400", (request, status_line)


class SlowClients:
    """``count`` connections that each start a POST and then send one header
    line every ``every_s`` (or nothing at all), as a slow-loris client does."""

    def __init__(self, port: int, count: int, every_s: float | None = 1.0) -> None:
        self.sockets = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if every_s is not None:
                sock.sendall(b"POST /api/v1/readings HTTP/1.1\r\nHost: x\r\n")
            self.sockets.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, args=(every_s,), daemon=True)
        self._thread.start()

    def _drip(self, every_s: float | None) -> None:
        line = 0
        while every_s is not None and not self._stop.wait(every_s):
            line += 1
            for sock in self.sockets:
                try:
                    sock.sendall(b"X-Slow-%d: y\r\n" % line)
                except OSError:
                    pass  # closed by the server: what it should do

    def still_open(self) -> int:
        """How many the server has not closed."""
        open_count = 0
        for sock in self.sockets:
            sock.setblocking(False)
            try:
                open_count += sock.recv(65536) != b""
            except BlockingIOError:
                open_count += 1
            except OSError:
                pass
        return open_count

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets:
            sock.close()


def post_promptly(receiver: RunningReceiver, seq: int, timeout_s: float = 5.0) -> int:
    """One firmware post on a fresh connection; raises socket.timeout if not answered."""
    connection = http.client.HTTPConnection("127.0.0.1", receiver.server.port, timeout=timeout_s)
    try:
        body = json.dumps(reading(seq, seq)).encode()
        connection.request("POST", "/api/v1/readings", body=body, headers=HEADERS)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.slow
def test_slow_clients_cannot_starve_posting_devices(running):
    # 150 connections trickling a header line each second (no token needed)
    # held every slot of waitress's default 100 for ever: posts waited 40 s+.
    receiver = running(server_options={"request_deadline_s": 3.0})
    slow = SlowClients(receiver.server.port, 150, every_s=1.0)
    try:
        for seq in range(1, 4):
            assert post_promptly(receiver, seq) == 200
        # Each slow connection is closed once its request is over the deadline.
        deadline = time.monotonic() + 10
        while slow.still_open() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert slow.still_open() == 0
        assert post_promptly(receiver, 4) == 200
    finally:
        slow.close()
    assert receiver.receiver.counters["connections_dropped"] == 150
    assert receiver.receiver.counters["readings_accepted"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("every_s", [1.0, None])
def test_more_slow_or_idle_clients_than_connections_still_leave_room(running, every_s):
    # More connections than the limit, trickling or silent: the one waiting
    # longest is closed to make room, so a device's post is still answered.
    receiver = running(server_options={"connection_limit": 40})
    slow = SlowClients(receiver.server.port, 120, every_s=every_s)
    try:
        for seq in range(1, 4):
            assert post_promptly(receiver, seq) == 200
    finally:
        slow.close()
    assert receiver.receiver.counters["connections_dropped"] >= 120 - 40


@pytest.mark.slow
def test_a_10_mb_body_gets_413_not_a_reset(running):
    receiver = running()
    connection = http.client.HTTPConnection("127.0.0.1", receiver.server.port, timeout=10)
    try:
        connection.request("POST", "/api/v1/readings", body=b"x" * 10_000_000, headers=HEADERS)
        response = connection.getresponse()
        assert response.status == 413
    finally:
        connection.close()
    assert post_promptly(receiver, 1) == 200


@pytest.mark.slow
def test_a_token_may_post_only_for_its_own_device(running):
    receiver = running(ESP32_TOKEN="", ESP32_DEVICE_TOKENS={"esp32-a": "a-token-0123456789abcdef"})
    own = {"Authorization": "Bearer a-token-0123456789abcdef", "Content-Type": "application/json"}
    assert receiver.post(reading(1, 5), headers=own)[0] == 200
    status, answer = receiver.post(reading(1, 5, device="esp32-b"), headers=own)
    assert status == 401
    assert answer["field"] == "device_id"
    status, answer = receiver.post(
        {"readings": [reading(2, 6), reading(1, 5, device="esp32-b")]}, headers=own
    )
    assert status == 401
    assert answer["field"] == "readings[1].device_id"
    assert receiver.receiver.accounts.energy_kwh("esp32-a") == pytest.approx(0.005)  # nothing of it


@pytest.mark.slow
def test_lines_name_the_main_meter_and_then_the_others(running):
    receiver = running()
    now = int(time.time())
    receiver.post(reading(1, 5, ts=now - 20, last_interval_ms=1800, rssi=-61))
    receiver.post(reading(1, 7, device="esp32-garage", ts=now - 10))
    assert receiver.points("power_kw") == [(now - 20, 2.0)]
    assert receiver.points("power_watts") == [(now - 20, 2000.0)]
    assert receiver.points("energy_kwh") == [(now - 20, 0.005)]
    assert receiver.points("pulses_total") == [(now - 20, 5.0)]
    assert receiver.points("rssi") == [(now - 20, -61.0)]
    assert receiver.points("energy_kwh", segment="meter_esp32_garage") == [(now - 10, 0.007)]
    assert all(is_valid_line(line) for line in receiver.sink.lines)
    assert any(
        line.startswith("home.electricity.health.esp32.readings_accepted ")
        for line in receiver.sink.lines
    )


@pytest.mark.slow
def test_a_batch_without_clock_is_spread_back_from_the_receive_time(running):
    receiver = running()
    before = int(time.time())
    batch = [reading(seq, seq * 3) for seq in (1, 2, 3)]  # no ts: NTP not synced yet
    assert receiver.post({"readings": batch})[0] == 200
    stamps = [timestamp for timestamp, _ in receiver.points("pulses_total")]
    assert stamps[2] - stamps[0] == 20
    assert stamps[1] - stamps[0] == 10
    assert before <= stamps[2] <= time.time()


@pytest.mark.slow
def test_status_page_shows_each_device(running):
    receiver = running()
    receiver.post(reading(1, 5, fw="pulse-reader/1.0"))
    status, page = receiver.request("GET", "/api/v1/status")
    assert status == 200
    [device] = page["devices"]
    assert device["device_id"] == "esp32-a"
    assert device["name"] == "meter"
    assert device["energy_kwh"] == pytest.approx(0.005)
    assert device["last"]["seq"] == 1
    assert device["last"]["fw"] == "pulse-reader/1.0"
    assert TOKEN not in json.dumps(page)


@pytest.mark.slow
@pytest.mark.parametrize(
    "field", ["seq", "uptime_ms", "imp_per_kwh", "pulses_total", "ts", "last_interval_ms", "rssi"]
)
@pytest.mark.parametrize("digits", [309, 310, 400, 4_299, 4_301, 20_000])
def test_huge_numbers_in_any_field_get_400_naming_it(running, field, digits):
    receiver = running()
    base = json.dumps(reading(1, 5, ts=int(time.time()), last_interval_ms=1800, rssi=-60))
    body = json.loads(base)
    body[field] = "@"
    huge = "9" * digits
    for text in (huge, "-" + huge, huge + ".5", "0." + huge, "1e999"):
        raw = json.dumps(body).replace('"@"', text).encode()
        status, answer = receiver.post(raw)
        assert status == 400, (text[:20], answer)
        assert answer["field"] == field, (text[:20], answer)
        batch = json.dumps({"readings": [body]}).replace('"@"', text).encode()
        status, answer = receiver.post(batch)
        assert status == 400
        assert answer["field"] == f"readings[0].{field}"
    assert receiver.receiver.counters["readings_accepted"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("imp_per_kwh", [1e-300, 0.5, 99, 100_001, 1e300])
def test_meter_constants_no_meter_has_are_refused(running, imp_per_kwh):
    receiver = running()
    status, answer = receiver.post({**reading(1, 5), "imp_per_kwh": imp_per_kwh})
    assert status == 400
    assert answer["field"] == "imp_per_kwh"
    for good in (100, 100_000):
        raw = {**reading(1, 5, boot=f"b{good}"), "imp_per_kwh": good}
        assert receiver.post(raw) == (200, {"ok": True, "seq": 1, "accepted": 1})


@pytest.mark.slow
def test_a_bouncing_pulse_interval_is_no_3_gigawatts(running):
    receiver = running()
    assert receiver.post({**reading(1, 5), "last_interval_ms": 0.001})[0] == 200
    assert receiver.post(reading(2, 6, last_interval_ms=1800))[0] == 200
    assert receiver.receiver.counters["readings_implausible"] == 1
    power = [value for _ts, value in receiver.points("power_watts")]
    assert power == [2000.0]


def test_energy_timestamps_only_move_forward():
    assert energy_timestamp(1000, 0) == 1000
    assert energy_timestamp(1000, 999) == 1000
    assert energy_timestamp(1000, 1000) == 1001  # never two totals in one second
    assert energy_timestamp(900, 1000) == 1001  # a late reading's total: after the last


@pytest.mark.slow
def test_late_readings_of_an_earlier_boot_never_take_energy_back_in_time(running):
    receiver = running()
    now = int(time.time())
    assert receiver.post(reading(1, 100, boot="a", ts=now - 100))[0] == 200
    # The device rebooted; boot b's first readings arrive before boot a's last.
    assert receiver.post(reading(1, 10, boot="b", ts=now - 10))[0] == 200
    assert receiver.post(reading(2, 150, boot="a", ts=now - 60))[0] == 200
    assert (
        receiver.post(
            {"readings": [reading(2, 20, boot="b", ts=now), reading(3, 160, boot="a", ts=now - 50)]}
        )[0]
        == 200
    )
    points = receiver.points("energy_kwh")
    latest: dict[int, float] = {}
    for timestamp, value in points:  # what whisper keeps: the last value per second
        latest[timestamp] = value
    series = [latest[timestamp] for timestamp in sorted(latest)]
    assert series == sorted(series), points
    assert series[-1] == pytest.approx(0.18)


@pytest.mark.slow
def test_device_ids_differing_only_in_case_are_refused(running):
    receiver = running()
    assert receiver.post(reading(1, 5, device="Meter-1"))[0] == 200
    status, answer = receiver.post(reading(1, 7, device="meter-1"))
    assert status == 400
    assert answer["field"] == "device_id"
    assert "Meter-1" in answer["error"]
    assert "case" in answer["error"]
    status, answer = receiver.post(
        {"readings": [reading(1, 7, device="x1"), reading(1, 7, device="X1")]}
    )
    assert status == 400
    assert answer["field"] == "device_id"
    assert receiver.post(reading(2, 6, device="Meter-1"))[0] == 200
    assert [value for _ts, value in receiver.points("energy_kwh")] == [0.005, 0.006]


@pytest.mark.slow
def test_ids_that_name_alike_keep_series_of_their_own(running):
    # "a.b" and "ab" both became meter_ab: two readers' totals in one series.
    receiver = running()
    for device in ("main", "a.b", "ab", "a:b"):
        assert receiver.post(reading(1, 5, device=device))[0] == 200
    names = receiver.receiver.runtime.names
    segments = {device: names.name_for(device, "meter") for device in ("main", "a.b", "ab", "a:b")}
    assert len(set(segments.values())) == 4, segments
    for segment in segments.values():
        assert [value for _ts, value in receiver.points("energy_kwh", segment=segment)] == [0.005]


@pytest.mark.slow
def test_a_replaced_reader_named_as_its_predecessor_takes_its_series(running):
    receiver = running()
    assert receiver.post(reading(1, 5, device="esp32-old"))[0] == 200
    receiver.stop()
    replaced = running(DEVICE_NAMES={"esp32-new": "meter"})
    assert replaced.post(reading(1, 7, device="esp32-new"))[0] == 200
    assert [value for _ts, value in replaced.points("energy_kwh", segment="meter")][-1] == 0.007


@pytest.mark.slow
def test_too_many_devices_are_refused(running):
    receiver = running(ESP32_MAX_DEVICES=2)
    assert receiver.post(reading(1, 5, device="a1"))[0] == 200
    assert receiver.post(reading(1, 5, device="a2"))[0] == 200
    status, answer = receiver.post(reading(1, 5, device="a3"))
    assert status == 400
    assert answer["field"] == "device_id"


def sim_esp32(receiver: RunningReceiver, **kwargs: Any) -> SimulatedEsp32:
    kwargs.setdefault("seed", 7)
    kwargs.setdefault("clock", SimClock(time.time() - 3000))
    return SimulatedEsp32(receiver.url, TOKEN, kwargs.pop("device_id", "esp32-sim"), **kwargs)


@pytest.mark.slow
def test_simulated_esp32_through_drops_retries_duplicates_and_reboots(running):
    receiver = running()
    sim = sim_esp32(receiver, power_watts=2400)
    sim.step(120)
    sim.drop_next_posts(3)
    sim.step(60)
    sim.drop_next_responses(2)  # received, but the device retries them
    sim.step(60)
    sim.duplicate_next_post()
    sim.step(30)
    sim.reboot(downtime_s=20)
    sim.power_watts = 600
    sim.step(120)
    assert sim.flush()
    accounts = receiver.receiver.accounts
    assert accounts.energy_kwh("esp32-sim") == pytest.approx(sim.energy_kwh_expected, abs=1e-9)
    assert receiver.receiver.counters["readings_duplicate"] >= 3
    assert all(record.status in (200, None) for record in sim.history)
    energy = receiver.points("energy_kwh")
    assert energy[-1][1] == pytest.approx(sim.energy_kwh_expected, abs=1e-6)
    assert [value for _, value in energy] == sorted(value for _, value in energy)
    power = [value for _, value in receiver.points("power_watts")]
    assert power[-1] == pytest.approx(600, rel=0.01)


@pytest.mark.slow
def test_a_receiver_restart_neither_loses_nor_double_counts(running):
    first = running()
    sim = sim_esp32(first, power_watts=3000)
    sim.step(100)
    sim.drop_next_responses(1)  # the receiver has seq 11, the device does not know
    sim.step(10)
    first.stop()
    sim.step(50)  # receiver down: the device buffers and backs off
    second = running()
    sim.url = second.url
    sim.flush()
    assert second.receiver.accounts.energy_kwh("esp32-sim") == pytest.approx(
        sim.energy_kwh_expected, abs=1e-9
    )
    assert second.receiver.counters["readings_duplicate"] >= 1
    assert second.points("energy_kwh")[-1][1] == pytest.approx(sim.energy_kwh_expected, abs=1e-6)


@pytest.mark.slow
def test_several_devices_posting_at_once(running):
    receiver = running()
    sims = [
        sim_esp32(receiver, device_id=f"esp32-{n}", power_watts=500 * (n + 1), seed=n)
        for n in range(4)
    ]
    threads = [threading.Thread(target=sim.step, args=(300,)) for sim in sims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sim in sims:
        sim.flush()
        assert receiver.receiver.accounts.energy_kwh(sim.device_id) == pytest.approx(
            sim.energy_kwh_expected, abs=1e-9
        )


@pytest.mark.slow
def test_stop_saves_the_state(tmp_path):
    receiver = RunningReceiver(tmp_path / "state").start()
    receiver.post(reading(1, 1234, uptime_ms=3_600_000))
    receiver.stop()
    saved = json.loads((tmp_path / "state" / "esp32" / "meter.json").read_text())
    assert saved["devices"]["esp32-a"]["boots"][0]["pulses"] == 1234
    assert TOKEN not in (tmp_path / "state" / "esp32" / "meter.json").read_text()


@pytest.mark.slow
def test_stop_wakes_the_server_before_a_worker_can_close_it(tmp_path, monkeypatch):
    """A worker finishing a request wakes the server loop at any moment. If
    that wake-up lands between stop queueing close_all and writing its own
    wake-up byte, close_all must wait for the byte: run first, it closes the
    pipe the byte is written to (EBADF in CI; or a stray byte in whatever file
    reused the number). Here the worker's wake-up comes in exactly there."""
    receiver = RunningReceiver(tmp_path / "state").start()
    trigger = receiver.server._server.trigger
    real_pull = trigger._physical_pull
    worker_woke_the_loop = threading.Event()

    def pull_after_a_worker() -> None:
        os.write(trigger.trigger, b"x")  # what a worker's pull_trigger() writes
        worker_woke_the_loop.set()
        time.sleep(0.3)  # the loop had time to run what was queued
        real_pull()

    monkeypatch.setattr(trigger, "_physical_pull", pull_after_a_worker)
    receiver.stop()  # raised OSError: [Errno 9] Bad file descriptor
    assert worker_woke_the_loop.is_set()
    assert not receiver.server.alive
    receiver.stop()  # again: nothing to wake, nothing raised


# --- The script end to end ---------------------------------------------------------------


def hermetic_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment for the script: no config_local.py, state in tmp_path."""
    return collector_environment(tmp_path, **{"ESP32_TOKEN": TOKEN, **extra})


def run_script(
    tmp_path: Path, *args: str, timeout: float = 30, **env: str
) -> subprocess.CompletedProcess:
    return run_collector("esp32_receiver.py", args, hermetic_env(tmp_path, **env), timeout)


class ReceiverProcess:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        from harness.carbon import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1/readings"
        env = hermetic_env(tmp_path)
        (tmp_path / "logs").mkdir(exist_ok=True)
        self.stderr_path = tmp_path / "logs" / f"receiver-{self.port}.log"
        self.stdout_path = tmp_path / "logs" / f"receiver-{self.port}.out"
        argv = ["--bind", "127.0.0.1", "--port", str(self.port), *args]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = start_collector(
                "esp32_receiver.py", argv, env, stdout=out, stderr=err, text=False
            )
        deadline = time.monotonic() + 15
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    connection.close()
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"receiver did not start: {self.stderr_path.read_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        return stop_collector(self.proc)


@pytest.fixture
def receiver_process(tmp_path: Path):
    started: list[ReceiverProcess] = []

    def start(*args: str) -> ReceiverProcess:
        process = ReceiverProcess(tmp_path, *args)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()


@pytest.mark.slow
def test_end_to_end_into_carbon_across_a_receiver_restart(
    carbon_server, receiver_process, tmp_path
):
    carbon = f"127.0.0.1:{carbon_server.port}"
    args = ("--carbon", carbon, "--state-dir", str(tmp_path / "state"), "--interval", "0.2")
    first = receiver_process(*args)
    clock = SimClock(time.time() - 1800)  # readings of the last half hour: in the 1 s archive
    sim = SimulatedEsp32(first.url, TOKEN, "esp32-meter", clock=clock, power_watts=3000, seed=3)
    sim.step(300)
    sim.drop_next_responses(1)
    sim.step(10)
    assert first.stop() == 0, first.stderr_path.read_text()
    second = receiver_process(*args)
    sim.url = second.url
    sim.power_watts = 1200
    sim.step(300)
    sim.reboot(downtime_s=30)
    sim.step(300)
    assert sim.flush()
    assert second.stop() == 0, second.stderr_path.read_text()

    expected_kwh = sim.energy_kwh_expected
    energy = carbon_server.wait_for_points("home.electricity.meter.energy_kwh", count=90)
    assert energy[-1][1] == pytest.approx(expected_kwh, abs=1e-6)
    assert [value for _, value in energy] == sorted(value for _, value in energy)
    power = carbon_server.wait_for_points("home.electricity.meter.power_kw", count=90)
    assert power[5][1] == pytest.approx(3.0, rel=0.01)
    assert power[-1][1] == pytest.approx(1.2, rel=0.01)
    assert carbon_server.wait_for_points("home.electricity.meter.power_watts")[-1][
        1
    ] == pytest.approx(1200, rel=0.01)
    assert carbon_server.wait_for_points("home.electricity.meter.rssi")[-1][1] == -60
    assert carbon_server.wait_for_points("home.electricity.health.esp32.readings_duplicate")
    assert TOKEN not in first.stderr_path.read_text() + second.stderr_path.read_text()


@pytest.mark.slow
def test_hostile_posts_into_carbon_leave_energy_right(carbon_server, receiver_process, tmp_path):
    """The script with a real carbon-cache: late readings of an earlier boot, a
    bouncing interval, numbers beyond any float, a 10 MB body, slow clients."""
    carbon = f"127.0.0.1:{carbon_server.port}"
    args = ("--carbon", carbon, "--state-dir", str(tmp_path / "state"), "--interval", "0.2")
    process = receiver_process(*args)
    now = int(time.time()) - 600

    def post(body: Any) -> int:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
        try:
            connection.request("POST", "/api/v1/readings", body=data, headers=HEADERS)
            return connection.getresponse().status
        finally:
            connection.close()

    slow = SlowClients(process.port, 130, every_s=1.0)
    try:
        assert post(reading(1, 100, boot="a", ts=now)) == 200
        assert post(reading(1, 10, boot="b", ts=now + 60)) == 200  # rebooted
        assert post(reading(2, 150, boot="a", ts=now + 30)) == 200  # boot a's last, late
        assert post({**reading(2, 12, boot="b", ts=now + 70), "last_interval_ms": 0.001}) == 200
        huge = json.dumps(reading(3, 20, boot="b", ts=now + 80)).replace(
            '"pulses_total": 20', '"pulses_total": ' + "9" * 5000
        )
        assert post(huge.encode()) == 400
        assert post(b"x" * 10_000_000) == 413
        assert post(reading(3, 20, boot="b", ts=now + 90)) == 200
    finally:
        slow.close()
    assert process.stop() == 0, process.stderr_path.read_text()

    # Boot a's late total lands just after the newest second sent, not back in time.
    energy = carbon_server.wait_for_points("home.electricity.meter.energy_kwh", count=4)
    assert energy == [
        (now, pytest.approx(0.1)),
        (now + 60, pytest.approx(0.11)),
        (now + 61, pytest.approx(0.16)),  # not 0.16 at now + 30
        (now + 90, pytest.approx(0.17)),
    ]
    power = carbon_server.fetch("home.electricity.meter.power_watts")
    assert all(value <= 100_000 for _, value in power)
    assert "Traceback" not in process.stderr_path.read_text()


@pytest.mark.slow
def test_dry_run_prints_only_lines_and_once_exits_after_the_first_post(receiver_process, tmp_path):
    process = receiver_process("--dry-run", "--once", "--interval", "0.2")
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
    connection.request(
        "POST",
        "/api/v1/readings",
        body=json.dumps(reading(1, 5, ts=int(time.time()))),
        headers=HEADERS,
    )
    assert connection.getresponse().status == 200
    connection.close()
    assert process.proc.wait(timeout=20) == 0
    out = process.stdout_path.read_text()
    assert out
    assert all(is_valid_line(line) for line in out.splitlines(keepends=True))
    assert "home.electricity.meter.energy_kwh 0.005 " in out
    assert not (tmp_path / "state").exists()


@pytest.mark.slow
def test_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    result = run_script(tmp_path, "--bind", "0.0.0.0", "--port", "5000", ESP32_TOKEN="")
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.strip().count("\n") == 0
    assert "ESP32_TOKEN" in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_a_weak_token_is_a_config_error_that_does_not_show_it(tmp_path):
    result = run_script(tmp_path, "--bind", "127.0.0.1", ESP32_TOKEN="hunter2")
    assert result.returncode == EXIT_CONFIG
    assert "hunter2" not in result.stderr
    assert "ESP32_TOKEN" in result.stderr


@pytest.mark.slow
def test_a_busy_port_is_a_config_error(tmp_path, receiver_process):
    process = receiver_process("--dry-run")
    result = run_script(tmp_path, "--bind", "127.0.0.1", "--port", str(process.port))
    assert result.returncode == EXIT_CONFIG
    assert "cannot listen" in result.stderr


@pytest.mark.slow
def test_discover_lists_the_devices_that_posted(tmp_path):
    running_receiver = RunningReceiver(tmp_path / "state").start()
    running_receiver.post(reading(1, 2500, uptime_ms=3_600_000, fw="pulse-reader/1.0"))
    running_receiver.stop()
    result = run_script(tmp_path, "--discover")
    assert result.returncode == 0, result.stderr
    assert "meter" in result.stdout
    assert "esp32-a" in result.stdout
    assert "2.500" in result.stdout
    empty = run_script(tmp_path, "--discover", "--state-dir", str(tmp_path / "empty"))
    assert empty.returncode == EXIT_NO_DEVICE
