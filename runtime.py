"""What every collector script shares: flags, settings, the runtime (names,
sender, health), and the one ``main`` seam that turns settings errors into
exit statuses, holds the state-dir lock and closes what was opened. Push
sources batch their lines with ``line_batcher.LineBatcher``.

A polling source (Kasa, Tuya, circuits) is a ``collector.Collector``; a push
source (ESP32, MQTT) is a ``Source`` whose ``run`` serves until stopped.
Either way the script's entry point is ``run_source(TheSource)``.

Exit status (docs/design.md): 0 every metric delivered; 1 Carbon unreachable, the
metrics kept in the spool; 2 bad settings or flags; 3 no device answered.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from carbon_client import CarbonClient
from graphite_helper import InvalidMetric, format_line, metric_path
from service import (
    configured_secrets,
    protect_secrets,
    setup_logging,
)
from settings import ConfigError, load_settings, parse_host_port
from spool import Spool
from state import NameMap, StateLock, prepare_state_dir, state_dir_error

EXIT_OK = 0
EXIT_UNDELIVERED = 1
EXIT_CONFIG = 2
EXIT_NO_DEVICE = 3

# Health lines report the spool after waiting this long for the lines just
# handed over (with Carbon answering they are confirmed within milliseconds).
HEALTH_SETTLE_S = 0.2

log = logging.getLogger("electricity.runtime")


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
        self._closed = False
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
        """Stop the sender (what it has not delivered stays in the spool) and
        release the lock. Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
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


def format_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table for --discover."""
    cells = [list(columns)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines) + "\n"


# --- The one entry point every script goes through ---------------------------------


class Source:
    """One source's script: its name, its flags, and ``run`` once the runtime
    is open (and locked). Polling sources are ``collector.Collector``s; a push
    source subclasses this and serves in ``run`` until stopped."""

    source: ClassVar[str] = ""
    description: ClassVar[str] = ""
    interval_setting: ClassVar[str] = "plug_interval_s"
    # --discover on a dry runtime: nothing written to the state dir.
    discover_dry_run: ClassVar[bool] = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Flags particular to this source."""

    @classmethod
    def overrides(cls, args: argparse.Namespace) -> dict[str, Any]:
        """Settings given by this source's flags."""
        return {}

    @classmethod
    def run(cls, runtime: Runtime, args: argparse.Namespace) -> int:
        """Discover, or collect until stopped (--once: one round); the exit status."""
        raise NotImplementedError


def run_source(source_cls: type[Source], argv: Sequence[str] | None = None) -> int:
    """Entry point of every collector script: flags, settings (a bad one is one
    line and exit 2), the state-dir lock, ``run``, and closing what was opened."""
    parser = build_parser(source_cls.source, source_cls.description)
    source_cls.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.discover and source_cls.discover_dry_run:
        args.dry_run = True
    try:
        overrides = common_overrides(args, source_cls.interval_setting)
        overrides.update(source_cls.overrides(args))
        runtime = open_runtime(source_cls.source, args, overrides)
    except ConfigError as exc:
        print(f"{source_cls.source}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if not args.discover:
            runtime.lock()
        return source_cls.run(runtime, args)
    except ConfigError as exc:
        print(f"{source_cls.source}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        runtime.close()
