"""Pure logic of the ESP32 pulse reader, shared by the firmware and the simulator.

The same file runs on the ESP32 (esp32/main.py, MicroPython) and on CPython
3.9+ (tests, simulators/esp32.py), so it keeps to what both support: no typing
imports, no dataclasses, no annotations, no f-string "=", no I/O. Times are
integer milliseconds from a wrapping tick counter like MicroPython's
time.ticks_ms(); ticks_diff() and ticks_add() reproduce its arithmetic.

Energy is counted, never estimated: every reading carries the cumulative pulse
count since boot, so a lost or dropped reading loses time resolution, not kWh.
"""

import random
from binascii import hexlify

try:
    from os import urandom as _os_urandom
except ImportError:  # some MicroPython ports (e.g. WebAssembly) have no os.urandom
    _os_urandom = None

# MicroPython's ticks_ms() wraps at 2**30 on 32-bit ports such as the ESP32
# (about 12.4 days), and ticks_diff() is only meaningful within half of that.
TICKS_PERIOD = 1 << 30

# Debounce. A house on a 100 A single-phase supply tops out near 23 kW; take
# 25 kW as the plausible maximum. At 3200 imp/kWh (the fastest common meter
# LED) that is 3.6e9 / (3200 * 25000) = 45 ms between pulses; at 1000 imp/kWh,
# 144 ms. Optical and electrical bounce lasts a few ms, so a 30 ms minimum gap
# rejects bounce while never dropping a real pulse. A three-phase supply or a
# faster meter needs a smaller gap: see interval_ms_at_power().
MAX_HOUSE_POWER_WATTS = 25000
DEFAULT_MIN_GAP_MS = 30

# After a day with no pulse, the previous pulse says nothing about power now,
# and much longer gaps would alias once ticks wrap (half period is 6.2 days).
DEFAULT_MAX_IDLE_MS = 24 * 3600 * 1000

# Unix time before 2020-01-01 means the clock was never set (NTP not synced).
MIN_VALID_UNIX_TS = 1577836800

MS_PER_HOUR = 3600 * 1000


def ticks_diff(new, old, period=TICKS_PERIOD):
    """Signed ms from old to new on a counter wrapping at period (a power of two).

    Same result as MicroPython's time.ticks_diff(new, old): correct as long as
    the true difference is within +-period/2.
    """
    half = period >> 1
    return ((new - old + half) & (period - 1)) - half


def ticks_add(ticks, delta_ms, period=TICKS_PERIOD):
    """ticks + delta_ms, wrapped like MicroPython's time.ticks_add()."""
    return (ticks + delta_ms) & (period - 1)


def power_watts_from_interval(imp_per_kwh, interval_ms):
    """Power in watts from the time between two pulses.

    One pulse is 1/imp_per_kwh kWh = 3.6e6/imp_per_kwh joules, so
    P = 3.6e6 / (imp_per_kwh * seconds) = 3.6e9 / (imp_per_kwh * ms).
    """
    if imp_per_kwh <= 0 or interval_ms <= 0:
        raise ValueError("imp_per_kwh and interval_ms must be positive")
    return 3.6e9 / (imp_per_kwh * interval_ms)


def interval_ms_at_power(imp_per_kwh, power_watts):
    """Milliseconds between pulses at a steady power_watts (the inverse)."""
    if imp_per_kwh <= 0 or power_watts <= 0:
        raise ValueError("imp_per_kwh and power_watts must be positive")
    return 3.6e9 / (imp_per_kwh * power_watts)


def energy_kwh_from_pulses(pulses, imp_per_kwh):
    if imp_per_kwh <= 0:
        raise ValueError("imp_per_kwh must be positive")
    return pulses / imp_per_kwh


class PulseCounter:
    """Debounced pulse counting from edge timestamps (ticks_ms).

    on_edge() is fed the tick of every edge the interrupt saw; an edge closer
    than min_gap_ms to the last accepted pulse is bounce and is ignored.
    """

    def __init__(self, min_gap_ms=DEFAULT_MIN_GAP_MS, period=TICKS_PERIOD):
        if min_gap_ms < 0:
            raise ValueError("min_gap_ms must not be negative")
        self.min_gap_ms = min_gap_ms
        self.period = period
        self.pulses_total = 0  # accepted pulses since boot
        self.bounces_rejected = 0
        self.last_interval_ms = None  # ms between the last two pulses
        self.last_pulse_ms = None  # tick of the last accepted pulse

    def on_edge(self, tick_ms):
        """Count the edge at tick_ms unless it is bounce; True if counted."""
        last = self.last_pulse_ms
        if last is not None:
            gap_ms = ticks_diff(tick_ms, last, self.period)
            # A negative gap (an edge older than the last pulse) is not a pulse either.
            if gap_ms < self.min_gap_ms:
                self.bounces_rejected += 1
                return False
            self.last_interval_ms = gap_ms
        self.last_pulse_ms = tick_ms
        self.pulses_total += 1
        return True

    def expire(self, now_ms, max_idle_ms=DEFAULT_MAX_IDLE_MS):
        """Forget the last pulse time after max_idle_ms without a pulse.

        Call it regularly (the main loop does): the next interval is then not
        measured across a gap so long that the tick counter could alias.
        """
        last = self.last_pulse_ms
        if last is not None and ticks_diff(now_ms, last, self.period) >= max_idle_ms:
            self.last_pulse_ms = None
            return True
        return False


class UptimeClock:
    """Milliseconds since boot that keep counting past the tick wrap.

    update() must be called at least once per period/2 (6.2 days on ESP32).
    """

    def __init__(self, start_ticks_ms, period=TICKS_PERIOD):
        self.period = period
        self._last_ticks = start_ticks_ms
        self.uptime_ms = 0

    def update(self, now_ticks_ms):
        step = ticks_diff(now_ticks_ms, self._last_ticks, self.period)
        if step > 0:
            self.uptime_ms += step
            self._last_ticks = now_ticks_ms
        return self.uptime_ms


class Interval:
    """A fixed cadence on ticks: due() is True once per interval_ms.

    After a long stall it skips the missed slots instead of firing in a burst.
    """

    def __init__(self, interval_ms, start_ms, period=TICKS_PERIOD):
        if interval_ms <= 0:
            raise ValueError("interval_ms must be positive")
        self.interval_ms = interval_ms
        self.period = period
        self.next_ms = ticks_add(start_ms, interval_ms, period)

    def due(self, now_ms):
        late_ms = ticks_diff(now_ms, self.next_ms, self.period)
        if late_ms < 0:
            return False
        if late_ms >= self.interval_ms:
            self.next_ms = ticks_add(now_ms, self.interval_ms, self.period)
        else:
            self.next_ms = ticks_add(self.next_ms, self.interval_ms, self.period)
        return True


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def make_reading(
    device_id,
    boot_id,
    seq,
    uptime_ms,
    imp_per_kwh,
    pulses_total,
    ts=None,
    last_interval_ms=None,
    rssi=None,
    fw=None,
):
    """One reading as the receiver's contract (POST /api/v1/readings) wants it.

    Optional fields are left out rather than sent as null.
    """
    if not isinstance(device_id, str) or not device_id:
        raise ValueError("device_id must be a non-empty string")
    if not isinstance(boot_id, str) or not boot_id:
        raise ValueError("boot_id must be a non-empty string")
    _check_int("seq", seq, 1)
    _check_int("uptime_ms", uptime_ms, 0)
    _check_int("pulses_total", pulses_total, 0)
    if isinstance(imp_per_kwh, bool) or not imp_per_kwh > 0:
        raise ValueError("imp_per_kwh must be positive")
    reading = {
        "device_id": device_id,
        "boot_id": boot_id,
        "seq": seq,
        "uptime_ms": uptime_ms,
        "imp_per_kwh": imp_per_kwh,
        "pulses_total": pulses_total,
    }
    if ts is not None:
        _check_int("ts", ts, MIN_VALID_UNIX_TS)
        reading["ts"] = ts
    if last_interval_ms is not None:
        _check_int("last_interval_ms", last_interval_ms, 1)
        reading["last_interval_ms"] = last_interval_ms
    if rssi is not None:
        _check_int("rssi", rssi, -200)
        reading["rssi"] = rssi
    if fw is not None:
        reading["fw"] = fw
    return reading


class ReadingMaker:
    """Builds readings for one boot, numbering them 1, 2, 3... (never reused).

    A new boot gets a new ReadingMaker with a new boot_id, so (device_id,
    boot_id, seq) never repeats and the receiver can ignore retried posts.
    """

    def __init__(self, device_id, boot_id, imp_per_kwh, fw=None):
        self.device_id = device_id
        self.boot_id = boot_id
        self.imp_per_kwh = imp_per_kwh
        self.fw = fw
        self.seq = 0  # seq of the last reading made

    def make(self, uptime_ms, pulses_total, ts=None, last_interval_ms=None, rssi=None):
        reading = make_reading(
            self.device_id,
            self.boot_id,
            self.seq + 1,
            uptime_ms,
            self.imp_per_kwh,
            pulses_total,
            ts,
            last_interval_ms,
            rssi,
            self.fw,
        )
        self.seq += 1  # only once the reading is valid, so no seq is skipped
        return reading


def unix_ts_or_none(seconds):
    """Whole unix seconds, or None while the clock is plainly not set."""
    if seconds is None or seconds < MIN_VALID_UNIX_TS:
        return None
    return int(seconds)


class ReadingBuffer:
    """Readings waiting to be posted, oldest first, at most capacity of them.

    When full, the oldest reading is dropped (counted in dropped): pulses_total
    is cumulative, so the newer readings still carry all the energy. A buffer
    holds one boot's readings (it lives in RAM), so seq orders them.
    """

    def __init__(self, capacity=120, batch_max=20):
        if capacity < 1 or batch_max < 1:
            raise ValueError("capacity and batch_max must be at least 1")
        self.capacity = capacity
        self.batch_max = batch_max
        self.dropped = 0
        self._items = []

    def __len__(self):
        return len(self._items)

    def append(self, reading):
        if len(self._items) >= self.capacity:
            self._items.pop(0)
            self.dropped += 1
        self._items.append(reading)

    def batch(self):
        """The oldest readings, at most batch_max, left in place until ack()."""
        return self._items[: self.batch_max]

    def ack(self, batch):
        """Remove the readings of batch (and anything older) once posted."""
        if not batch:
            return
        last_seq = batch[-1]["seq"]
        self._items = [r for r in self._items if r["seq"] > last_seq]

    def shrink_batch(self):
        """Halve batch_max (the receiver said 413: body too large)."""
        self.batch_max = max(1, self.batch_max // 2)
        return self.batch_max

    def clear(self):
        self._items = []


def body_for(readings):
    """The POST body: a single reading as is, several as {"readings": [...]}."""
    if not readings:
        raise ValueError("nothing to post")
    if len(readings) == 1:
        return readings[0]
    return {"readings": list(readings)}


def random_fraction():
    """A float in [0, 1); random.getrandbits is in every MicroPython build."""
    return random.getrandbits(24) / 16777216.0


class Backoff:
    """Exponential backoff with jitter and a cap.

    The n-th delay (from 0) is min(cap_ms, base_ms * factor**n), reduced by a
    random fraction of at most jitter, so retries of many devices spread out.
    """

    def __init__(self, base_ms=1000, cap_ms=300000, factor=2, jitter=0.5, rand=None):
        if base_ms <= 0 or cap_ms < base_ms or factor < 1 or not 0 <= jitter <= 1:
            raise ValueError("need 0 < base_ms <= cap_ms, factor >= 1, 0 <= jitter <= 1")
        self.base_ms = base_ms
        self.cap_ms = cap_ms
        self.factor = factor
        self.jitter = jitter
        self._rand = rand if rand is not None else random_fraction
        self.reset()

    def reset(self):
        self.attempts = 0
        self._raw_ms = self.base_ms

    def next_delay_ms(self):
        raw_ms = self._raw_ms
        # Grow the stored value, not an exponent, so it never overflows.
        self._raw_ms = min(self.cap_ms, raw_ms * self.factor)
        self.attempts += 1
        return int(raw_ms * (1.0 - self.jitter * self._rand()))


ACTION_ACK = "ack"  # posted: forget these readings
ACTION_DROP = "drop"  # the receiver will never take this body: forget it, count it
ACTION_SHRINK = "shrink"  # body too large: retry now with smaller batches
ACTION_RETRY = "retry"  # network error or server trouble: keep and retry later


def response_action(status, batch_len):
    """What to do with a batch after a POST answered status (None: no answer)."""
    if status is None:
        return ACTION_RETRY
    if 200 <= status < 300:
        return ACTION_ACK
    if status == 413:
        return ACTION_SHRINK if batch_len > 1 else ACTION_DROP
    if status in (400, 415):
        # Retrying a body the receiver calls malformed would block the queue
        # forever; later readings still carry the cumulative pulse count.
        return ACTION_DROP
    # 401 (a token fixed on the server), 404, 429, 5xx: keep the readings.
    return ACTION_RETRY


class Uplink:
    """Posting policy over a ReadingBuffer: batches, retries and backoff.

    The caller does the I/O:
        while uplink.ready(now_ms):
            batch = uplink.batch()
            status = post(body_for(batch))  # None when there was no answer
            if uplink.on_result(batch, status, now_ms) == ACTION_RETRY:
                break
    """

    def __init__(self, buffer, backoff, period=TICKS_PERIOD):
        self.buffer = buffer
        self.backoff = backoff
        self.period = period
        self.posts_ok = 0
        self.posts_failed = 0
        self.rejected = 0  # readings the receiver refused for good (400, 413, 415)
        self.retry_at_ms = None  # tick before which no post is tried

    def ready(self, now_ms):
        if len(self.buffer) == 0:
            return False
        return self.retry_at_ms is None or ticks_diff(now_ms, self.retry_at_ms, self.period) >= 0

    def batch(self):
        return self.buffer.batch()

    def on_result(self, batch, status, now_ms):
        action = response_action(status, len(batch))
        if action == ACTION_RETRY:
            self.posts_failed += 1
            self.retry_at_ms = ticks_add(now_ms, self.backoff.next_delay_ms(), self.period)
            return action
        # The receiver answered: whatever it said, the link works.
        self.backoff.reset()
        self.retry_at_ms = None
        if action == ACTION_SHRINK:
            self.buffer.shrink_batch()
        else:
            if action == ACTION_ACK:
                self.posts_ok += 1
            else:
                self.rejected += len(batch)
            self.buffer.ack(batch)
        return action

    def link_restored(self):
        """Wi-Fi is back: post at once instead of waiting out the backoff."""
        self.backoff.reset()
        self.retry_at_ms = None


def new_boot_id(nbytes=8, urandom=None):
    """A random hex id for this boot (2 * nbytes characters).

    On the ESP32 os.urandom is the hardware RNG, truly random once the radio
    is on, which is why the firmware makes the boot id after enabling Wi-Fi.
    """
    source = urandom if urandom is not None else _os_urandom
    if source is not None:
        raw = source(nbytes)
    else:
        raw = bytes([random.getrandbits(8) for _ in range(nbytes)])
    return hexlify(raw).decode()


def self_check():
    """Quick checks of this module, runnable on the device or any MicroPython.

    mpremote exec "import pulse_logic; print(pulse_logic.self_check())"
    """
    p = TICKS_PERIOD
    assert ticks_diff(5, p - 5) == 10
    assert ticks_diff(p - 5, 5) == -10
    assert ticks_add(p - 1, 2) == 1
    assert power_watts_from_interval(1000, 3600) == 1000.0
    assert power_watts_from_interval(3200, 45) == 25000.0
    assert interval_ms_at_power(3200, MAX_HOUSE_POWER_WATTS) > DEFAULT_MIN_GAP_MS

    counter = PulseCounter(30)
    for tick in (p - 10, p - 8, p - 2, 15, 30, 1000):  # bounce, across the wrap
        counter.on_edge(tick)
    assert counter.pulses_total == 3, counter.pulses_total
    assert counter.bounces_rejected == 3
    assert counter.last_interval_ms == 970

    clock = UptimeClock(p - 100)
    clock.update(50)
    assert clock.update(150) == 250

    buf = ReadingBuffer(capacity=3, batch_max=2)
    maker = ReadingMaker("dev", new_boot_id(), 1000)
    for i in range(5):
        buf.append(maker.make(i * 1000, i))
    assert len(buf) == 3
    assert buf.dropped == 2
    batch = buf.batch()
    assert [r["seq"] for r in batch] == [3, 4]
    assert body_for(batch) == {"readings": batch}
    buf.ack(batch)
    assert [r["seq"] for r in buf.batch()] == [5]

    backoff = Backoff(100, 1000, 2, 0.5, rand=lambda: 0.0)
    assert [backoff.next_delay_ms() for _ in range(6)] == [100, 200, 400, 800, 1000, 1000]

    uplink = Uplink(ReadingBuffer(10, 4), Backoff(1000, 8000, rand=lambda: 0.0))
    for i in range(6):
        uplink.buffer.append(maker.make(i, i))
    assert uplink.on_result(uplink.batch(), None, 0) == ACTION_RETRY
    assert not uplink.ready(999)
    assert uplink.ready(1000)
    assert uplink.on_result(uplink.batch(), 413, 1000) == ACTION_SHRINK
    assert uplink.on_result(uplink.batch(), 200, 1000) == ACTION_ACK
    assert len(uplink.buffer) == 4
    assert len(new_boot_id()) == 16
    return True
