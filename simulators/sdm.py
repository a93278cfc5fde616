"""Simulated Eastron SDM120 and SDM630 energy meters behind a Modbus gateway.

The meters speak real Modbus through a real pymodbus 3.8.6 server on a
loopback address: Modbus TCP (:class:`ModbusMeterSimulator`, one server, one
unit id per meter, like an RS485-to-TCP gateway with meters behind it) or
Modbus RTU over a pseudo-terminal (:class:`ModbusRtuSimulator`, needs pyserial).

What a collector sees, as on the real meters (Eastron's protocol documents):

- Input registers (function code 4). Each parameter is an IEEE 754 float32 in
  two registers, high word first, big-endian.
- A read must start on the first register of a parameter the model has and
  end on the last register of one. Registers between parameters inside the
  read come back as 0, so a block read such as 0x00..0x4F works. A read that
  starts or ends anywhere else is refused with exception 0x02 (illegal data
  address): an SDM120 refuses the SDM630's total power at 0x34.
- At most 80 registers (40 parameters) per request; more is refused with
  exception 0x03 (illegal data value).

Failure modes, each live-settable on the meter: ``fault=True`` answers every
request with exception 0x04 (server device failure); ``silent=True`` never
answers (the client's timeout). A unit id with no meter gets exception 0x0B
(gateway target device failed to respond) over TCP, and silence over RTU,
where there is no gateway to speak for it.

Only function codes 3 and 4 are simulated (holding registers, the meters'
settings, are all refused with 0x02); anything else gets 0x02 too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import select
import struct
import threading
import tty
from collections.abc import Mapping
from typing import ClassVar, Union

from pymodbus.datastore import ModbusBaseSlaveContext, ModbusServerContext
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
)
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

__all__ = [
    "MAX_REGISTERS_PER_REQUEST",
    "ModbusMeterSimulator",
    "ModbusRtuSimulator",
    "SimulatedSDM120",
    "SimulatedSDM630",
    "float32_to_registers",
]

# Eastron: "each request for data must be restricted to 40 parameters or less".
MAX_REGISTERS_PER_REQUEST = 80

# Modbus exception codes the simulator sends.
ILLEGAL_DATA_ADDRESS = 0x02
ILLEGAL_DATA_VALUE = 0x03
SERVER_DEVICE_FAILURE = 0x04
GATEWAY_TARGET_FAILED = 0x0B

_START_TIMEOUT_S = 10.0


def float32_to_registers(value: float) -> list[int]:
    """Encode a float as the two registers of an Eastron parameter: ``[hi, lo]``."""
    high_word, low_word = struct.unpack(">HH", struct.pack(">f", value))
    return [high_word, low_word]


class _SimulatedSDM:
    """A meter's parameters, their register image and its failure modes."""

    model = ""
    _ADDRESSES: ClassVar[Mapping[str, int]] = {}
    _DEFAULTS: ClassVar[Mapping[str, float]] = {}

    def __init__(self, *, fault: bool = False, silent: bool = False, **values: float) -> None:
        # Flags are read by the server thread on each request: flip them live.
        self.fault = fault
        self.silent = silent
        self._lock = threading.Lock()
        self._explicit: dict[str, float] = {}
        self._values: dict[str, float] = {}
        self._registers: dict[int, int] = {}
        self._first_registers = frozenset(self._ADDRESSES.values())
        self._last_registers = frozenset(a + 1 for a in self._ADDRESSES.values())
        self.set(**values)

    @classmethod
    def parameters(cls) -> dict[str, int]:
        """Parameter names and their register addresses."""
        return dict(cls._ADDRESSES)

    def set(self, **values: float) -> None:
        """Set parameters by name, e.g. ``set(voltage_v=231.5, power_w=-1200)``.

        A parameter set here keeps its value; those never set follow from the
        others (apparent power and current from power and power factor,
        totals from their parts), so a reading stays self-consistent.
        """
        unknown = sorted(set(values) - set(self._ADDRESSES))
        if unknown:
            raise TypeError(f"{self.model} has no parameter {', '.join(unknown)}")
        encoded = {name: float(value) for name, value in values.items()}
        with self._lock:
            self._explicit.update(encoded)
            full = dict(self._DEFAULTS)
            full.update(self._explicit)
            self._derive(full)
            self._values = full
            registers: dict[int, int] = {}
            for name, address in self._ADDRESSES.items():
                registers[address], registers[address + 1] = float32_to_registers(full[name])
            self._registers = registers

    def values(self) -> dict[str, float]:
        """Every parameter's current value, derived ones included."""
        with self._lock:
            return dict(self._values)

    def read_input_registers(self, address: int, count: int) -> tuple[int, list[int]]:
        """Answer a function code 4 read: ``(0, registers)`` or ``(exception_code, [])``."""
        if not 1 <= count <= MAX_REGISTERS_PER_REQUEST:
            return ILLEGAL_DATA_VALUE, []
        if address not in self._first_registers or address + count - 1 not in self._last_registers:
            return ILLEGAL_DATA_ADDRESS, []
        with self._lock:
            return 0, [self._registers.get(a, 0) for a in range(address, address + count)]

    def _derive(self, values: dict[str, float]) -> None:
        raise NotImplementedError

    def _derive_phase(self, values: dict[str, float], prefix: str) -> None:
        """Fill in one phase's S, Q, I, PF and angle from V, P and PF or I."""
        explicit = self._explicit
        voltage_v = values[prefix + "voltage_v"]
        power_w = values[prefix + "power_w"]
        if prefix + "current_a" in explicit and prefix + "power_factor" not in explicit:
            apparent_va = abs(voltage_v * values[prefix + "current_a"])
            power_factor = _clip(power_w / apparent_va) if apparent_va else 1.0
        else:
            power_factor = values[prefix + "power_factor"]
            apparent_va = abs(power_w / power_factor) if power_factor else abs(power_w)
        derived = {
            "power_factor": power_factor,
            "apparent_power_va": apparent_va,
            "current_a": apparent_va / voltage_v if voltage_v else 0.0,
            "reactive_power_var": math.sqrt(max(apparent_va**2 - power_w**2, 0.0)),
            "phase_angle_deg": math.degrees(math.acos(_clip(abs(power_factor)))),
        }
        for name, value in derived.items():
            _default(values, explicit, prefix + name, value)


def _clip(value: float) -> float:
    return max(-1.0, min(1.0, value))


def _default(values: dict[str, float], explicit: Mapping[str, float], name: str, value: float):
    """Use a derived value unless the parameter was set explicitly."""
    if name not in explicit:
        values[name] = value


_SDM120_ADDRESSES = {
    "voltage_v": 0x00,
    "current_a": 0x06,
    "power_w": 0x0C,  # negative when exporting
    "apparent_power_va": 0x12,
    "reactive_power_var": 0x18,
    "power_factor": 0x1E,
    "phase_angle_deg": 0x24,
    "frequency_hz": 0x46,
    "import_kwh": 0x48,
    "export_kwh": 0x4A,
    "import_kvarh": 0x4C,
    "export_kvarh": 0x4E,
    "total_demand_w": 0x54,
    "max_total_demand_w": 0x56,
    "import_demand_w": 0x58,
    "max_import_demand_w": 0x5A,
    "export_demand_w": 0x5C,
    "max_export_demand_w": 0x5E,
    "demand_current_a": 0x102,
    "max_demand_current_a": 0x108,
    "total_kwh": 0x156,
    "total_kvarh": 0x158,
}


class SimulatedSDM120(_SimulatedSDM):
    """A single-phase Eastron SDM120-Modbus.

    Parameters (see :meth:`parameters` for addresses): ``voltage_v``,
    ``current_a``, ``power_w`` (negative = export), ``apparent_power_va``,
    ``reactive_power_var``, ``power_factor``, ``phase_angle_deg``,
    ``frequency_hz``, ``import_kwh``, ``export_kwh``, ``import_kvarh``,
    ``export_kvarh``, demand values, ``total_kwh`` (import + export unless set),
    ``total_kvarh``.
    """

    model = "SDM120"
    _ADDRESSES = _SDM120_ADDRESSES
    _DEFAULTS = dict.fromkeys(_SDM120_ADDRESSES, 0.0)
    _DEFAULTS.update(voltage_v=230.0, power_factor=1.0, frequency_hz=50.0)

    def _derive(self, values: dict[str, float]) -> None:
        self._derive_phase(values, "")
        _default(values, self._explicit, "total_kwh", values["import_kwh"] + values["export_kwh"])
        _default(
            values, self._explicit, "total_kvarh", values["import_kvarh"] + values["export_kvarh"]
        )


PHASES = (1, 2, 3)

# Per-phase parameters: address of L1; L2 and L3 follow, one float (2 registers) apart.
_SDM630_PHASE_ADDRESSES = {
    "voltage_v": 0x00,
    "current_a": 0x06,
    "power_w": 0x0C,
    "apparent_power_va": 0x12,
    "reactive_power_var": 0x18,
    "power_factor": 0x1E,
    "phase_angle_deg": 0x24,
    "voltage_thd_pct": 0xEA,
    "current_thd_pct": 0xF0,
    "demand_current_a": 0x102,
    "max_demand_current_a": 0x108,
    "import_kwh": 0x15A,
    "export_kwh": 0x160,
    "total_kwh": 0x166,
    "import_kvarh": 0x16C,
    "export_kvarh": 0x172,
    "total_kvarh": 0x178,
}

_SDM630_ADDRESSES = {
    f"l{phase}_{name}": base + 2 * (phase - 1)
    for name, base in _SDM630_PHASE_ADDRESSES.items()
    for phase in PHASES
}
_SDM630_ADDRESSES.update(
    {
        "average_voltage_v": 0x2A,  # line to neutral
        "average_current_a": 0x2E,
        "sum_current_a": 0x30,
        "total_power_w": 0x34,
        "total_apparent_power_va": 0x38,
        "total_reactive_power_var": 0x3C,
        "total_power_factor": 0x3E,
        "total_phase_angle_deg": 0x42,
        "frequency_hz": 0x46,
        "import_kwh": 0x48,
        "export_kwh": 0x4A,
        "import_kvarh": 0x4C,
        "export_kvarh": 0x4E,
        "total_kvah": 0x50,
        "total_ah": 0x52,
        "total_demand_w": 0x54,
        "max_total_demand_w": 0x56,
        "import_demand_w": 0x58,
        "max_import_demand_w": 0x5A,
        "export_demand_w": 0x5C,
        "max_export_demand_w": 0x5E,
        "total_demand_va": 0x64,
        "max_total_demand_va": 0x66,
        "neutral_demand_current_a": 0x68,
        "max_neutral_demand_current_a": 0x6A,
        "l1_l2_voltage_v": 0xC8,
        "l2_l3_voltage_v": 0xCA,
        "l3_l1_voltage_v": 0xCC,
        "average_line_voltage_v": 0xCE,
        "neutral_current_a": 0xE0,
        "average_voltage_thd_pct": 0xF8,
        "average_current_thd_pct": 0xFA,
        "l1_l2_voltage_thd_pct": 0x14E,
        "l2_l3_voltage_thd_pct": 0x150,
        "l3_l1_voltage_thd_pct": 0x152,
        "average_line_voltage_thd_pct": 0x154,
        "total_kwh": 0x156,
        "total_kvarh": 0x158,
    }
)

_SDM630_DEFAULTS = dict.fromkeys(_SDM630_ADDRESSES, 0.0)
_SDM630_DEFAULTS["frequency_hz"] = 50.0
for _phase in PHASES:
    _SDM630_DEFAULTS[f"l{_phase}_voltage_v"] = 230.0
    _SDM630_DEFAULTS[f"l{_phase}_power_factor"] = 1.0


class SimulatedSDM630(_SimulatedSDM):
    """A three-phase Eastron SDM630-Modbus (V2), wired 3-phase 4-wire.

    Per-phase parameters are ``l1_voltage_v``, ``l2_power_w``, ... (also
    settable with :meth:`set_phase`); system ones are ``total_power_w``,
    ``frequency_hz``, ``import_kwh``, ``export_kwh``, ``total_kwh``, ... (see
    :meth:`parameters`). Totals, averages, line-to-line voltages (phases
    120 degrees apart) and neutral current follow from the phases unless set.
    """

    model = "SDM630"
    _ADDRESSES = _SDM630_ADDRESSES
    _DEFAULTS = _SDM630_DEFAULTS

    def set_phase(self, phase: int, **values: float) -> None:
        """Set one phase's parameters, e.g. ``set_phase(2, power_w=-800)``."""
        if phase not in PHASES:
            raise ValueError(f"phase must be 1, 2 or 3, not {phase!r}")
        self.set(**{f"l{phase}_{name}": value for name, value in values.items()})

    def _derive(self, values: dict[str, float]) -> None:
        explicit = self._explicit
        for phase in PHASES:
            prefix = f"l{phase}_"
            self._derive_phase(values, prefix)
            for kind in ("kwh", "kvarh"):
                _default(
                    values,
                    explicit,
                    f"{prefix}total_{kind}",
                    values[f"{prefix}import_{kind}"] + values[f"{prefix}export_{kind}"],
                )

        def each(name: str) -> list[float]:
            return [values[f"l{phase}_{name}"] for phase in PHASES]

        volts, amps = each("voltage_v"), each("current_a")
        power_w, apparent_va = sum(each("power_w")), sum(each("apparent_power_va"))
        total_pf = _clip(power_w / apparent_va) if apparent_va else 1.0
        # Line-to-line voltage of two phasors 120 degrees apart.
        line_volts = [
            math.sqrt(volts[i] ** 2 + volts[j] ** 2 + volts[i] * volts[j])
            for i, j in ((0, 1), (1, 2), (2, 0))
        ]
        # Neutral current: phasor sum of the phase currents (power factors ignored).
        neutral_real = amps[0] - 0.5 * (amps[1] + amps[2])
        neutral_imag = math.sqrt(3) / 2 * (amps[1] - amps[2])
        derived = {
            "average_voltage_v": sum(volts) / 3,
            "average_current_a": sum(amps) / 3,
            "sum_current_a": sum(amps),
            "total_power_w": power_w,
            "total_apparent_power_va": apparent_va,
            "total_reactive_power_var": sum(each("reactive_power_var")),
            "total_power_factor": total_pf,
            "total_phase_angle_deg": math.degrees(math.acos(abs(total_pf))),
            "l1_l2_voltage_v": line_volts[0],
            "l2_l3_voltage_v": line_volts[1],
            "l3_l1_voltage_v": line_volts[2],
            "average_line_voltage_v": sum(line_volts) / 3,
            "neutral_current_a": math.hypot(neutral_real, neutral_imag),
            "total_kwh": values["import_kwh"] + values["export_kwh"],
            "total_kvarh": values["import_kvarh"] + values["export_kvarh"],
        }
        for name, value in derived.items():
            _default(values, explicit, name, value)


SimulatedMeter = Union[SimulatedSDM120, SimulatedSDM630]


def example_sdm120() -> SimulatedSDM120:
    """The suite's worked one-phase example: a heat pump's SDM120 on a circuit
    that also exports (a PV inverter's), every figure distinct."""
    return SimulatedSDM120(
        voltage_v=231.5,
        current_a=6.5,
        power_w=-1480.0,
        power_factor=0.98,
        frequency_hz=49.95,
        import_kwh=1234.5,
        export_kwh=67.25,
    )


def example_sdm630() -> SimulatedSDM630:
    """The suite's worked three-phase example: an EV charger's SDM630, phase 2
    exporting, every figure distinct."""
    meter = SimulatedSDM630(frequency_hz=50.02, import_kwh=9876.5, export_kwh=12.5)
    meter.set_phase(1, voltage_v=229.0, current_a=4.0, power_w=900.0, power_factor=0.97)
    meter.set_phase(2, voltage_v=231.0, current_a=2.5, power_w=-550.0, power_factor=0.95)
    meter.set_phase(3, voltage_v=233.0, current_a=10.0, power_w=2300.0, power_factor=0.99)
    return meter


# --------------------------------------------------------------------------
# The gateway: pymodbus server, contexts and request classes.
# --------------------------------------------------------------------------


class _UnitContext(ModbusBaseSlaveContext):
    """What the gateway does with a request for one unit id (meter may be None)."""

    def __init__(self, meter: _SimulatedSDM | None) -> None:
        self.meter = meter

    def validate(self, fc_as_hex: int, address: int, count: int = 1) -> bool:
        # Reached only by function codes the simulator does not model: refuse them.
        return False

    def answer(self, request: ModbusPDU, response_class: type[ModbusPDU]) -> ModbusPDU:
        meter = self.meter
        if meter is None:
            return ExceptionResponse(request.function_code, GATEWAY_TARGET_FAILED)
        if meter.fault:
            return ExceptionResponse(request.function_code, SERVER_DEVICE_FAILURE)
        if request.function_code != 4:
            return ExceptionResponse(request.function_code, ILLEGAL_DATA_ADDRESS)
        code, registers = meter.read_input_registers(request.address, request.count)
        if code:
            return ExceptionResponse(request.function_code, code)
        return response_class(registers=registers)


class _GatewayContext(ModbusServerContext):
    """Every unit id resolves, so the gateway (not pymodbus) decides the answer.

    pymodbus's own answer for a missing unit carries function code 0x80,
    which its client cannot decode.
    """

    def __init__(self, meters: Mapping[int, _SimulatedSDM]) -> None:
        super().__init__(slaves={}, single=False)
        self._meters = meters  # the simulator's own dict: meters can come and go live

    def __contains__(self, slave: int) -> bool:
        return True

    def __getitem__(self, slave: int) -> _UnitContext:
        return _UnitContext(self._meters.get(slave))

    def slaves(self) -> list[int]:
        return list(self._meters)


class _ReadInputRegisters(ReadInputRegistersRequest):
    async def update_datastore(self, context: ModbusBaseSlaveContext) -> ModbusPDU:
        assert isinstance(context, _UnitContext)
        return context.answer(self, ReadInputRegistersResponse)


class _ReadHoldingRegisters(ReadHoldingRegistersRequest):
    async def update_datastore(self, context: ModbusBaseSlaveContext) -> ModbusPDU:
        assert isinstance(context, _UnitContext)
        return context.answer(self, ReadHoldingRegistersResponse)


class _SimulatorBase:
    """One pymodbus server for a set of meters, on its own thread and event loop."""

    _silent_when_unknown = False

    def __init__(self, meters: Mapping[int, SimulatedMeter]) -> None:
        for unit_id in meters:
            if not 1 <= unit_id <= 247:
                raise ValueError(f"unit id must be 1..247, not {unit_id!r}")
        # Live: add, remove or replace meters while serving (a meter unplugged).
        self.meters: dict[int, SimulatedMeter] = dict(meters)
        self._counts: dict[int, int] = {}
        self._counts_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    # Request counting, per unit id (unknown ones included).

    def request_counts(self) -> dict[int, int]:
        """Requests received so far, by unit id, whether answered or not."""
        with self._counts_lock:
            return dict(self._counts)

    def request_count(self, unit_id: int) -> int:
        """Requests received so far for one unit id."""
        with self._counts_lock:
            return self._counts.get(unit_id, 0)

    def reset_counts(self) -> None:
        """Start counting from zero again (e.g. at the start of a benchmark cycle)."""
        with self._counts_lock:
            self._counts.clear()

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU | None:
        """Count each request; drop those a silent unit would not answer.

        Returning None makes pymodbus's request handler send nothing.
        """
        if sending:
            return pdu
        unit_id = pdu.dev_id
        with self._counts_lock:
            self._counts[unit_id] = self._counts.get(unit_id, 0) + 1
        meter = self.meters.get(unit_id)
        if meter is None and self._silent_when_unknown:
            return None
        if meter is not None and meter.silent:
            return None
        return pdu

    # Life cycle.

    def start(self) -> None:
        """Start serving; returns once the server listens (raises if it cannot)."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._started.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()
        if not self._started.wait(_START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"{type(self).__name__} did not start in {_START_TIMEOUT_S} s")
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error

    def stop(self) -> None:
        """Stop serving and close every connection. Safe to call twice."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass  # the loop has already closed
        thread.join(_START_TIMEOUT_S)
        self._thread = None

    def __enter__(self) -> _SimulatorBase:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start() instead of dying unseen
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await self._create_server()
        try:
            await server.serve_forever(background=True)
            if not server.transport:
                raise OSError(f"{type(self).__name__} could not listen (see pymodbus log)")
            self._on_listening(server)
            self._started.set()
            await self._stopping.wait()
        finally:
            await server.shutdown()

    async def _create_server(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _on_listening(self, server) -> None:
        """Record where the server listens."""


class ModbusMeterSimulator(_SimulatorBase):
    """A Modbus TCP gateway on a loopback address with simulated meters behind it.

    ``meters`` maps unit ids (1..247) to :class:`SimulatedSDM120` /
    :class:`SimulatedSDM630`. With ``port=None`` a free port is picked;
    :attr:`address` tells which, once started. Use as a context manager, or
    call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        meters: Mapping[int, SimulatedMeter] | None = None,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"simulated meters listen on loopback only, not {host}")
        super().__init__(meters or {})
        self.host = host
        self.port = port
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the gateway listens on."""
        if self._address is None:
            raise RuntimeError("simulator not started")
        return self._address

    def __enter__(self) -> ModbusMeterSimulator:
        self.start()
        return self

    async def _create_server(self) -> ModbusTcpServer:
        return ModbusTcpServer(
            _GatewayContext(self.meters),
            address=(self.host, self.port or 0),
            trace_pdu=self._trace_pdu,
            custom_pdu=[_ReadInputRegisters, _ReadHoldingRegisters],
        )

    def _on_listening(self, server: ModbusTcpServer) -> None:
        host, port = server.transport.sockets[0].getsockname()[:2]
        self._address = (host, port)
        self.port = port


class ModbusRtuSimulator(_SimulatorBase):
    """Simulated meters on an RS485 bus, reached through a pseudo-terminal.

    The pymodbus RTU server opens one pty; a bridge thread joins it to a
    second pty whose path, :attr:`port`, a client opens like a USB-RS485
    adapter (``ModbusSerialClient(port=sim.port, ...)``). Unknown unit ids
    get no answer, as on a real bus. Needs pyserial (``pymodbus[serial]``).
    """

    _silent_when_unknown = True

    def __init__(
        self, meters: Mapping[int, SimulatedMeter] | None = None, baudrate: int = 9600
    ) -> None:
        super().__init__(meters or {})
        self.baudrate = baudrate
        self._bridge: _PtyBridge | None = None

    @property
    def port(self) -> str:
        """Device path for the client side of the bus."""
        if self._bridge is None:
            raise RuntimeError("simulator not started")
        return self._bridge.client_path

    def __enter__(self) -> ModbusRtuSimulator:
        self.start()
        return self

    def start(self) -> None:
        """Create the ptys, start the bridge, then the RTU server."""
        self._bridge = _PtyBridge()
        try:
            super().start()
        except BaseException:
            self._bridge.close()
            self._bridge = None
            raise

    def stop(self) -> None:
        """Stop the server, then the bridge."""
        super().stop()
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None

    async def _create_server(self) -> ModbusSerialServer:
        assert self._bridge is not None
        return ModbusSerialServer(
            _GatewayContext(self.meters),
            port=self._bridge.server_path,
            baudrate=self.baudrate,
            trace_pdu=self._trace_pdu,
            custom_pdu=[_ReadInputRegisters, _ReadHoldingRegisters],
        )


class _PtyBridge:
    """Two pseudo-terminals with their master ends joined: a null-modem cable.

    Done in-process rather than with socat so tests need no extra program.
    """

    def __init__(self) -> None:
        self._fds: list[int] = []
        server_master, server_slave = os.openpty()
        client_master, client_slave = os.openpty()
        # Raw from the start: a fresh pty echoes, which would loop bytes back.
        tty.setraw(server_slave)
        tty.setraw(client_slave)
        self._fds = [server_master, server_slave, client_master, client_slave]
        self.server_path = os.ttyname(server_slave)
        self.client_path = os.ttyname(client_slave)
        self._masters = (server_master, client_master)
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._pump, name="pty-bridge", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        a, b = self._masters
        peer = {a: b, b: a}
        while True:
            readable, _, _ = select.select([a, b, self._wake_read], [], [])
            if self._wake_read in readable:
                return
            for fd in readable:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    # EIO: nobody has the slave end open right now; drop the bytes.
                    continue
                if data:
                    os.write(peer[fd], data)

    def close(self) -> None:
        os.write(self._wake_write, b"x")
        self._thread.join()
        for fd in [*self._fds, self._wake_read, self._wake_write]:
            os.close(fd)
