"""Talking to Tuya devices on the LAN through tinytuya: announcements, one
connection per device, and the connections both Tuya collectors keep.

Shared by tuya_to_graphite.py (plugs, switches, meters) and the circuit
collector's Tuya DIN-meter reader (circuit_tuya.py). ``TuyaConnection`` keeps
a persistent socket, retries once and runs in its own thread; tinytuya's own
repr and debug log show local keys, so its logger stays at WARNING and
``SecretFilter`` scrubs every handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import select
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tinytuya

from runtime import Once
from service import protect_secrets, redact_secrets
from settings import ConfigError, parse_host_port
from tuya_devicefile import DEFAULT_PORT, DETECT_ORDER, DeviceEntry, lookup, normalize_version
from tuya_scaling import (
    LAYOUT_DPS,
    Channel,
    Plan,
    as_number,
    parse_ranges,
    parse_scaling,
    plan_for,
    resolve_layout,
    short_text,
)

log = logging.getLogger("electricity.tuya")

# --- Announcements: devices telling the network where they are -------------------------


@dataclass(frozen=True)
class Announcement:
    """What a device's UDP announcement says."""

    id: str
    ip: str
    version: str
    product_key: str = ""


def parse_announcement(data: bytes, source_ip: str) -> Announcement | None:
    """A device announcement in any of its three formats (3.1 plain JSON, 3.3/3.4
    AES-ECB, 3.5 AES-GCM, all with the well-known UDP key), or None."""
    if len(data) > 4096:
        return None
    try:
        info = json.loads(tinytuya.decrypt_udp(data))
    except Exception:  # anything can arrive on a UDP port: not ours to crash on
        return None
    if not isinstance(info, dict) or not isinstance(info.get("gwId"), str):
        return None
    try:
        version = normalize_version(info.get("version"))
    except ValueError:
        version = ""
    announced_ip = info.get("ip")
    ip = announced_ip if isinstance(announced_ip, str) and announced_ip else source_ip
    product_key = info.get("productKey")
    return Announcement(
        info["gwId"], ip, version, product_key if isinstance(product_key, str) else ""
    )


_port_problems = Once(log)  # (bind, port) we could not listen on


async def listen_for_announcements(
    bind: str,
    ports: Sequence[int],
    duration_s: float,
    wanted: set[str] | None = None,
) -> dict[str, Announcement]:
    """Listen on UDP ``ports`` for up to ``duration_s``; returns announcements
    by device id, early once every ``wanted`` id is heard. Sends nothing."""
    loop = asyncio.get_running_loop()
    found: dict[str, Announcement] = {}
    complete = asyncio.Event()
    ignored = [0]

    class Listener(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple) -> None:
            announcement = parse_announcement(data, addr[0])
            if announcement is None:
                ignored[0] += 1
                return
            found[announcement.id] = announcement
            if wanted is not None and wanted <= set(found):
                complete.set()

    transports = []
    for port in ports:
        try:
            transport, _ = await loop.create_datagram_endpoint(
                Listener, local_addr=(bind, port), reuse_port=hasattr(socket, "SO_REUSEPORT")
            )
        except OSError as exc:
            _port_problems.say(
                (bind, port),
                "cannot listen for device announcements on UDP %s:%d (%s): devices without "
                "an address in devices.json need one in TUYA_ADDRESSES",
                bind,
                port,
                exc.strerror or exc,
            )
            continue
        transports.append(transport)
    if not transports:
        return found
    try:
        await asyncio.wait_for(complete.wait(), timeout=duration_s)
    except asyncio.TimeoutError:
        pass
    finally:
        for transport in transports:
            transport.close()
    if ignored[0]:
        log.debug("ignored %d datagrams that were not device announcements", ignored[0])
    return found


# --- Keeping keys out of logs ------------------------------------------------------


def protect_keys(entries: Iterable[DeviceEntry]) -> None:
    """Scrub these devices' keys from every log line, and hold tinytuya's
    logger at WARNING (its debug lines print keys)."""
    protect_secrets(entry.key for entry in entries)
    logging.getLogger("tinytuya").setLevel(logging.WARNING)


# --- Talking to a device -------------------------------------------------------------


class TuyaError(Exception):
    """A device did not answer as it should. The message says why, never the key."""


class NoAnswer(TuyaError):
    """Nothing came back: a timeout, a refused or unreachable address."""


class DeviceBusy(NoAnswer):
    """Another client holds the device's only local connection."""


class _Client(tinytuya.OutletDevice):
    """tinytuya's device, remembering why its last read failed (tinytuya turns a
    reset, a close and a timeout into the same error codes), and with a repr
    that leaves the key out."""

    receive_error: BaseException | None = None

    def _receive(self):
        try:
            return super()._receive()
        except Exception as exc:
            if self.receive_error is None:  # the first is the cause; later ones follow from it
                self.receive_error = exc
            raise

    def __repr__(self) -> str:
        return f"<Tuya device {self.id} at {self.address}:{self.port}>"


class TuyaConnection:
    """One device over tinytuya: a persistent socket, one retry, one thread.

    ``read()`` blocks and runs on the device's own worker thread (``poll()``
    puts it there), so a hung device costs only its own timeout, and never
    more than one thread: while a read is still running, the next ``poll()``
    fails at once instead of starting another.

    Each read: reports the device pushed since the last read are taken in,
    then STATUS; power DPs missing from it, or unchanged for ``stale_polls``
    reads, are asked for again with UPDATEDPS (some plugs answer STATUS from
    a cache they refresh only when asked). A device that resets us is busy
    with another client: it is left alone for ``busy_backoff_s``.
    """

    def __init__(
        self,
        entry: DeviceEntry,
        address: str,
        port: int,
        version: str,
        plan: Plan,
        *,
        timeout_s: float,
        persistent: bool = True,
        busy_backoff_s: float = 60.0,
        stale_polls: int = 3,
    ) -> None:
        # tinytuya scans the LAN for a device without an address and reads
        # ./devices.json for one without a key: neither may ever happen here.
        if not address or address in ("Auto", "0.0.0.0"):
            raise ValueError(f"{entry.label}: no address")
        if not entry.key:
            raise ValueError(f"{entry.label}: no local key in devices.json")
        self.entry = entry
        self.address = address
        self.port = port
        self.version = version
        self.plan = plan
        self.timeout_s = timeout_s
        self.persistent = persistent
        self.busy_backoff_s = busy_backoff_s
        self.stale_polls = stale_polls
        self.requested = (entry, address, port, version, plan)  # as made, to spot changes
        self.failures = 0  # consecutive failed polls
        self.answered = False  # has answered with this key since we started
        self._client: _Client | None = None
        self._busy_until = 0.0
        self._asked_by_name = False  # device22: DPs set for its queries
        self._probed = False
        self._power_dps: list[str] | None = None  # the power DPs it reports, once known
        self._updates_unanswered = 0
        self._last_power: tuple | None = None
        self._unchanged = 0
        self._running: Future | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuya")

    def __repr__(self) -> str:
        return f"TuyaConnection({self.entry.label} at {self.address}:{self.port})"

    @property
    def where(self) -> str:
        return f"{self.address}:{self.port}" if self.port != DEFAULT_PORT else self.address

    async def poll(self) -> dict[str, Any]:
        """The device's DPs now, read on its own thread. Raises TuyaError."""
        if self._running is not None and not self._running.done():
            raise NoAnswer("still waiting for its previous answer (a hung connection)")
        try:
            self._running = self._executor.submit(self.read)
        except RuntimeError:
            raise TuyaError("connection closed (its address changed)") from None
        try:
            dps = await asyncio.wrap_future(self._running)
        except BaseException:
            self.failures += 1
            raise
        self.failures = 0
        return dps

    def close(self) -> None:
        """Close the socket (on the device's thread, after any running read)."""
        try:
            self._executor.submit(self._drop_client)
        except RuntimeError:
            pass
        self._executor.shutdown(wait=False)

    # -- on the device's thread ------------------------------------------------------

    def read(self) -> dict[str, Any]:
        """Blocking: the device's DPs, this read's answers merged. Raises TuyaError."""
        now = time.monotonic()
        if now < self._busy_until:
            raise DeviceBusy(
                f"busy with another client; left alone for {math.ceil(self._busy_until - now)} "
                "s more"
            )
        try:
            client = self._client or self._new_client()
            dps: dict[str, Any] = {}
            if self.persistent:
                self._take_pushed_reports(client, dps)
            dps.update(self._status(client) if self.version else self._detect_version(client))
            self._refresh(client, dps)
        except DeviceBusy as exc:
            self._busy_until = time.monotonic() + self.busy_backoff_s
            self._drop_client()
            raise DeviceBusy(f"{exc}; left alone for {self.busy_backoff_s:g} s") from None
        except TuyaError:
            self._drop_client()
            raise
        except Exception as exc:  # tinytuya failing in a way it does not report
            self._drop_client()
            message = redact_secrets(str(exc).replace(self.entry.key, "<key>"))
            raise TuyaError(f"tinytuya failed: {exc.__class__.__name__}: {message}") from None
        self.answered = True
        return dps

    def _new_client(self) -> _Client:
        client = _Client(
            self.entry.id,
            self.address,
            self.entry.key,
            version=float(self.version or DETECT_ORDER[0]),
            port=self.port,
            connection_timeout=self.timeout_s,
            connection_retry_limit=1,  # 0 would never connect
            connection_retry_delay=0,
            persist=self.persistent,
        )
        self._client = client
        self._asked_by_name = False
        self._probed = False
        return client

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._last_power, self._unchanged = None, 0
        if client is not None:
            client.close()

    def _request(self, client: _Client, call: Callable[[], Any]) -> dict[str, Any] | None:
        """One tinytuya request: its DPs, None if nothing came back, or TuyaError."""
        client.receive_error = None
        answer = call()
        if answer is None:
            return None
        if not isinstance(answer, dict):
            raise TuyaError(f"malformed answer {short_text(answer)}")
        if "Err" in answer:
            raise self._failure(client, str(answer.get("Err")))
        dps = answer.get("dps")
        if not isinstance(dps, dict):
            raise TuyaError(f"answer without DPs: {short_text(answer, 80)}")
        return {str(dp): value for dp, value in dps.items()}

    def _status(self, client: _Client) -> dict[str, Any]:
        dps = self._request(client, client.status)
        # tinytuya spots a "device22" and asks again for DP 1 alone; such a
        # device must be asked for each DP by number.
        if client.dev_type == "device22" and not self._asked_by_name:
            client.set_dpsUsed(self.plan.wanted_dps())
            self._asked_by_name = True
            dps = self._request(client, client.status)
        if dps is None:
            raise TuyaError("no answer to STATUS")
        return dps

    def _detect_version(self, client: _Client) -> dict[str, Any]:
        reasons = []
        for version in DETECT_ORDER:
            client.set_version(float(version))
            try:
                dps = self._status(client)
            except DeviceBusy:
                raise
            except TuyaError as exc:
                reasons.append(f"{version}: {exc}")
                client.close()
                continue
            self.version = version
            log.info("%s speaks protocol %s", self.entry.label, version)
            return dps
        raise TuyaError(
            "no answer in any protocol version; set its version in TUYA_VERSIONS ("
            + "; ".join(reasons)
            + ")"
        )

    def _take_pushed_reports(self, client: _Client, dps: dict[str, Any]) -> None:
        """Reports the device sent on its own since the last read: take them in
        now, or the next request would take one for its answer."""
        for _ in range(32):
            sock = client.socket
            if sock is None:
                return
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable and not sock.recv(1, socket.MSG_PEEK):
                    readable = []
                    client.close()  # closed by the device: the next request reconnects
            except (OSError, ValueError):
                client.close()
                return
            if not readable:
                return
            pushed = client.receive()  # None: an empty acknowledgement
            if isinstance(pushed, dict) and "Err" in pushed:
                client.close()
                return
            if isinstance(pushed, dict) and isinstance(pushed.get("dps"), dict):
                dps.update((str(dp), value) for dp, value in pushed["dps"].items())

    def _refresh(self, client: _Client, dps: dict[str, Any]) -> None:
        plan = self.plan
        if plan.probe_layouts:
            resolved = resolve_layout(plan, dps)
            if resolved is None and not self._probed:
                self._probed = True
                dps.update(self._update_dps(client, LAYOUT_DPS) or {})
                resolved = resolve_layout(plan, dps)
            if resolved is not None:
                self.plan, self._power_dps = resolved, None
                log.info("%s: reading power from its %s", self.entry.label, resolved.source)
            return
        if self._power_dps is None:
            # First read: learn which power DPs the device has (a one-phase
            # meter has no phase B or C), asking once for any STATUS left out.
            wanted = [str(dp) for dp in plan.refresh_dps]
            if any(dp not in dps for dp in wanted):
                dps.update(self._update_dps(client, plan.refresh_dps) or {})
            self._power_dps = [dp for dp in wanted if dp in dps]
            self._last_power = tuple(dps.get(dp) for dp in self._power_dps)
            return
        known = self._power_dps
        current = tuple(dps.get(dp) for dp in known)
        self._unchanged = self._unchanged + 1 if current == self._last_power else 0
        self._last_power = current
        missing = [dp for dp in known if dp not in dps]
        if known and (missing or self._unchanged >= self.stale_polls):
            self._unchanged = 0
            fresh = self._update_dps(client, [int(dp) for dp in known])
            if fresh:
                dps.update(fresh)
                self._last_power = tuple(dps.get(dp) for dp in known)

    def _update_dps(self, client: _Client, dp_numbers: list[int]) -> dict[str, Any] | None:
        """UPDATEDPS: the device re-measures and reports; its values, or None.

        A device that twice reports nothing is not asked again: each silent
        request costs a timeout."""
        if self._updates_unanswered >= 2:
            return None
        try:
            fresh = self._request(client, lambda: client.updatedps(dp_numbers))
        except DeviceBusy:
            raise
        except TuyaError as exc:
            log.debug("%s: UPDATEDPS failed: %s", self.entry.label, exc)
            fresh = None
        self._updates_unanswered = 0 if fresh else self._updates_unanswered + 1
        if self._updates_unanswered == 2:
            log.info("%s does not answer UPDATEDPS: read from STATUS only", self.entry.label)
        return fresh

    def _failure(self, client: _Client, code: str) -> TuyaError:
        """tinytuya's error code, with what probably caused it."""
        cause = client.receive_error
        version = self.version or "?"
        seconds = f"{self.timeout_s:g} s"
        key_hint = (
            "it answered with this key earlier: restarting?"
            if self.answered
            else f"wrong local key (run the wizard again) or protocol version ({version}; "
            "see TUYA_VERSIONS)"
        )
        if isinstance(cause, ConnectionResetError):
            return DeviceBusy(
                "connection reset: busy with another client (the Tuya or Smart Life app, "
                "Home Assistant, another collector?)"
            )
        if code == "914":
            if isinstance(cause, socket.timeout):
                return NoAnswer(f"no answer to the session-key handshake within {seconds}")
            if isinstance(cause, tinytuya.DecodeError) and "closed" in str(cause):
                return TuyaError(f"closed the connection in the session-key handshake: {key_hint}")
            return TuyaError(f"session-key handshake failed: garbled answer, or {key_hint}")
        if code == "902" or isinstance(cause, socket.timeout):
            return NoAnswer(f"no answer within {seconds}")
        if code == "901":
            return NoAnswer(f"cannot connect to {self.where} (refused or unreachable)")
        if code == "905":
            return NoAnswer(f"{self.where} unreachable (no connection within {seconds})")
        if code in ("900", "904"):
            refused = any(b"data format error" in (msg.payload or b"") for msg in client.raw_recv)
            if refused:
                return TuyaError(f"the device cannot decrypt our request: {key_hint}")
            return TuyaError(f"unreadable answer: garbled, or {key_hint}")
        return TuyaError(f"tinytuya error {code}")


PROJECT_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TuyaSettings:
    """The TUYA_* settings, checked beyond their types (config.py explains each)."""

    devices_path: Path
    addresses: Mapping[str, str]
    versions: Mapping[str, str]
    exclude: Sequence[str]
    scaling: Mapping[str, tuple[dict[str, Channel], str | None]]
    ranges: Mapping[str, Mapping[str, tuple[float, float]]]
    timeout_s: float
    persistent: bool
    busy_backoff_s: float
    stale_polls: int
    announce_bind: str
    announce_ports: Sequence[int]
    announce_listen_s: float

    @classmethod
    def load(cls, settings: Any) -> TuyaSettings:
        """From ``settings.load_settings()``. Raises ConfigError."""
        ports = []
        for port in settings.tuya_announce_ports:
            number = as_number(port)
            if number is None or not number.is_integer() or not 1 <= number <= 65535:
                raise ConfigError("TUYA_ANNOUNCE_PORTS: must be a list of UDP ports, 1 to 65535")
            ports.append(int(number))
        if settings.tuya_stale_polls < 1:
            raise ConfigError("TUYA_STALE_POLLS: must be at least 1")
        if not all(isinstance(item, str) for item in settings.tuya_exclude):
            raise ConfigError("TUYA_EXCLUDE: must be a list of device ids or names")
        for key, value in settings.tuya_addresses.items():
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"TUYA_ADDRESSES[{key!r}]: must be 'host' or 'host:port'")
            parse_host_port(value, DEFAULT_PORT, f"TUYA_ADDRESSES[{key!r}]")
        versions = {}
        for key, value in settings.tuya_versions.items():
            try:
                versions[key] = normalize_version(value)
            except ValueError as exc:
                raise ConfigError(f"TUYA_VERSIONS[{key!r}]: {exc}") from None
        path = Path(settings.tuya_devices_file).expanduser()
        return cls(
            devices_path=path if path.is_absolute() else PROJECT_DIR / path,
            addresses=dict(settings.tuya_addresses),
            versions=versions,
            exclude=list(settings.tuya_exclude),
            scaling={
                key: parse_scaling(f"TUYA_SCALING[{key!r}]", spec)
                for key, spec in settings.tuya_scaling.items()
            },
            ranges=parse_ranges(settings.tuya_ranges),
            # One retry: a dead device costs about twice this, which the
            # runner's per-device timeout must not cut short.
            timeout_s=min(settings.tuya_timeout_s, settings.device_timeout_s / 4),
            persistent=settings.tuya_persistent,
            busy_backoff_s=settings.tuya_busy_backoff_s,
            stale_polls=settings.tuya_stale_polls,
            announce_bind=settings.tuya_announce_bind,
            announce_ports=ports,
            announce_listen_s=settings.tuya_announce_listen_s,
        )

    def address(self, entry: DeviceEntry, announced: Announcement | None) -> tuple[str, int]:
        """TUYA_ADDRESSES, else the device's latest announcement, else devices.json;
        ("", port) when none says."""
        configured = lookup(self.addresses, entry)
        if configured:
            return parse_host_port(configured, entry.port, "TUYA_ADDRESSES")
        if announced is not None and announced.ip:
            return announced.ip, entry.port
        return entry.ip, entry.port

    def version(self, entry: DeviceEntry, announced: Announcement | None) -> str:
        """TUYA_VERSIONS, else the device's announcement, else devices.json; '' to detect."""
        return (
            lookup(self.versions, entry)
            or (announced.version if announced is not None else "")
            or entry.version
        )

    def plan(self, entry: DeviceEntry) -> Plan:
        return plan_for(entry, lookup(self.scaling, entry))

    def connect(
        self, entry: DeviceEntry, address: str, port: int, version: str, plan: Plan
    ) -> TuyaConnection:
        """A connection with these settings (nothing is sent until it is polled)."""
        return TuyaConnection(
            entry,
            address,
            port,
            version,
            plan,
            timeout_s=self.timeout_s,
            persistent=self.persistent,
            busy_backoff_s=self.busy_backoff_s,
            stale_polls=self.stale_polls,
        )

    async def listen(self, wanted: set[str] | None) -> dict[str, Announcement]:
        """Announcements heard within TUYA_ANNOUNCE_LISTEN_S (early once all wanted are)."""
        return await listen_for_announcements(
            self.announce_bind, self.announce_ports, self.announce_listen_s, wanted
        )


class Connections:
    """Each device's one connection, and where its announcements say it is:
    what tuya_to_graphite.py and the circuit collector's Tuya reader both keep."""

    def __init__(self, settings: TuyaSettings) -> None:
        self.settings = settings
        self.by_id: dict[str, TuyaConnection] = {}
        self.announced: dict[str, Announcement] = {}

    def address(self, entry: DeviceEntry) -> tuple[str, int]:
        return self.settings.address(entry, self.announced.get(entry.id))

    def version(self, entry: DeviceEntry) -> str:
        return self.settings.version(entry, self.announced.get(entry.id))

    def failures(self, device_id: str) -> int:
        """Consecutive failed polls of the device's connection (0 without one)."""
        connection = self.by_id.get(device_id)
        return 0 if connection is None else connection.failures

    async def listen(self, wanted: set[str] | None) -> dict[str, Announcement]:
        """Announcements heard (see TuyaSettings.listen), remembered."""
        heard = await self.settings.listen(wanted)
        self.announced.update(heard)
        return heard

    def open(self, entry: DeviceEntry, host: str, port: int, plan: Plan) -> TuyaConnection:
        """The device's connection, a new one if where or how to reach it changed."""
        version = self.version(entry)
        old = self.by_id.get(entry.id)
        if old is not None and old.requested == (entry, host, port, version, plan):
            return old
        if old is not None:
            old.close()
        connection = self.settings.connect(entry, host, port, version, plan)
        self.by_id[entry.id] = connection
        return connection

    def close(self) -> None:
        for connection in self.by_id.values():
            connection.close()
