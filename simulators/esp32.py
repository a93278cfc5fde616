"""A simulated ESP32 pulse reader that posts readings by the receiver's HTTP contract.

It runs esp32/pulse_logic.py, the logic the firmware runs: the same debounce,
reading numbering, buffering, batching, response handling and backoff. Only
the hardware is simulated: a meter LED flashing at the rate a settable house
load gives, on a simulated clock. step() advances that clock without sleeping,
so hours of pulses take milliseconds; run() paces it in real time for a demo.

    sim = SimulatedEsp32("http://127.0.0.1:8080/api/v1/readings", "token", "esp32-sim")
    sim.power_watts = 2500
    sim.step(60)  # six readings posted
    sim.energy_kwh_expected  # what the receiver should now show

Posts go only to loopback (127.0.0.0/8 or localhost), through urllib with
proxies and redirects turned off, so nothing leaves the machine.
"""

from __future__ import annotations

import collections
import http.client
import ipaddress
import json
import math
import random
import threading
import time
import urllib.error
import urllib.request
from typing import NamedTuple
from urllib.parse import urlsplit

from esp32 import pulse_logic as pl

FW_VERSION = "pulse-reader-sim/1.0.0"


def check_loopback_url(url: str) -> None:
    """Raise ValueError unless url is plain HTTP to a loopback host."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are simulated, got {url!r}")
    host = parts.hostname or ""
    if host == "localhost":
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"refusing non-loopback host {host!r}: use 127.0.0.x") from None
    if address.version != 4 or not address.is_loopback:
        raise ValueError(f"refusing non-loopback host {host!r}: use 127.0.0.x")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could point off loopback; the real device does not follow them either.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class SimClock:
    """Simulated unix time, advanced by the SimulatedEsp32 that owns it."""

    def __init__(self, unix_s: float | None = None) -> None:
        self.unix_s = time.time() if unix_s is None else float(unix_s)

    def time(self) -> float:
        return self.unix_s

    def advance(self, seconds: float) -> None:
        self.unix_s += seconds


class PostRecord(NamedTuple):
    """One POST the device made (or meant to make)."""

    body: bytes
    status: int | None  # the receiver's answer; None when it got no answer
    sent: bool  # False for a post lost on the way (drop_next_posts)


class SimulatedEsp32:
    """An ESP32 on a meter's LED: pulses from a load in watts, readings over HTTP.

    One SimClock per device: step() advances it. Knobs for tests: reboot(),
    drop_next_posts(), drop_next_responses(), duplicate_next_post(),
    ntp_synced.
    """

    def __init__(
        self,
        url: str,
        token: str,
        device_id: str,
        imp_per_kwh: float = 1000,
        clock: SimClock | None = None,
        *,
        power_watts: float = 0.0,
        post_interval_s: float = 10.0,
        timeout_s: float = 5.0,
        min_gap_ms: int = pl.DEFAULT_MIN_GAP_MS,
        buffer_capacity: int = 120,
        batch_max: int = 20,
        backoff_base_s: float = 2.0,
        backoff_cap_s: float = 300.0,
        backoff_jitter: float = 0.5,
        bounce_edges: int = 0,
        start_ticks_ms: int = 0,
        ntp_synced: bool = True,
        rssi: int | None = -60,
        fw: str | None = FW_VERSION,
        seed: int | None = None,
        history_size: int = 1000,
    ) -> None:
        check_loopback_url(url)
        if post_interval_s <= 0 or timeout_s <= 0:
            raise ValueError("post_interval_s and timeout_s must be positive")
        self.url = url
        self.token = token
        self.device_id = device_id
        self.imp_per_kwh = imp_per_kwh
        self.clock = clock if clock is not None else SimClock()
        self.post_interval_s = post_interval_s
        self.timeout_s = timeout_s
        self.min_gap_ms = min_gap_ms
        self.buffer_capacity = buffer_capacity
        self.batch_max = batch_max
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.backoff_jitter = backoff_jitter
        self.bounce_edges = bounce_edges  # extra edges 1 ms apart after each pulse
        self.ntp_synced = ntp_synced
        self.rssi = rssi
        self.fw = fw
        self.history: collections.deque[PostRecord] = collections.deque(maxlen=history_size)

        self._rng = random.Random(seed)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
        self._lock = threading.RLock()
        self._power_watts = 0.0
        self.power_watts = power_watts

        self._t_s = 0.0  # simulated seconds since construction
        self._phase = 0.0  # progress towards the next LED pulse, in pulses
        self._powered = True
        self.pulses_generated = 0  # every flash of the LED, counted or not
        self._load_kwh = 0.0
        self._pulses_counted_prev_boots = 0
        self._pulses_delivered_prev_boots = 0
        self.boots = 0
        self._start_boot(start_ticks_ms)

    # ---- the load --------------------------------------------------------

    @property
    def power_watts(self) -> float:
        return self._power_watts

    @power_watts.setter
    def power_watts(self, watts: float) -> None:
        if not (math.isfinite(watts) and watts >= 0):
            raise ValueError(f"power_watts must be finite and >= 0, got {watts!r}")
        with self._lock:
            self._power_watts = float(watts)

    # ---- what a test compares with ---------------------------------------

    @property
    def energy_kwh_expected(self) -> float:
        """Energy the receiver should show: the last pulses_total it accepted
        (answered 2xx) in each boot, counted from 0 at the boot, / imp_per_kwh."""
        pulses = self._pulses_delivered_prev_boots + self._pulses_delivered
        return pl.energy_kwh_from_pulses(pulses, self.imp_per_kwh)

    @property
    def energy_kwh_counted(self) -> float:
        """Energy in every pulse the device counted, posted or not."""
        pulses = self._pulses_counted_prev_boots + self.counter.pulses_total
        return pl.energy_kwh_from_pulses(pulses, self.imp_per_kwh)

    @property
    def energy_kwh_load(self) -> float:
        """The true energy of the simulated load (the pulses lag it by < 1 pulse)."""
        return self._load_kwh

    @property
    def boot_id(self) -> str:
        return self.maker.boot_id

    @property
    def seq(self) -> int:
        """seq of the last reading made in this boot (0: none yet)."""
        return self.maker.seq

    @property
    def ticks_ms(self) -> int:
        """The device's time.ticks_ms() now (wraps at 2**30, restarts at boot)."""
        return pl.ticks_add(self._boot_ticks_ms, self._elapsed_ms())

    # ---- knobs -----------------------------------------------------------

    def reboot(self, downtime_s: float = 0.0) -> None:
        """Restart the device: new boot_id, counter and seq from zero, buffer lost.

        Readings still in the buffer are lost with the RAM, as on the device
        (call flush() first to keep them); pulses during downtime_s are not
        counted, though the meter goes on flashing.
        """
        with self._lock:
            self._pulses_counted_prev_boots += self.counter.pulses_total
            self._pulses_delivered_prev_boots += self._pulses_delivered
            if downtime_s > 0:
                self._powered = False
                try:
                    self.step(downtime_s)
                finally:
                    self._powered = True
            self._start_boot(0)  # ticks_ms restarts at boot

    def drop_next_posts(self, count: int = 1) -> None:
        """Lose the next count posts on the way: the readings stay buffered."""
        with self._lock:
            self._drop_posts += count

    def drop_next_responses(self, count: int = 1) -> None:
        """The receiver gets the next count posts but the device sees no answer,
        so it retries them later (inside the next batch)."""
        with self._lock:
            self._drop_responses += count

    def duplicate_next_post(self) -> None:
        """Send the next post twice, byte for byte (a retry after a lost answer)."""
        with self._lock:
            self._duplicate_next = True

    # ---- running ---------------------------------------------------------

    def step(self, seconds: float) -> None:
        """Advance simulated time by seconds: pulses, readings and posts happen
        at their exact simulated times; nothing sleeps."""
        if seconds < 0:
            raise ValueError("cannot step back in time")
        with self._lock:
            end_s = self._t_s + seconds
            while True:
                pulse_s = self._next_pulse_s()
                sample_s = self._next_sample_s if self._powered else math.inf
                retry_s = self._retry_s() if self._powered else math.inf
                event_s = min(pulse_s, sample_s, retry_s)
                if event_s > end_s:
                    break
                self._advance_to(event_s)
                if event_s == pulse_s:
                    self._pulse()
                elif event_s == sample_s:
                    # Like the firmware's loop: the reading first, then the post,
                    # so a retry falling due at the same moment carries it too.
                    self._samples_taken += 1
                    self._next_sample_s = self._sample_time_s(self._samples_taken + 1)
                    self._take_reading()
                    self._post_pending()
                else:
                    self._post_pending()
            self._advance_to(end_s)

    def flush(self) -> bool:
        """Take a reading now and post everything, ignoring the backoff (a test
        convenience the firmware lacks); True when nothing is left buffered."""
        with self._lock:
            self.uplink.link_restored()
            self._take_reading()
            self._post_pending()
            return len(self.buffer) == 0

    def run(
        self,
        duration_s: float,
        real_time: bool = True,
        tick_s: float = 1.0,
        stop: threading.Event | None = None,
    ) -> None:
        """Run for duration_s simulated seconds, paced by the wall clock if
        real_time (for the demo), until stop is set."""
        if not real_time:
            self.step(duration_s)
            return
        started = time.monotonic()
        done_s = 0.0
        while done_s < duration_s and not (stop is not None and stop.is_set()):
            target_s = min(duration_s, done_s + tick_s)
            wait_s = started + target_s - time.monotonic()
            if wait_s > 0:
                if stop is not None:
                    stop.wait(wait_s)
                else:
                    time.sleep(wait_s)
            self.step(target_s - done_s)
            done_s = target_s

    def stats(self) -> dict:
        """Counters of the current boot, for tests and the demo."""
        return {
            "boot_id": self.boot_id,
            "seq": self.seq,
            "pulses_total": self.counter.pulses_total,
            "bounces_rejected": self.counter.bounces_rejected,
            "buffered": len(self.buffer),
            "readings_dropped": self.buffer.dropped,
            "readings_rejected": self.uplink.rejected,
            "posts_ok": self.uplink.posts_ok,
            "posts_failed": self.uplink.posts_failed,
        }

    # ---- inside the device -------------------------------------------------

    def _start_boot(self, ticks_ms: int) -> None:
        self.boots += 1
        self._boot_t_s = self._t_s
        self._boot_ticks_ms = ticks_ms & (pl.TICKS_PERIOD - 1)
        self.counter = pl.PulseCounter(self.min_gap_ms)
        self.uptime = pl.UptimeClock(self._boot_ticks_ms)
        boot_id = pl.new_boot_id(urandom=self._rng.randbytes)
        self.maker = pl.ReadingMaker(self.device_id, boot_id, self.imp_per_kwh, self.fw)
        self.buffer = pl.ReadingBuffer(self.buffer_capacity, self.batch_max)
        backoff = pl.Backoff(
            int(self.backoff_base_s * 1000),
            int(self.backoff_cap_s * 1000),
            jitter=self.backoff_jitter,
            rand=self._rng.random,
        )
        self.uplink = pl.Uplink(self.buffer, backoff)
        self._samples_taken = 0
        self._next_sample_s = self._sample_time_s(1)
        self._pulses_delivered = 0
        self._drop_posts = 0
        self._drop_responses = 0
        self._duplicate_next = False

    def _rate_per_s(self) -> float:
        return self._power_watts * self.imp_per_kwh / 3.6e6

    def _next_pulse_s(self) -> float:
        rate = self._rate_per_s()
        if rate <= 0:
            return math.inf
        return self._t_s + max(0.0, 1.0 - self._phase) / rate

    # Event times are computed from the boot, not accumulated, so that events
    # due at the same moment compare equal in floating point.
    def _elapsed_ms(self) -> int:
        return int((self._t_s - self._boot_t_s) * 1000 + 1e-6)

    def _sample_time_s(self, index: int) -> float:
        return self._boot_t_s + index * self.post_interval_s

    def _retry_s(self) -> float:
        if len(self.buffer) == 0 or self.uplink.retry_at_ms is None:
            return math.inf
        wait_ms = pl.ticks_diff(self.uplink.retry_at_ms, self.ticks_ms)
        return self._boot_t_s + (self._elapsed_ms() + max(wait_ms, 0)) / 1000.0

    def _advance_to(self, t_s: float) -> None:
        dt_s = t_s - self._t_s
        if dt_s <= 0:
            return
        self._phase += self._rate_per_s() * dt_s
        self._load_kwh += self._power_watts * dt_s / 3.6e6
        self.clock.advance(dt_s)
        self._t_s = t_s

    def _pulse(self) -> None:
        self._phase = 0.0
        self.pulses_generated += 1
        if not self._powered:
            return
        tick = self.ticks_ms
        self.counter.on_edge(tick)
        for i in range(self.bounce_edges):
            self.counter.on_edge(pl.ticks_add(tick, i + 1))

    def _take_reading(self) -> None:
        now_ms = self.ticks_ms
        self.counter.expire(now_ms)
        ts = pl.unix_ts_or_none(self.clock.time()) if self.ntp_synced else None
        reading = self.maker.make(
            self.uptime.update(now_ms),
            self.counter.pulses_total,
            ts=ts,
            last_interval_ms=self.counter.last_interval_ms,
            rssi=self.rssi,
        )
        self.buffer.append(reading)

    def _post_pending(self) -> None:
        # The firmware's PulseReader._post_pending, with the network simulated.
        now_ms = self.ticks_ms
        while self.uplink.ready(now_ms):
            batch = self.uplink.batch()
            body = json.dumps(pl.body_for(batch), separators=(",", ":")).encode()
            status = self._send(body, batch)
            if self.uplink.on_result(batch, status, now_ms) == pl.ACTION_RETRY:
                break

    def _send(self, body: bytes, batch: list[dict]) -> int | None:
        if self._drop_posts > 0:
            self._drop_posts -= 1
            self.history.append(PostRecord(body, None, False))
            return None
        status = self._http_post(body, batch)
        if self._duplicate_next:
            self._duplicate_next = False
            status = self._http_post(body, batch)
        if self._drop_responses > 0 and status is not None:
            self._drop_responses -= 1
            return None
        return status

    def _http_post(self, body: bytes, batch: list[dict]) -> int | None:
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                response.read()
                status = response.status
        except urllib.error.HTTPError as e:
            status = e.code
            e.close()
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            status = None
        self.history.append(PostRecord(body, status, True))
        if status is not None and 200 <= status < 300:
            delivered = max(r["pulses_total"] for r in batch)
            self._pulses_delivered = max(self._pulses_delivered, delivered)
        return status
