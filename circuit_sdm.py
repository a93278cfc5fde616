"""Eastron SDM120 and SDM630 Modbus meters: register maps, decoding, read plans.

Data and pure functions only; the Modbus I/O lives in circuit_modbus.py.

Eastron meters keep each measurement in input registers (function code 4)
as an IEEE 754 float32 over two registers, high word first, big-endian. A
read may span parameters the collector does not want (registers in a gap
come back as 0) as long as it starts on the first register of a parameter,
ends on the last register of one and asks for at most 80 registers (40
parameters). Reading one such block instead of one register pair per value
turns seven requests per meter into one: a real gain on an RS-485 bus, where
every request costs a turnaround of tens of milliseconds.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# Eastron: "each request for data must be restricted to 40 parameters or less".
MAX_REGISTERS_PER_REQUEST = 80
REGISTERS_PER_VALUE = 2
PHASES = (1, 2, 3)


@dataclass(frozen=True)
class Block:
    """One read: ``count`` input registers from ``address``."""

    address: int
    count: int

    @property
    def end(self) -> int:
        """The first register after the block."""
        return self.address + self.count


@dataclass(frozen=True)
class MeterProfile:
    """What the collector reads from one model, as metric name -> first register."""

    name: str
    description: str
    phases: int
    registers: Mapping[str, int]
    default_baudrate: int  # as the meter leaves the factory
    # A register only this model has, read once per meter before its first
    # reading: a meter that refuses it is another model, whose block read
    # would succeed with zeros in the gaps (an SDM120 read as an SDM630).
    identity_register: int | None = None

    @property
    def blocks(self) -> list[Block]:
        return plan_reads(self.registers.values())


SDM120 = MeterProfile(
    name="sdm120",
    description="Eastron SDM120-Modbus, one phase",
    phases=1,
    registers={
        "voltage_volts": 0x00,
        "current_amps": 0x06,
        "power_watts": 0x0C,  # negative when exporting
        "power_factor": 0x1E,
        "frequency_hz": 0x46,
        "energy_kwh": 0x48,  # import
        "energy_export_kwh": 0x4A,
    },
    default_baudrate=2400,
)

# SDM630 per-phase parameters: L1's register, L2 and L3 follow one float apart.
_SDM630_PHASE_REGISTERS = {
    "voltage_volts": 0x00,  # line to neutral
    "current_amps": 0x06,
    "power_watts": 0x0C,
    "power_factor": 0x1E,
}

# The unprefixed figures of a three-phase meter are the meter's own system
# values: total power, the sum of the line currents, the mean line-to-neutral
# voltage, the total power factor.
SDM630 = MeterProfile(
    name="sdm630",
    description="Eastron SDM630-Modbus, three phase, 4 wire",
    phases=3,
    registers={
        **{
            f"l{phase}_{metric}": first + REGISTERS_PER_VALUE * (phase - 1)
            for metric, first in _SDM630_PHASE_REGISTERS.items()
            for phase in PHASES
        },
        "voltage_volts": 0x2A,  # average line to neutral
        "current_amps": 0x30,  # sum of line currents
        "power_watts": 0x34,  # total system power
        "power_factor": 0x3E,  # total system power factor
        "frequency_hz": 0x46,
        "energy_kwh": 0x48,  # import
        "energy_export_kwh": 0x4A,
    },
    default_baudrate=9600,
    identity_register=0x34,  # total system power: one-phase meters have none
)

PROFILES: dict[str, MeterProfile] = {profile.name: profile for profile in (SDM120, SDM630)}


def plan_reads(
    addresses: Iterable[int], max_registers: int = MAX_REGISTERS_PER_REQUEST
) -> list[Block]:
    """The fewest contiguous reads that cover a float32 at each address.

    Greedy from the lowest address: each block starts at the first value not
    yet covered and takes every following value that still fits, which is
    optimal for intervals of a fixed maximum length. Every block starts and
    ends on a wanted value, as the meters require.
    """
    if max_registers < REGISTERS_PER_VALUE:
        raise ValueError(f"max_registers must be at least {REGISTERS_PER_VALUE}")
    blocks: list[Block] = []
    for address in sorted(set(addresses)):
        end = address + REGISTERS_PER_VALUE
        if blocks and address < blocks[-1].end:
            raise ValueError(f"register {address:#x} overlaps the value before it")
        if blocks and end - blocks[-1].address <= max_registers:
            blocks[-1] = Block(blocks[-1].address, end - blocks[-1].address)
        else:
            blocks.append(Block(address, REGISTERS_PER_VALUE))
    return blocks


def decode_float32(high_word: int, low_word: int) -> float:
    """Two registers, high word first, as the float32 they hold (NaN and inf included).

    The result is the shortest decimal that is the same float32: the meter's
    0.98 arrives as 0.98, not as its float64 widening 0.9800000190734863.
    """
    packed = struct.pack(">HH", high_word, low_word)
    value = struct.unpack(">f", packed)[0]
    if not math.isfinite(value):
        return value
    for digits in range(6, 10):  # 9 significant digits always round-trip a float32
        shortest = float(f"{value:.{digits}g}")
        if struct.pack(">f", shortest) == packed:
            return shortest
    return value


def decode_values(
    registers: Mapping[str, int], blocks: Sequence[Block], replies: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Metric values from the replies to ``blocks`` (one reply per block, in order).

    Raises ValueError on a reply of the wrong length or a value no block covers.
    Values are returned as the meter sent them; range checks come later.
    """
    if len(replies) != len(blocks):
        raise ValueError(f"{len(replies)} replies for {len(blocks)} reads")
    words: dict[int, int] = {}
    for block, reply in zip(blocks, replies):
        if len(reply) != block.count:
            raise ValueError(
                f"read of {block.count} registers at {block.address:#x} answered with {len(reply)}"
            )
        words.update(zip(range(block.address, block.end), reply))
    values: dict[str, float] = {}
    for metric, address in registers.items():
        if address not in words or address + 1 not in words:
            raise ValueError(f"{metric} at {address:#x} is not in any read")
        values[metric] = decode_float32(words[address], words[address + 1])
    return values
