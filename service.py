"""Running as a service: logging (journald priorities under systemd), secrets
scrubbed from every log line, sd_notify and the watchdog, and signals.

Nothing here knows about devices or Carbon; runtime.py and collector.py use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Callable, ClassVar

from settings import SECRET_SETTINGS

log = logging.getLogger("electricity.service")


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


def install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """First SIGTERM/SIGINT: finish the cycle, send or spool, exit 0."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
