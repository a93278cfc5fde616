"""Polling sources: discover, poll, extract, on aligned cycles.

A polling source (Kasa, Tuya, circuits) subclasses ``Collector`` with its
own ``discover`` and ``poll``; ``runtime.run_source(MyCollector)`` does the rest.
``PollLoop`` samples every device on the interval's boundaries of the wall
clock (so every device of one cycle shares its timestamp), sends each
device's lines as it answers, and never lets a slow or dead device hold the
others or the next boundary.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runtime import (
    EXIT_NO_DEVICE,
    EXIT_OK,
    EXIT_UNDELIVERED,
    HEALTH_SETTLE_S,
    Once,
    Runtime,
    Source,
    format_table,
)
from service import ensure_watchdog_covers, install_signal_handlers, sd_notify, watchdog_ping

# While a device is failing, look for it again this often (it may have a new
# DHCP lease) instead of waiting for the regular re-discovery.
EARLY_REDISCOVER_S = 60.0


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


class Collector(Source):
    """One polling source: discover, poll, extract. Subclasses set ``source``
    and ``interval_setting`` and implement ``discover`` and ``poll``."""

    discover_columns: Sequence[str] = ("name", "id", "address", "model", "energy")

    def __init__(self, runtime: Runtime, args: argparse.Namespace) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.args = args
        self.log = runtime.log

    @classmethod
    def run(cls, runtime: Runtime, args: argparse.Namespace) -> int:
        return asyncio.run(_run_collector(cls, args, runtime))

    async def discover(self) -> list[Device]:
        raise NotImplementedError

    async def poll(self, device: Device) -> list[Reading]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections at exit."""

    async def discover_rows(self) -> list[Sequence[str]]:
        """--discover: one table row per device found (``discover_columns``)."""
        return [self.discover_row(device) for device in await self.discover()]

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


async def _run_collector(
    collector_cls: type[Collector], args: argparse.Namespace, runtime: Runtime
) -> int:
    collector = collector_cls(runtime, args)
    try:
        if args.discover:
            rows = await collector.discover_rows()
            sys.stdout.write(format_table(collector.discover_columns, rows))
            return EXIT_OK if rows else EXIT_NO_DEVICE
        interval_s = float(getattr(runtime.settings, collector.interval_setting))
        poll_loop = PollLoop(collector, interval_s, once=args.once)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            if poll_loop.stopping.is_set():
                return
            runtime.log.info("stopping: finishing the current cycle")
            poll_loop.stopping.set()

        install_signal_handlers(loop, stop)
        return await poll_loop.run()
    finally:
        await collector.close()
