#!/usr/bin/env python3
"""TP-Link Kasa plugs and strips to Graphite, through python-kasa.

Discover (broadcast, plus static hosts for networks broadcast cannot cross),
poll each device's Energy module, and send per device:
``power_watts``, ``voltage_volts``, ``current_amps``, ``is_on``,
``energy_kwh`` (the device's own cumulative total) and ``energy_today_kwh``.
Each HS300 outlet is a device of its own, named by its own alias.
Non-metering devices send ``is_on`` only.

Works with python-kasa 0.7.7 (the newest for Python 3.9) and 0.12.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from typing import Any

from kasa import Credentials, Device, DeviceConfig, Discover, Module

import collector
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
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    }


def extract(device: Any) -> dict[str, float]:
    """Metrics of one plug or outlet after ``update()``."""
    values: dict[str, float] = {"is_on": 1.0 if device.is_on else 0.0}
    energy = device.modules.get(Module.Energy)
    if energy is not None:
        values.update(
            energy_values(
                energy.current_consumption,
                energy.voltage,
                energy.current,
                energy.consumption_total,
                energy.consumption_today,
            )
        )
    return values


def child_id(parent_mac: str, child: Any, index: int) -> str:
    """An outlet's stable id: the parent's MAC and the outlet's own id suffix."""
    own = str(getattr(child, "device_id", "") or "")
    # Outlet ids are the strip's device id plus a two-digit index.
    return f"{stable_id(parent_mac)}_{own[-2:] if len(own) >= 2 else f'{index:02d}'}"


def has_energy(device: Any) -> bool:
    if Module.Energy in device.modules:
        return True
    return any(Module.Energy in child.modules for child in device.children)


class KasaCollector(collector.Collector):
    source = "kasa"
    description = "TP-Link Kasa plugs and strips to Graphite"
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

    def __init__(self, runtime: collector.Runtime, args: argparse.Namespace) -> None:
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
        self.static_hosts = [
            parse_host_port(host, KASA_PORT, "KASA_HOSTS") for host in settings.kasa_hosts
        ]
        self.target, self.target_port = parse_host_port(
            settings.kasa_discovery_target, KASA_PORT, "KASA_DISCOVERY_TARGET"
        )
        if not settings.kasa_discovery_enabled and not self.static_hosts:
            raise ConfigError("KASA_HOSTS: discovery is off and no hosts are listed")
        self._handles: dict[str, Device] = {}

    # --- discover -------------------------------------------------------------

    async def _broadcast(self) -> list[Device]:
        port = self.target_port if self.target_port != KASA_PORT else None
        found = await Discover.discover(
            target=self.target,
            port=port,
            discovery_timeout=max(1, int(self.settings.kasa_discovery_timeout_s)),
            credentials=self.credentials,
            timeout=self.timeout_s,
        )
        devices = list(found.values())

        async def update(device: Device) -> Device | None:
            try:
                await asyncio.wait_for(device.update(), self.settings.device_timeout_s)
                return device
            except Exception as exc:
                self.log.warning("%s: found but not answering: %s", device.host, exc)
                return None

        updated = await asyncio.gather(*(update(device) for device in devices))
        return [device for device in updated if device is not None]

    async def _connect(self, host: str, port: int) -> Device | None:
        """A static host: unicast discovery learns its protocol (legacy, KLAP,
        AES); if UDP does not get through, try the legacy TCP protocol."""
        port_override = port if port != KASA_PORT else None
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
            if device is not None:
                await asyncio.wait_for(device.update(), self.settings.device_timeout_s)
                return device
        except Exception as exc:
            self.log.debug("%s:%d: unicast discovery failed (%s); trying TCP", host, port, exc)
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
        except Exception as exc:
            reason = str(exc) or "no answer"
            self.log.warning("%s:%d: cannot connect: %s", host, port, reason)
            return None

    async def discover(self) -> list[collector.Device]:
        tasks = [self._connect(host, port) for host, port in self.static_hosts]
        kasa_devices: list[Device] = []
        if self.settings.kasa_discovery_enabled:
            broadcast, *connected = await asyncio.gather(self._broadcast(), *tasks)
            kasa_devices.extend(broadcast)
        else:
            connected = await asyncio.gather(*tasks)
        kasa_devices.extend(device for device in connected if device is not None)

        devices: dict[str, collector.Device] = {}
        for device in kasa_devices:
            mac = stable_id(device.mac)
            old = self._handles.get(mac)
            if old is not None and old is not device:
                if old.host == device.host:
                    # Keep polling through the connection we already have.
                    await _disconnect(device)
                    device = old
                else:  # it moved (a new DHCP lease)
                    await _disconnect(old)
            self._handles[mac] = device
            # 0.7.7 says "KP115(EU)", 0.12 "KP115".
            model = device.model.partition("(")[0]
            if device.children:
                model += f" ({len(device.children)} outlets)"
            devices[mac] = collector.Device(
                stable_id=mac,
                name=device.alias or mac,
                address=device.host,
                model=model,
                measures_energy=has_energy(device),
                handle=device,
            )
        return list(devices.values())

    # --- poll and extract ---------------------------------------------------------

    async def poll(self, device: collector.Device) -> list[collector.Reading]:
        kasa_device: Device = device.handle
        try:
            await kasa_device.update()
        except BaseException:
            # Drop the connection so the next cycle starts clean.
            await _disconnect(kasa_device)
            raise
        if not kasa_device.children:
            return [collector.Reading(device.stable_id, kasa_device.alias, extract(kasa_device))]
        return [
            collector.Reading(
                child_id(kasa_device.mac, child, index), child.alias or "", extract(child)
            )
            for index, child in enumerate(kasa_device.children)
        ]

    async def close(self) -> None:
        await asyncio.gather(*(_disconnect(device) for device in self._handles.values()))


async def _disconnect(device: Device) -> None:
    try:
        await device.disconnect()
    except Exception:  # closing a broken connection may fail too; nothing to do
        pass


def main(argv: Sequence[str] | None = None) -> int:
    return collector.main(KasaCollector, argv)


if __name__ == "__main__":
    sys.exit(main())
