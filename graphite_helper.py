"""Metric names and values, Carbon plaintext lines, delivery and the spool.

Every line is written to the on-disk spool (a write-ahead log) before any
send; a sender thread delivers from there, so a collector never waits for
Carbon. Carbon never acknowledges a line, so delivery is confirmed the one
way the plaintext protocol allows: each batch goes over its own connection,
we half-close it (end of stream), and Carbon closes its side only once it has
read every byte. Only then does the spool move past the batch. A batch whose
close does not come back (connection refused, reset, timeout, a hung or
chattering server) stays in the spool and is sent again, with its original
timestamps. Resending a line is harmless: whisper keeps one value per
timestamp.

Read is not yet written: carbon-cache holds points in memory before whisper
has them, and a carbon-cache that is stopped or crashes loses that cache.
So the lines confirmed during the last ``resend_window_s`` stay on disk, and
are sent again when a destination stops answering and at every start (a
power cut takes Carbon's cache too). docs/delivery.md has the whole design.

Lines are validated before they leave: three fields, ASCII ``[a-z0-9_]``
segments, finite values, whole-second timestamps, short lines. A line that
fails is counted and never sent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

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


SEGMENT_NAME = re.compile(r"[0-9]{12}\.spool")
CURSOR_NAME = "cursor.json"
# Lines kept in memory while the state disk refuses writes (disk full).
MEMORY_MAX_LINES = 100_000
_READ_CHUNK_BYTES = 1 << 20


def _count_lines(path: Path, end: int | None = None) -> int:
    """Newlines in the first ``end`` bytes of ``path`` (all of it if None),
    read in chunks so a 50,000-line segment never sits in memory whole."""
    count = 0
    remaining = math.inf if end is None else end
    with open(path, "rb") as handle:
        while remaining > 0:
            chunk = handle.read(int(min(_READ_CHUNK_BYTES, remaining)))
            if not chunk:
                break
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count


@dataclass
class _Segment:
    """One numbered segment file: its complete lines, and how many of them
    (bytes from the start) are confirmed by Carbon or dropped."""

    number: int
    path: Path
    size: int = 0
    lines: int = 0
    sent_offset: int = 0
    sent_lines: int = 0
    high_lines: int = 0  # the most ever confirmed: a rewind sends again below it

    @property
    def unsent(self) -> int:
        return self.lines - self.sent_lines

    @property
    def never_sent(self) -> int:
        return self.lines - max(self.sent_lines, self.high_lines)


@dataclass
class Batch:
    """Lines read from the spool, to be confirmed with ``Spool.confirm``.
    ``segment`` is None for lines held in memory while the disk is full."""

    segment: int | None
    start: int
    end: int
    start_lines: int
    count: int  # lines covered, invalid ones included
    lines: list[str]


class Spool:
    """Write-ahead log of every line for Carbon, in numbered segment files.

    Every line is appended here before any send: a crash, a SIGKILL or a hung
    Carbon cannot lose what was handed over. Each append reaches the kernel at
    once (a process crash loses nothing); an fsync follows at most every
    ``fsync_interval_s`` (an append later than that is synced at once, and
    ``sync_due()``/``sync()`` catch up), so a power cut loses at most that
    much, while a busy collector does not wear an SD card with an fsync per
    line.

    Carbon's confirmations move a per-segment offset forward (``confirm``);
    the offsets and the recent confirmations (the resend window) are kept in
    ``cursor.json`` next to the segments. Confirmed segments stay on disk
    while the resend window may still need them, so the window survives a
    power cut; ``rewind`` puts those lines back to be sent again. A stale or
    lost cursor file only means lines are sent again, which is harmless
    (whisper keeps one value per timestamp).

    A torn last line (the process died mid-write) is discarded on load,
    never sent, and so is a line that is not a valid Carbon line. Only files
    named like our segments count: a stray ``backup-old.spool`` is left alone.
    When more than ``max_lines`` are unsent, the oldest go first, counted in
    ``dropped_lines`` and said once per episode. When the disk refuses a write
    (full), lines wait in memory (at most ``memory_max_lines``, then the
    oldest are dropped and counted) and go to disk once it takes them again.
    """

    SUFFIX = ".spool"

    def __init__(
        self,
        directory: Path | str,
        max_lines: int = 2_000_000,
        segment_lines: int = 50_000,
        fsync_interval_s: float = 10.0,
        memory_max_lines: int = MEMORY_MAX_LINES,
    ) -> None:
        self.directory = Path(directory)
        self.fsync_interval_s = fsync_interval_s
        self.max_lines = max_lines
        self.segment_lines = segment_lines
        self.memory_max_lines = memory_max_lines
        self.dropped_lines = 0
        self.discarded_lines = 0  # torn or invalid lines found on disk
        self._last_fsync = -math.inf
        self._unsynced = False
        self._unsynced_since = 0.0
        # Set by a CarbonClient, whose sender calls sync_due(): appends then
        # never fsync themselves, and a cycle's appends share one fsync.
        self.deferred_fsync = False
        self._cursor_saved_at = -math.inf
        self._segments: dict[int, _Segment] = {}
        self._handle: Any = None  # the segment being appended to
        self._active: int | None = None
        self._rotate = False
        self._memory: deque[str] = deque()
        self._disk_error = ""
        self._capped = False
        # (confirmed at wall time, segment, start offset, start lines, lines)
        self._marks: deque[tuple[float, int, int, int, int]] = deque()
        # The resend window of lines confirmed from memory (the disk was full):
        # (confirmed at, lines), so a carbon-cache that dies takes none of them.
        self._memory_marks: deque[tuple[float, list[str]]] = deque()
        self._appended: dict[int, int] = {}  # segment -> end offset of our appends
        self._lock = threading.RLock()
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self._segment_files():
            number = int(path.name[:12])
            self._segments[number] = self._load_segment(number, path)
        self._load_cursor()
        for segment in self._segments.values():
            if segment.lines < 0:  # not in the cursor: count (a 2,000,000-line
                segment.lines = _count_lines(segment.path, segment.size)  # spool: ~100 MB)

    # Loading

    def _segment_files(self) -> list[Path]:
        try:
            entries = sorted(self.directory.iterdir())
        except OSError as exc:
            log.error("spool %s unreadable: %s", self.directory, exc)
            return []
        return [p for p in entries if SEGMENT_NAME.fullmatch(p.name) and p.is_file()]

    def _load_segment(self, number: int, path: Path) -> _Segment:
        """Count complete lines; cut a torn tail left by a crash."""
        size = path.stat().st_size
        complete = size
        if size:
            with open(path, "rb") as handle:
                handle.seek(max(0, size - MAX_LINE_BYTES * 2))
                tail = handle.read()
            last = tail.rfind(b"\n")
            complete = size - len(tail) + last + 1 if last >= 0 else 0
        if complete < size:
            log.warning("spool %s: discarding a torn last line left by a crash", path.name)
            self.discarded_lines += 1
            with open(path, "r+b") as handle:
                handle.truncate(complete)
                os.fsync(handle.fileno())
        return _Segment(number, path, size=complete, lines=-1)  # counted after the cursor

    def _load_cursor(self) -> None:
        path = self.directory / CURSOR_NAME
        try:
            state = json.loads(path.read_text(encoding="ascii"))
            known = {int(k): [int(x) for x in v] for k, v in state.get("segments", {}).items()}
            marks = [
                tuple(float(x) if i == 0 else int(x) for i, x in enumerate(m))
                for m in state.get("window", [])
            ]
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("spool cursor %s unreadable (%s): sending the whole spool again", path, exc)
            return
        for number, (size, count, sent_offset, sent_lines) in known.items():
            segment = self._segments.get(number)
            if segment is None or not 0 <= sent_offset <= min(size, segment.size):
                continue
            if size == segment.size:
                segment.lines = count
            elif size < segment.size:  # appended since: count only the rest
                segment.lines = count + self._count_from(segment.path, size)
            segment.sent_offset, segment.sent_lines = sent_offset, sent_lines
            segment.high_lines = sent_lines
        for mark in marks:
            if len(mark) == 5 and mark[1] in self._segments:
                self._marks.append(mark)  # type: ignore[arg-type]

    @staticmethod
    def _count_from(path: Path, start: int) -> int:
        with open(path, "rb") as handle:
            handle.seek(start)
            return handle.read().count(b"\n")

    def _save_cursor(self, force: bool = False) -> None:
        """Offsets and window to ``cursor.json``: at most once a second, no
        fsync (a stale cursor only resends lines)."""
        now = time.monotonic()
        if not force and now - self._cursor_saved_at < 1.0:
            return
        self._cursor_saved_at = now
        state = {
            # Sizes and line counts spare counting a big spool at start.
            "segments": {
                str(n): [s.size, s.lines, s.sent_offset, s.sent_lines]
                for n, s in self._segments.items()
            },
            "window": [list(mark) for mark in self._marks],
        }
        path = self.directory / CURSOR_NAME
        temporary = path.with_name(CURSOR_NAME + ".tmp")
        try:
            temporary.write_text(json.dumps(state), encoding="ascii")
            os.replace(temporary, path)
        except OSError as exc:
            log.debug("spool cursor not saved: %s", exc)

    # Size

    def __len__(self) -> int:
        """Lines not yet confirmed by Carbon (those sent again included)."""
        with self._lock:
            return sum(s.unsent for s in self._segments.values()) + len(self._memory)

    def backlog(self) -> int:
        """Lines Carbon never confirmed: the resend window sent again after
        a restart or an outage is not a backlog."""
        with self._lock:
            return sum(s.never_sent for s in self._segments.values()) + len(self._memory)

    # Appending

    def append(self, lines: Sequence[str]) -> bool:
        """Add lines at the end, then enforce the cap. True when they are on
        disk; False when the disk refused them and they wait in memory."""
        if not lines:
            return True
        with self._lock:
            if self._memory and not self._write_memory():
                self._keep_in_memory(lines)
                return False
            try:
                self._write(lines)
            except OSError as exc:
                self._disk_failed(exc)
                self._keep_in_memory(lines)
                return False
            self._enforce_cap()
            return True

    def rotate(self) -> None:
        """Start a new segment at the next append (lines after an outage are
        then sent before the backlog)."""
        with self._lock:
            self._rotate = True

    def _write(self, lines: Sequence[str]) -> None:
        remaining = list(lines)
        while remaining:
            segment = self._writable_segment()
            room = self.segment_lines - segment.lines
            chunk, remaining = remaining[:room], remaining[room:]
            data = "".join(chunk).encode("ascii", errors="replace")
            try:
                written = self._handle.write(data)
                if written != len(data):
                    # A full disk takes what fits and says so only at the next
                    # write: a short write is a refusal (the rest is not on disk).
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                # A partial write would glue a torn line to the next one.
                with contextlib.suppress(OSError):
                    self._handle.truncate(segment.size)
                raise
            segment.size += len(data)
            segment.lines += len(chunk)
            self._appended[segment.number] = segment.size
            if not self._unsynced:
                self._unsynced, self._unsynced_since = True, time.monotonic()
            if not self.deferred_fsync:
                self._maybe_fsync()
        if self._disk_error:
            log.warning("spool %s writable again", self.directory)
            self._disk_error = ""

    def _writable_segment(self) -> _Segment:
        segment = self._segments.get(self._active) if self._active is not None else None
        if segment is None or self._rotate or segment.lines >= self.segment_lines:
            self._close_handle()
            self._save_cursor(force=True)
            number = max(self._segments, default=0) + 1
            path = self.directory / f"{number:012d}{self.SUFFIX}"
            self._handle = self._open_append(path)
            segment = self._segments[number] = _Segment(number, path)
            self._active, self._rotate = number, False
        elif self._handle is None:
            self._handle = self._open_append(segment.path)
        return segment

    def _open_append(self, path: Path) -> Any:
        return open(path, "ab", buffering=0)

    def _close_handle(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                if self._unsynced:
                    os.fsync(self._handle.fileno())  # a finished segment goes to disk now
                    self._unsynced = False
                self._handle.close()
            self._handle = None

    def _maybe_fsync(self) -> None:
        now = time.monotonic()
        if self._unsynced and now - self._last_fsync >= self.fsync_interval_s:
            os.fsync(self._handle.fileno())
            self._last_fsync, self._unsynced = now, False

    def sync_due(self, gather_s: float = 0.5) -> None:
        """fsync what was appended if the interval has passed and the oldest
        unsynced append is ``gather_s`` old (the sender calls this at least
        once a second)."""
        with self._lock:
            waited_s = time.monotonic() - self._unsynced_since
            if self._unsynced and self._handle is not None and waited_s >= gather_s:
                try:
                    self._maybe_fsync()
                except OSError as exc:
                    self._disk_failed(exc)

    def sync(self) -> None:
        """Flush what was appended since the last fsync to disk (at exit)."""
        with self._lock:
            if self._unsynced and self._handle is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self._handle.fileno())
                self._unsynced = False
            self._save_cursor(force=True)

    def close(self) -> None:
        with self._lock:
            self.sync()
            self._close_handle()

    # The disk refusing writes

    def _disk_failed(self, exc: OSError) -> None:
        if not self._disk_error:
            log.error(
                "spool %s: cannot write (%s): keeping up to %d lines in memory until it can",
                self.directory,
                exc.strerror or exc,
                self.memory_max_lines,
            )
        self._disk_error = str(exc)
        self._close_handle()

    def _write_memory(self) -> bool:
        try:
            self._write(list(self._memory))
        except OSError as exc:
            self._disk_failed(exc)
            return False
        self._memory.clear()
        return True

    def _keep_in_memory(self, lines: Sequence[str]) -> None:
        self._memory.extend(lines)
        excess = len(self._memory) - self.memory_max_lines
        if excess > 0:
            for _ in range(excess):
                self._memory.popleft()
            self._count_dropped(excess, f"{self.memory_max_lines} lines in memory, disk full")

    # The cap

    def _count_dropped(self, count: int, why: str = "") -> None:
        self.dropped_lines += count
        if not self._capped:
            log.warning(
                "spool full (%s): dropping the oldest lines; %d dropped so far",
                why or f"{self.max_lines} lines waiting",
                self.dropped_lines,
            )
            self._capped = True

    def _enforce_cap(self) -> None:
        excess = sum(s.unsent for s in self._segments.values()) - self.max_lines
        if excess <= 0:
            if self._capped:
                log.info("spool below its cap again; %d lines dropped in all", self.dropped_lines)
                self._capped = False
            return
        for segment in sorted(self._segments.values(), key=lambda s: s.number):
            if excess <= 0:
                break
            dropped = min(excess, segment.unsent)
            if not dropped:
                continue
            if dropped == segment.unsent:
                segment.sent_offset, segment.sent_lines = segment.size, segment.lines
            else:
                segment.sent_offset = self._offset_after(segment, dropped)
                segment.sent_lines += dropped
            segment.high_lines = max(segment.high_lines, segment.sent_lines)
            excess -= dropped
            self._count_dropped(dropped)
        self._forget_sent()
        self._save_cursor()

    def _offset_after(self, segment: _Segment, count: int) -> int:
        """Byte offset just past ``count`` lines from the segment's sent offset
        (bytes only: whatever the file holds, nothing is decoded)."""
        offset = segment.sent_offset
        with open(segment.path, "rb") as handle:
            handle.seek(offset)
            while count > 0:
                chunk = handle.read(_READ_CHUNK_BYTES)
                if not chunk:
                    break
                position = -1
                while count > 0:
                    position = chunk.find(b"\n", position + 1)
                    if position < 0:
                        break
                    count -= 1
                if count == 0:
                    return offset + position + 1
                offset += len(chunk)
        return segment.size

    # Reading and confirming

    def next_batch(self, max_lines: int, newest_first: bool = False) -> Batch | None:
        """Up to ``max_lines`` unsent lines, or None. ``newest_first``: lines
        waiting in memory, then the newest segment's, then the oldest
        segment's; else oldest first. Invalid lines are counted and skipped."""
        with self._lock:
            while True:
                if self._memory:
                    lines = [self._memory[i] for i in range(min(max_lines, len(self._memory)))]
                    return Batch(None, 0, 0, 0, len(lines), lines)
                waiting = sorted(n for n, s in self._segments.items() if s.unsent)
                if not waiting:
                    return None
                number = waiting[-1] if newest_first and waiting[-1] == self._active else waiting[0]
                batch = self._read(self._segments[number], max_lines)
                if batch.lines:
                    return batch
                self.confirm(batch)  # nothing valid in it: skip

    def _read(self, segment: _Segment, max_lines: int) -> Batch:
        wanted = min(segment.size - segment.sent_offset, max_lines * MAX_LINE_BYTES)
        with open(segment.path, "rb") as handle:
            handle.seek(segment.sent_offset)
            data = handle.read(wanted)
        raw = data.split(b"\n")[:-1][:max_lines]  # whole lines only
        end = segment.sent_offset + sum(len(r) + 1 for r in raw)
        lines = [r.decode("ascii", errors="replace") + "\n" for r in raw]
        valid = [line for line in lines if is_valid_line(line)]
        if len(valid) != len(lines):
            self.discarded_lines += len(lines) - len(valid)
            log.warning(
                "spool %s: %d invalid lines discarded", segment.path.name, len(lines) - len(valid)
            )
        return Batch(segment.number, segment.sent_offset, end, segment.sent_lines, len(raw), valid)

    def confirm(self, batch: Batch, keep_s: float = 0.0, keep_max_lines: int = 0) -> None:
        """``batch`` reached Carbon: move past it. With ``keep_s``, its lines
        stay on disk for that long (at most ``keep_max_lines`` in all) so
        ``rewind`` can send them again."""
        with self._lock:
            if batch.segment is None:
                taken = [self._memory.popleft() for _ in range(min(batch.count, len(self._memory)))]
                if keep_s > 0 and taken:
                    self._memory_marks.append((time.time(), taken))
                oldest, kept = time.time() - keep_s, sum(len(m[1]) for m in self._memory_marks)
                while self._memory_marks and (
                    self._memory_marks[0][0] < oldest or kept > keep_max_lines
                ):
                    kept -= len(self._memory_marks.popleft()[1])
                return
            segment = self._segments.get(batch.segment)
            if segment is None or segment.sent_offset != batch.start:
                return  # dropped or rewound meanwhile
            segment.sent_offset, segment.sent_lines = batch.end, batch.start_lines + batch.count
            segment.high_lines = max(segment.high_lines, segment.sent_lines)
            if keep_s > 0:
                self._marks.append(
                    (time.time(), batch.segment, batch.start, batch.start_lines, batch.count)
                )
            self._expire_marks(keep_s, keep_max_lines)
            self._forget_sent()
            if self._capped:
                self._enforce_cap()
            self._save_cursor()

    def _expire_marks(self, keep_s: float, keep_max_lines: int) -> None:
        oldest = time.time() - keep_s
        kept = sum(mark[4] for mark in self._marks)
        while self._marks and (self._marks[0][0] < oldest or kept > keep_max_lines):
            kept -= self._marks.popleft()[4]

    def _forget_sent(self) -> None:
        """Delete segments fully sent, not being written and out of the window."""
        needed = {mark[1] for mark in self._marks}
        for number, segment in list(self._segments.items()):
            if segment.unsent or number == self._active or number in needed:
                continue
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()
            del self._segments[number]
            self._appended.pop(number, None)

    def rewind(self, window_s: float) -> int:
        """Lines confirmed in the last ``window_s`` are unsent again (Carbon
        stopped, perhaps before writing them). Returns how many."""
        with self._lock:
            oldest = time.time() - window_s
            rewound = 0
            for confirmed_at, number, start, start_lines, _count in self._marks:
                segment = self._segments.get(number)
                if confirmed_at < oldest or segment is None or start >= segment.sent_offset:
                    continue
                rewound += segment.sent_lines - start_lines
                segment.sent_offset, segment.sent_lines = start, start_lines
            self._marks.clear()
            again = [line for at, lines in self._memory_marks if at >= oldest for line in lines]
            self._memory.extendleft(reversed(again))  # sent first, to disk first
            self._memory_marks.clear()
            rewound += len(again)
            self._forget_sent()
            self._save_cursor(force=True)
            return rewound

    def appended_confirmed(self) -> bool:
        """True when every line this Spool appended is confirmed (or dropped)."""
        with self._lock:
            if self._memory:
                return False
            for number, end in list(self._appended.items()):
                segment = self._segments.get(number)
                if segment is not None and segment.sent_offset < end:
                    return False
                if number != self._active:
                    del self._appended[number]
            return True

    def replay(self, deliver: Callable[[list[str]], bool], batch_lines: int = 50_000) -> int:
        """Send spooled lines oldest first through ``deliver(lines) -> bool``.

        Stops at the first batch that is not delivered (the rest stays, in
        order). Returns the number of lines delivered.
        """
        delivered = 0
        while True:
            batch = self.next_batch(batch_lines)
            if batch is None or not deliver(batch.lines):
                return delivered
            self.confirm(batch)
            delivered += len(batch.lines)


Destination = tuple[str, int]
# Replay batches start this small and double while Carbon confirms quickly,
# halve when it does not: progress at whatever rate Carbon reads.
FIRST_BATCH_LINES = 1000
MIN_BATCH_LINES = 100
RETRY_MAX_S = 10.0


class CarbonSlow(OSError):
    """Carbon took the connection but not the whole batch within the timeout."""


class CarbonClient:
    """Delivers lines to the first destination that confirms.

    With a ``spool`` (a collector's normal case) every line goes into the
    write-ahead spool first (``submit`` returns at once) and a sender thread
    delivers it from there: newest lines first, then the backlog oldest
    first, in batches sized by how fast Carbon confirms, each batch confirmed
    before the spool moves past it. Polling never waits for Carbon.
    ``send_lines`` submits and then waits for the outcome (scripts, tests).

    Without a spool, ``send_lines`` delivers in the caller's thread and
    returns False for what it could not deliver (nothing is kept).

    ``destinations`` is an ordered failover list (carbon-caches or relays).
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
        self.reachable = True
        self._active = 0  # index of the destination that last confirmed
        self.retry_preferred_s = retry_preferred_s
        self._retry_preferred_at = 0.0
        self._batch_size = min(FIRST_BATCH_LINES, batch_lines)
        self._failures = 0  # failed attempts so far (drain waits for one)
        self._retry_s = 0.0
        self._retry_at = 0.0
        self._force = False
        self._closing = False
        self._socket: socket.socket | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if spool is not None:
            # After a restart (a power cut too) Carbon may have lost what it
            # confirmed last: send the resend window again.
            rewound = spool.rewind(resend_window_s)
            if rewound:
                log.info("sending again %d lines confirmed before the restart", rewound)
            spool.rotate()
            spool.deferred_fsync = True  # the sender thread fsyncs (sync_due)
            # The sender starts with the first lines handed over (or a
            # drain): a collector that stops on a bad setting sends nothing.

    def describe_destinations(self) -> str:
        return ", ".join(f"{host}:{port}" for host, port in self.destinations)

    # Handing lines over

    def _valid(self, lines: Sequence[str]) -> list[str]:
        valid = [line for line in lines if is_valid_line(line)]
        if len(valid) != len(lines):
            self.lines_invalid += len(lines) - len(valid)
            log.error(
                "dropped %d invalid lines (a bug: lines are checked when made)",
                len(lines) - len(valid),
            )
        return valid

    def submit(self, lines: Sequence[str]) -> bool:
        """Write ``lines`` to the spool and wake the sender; never waits for
        Carbon. True when they are on disk (False: the disk refused them and
        they wait in memory)."""
        assert self.spool is not None, "submit needs a spool"
        valid = self._valid(lines)
        if not valid:
            return True
        on_disk = self.spool.append(valid)
        self.lines_spooled += len(valid)
        self._start()
        with self._cond:
            self._cond.notify_all()
        return on_disk

    def send_lines(self, lines: Sequence[str]) -> bool:
        """Deliver ``lines`` (each newline-terminated) and wait for the outcome.

        With a spool: True once they and the rest of what this client was
        given are confirmed; False as soon as an attempt fails (they stay in
        the spool). Without: True when every line was delivered.
        """
        if self.spool is None:
            valid = self._valid(lines)
            for start in range(0, len(valid), self.batch_lines):
                if not self._deliver(valid[start : start + self.batch_lines]):
                    return False
            return True
        self.submit(lines)
        return self.drain()

    def drain(self, timeout_s: float | None = None, force: bool = True) -> bool:
        """Wait until every line handed over is confirmed: True; False when
        an attempt fails first, the client closes, or ``timeout_s`` passes.
        ``force``: try at once even while backing off from an outage."""
        if self.spool is None:
            return True
        deadline = None if timeout_s is None else time.monotonic() + min(timeout_s, 1e6)
        with self._cond:
            failures = self._failures
            self._force = self._force or force
            self._cond.notify_all()
            while not self.spool.appended_confirmed():
                if self._failures != failures or self._closing:
                    return False
                remaining = 1.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 1.0))
            return True

    def flush_spool(self) -> int:
        """Replay the spool now; returns lines delivered (counted while waiting)."""
        if self.spool is None:
            return 0
        before = self.lines_sent
        self._start()
        with self._cond:
            failures = self._failures
            self._force = True
            self._cond.notify_all()
            while len(self.spool) and self._failures == failures and not self._closing:
                self._cond.wait(1.0)
        return self.lines_sent - before

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the sender (a send under way is cut: its lines stay in the
        spool) and sync the spool."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.spool is not None:
            self.spool.close()

    # The sender thread

    def _start(self) -> None:
        with self._cond:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._run, name="carbon-sender", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        assert self.spool is not None
        while True:
            with self._cond:
                while not self._closing:
                    wait_s = self._retry_at - time.monotonic()
                    if len(self.spool) and (wait_s <= 0 or self._force):
                        break
                    self._cond.wait(min(max(wait_s, 0.05), 1.0) if len(self.spool) else 1.0)
                    self.spool.sync_due()
                if self._closing:
                    return
                self._force = False
            self.spool.sync_due()
            try:
                self._send_next()
            except Exception:  # the sender must never die: lines stay in the spool
                log.exception("sending failed")
                self._after_failure(down=True)

    def _send_next(self) -> None:
        assert self.spool is not None
        batch = self.spool.next_batch(self._batch_size, newest_first=True)
        if batch is None:
            return
        started = time.monotonic()
        outcome = self._attempt(batch.lines)
        if outcome == "closing":
            return
        if outcome == "ok":
            self.spool.confirm(batch, self.resend_window_s, self.resend_max_lines)
            if time.monotonic() - started < self.timeout_s / 4:
                self._batch_size = min(self.batch_lines, self._batch_size * 2)
            with self._cond:
                self._retry_s = 0.0
                self._cond.notify_all()
            return
        self._after_failure(down=outcome == "down")

    def _after_failure(self, down: bool) -> None:
        """A slow Carbon gets smaller batches at once; a down one, the resend
        window again and a retry after a doubling pause."""
        self._batch_size = max(MIN_BATCH_LINES, self._batch_size // 2)
        with self._cond:
            self._failures += 1
            if down:
                self._retry_s = min(RETRY_MAX_S, max(0.5, self._retry_s * 2))
                self._retry_at = time.monotonic() + self._retry_s
            self._cond.notify_all()

    def _attempt(self, lines: Sequence[str]) -> str:
        """One batch to the first destination that confirms: "ok", "slow"
        (taken too slowly for its size: try smaller) or "down"."""
        if self._deliver(lines):
            return "ok"
        if self._closing:  # our own stop cut the send: not Carbon's failure
            return "closing"
        slow = "CarbonSlow" in self.last_error and len(lines) > MIN_BATCH_LINES
        if slow:
            log.debug("Carbon slow (%s): smaller batches", self.last_error)
            return "slow"
        if self.spool is not None and self.reachable_changed_to_down():
            rewound = self.spool.rewind(self.resend_window_s)
            self.spool.rotate()
            if rewound:
                log.info("%d recently confirmed lines will be sent again", rewound)
        return "down"

    def reachable_changed_to_down(self) -> bool:
        was, self.reachable = self.reachable, False
        if was:  # say it once per outage, not every cycle
            log.warning("Carbon unreachable (%s): keeping lines in the spool", self.last_error)
        return was

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
            if not self.reachable:
                log.info("Carbon reachable again at %s:%d", host, port)
                if self.spool is not None:
                    self.spool.rotate()  # lines from now on go before the backlog
            self.reachable = True
            return True
        self.last_error = "; ".join(errors)
        if self.spool is None:
            self.reachable_changed_to_down()
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

    def _send_confirmed(self, host: str, port: int, payload: bytes) -> None:
        """Send and wait for Carbon's close, all within ``timeout_s`` however
        the peer behaves (silent, trickling, chattering)."""
        deadline = time.monotonic() + self.timeout_s
        with socket.create_connection((host, port), timeout=self.timeout_s) as sock:
            with self._cond:
                if self._closing:
                    raise ConnectionAbortedError("closing")
                self._socket = sock
            try:
                self._exchange(sock, payload, deadline)
            finally:
                with self._cond:
                    self._socket = None

    def _exchange(self, sock: socket.socket, payload: bytes, deadline: float) -> None:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            sock.sendall(payload)
        except socket.timeout:
            raise CarbonSlow("batch not taken within the timeout") from None
        if not self.confirm:
            return
        # End of stream; Carbon closes once it has read it all.
        sock.shutdown(socket.SHUT_WR)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CarbonSlow("no close from Carbon after end of stream")
            sock.settimeout(remaining)
            try:
                data = sock.recv(4096)
            except socket.timeout:
                raise CarbonSlow("no close from Carbon after end of stream") from None
            if not data:
                if self._closing:  # our own shutdown, not Carbon's close
                    raise ConnectionAbortedError("closing")
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
