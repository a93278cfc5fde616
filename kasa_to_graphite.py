#!/usr/bin/env python3
"""TP-Link Kasa and Tapo plugs and strips to Graphite, through python-kasa.

Discover (broadcast, plus static hosts for networks broadcast cannot cross),
poll each device's Energy module, and send per device:
``power_watts``, ``voltage_volts``, ``current_amps``, ``is_on``,
``energy_kwh`` (a lifetime total: the device's own on legacy plugs, built
from the day's and month's counters on smart plugs, see kasa_energy.py)
and ``energy_today_kwh``. Each strip outlet is a device of its own, named by
its own alias. Non-metering devices send ``is_on`` only.

Smart (KLAP) devices need the owner's TP-Link account in KASA_USERNAME /
KASA_PASSWORD; a refusal is said once, plainly, and retried at rediscovery.
Works with python-kasa 0.7.7 (the newest for Python 3.9) and 0.12; see
docs/kasa.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from datetime import date
from typing import Any, Callable, Optional

from kasa import AuthenticationError, Credentials, Device, DeviceConfig, Discover, Module

import collector
from kasa_energy import SmartEnergyTotals
from runtime import Once, Runtime, run_source
from settings import ConfigError, parse_host_port

KASA_PORT = 9999


def stable_id(mac: str) -> str:
    """The MAC, upper-case with colons, whatever form the device reports."""
    digits = "".join(ch for ch in mac.upper() if ch in "0123456789ABCDEF")
    if len(digits) != 12:
        return mac.upper()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def energy_values(
    power_watts: float | None,
    voltage_volts: float | None,
    current_amps: float | None,
    energy_kwh: float | None,
    energy_today_kwh: float | None,
) -> dict[str, float]:
    """The Energy module's figures as metrics; absent or impossible ones left out.

    python-kasa has already turned mW/mV/mA/Wh into W/V/A/kWh. A negative or
    non-finite figure is a bad reading (plugs do not export).
    """
    figures = {
        "power_watts": power_watts,
        "voltage_volts": voltage_volts,
        "current_amps": current_amps,
        "energy_kwh": energy_kwh,
        "energy_today_kwh": energy_today_kwh,
    }
    return {
        name: float(value)
        for name, value in figures.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    }


LifetimeKwh = Callable[[Any, Any], Optional[float]]


def extract(device: Any, lifetime_kwh: LifetimeKwh | None = None) -> dict[str, float]:
    """Metrics of one plug or outlet after ``update()``. ``lifetime_kwh``
    (device, energy module) makes the total of a device without one."""
    values: dict[str, float] = {"is_on": 1.0 if device.is_on else 0.0}
    energy = device.modules.get(Module.Energy)
    if energy is not None:
        total = energy.consumption_total
        if total is None and lifetime_kwh is not None:
            total = lifetime_kwh(device, energy)
        values.update(
            energy_values(
                energy.current_consumption,
                energy.voltage,
                energy.current,
                total,
                energy.consumption_today,
            )
        )
    return values


def _figure(read: Callable[[], Any]) -> float | None:
    # python-kasa 0.7.7 divides None by 1000 for a counter the device omits.
    try:
        value = read()
    except (TypeError, KeyError, AttributeError):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def device_day(device: Any, energy: Any) -> str:
    """The device's own local date (its counters reset at its midnight)."""
    usage = _figure_dict(lambda: energy.energy)
    local_time = usage.get("local_time")
    if isinstance(local_time, str) and len(local_time) >= 10:
        return local_time[:10]
    try:
        return device.time.date().isoformat()
    except Exception:  # no time module answer: our own date is the best left
        return date.today().isoformat()


def _figure_dict(read: Callable[[], Any]) -> dict:
    try:
        value = read()
    except Exception:  # the module's own update error: no counters this time
        return {}
    return value if isinstance(value, dict) else {}


class CredentialsRefused(Exception):
    """A smart device refused (or needs) the TP-Link account."""


def credentials_problem(have_credentials: bool) -> str:
    """What to tell the user: the settings to check, never their values."""
    if have_credentials:
        return (
            "refused the TP-Link account in KASA_USERNAME / KASA_PASSWORD"
            " (check both; they are case-sensitive)"
        )
    return "needs its owner's TP-Link account: set KASA_USERNAME and KASA_PASSWORD"


def child_id(parent_mac: str, child: Any, index: int) -> str:
    """An outlet's stable id: the parent's MAC and the outlet's own id suffix."""
    own = str(getattr(child, "device_id", "") or "")
    # Outlet ids are the strip's device id plus a two-digit index.
    return f"{stable_id(parent_mac)}_{own[-2:] if len(own) >= 2 else f'{index:02d}'}"


def has_energy(device: Any) -> bool:
    if Module.Energy in device.modules:
        return True
    return any(Module.Energy in child.modules for child in device.children)


class _StaticHost:
    """A host from KASA_HOSTS / --host: a device from the start, so one that
    is down delays nobody and counts as failed; connected in the background."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        # Named by its address until it says its own name.
        self.device = collector.Device(stable_id=f"{host}:{port}", name=host, address=host)
        self.connecting: asyncio.Task | None = None
        self.failure: Exception | None = None  # why the last attempt failed


class KasaCollector(collector.Collector):
    source = "kasa"
    description = "TP-Link Kasa and Tapo plugs and strips to Graphite"
    interval_setting = "plug_interval_s"
    discover_columns = ("name", "mac", "address", "model", "energy meter")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--host",
            action="append",
            metavar="HOST[:PORT]",
            help="poll this device (repeatable); without --target nothing is broadcast",
        )
        parser.add_argument(
            "--target",
            metavar="ADDRESS[:PORT]",
            help="discovery broadcast address (e.g. another subnet's broadcast)",
        )

    @classmethod
    def overrides(cls, args: argparse.Namespace) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        if args.host:
            overrides["KASA_HOSTS"] = list(args.host)
            overrides["KASA_DISCOVERY_ENABLED"] = bool(args.target)
        if args.target:
            overrides["KASA_DISCOVERY_TARGET"] = args.target
            overrides["KASA_DISCOVERY_ENABLED"] = True
        return overrides

    def __init__(self, runtime: Runtime, args: argparse.Namespace) -> None:
        super().__init__(runtime, args)
        settings = self.settings
        self.credentials = None
        if settings.kasa_username and settings.kasa_password:
            self.credentials = Credentials(settings.kasa_username, settings.kasa_password)
        # python-kasa's own timeout (whole seconds) outlasts ours, so our
        # cancellation ends a poll: when both expire together, python-kasa
        # 0.7.7 takes the cancellation for its own timeout and retries three
        # times, and a dead plug holds the cycle 4 x DEVICE_TIMEOUT_S.
        self.timeout_s = int(settings.device_timeout_s) + 1
        static_hosts = [
            parse_host_port(host, KASA_PORT, "KASA_HOSTS") for host in settings.kasa_hosts
        ]
        self.target, self.target_port = parse_host_port(
            settings.kasa_discovery_target, KASA_PORT, "KASA_DISCOVERY_TARGET"
        )
        if not settings.kasa_discovery_enabled and not static_hosts:
            raise ConfigError("KASA_HOSTS: discovery is off and no hosts are listed")
        self._static: dict[str, _StaticHost] = {}
        for host, port in static_hosts:
            static = _StaticHost(host, port)
            self._static.setdefault(static.device.stable_id, static)
        self._handles: dict[str, Device] = {}  # broadcast devices by MAC
        self._devices: dict[str, collector.Device] = {}  # broadcast devices by MAC
        self._refused: dict[str, str] = {}  # stable id -> what the device said
        self._refused_polls: dict[str, str] = {}  # stable id -> "name at address"
        self._quiet = Once(self.log)
        self._listing = bool(getattr(args, "discover", False))
        self._once = bool(getattr(args, "once", False))
        self.energy_totals = SmartEnergyTotals(runtime.state_path("smart_energy.json"))

    # --- discover -------------------------------------------------------------

    def _refusal(self) -> str:
        return credentials_problem(self.credentials is not None)

    def discover_row(self, device: collector.Device) -> Sequence[str]:
        row = list(super().discover_row(device))
        if device.handle is not None:  # a static host's id is its address
            row[1] = stable_id(device.handle.mac)
        else:  # what it measures is not known: it did not let us in
            static = self._static.get(device.stable_id)
            refused = device.stable_id in self._refused or (
                static is not None and isinstance(static.failure, CredentialsRefused)
            )
            row[4] = "? (credentials refused)" if refused else "? (not answering)"
        return row

    async def _broadcast(self) -> tuple[list[Device], list[Device]]:
        """Devices found and answering, and devices that refused credentials
        (disconnected). Every other failure disconnects too."""
        port = self.target_port if self.target_port != KASA_PORT else None
        found = await Discover.discover(
            target=self.target,
            port=port,
            discovery_timeout=max(1, int(self.settings.kasa_discovery_timeout_s)),
            credentials=self.credentials,
            timeout=self.timeout_s,
        )
        static_hosts = {static.host for static in self._static.values()}
        refused: list[Device] = []

        async def update(device: Device) -> Device | None:
            if device.host in static_hosts:  # polled as the static host it is
                await _disconnect(device)
                return None
            try:
                await asyncio.wait_for(device.update(), self.settings.device_timeout_s)
            except AuthenticationError:
                await _disconnect(device)
                refused.append(device)
                return None
            except BaseException as exc:
                await _disconnect(device)
                if isinstance(exc, Exception):
                    reason = str(exc) or exc.__class__.__name__
                    self._quiet.say(
                        ("silent", device.host),
                        "%s: found but not answering: %s",
                        device.host,
                        reason,
                    )
                    return None
                raise
            self._quiet.clear(("silent", device.host), "%s answers again", device.host)
            return device

        updated = await asyncio.gather(*(update(device) for device in found.values()))
        return [device for device in updated if device is not None], refused

    async def _connect(self, host: str, port: int) -> Device:
        """A static host: unicast discovery learns its protocol (legacy, KLAP,
        AES); if UDP does not get through, try the legacy TCP protocol. A
        device that answered discovery is not tried on the legacy port."""
        port_override = port if port != KASA_PORT else None
        device: Device | None = None
        try:
            device = await asyncio.wait_for(
                Discover.discover_single(
                    host,
                    port=port_override,
                    discovery_timeout=max(1, int(self.settings.kasa_discovery_timeout_s)),
                    credentials=self.credentials,
                    timeout=self.timeout_s,
                ),
                self.settings.kasa_discovery_timeout_s + self.settings.device_timeout_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.debug("%s:%d: unicast discovery failed (%s); trying TCP", host, port, exc)
        if device is not None:
            try:
                await asyncio.wait_for(device.update(), self.settings.device_timeout_s)
            except AuthenticationError:
                await _disconnect(device)
                raise CredentialsRefused(self._refusal()) from None
            except BaseException:
                await _disconnect(device)
                raise
            return device
        config = DeviceConfig(
            host=host,
            port_override=port_override,
            credentials=self.credentials,
            timeout=self.timeout_s,
        )
        try:
            return await asyncio.wait_for(
                Device.connect(config=config), self.settings.device_timeout_s
            )
        except asyncio.TimeoutError:
            raise ConnectionError("cannot connect: no answer") from None
        except AuthenticationError:
            raise CredentialsRefused(self._refusal()) from None
        except Exception as exc:
            raise ConnectionError(f"cannot connect: {exc or exc.__class__.__name__}") from None

    async def _connect_static(self, static: _StaticHost) -> None:
        try:
            kasa_device = await self._connect(static.host, static.port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            static.failure = exc
            if self._listing:
                self.log.warning("%s:%d: %s", static.host, static.port, exc)
            return
        static.failure = None
        self._describe(static.device, kasa_device)

    def _describe(self, device: collector.Device, kasa_device: Device) -> None:
        """Fill in what the device says of itself."""
        # 0.7.7 says "KP115(EU)", 0.12 "KP115".
        model = kasa_device.model.partition("(")[0]
        if kasa_device.children:
            model += f" ({len(kasa_device.children)} outlets)"
        device.name = kasa_device.alias or stable_id(kasa_device.mac)
        device.model = model
        device.measures_energy = has_energy(kasa_device)
        device.handle = kasa_device

    async def discover(self) -> list[collector.Device]:
        for static in self._static.values():
            if static.device.handle is None and (
                static.connecting is None or static.connecting.done()
            ):
                static.failure = None
                static.connecting = asyncio.ensure_future(self._connect_static(static))
        if self.settings.kasa_discovery_enabled:
            found, refused = await self._broadcast()
            await self._adopt(found, refused)
        if self._listing:  # a listing waits for every host
            await self.connected()
        return [static.device for static in self._static.values()] + list(self._devices.values())

    async def connected(self) -> None:
        """Wait for the static hosts' connection attempts under way (a
        listing, tests and benchmarks; polling never waits for them all)."""
        await asyncio.gather(
            *(s.connecting for s in self._static.values() if s.connecting),
            return_exceptions=True,
        )

    async def _adopt(self, found: list[Device], refused: list[Device]) -> None:
        for kasa_device in found:
            mac = stable_id(kasa_device.mac)
            old = self._handles.get(mac)
            if old is not None and old is not kasa_device:
                if old.host == kasa_device.host:
                    # Keep polling through the connection we already have.
                    await _disconnect(kasa_device)
                    kasa_device = old
                else:  # it moved (a new DHCP lease)
                    await _disconnect(old)
            self._handles[mac] = kasa_device
            self._refused.pop(mac, None)
            device = self._devices.setdefault(mac, collector.Device(stable_id=mac, name=mac))
            device.address = kasa_device.host
            self._describe(device, kasa_device)
        for kasa_device in refused:
            mac = _mac_or_host(kasa_device)
            if mac in self._handles and mac not in self._refused:
                continue  # answering through the session it already has
            message = self._refusal()
            self._refused[mac] = message
            model = str(getattr(kasa_device, "model", "") or "").partition("(")[0]
            device = self._devices.setdefault(
                mac, collector.Device(stable_id=mac, name=f"{model} {kasa_device.host}".strip())
            )
            device.address = kasa_device.host
            device.model = model
            device.handle = None
            if self._listing:
                self.log.warning("%s (%s): %s", device.name, device.address, message)

    # --- poll and extract ---------------------------------------------------------

    async def _connected(self, device: collector.Device) -> Device:
        """The python-kasa device behind ``device``, or why there is none."""
        static = self._static.get(device.stable_id)
        if static is None:
            raise CredentialsRefused(self._refused.get(device.stable_id, "not connected"))
        if static.connecting is not None and not static.connecting.done():
            # Our wait may time out; the attempt carries on for the next cycle.
            await asyncio.shield(static.connecting)
        if device.handle is not None:
            return device.handle
        if static.failure is not None:
            # Raised again every cycle: without its old traceback, which would grow.
            raise static.failure.with_traceback(None)
        raise ConnectionError("not connected; tried again at rediscovery")

    def _lifetime(self, stable_id: str) -> LifetimeKwh:
        def lifetime_kwh(device: Any, energy: Any) -> float | None:
            today_kwh = _figure(lambda: energy.consumption_today)
            if today_kwh is None:
                return None
            month_kwh = _figure(lambda: energy.consumption_this_month)
            day = device_day(device, energy)
            return self.energy_totals.total_kwh(stable_id, day, today_kwh, month_kwh)

        return lifetime_kwh

    async def poll(self, device: collector.Device) -> list[collector.Reading]:
        try:
            kasa_device = device.handle or await self._connected(device)
        except CredentialsRefused:
            self._refused_polls[device.stable_id] = _where(device)
            raise
        self._refused_polls.pop(device.stable_id, None)
        try:
            try:
                await kasa_device.update()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, AuthenticationError) or await _refuses(kasa_device):
                    raise AuthenticationError(str(exc)) from None
                raise
        except AuthenticationError:
            # Refused in mid-life (the account's password changed): not asked
            # again before the next rediscovery.
            await _disconnect(kasa_device)
            refusal = CredentialsRefused(self._refusal())
            device.handle = None
            static = self._static.get(device.stable_id)
            if static is not None:
                static.failure = refusal
            else:
                self._handles.pop(device.stable_id, None)
                self._refused[device.stable_id] = str(refusal)
            self._refused_polls[device.stable_id] = _where(device)
            raise refusal from None
        except BaseException:
            # Drop the connection (and its HTTP session) so the next cycle starts clean.
            await _disconnect(kasa_device)
            raise
        if not kasa_device.children:
            mac = stable_id(kasa_device.mac)
            values = extract(kasa_device, self._lifetime(mac))
            return [collector.Reading(mac, kasa_device.alias or "", values)]
        readings = []
        for index, child in enumerate(kasa_device.children):
            outlet = child_id(kasa_device.mac, child, index)
            values = extract(child, self._lifetime(outlet))
            readings.append(collector.Reading(outlet, child.alias or "", values))
        return readings

    def end_of_cycle(self, timestamp: int) -> None:
        self.energy_totals.save()

    async def close(self) -> None:
        connecting = [s.connecting for s in self._static.values() if s.connecting]
        for task in connecting:
            task.cancel()
        await asyncio.gather(*connecting, return_exceptions=True)
        handles = list(self._handles.values())
        handles += [s.device.handle for s in self._static.values() if s.device.handle]
        await asyncio.gather(*(_disconnect(device) for device in handles))
        self.energy_totals.save(force=True)
        health = self.runtime.health
        if self._once and self._refused_polls and health.devices_failed == len(self._refused_polls):
            # The run's only failures: say so last, as a setting to fix.
            names = ", ".join(sorted(self._refused_polls.values()))
            raise ConfigError(
                f"{len(self._refused_polls)} device(s) ({names}) "
                + credentials_problem(self.credentials is not None)
            )


async def _refuses(device: Device) -> bool:
    """After a failed update, whether a KLAP device refuses our credentials:
    python-kasa 0.12 turns a refused handshake during an update into
    per-method errors, so shake hands once more to tell."""
    transport = getattr(getattr(device, "protocol", None), "_transport", None)
    if transport is None or type(transport).__name__ not in ("KlapTransport", "KlapTransportV2"):
        return False
    try:
        await transport.perform_handshake()
    except AuthenticationError:
        return True
    except Exception:  # any other failure is not a refusal
        return False
    return False


def _where(device: collector.Device) -> str:
    return device.name if device.name == device.address else f"{device.name} at {device.address}"


def _mac_or_host(device: Device) -> str:
    try:
        mac = device.mac
    except Exception:  # not known before a successful update on some versions
        mac = None
    return stable_id(mac) if isinstance(mac, str) and mac else device.host


async def _disconnect(device: Device) -> None:
    try:
        await device.disconnect()
    except Exception:  # closing a broken connection may fail too; nothing to do
        pass


def main(argv: Sequence[str] | None = None) -> int:
    return run_source(KasaCollector, argv)


if __name__ == "__main__":
    sys.exit(main())
