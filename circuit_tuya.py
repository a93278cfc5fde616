"""Tuya DIN-rail meters as circuits: the ``tuya`` reader of circuit_to_graphite.py.

A circuit of kind ``tuya`` names its meter by device id (``connection``). Its
local key, address, protocol and DP mapping come from the wizard's
devices.json and the TUYA_* settings, as for tuya_to_graphite.py, which
leaves these devices alone (a Tuya device serves one client at a time).
Profiles: ``tuya-din`` and ``tuya-clamp`` (one phase), ``tuya-din-3p``.

Figures go back by phase (``l1_``... on three-phase circuits) for the
circuit collector to complete totals and check ranges. ``energy_kwh`` is the
meter's own total (DIN meters: DP 1, kWh x100); a meter without one has it
integrated from power, kept in the state dir.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import tuya_devicefile as devicefile
import tuya_link as link
import tuya_scaling as scaling
from circuit_model import Circuit, CircuitReader, CircuitReadError, NoAnswer
from runtime import Once, Runtime
from settings import ConfigError
from state import EnergyIntegrator


class TuyaCircuitReader(CircuitReader):
    """Tuya DIN meters and clamps, one connection (and thread) per meter."""

    def __init__(self, runtime: Runtime, circuits: Sequence[Circuit]) -> None:
        super().__init__(runtime, circuits)
        self.tuya = link.TuyaSettings.load(self.settings)
        entries, problems = devicefile.load_devices_file(self.tuya.devices_path)
        link.protect_keys(entries)
        for problem in problems:
            self.log.warning("%s: %s", self.tuya.devices_path, problem)
        by_id = {entry.id: entry for entry in entries}
        self.meters: dict[str, tuple[devicefile.DeviceEntry, scaling.Plan]] = {}
        for circuit in circuits:
            entry = by_id.get(circuit.connection)
            where = f"CIRCUITS ({circuit.name!r})"
            if entry is None:
                raise ConfigError(
                    f"{where}: Tuya device {circuit.connection} is not in "
                    f"{self.tuya.devices_path} (run the wizard again, or check the id)"
                )
            if not entry.key:
                raise ConfigError(f"{where}: {entry.label} has no local key in devices.json")
            self.meters[circuit.stable_id] = (entry, meter_plan(self.tuya.plan(entry)))
        self.connections = link.Connections(self.tuya)
        self.energy = EnergyIntegrator(
            runtime.state_path("tuya_energy.json"),
            max_gap_s=3 * float(self.settings.circuit_interval_s),
        )
        self._listen_lock = asyncio.Lock()
        self._next_listen = -math.inf
        self._said = Once(self.log)  # (device id, subject)

    async def read(self, circuit: Circuit) -> dict[str, float]:
        entry, _ = self.meters[circuit.stable_id]
        connection = await self._connection(circuit)
        try:
            dps = await connection.poll()
        except link.NoAnswer as exc:
            raise NoAnswer(str(exc)) from None
        except link.TuyaError as exc:
            raise CircuitReadError(str(exc)) from None
        values, problems = scaling.extract_values(connection.plan, dps)
        for problem in problems:
            self._said.say((entry.id, problem[:6]), "%s: %s; not sent", circuit.name, problem)
        values.pop("is_on", None)  # a circuit reports what flows, not the breaker
        if circuit.phases == 1:
            values = scaling.combine_phases(values)
        if not connection.plan.has_counter:
            power = total_power(values, circuit.phases)
            if power is not None and math.isfinite(power):
                values["energy_kwh"] = self.energy.add(entry.id, time.time(), power)
                self.energy.save()
        return values

    async def _connection(self, circuit: Circuit) -> link.TuyaConnection:
        entry, plan = self.meters[circuit.stable_id]
        host, port = self.connections.address(entry)
        if not host or self.connections.failures(entry.id) >= 2:
            # No address yet, or it stopped answering (a new DHCP lease?): its
            # announcements say where it is.
            await self._listen()
            host, port = self.connections.address(entry)
        if not host:
            raise NoAnswer(
                "no address: none in devices.json or TUYA_ADDRESSES, and no announcement heard"
            )
        return self.connections.open(entry, host, port, plan)

    async def _listen(self) -> None:
        """Listen for announcements, at most once per re-discovery interval."""
        async with self._listen_lock:
            if time.monotonic() < self._next_listen:
                return
            wanted = {
                entry.id
                for entry, _ in self.meters.values()
                if not self.connections.address(entry)[0] or self.connections.failures(entry.id)
            }
            await self.connections.listen(wanted or None)
            self._next_listen = time.monotonic() + self.settings.rediscover_interval_s

    async def close(self) -> None:
        self.connections.close()
        self.energy.save()


def meter_plan(plan: scaling.Plan) -> scaling.Plan:
    """A circuit is a meter: a device whose devices.json says nothing about its
    meter is read as a metering DIN breaker (DP 1 kWh x100, DP 6/7/8 phases)."""
    if plan.measures_power:
        return plan
    profile = scaling.METERING_BREAKER
    return scaling.Plan(
        scaling.METER,
        f"profile: {profile.description} (CIRCUITS)",
        profile.switch_dp,
        {**profile.channels, **plan.channels},
        profile.phase_dps,
    )


def total_power(values: dict[str, float], phases: int) -> float | None:
    """The circuit's power: its own figure, or the sum of every phase's."""
    if "power_watts" in values:
        return values["power_watts"]
    parts = [values.get(f"l{phase}_power_watts") for phase in range(1, phases + 1)]
    if any(part is None for part in parts):
        return None
    return math.fsum(parts)  # type: ignore[arg-type]
