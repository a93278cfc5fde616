#!/usr/bin/env python3
"""Tuya Wi-Fi plugs, switches and DIN meters to Graphite, over the local network.

Run ``python -m tinytuya wizard`` once: this reads the devices.json it writes
(ids, local keys, DP mappings) and needs nothing retyped. Each cycle sends,
per device, ``power_watts``, ``voltage_volts``, ``current_amps``,
``energy_kwh`` and ``is_on`` for metering plugs and DIN meters (three-phase
meters add ``l1_``, ``l2_``, ``l3_`` figures), ``is_on`` for switch-only
plugs. Other devices (water timers, alarms, gateways) are skipped with one
line at start, as are devices configured as circuits (circuit_to_graphite.py
reads those).

``energy_kwh`` is the device's own total where it keeps one (DIN meters);
plugs report only an increment (``add_ele``), so theirs is integrated from
power samples and kept in the state dir across restarts.

Devices without an address in devices.json or TUYA_ADDRESSES are found by
listening for their own UDP announcements; nothing is broadcast. What each
device measures and how its values scale, and the connections: tuya_devicefile.py,
tuya_scaling.py and tuya_link.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import collector
import tuya_devicefile as devicefile
import tuya_link as link
import tuya_scaling as scaling
from circuit_model import configured_tuya_circuit_ids
from runtime import Once, Runtime, run_source
from state import EnergyIntegrator

# Samples further apart than this many poll intervals are not bridged when
# integrating energy: the device was away, and guessing would invent energy.
MAX_GAP_INTERVALS = 3
HEALTH_COUNTERS = ("values_out_of_range", "values_unreadable")


class TuyaCollector(collector.Collector):
    source = "tuya"
    description = "Tuya plugs, switches and DIN meters (local LAN, tinytuya) to Graphite"
    interval_setting = "plug_interval_s"
    discover_columns = ("name", "id", "address", "version", "product", "measures", "seen")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--devices",
            metavar="FILE",
            help="the devices.json of 'python -m tinytuya wizard' (or TUYA_DEVICES_FILE)",
        )

    @classmethod
    def overrides(cls, args: argparse.Namespace) -> dict[str, Any]:
        if args.devices:
            return {"TUYA_DEVICES_FILE": str(Path(args.devices).resolve())}
        return {}

    def __init__(self, runtime: Runtime, args: argparse.Namespace) -> None:
        super().__init__(runtime, args)
        settings = self.settings
        self.tuya = link.TuyaSettings.load(settings)
        if self.tuya.timeout_s < settings.tuya_timeout_s:
            self.log.info(
                "TUYA_TIMEOUT_S held at %g s, a quarter of DEVICE_TIMEOUT_S", self.tuya.timeout_s
            )
        self.circuit_ids = configured_tuya_circuit_ids(settings)
        interval_s = float(getattr(settings, self.interval_setting))
        self.energy = EnergyIntegrator(
            runtime.state_path("energy.json"), max_gap_s=MAX_GAP_INTERVALS * interval_s
        )
        self.entries: list[devicefile.DeviceEntry] = []
        self._loaded_stamp: tuple[float, int] | None = None
        self.connections = link.Connections(self.tuya)
        # Problems by (device id, subject): said at WARNING (devices left out
        # at INFO) once, then at DEBUG.
        self._said = Once(self.log)
        for counter in HEALTH_COUNTERS:
            runtime.health.count(counter, 0)
        self._load()

    # --- devices.json -----------------------------------------------------------

    def _load(self) -> None:
        """Read devices.json, again whenever it changed (the wizard was re-run)."""
        try:
            stat = self.tuya.devices_path.stat()
            stamp = (stat.st_mtime, stat.st_size)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._loaded_stamp:
            return
        entries, problems = devicefile.load_devices_file(self.tuya.devices_path)
        link.protect_keys(entries)
        for problem in problems:
            self.log.warning("%s: %s", self.tuya.devices_path, problem)
        if self._loaded_stamp is not None:
            self.log.info("%s changed: %d devices", self.tuya.devices_path, len(entries))
        self.entries, self._loaded_stamp = entries, stamp
        self._warn_unknown_names()

    def _warn_unknown_names(self) -> None:
        names = {e.id for e in self.entries} | {e.name.casefold() for e in self.entries}
        for setting, table in (
            ("TUYA_ADDRESSES", self.tuya.addresses),
            ("TUYA_VERSIONS", self.tuya.versions),
            ("TUYA_SCALING", self.tuya.scaling),
            ("TUYA_EXCLUDE", self.tuya.exclude),
        ):
            for key in map(str, table):
                if key not in names and key.strip().casefold() not in names:
                    self._said.say(
                        ("", f"{setting}:{key}"),
                        "%s: %r is not in %s",
                        setting,
                        key,
                        self.tuya.devices_path,
                    )

    def _plan(self, entry: devicefile.DeviceEntry) -> tuple[scaling.Plan | None, str]:
        """The device's plan, or None and why it is left out."""
        if devicefile.matches(self.tuya.exclude, entry):
            return None, "excluded (TUYA_EXCLUDE)"
        if entry.id in self.circuit_ids:
            return None, "a circuit (CIRCUITS: circuit_to_graphite.py reads it)"
        plan = self.tuya.plan(entry)
        if plan.kind == scaling.SKIP:
            return None, plan.describe()
        if entry.node_id:
            return None, f"a sub-device of a gateway ({plan.describe()}): not read yet"
        if not entry.key:
            return None, "no local key in devices.json: run the wizard again"
        return plan, plan.describe()

    # --- discover -------------------------------------------------------------------

    async def discover(self) -> list[collector.Device]:
        self._load()
        planned = []
        for entry in self.entries:
            plan, why = self._plan(entry)
            if plan is None:
                self._said.say(
                    (entry.id, "left out"), "%s: left out: %s", entry.label, why, level=logging.INFO
                )
            else:
                planned.append((entry, plan))
        # Listen for the devices with no address yet and for those that stopped
        # answering (a new DHCP lease); a connected device does not announce.
        wanted = {e.id for e, _ in planned if not self.connections.address(e)[0]}
        wanted |= {dev_id for dev_id, conn in self.connections.by_id.items() if conn.failures}
        if wanted:
            await self.connections.listen(wanted)
        devices = []
        for entry, plan in planned:
            host, port = self.connections.address(entry)
            if not host:
                self._said.say(
                    (entry.id, "no address"),
                    "%s: no address: none in devices.json or TUYA_ADDRESSES, and "
                    "no announcement heard within %g s",
                    entry.label,
                    self.tuya.announce_listen_s,
                )
                continue
            connection = self.connections.open(entry, host, port, plan)
            devices.append(
                collector.Device(
                    stable_id=entry.id,
                    name=entry.name,
                    address=connection.where,
                    model=entry.product_name or entry.product_id,
                    measures_energy=plan.measures_power,
                    handle=entry.id,
                )
            )
        return devices

    async def discover_rows(self) -> list[Sequence[str]]:
        """--discover: devices.json merged with what announces itself."""
        self._load()
        heard = await self.connections.listen(None)
        rows: list[Sequence[str]] = []
        for entry in self.entries:
            _, why = self._plan(entry)
            host, port = self.connections.address(entry)
            where = (
                "" if not host else host if port == devicefile.DEFAULT_PORT else f"{host}:{port}"
            )
            seen = "announced" if entry.id in heard else "not seen"
            row = (
                entry.name,
                entry.id,
                where or "-",
                self.connections.version(entry) or "?",
                entry.product_name or entry.product_id or "?",
                why,
                seen,
            )
            rows.append(row)
        known = {entry.id for entry in self.entries}
        for dev_id, announcement in sorted(heard.items()):
            if dev_id not in known:
                row = (
                    "?",
                    dev_id,
                    announcement.ip,
                    announcement.version or "?",
                    announcement.product_key or "?",
                    "not in devices.json: run the wizard again",
                    "announced",
                )
                rows.append(row)
        unseen = [entry.name for entry in self.entries if entry.id not in heard]
        if unseen:
            self.log.info(
                "%d of %d devices.json entries not heard within %g s (a device with a client "
                "connected does not announce): %s",
                len(unseen),
                len(self.entries),
                self.tuya.announce_listen_s,
                ", ".join(unseen),
            )
        return rows

    # --- poll and extract -------------------------------------------------------------

    async def poll(self, device: collector.Device) -> list[collector.Reading]:
        connection = self.connections.by_id.get(device.stable_id)
        if connection is None:
            self._said.say((device.stable_id, "gone"), "%s: gone from devices.json", device.name)
            return []
        dps = await connection.poll()
        sampled_at = time.time()
        values = self.extract(connection.entry, connection.plan, dps)
        if "power_watts" in values and not connection.plan.has_counter:
            values["energy_kwh"] = self.energy.add(
                connection.entry.id, sampled_at, values["power_watts"]
            )
        return [collector.Reading(connection.entry.id, connection.entry.name, values)]

    def extract(
        self, entry: devicefile.DeviceEntry, plan: scaling.Plan, dps: dict[str, Any]
    ) -> dict[str, float]:
        """The figures to send: scaled, checked, phases named. What cannot be
        read or makes no physical sense is logged (once) and counted."""
        values, unreadable = scaling.extract_values(plan, dps)
        kept, dropped = scaling.check_ranges(values, self.tuya.ranges.get(plan.kind, {}))
        kept, inconsistent = scaling.check_apparent_power(kept)
        self._report(entry, "values_unreadable", unreadable, len(unreadable))
        self._report(entry, "values_out_of_range", dropped + inconsistent, len(values) - len(kept))
        for metric in kept:
            self._said.clear((entry.id, metric))
        return scaling.combine_phases(kept)

    def _report(
        self, entry: devicefile.DeviceEntry, counter: str, lines: list[str], count: int
    ) -> None:
        self.runtime.health.count(counter, count)
        for line in lines:
            subject = line.split(" ")[0] if counter == "values_out_of_range" else line[:6]
            self._said.say((entry.id, subject), "%s: %s; not sent", entry.label, line)

    def end_of_cycle(self, timestamp: int) -> None:
        self.energy.save()

    async def close(self) -> None:
        self.connections.close()
        self.energy.save()


def main(argv: Sequence[str] | None = None) -> int:
    return run_source(TuyaCollector, argv)


if __name__ == "__main__":
    sys.exit(main())
