"""ESP32 pulse reader: counts the smart meter's LED flashes and posts readings.

MicroPython firmware; README.md beside it covers wiring, flashing and settings
(config.py). The interrupt only records the tick of each edge; the main loop
debounces and counts them (pulse_logic.PulseCounter), takes a reading every
POST_INTERVAL_S, and posts what is buffered to the receiver by its contract
(POST /api/v1/readings), batching and backing off while it is unreachable.
"""

import gc
import json
import sys
import time
from array import array
from binascii import hexlify

import machine
import micropython
import network
import ntptime

try:
    import requests
except ImportError:  # older firmware ships it as urequests
    import urequests as requests

import pulse_logic as pl

FW_VERSION = "pulse-reader/1.0.0"

# Room to format a traceback raised inside the interrupt handler.
micropython.alloc_emergency_exception_buf(128)

# ---- Interrupt side: record the tick of each edge, nothing else. ----------
#
# A ring of preallocated ints, written only by the handler and drained only by
# the main loop. The handler allocates nothing, so it is safe as a hard IRQ.
# At 25 kW and 3200 imp/kWh (22 pulses/s) 512 slots hold over 20 s of pulses,
# longer than any blocking call in the loop (an HTTP post times out first).
RING_SIZE = 512  # a power of two
_RING_MASK = RING_SIZE - 1
_ring = array("i", [0] * RING_SIZE)  # ticks_ms() < 2**30 fits a 32-bit int
_head = 0  # next slot the handler writes
_tail = 0  # next slot the main loop reads
_overruns = 0  # edges lost because the ring was full


def _on_edge(_pin):
    global _head, _overruns
    nxt = (_head + 1) & _RING_MASK
    if nxt == _tail:
        _overruns += 1
        return
    _ring[_head] = time.ticks_ms()
    _head = nxt


def drain_edges(counter):
    """Feed the edges recorded since the last call to counter; how many."""
    global _tail
    head = _head  # read once: the handler may add more while we work
    tail = _tail
    count = 0
    while tail != head:
        counter.on_edge(_ring[tail])
        tail = (tail + 1) & _RING_MASK
        count += 1
    _tail = tail
    return count


def attach_pulse_irq(pin_number, edge, pull):
    pulls = {"up": machine.Pin.PULL_UP, "down": machine.Pin.PULL_DOWN, None: None}
    triggers = {"falling": machine.Pin.IRQ_FALLING, "rising": machine.Pin.IRQ_RISING}
    if pull not in pulls or edge not in triggers:
        raise ValueError(
            "PULSE_PULL must be 'up', 'down' or None; PULSE_EDGE 'falling' or 'rising'"
        )
    pin = machine.Pin(pin_number, machine.Pin.IN, pull=pulls[pull])
    try:
        # A hard IRQ records the tick when the edge happens, even while the
        # interpreter is blocked in a socket call.
        pin.irq(handler=_on_edge, trigger=triggers[edge], hard=True)
    except TypeError:  # firmware without hard IRQs on this port
        pin.irq(handler=_on_edge, trigger=triggers[edge])
    return pin


# ---- Settings ---------------------------------------------------------------


class Settings:
    """config.py with defaults for what it leaves out."""

    REQUIRED = ("WIFI_SSID", "WIFI_PASSWORD", "RECEIVER_URL", "TOKEN")
    DEFAULTS = (
        ("DEVICE_ID", None),
        ("IMP_PER_KWH", 1000),
        ("PULSE_PIN", 27),
        ("PULSE_EDGE", "falling"),
        ("PULSE_PULL", "up"),
        ("MIN_GAP_MS", pl.DEFAULT_MIN_GAP_MS),
        ("POST_INTERVAL_S", 10),
        ("HTTP_TIMEOUT_S", 10),
        ("BUFFER_CAPACITY", 120),
        ("BATCH_MAX", 20),
        ("BACKOFF_BASE_S", 2),
        ("BACKOFF_CAP_S", 300),
        ("WIFI_CONNECT_TIMEOUT_S", 20),
        ("NTP_HOST", None),
        ("NTP_RESYNC_H", 6),
        ("WDT_TIMEOUT_S", 60),
    )

    def __init__(self, module):
        for name in self.REQUIRED:
            if not getattr(module, name, None):
                raise ValueError(f"config.py: {name} is not set")
            setattr(self, name, getattr(module, name))
        for name, default in self.DEFAULTS:
            setattr(self, name, getattr(module, name, default))
        if not self.DEVICE_ID:
            self.DEVICE_ID = "esp32-" + hexlify(machine.unique_id()).decode()


def log(message):
    print(f"[{time.ticks_ms()}] {message}")


# ---- Wi-Fi and clock ----------------------------------------------------------


class Wifi:
    """Keeps the station connected without ever blocking the main loop."""

    def __init__(self, ssid, password, connect_timeout_ms, backoff):
        self.ssid = ssid
        self.password = password
        self.connect_timeout_ms = connect_timeout_ms
        self.backoff = backoff
        self.wlan = network.WLAN(network.STA_IF)
        self.wlan.active(True)
        self.up = False
        self._started_ms = None  # tick of the connect() in progress
        self._next_try_ms = None  # tick before which no connect() is tried

    def poll(self, now_ms):
        """Advance the connection; True when the link has just come (back) up."""
        if self.wlan.isconnected():
            if self.up:
                return False
            self.up = True
            self._started_ms = None
            self.backoff.reset()
            log(f"wifi up: {self.wlan.ifconfig()[0]}")
            return True
        if self.up:
            self.up = False
            log("wifi lost")
        if self._started_ms is not None:
            if pl.ticks_diff(now_ms, self._started_ms) < self.connect_timeout_ms:
                return False  # still connecting
            self._started_ms = None
            delay_ms = self.backoff.next_delay_ms()
            self._next_try_ms = pl.ticks_add(now_ms, delay_ms)
            log(f"wifi connect timed out, next try in {delay_ms} ms")
            try:
                self.wlan.disconnect()
            except OSError:
                pass
            return False
        if self._next_try_ms is None or pl.ticks_diff(now_ms, self._next_try_ms) >= 0:
            try:
                self.wlan.connect(self.ssid, self.password)
            except OSError as e:  # e.g. "Wifi Internal Error" while the driver is busy
                log(f"wifi connect failed: {e!r}")
            self._started_ms = now_ms
        return False

    def rssi(self):
        try:
            return self.wlan.status("rssi")
        except (OSError, ValueError):
            return None


class Clock:
    """Unix time from NTP, None until the first successful sync of this boot."""

    RETRY_MS = 30 * 1000

    def __init__(self, host, resync_ms):
        if host:
            ntptime.host = host
        self.resync_ms = resync_ms
        self.synced = False
        self._next_sync_ms = None  # None: as soon as the network is up
        # Some ports count time.time() from 2000-01-01, others from 1970.
        self._epoch_offset_s = 946684800 if time.gmtime(0)[0] == 2000 else 0

    def poll(self, now_ms, network_up):
        if not network_up:
            return
        if self._next_sync_ms is not None and pl.ticks_diff(now_ms, self._next_sync_ms) < 0:
            return
        try:
            ntptime.settime()  # sets the RTC; blocks at most ntptime.timeout (1 s)
        except (OSError, OverflowError) as e:
            log(f"ntp failed: {e!r}")
            self._next_sync_ms = pl.ticks_add(now_ms, self.RETRY_MS)
            return
        if not self.synced:
            log("clock set from ntp")
        self.synced = True
        self._next_sync_ms = pl.ticks_add(now_ms, self.resync_ms)

    def unix_ts(self):
        if not self.synced:
            return None
        return pl.unix_ts_or_none(time.time() + self._epoch_offset_s)


def post_json(url, token, body, timeout_s):
    """POST body as JSON; the HTTP status, or None when no answer came."""
    data = json.dumps(body)
    headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
    try:
        response = requests.post(url, data=data, headers=headers, timeout=timeout_s)
    except Exception as e:  # OSError mostly; a firmware that runs for years must not die here
        log(f"post failed: {e!r}")
        return None
    try:
        return response.status_code
    finally:
        response.close()  # a leaked socket is never returned to the small pool


# ---- Main loop --------------------------------------------------------------


class PulseReader:
    LOOP_SLEEP_MS = 50

    def __init__(self, settings, wdt=None):
        s = settings
        self.settings = s
        self.wdt = wdt
        now_ms = time.ticks_ms()
        self.counter = pl.PulseCounter(s.MIN_GAP_MS)
        self.uptime = pl.UptimeClock(now_ms)
        self.wifi = Wifi(
            s.WIFI_SSID,
            s.WIFI_PASSWORD,
            int(s.WIFI_CONNECT_TIMEOUT_S * 1000),
            pl.Backoff(int(s.BACKOFF_BASE_S * 1000), int(s.BACKOFF_CAP_S * 1000)),
        )
        # After wlan.active(True): with the radio on, os.urandom is truly random.
        self.boot_id = pl.new_boot_id()
        self.maker = pl.ReadingMaker(s.DEVICE_ID, self.boot_id, s.IMP_PER_KWH, FW_VERSION)
        self.buffer = pl.ReadingBuffer(s.BUFFER_CAPACITY, s.BATCH_MAX)
        self.uplink = pl.Uplink(
            self.buffer, pl.Backoff(int(s.BACKOFF_BASE_S * 1000), int(s.BACKOFF_CAP_S * 1000))
        )
        self.clock = Clock(s.NTP_HOST, int(s.NTP_RESYNC_H * 3600 * 1000))
        self.sampler = pl.Interval(int(s.POST_INTERVAL_S * 1000), now_ms)
        self.pin = None
        self._overruns_logged = 0
        log(f"{FW_VERSION} device {s.DEVICE_ID} boot {self.boot_id}")

    def start(self):
        s = self.settings
        self.pin = attach_pulse_irq(s.PULSE_PIN, s.PULSE_EDGE, s.PULSE_PULL)

    def loop_once(self):
        now_ms = time.ticks_ms()
        self._feed()
        drain_edges(self.counter)
        self.counter.expire(now_ms)
        self.uptime.update(now_ms)
        if self.wifi.poll(now_ms):
            self.uplink.link_restored()
        self.clock.poll(now_ms, self.wifi.up)
        if self.sampler.due(now_ms):
            self._take_reading()
        if self.wifi.up:
            self._post_pending()

    def run_forever(self):
        while True:
            self.loop_once()
            time.sleep_ms(self.LOOP_SLEEP_MS)

    def _feed(self):
        if self.wdt is not None:
            self.wdt.feed()

    def _take_reading(self):
        drain_edges(self.counter)  # count up to this very moment
        reading = self.maker.make(
            self.uptime.update(time.ticks_ms()),
            self.counter.pulses_total,
            ts=self.clock.unix_ts(),
            last_interval_ms=self.counter.last_interval_ms,
            rssi=self.wifi.rssi() if self.wifi.up else None,
        )
        dropped = self.buffer.dropped
        self.buffer.append(reading)
        if self.buffer.dropped != dropped:
            log(f"buffer full: dropped the oldest reading ({self.buffer.dropped} so far)")
        if _overruns != self._overruns_logged:
            self._overruns_logged = _overruns
            log(f"edge ring overran: {_overruns} edges lost so far")

    def _post_pending(self):
        s = self.settings
        now_ms = time.ticks_ms()
        if not self.uplink.ready(now_ms):
            return  # nothing due: no gc.collect() either
        while self.uplink.ready(now_ms):
            batch = self.uplink.batch()
            status = post_json(s.RECEIVER_URL, s.TOKEN, pl.body_for(batch), s.HTTP_TIMEOUT_S)
            now_ms = time.ticks_ms()
            self._feed()
            drain_edges(self.counter)  # keep the ring short during a long backlog
            action = self.uplink.on_result(batch, status, now_ms)
            if action != pl.ACTION_ACK:
                log(f"post of {len(batch)} readings: status {status}, {action}")
            if action == pl.ACTION_RETRY:
                break
        gc.collect()  # after posting, so the heap does not fragment over months


def main():
    # A settings problem stops here, at the REPL, rather than in a reset loop.
    try:
        import config
    except ImportError:
        print("config.py is missing: copy config_example.py to config.py and fill it in")
        return
    try:
        settings = Settings(config)
    except ValueError as e:
        print(e)
        return
    wdt = None
    if settings.WDT_TIMEOUT_S:
        wdt = machine.WDT(timeout=settings.WDT_TIMEOUT_S * 1000)
    reader = PulseReader(settings, wdt)
    reader.start()
    reader.run_forever()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise  # Ctrl-C from mpremote: back to the REPL
    except Exception as e:
        # Anything unexpected: show it on the console, then start afresh.
        sys.print_exception(e)
        time.sleep(10)
        machine.reset()
