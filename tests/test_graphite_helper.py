"""Metric names, line validation, the spool and delivery confirmation."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from carbon_client import CarbonClient
from graphite_helper import (
    InvalidMetric,
    format_device_name,
    format_line,
    is_valid_line,
    is_valid_path,
    metric_path,
)
from spool import Spool


@pytest.fixture
def make_client() -> Iterator[Callable[..., CarbonClient]]:
    """CarbonClients closed when the test ends: a sender left running would
    retry its backlog at a port a later test's server may have."""
    made: list[CarbonClient] = []

    def make(*args: Any, **kwargs: Any) -> CarbonClient:
        made.append(CarbonClient(*args, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


TS = 1_700_000_000


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Living Room Lamp", "living_room_lamp"),
        ("kettle-2", "kettle_2"),
        ("Café  Plug", "cafe_plug"),
        ("a.b/c\nd", "abc_d"),
        ("  --__Fridge__--  ", "fridge"),
        ("TV 📺 corner", "tv_corner"),
        ("x" * 3, "xxx"),
    ],
)
def test_format_device_name(name, expected):
    assert format_device_name(name) == expected


def test_empty_name_falls_back_to_stable_id():
    assert format_device_name("📺", fallback="50:C7:BF:01:02:03") == "50c7bf010203"
    assert format_device_name("台所", fallback="50:C7:BF:01:02:03") == "50c7bf010203"
    assert format_device_name("", fallback="") == "unknown"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("кухня", "kukhnia"),
        ("Спальня", "spalnia"),
        ("Київ йогурт ёлка", "kiiv_iogurt_elka"),
        ("Ψυγείο", "psygeio"),
        ("Straße", "strasse"),
    ],
)
def test_names_in_other_scripts_are_transliterated(name, expected):
    assert format_device_name(name) == expected


def test_names_that_cannot_be_written_stay_distinct_and_stable():
    # These all became "unknown" (or "plug"): several devices in one series.
    names = ["台所", "居間", "寝室", "📺", "💡", "!!!", "Plug 台所", "Plug 居間", "plug", "kukhnia"]
    segments = [format_device_name(name) for name in names]
    assert len(set(segments)) == len(names)
    assert all(is_valid_path(segment) for segment in segments)
    assert segments[0] == format_device_name("台所") == "unicode_1bcb3703"  # the same every run
    assert segments[6].startswith("plug_")
    assert segments[6] != segments[7]


def test_format_line_values():
    path = metric_path("home.electricity", "kasa", "kettle", "power_watts")
    assert format_line(path, 63.499, TS) == f"{path} 63.499 {TS}\n"
    assert format_line(path, 230.0, TS) == f"{path} 230 {TS}\n"
    assert format_line(path, True, TS) == f"{path} 1 {TS}\n"
    assert format_line(path, -0.5, TS) == f"{path} -0.5 {TS}\n"
    assert format_line(path, 1e-7, TS).split()[1] == "1e-07"
    assert format_line(path, 12.0, TS + 0.9) == f"{path} 12 {TS}\n"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "12", None])
def test_format_line_rejects_non_finite_values(value):
    with pytest.raises(InvalidMetric, match=r"^value .* is not (a number|finite)$"):
        format_line("home.x.power_watts", value, TS)


@pytest.mark.parametrize("stamp", [TS * 1000, 0, -1, math.nan, "now"])
def test_format_line_rejects_bad_timestamps(stamp):
    with pytest.raises(InvalidMetric, match=r"^timestamp .* is not (a number|whole seconds)"):
        format_line("home.x.power_watts", 1, stamp)


@pytest.mark.parametrize(
    "path", ["home.Kettle.power", "home..power", "home.ket tle.power", ".home", "home.é"]
)
def test_bad_paths_rejected(path):
    with pytest.raises(InvalidMetric, match=r"^(invalid metric path|line of \d+ bytes)"):
        format_line(path, 1, TS)


def test_is_valid_line():
    assert is_valid_line(f"home.a.b 1.5 {TS}\n")
    assert not is_valid_line(f"home.a.b 1.5 {TS}")  # torn: no newline
    assert not is_valid_line(f"home.a.b nan {TS}\n")
    assert not is_valid_line(f"home.a.b 1 2 {TS}\n")
    assert not is_valid_line(f"home.a b 1 {TS}\n")
    assert not is_valid_line(f"home.a.b 1 {TS * 1000}\n")


def lines(count, start=0):
    return [f"home.t.m{i % 7} {i} {TS + i}\n" for i in range(start, start + count)]


def test_spool_keeps_order_across_segments_and_restarts(tmp_path):
    spool = Spool(tmp_path, max_lines=10_000, segment_lines=100)
    spool.append(lines(250))
    spool.append(lines(50, start=250))
    reopened = Spool(tmp_path, max_lines=10_000, segment_lines=100)
    assert len(reopened) == 300
    got = []
    assert reopened.replay(lambda batch: got.extend(batch) or True, batch_lines=40) == 300
    assert got == lines(300)
    assert len(reopened) == 0
    assert not list(tmp_path.glob("*.spool"))


def test_spool_discards_torn_last_line(tmp_path):
    spool = Spool(tmp_path)
    spool.append(lines(3))
    segment = next(tmp_path.glob("*.spool"))
    with open(segment, "ab") as handle:
        handle.write(b"home.t.m1 12")  # the process died mid-write
    reopened = Spool(tmp_path)
    assert len(reopened) == 3
    assert reopened.discarded_lines == 1
    got = []
    reopened.replay(lambda batch: got.extend(batch) or True)
    assert got == lines(3)


def test_spool_drops_oldest_when_full(tmp_path):
    spool = Spool(tmp_path, max_lines=1000, segment_lines=300)
    spool.append(lines(1500))
    assert len(spool) == 1000
    assert spool.dropped_lines == 500
    got = []
    spool.replay(lambda batch: got.extend(batch) or True)
    assert got == lines(1000, start=500)


def test_spool_replay_stops_at_first_failure_and_keeps_the_rest(tmp_path):
    spool = Spool(tmp_path, segment_lines=100)
    spool.append(lines(300))
    calls = []

    def deliver(batch):
        calls.append(batch)
        return len(calls) < 3

    assert spool.replay(deliver, batch_lines=50) == 100
    assert len(spool) == 200
    got = []
    spool.replay(lambda batch: got.extend(batch) or True)
    assert got == lines(200, start=100)


class RecordingServer:
    """A plaintext receiver that records bytes and closes after end of stream,
    as carbon-cache does; ``close_early`` closes before reading (a crash)."""

    def __init__(self, close_early=False):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.address = self.sock.getsockname()
        self.received = b""
        self.close_early = close_early
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                if self.close_early:
                    continue
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    self.received += chunk

    def close(self):
        # shutdown() wakes the blocked accept(); close() alone would not.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_client_fails_over_to_the_next_destination(tmp_path, make_client):
    server = RecordingServer()
    try:
        client = make_client(
            [("127.0.0.1", free_port()), server.address], timeout_s=2, spool=Spool(tmp_path)
        )
        assert client.send_lines(lines(5))
        assert server.received.decode() == "".join(lines(5))
    finally:
        server.close()


@pytest.mark.slow
def test_undelivered_lines_are_spooled_then_replayed_in_order(tmp_path, make_client):
    port = free_port()
    client = make_client([("127.0.0.1", port)], timeout_s=1, spool=Spool(tmp_path))
    assert not client.send_lines(lines(3))
    assert not client.send_lines(lines(3, start=3))
    assert len(client.spool) == 6
    server = RecordingServer()
    try:
        client.destinations = [server.address]
        assert client.send_lines(lines(2, start=6))
        received = server.received.decode()
        # The segment written since the outage began goes first (the dashboard
        # is live at once), then the older backlog in order; each line once.
        assert received == "".join(lines(5, start=3) + lines(3))
        assert len(client.spool) == 0
    finally:
        server.close()


@pytest.mark.slow
def test_peer_that_never_confirms_counts_as_undelivered(tmp_path, make_client):
    """A hung Carbon (accepts, never reads or closes): the batch is spooled."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        client = make_client([listener.getsockname()], timeout_s=0.5, spool=Spool(tmp_path))
        assert not client.send_lines(lines(4))
        assert len(client.spool) == 4
    finally:
        listener.close()


@pytest.mark.slow
def test_invalid_lines_are_never_sent(tmp_path, make_client):
    server = RecordingServer()
    try:
        client = make_client([server.address], timeout_s=2, spool=Spool(tmp_path))
        client.send_lines([f"home.a.b nan {TS}\n", f"home.a b 1 {TS}\n", *lines(1)])
        assert server.received.decode() == "".join(lines(1))
        assert client.lines_invalid == 2
    finally:
        server.close()


@pytest.mark.slow
def test_recently_confirmed_lines_are_resent_after_an_outage(tmp_path, make_client):
    """carbon-cache may read a batch and die before writing it: lines confirmed
    within the resend window go back to the spool when the destination fails."""
    server = RecordingServer()
    client = make_client([server.address], timeout_s=1, spool=Spool(tmp_path))
    assert client.send_lines(lines(2))
    server.close()  # Carbon stops, perhaps with those lines still in its cache
    assert not client.send_lines(lines(1, start=2))
    replacement = RecordingServer()
    try:
        client.destinations = [replacement.address]
        assert client.send_lines(lines(1, start=3))
        assert replacement.received.decode() == "".join(lines(1, start=3) + lines(3))
    finally:
        replacement.close()


@pytest.mark.slow
def test_resend_window_is_bounded(tmp_path, make_client):
    server = RecordingServer()
    client = make_client([server.address], timeout_s=1, spool=Spool(tmp_path), resend_max_lines=3)
    for start in range(0, 10, 2):
        assert client.send_lines(lines(2, start=start))
    server.close()
    assert not client.send_lines(lines(1, start=10))
    assert len(client.spool) <= 3 + 2 + 1


def test_spool_fsyncs_at_most_once_per_interval(tmp_path, monkeypatch):
    """A long outage appends every second; an SD card should not see an
    fsync each time. Appends still reach the file (and survive a process
    crash) at once."""
    import spool as spool_module

    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(spool_module.os, "fsync", lambda fd: calls.append(fd) or real_fsync(fd))
    spool = Spool(tmp_path, fsync_interval_s=3600)
    for start in range(0, 50, 5):
        spool.append(lines(5, start=start))
    assert len(calls) == 1
    assert len(Spool(tmp_path)) == 50  # all on the file already
    spool.sync()
    assert len(calls) == 2


@pytest.mark.slow
def test_failover_sticks_to_the_destination_that_answers(tmp_path, make_client):
    """A hung primary costs its timeout once, not on every batch."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen()
    backup = RecordingServer()
    try:
        client = make_client(
            [hung.getsockname(), backup.address], timeout_s=0.5, spool=Spool(tmp_path)
        )
        started = time.monotonic()
        assert client.send_lines(lines(1))
        first_s = time.monotonic() - started
        started = time.monotonic()
        for start in range(1, 6):
            assert client.send_lines(lines(1, start=start))
        assert time.monotonic() - started < first_s  # five batches, no timeout paid
        assert backup.received.decode() == "".join(lines(6))
        client._retry_preferred_at = 0.0  # the retry period is over: primary first again
        assert client._delivery_order() == [0, 1]
    finally:
        hung.close()
        backup.close()
