"""The spool: a write-ahead log of every line a collector hands to Carbon.

Numbered segment files in ``<state dir>/<source>/spool/``: every line is
appended before any send, so a crash, a SIGKILL or a hung Carbon loses
nothing; Carbon's confirmations move a per-segment cursor forward, and
confirmed segments stay on disk for the resend window. While the disk
refuses writes, lines wait (bounded) in memory. docs/delivery.md tells the
whole design and what it costs on an SD card; carbon_client.CarbonClient
is the sender that reads from here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphite_helper import MAX_LINE_BYTES, is_valid_line

log = logging.getLogger("electricity.spool")

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
        """Forget confirmations older than ``keep_s``; over ``keep_max_lines``,
        forget the oldest lines' first. Not the earliest confirmed: a backlog
        resent after the newest lines (newest segment first) would push the
        newest lines out, and they are the ones a carbon-cache that dies
        now has most likely not written yet."""
        oldest = time.time() - keep_s
        while self._marks and self._marks[0][0] < oldest:
            self._marks.popleft()
        kept = sum(mark[4] for mark in self._marks)
        while self._marks and kept > keep_max_lines:
            first = min(range(len(self._marks)), key=lambda i: self._marks[i][1:3])
            kept -= self._marks[first][4]
            del self._marks[first]

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
