"""The simulated Eastron meters, read with the real pymodbus client."""

from __future__ import annotations

import asyncio
import math
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client import AsyncModbusTcpClient, ModbusBaseSyncClient, ModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.pdu import ExceptionResponse

from simulators.sdm import (
    MAX_REGISTERS_PER_REQUEST,
    ModbusMeterSimulator,
    ModbusRtuSimulator,
    SimulatedSDM120,
    SimulatedSDM630,
    example_sdm120,
    example_sdm630,
    float32_to_registers,
)

SDM120_UNIT = 1
SDM630_UNIT = 2
FAULT_UNIT = 3
SILENT_UNIT = 4
UNKNOWN_UNIT = 99

# Short, so the silent-unit tests stay quick; loopback answers in well under it.
CLIENT_TIMEOUT_S = 0.5


def decode_float32(registers: list[int]) -> float:
    """The test's own decoder, independent of the simulator's encoder."""
    return struct.unpack(">f", struct.pack(">HH", *registers))[0]


def read_float(client: ModbusBaseSyncClient, unit: int, address: int) -> float:
    response = client.read_input_registers(address, count=2, slave=unit)
    assert not response.isError(), response
    return decode_float32(response.registers)


def exception_code(client: ModbusBaseSyncClient, unit: int, address: int, count: int = 2) -> int:
    response = client.read_input_registers(address, count=count, slave=unit)
    assert response.isError(), response
    assert isinstance(response, ExceptionResponse)
    assert response.function_code == 0x84
    return response.exception_code


@pytest.fixture
def sdm120() -> SimulatedSDM120:
    return example_sdm120()


@pytest.fixture
def sdm630() -> SimulatedSDM630:
    return example_sdm630()


@pytest.fixture
def gateway(sdm120: SimulatedSDM120, sdm630: SimulatedSDM630):
    simulator = ModbusMeterSimulator(
        meters={
            SDM120_UNIT: sdm120,
            SDM630_UNIT: sdm630,
            FAULT_UNIT: SimulatedSDM120(fault=True),
            SILENT_UNIT: SimulatedSDM630(silent=True),
        }
    )
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def client(gateway: ModbusMeterSimulator):
    host, port = gateway.address
    # retries=0: a silent unit costs one timeout, not (retries + 1) of them.
    modbus = ModbusTcpClient(host, port=port, timeout=CLIENT_TIMEOUT_S, retries=0)
    assert modbus.connect()
    try:
        yield modbus
    finally:
        modbus.close()


# -- encoding ----------------------------------------------------------------


def test_float32_to_registers_is_big_endian_high_word_first() -> None:
    assert float32_to_registers(230.0) == [0x4366, 0x0000]
    assert float32_to_registers(-1500.0) == [0xC4BB, 0x8000]
    assert float32_to_registers(0.0) == [0, 0]
    assert math.isnan(decode_float32(float32_to_registers(float("nan"))))


@given(st.floats(width=32))
def test_float32_round_trips(value: float) -> None:
    decoded = decode_float32(float32_to_registers(value))
    assert decoded == value or (math.isnan(value) and math.isnan(decoded))


# -- meter model, without the network ----------------------------------------


def test_unset_parameters_follow_from_the_set_ones() -> None:
    meter = SimulatedSDM120(voltage_v=200.0, power_w=-1000.0, power_factor=0.8)
    values = meter.values()
    assert values["apparent_power_va"] == pytest.approx(1250.0)
    assert values["current_a"] == pytest.approx(6.25)
    assert values["reactive_power_var"] == pytest.approx(750.0)
    meter.set(import_kwh=10.0, export_kwh=2.5)
    assert meter.values()["total_kwh"] == pytest.approx(12.5)
    meter.set(total_kwh=99.0)  # set explicitly: no longer derived
    meter.set(import_kwh=11.0)
    assert meter.values()["total_kwh"] == 99.0


def test_unknown_parameter_is_refused() -> None:
    with pytest.raises(TypeError, match="total_power_w"):
        SimulatedSDM120().set(total_power_w=1.0)
    with pytest.raises(ValueError, match="phase must be 1, 2 or 3, not 4"):
        SimulatedSDM630().set_phase(4, power_w=1.0)


def test_simulator_refuses_non_loopback_hosts() -> None:
    with pytest.raises(ValueError, match="loopback"):
        ModbusMeterSimulator(host="0.0.0.0")


# -- reading over Modbus TCP -------------------------------------------------


@pytest.mark.slow
def test_sdm120_values_read_back(client: ModbusTcpClient, sdm120: SimulatedSDM120) -> None:
    expected = {
        0x00: 231.5,
        0x06: 6.5,
        0x0C: -1480.0,  # exporting
        0x1E: 0.98,
        0x46: 49.95,
        0x48: 1234.5,
        0x4A: 67.25,
        0x156: 1234.5 + 67.25,
    }
    for address, value in expected.items():
        assert read_float(client, SDM120_UNIT, address) == pytest.approx(value, rel=1e-6)
    # Derived apparent power matches what the meter reports about itself.
    assert read_float(client, SDM120_UNIT, 0x12) == pytest.approx(
        sdm120.values()["apparent_power_va"], rel=1e-6
    )


@pytest.mark.slow
def test_sdm630_per_phase_values_read_back(client: ModbusTcpClient) -> None:
    phases = {
        # address: (L1, L2, L3)
        0x00: (229.0, 231.0, 233.0),
        0x06: (4.0, 2.5, 10.0),
        0x0C: (900.0, -550.0, 2300.0),
        0x1E: (0.97, 0.95, 0.99),
    }
    for base, values in phases.items():
        for phase, value in enumerate(values):
            address = base + 2 * phase
            assert read_float(client, SDM630_UNIT, address) == pytest.approx(value, rel=1e-6)
    assert read_float(client, SDM630_UNIT, 0x34) == pytest.approx(900.0 - 550.0 + 2300.0)
    assert read_float(client, SDM630_UNIT, 0x46) == pytest.approx(50.02, rel=1e-6)
    assert read_float(client, SDM630_UNIT, 0x48) == pytest.approx(9876.5)
    assert read_float(client, SDM630_UNIT, 0x4A) == pytest.approx(12.5)


@pytest.mark.slow
def test_values_are_live(client: ModbusTcpClient, sdm120: SimulatedSDM120) -> None:
    sdm120.set(power_w=2500.0, import_kwh=1240.0)
    assert read_float(client, SDM120_UNIT, 0x0C) == 2500.0
    assert read_float(client, SDM120_UNIT, 0x48) == 1240.0


@pytest.mark.slow
def test_nan_goes_out_as_is(client: ModbusTcpClient, sdm120: SimulatedSDM120) -> None:
    # A collector must cope with a meter reporting NaN; the simulator passes it on.
    sdm120.set(power_w=float("nan"))
    assert math.isnan(read_float(client, SDM120_UNIT, 0x0C))


@pytest.mark.slow
def test_meters_can_be_added_and_removed_live(
    client: ModbusTcpClient, gateway: ModbusMeterSimulator
) -> None:
    gateway.meters[UNKNOWN_UNIT] = SimulatedSDM120(voltage_v=240.0)
    assert read_float(client, UNKNOWN_UNIT, 0x00) == 240.0
    del gateway.meters[UNKNOWN_UNIT]
    assert exception_code(client, UNKNOWN_UNIT, 0x00) == 0x0B


@pytest.mark.slow
def test_one_block_read_covers_the_instantaneous_values(client: ModbusTcpClient) -> None:
    response = client.read_input_registers(0x00, count=0x4C, slave=SDM120_UNIT)
    assert not response.isError(), response
    registers = response.registers
    assert len(registers) == 0x4C
    assert decode_float32(registers[0x00:0x02]) == pytest.approx(231.5)
    assert decode_float32(registers[0x0C:0x0E]) == pytest.approx(-1480.0)
    assert decode_float32(registers[0x4A:0x4C]) == pytest.approx(67.25)
    assert registers[0x02:0x06] == [0, 0, 0, 0]  # between parameters


@pytest.mark.slow
def test_block_reads_are_limited_to_40_parameters(client: ModbusTcpClient) -> None:
    response = client.read_input_registers(0x00, count=MAX_REGISTERS_PER_REQUEST, slave=SDM630_UNIT)
    assert not response.isError(), response
    assert decode_float32(response.registers[0x34:0x36]) == pytest.approx(2650.0)
    too_many = MAX_REGISTERS_PER_REQUEST + 2
    assert exception_code(client, SDM630_UNIT, 0x00, count=too_many) == 0x03


@pytest.mark.slow
@pytest.mark.parametrize(
    ("unit", "address", "count"),
    [
        (SDM120_UNIT, 0x34, 2),  # an SDM630 parameter the SDM120 lacks
        (SDM120_UNIT, 0x200, 2),  # beyond every table
        (SDM120_UNIT, 0x02, 2),  # a gap between parameters
        (SDM120_UNIT, 0x01, 2),  # straddles two parameters
        (SDM120_UNIT, 0x00, 1),  # half a float
        (SDM630_UNIT, 0x2C, 2),  # a gap in the SDM630 table
    ],
)
def test_unmapped_registers_give_illegal_data_address(
    client: ModbusTcpClient, unit: int, address: int, count: int
) -> None:
    assert exception_code(client, unit, address, count) == 0x02


@pytest.mark.slow
def test_holding_registers_are_not_simulated(client: ModbusTcpClient) -> None:
    response = client.read_holding_registers(0x00, count=2, slave=SDM120_UNIT)
    assert response.isError()
    assert response.exception_code == 0x02


@pytest.mark.slow
def test_fault_unit_answers_every_request_with_an_exception(
    client: ModbusTcpClient, gateway: ModbusMeterSimulator
) -> None:
    assert exception_code(client, FAULT_UNIT, 0x00) == 0x04
    assert exception_code(client, FAULT_UNIT, 0x0C) == 0x04
    gateway.meters[FAULT_UNIT].fault = False
    assert read_float(client, FAULT_UNIT, 0x00) == 230.0


@pytest.mark.slow
def test_unknown_unit_gets_gateway_target_failed(client: ModbusTcpClient) -> None:
    assert exception_code(client, UNKNOWN_UNIT, 0x00) == 0x0B


@pytest.mark.slow
def test_silent_unit_times_out_and_others_still_answer(
    client: ModbusTcpClient, gateway: ModbusMeterSimulator
) -> None:
    with pytest.raises(ModbusIOException):
        client.read_input_registers(0x00, count=2, slave=SILENT_UNIT)
    # Same connection: the next unit is unaffected.
    assert read_float(client, SDM120_UNIT, 0x00) == pytest.approx(231.5)
    gateway.meters[SILENT_UNIT].silent = False
    assert read_float(client, SILENT_UNIT, 0x00) == 230.0


@pytest.mark.slow
def test_requests_are_counted_per_unit(
    client: ModbusTcpClient, gateway: ModbusMeterSimulator
) -> None:
    gateway.reset_counts()
    for _ in range(3):
        read_float(client, SDM120_UNIT, 0x00)
    read_float(client, SDM630_UNIT, 0x34)
    exception_code(client, SDM120_UNIT, 0x34)  # refused, still a request
    exception_code(client, FAULT_UNIT, 0x00)
    exception_code(client, UNKNOWN_UNIT, 0x00)
    with pytest.raises(ModbusIOException):
        client.read_input_registers(0x00, count=2, slave=SILENT_UNIT)
    assert gateway.request_counts() == {
        SDM120_UNIT: 4,
        SDM630_UNIT: 1,
        FAULT_UNIT: 1,
        UNKNOWN_UNIT: 1,
        SILENT_UNIT: 1,
    }
    assert gateway.request_count(SDM630_UNIT) == 1
    gateway.reset_counts()
    assert gateway.request_counts() == {}


@pytest.mark.slow
def test_async_client_reads(gateway: ModbusMeterSimulator) -> None:
    host, port = gateway.address

    async def read() -> tuple[float, int]:
        client = AsyncModbusTcpClient(host, port=port, timeout=CLIENT_TIMEOUT_S, retries=0)
        await client.connect()
        try:
            power = await client.read_input_registers(0x0C, count=2, slave=SDM120_UNIT)
            unmapped = await client.read_input_registers(0x34, count=2, slave=SDM120_UNIT)
        finally:
            client.close()
        return decode_float32(power.registers), unmapped.exception_code

    assert asyncio.run(read()) == (-1480.0, 0x02)


# -- life cycle and scale ------------------------------------------------------


@pytest.mark.slow
def test_port_in_use_fails_start(gateway: ModbusMeterSimulator) -> None:
    host, port = gateway.address
    second = ModbusMeterSimulator(host=host, port=port, meters={1: SimulatedSDM120()})
    with pytest.raises(OSError, match="could not listen"):
        second.start()
    second.stop()  # harmless after a failed start


@pytest.mark.slow
def test_stop_closes_the_port(sdm120: SimulatedSDM120) -> None:
    with ModbusMeterSimulator(meters={1: sdm120}) as simulator:
        address = simulator.address
    with pytest.raises(ConnectionRefusedError), socket.create_connection(address, timeout=1):
        pass


@pytest.mark.slow
def test_twenty_meters_behind_one_gateway() -> None:
    meters = {unit: SimulatedSDM120(power_w=100.0 * unit) for unit in range(1, 21)}
    with ModbusMeterSimulator(meters=meters) as simulator:
        host, port = simulator.address
        client = ModbusTcpClient(host, port=port, timeout=CLIENT_TIMEOUT_S, retries=0)
        try:
            for unit in meters:
                assert read_float(client, unit, 0x0C) == 100.0 * unit
        finally:
            client.close()
        assert simulator.request_counts() == dict.fromkeys(meters, 1)


@pytest.mark.slow
def test_twenty_gateways_on_their_own_loopback_addresses() -> None:
    simulators = [
        ModbusMeterSimulator(host=f"127.0.0.{n}", meters={1: SimulatedSDM630(total_power_w=n)})
        for n in range(2, 22)
    ]
    try:
        for simulator in simulators:
            simulator.start()
        for n, simulator in enumerate(simulators, start=2):
            host, port = simulator.address
            assert host == f"127.0.0.{n}"
            with ModbusTcpClient(host, port=port, timeout=CLIENT_TIMEOUT_S, retries=0) as client:
                assert read_float(client, 1, 0x34) == n
    finally:
        for simulator in simulators:
            simulator.stop()


# -- Modbus RTU over a pseudo-terminal ------------------------------------------


def test_rtu_bus_over_a_pty(sdm120: SimulatedSDM120) -> None:
    pytest.importorskip("serial", reason="Modbus RTU needs pyserial (pymodbus[serial])")
    from pymodbus.client import ModbusSerialClient

    meters = {1: sdm120, 2: SimulatedSDM630(silent=True)}
    with ModbusRtuSimulator(meters=meters) as simulator:
        client = ModbusSerialClient(
            port=simulator.port, baudrate=9600, timeout=CLIENT_TIMEOUT_S, retries=0
        )
        assert client.connect()
        try:
            assert read_float(client, 1, 0x0C) == -1480.0
            assert exception_code(client, 1, 0x34) == 0x02
            # On a bus nobody answers for an absent meter, and a silent one is the same.
            for unit in (2, UNKNOWN_UNIT):
                with pytest.raises(ModbusIOException):
                    client.read_input_registers(0x00, count=2, slave=unit)
            assert read_float(client, 1, 0x00) == pytest.approx(231.5)
        finally:
            client.close()
        assert simulator.request_counts() == {1: 3, 2: 1, UNKNOWN_UNIT: 1}
