"""Eastron SDM120/SDM630 circuit meters over Modbus TCP (a gateway) or Modbus RTU
(an RS-485 adapter): the Modbus reader of circuit_to_graphite.py.

One worker thread per bus (a gateway or a serial line), since a Modbus bus
carries one request at a time; one block read per meter per cycle (the
register plans are in circuit_sdm.py). A meter that stays silent costs one
timeout and gets a fresh connection; an exception reply is counted by its code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import circuit_sdm
from circuit_model import (
    Circuit,
    CircuitReader,
    CircuitReadError,
    MeterException,
    NoAnswer,
)
from runtime import Runtime

_MODBUS_EXCEPTIONS = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "server device failure",
    0x05: "acknowledge",
    0x06: "server device busy",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target device failed to respond",
}


class ModbusBus:
    """One Modbus connection, a TCP gateway or a serial port, and its meters.

    Requests run one at a time on the bus's own worker thread: an RS-485 bus
    (and a TCP gateway in front of one) carries one transaction at a time,
    while different buses run in parallel. pymodbus matches no transaction
    ids, so after any failure the client is dropped and the next request
    starts on a fresh connection: a late reply can never be taken for the
    next meter's, and pymodbus's no-response counter starts from zero.

    The synchronous client is used on purpose: one request, one reply, no
    background reconnect task and no shared no-response counter that would
    drop every unit's connection because one unit is silent (pymodbus
    3.8.6's async client does); the one worker thread makes the
    serialization plain.
    """

    def __init__(
        self,
        description: str,
        make_client: Callable[[], Any],
        timeout_s: float,
        why_unreachable: Callable[[], str],
    ) -> None:
        self.description = description
        self.why_unreachable = why_unreachable  # pymodbus keeps the reason to its log
        self.timeout_s = timeout_s
        self._make_client = make_client
        self._client: Any = None
        # When the last connection attempt failed: requests queued before
        # then fail at once instead of each waiting for its own attempt.
        self._connect_failed_at = -math.inf
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modbus")

    async def read_input_registers(self, unit: int, address: int, count: int) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._read, unit, address, count, time.monotonic()
        )

    def _read(self, unit: int, address: int, count: int, queued_at: float) -> list[int]:
        # Imported here, as in _open_bus: pymodbus is loaded only when a
        # Modbus meter is configured.
        from pymodbus.exceptions import ModbusIOException

        if self._client is None:
            if self._connect_failed_at >= queued_at:
                raise NoAnswer(f"{self.description} unreachable")
            client = self._make_client()
            if not client.connect():
                self._connect_failed_at = time.monotonic()
                client.close()
                raise NoAnswer(self.why_unreachable())
            self._client = client
        try:
            response = self._client.read_input_registers(address, count=count, slave=unit)
        except ModbusIOException:
            self._drop_client()
            raise NoAnswer(f"unit {unit}: no answer within {self.timeout_s:.3g} s") from None
        except Exception as exc:  # a lost connection, a garbled frame: start afresh
            self._drop_client()
            raise NoAnswer(f"unit {unit}: {exc.__class__.__name__}: {exc}") from None
        if response.isError():
            code = getattr(response, "exception_code", None)
            meaning = _MODBUS_EXCEPTIONS.get(code, "unknown") if code is not None else "unknown"
            shown = f"{code:#04x}" if isinstance(code, int) else "?"
            raise MeterException(f"unit {unit}: Modbus exception {shown} ({meaning})", code)
        registers = list(getattr(response, "registers", []))
        if len(registers) != count:
            self._drop_client()
            raise CircuitReadError(
                f"unit {unit}: {len(registers)} registers in the reply, asked for {count}"
            )
        return registers

    def _drop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing a broken connection may fail too
                pass
            self._client = None

    def close(self) -> None:
        """Cancel queued requests, wait for the running one, close the connection."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._drop_client()


class ModbusReader(CircuitReader):
    """Eastron SDM120/SDM630 over Modbus TCP gateways or RS-485 serial ports."""

    def __init__(self, runtime: Runtime, circuits: Sequence[Circuit]) -> None:
        super().__init__(runtime, circuits)
        # pymodbus logs every exception reply and timeout at ERROR; they are
        # counted and logged once per failing meter by the collector instead.
        if self.settings.log_level.upper() != "DEBUG":
            logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        self.timeout_s = self.settings.circuit_modbus_timeout_s
        self.buses: dict[str, ModbusBus] = {}
        self._models_checked: set[str] = set()  # stable ids
        for circuit in circuits:
            if circuit.bus not in self.buses:
                self.buses[circuit.bus] = self._open_bus(circuit)
        self._warn_slow_serial_buses(circuits)

    def _open_bus(self, circuit: Circuit) -> ModbusBus:
        from pymodbus.client import ModbusSerialClient, ModbusTcpClient

        line = circuit.serial
        if line is None:
            host, port, timeout_s = circuit.host, circuit.port, self.timeout_s

            def make_client() -> Any:
                return ModbusTcpClient(host, port=port, timeout=timeout_s, retries=0)

            def why_unreachable() -> str:
                return f"cannot connect to {host}:{port} (refused, unreachable or switched off)"

            return ModbusBus(f"gateway {host}:{port}", make_client, timeout_s, why_unreachable)

        # The transfer time of the longest reply at the bus's speed comes on top.
        longest_reply = 5 + 2 * circuit_sdm.MAX_REGISTERS_PER_REQUEST
        serial_timeout_s = self.timeout_s + line.transfer_s(longest_reply)

        def make_serial_client() -> Any:
            return ModbusSerialClient(
                line.port,
                baudrate=line.baudrate,
                parity=line.parity,
                stopbits=line.stopbits,
                bytesize=8,
                timeout=serial_timeout_s,
                retries=0,
            )

        return ModbusBus(
            f"serial port {line.port}",
            make_serial_client,
            serial_timeout_s,
            lambda: serial_port_problem(line.port),
        )

    def _warn_slow_serial_buses(self, circuits: Sequence[Circuit]) -> None:
        """A bus whose meters cannot all answer within a cycle loses readings."""
        budget_s = min(self.settings.circuit_interval_s, self.settings.device_timeout_s)
        seconds: dict[str, float] = {}
        for circuit in circuits:
            if circuit.serial is not None:
                for block in _blocks(circuit):  # request 8 bytes, reply 5 + 2 per register
                    wire_s = circuit.serial.transfer_s(8 + 5 + 2 * block.count)
                    seconds[circuit.bus] = seconds.get(circuit.bus, 0.0) + wire_s
        for port, wire_s in seconds.items():
            if wire_s > budget_s:
                self.log.warning(
                    "%s: its meters need at least %.1f s on the wire per cycle, more than %g s "
                    "(CIRCUIT_INTERVAL_S, DEVICE_TIMEOUT_S): raise the baud rate or the interval",
                    port,
                    wire_s,
                    budget_s,
                )

    async def read(self, circuit: Circuit) -> dict[str, float]:
        profile = circuit_sdm.PROFILES[circuit.profile]
        blocks = _blocks(circuit)
        bus = self.buses[circuit.bus]
        if circuit.stable_id not in self._models_checked:
            await self._check_model(circuit, profile, bus)
        replies = [
            await bus.read_input_registers(circuit.unit, block.address, block.count)
            for block in blocks
        ]
        try:
            return circuit_sdm.decode_values(profile.registers, blocks, replies)
        except ValueError as exc:
            raise CircuitReadError(f"unit {circuit.unit}: {exc}") from None

    async def _check_model(
        self, circuit: Circuit, profile: circuit_sdm.MeterProfile, bus: ModbusBus
    ) -> None:
        """Once per meter: is it the model its profile says? (A wrong profile
        would read plausible zeros, not fail.) Other failures are retried."""
        register = profile.identity_register
        if register is not None:
            try:
                await bus.read_input_registers(circuit.unit, register, 2)
            except MeterException as exc:
                if exc.code == 0x02:
                    raise MeterException(
                        f"unit {circuit.unit} refuses register {register:#x}, which every "
                        f"{profile.description} has: is it another model? (profile "
                        f"{profile.name!r})",
                        exc.code,
                    ) from None
                raise
        self._models_checked.add(circuit.stable_id)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(None, bus.close) for bus in self.buses.values())
        )


def serial_port_problem(path: str) -> str:
    """Why a serial port would not open, in words a user can act on."""
    if not os.path.exists(path):
        return f"{path} does not exist (adapter unplugged? see ls /dev/serial/by-id/)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"no permission to use {path} (add the user to the 'dialout' group)"
    return f"cannot open {path} (in use by another program?)"


def _blocks(circuit: Circuit) -> list[circuit_sdm.Block]:
    return circuit_sdm.PROFILES[circuit.profile].blocks
