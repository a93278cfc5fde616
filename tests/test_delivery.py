"""Delivery under the faults homes have (issue 12): a silent, slow or
chattering Carbon, SIGKILLs and power cuts, a full disk, a hung device.

Stand-in Carbon servers on 127.0.0.1 play the fault itself; what must land
lands in a real carbon-cache (the carbon_server fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

import collector
from carbon_client import CarbonClient
from runtime import Runtime
from settings import load_settings
from simulators.kasa import KasaSimulator, SimulatedKasaDevice, loopback_host
from spool import Spool
from tests.helpers import carbon_arg, start_collector, stop_collector
from tests.test_collector import FakeSource, RecordingSink

TS = 1_700_000_000


def lines(count: int, start: int = 0) -> list[str]:
    return [f"home.t.m{i % 7} {i} {TS + i}\n" for i in range(start, start + count)]


class StandInCarbon:
    """A plaintext listener that misbehaves on purpose.

    ``blackhole``: accepts, never reads. ``hold``: reads everything, never
    closes. ``forget``: reads and closes (confirms) like carbon-cache, as if
    it then died with the lines in its cache. ``trickle``: reads
    ``rate_bytes_s``, closes at end of stream. ``chatter``: reads and keeps
    sending bytes, never closes. Records what it read.
    """

    def __init__(self, mode: str, rate_bytes_s: int = 100_000) -> None:
        self.mode = mode
        self.rate_bytes_s = rate_bytes_s
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = self.sock.getsockname()
        self.received = bytearray()
        self.closing = threading.Event()
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def arg(self) -> str:
        return "{}:{}".format(*self.address)

    def received_lines(self) -> list[str]:
        return [line + "\n" for line in bytes(self.received).decode().splitlines()]

    def _serve(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            if self.mode != "blackhole":
                threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # closed by close() meanwhile
            conn.settimeout(0.2)
            while not self.closing.is_set():
                try:
                    chunk = conn.recv(self.rate_bytes_s // 10 if self.mode == "trickle" else 65536)
                except socket.timeout:
                    if self.mode == "chatter":
                        conn.sendall(b"x" * 64)
                    continue
                if self.mode == "chatter":
                    conn.sendall(b"x" * 64)  # and then some, every 10 ms, forever
                    if not chunk:
                        time.sleep(0.01)
                        continue
                if not chunk:
                    if self.mode in ("forget", "trickle"):
                        conn.close()
                        return
                    self.closing.wait()  # hold: never close
                    return
                self.received += chunk
                if self.mode == "trickle":
                    time.sleep(0.1)

    def close(self) -> None:
        self.closing.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.close()
        self.thread.join(timeout=5)


@pytest.fixture
def stand_in():
    started: list[StandInCarbon] = []

    def start(mode: str, **options) -> StandInCarbon:
        started.append(StandInCarbon(mode, **options))
        return started[-1]

    yield start
    for server in started:
        server.close()


@contextlib.contextmanager
def connect_hangs():
    """An address whose connect hangs, as a switched-off LAN host's does: a
    listener whose backlog is full drops further SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(8):  # fill the backlog; later connects get no SYN-ACK
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
            fillers.append(filler)
        time.sleep(0.2)
        yield "{}:{}".format(*listener.getsockname())
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def real_runtime(tmp_path: Path, carbon: str, **overrides) -> Runtime:
    local = tmp_path / "config_local.py"
    local.write_text("")
    settings = load_settings(
        env={"ELECTRICITY_STATE_DIR": str(tmp_path / "state")},
        local_path=local,
        overrides={"CARBON_DESTINATIONS": [carbon], **overrides},
    )
    return Runtime("fake", settings)


def run_until(loop: collector.PollLoop, done) -> None:
    async def scenario() -> None:
        task = asyncio.ensure_future(loop.run())
        deadline = time.monotonic() + 30
        while not done() and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        loop.stopping.set()
        await task

    asyncio.run(scenario())


def spooled_lines(state: Path) -> list[str]:
    found = []
    for segment in sorted(state.rglob("*.spool")):
        found += segment.read_text().splitlines(keepends=True)
    return found


# --- 1. Polling never waits for Carbon -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["blackhole", "connect hangs"])
def test_a_silent_carbon_costs_no_boundary(fault, tmp_path, stand_in):
    with contextlib.ExitStack() as stack:
        if fault == "blackhole":
            carbon = stand_in("blackhole").arg
        else:
            carbon = stack.enter_context(connect_hangs())
        runtime = real_runtime(tmp_path, carbon, CARBON_TIMEOUT_S=3.0)
        source = FakeSource(runtime, {"a": (0, {"power_watts": 1})})
        loop = collector.PollLoop(source, interval_s=0.5)
        try:
            run_until(loop, lambda: len(source.polls) >= 7)
        finally:
            runtime.close()
    stamps = sorted({int(t * 2) for _, t in source.polls[1:]})  # half-second boundaries
    assert len(stamps) >= 6
    assert stamps == list(range(stamps[0], stamps[-1] + 1)), "a boundary was skipped"
    # Every sample is on disk, waiting for Carbon.
    spooled = [line for line in spooled_lines(tmp_path / "state") if ".dev_a." in line]
    assert len(spooled) >= len(source.polls)


# --- 6. A hung device holds no boundary -----------------------------------------


def test_a_pending_device_holds_no_boundary(tmp_path, caplog):
    runtime = real_runtime(tmp_path, "127.0.0.1:9", DEVICE_TIMEOUT_S=10.0)
    runtime.sink = RecordingSink()
    source = FakeSource(runtime, {"live": (0, {"power_watts": 1}), "hung": (60, {"x": 1})})
    loop = collector.PollLoop(source, interval_s=0.5)
    with caplog.at_level(logging.INFO, logger="electricity.fake"):
        run_until(loop, lambda: sum(1 for d, _ in source.polls if d == "live") >= 7)
    live = [int(t * 2) for d, t in source.polls if d == "live"][1:]
    assert live == list(range(live[0], live[-1] + 1)), "the live device missed a boundary"
    # Polled once: no second poll while the first is outstanding; said once.
    assert [d for d, _ in source.polls].count("hung") == 1
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("Dev hung" in m for m in said) == 1, said
    assert not any("overran" in m for m in said)


@pytest.mark.slow
def test_a_device_going_pending_costs_the_others_no_boundary_while_carbon_is_silent(
    tmp_path, stand_in, caplog
):
    """The cycle in which a device goes pending runs until just before the
    next boundary; the sender's settle (HEALTH_SETTLE_S, spent in full while
    Carbon does not confirm) must not push it past (found by bench_soak.py at
    a 1 s interval: the other Tuya plug lost one boundary per hang)."""
    carbon = stand_in("blackhole").arg
    runtime = real_runtime(tmp_path, carbon, DEVICE_TIMEOUT_S=10.0, CARBON_TIMEOUT_S=5.0)
    source = FakeSource(runtime, {"live": (0, {"power_watts": 1}), "hung": (60, {"x": 1})})
    loop = collector.PollLoop(source, interval_s=0.5)
    try:
        with caplog.at_level(logging.INFO, logger="electricity.fake"):
            run_until(loop, lambda: sum(1 for d, _ in source.polls if d == "live") >= 7)
    finally:
        runtime.close()
    live = [int(t * 2) for d, t in source.polls if d == "live"][1:]
    assert live == list(range(live[0], live[-1] + 1)), "the live device missed a boundary"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("overran" in m for m in said), said


# --- 8. A chattering Carbon: the deadline holds while bytes arrive --------------


@pytest.mark.slow
def test_a_chattering_carbon_cannot_hold_a_send(tmp_path, stand_in):
    chatter = stand_in("chatter")
    client = CarbonClient([chatter.address], timeout_s=1, spool=Spool(tmp_path))
    outcome = []
    sender = threading.Thread(target=lambda: outcome.append(client.send_lines(lines(3))))
    sender.start()
    sender.join(15)  # bounded: the old client never returned
    alive = sender.is_alive()
    client.close()
    assert not alive
    assert outcome == [False]
    assert len(client.spool) == 3


# --- 2. A slow Carbon: paced replay that always progresses ------------------------


@pytest.mark.slow
def test_a_slow_carbon_drains_the_spool_without_resending_confirmed_lines(tmp_path, stand_in):
    """~60 KB/s and a 1 s timeout: a 5,000-line batch (~150 KB) can never be
    confirmed whole; small confirmed batches get through, each line once
    (bar the one batch in flight when a timeout hits)."""
    backlog = Spool(tmp_path)
    backlog.append(lines(5000))
    backlog.close()
    slow = stand_in("trickle", rate_bytes_s=60_000)
    client = CarbonClient([slow.address], timeout_s=1, spool=Spool(tmp_path), batch_lines=50_000)
    deadline = time.monotonic() + 60
    while len(client.spool) and time.monotonic() < deadline:
        client.flush_spool()
    client.close()
    assert len(client.spool) == 0
    received = slow.received_lines()
    assert set(received) == set(lines(5000))
    assert len(received) - 5000 <= 2000  # duplicates: unconfirmed batches only


# --- 2. A big backlog does not hold up live lines -----------------------------------


@pytest.mark.slow
def test_live_lines_go_out_before_a_big_backlog(tmp_path, stand_in):
    backlog = Spool(tmp_path / "state" / "fake" / "spool")
    backlog.append(lines(200_000))
    backlog.close()
    carbon = stand_in("forget")  # reads and confirms at once
    runtime = real_runtime(tmp_path, carbon.arg)
    try:
        live = [f"home.live.power_watts 5 {TS + 300_000}\n"]
        assert runtime.deliver(live)  # returns at once: the backlog is the sender's
        assert len(runtime.sink.spool) > 100_000  # deliver did not replay the backlog first
        assert runtime.drain(30)
    finally:
        runtime.close()
    received = carbon.received_lines()
    assert received.index(live[0]) < 2000  # in the first batches, not after 200,000


# --- 17 and 10: the spool's own files only; caps said; bytes not decoded --------


def test_stray_files_are_neither_replayed_nor_deleted(tmp_path):
    (tmp_path / "backup-old.spool").write_text("".join(lines(5)))
    (tmp_path / "000000000007.spool").mkdir()  # a directory named like a segment
    spool = Spool(tmp_path)
    spool.append(lines(3, start=10))
    got = []
    spool.replay(lambda batch: got.extend(batch) or True)
    assert got == lines(3, start=10)
    assert (tmp_path / "backup-old.spool").read_text() == "".join(lines(5))
    assert (tmp_path / "000000000007.spool").is_dir()


def test_cap_drops_are_logged_once_with_counts_and_bytes_are_not_decoded(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    spool = Spool(tmp_path, max_lines=1000, segment_lines=300)
    spool.append(lines(900))
    segment = sorted(tmp_path.glob("0*.spool"))[0]
    with open(segment, "r+b") as handle:
        handle.write(b"home.t.m0 \xff\xfe 1700000000\n"[:29])  # non-ASCII, same length kept
    with caplog.at_level(logging.INFO, logger="graphite"):
        for start in range(900, 1500, 100):
            spool.append(lines(100, start=start))
    assert len(spool) == 1000
    assert spool.dropped_lines == 500
    full = [r.getMessage() for r in caplog.records if "spool full" in r.getMessage()]
    assert len(full) == 1
    assert "dropped" in full[0]
    got = []
    spool.replay(lambda batch: got.extend(batch) or True)
    assert got == lines(1000, start=500)
    assert any("below its cap" in r.getMessage() for r in caplog.records)


def test_disk_full_keeps_lines_in_memory_then_resumes(tmp_path, caplog, monkeypatch):
    """ENOSPC: one clear line, bounded memory, drops counted; back on disk
    once the disk takes writes again."""
    spool = Spool(tmp_path, memory_max_lines=100)
    spool.append(lines(1))
    full = {"on": True}
    real_open = spool._open_append

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def write(self, data):
            if full["on"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

    monkeypatch.setattr(spool, "_open_append", lambda path: FullDisk(real_open(path)))
    spool._close_handle()
    with caplog.at_level(logging.INFO, logger="graphite"):
        for start in range(1, 301, 50):
            assert not spool.append(lines(50, start=start))
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert "No space left" in errors[0].getMessage()
        assert len(spool) == 1 + 100
        assert spool.dropped_lines == 200
        full["on"] = False
        assert spool.append(lines(1, start=400))
    got = []
    spool.replay(lambda batch: got.extend(batch) or True)
    assert got == lines(1) + lines(100, start=201) + lines(1, start=400)
    assert any("writable again" in r.getMessage() for r in caplog.records)


# --- 3 and 5: SIGKILL and power cuts lose nothing -----------------------------


def kasa_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    local = tmp_path / "config_local.py"
    local.write_text("")
    return {
        **os.environ,
        "ELECTRICITY_CONFIG": str(local),
        "ELECTRICITY_STATE_DIR": str(tmp_path / "state"),
        **extra,
    }


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hold", "forget"])
def test_sigkill_loses_nothing_carbon_took(fault, carbon_server, tmp_path, stand_in):
    """``hold``: Carbon reads the batch and never confirms; the collector is
    SIGKILLed mid-send (three times). ``forget``: Carbon confirms and then
    loses its cache, and the collector dies with it (a power cut). Either
    way, every line Carbon read lands in whisper once the collector runs
    again against a healthy carbon-cache."""
    plug = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(0), alias="p")
    bad = stand_in(fault)
    read: set[str] = set()
    with KasaSimulator([plug]) as sim:
        args = ["--host", f"{plug.host}:{sim.port}", "--interval", "1"]
        env = kasa_env(tmp_path, CARBON_TIMEOUT_S="30")
        for _ in range(3 if fault == "hold" else 1):
            process = start_collector("kasa_to_graphite.py", [*args, "--carbon", bad.arg], env)
            try:
                before = len(bad.received)
                deadline = time.monotonic() + 20
                while len(bad.received) - before < 200 and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:
                process.send_signal(signal.SIGKILL)
                process.communicate()
            read.update(bad.received_lines())
        assert read
        process = start_collector(
            "kasa_to_graphite.py", [*args, "--carbon", carbon_arg(carbon_server)], env
        )
        try:
            wanted = {}
            for line in read:
                path, value, stamp = line.split()
                wanted.setdefault(path, {})[int(stamp)] = float(value)

            def all_landed() -> bool:
                for path, points in wanted.items():
                    stored = dict(carbon_server.fetch(path))
                    if any(stored.get(ts) != value for ts, value in points.items()):
                        return False
                return True

            carbon_server.wait_for(all_landed, timeout_s=40, what="every line Carbon read")
        finally:
            assert stop_collector(process) == 0


# --- 4. Push sources acknowledge only what is on disk ----------------------------


@pytest.mark.slow
def test_esp32_readings_answered_200_survive_a_sigkill(carbon_server, tmp_path, stand_in):
    """The receiver answers 200 (the device then forgets the reading) and is
    SIGKILLed before its flush: every acknowledged reading still lands."""
    import http.client
    import json

    from esp32 import pulse_logic as pl
    from tests.test_esp32_receiver import HEADERS, ReceiverProcess, reading

    state = str(tmp_path / "state")
    silent = stand_in("blackhole")
    first = ReceiverProcess(tmp_path, "--carbon", silent.arg, "--state-dir", state)
    now = int(time.time()) - 60
    stamps = []
    try:
        for seq in range(1, 6):
            body = json.dumps(pl.body_for([reading(seq, seq * 7, ts=now + seq)]))
            connection = http.client.HTTPConnection("127.0.0.1", first.port, timeout=10)
            connection.request("POST", "/api/v1/readings", body=body, headers=HEADERS)
            assert connection.getresponse().status == 200
            connection.close()
            stamps.append(now + seq)
    finally:
        first.proc.kill()  # within the flush interval: no chance to flush
        first.proc.wait()
    second = ReceiverProcess(tmp_path, "--carbon", carbon_arg(carbon_server), "--state-dir", state)
    try:
        points = carbon_server.wait_for(
            lambda: [
                p
                for p in [carbon_server.fetch("home.electricity.meter.energy_kwh")]
                if {ts for ts, _ in p} >= set(stamps)
            ],
            timeout_s=30,
            what="every acknowledged reading",
        )[0]
    finally:
        assert second.stop() == 0
    assert [v for ts, v in points if ts in stamps] == pytest.approx(
        [0.007 * s for s in range(1, 6)]
    )


@pytest.mark.slow
def test_mqtt_messages_acknowledged_survive_a_sigkill(
    carbon_server, mosquitto_broker, tmp_path, stand_in
):
    """QoS 1 messages are PUBACKed only once their lines are on disk: a
    SIGKILL right after loses none of them."""
    from simulators.glow import Publisher, SimulatedGlow
    from tests.test_mqtt_collector import GLOW, Collector, carbon_flag

    silent = stand_in("blackhole")
    first = Collector(
        tmp_path, mosquitto_broker.port, f"--carbon={silent.arg}", "-v",
        MQTT_FLUSH_INTERVAL_S="3600", MQTT_HEALTH_INTERVAL_S="3600",
    )  # fmt: skip
    try:
        first.wait_log("subscribed to")
        glow = SimulatedGlow(start=int(time.time()) - 100, gas=False)
        sent = []
        with Publisher(*mosquitto_broker.address) as publisher:
            for step in range(5):
                glow.power_kw = 0.1 * (step + 1)
                publisher.publish_all(glow.step(10))
                sent.append((glow.clock, round(100.0 * (step + 1))))
        first.wait_log("SENSOR/electricitymeter: ok", count=5)
    finally:
        first.kill()
    second = Collector(tmp_path, mosquitto_broker.port, carbon_flag(carbon_server))
    try:
        second.wait_log("subscribed to")
        points = carbon_server.wait_for(
            lambda: [
                p
                for p in [carbon_server.fetch(GLOW + "power_watts")]
                if {ts for ts, _ in p} >= {ts for ts, _ in sent}
            ],
            timeout_s=30,
            what="every acknowledged message",
        )[0]
    finally:
        second.terminate()
    assert sorted(p for p in points if p[0] in dict(sent)) == sorted(sent)


@pytest.mark.slow
def test_sigterm_stops_a_collector_promptly_while_carbon_chatters(tmp_path, stand_in):
    """A send under way to a Carbon that keeps talking is cut at SIGTERM: its
    lines stay in the spool, the collector exits 0 at once."""
    plug = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(0), alias="p")
    chatter = stand_in("chatter")
    with KasaSimulator([plug]) as sim:
        args = ["--host", f"{plug.host}:{sim.port}", "--interval", "1", "--carbon", chatter.arg]
        process = start_collector(
            "kasa_to_graphite.py", args, kasa_env(tmp_path, CARBON_TIMEOUT_S="60")
        )
        try:
            deadline = time.monotonic() + 20
            while not chatter.received and time.monotonic() < deadline:
                time.sleep(0.1)
            assert chatter.received, "no send reached the stand-in"
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=15)  # bounded: it used to hang forever
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 0, stderr
    assert spooled_lines(tmp_path / "state")


# --- 5. The resend window is on disk -------------------------------------------------


def test_the_resend_window_survives_a_restart_and_expires(tmp_path):
    spool = Spool(tmp_path, segment_lines=100)
    spool.append(lines(150))
    while (batch := spool.next_batch(40)) is not None:
        spool.confirm(batch, keep_s=120, keep_max_lines=10_000)
    assert len(spool) == 0
    spool.close()  # or a power cut: cursor.json was saved as batches were confirmed
    reopened = Spool(tmp_path, segment_lines=100)
    assert reopened.rewind(120) == 150  # Carbon may have lost them: sent again
    assert len(reopened) == 150
    assert reopened.backlog() == 0
    got = []
    reopened.replay(lambda batch: got.extend(batch) or True)
    assert got == lines(150)
    assert reopened.rewind(120) == 0  # a replay keeps no window
    assert not list(tmp_path.glob("*.spool"))  # segments out of the window are deleted


def test_a_full_resend_window_keeps_the_newest_lines_not_the_last_confirmed(tmp_path):
    """A rewound backlog is resent after the newest lines (newest segment
    first); once the window is at its cap, those newest lines must not be the
    ones pushed out of it. The 30-minute soak of 2026-12-02 lost one second
    of Kasa lines so: confirmed, pushed out by 100,000 resent lines, then the
    carbon-cache holding them was killed."""
    spool = Spool(tmp_path, segment_lines=100)
    spool.append(lines(300))
    while (batch := spool.next_batch(50)) is not None:
        spool.confirm(batch, keep_s=120, keep_max_lines=300)
    assert spool.rewind(120) == 300  # Carbon stopped answering: all of it again
    newest = lines(20, start=300)
    spool.append(newest)
    confirmed_first = None
    while (batch := spool.next_batch(50, newest_first=True)) is not None:
        confirmed_first = confirmed_first or batch.lines
        spool.confirm(batch, keep_s=120, keep_max_lines=300)
    assert confirmed_first == newest  # then 300 older lines, over the cap
    spool.rewind(120)  # carbon-cache killed before writing its cache
    again: list[str] = []
    spool.replay(lambda batch: again.extend(batch) or True)
    assert set(newest) <= set(again)
    assert len(again) <= 300 + 50  # still bounded by the cap (a batch's rounding)


@pytest.mark.slow
def test_a_cycles_appends_share_one_fsync(tmp_path, stand_in, monkeypatch):
    """With a sender, appends never fsync themselves: the sender syncs what a
    cycle appended once, at most once per interval (SD-card wear)."""
    import spool as spool_module

    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(spool_module.os, "fsync", lambda fd: calls.append(fd) or real_fsync(fd))
    carbon = stand_in("forget")
    client = CarbonClient(
        [carbon.address], timeout_s=2, spool=Spool(tmp_path, fsync_interval_s=3600)
    )
    try:
        for start in range(0, 50, 10):  # one cycle: several devices, then health
            client.submit(lines(10, start=start))
        time.sleep(2.5)  # the sender wakes at least once a second
        assert len(calls) == 1
        for start in range(50, 100, 10):
            client.submit(lines(10, start=start))
        time.sleep(2.5)
        assert len(calls) == 1  # within the interval: not yet
    finally:
        client.close()
    assert len(calls) == 2  # at exit
