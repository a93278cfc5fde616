"""The lifecycle both Kasa simulators share: simulated devices served by one
asyncio loop on a thread of its own, all on one port P (picked free unless
given), started and stopped from any thread, usable as a context manager."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any, TypeVar

Self = TypeVar("Self", bound="LoopThreadSimulator")

# Attempts at a free port before giving up (another program may take the one
# picked before the devices bind it).
PORT_ATTEMPTS = 20


def free_port(host: str) -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LoopThreadSimulator:
    """Subclasses set ``port`` and ``discovery_host`` and implement
    ``_start_all`` (bind every device's sockets on ``self.port``; OSError if
    the port is taken) and ``_close_all``."""

    thread_name = "simulator"
    what = "simulated devices"
    port: int | None
    discovery_host: str

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self: Self) -> Self:
        if self.running:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name=self.thread_name, daemon=True)
        self._thread.start()
        ready.wait()
        self._loop = loop
        chosen = self.port
        try:
            last_error: OSError | None = None
            for _attempt in range(PORT_ATTEMPTS):
                self.port = chosen if chosen is not None else free_port(self.discovery_host)
                try:
                    self._call(self._start_all())
                    break
                except OSError as error:
                    self._call(self._close_all())
                    if chosen is not None:
                        raise
                    last_error = error
            else:
                raise OSError(f"no free port for the {self.what}: {last_error}")
        except BaseException:
            self.stop()
            self.port = chosen
            raise
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._close_all())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self._loop = self._thread = None

    def __enter__(self: Self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _call(self, coro: Any) -> Any:
        """Run ``coro`` in the loop thread and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _start_all(self) -> None:
        raise NotImplementedError

    async def _close_all(self) -> None:
        raise NotImplementedError
