"""The push sources' line batcher (ESP32 receiver, MQTT): lines arrive from
any thread and go to the runtime's sender in batches, health on a timer, and
the systemd watchdog is pinged only once lines are delivered or spooled."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Callable

from runtime import Runtime
from service import ensure_watchdog_covers, watchdog_ping

log = logging.getLogger("electricity.runtime")


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
