"""Delivering lines to Carbon: the sender thread, confirmation, failover, pacing.

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
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence

from graphite_helper import DEFAULT_CARBON, is_valid_line
from spool import Spool

log = logging.getLogger("electricity.carbon")


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
