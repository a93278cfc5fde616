"""circuit_sdm: Eastron register profiles, float32 decoding, block read plans."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import circuit_sdm
from circuit_sdm import SDM120, SDM630, Block, decode_float32, decode_values, plan_reads
from simulators.sdm import (
    MAX_REGISTERS_PER_REQUEST,
    SimulatedSDM120,
    SimulatedSDM630,
    example_sdm120,
    example_sdm630,
)


def registers_of(value: float) -> tuple[int, int]:
    """The test's own encoder: float32 big-endian, high word first."""
    return struct.unpack(">HH", struct.pack(">f", value))


# -- float32 -------------------------------------------------------------------


def test_decode_float32_known_words() -> None:
    assert decode_float32(0x4366, 0x0000) == 230.0
    assert decode_float32(0xC4BB, 0x8000) == -1500.0
    assert decode_float32(0, 0) == 0.0
    assert math.isnan(decode_float32(0x7FC0, 0x0000))
    assert decode_float32(0x7F80, 0x0000) == math.inf


def test_decode_float32_gives_the_meters_decimal_not_the_float64_widening() -> None:
    # 0.98 as a float32 widens to 0.9800000190734863: Graphite should get 0.98.
    assert decode_float32(*registers_of(0.98)) == 0.98
    assert decode_float32(*registers_of(49.95)) == 49.95
    assert decode_float32(*registers_of(12345.67)) == 12345.67


@given(st.floats(width=32, allow_nan=False))
def test_decode_float32_is_the_same_float32(value: float) -> None:
    decoded = decode_float32(*registers_of(value))
    assert struct.pack(">f", decoded) == struct.pack(">f", value)
    assert float(f"{decoded:.9g}") == decoded  # never more digits than a float32 holds


# -- read plans ----------------------------------------------------------------


def test_each_profile_is_one_read_per_cycle() -> None:
    # Everything the collector wants from either meter lies in 0x00..0x4B.
    assert SDM120.blocks == [Block(0x00, 0x4C)]
    assert SDM630.blocks == [Block(0x00, 0x4C)]
    assert all(b.count <= MAX_REGISTERS_PER_REQUEST for b in SDM630.blocks)


def test_plan_splits_at_the_request_limit() -> None:
    assert plan_reads([0x00, 0x4E]) == [Block(0x00, 0x50)]  # exactly 80 registers
    assert plan_reads([0x00, 0x50]) == [Block(0x00, 0x02), Block(0x50, 0x02)]
    assert plan_reads([0x156, 0x00, 0x0C, 0x156]) == [Block(0x00, 0x0E), Block(0x156, 0x02)]
    assert plan_reads([]) == []


def test_plan_refuses_overlapping_values() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        plan_reads([0x00, 0x01])


@given(
    st.sets(st.integers(min_value=0, max_value=400).map(lambda n: n * 2), max_size=60),
    st.integers(min_value=2, max_value=125),
)
def test_plan_covers_every_value_within_the_limit(addresses: set, limit: int) -> None:
    blocks = plan_reads(addresses, max_registers=limit)
    for block in blocks:
        assert block.count <= limit
        # Starts on a wanted value and ends on one: what the meters accept.
        assert block.address in addresses
        assert block.end - 2 in addresses
    for address in addresses:
        assert sum(b.address <= address and address + 2 <= b.end for b in blocks) == 1
    # No two neighbouring blocks could have been one.
    for first, second in zip(blocks, blocks[1:]):
        assert second.end - first.address > limit


# -- decoding against the simulated meters' register images ------------------------


def read_like_the_meter(meter, blocks: list[Block]) -> list[list[int]]:
    replies = []
    for block in blocks:
        code, registers = meter.read_input_registers(block.address, block.count)
        assert code == 0, f"meter refused {block}: exception {code}"
        replies.append(registers)
    return replies


def test_sdm120_profile_decodes_the_simulated_meter() -> None:
    meter = example_sdm120()
    values = decode_values(
        SDM120.registers, SDM120.blocks, read_like_the_meter(meter, SDM120.blocks)
    )
    assert values == {
        "voltage_volts": 231.5,
        "current_amps": 6.5,
        "power_watts": -1480.0,
        "power_factor": 0.98,
        "frequency_hz": 49.95,
        "energy_kwh": 1234.5,
        "energy_export_kwh": 67.25,
    }


def test_sdm630_profile_decodes_phases_and_the_meters_own_totals() -> None:
    meter = example_sdm630()
    values = decode_values(
        SDM630.registers, SDM630.blocks, read_like_the_meter(meter, SDM630.blocks)
    )
    assert [values[f"l{p}_power_watts"] for p in (1, 2, 3)] == [900.0, -550.0, 2300.0]
    assert [values[f"l{p}_voltage_volts"] for p in (1, 2, 3)] == [229.0, 231.0, 233.0]
    assert [values[f"l{p}_current_amps"] for p in (1, 2, 3)] == [4.0, 2.5, 10.0]
    assert values["l3_power_factor"] == 0.99
    assert values["power_watts"] == 2650.0  # the meter's own total, 0x34
    assert values["current_amps"] == 16.5  # sum of line currents, 0x30
    assert values["voltage_volts"] == 231.0  # mean line-to-neutral voltage, 0x2A
    assert values["energy_kwh"] == 9876.5
    assert values["energy_export_kwh"] == 12.5
    assert values["frequency_hz"] == 50.02
    expected_pf = meter.values()["total_power_factor"]
    assert values["power_factor"] == pytest.approx(expected_pf, rel=1e-6)


def test_profiles_match_the_simulators_register_maps() -> None:
    """Two independent tables of Eastron's addresses agree."""
    names = {
        "voltage_volts": "voltage_v",
        "current_amps": "current_a",
        "power_watts": "power_w",
        "power_factor": "power_factor",
        "frequency_hz": "frequency_hz",
        "energy_kwh": "import_kwh",
        "energy_export_kwh": "export_kwh",
    }
    sdm120 = SimulatedSDM120.parameters()
    for metric, address in SDM120.registers.items():
        assert sdm120[names[metric]] == address, metric
    sdm630 = SimulatedSDM630.parameters()
    totals = {
        "voltage_volts": "average_voltage_v",
        "current_amps": "sum_current_a",
        "power_watts": "total_power_w",
        "power_factor": "total_power_factor",
    }
    for metric, address in SDM630.registers.items():
        if metric[:3] in ("l1_", "l2_", "l3_"):
            expected = sdm630[metric[:3] + names[metric[3:]]]
        else:
            expected = sdm630[totals.get(metric) or names[metric]]
        assert expected == address, metric


def test_decode_refuses_short_replies_and_uncovered_values() -> None:
    with pytest.raises(ValueError, match="answered with 2"):
        decode_values(SDM120.registers, SDM120.blocks, [[0, 0]])
    with pytest.raises(ValueError, match="1 replies for 0 reads"):
        decode_values({}, [], [[0, 0]])
    with pytest.raises(ValueError, match="not in any read"):
        decode_values({"power_watts": 0x0C}, [Block(0, 2)], [[0, 0]])


def test_profiles_registry() -> None:
    assert set(circuit_sdm.PROFILES) == {"sdm120", "sdm630"}
    assert (SDM120.phases, SDM630.phases) == (1, 3)
