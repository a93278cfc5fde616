"""The ESP32 receiver's HTTP server: waitress, hardened for a LAN.

Slow or idle clients cannot starve the devices that post: every request must
arrive within a deadline counted from the connect, idle connections close,
and at the connection limit the one waiting longest makes room. A body over
the limit gets 413 (the rest is read and dropped, so the client reads the
answer instead of a reset), and a transfer-encoding waitress does not know is
a 400, never a 5xx.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

from flask import Flask
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher
from waitress.utilities import BadRequest as WaitressBadRequest
from waitress.utilities import ServerNotImplemented

# waitress's worker threads: requests are short, a few are enough.
SERVER_THREADS = 4


# --- The server ----------------------------------------------------------------------


# A client must send its whole request (headers and body) within this time
# of connecting or of starting it: one that trickles a header line every few
# seconds would otherwise hold its connection for ever. A firmware post takes
# well under a second.
REQUEST_DEADLINE_S = 10.0
# A connection between requests is closed after this long without a byte.
IDLE_TIMEOUT_S = 30.0
# Connections held at most; at the limit the one waiting longest for its
# request (or idle longest) is closed to make room, so slow or idle clients
# can never lock posting devices out.
CONNECTION_LIMIT = 200
# After an error answer (413 above all) the rest of the body is read and
# dropped, up to this much and this long, so the client reads the answer
# rather than a connection reset.
DRAIN_MAX_BYTES = 32 * 1024 * 1024
DRAIN_MAX_S = 10.0


class _RequestParser(HTTPRequestParser):
    """waitress answers a Transfer-Encoding it does not know with 501; to a
    client that is just a bad request (and the contract has no 5xx)."""

    error: Any  # waitress's attribute (untyped): the error to answer with

    def received(self, data: bytes) -> int:
        consumed: int = super().received(data)
        if isinstance(self.error, ServerNotImplemented):
            self.error = WaitressBadRequest(self.error.body)
        return consumed


class _Channel(HTTPChannel):
    """One connection: when its request began (for the deadline), and a
    lingering close after an answer that ends the connection (a 413 above all)."""

    parser_class = _RequestParser

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        self.request_started: float | None = self.creation_time  # None: between requests
        self.linger_on_close = False
        self.drain_until: float | None = None
        self.drained_bytes = 0

    def received(self, data: bytes) -> bool:
        between_requests = self.request is None
        result = super().received(data)
        if self.request is None:
            self.request_started = None
        elif between_requests and self.request_started is None:
            # A later request on the connection; the first one's time runs
            # from the connect, so waiting before the first byte buys nothing.
            self.request_started = time.time()
        return result

    def handle_write(self) -> None:
        if self.close_when_flushed:
            # Closing after an answer (an error, or Connection: close): the
            # client may still be sending a body nobody read, and closing now
            # would reset the connection before it reads the answer.
            self.linger_on_close = True
        super().handle_write()

    def readable(self) -> bool:
        return self.drain_until is not None or super().readable()

    def writable(self) -> bool:
        return self.drain_until is None and super().writable()

    def handle_read(self) -> None:
        if self.drain_until is None:
            super().handle_read()
            return
        try:
            data = self.recv(self.adj.recv_bytes)
        except OSError:
            data = b""
        self.drained_bytes += len(data)
        if not data or self.drained_bytes > DRAIN_MAX_BYTES or time.time() > self.drain_until:
            self.close_now()

    def handle_close(self) -> None:
        if self.linger_on_close and self.drain_until is None and self.connected:
            try:
                self.socket.shutdown(socket.SHUT_WR)  # the answer is out; now read the rest
            except OSError:
                self.close_now()
                return
            self.drain_until = time.time() + DRAIN_MAX_S
            self.will_close = False
            return
        self.close_now()

    def close_now(self) -> None:
        self.drain_until = None
        self.linger_on_close = False
        if self.socket is not None:
            super().handle_close()

    def waiting_since(self) -> float | None:
        """Since when this connection holds a slot without being served
        (None: a request of it is being served, or it is closing)."""
        if self.requests or self.will_close or self.close_when_flushed:
            return None
        if self.drain_until is not None:
            return self.drain_until - DRAIN_MAX_S
        return self.request_started if self.request_started is not None else self.last_activity


class _Server(TcpWSGIServer):
    """waitress's server, with a deadline for each request and room always
    made for a new connection (see REQUEST_DEADLINE_S, CONNECTION_LIMIT)."""

    channel_class = _Channel

    def __init__(
        self, *args: Any, on_dropped: Callable[[str, str], None] | None = None, **kwargs: Any
    ) -> None:
        self.on_dropped = on_dropped or (lambda client, why: None)
        self.request_deadline_s = REQUEST_DEADLINE_S
        self.connection_limit = CONNECTION_LIMIT
        super().__init__(*args, **kwargs)

    def _channels(self) -> list[_Channel]:
        """The open connections not already being closed."""
        return [
            channel
            for channel in list(self.active_channels.values())
            if isinstance(channel, _Channel) and not channel.will_close
        ]

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle connections (channel_timeout)
        cutoff = now - self.request_deadline_s
        for channel in self._channels():
            if channel.drain_until is not None and now > channel.drain_until:
                channel.will_close = True
                channel.drain_until = None
                channel.linger_on_close = False
            elif (
                channel.request_started is not None
                and channel.request_started < cutoff
                and not channel.requests
                and not channel.will_close
            ):
                self._drop(channel, f"no whole request within {self.request_deadline_s:g} s")

    def readable(self) -> bool:
        if self.accepting:
            self._make_room()
        return super().readable()

    def _make_room(self) -> None:
        channels = self._channels()
        excess = len(channels) - self.connection_limit + 1
        if excess <= 0:
            return
        waiting = sorted(
            (since, id(channel), channel)
            for channel in channels
            if (since := channel.waiting_since()) is not None
        )
        for _since, _id, channel in waiting[:excess]:
            self._drop(channel, f"{self.connection_limit} connections open: the oldest waiting")

    def _drop(self, channel: _Channel, why: str) -> None:
        channel.will_close = True
        channel.linger_on_close = False
        channel.drain_until = None
        self.on_dropped(str(channel.addr[0]) if channel.addr else "", why)


class ReceiverServer:
    """The app under waitress, in a thread of its own; ``stop()`` from any thread."""

    def __init__(
        self,
        app: Flask,
        host: str,
        port: int,
        max_body_bytes: int,
        threads: int = SERVER_THREADS,
        on_dropped: Callable[[str, str], None] | None = None,
        connection_limit: int = CONNECTION_LIMIT,
        request_deadline_s: float = REQUEST_DEADLINE_S,
    ) -> None:
        adj = Adjustments(
            host=host,
            port=port,
            threads=threads,
            max_request_body_size=max_body_bytes,
            channel_timeout=IDLE_TIMEOUT_S,
            cleanup_interval=1,  # how often deadlines are checked
            # waitress's own limit only if making room cannot keep up.
            connection_limit=connection_limit + 16,
            asyncore_use_poll=True,  # select() fails past 1024 descriptors
            ident="esp32-receiver",
        )
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(threads)
        self._server = _Server(
            app,
            {},
            True,
            None,
            dispatcher=dispatcher,
            adj=adj,
            sockinfo=adj.listen[0],
            on_dropped=on_dropped,
        )
        self._server.connection_limit = connection_limit
        self._server.request_deadline_s = request_deadline_s
        self.host = host
        self.port = int(self._server.effective_port)
        self._thread = threading.Thread(target=self._server.run, name="waitress", daemon=True)

    def start(self) -> ReceiverServer:
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening, let the requests under way finish, close, join."""
        server = self._server
        if not self._thread.is_alive():
            return
        # Thunks run in waitress's own loop thread: nothing else touches its sockets.
        self._in_loop(lambda: setattr(server, "accepting", False))
        dispatcher = server.task_dispatcher
        deadline = time.monotonic() + timeout_s
        while (dispatcher.queue or dispatcher.active_count) and time.monotonic() < deadline:
            time.sleep(0.01)

        def close_all() -> None:
            for channel in list(server._map.values()):
                if isinstance(channel, _Channel):
                    channel.close_now()
                elif isinstance(channel, HTTPChannel):
                    channel.handle_close()
            server.close()  # the listening socket and the trigger: the loop ends

        self._in_loop(close_all)
        self._thread.join(timeout_s)
        dispatcher.shutdown(cancel_pending=True, timeout=timeout_s)

    def _in_loop(self, thunk: Callable[[], None]) -> None:
        """Have waitress's loop thread run ``thunk``. Not pull_trigger(thunk):
        it queues the thunk before it writes the wake-up byte, so a loop woken
        by a worker in between can run close_all, and the byte then goes to a
        closed pipe, or to whatever file has its number by then. The loop runs
        thunks under the trigger's lock: holding it, the queueing and the write
        are one step, and a trigger already closed is left alone."""
        trigger = self._server.trigger
        with trigger.lock:
            if trigger._closed:
                return
            trigger.thunks.append(thunk)
            trigger._physical_pull()
