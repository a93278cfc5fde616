"""Metric names and values, Carbon plaintext lines, delivery and the spool.

Carbon never acknowledges a line, so delivery is confirmed the one way the
plaintext protocol allows: each batch goes over its own connection, we
half-close it (end of stream), and Carbon closes its side only once it has
read every byte. A batch whose close does not come back (connection refused,
reset, timeout, a hung server) goes to the on-disk spool and is replayed with
its original timestamps once a destination confirms again. Resending a line
is harmless: whisper keeps one value per timestamp.

Read is not yet written: carbon-cache holds points in memory before whisper
has them, and a carbon-cache that is stopped or crashes loses that cache.
So the lines confirmed during the last ``resend_window_s`` are kept, and when
a destination stops answering they go back into the spool with the rest.

Lines are validated before they leave: three fields, ASCII ``[a-z0-9_]``
segments, finite values, whole-second timestamps, short lines. A line that
fails is counted and never sent.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union

log = logging.getLogger("graphite")

DEFAULT_PREFIX = "home.electricity"
DEFAULT_CARBON = ("127.0.0.1", 2003)
# Carbon drops the connection (and the rest of the stream) on a line over
# 16 KiB; ours are never near that, so anything long is a bug.
MAX_LINE_BYTES = 512
# Seconds, not milliseconds: Carbon would store a millisecond stamp in 2500 AD.
MIN_TIMESTAMP = 946_684_800  # 2000-01-01
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01

_SEGMENT = re.compile(r"[a-z0-9_]+")
_PATH = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*")
_LINE = re.compile(r"([a-z0-9_]+(?:\.[a-z0-9_]+)*) (-?[0-9][0-9.e+-]*|-?\.[0-9][0-9e+-]*) ([0-9]+)")

Number = Union[int, float, bool]
Metric = tuple[str, Number, int]


class InvalidMetric(ValueError):
    """A path, value or timestamp that must never become a Carbon line."""


# Letters NFKD does not fold to ASCII: Cyrillic (Russian, Ukrainian,
# Belarusian, Serbian, Macedonian, Bulgarian), Greek and a few Latin ones.
# Accented forms (й, ё, ї, ά) decompose to these first.
_TRANSLITERATION = str.maketrans(
    {
        **dict(zip("абвгдезиклмнопрстуфыэ", "abvgdeziklmnoprstufye")),
        **{"ж": "zh", "х": "kh", "ц": "ts", "ч": "ch", "ш": "sh", "щ": "shch"},
        **{"ю": "iu", "я": "ia", "ъ": "", "ь": "", "є": "ie", "і": "i", "ґ": "g", "ў": "u"},
        **{"ђ": "dj", "ј": "j", "љ": "lj", "њ": "nj", "ћ": "c", "џ": "dz", "ѓ": "gj"},
        **{"ќ": "kj", "ѕ": "dz"},
        **dict(zip("αβγδεζηικλμνξοπρστυφω", "avgdeziiklmnxoprstyfo")),
        **{"θ": "th", "χ": "ch", "ψ": "ps", "ς": "s"},
        **{"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d"},
        **{"þ": "th", "ı": "i", "ħ": "h", "ŋ": "ng"},
    }
)
# A name whose letters cannot all be written in [a-z0-9_] gets this many hex
# digits of its hash, so 台所 and 居間 stay two devices, and stay themselves.
NAME_HASH_DIGITS = 8


def format_device_name(name: str, fallback: str = "") -> str:
    """One metric path segment from a free-form name.

    Lowercase ASCII ``[a-z0-9_]``: accents folded (é -> e), Cyrillic and
    Greek transliterated (кухня -> kukhnia), spaces and dashes to ``_``,
    punctuation, symbols and emoji dropped, repeats collapsed, edges trimmed.
    Letters or digits that cannot be written so (台所) are replaced by a
    short stable hash of the whole name (``plug_5d1e0c2a``), so distinct
    names stay distinct. A name that leaves nothing falls back to
    ``fallback`` (formatted the same way), then to ``unicode_<hash>``, and
    an empty name to ``"unknown"``.
    """
    text = str(name)
    folded = unicodedata.normalize("NFKD", text).lower().translate(_TRANSLITERATION)
    spaced = re.sub(r"[\s\-]+", "_", folded)
    kept = re.sub(r"[^a-z0-9_]", "", spaced)
    segment = re.sub(r"_+", "_", kept).strip("_")
    lost = any(
        unicodedata.category(char)[0] in "LN" and not ("a" <= char <= "z" or "0" <= char <= "9")
        for char in folded
    )
    if segment and not lost:
        return segment
    digest = hashlib.sha256(unicodedata.normalize("NFC", text).encode("utf-8", "surrogatepass"))
    name_hash = digest.hexdigest()[:NAME_HASH_DIGITS]
    if segment:
        return f"{segment}_{name_hash}"
    if fallback:
        return format_device_name(fallback)
    return f"unicode_{name_hash}" if text.strip() else "unknown"


def is_valid_path(path: str) -> bool:
    """True for dotted ``[a-z0-9_]`` segments, nothing empty."""
    return bool(_PATH.fullmatch(path))


def metric_path(*segments: str) -> str:
    """Join segments (the prefix may hold dots) into a checked metric path."""
    path = ".".join(segments)
    if not is_valid_path(path):
        raise InvalidMetric(f"invalid metric path {path!r}")
    return path


def format_value(value: Number) -> str:
    """A finite number as Carbon reads it; booleans as 0/1. Raises InvalidMetric."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, float):
        raise InvalidMetric(f"value {value!r} is not a number")
    number = value
    if not math.isfinite(number):
        raise InvalidMetric(f"value {value!r} is not finite")
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def format_line(path: str, value: Number, timestamp: float) -> str:
    """One Carbon plaintext line, newline included. Raises InvalidMetric."""
    if not is_valid_path(path):
        raise InvalidMetric(f"invalid metric path {path!r}")
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        raise InvalidMetric(f"timestamp {timestamp!r} is not a number")
    if not math.isfinite(timestamp) or not MIN_TIMESTAMP <= timestamp < MAX_TIMESTAMP:
        raise InvalidMetric(f"timestamp {timestamp!r} is not whole seconds since 1970")
    line = f"{path} {format_value(value)} {int(timestamp)}\n"
    if len(line) > MAX_LINE_BYTES:
        raise InvalidMetric(f"line of {len(line)} bytes is too long")
    return line


def is_valid_line(line: str) -> bool:
    """True for a line exactly as ``format_line`` writes it (newline included)."""
    if not line.endswith("\n") or len(line) > MAX_LINE_BYTES:
        return False
    match = _LINE.fullmatch(line[:-1])
    if not match:
        return False
    try:
        value = float(match.group(2))
    except ValueError:
        return False
    return math.isfinite(value) and MIN_TIMESTAMP <= int(match.group(3)) < MAX_TIMESTAMP


class Spool:
    """Bounded, ordered, crash-safe store of lines waiting for Carbon.

    Lines are appended to numbered segment files of at most
    ``segment_lines`` lines. Every append reaches the kernel at once, so a
    crash of the process loses nothing already spooled; an fsync follows at
    most every ``fsync_interval_s`` (and on ``sync()``), so a power cut loses
    at most that much while a long outage does not wear an SD card with an
    fsync a second. A torn last line (the process died mid-write) is discarded on
    load, never sent. When the spool holds more than ``max_lines``, the
    oldest lines go first and are counted in ``dropped_lines``.
    """

    SUFFIX = ".spool"

    def __init__(
        self,
        directory: Path | str,
        max_lines: int = 2_000_000,
        segment_lines: int = 50_000,
        fsync_interval_s: float = 10.0,
    ) -> None:
        self.directory = Path(directory)
        self.fsync_interval_s = fsync_interval_s
        self._last_fsync = -math.inf
        self._unsynced: Path | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_lines = max_lines
        self.segment_lines = segment_lines
        self.dropped_lines = 0
        self.discarded_lines = 0  # torn or invalid lines found on disk
        self._counts: dict[Path, int] = {}
        self._lock = threading.Lock()
        for segment in self._segment_files():
            self._counts[segment] = self._load_segment(segment)

    def __len__(self) -> int:
        return sum(self._counts.values())

    def _segment_files(self) -> list[Path]:
        return sorted(self.directory.glob("*" + self.SUFFIX))

    def _load_segment(self, segment: Path) -> int:
        """Count complete lines; cut a torn tail left by a crash."""
        data = segment.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("spool %s: discarding a torn last line left by a crash", segment.name)
            self.discarded_lines += 1
            with open(segment, "r+b") as handle:
                handle.truncate(complete)
                os.fsync(handle.fileno())
        return data.count(b"\n", 0, complete)

    def _new_segment(self) -> Path:
        files = self._segment_files()
        number = int(files[-1].stem) + 1 if files else 1
        return self.directory / f"{number:012d}{self.SUFFIX}"

    def append(self, lines: Sequence[str]) -> None:
        """Add lines at the end, durably, then enforce the cap."""
        if not lines:
            return
        with self._lock:
            remaining = list(lines)
            while remaining:
                files = self._segment_files()
                segment = files[-1] if files else None
                if segment is None or self._counts.get(segment, 0) >= self.segment_lines:
                    segment = self._new_segment()
                    self._counts[segment] = 0
                room = self.segment_lines - self._counts[segment]
                chunk, remaining = remaining[:room], remaining[room:]
                with open(segment, "a", encoding="ascii", newline="\n") as handle:
                    handle.writelines(chunk)
                    handle.flush()
                    self._maybe_fsync(segment, handle.fileno())
                self._counts[segment] += len(chunk)
            self._enforce_cap()

    def _maybe_fsync(self, segment: Path, fileno: int) -> None:
        if self._unsynced is not None and self._unsynced != segment:
            self._fsync_path(self._unsynced)  # a finished segment goes to disk now
        now = time.monotonic()
        if now - self._last_fsync >= self.fsync_interval_s:
            os.fsync(fileno)
            self._last_fsync, self._unsynced = now, None
        else:
            self._unsynced = segment

    def _fsync_path(self, segment: Path) -> None:
        try:
            with open(segment, "rb") as handle:
                os.fsync(handle.fileno())
        except FileNotFoundError:
            pass  # replayed and removed meanwhile
        self._unsynced = None

    def sync(self) -> None:
        """Flush what was appended since the last fsync to disk (at exit)."""
        with self._lock:
            if self._unsynced is not None:
                self._fsync_path(self._unsynced)

    def _enforce_cap(self) -> None:
        excess = len(self) - self.max_lines
        while excess > 0:
            oldest = self._segment_files()[0]
            count = self._counts[oldest]
            if count <= excess:
                oldest.unlink()
                del self._counts[oldest]
                self.dropped_lines += count
                excess -= count
            else:
                kept = oldest.read_text(encoding="ascii").splitlines(keepends=True)[excess:]
                self._rewrite(oldest, kept)
                self.dropped_lines += excess
                excess = 0
        if self.dropped_lines:
            log.debug("spool full: %d oldest lines dropped so far", self.dropped_lines)

    def _rewrite(self, segment: Path, lines: list[str]) -> None:
        temporary = segment.with_suffix(".tmp")
        with open(temporary, "w", encoding="ascii", newline="\n") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, segment)
        self._counts[segment] = len(lines)

    def replay(self, deliver, batch_lines: int = 50_000) -> int:
        """Send spooled lines oldest first through ``deliver(lines) -> bool``.

        Stops at the first batch that is not delivered (the rest stays, in
        order). Returns the number of lines delivered.
        """
        delivered = 0
        with self._lock:
            for segment in self._segment_files():
                lines = segment.read_text(encoding="ascii", errors="replace").splitlines(
                    keepends=True
                )
                valid = [line for line in lines if is_valid_line(line)]
                if len(valid) != len(lines):
                    self.discarded_lines += len(lines) - len(valid)
                    log.warning(
                        "spool %s: %d invalid lines discarded",
                        segment.name,
                        len(lines) - len(valid),
                    )
                for start in range(0, len(valid), batch_lines):
                    batch = valid[start : start + batch_lines]
                    if not deliver(batch):
                        self._rewrite(segment, valid[start:])
                        return delivered
                    delivered += len(batch)
                segment.unlink()
                del self._counts[segment]
        return delivered


Destination = tuple[str, int]


class CarbonClient:
    """Delivers lines to the first destination that confirms, else spools them.

    ``destinations`` is an ordered failover list (carbon-caches or relays).
    Thread-safe; blocking, so async callers run it in an executor.
    """

    def __init__(
        self,
        destinations: Sequence[Destination] = (DEFAULT_CARBON,),
        timeout_s: float = 5.0,
        spool: Spool | None = None,
        confirm: bool = True,
        batch_lines: int = 50_000,
        resend_window_s: float = 120.0,
        resend_max_lines: int = 100_000,
        retry_preferred_s: float = 300.0,
    ) -> None:
        if not destinations:
            raise ValueError("at least one Carbon destination is needed")
        self.destinations = list(destinations)
        self.timeout_s = timeout_s
        self.spool = spool
        self.confirm = confirm
        self.batch_lines = batch_lines
        self.lines_sent = 0
        self.lines_spooled = 0
        self.lines_invalid = 0
        self.last_error = ""
        self.resend_window_s = resend_window_s
        self.resend_max_lines = resend_max_lines
        self._recent: deque[tuple[float, Sequence[str]]] = deque()
        self._recent_lines = 0
        self._resend: list[str] = []
        self._reachable = True
        self._active = 0  # index of the destination that last confirmed
        self.retry_preferred_s = retry_preferred_s
        self._retry_preferred_at = 0.0
        self._lock = threading.Lock()

    def describe_destinations(self) -> str:
        return ", ".join(f"{host}:{port}" for host, port in self.destinations)

    def send_lines(self, lines: Sequence[str]) -> bool:
        """Deliver ``lines`` (each newline-terminated), then replay the spool.

        New lines go first so the dashboard is live again as soon as Carbon
        answers; the spool follows, oldest first. Returns True when every
        line handed in was delivered; False when some went to the spool.
        """
        valid = [line for line in lines if is_valid_line(line)]
        if len(valid) != len(lines):
            self.lines_invalid += len(lines) - len(valid)
            log.error(
                "dropped %d invalid lines (a bug: lines are checked when made)",
                len(lines) - len(valid),
            )
        with self._lock:
            delivered = self._deliver_batches(valid)
            if delivered:
                self._replay()
            self._spool([] if delivered else valid)
            return delivered

    def flush_spool(self) -> int:
        """Try to replay the spool alone. Returns lines delivered."""
        with self._lock:
            replayed = self._replay()
            self._spool([])
            return replayed

    def _replay(self) -> int:
        if self.spool is None or not len(self.spool):
            return 0
        replayed = self.spool.replay(self._deliver, self.batch_lines)
        if replayed:
            log.info("replayed %d spooled lines, %d left", replayed, len(self.spool))
        return replayed

    def _spool(self, lines: Sequence[str]) -> None:
        """Spool ``lines``, after the recently confirmed lines a destination
        that stopped answering may not have written."""
        keep, self._resend = self._resend, []
        keep.extend(lines)
        if keep and self.spool is not None:
            self.spool.append(keep)
            self.lines_spooled += len(keep)

    def _deliver_batches(self, lines: Sequence[str]) -> bool:
        for start in range(0, len(lines), self.batch_lines):
            if not self._deliver(lines[start : start + self.batch_lines]):
                # The caller spools the whole call, earlier batches included:
                # resending lines that landed is harmless.
                return False
        return True

    def _deliver(self, lines: Sequence[str]) -> bool:
        if not lines:
            return True
        payload = "".join(lines).encode("ascii")
        errors = []
        for index in self._delivery_order():
            host, port = self.destinations[index]
            try:
                self._send_confirmed(host, port, payload)
            except OSError as exc:
                errors.append(f"{host}:{port}: {exc.__class__.__name__}: {exc}")
                continue
            if index != self._active:
                log.info("sending to %s:%d", host, port)
                self._active = index
            if index:  # try the preferred destinations again now and then
                self._retry_preferred_at = time.monotonic() + self.retry_preferred_s
            self.lines_sent += len(lines)
            self._remember(lines)
            if not self._reachable:
                log.info("Carbon reachable again at %s:%d", host, port)
            self._reachable = True
            return True
        self.last_error = "; ".join(errors)
        self._resend.extend(line for _, batch in self._recent for line in batch)
        self._recent.clear()
        self._recent_lines = 0
        if self._reachable:  # say it once per outage, not every cycle
            log.warning("Carbon unreachable (%s): keeping lines in the spool", self.last_error)
        self._reachable = False
        return False

    def _delivery_order(self) -> list[int]:
        """Destinations to try, in order: the one that last confirmed first,
        so a hung primary costs its timeout once per retry period, not once
        per batch; the configured order again once that period is over."""
        order = list(range(len(self.destinations)))
        if self._active and time.monotonic() < self._retry_preferred_at:
            order.remove(self._active)
            order.insert(0, self._active)
        return order

    def _remember(self, lines: Sequence[str]) -> None:
        """Keep confirmed lines for the resend window (bounded)."""
        now = time.monotonic()
        self._recent.append((now, lines))
        self._recent_lines += len(lines)
        while self._recent and (
            self._recent[0][0] < now - self.resend_window_s
            or self._recent_lines > self.resend_max_lines
        ):
            self._recent_lines -= len(self._recent.popleft()[1])

    def _send_confirmed(self, host: str, port: int, payload: bytes) -> None:
        deadline = time.monotonic() + self.timeout_s
        with socket.create_connection((host, port), timeout=self.timeout_s) as sock:
            sock.sendall(payload)
            if not self.confirm:
                return
            # End of stream; Carbon closes once it has read it all.
            sock.shutdown(socket.SHUT_WR)
            while True:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    data = sock.recv(4096)
                except socket.timeout:
                    raise TimeoutError("no close from Carbon after end of stream") from None
                if not data:
                    return


# --- The established API ---------------------------------------------------

_default_client: CarbonClient | None = None


def configure(client: CarbonClient) -> None:
    """Make ``client`` the one behind ``send_metric``/``send_metrics``."""
    global _default_client
    _default_client = client


def _client() -> CarbonClient:
    global _default_client
    if _default_client is None:
        _default_client = CarbonClient()
    return _default_client


def send_metrics(metrics: Iterable[Metric]) -> bool:
    """Send (path, value, timestamp) triples as one batch. Invalid ones are
    logged and skipped. Returns True when everything valid was delivered."""
    lines = []
    for path, value, timestamp in metrics:
        try:
            lines.append(format_line(path, value, timestamp))
        except InvalidMetric as exc:
            log.warning("not sending %s: %s", path, exc)
    return _client().send_lines(lines) if lines else True


def send_metric(path: str, value: Number, timestamp: float | None = None) -> bool:
    """Send one metric, stamped now unless a sample time is given."""
    stamp = int(time.time()) if timestamp is None else timestamp
    return send_metrics([(path, value, stamp)])
