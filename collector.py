"""What every collector shares: flags, logging, settings, names, sending,
health metrics, signals, the systemd watchdog, and the aligned poll loop.

A polling source (Kasa, Tuya, circuits) subclasses ``Collector`` with its
own ``discover`` and ``poll``; ``main(MyCollector)`` does the rest. A push
source (ESP32, MQTT) builds a ``Runtime`` and feeds a ``LineBatcher``.

Exit status (docs/design.md): 0 every metric delivered; 1 Carbon unreachable, the
metrics kept in the spool; 2 bad settings or flags; 3 no device answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from graphite_helper import (
    CarbonClient,
    InvalidMetric,
    Spool,
    format_line,
    metric_path,
)
from settings import SECRET_SETTINGS, ConfigError, load_settings, parse_host_port
from state import NameMap, StateLock, prepare_state_dir, state_dir_error

EXIT_OK = 0
EXIT_UNDELIVERED = 1
EXIT_CONFIG = 2
EXIT_NO_DEVICE = 3

# Health lines report the spool after waiting this long for the lines just
# handed over (with Carbon answering they are confirmed within milliseconds).
HEALTH_SETTLE_S = 0.2

# While a device is failing, look for it again this often (it may have a new
# DHCP lease) instead of waiting for the regular re-discovery.
EARLY_REDISCOVER_S = 60.0

log = logging.getLogger("collector")


# --- Logging and systemd ------------------------------------------------------


class _JournalFormatter(logging.Formatter):
    """Under systemd: a ``<N>`` priority prefix journald understands, and no
    timestamp (journald adds its own)."""

    PRIORITIES: ClassVar[dict[int, int]] = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITIES.get(record.levelno, 6)}>{super().format(record)}"


# --- Keeping secrets out of logs -----------------------------------------------


class SecretFilter(logging.Filter):
    """Replaces known secrets with ``<key>`` in every record a handler emits.

    Defence in depth: nothing here logs a secret on purpose, but libraries
    (tinytuya's debug lines, an exception quoting a URL) might. Values under
    8 characters are not scrubbed: they would mangle ordinary words.
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, secrets: Iterable[str]) -> None:
        self.secrets.update(s for s in secrets if s and len(s) >= 8)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<key>")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the logging module's to report
            return True
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


_secret_filter = SecretFilter()


def protect_secrets(secrets: Iterable[str]) -> None:
    """Scrub these values from every line the root logger's handlers emit."""
    _secret_filter.add(secrets)
    for handler in logging.getLogger().handlers:
        if _secret_filter not in handler.filters:
            handler.addFilter(_secret_filter)


def redact_secrets(text: str) -> str:
    """``text`` with every protected secret replaced."""
    return _secret_filter.redact(text)


def configured_secrets(settings: Any) -> list[str]:
    """The values of the secret settings (passwords, tokens), however nested."""
    found: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    for name in SECRET_SETTINGS:
        collect(getattr(settings, name.lower(), None))
    return found


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr (stdout is for --dry-run lines and --discover tables)."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_secret_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries chatter at INFO/DEBUG about every retry; keep it out unless -v.
    if level.upper() != "DEBUG":
        for noisy in ("kasa", "tinytuya", "pymodbus", "waitress", "werkzeug"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify units) READY=1, WATCHDOG=1, STOPPING=1.

    A no-op outside systemd. Written here rather than depending on a package:
    it is one datagram on the socket systemd names.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode("ascii"))
        return True
    except OSError as exc:
        log.debug("sd_notify %s failed: %s", message, exc)
        return False


# A unit's WatchdogSec restarts a collector that has not delivered or spooled
# its lines for that long. A collector whose cycles are further apart than the
# unit allows (a long PLUG_INTERVAL_S) asks systemd for more time instead of
# being killed while healthy (WATCHDOG_USEC=, systemd 236 and later).
WATCHDOG_MISSED_CYCLES = 3
WATCHDOG_SLACK_S = 60.0


def watchdog_timeout_needed_s(cycle_s: float) -> float:
    """The watchdog timeout a collector pinging every ``cycle_s`` needs."""
    return WATCHDOG_MISSED_CYCLES * cycle_s + WATCHDOG_SLACK_S


def ensure_watchdog_covers(cycle_s: float) -> bool:
    """Extend systemd's watchdog if it is too short for ``cycle_s`` between pings.

    Returns True when an extension was asked for. A no-op outside systemd or
    without a watchdog.
    """
    configured = os.environ.get("WATCHDOG_USEC", "")
    owner = os.environ.get("WATCHDOG_PID", "")
    if not configured.isdigit() or (owner and owner != str(os.getpid())):
        return False
    needed_usec = int(watchdog_timeout_needed_s(cycle_s) * 1_000_000)
    if needed_usec <= int(configured) or not sd_notify(f"WATCHDOG_USEC={needed_usec}"):
        return False
    log.info(
        "watchdog extended from %g s to %g s for %g s between cycles",
        int(configured) / 1e6,
        needed_usec / 1e6,
        cycle_s,
    )
    return True


def watchdog_ping(status: str) -> bool:
    """WATCHDOG=1, with a one-line STATUS= for ``systemctl status``.

    Call it only once lines were delivered or spooled: a collector that hangs
    or stops handing lines over stops pinging, and systemd restarts it.
    """
    return sd_notify(f"WATCHDOG=1\nSTATUS={status}")


# --- Flags and settings ----------------------------------------------------------


def build_parser(source: str, description: str) -> argparse.ArgumentParser:
    """The flags every collector takes (docs/design.md)."""
    parser = argparse.ArgumentParser(prog=f"{source}_to_graphite", description=description)
    parser.add_argument("--once", action="store_true", help="one cycle, then exit")
    parser.add_argument("--discover", action="store_true", help="list what is found, send nothing")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the Carbon lines to stdout instead of sending them",
    )
    parser.add_argument(
        "--carbon", metavar="HOST:PORT", help="Carbon destination (or CARBON_HOST/CARBON_PORT)"
    )
    parser.add_argument(
        "--interval", type=float, metavar="SECONDS", help="override the poll interval"
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="spool, names and energy state (or ELECTRICITY_STATE_DIR)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="local settings file (default config_local.py)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def common_overrides(args: argparse.Namespace, interval_setting: str) -> dict[str, Any]:
    """Settings given by the common flags."""
    overrides: dict[str, Any] = {}
    # "is not None": an empty flag is refused by the checks, not taken as absent.
    if args.carbon is not None:
        overrides["CARBON_DESTINATIONS"] = [args.carbon]
    if args.interval is not None:
        overrides[interval_setting.upper()] = float(args.interval)
    if args.state_dir is not None:
        overrides["STATE_DIR"] = args.state_dir
    if args.verbose:
        overrides["LOG_LEVEL"] = "DEBUG"
    return overrides


def carbon_destinations(settings: Any) -> list[tuple[str, int]]:
    if settings.carbon_destinations:
        return [
            parse_host_port(item, 2003, "CARBON_DESTINATIONS")
            for item in settings.carbon_destinations
        ]
    return [(settings.carbon_host, settings.carbon_port)]


# --- Sinks: where lines go -------------------------------------------------


class DryRunSink:
    """--dry-run: lines to stdout, nothing sent, nothing spooled."""

    spool = None
    lines_sent = 0

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def send_lines(self, lines: Sequence[str]) -> bool:
        with self._lock:
            self.stream.writelines(lines)
            self.stream.flush()
            self.lines_sent += len(lines)
        return True


# --- The runtime every collector shares -------------------------------------


@dataclass
class Health:
    """Counters behind ``<prefix>.health.<source>.*``."""

    devices_ok: int = 0
    devices_failed: int = 0
    poll_seconds: float = 0.0
    metrics_sent: int = 0
    values_rejected: int = 0
    extra: dict = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the source's own counter ``name`` (sent as
        ``<prefix>.health.<source>.<name>``); ``count(name, 0)`` reports it
        from the start."""
        self.extra[name] = self.extra.get(name, 0) + n


class Once:
    """Say a problem once: at WARNING (or ``level``) the first time for its
    key, at DEBUG while it lasts, and, when ``clear`` is given a message, once
    when it is over. A key names the problem: a device id, (device, subject).
    """

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._keys: set[Hashable] = set()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def say(
        self,
        key: Hashable,
        message: str,
        *args: Any,
        level: int = logging.WARNING,
        again: str | None = None,
    ) -> bool:
        """Log ``message % args`` at ``level`` if ``key`` is new, else at
        DEBUG (``again`` instead of ``message``, if given). True if it was new."""
        if key in self._keys:
            self.log.debug(again or message, *args)
            return False
        self._keys.add(key)
        self.log.log(level, message, *args)
        return True

    def clear(
        self, key: Hashable, message: str | None = None, *args: Any, level: int = logging.INFO
    ) -> bool:
        """``key``'s problem is over: log ``message % args`` (if given) at
        ``level`` when it had been said. True if it had."""
        if key not in self._keys:
            return False
        self._keys.discard(key)
        if message is not None:
            self.log.log(level, message, *args)
        return True


class Runtime:
    """Settings, names, sink and health of one running collector."""

    def __init__(self, source: str, settings: Any, dry_run: bool = False) -> None:
        self.source = source
        self.settings = settings
        self.dry_run = dry_run
        self.prefix = settings.metric_prefix
        self.state_dir = Path(settings.state_dir) / source
        # Not plain "kasa": that is python-kasa's own logger.
        self.log = logging.getLogger(f"electricity.{source}")
        self.health = Health()
        self._lock: StateLock | None = None
        if dry_run:
            self.names = NameMap(None, settings.device_names)
            self.sink: Any = DryRunSink()
        else:
            prepare_state_dir(self.state_dir)  # ConfigError: read-only, a file, ...
            self.names = NameMap(self.state_dir / "names.json", settings.device_names)
            self.sink = CarbonClient(
                carbon_destinations(settings),
                timeout_s=settings.carbon_timeout_s,
                spool=Spool(self.state_dir / "spool", max_lines=settings.spool_max_lines),
                confirm=settings.carbon_confirm_delivery,
                resend_window_s=settings.carbon_resend_window_s,
            )

    def lock(self) -> None:
        """One collector per state dir. Raises ConfigError if taken."""
        if self.dry_run:
            return
        self._lock = StateLock(self.state_dir / "lock")
        try:
            acquired = self._lock.acquire()
        except OSError as exc:
            raise state_dir_error(self.state_dir, exc) from None
        if not acquired:
            raise ConfigError(
                f"STATE_DIR: another {self.source} collector is running with {self.state_dir}"
            )

    def close(self) -> None:
        """Stop the sender (what it has not delivered stays in the spool)."""
        close = getattr(self.sink, "close", None)
        if close is not None:
            close()
        if self._lock is not None:
            self._lock.release()

    def state_path(self, name: str) -> Path | None:
        """A file in this collector's state dir; None in dry runs (nothing written)."""
        return None if self.dry_run else self.state_dir / name

    def lines(
        self,
        device_segment: str,
        values: dict[str, Any],
        timestamp: int,
        group: str = "",
        prefix: str = "",
    ) -> list[str]:
        """Carbon lines for one device's values; bad values are counted, logged, skipped.

        An empty ``device_segment`` makes ``group`` the device itself:
        ``<prefix>.<group>.<metric>`` (the whole-house ``meter``). ``prefix``
        replaces METRIC_PREFIX (gas from the Glow display goes under ``home.gas``).
        """
        out = []
        base = [group or self.source, device_segment] if device_segment else [group or self.source]
        for metric, value in values.items():
            if value is None:
                continue
            try:
                path = metric_path(prefix or self.prefix, *base, metric)
                out.append(format_line(path, value, timestamp))
            except InvalidMetric as exc:
                self.health.values_rejected += 1
                self.log.debug("%s.%s not sent: %s", device_segment, metric, exc)
        return out

    def health_lines(self, timestamp: int, **values: Any) -> list[str]:
        """``<prefix>.health.<source>.<name>`` lines: the standard figures plus any given."""
        figures = {
            "devices_ok": self.health.devices_ok,
            "devices_failed": self.health.devices_failed,
            "poll_seconds": round(self.health.poll_seconds, 3),
            "metrics_sent": self.health.metrics_sent,
            "values_rejected": self.health.values_rejected,
            **self.health.extra,
            **values,
        }
        if hasattr(self.sink, "submit"):  # counted as Carbon confirms them
            figures["metrics_sent"] = self.sink.lines_sent
        spool = getattr(self.sink, "spool", None)
        if spool is not None:
            figures["spool_lines"] = spool.backlog()
            figures["spool_dropped"] = spool.dropped_lines
        return self.lines(self.source, figures, timestamp, group="health")

    def _hand_over(self, lines: Sequence[str]) -> tuple[bool, bool]:
        """(safe, delivered): the Carbon sink writes the lines to its spool
        and returns at once (safe once on disk; delivered means Carbon is
        answering); --dry-run and test sinks deliver before returning."""
        submit = getattr(self.sink, "submit", None)
        if submit is not None:
            return submit(list(lines)), self.sink.reachable
        delivered = self.sink.send_lines(list(lines))
        if delivered:
            self.health.metrics_sent += len(lines)
        return True, delivered

    def deliver(self, lines: Sequence[str]) -> bool:
        """Hand lines over without waiting for Carbon; True when Carbon is
        answering (False: they wait in the spool)."""
        if not lines:
            return True
        return self._hand_over(lines)[1]

    def store(self, lines: Sequence[str]) -> bool:
        """Hand lines over; True once they are on disk or delivered: what a
        push source waits for before acknowledging them."""
        if not lines:
            return True
        return self._hand_over(lines)[0]

    async def send(self, lines: Sequence[str]) -> bool:
        """``deliver``, for the asyncio loop (it never waits for Carbon)."""
        return self.deliver(lines)

    def drain(self, timeout_s: float | None = None, force: bool = True) -> bool:
        """Wait until Carbon has confirmed every line handed over (at most
        ``timeout_s``); True when it has. ``force``: a send at once, even
        while the sender is backing off from an outage."""
        drain = getattr(self.sink, "drain", None)
        if drain is None:
            return True
        if timeout_s is None:
            destinations = len(getattr(self.sink, "destinations", ())) or 1
            timeout_s = self.settings.carbon_timeout_s * (destinations + 2)
        return drain(timeout_s, force)

    def settle(self, timeout_s: float = HEALTH_SETTLE_S) -> None:
        """Give the sender a moment (HEALTH_SETTLE_S) to confirm what was just
        handed over, so ``spool_lines`` shows a backlog, not the lines of
        this very cycle."""
        self.drain(timeout_s, force=False)

    def undelivered_message(self) -> str:
        spool = self.sink.spool
        return (
            f"{self.source}: Carbon unreachable at {self.sink.describe_destinations()}; "
            f"{len(spool)} lines kept in the spool at {spool.directory}"
        )


def open_runtime(source: str, args: argparse.Namespace, overrides: dict[str, Any]) -> Runtime:
    """Settings + logging + runtime; raises ConfigError on a bad setting."""
    settings = load_settings(local_path=args.config, overrides=overrides)
    setup_logging(settings.log_level)
    protect_secrets(configured_secrets(settings))
    try:
        return Runtime(source, settings, dry_run=args.dry_run)
    except OSError as exc:  # the spool or names in a state dir that went wrong
        raise state_dir_error(Path(settings.state_dir) / source, exc) from None


# --- Polling sources ----------------------------------------------------------


@dataclass
class Device:
    """Something to poll. ``stable_id`` survives renames and address changes."""

    stable_id: str
    name: str
    address: str = ""
    model: str = ""
    measures_energy: bool = False
    handle: Any = None


@dataclass
class Reading:
    """Values of one named device (a strip's poll gives one per outlet)."""

    stable_id: str
    name: str
    values: dict


class Collector:
    """One polling source: discover, poll, extract. Subclasses set ``source``
    and ``interval_setting`` and implement ``discover`` and ``poll``."""

    source = ""
    description = ""
    interval_setting = "plug_interval_s"
    discover_columns: Sequence[str] = ("name", "id", "address", "model", "energy")

    def __init__(self, runtime: Runtime, args: argparse.Namespace) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.args = args
        self.log = runtime.log

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Flags particular to this source."""

    @classmethod
    def overrides(cls, args: argparse.Namespace) -> dict[str, Any]:
        """Settings given by this source's flags."""
        return {}

    async def discover(self) -> list[Device]:
        raise NotImplementedError

    async def poll(self, device: Device) -> list[Reading]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections at exit."""

    def discover_row(self, device: Device) -> Sequence[str]:
        return (
            device.name,
            device.stable_id,
            device.address,
            device.model,
            "yes" if device.measures_energy else "no",
        )

    def end_of_cycle(self, timestamp: int) -> None:
        """Hook after each cycle (e.g. persist energy state)."""


def format_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table for --discover."""
    cells = [list(columns)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines) + "\n"


class PollLoop:
    """Aligned cycles over the discovered devices of one collector."""

    def __init__(self, collector: Collector, interval_s: float, once: bool = False) -> None:
        self.collector = collector
        self.runtime = collector.runtime
        self.settings = collector.settings
        self.interval_s = interval_s
        self.once = once
        self.devices: dict[str, Device] = {}
        self._stopping: asyncio.Event | None = None
        self._failing = Once(self.runtime.log)  # stable ids of devices failing
        self._last_discovery = -math.inf
        self._discovery: asyncio.Task | None = None
        self._in_flight: dict[str, asyncio.Future] = {}  # polls under way, by stable id
        self._delivered = True

    @property
    def stopping(self) -> asyncio.Event:
        """Set to stop after the current cycle. Made on first use, inside the
        running loop (Python 3.9 binds an Event to a loop when it is made)."""
        if self._stopping is None:
            self._stopping = asyncio.Event()
        return self._stopping

    # Discovery

    async def rediscover(self) -> None:
        try:
            found = await self.collector.discover()
        except Exception as exc:  # a source's discovery failing must not stop polling
            self.runtime.log.warning("discovery failed: %s: %s", exc.__class__.__name__, exc)
            return
        finally:
            self._last_discovery = time.monotonic()
        for device in found:
            known = self.devices.get(device.stable_id)
            if known is None:
                self.runtime.log.info(
                    "found %s (%s) at %s", device.name, device.stable_id, device.address
                )
            if known is None or known.address != device.address:
                self.devices[device.stable_id] = device

    def _discovery_due(self) -> bool:
        if not self.devices:
            return True
        elapsed = time.monotonic() - self._last_discovery
        if self._failing and elapsed >= min(
            EARLY_REDISCOVER_S, self.settings.rediscover_interval_s
        ):
            return True  # a failing device may have moved to a new address
        return elapsed >= self.settings.rediscover_interval_s

    # One device, one cycle

    async def _poll_device(self, device: Device, timestamp: int) -> list[str] | None:
        runtime = self.runtime
        try:
            readings = await asyncio.wait_for(
                self.collector.poll(device), timeout=self.settings.device_timeout_s
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any device failure is that device's alone
            reason = (
                f"no answer within {self.settings.device_timeout_s:g} s"
                if isinstance(exc, asyncio.TimeoutError)
                else f"{exc.__class__.__name__}: {exc}"
            )
            self._failing.say(
                device.stable_id,
                "%s (%s): %s",
                device.name,
                device.address,
                reason,
                again="%s (%s): still failing: %s",
            )
            return None
        self._failing.clear(device.stable_id, "%s (%s) answers again", device.name, device.address)
        lines: list[str] = []
        for reading in readings:
            segment = runtime.names.name_for(reading.stable_id, reading.name)
            lines.extend(runtime.lines(segment, reading.values, timestamp))
        return lines

    async def _poll_and_hand_over(self, device: Device, timestamp: int) -> bool:
        """Poll one device and hand its lines over as soon as they come (a
        dead device's timeout delays nobody). True when it answered."""
        lines = await self._poll_device(device, timestamp)
        if lines is None:
            return False
        self._delivered &= self.runtime.deliver(lines)
        return True

    def _start_poll(self, device: Device, timestamp: int) -> asyncio.Future:
        task = asyncio.ensure_future(self._poll_and_hand_over(device, timestamp))
        self._in_flight[device.stable_id] = task

        def finished(task: asyncio.Future, key: str = device.stable_id) -> None:
            self._in_flight.pop(key, None)
            if not task.cancelled() and task.exception() is not None:
                self.runtime.log.error("%s: lines not handed over: %s", key, task.exception())

        task.add_done_callback(finished)
        return task

    async def cycle(self, timestamp: int, until: float | None = None) -> tuple[int, int, bool]:
        """Poll every device, stamping its lines with ``timestamp``. With
        ``until`` (a monotonic time: the next boundary), return then even if a
        device has not answered: its poll goes on and its lines, if they
        come, keep this timestamp; it is not polled again meanwhile.
        Returns (devices ok, devices failed or pending, Carbon answering)."""
        runtime = self.runtime
        started = time.monotonic()
        self._delivered = True
        still_pending = [d for d in self.devices.values() if d.stable_id in self._in_flight]
        tasks = [
            self._start_poll(device, timestamp)
            for device in list(self.devices.values())
            if device.stable_id not in self._in_flight
        ]
        done: set = set()
        if tasks:
            timeout = None if until is None else max(0.0, until - time.monotonic())
            done, _ = await asyncio.wait(tasks, timeout=timeout)
        ok = sum(1 for task in done if task.result())  # a sink's error surfaces here
        failed = len(tasks) - ok
        for device in self.devices.values():
            task = self._in_flight.get(device.stable_id)
            if task is not None and task not in done:
                self._failing.say(
                    device.stable_id,
                    "%s (%s): no answer by the next boundary; polled again once it answers"
                    " or times out",
                    device.name,
                    device.address,
                    again="%s (%s): still pending",
                )
        failed += len(still_pending)
        runtime.health.devices_ok, runtime.health.devices_failed = ok, failed
        runtime.health.poll_seconds = time.monotonic() - started
        self.collector.end_of_cycle(timestamp)
        # Only the time left before ``until``: a cycle that waited for a pending
        # device must not miss the next boundary for a health figure.
        settle_s = HEALTH_SETTLE_S
        if until is not None:
            settle_s = min(settle_s, max(0.0, until - time.monotonic()))
        await asyncio.get_running_loop().run_in_executor(None, runtime.settle, settle_s)
        delivered = self._delivered & runtime.deliver(runtime.health_lines(timestamp))
        return ok, failed, delivered

    # The loop

    async def _sleep_until(self, wall_time: float) -> None:
        delay = wall_time - time.time()
        if delay > 0:
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    async def run(self) -> int:
        runtime = self.runtime
        await self.rediscover()
        sd_notify("READY=1")
        if self.once:
            if not self.devices:
                print(f"{runtime.source}: no device found", file=sys.stderr)
                runtime.deliver(runtime.health_lines(int(time.time())))
                await asyncio.get_running_loop().run_in_executor(None, runtime.drain)
                return EXIT_NO_DEVICE
            ok, _failed, delivered = await self.cycle(int(time.time()))
            # --once reports whether Carbon took the lines: wait for that.
            loop = asyncio.get_running_loop()
            delivered &= await loop.run_in_executor(None, runtime.drain)
            if not delivered:
                print(runtime.undelivered_message(), file=sys.stderr)
                return EXIT_UNDELIVERED
            if not ok:
                print(f"{runtime.source}: no device answered", file=sys.stderr)
                return EXIT_NO_DEVICE
            return EXIT_OK

        ensure_watchdog_covers(self.interval_s)
        runtime.log.info(
            "polling %d devices every %g s, sending to %s",
            len(self.devices),
            self.interval_s,
            "stdout" if runtime.dry_run else runtime.sink.describe_destinations(),
        )
        # Aligned to interval boundaries on the wall clock: every device of a
        # cycle shares the boundary as its timestamp, and nothing drifts.
        boundary = math.floor(time.time() / self.interval_s + 1) * self.interval_s
        await self._sleep_until(boundary)
        while not self.stopping.is_set():
            if self._discovery_due() and (self._discovery is None or self._discovery.done()):
                if self.devices:
                    self._discovery = asyncio.ensure_future(self.rediscover())
                else:
                    await self.rediscover()
            # A device still pending at the next boundary holds nobody up.
            margin_s = min(0.25, self.interval_s / 10)
            until = time.monotonic() + (boundary + self.interval_s - margin_s - time.time())
            ok, failed, delivered = await self.cycle(int(boundary), until)
            # Reached only once the cycle's lines (its health lines at least)
            # were on disk or delivered: a cycle that hangs or raises never pings.
            watchdog_ping(
                f"{time.strftime('%H:%M:%S')}: {ok} devices answered, {failed} failed; "
                + ("lines delivered" if delivered else "Carbon unreachable, lines spooled")
            )
            next_boundary = math.floor(time.time() / self.interval_s + 1) * self.interval_s
            skipped = round((next_boundary - boundary) / self.interval_s) - 1
            if skipped > 0:
                runtime.log.warning("cycle overran: %d boundaries skipped", skipped)
            boundary = next_boundary
            await self._sleep_until(boundary)
        sd_notify("STOPPING=1")
        if self._discovery is not None:
            self._discovery.cancel()
        for task in list(self._in_flight.values()):
            task.cancel()
        return EXIT_OK


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM/SIGINT set the event (the main thread then winds down)."""
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = [signal.signal(signum, lambda *_: stop.set()) for signum in signals]
    try:
        yield stop
    finally:
        for signum, handler in zip(signals, previous):
            signal.signal(signum, handler)


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """First SIGTERM/SIGINT: finish the cycle, send or spool, exit 0."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)


async def _run_collector(collector_cls: type, args: argparse.Namespace, runtime: Runtime) -> int:
    collector = collector_cls(runtime, args)
    try:
        if args.discover:
            devices = await collector.discover()
            rows = [collector.discover_row(device) for device in devices]
            sys.stdout.write(format_table(collector.discover_columns, rows))
            return EXIT_OK if devices else EXIT_NO_DEVICE
        interval_s = float(getattr(runtime.settings, collector.interval_setting))
        poll_loop = PollLoop(collector, interval_s, once=args.once)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            if poll_loop.stopping.is_set():
                return
            runtime.log.info("stopping: finishing the current cycle")
            poll_loop.stopping.set()

        _install_signal_handlers(loop, stop)
        return await poll_loop.run()
    finally:
        await collector.close()


def main(collector_cls: type, argv: Sequence[str] | None = None) -> int:
    """Entry point of a polling collector script."""
    parser = build_parser(collector_cls.source, collector_cls.description)
    collector_cls.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        overrides = common_overrides(args, collector_cls.interval_setting)
        overrides.update(collector_cls.overrides(args))
        runtime = open_runtime(collector_cls.source, args, overrides)
        if not args.discover:
            runtime.lock()
    except ConfigError as exc:
        print(f"{collector_cls.source}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(_run_collector(collector_cls, args, runtime))
    except ConfigError as exc:
        print(f"{collector_cls.source}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        runtime.close()


# --- Push sources -----------------------------------------------------------------


class LineBatcher:
    """Collects lines from any thread and hands them over every
    ``flush_interval_s`` or once ``max_lines`` are waiting, in its own thread;
    ``store`` hands lines over at once, for what must be safe before it is
    acknowledged. ``periodic(ts)``, if given, adds lines (health) every
    ``periodic_interval_s``."""

    def __init__(
        self,
        runtime: Runtime,
        flush_interval_s: float = 1.0,
        max_lines: int = 5000,
        periodic: Callable[[int], list[str]] | None = None,
        periodic_interval_s: float = 10.0,
    ) -> None:
        self.runtime = runtime
        self.flush_interval_s = flush_interval_s
        self.max_lines = max_lines
        self.periodic = periodic
        self.periodic_interval_s = periodic_interval_s
        self._next_periodic = 0.0
        self.delivered_all = True
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="line-batcher", daemon=True)

    def start(self) -> LineBatcher:
        # With periodic lines, a ping comes at least every periodic_interval_s.
        if self.periodic is not None:
            ensure_watchdog_covers(max(self.periodic_interval_s, self.flush_interval_s))
        self._thread.start()
        return self

    def add(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        with self._lock:
            self._lines.extend(lines)
            full = len(self._lines) >= self.max_lines
        if full:
            self._wake.set()

    def store(self, lines: Sequence[str]) -> bool:
        """Hand ``lines`` over now, from the caller's thread; True once they
        are on disk (or delivered): only then may their sender be told so."""
        return self.runtime.store(lines)

    def flush(self) -> bool:
        """Hand over what is waiting now (plus periodic lines); True when
        Carbon is answering."""
        with self._lock:
            lines, self._lines = self._lines, []
        now = time.time()
        if self.periodic is not None and (now >= self._next_periodic or self._stopping.is_set()):
            self.runtime.settle()  # what was stored since: confirmed, or a backlog
            self._next_periodic = now + self.periodic_interval_s
            lines.extend(self.periodic(int(now)))
        if not lines:
            return True
        delivered = self.runtime.deliver(lines)
        self.delivered_all &= delivered
        # Only after lines were delivered or spooled (see watchdog_ping).
        watchdog_ping(
            f"{time.strftime('%H:%M:%S')}: {len(lines)} lines "
            + ("delivered" if delivered else "spooled, Carbon unreachable")
        )
        return delivered

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # never let the sender thread die silently
                log.exception("sending failed")

    def stop(self) -> bool:
        """Stop the thread, hand over what is left and wait (bounded) for
        Carbon to confirm it all; True when it did."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        delivered = self.flush() and self.runtime.drain()
        self.delivered_all &= delivered
        return delivered
