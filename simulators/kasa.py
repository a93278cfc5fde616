"""Simulated TP-Link Kasa devices speaking the legacy (XOR) protocol on loopback.

Each :class:`SimulatedKasaDevice` is built from a real device dump (see
``tests/fixtures/kasa``) and answers the real python-kasa (0.7.7 and 0.12)
over the real wire protocol:

- TCP: a 4-byte big-endian length, then the JSON request or answer encrypted
  with the XOR autokey cipher (initial key 171).
- UDP discovery: the same XOR JSON without the length prefix.

Addressing scheme
-----------------
Every device has its own loopback address (``127.0.0.2``, ``127.0.0.3``, ...,
see :func:`loopback_host`) and all devices of one :class:`KasaSimulator`
share one port ``P`` (9999 on a real network; the simulator picks a free one
unless told). On ``(host, P)`` each device listens on TCP for queries and on
UDP for probes sent straight to it. The simulator also listens on UDP at
``(discovery_host, P)``, ``127.0.0.1`` by default: a probe arriving there is
answered by every device whose port is ``P``, each answer sent from the
device's own ``(host, P)`` socket. That is what python-kasa needs:

- ``Discover.discover(target="127.0.0.1", port=P)`` sends its probe to
  ``127.0.0.1:P``, keys the devices found by the answers' source address, and
  only accepts answers whose source port is ``P``;
- it then talks TCP to each device at ``(source address, P)``, because the
  ``port`` given to ``discover`` becomes ``port_override`` of every device;
- discovery stops early once the target address itself answers, so no device
  may sit on the discovery address.

``Device.connect(config=DeviceConfig(host=dev.host, port_override=dev.port))``
reaches one device directly. 500 devices (127.0.0.2 ... 127.0.1.251 on one
port) run in one simulator; they need about two file descriptors each. Their
discovery answers are staggered (``discovery_stagger_s``, 1 ms apart) so the
prober's receive buffer does not overflow: 500 answers take 0.5 s, so give
``discover`` a ``discovery_timeout`` of at least 1 s.

Devices answer every module they are asked for: the dump's modules, the
modules every real device of that kind has (time, schedule, cloud, ...) and
``{"err_code": -1, "err_msg": "module not support"}`` for anything else.
Energy readings are live: :meth:`SimulatedKasaDevice.set_realtime` takes SI
units and the device reports them in the shape its dump uses (mW/mV/mA/Wh
integers, or W/V/A/kWh floats on the HS110 v1). A switched-off outlet reads
0 W and 0 A, as real plugs do.

Failure modes (``mode``): ``"normal"``; ``"hang"`` accepts TCP and never
answers (UDP probes are ignored); ``"garbage"`` answers with bytes that are not
XOR JSON; ``"refuse"`` closes the TCP port and ignores probes. ``delay_s``
delays every answer.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import ipaddress
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Union

from simulators._loop_thread import LoopThreadSimulator

_LOGGER = logging.getLogger(__name__)

#: The project's own device dumps (tests/fixtures/README.md says where they come from).
FIXTURES_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "kasa"

#: The port real legacy Kasa devices use for TCP queries and UDP discovery.
DEFAULT_PORT = 9999

#: Legacy-protocol dumps this simulator can run.
LEGACY_FIXTURES: tuple[str, ...] = (
    "EP25(US)_1.0_1.0.14.json",
    "HS100(UK)_1.0_1.2.6.json",
    "HS103(US)_2.1_1.1.4.json",
    "HS110(EU)_1.0_1.2.5.json",
    "HS110(EU)_4.0_1.0.4.json",
    "HS300(US)_1.0_1.0.21.json",
    "KL130(EU)_1.0_1.8.8.json",
    "KP115(EU)_1.0_1.0.16.json",
    "KP125(US)_1.0_1.0.6.json",
)

#: Legacy dumps with an energy meter. HS110 v1 reports W/V/A/kWh floats, the
#: others mW/mV/mA/Wh integers; the KL130 bulb reports power only.
ENERGY_FIXTURES: tuple[str, ...] = (
    "EP25(US)_1.0_1.0.14.json",
    "HS110(EU)_1.0_1.2.5.json",
    "HS110(EU)_4.0_1.0.4.json",
    "HS300(US)_1.0_1.0.21.json",
    "KL130(EU)_1.0_1.8.8.json",
    "KP115(EU)_1.0_1.0.16.json",
    "KP125(US)_1.0_1.0.6.json",
)

MODES = ("normal", "hang", "garbage", "refuse")

_XOR_KEY = 171
_MASKED_NAME = "#MASKED_NAME#"
_MAX_REQUEST_BYTES = 64 * 1024  # real devices answer far smaller requests
_UCT_TIMEZONE_INDEX = 38  # "UCT" in the firmware's timezone table
_MODULE_NOT_SUPPORTED = {"err_code": -1, "err_msg": "module not support"}
_MEMBER_NOT_SUPPORTED = {"err_code": -2, "err_msg": "member not support"}
_CHILD_NOT_FOUND = {"err_code": -14, "err_msg": "entry not exist"}
# Decrypts to valid UTF-8 that is not JSON: the client's parser has to fail.
_GARBAGE_TEXT = b"<html><body>502 Bad Gateway</body></html>"

Child = Union[int, str, None]

# Realtime keys in the mW/mV/mA/Wh shape; the float shape uses the bare names.
_MILLI_KEYS = {
    "power": "power_mw",
    "voltage": "voltage_mv",
    "current": "current_ma",
    "total": "total_wh",
}


def xor_encrypt(plain: bytes) -> bytes:
    """Encrypt with the Kasa XOR autokey cipher (no length prefix)."""
    key = _XOR_KEY
    out = bytearray(len(plain))
    for i, byte in enumerate(plain):
        key ^= byte
        out[i] = key
    return bytes(out)


def xor_decrypt(cipher: bytes) -> bytes:
    """Decrypt bytes encrypted with :func:`xor_encrypt`."""
    key = _XOR_KEY
    out = bytearray(len(cipher))
    for i, byte in enumerate(cipher):
        out[i] = key ^ byte
        key = byte
    return bytes(out)


def _encode(message: Mapping[str, Any]) -> bytes:
    # Real devices send compact UTF-8 JSON; aliases may hold any character.
    return xor_encrypt(json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode())


def load_fixture(name: str | Path) -> dict:
    """Return a deep copy of a device dump.

    ``name`` is a file name in :data:`FIXTURES_DIR` (``.json`` optional), a
    unique prefix of one (``"KP115"``, ``"HS110(EU)_1.0"``) or a path.
    """
    path = Path(name)
    if not path.is_file():
        stem = str(name)
        candidates = sorted(FIXTURES_DIR.glob("*.json"))
        exact = [p for p in candidates if p.name in (stem, stem + ".json")]
        matches = exact or [p for p in candidates if p.name.startswith(stem)]
        if len(matches) != 1:
            found = ", ".join(p.name for p in matches) or "none"
            raise ValueError(f"fixture {name!r} matches {found} in {FIXTURES_DIR}")
        path = matches[0]
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def loopback_host(index: int) -> str:
    """Return the ``index``-th device address: 127.0.0.2, 127.0.0.3, ...

    The last octet stays within 2..251 (250 devices per /24), so no device
    takes 127.0.0.1 (the discovery address) or an address ending in .0/.255.
    """
    if index < 0 or index >= 250 * 256:
        raise ValueError(f"device index {index} out of range")
    return f"127.0.{index // 250}.{index % 250 + 2}"


def _check_loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address: simulators stay on 127.0.0.0/8")
    return host


class _Meter:
    """Live emeter readings of one outlet, kept in SI units."""

    def __init__(self, realtime: Mapping[str, Any], now: datetime) -> None:
        # Dumps use either mW/mV/mA/Wh integers or W/V/A/kWh floats.
        self.milli = any(key.endswith(("_mw", "_mv", "_ma", "_wh")) for key in realtime)
        scale = 1000.0 if self.milli else 1.0
        self.quantities: set[str] = set()  # what the device reports
        values: dict[str, float] = {}
        for quantity, milli_key in _MILLI_KEYS.items():
            key = milli_key if self.milli else quantity
            if key in realtime:
                self.quantities.add(quantity)
                values[quantity] = float(realtime[key]) / scale
        self.power_w = values.get("power", 0.0)
        self.voltage_v = values.get("voltage", 0.0)
        self.current_a = values.get("current", 0.0)
        self.total_kwh = values.get("total", 0.0)
        # Dumps hold no history: pretend the present power has been drawn since
        # the start of the month, within the lifetime total.
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        cap = self.total_kwh if "total" in self.quantities else float("inf")
        self.month_kwh = min(cap, self.power_w * (now - month_start).total_seconds() / 3.6e6)
        self.today_kwh = min(
            self.month_kwh, self.power_w * (now - midnight).total_seconds() / 3.6e6
        )

    def set(
        self,
        power_w: float | None,
        voltage_v: float | None,
        current_a: float | None,
        total_kwh: float | None,
        today_kwh: float | None,
    ) -> None:
        if power_w is not None:
            self.power_w = float(power_w)
            self.quantities.add("power")
        if voltage_v is not None:
            self.voltage_v = float(voltage_v)
            self.quantities.add("voltage")
        if current_a is not None:
            self.current_a = float(current_a)
            self.quantities.add("current")
        if total_kwh is not None:
            # Energy counted in the lifetime total was also used today.
            delta = float(total_kwh) - self.total_kwh
            if delta > 0:
                self.today_kwh += delta
                self.month_kwh += delta
            self.total_kwh = float(total_kwh)
            self.quantities.add("total")
        if today_kwh is not None:
            self.today_kwh = float(today_kwh)
            self.month_kwh = max(self.month_kwh, self.today_kwh)

    def realtime(self, on: bool) -> dict[str, Any]:
        values = {
            "power": self.power_w if on else 0.0,
            "voltage": self.voltage_v,
            "current": self.current_a if on else 0.0,
            "total": self.total_kwh,
        }
        out: dict[str, Any] = {}
        for quantity in sorted(self.quantities):
            if self.milli:
                out[_MILLI_KEYS[quantity]] = round(values[quantity] * 1000)
            else:
                out[quantity] = values[quantity]
        out["err_code"] = 0
        return out

    def _energy(self, kwh: float) -> dict[str, Any]:
        if self.milli:
            return {"energy_wh": round(kwh * 1000)}
        return {"energy": round(kwh, 3)}

    def daystat(self, year: int, month: int, now: datetime) -> dict[str, Any]:
        if (year, month) != (now.year, now.month):
            return {"day_list": [], "err_code": 0}
        earlier_days = now.day - 1
        per_day = (self.month_kwh - self.today_kwh) / earlier_days if earlier_days else 0.0
        days = [
            {"year": year, "month": month, "day": day, **self._energy(per_day)}
            for day in range(1, now.day)
        ]
        days.append({"year": year, "month": month, "day": now.day, **self._energy(self.today_kwh)})
        return {"day_list": days, "err_code": 0}

    def monthstat(self, year: int, now: datetime) -> dict[str, Any]:
        if year != now.year:
            return {"month_list": [], "err_code": 0}
        earlier = max(0.0, self.total_kwh - self.month_kwh) if "total" in self.quantities else 0.0
        per_month = earlier / now.month  # leave a share for earlier years
        months = [
            {"year": year, "month": month, **self._energy(per_month)}
            for month in range(1, now.month)
        ]
        months.append({"year": year, "month": now.month, **self._energy(self.month_kwh)})
        return {"month_list": months, "err_code": 0}


class _Outlet:
    """A relay with its own state, alias and meter: the device, or a strip's socket."""

    def __init__(self, alias: str, on: bool, on_time_s: int, meter: _Meter | None) -> None:
        self.alias = alias
        self.on = on
        self.meter = meter
        self.on_since = time.monotonic() - on_time_s

    def set_on(self, on: bool) -> None:
        if on and not self.on:
            self.on_since = time.monotonic()
        self.on = on

    def on_time_s(self) -> int:
        return int(time.monotonic() - self.on_since) if self.on else 0


class SimulatedKasaDevice:
    """One simulated legacy Kasa device (plug, strip or bulb) built from a dump.

    Set ``port=None`` to take the port of the :class:`KasaSimulator` it runs
    in. The MAC and device id default to values derived from ``(host, port)``,
    unique on loopback and the same on every run; read them once the
    simulator has started. ``child_aliases`` / ``child_ids`` override a
    strip's sockets in order (``None`` keeps the default).
    """

    def __init__(
        self,
        fixture: str | Path | Mapping[str, Any],
        *,
        host: str = "127.0.0.2",
        port: int | None = None,
        alias: str | None = None,
        mac: str | None = None,
        device_id: str | None = None,
        child_aliases: Sequence[str | None] | None = None,
        child_ids: Sequence[str | None] | None = None,
        relay_on: bool | None = None,
        mode: str = "normal",
        delay_s: float = 0.0,
        standard_modules: bool = True,
    ) -> None:
        dump = (
            copy.deepcopy(dict(fixture)) if isinstance(fixture, Mapping) else load_fixture(fixture)
        )
        sysinfo = dump.get("system", {}).get("get_sysinfo")
        if not isinstance(sysinfo, dict):
            raise ValueError("not a legacy (IOT) Kasa dump: no system.get_sysinfo")
        self.host = _check_loopback(host)
        self.port = port
        self.delay_s = delay_s
        self._mode_listener: Callable[[SimulatedKasaDevice], None] | None = None
        self._mode = "normal"
        self.mode = mode
        #: TCP requests answered so far (benchmarks and tests read it).
        self.request_count = 0
        self._lock = threading.Lock()
        self._dump = dump
        self._sysinfo = sysinfo
        self.model: str = sysinfo["model"]
        self.device_type: str = sysinfo.get("type") or sysinfo.get("mic_type") or ""
        self.is_bulb = "SMARTBULB" in self.device_type.upper()
        self.is_strip = "children" in sysinfo
        self._mac = mac
        self._device_id = device_id
        dump_alias = sysinfo.get("alias") or ""
        self._alias = alias
        if self._alias is None and dump_alias and _MASKED_NAME not in dump_alias:
            self._alias = dump_alias

        self._emeter_module = next(
            (m for m in ("emeter", "smartlife.iot.common.emeter") if m in dump), None
        )
        now = datetime.now()
        realtime = dump[self._emeter_module]["get_realtime"] if self._emeter_module else None

        def meter() -> _Meter | None:
            return _Meter(realtime, now) if realtime is not None else None

        self._outlets: list[_Outlet] = []
        if self.is_strip:
            aliases = list(child_aliases or [])
            for i, child in enumerate(sysinfo["children"]):
                alias_override = aliases[i] if i < len(aliases) else None
                outlet = _Outlet(
                    alias_override if alias_override is not None else child.get("alias", ""),
                    bool(child.get("state")),
                    child.get("on_time", 0),
                    meter(),
                )
                self._outlets.append(outlet)
            self._child_id_overrides = list(child_ids or [])
        else:
            if self.is_bulb:
                on = bool(sysinfo.get("light_state", {}).get("on_off"))
            else:
                on = bool(sysinfo.get("relay_state"))
            self._outlets.append(_Outlet("", on, sysinfo.get("on_time", 0), meter()))
            self._child_id_overrides = []
        if relay_on is not None:
            for outlet in self._outlets:
                outlet.set_on(relay_on)
        self._modules = self._build_modules(standard_modules)

    # -- identity ---------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of the device's TCP and UDP sockets."""
        if self.port is None:
            raise RuntimeError("port not assigned yet: start the simulator first")
        return self.host, self.port

    @property
    def alias(self) -> str:
        if self._alias is not None:
            return self._alias
        return f"{self.model.partition('(')[0]} {self.host}"

    @property
    def mac(self) -> str:
        """MAC with colons, upper case (``AA:BB:...``) as plugs report it."""
        if self._mac is not None:
            return self._mac
        host, port = self.address
        # Locally administered, then the port and the low 24 bits of the address:
        # unique for every (127.x.y.z, port).
        raw = bytes([0x02]) + struct.pack(">H", port) + ipaddress.ip_address(host).packed[1:]
        return ":".join(f"{b:02X}" for b in raw)

    @property
    def device_id(self) -> str:
        if self._device_id is not None:
            return self._device_id
        return hashlib.sha1(self.mac.encode()).hexdigest().upper()

    @property
    def child_ids(self) -> list[str]:
        """Ids of a strip's sockets (deviceId + 00, 01, ... as on a real HS300)."""
        ids = []
        for i in range(len(self._outlets) if self.is_strip else 0):
            override = self._child_id_overrides[i] if i < len(self._child_id_overrides) else None
            ids.append(override if override is not None else f"{self.device_id}{i:02d}")
        return ids

    def child_alias(self, child: int | str) -> str:
        return self._resolved_alias(self._outlet(child))

    def _resolved_alias(self, outlet: _Outlet) -> str:
        # Masked dump aliases ("#MASKED_NAME# 3") take the device's alias instead.
        return outlet.alias.replace(_MASKED_NAME, self.alias)

    # -- live state ---------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        old, self._mode = self._mode, mode
        if old != mode and self._mode_listener is not None:
            self._mode_listener(self)

    @property
    def has_emeter(self) -> bool:
        return self._emeter_module is not None

    def _outlet(self, child: Child) -> _Outlet:
        if child is None:
            if self.is_strip:
                raise ValueError("a strip's readings and relays are per socket: pass child=")
            return self._outlets[0]
        if not self.is_strip:
            raise ValueError(f"{self.model} has no child sockets")
        if isinstance(child, int):
            return self._outlets[child]
        return self._outlets[self.child_ids.index(child)]

    def set_realtime(
        self,
        power_w: float | None = None,
        voltage_v: float | None = None,
        current_a: float | None = None,
        total_kwh: float | None = None,
        *,
        today_kwh: float | None = None,
        child: Child = None,
    ) -> None:
        """Change the emeter readings (SI units); ``None`` keeps a value.

        A rise in ``total_kwh`` is added to today's and this month's energy
        too, unless ``today_kwh`` is given. ``child`` is a strip socket's
        index or id.
        """
        outlet = self._outlet(child)
        if outlet.meter is None:
            raise ValueError(f"{self.model} has no energy meter")
        with self._lock:
            outlet.meter.set(power_w, voltage_v, current_a, total_kwh, today_kwh)

    def realtime(self, child: Child = None) -> dict[str, Any]:
        """The ``get_realtime`` answer the device gives now, in its own units."""
        outlet = self._outlet(child)
        if outlet.meter is None:
            raise ValueError(f"{self.model} has no energy meter")
        with self._lock:
            return outlet.meter.realtime(outlet.on)

    def energy_today_kwh(self, child: Child = None) -> float:
        """Today's energy as the device reports it (rounded as on the wire)."""
        outlet = self._outlet(child)
        if outlet.meter is None:
            raise ValueError(f"{self.model} has no energy meter")
        now = datetime.now()
        with self._lock:
            entry = outlet.meter.daystat(now.year, now.month, now)["day_list"][-1]
        return entry["energy_wh"] / 1000 if "energy_wh" in entry else entry["energy"]

    def set_relay(self, on: bool, child: Child = None) -> None:
        """Switch the device (or one strip socket) on or off."""
        with self._lock:
            self._outlet(child).set_on(on)

    def is_on(self, child: Child = None) -> bool:
        return self._outlet(child).on

    def set_alias(self, alias: str, child: Child = None) -> None:
        with self._lock:
            if child is None:
                self._alias = alias
            else:
                self._outlet(child).alias = alias

    # -- protocol -------------------------------------------------------------

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one decoded request as the device would."""
        context = request.get("context")
        child_ids = context.get("child_ids") if isinstance(context, dict) else None
        response: dict[str, Any] = {}
        with self._lock:
            outlets = self._context_outlets(child_ids)
            for module, commands in request.items():
                if module == "context":
                    continue
                handlers = self._modules.get(module)
                if handlers is None:
                    response[module] = dict(_MODULE_NOT_SUPPORTED)
                elif outlets is None:
                    response[module] = dict(_CHILD_NOT_FOUND)
                elif not isinstance(commands, dict):
                    response[module] = dict(_MEMBER_NOT_SUPPORTED)
                else:
                    response[module] = {
                        command: self._run(handlers.get(command), args, outlets)
                        for command, args in commands.items()
                    }
        return response

    def _run(self, handler: Any, args: Any, outlets: list[_Outlet]) -> dict[str, Any]:
        if handler is None:
            return dict(_MEMBER_NOT_SUPPORTED)
        if callable(handler):
            return handler(args if isinstance(args, dict) else {}, outlets)
        return copy.deepcopy(handler)

    def _context_outlets(self, child_ids: Any) -> list[_Outlet] | None:
        """The outlets a request is about; None when a child id is unknown.

        ``self._outlets`` itself means the whole device (no context).
        """
        if not self.is_strip or not child_ids:
            return self._outlets  # plugs ignore a context
        ids = self.child_ids
        try:
            return [self._outlets[ids.index(child_id)] for child_id in child_ids]
        except (ValueError, TypeError):
            return None

    def _build_modules(self, standard: bool) -> dict[str, dict[str, Any]]:
        modules: dict[str, dict[str, Any]] = {}
        if standard:
            # Modules every real device of the kind has, whatever the dump kept.
            prefix = "smartlife.iot.common." if self.is_bulb else ""
            time_module = "smartlife.iot.common.timesetting" if self.is_bulb else "time"
            modules[time_module] = {
                "get_time": self._get_time,
                "get_timezone": {"index": _UCT_TIMEZONE_INDEX, "err_code": 0},
            }
            modules[prefix + "schedule"] = {
                "get_rules": {"rule_list": [], "enable": 0, "version": 2, "err_code": 0},
                "get_next_action": {"type": -1, "err_code": 0},
            }
            modules["smartlife.iot.common.cloud" if self.is_bulb else "cnCloud"] = {
                "get_info": {
                    "username": "",
                    "server": "n-devs.tplinkcloud.com",
                    "binded": 0,
                    "cld_connection": 0,
                    "illegalType": 0,
                    "stopConnect": 0,
                    "tcspStatus": 0,
                    "fwDlPage": "",
                    "tcspInfo": "",
                    "fwNotifyType": 0,
                    "err_code": 0,
                },
            }
            if not self.is_bulb:
                for rules in ("anti_theft", "count_down"):
                    modules[rules] = {"get_rules": {"rule_list": [], "enable": 0, "err_code": 0}}
        # The dump's own answers win over the defaults above.
        for module, commands in self._dump.items():
            if isinstance(commands, dict) and module != "discovery_result":
                modules.setdefault(module, {}).update(copy.deepcopy(commands))
        system = modules["system"]
        system["get_sysinfo"] = self._get_sysinfo
        system["set_relay_state"] = self._set_relay_state
        system["set_dev_alias"] = self._set_dev_alias
        if self.is_bulb:
            modules.setdefault("smartlife.iot.common.system", {})["set_dev_alias"] = (
                self._set_dev_alias
            )
            light = "smartlife.iot.smartbulb.lightingservice"
            if light in modules:
                modules[light]["get_light_state"] = self._get_light_state
                modules[light]["transition_light_state"] = self._transition_light_state
        if standard:
            usage = modules["smartlife.iot.common.schedule" if self.is_bulb else "schedule"]
            usage["get_daystat"] = self._usage_daystat
            usage["get_monthstat"] = self._usage_monthstat
        if self._emeter_module is not None:
            modules[self._emeter_module].update(
                {
                    "get_realtime": self._get_realtime,
                    "get_daystat": self._get_daystat,
                    "get_monthstat": self._get_monthstat,
                    "erase_emeter_stat": self._erase_emeter_stat,
                }
            )
        return modules

    # Command handlers: called with the lock held, (args, outlets) -> answer.

    def _get_sysinfo(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        info = copy.deepcopy(self._sysinfo)
        info["alias"] = self.alias
        if "mic_mac" in info and "mac" not in info:
            info["mic_mac"] = self.mac.replace(":", "")  # bulbs: no separators
        else:
            info["mac"] = self.mac
        info["deviceId"] = self.device_id
        if self.is_strip:
            info["children"] = [
                {
                    "id": child_id,
                    "state": int(outlet.on),
                    "alias": self._resolved_alias(outlet),
                    "on_time": outlet.on_time_s(),
                    "next_action": {"type": -1},
                }
                for child_id, outlet in zip(self.child_ids, self._outlets)
            ]
            info["child_num"] = len(self._outlets)
        elif self.is_bulb:
            info["light_state"] = self._light_state()
        else:
            outlet = self._outlets[0]
            info["relay_state"] = int(outlet.on)
            if "on_time" in info:
                info["on_time"] = outlet.on_time_s()
        info["err_code"] = 0
        return info

    def _light_state(self) -> dict[str, Any]:
        state = dict(self._sysinfo.get("light_state", {}))
        state.pop("dft_on_state", None)
        state["on_off"] = int(self._outlets[0].on)
        return state

    def _get_light_state(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        return {**self._light_state(), "err_code": 0}

    def _transition_light_state(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        for key in ("brightness", "color_temp", "hue", "saturation", "mode"):
            if key in args:
                self._sysinfo.setdefault("light_state", {})[key] = args[key]
        if "on_off" in args:
            self._outlets[0].set_on(bool(args["on_off"]))
        return self._get_light_state(args, outlets)

    def _set_relay_state(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        if "state" not in args:
            return {"err_code": -3, "err_msg": "invalid argument"}
        for outlet in outlets:
            outlet.set_on(bool(args["state"]))
        return {"err_code": 0}

    def _set_dev_alias(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        alias = args.get("alias")
        if not isinstance(alias, str):
            return {"err_code": -3, "err_msg": "invalid argument"}
        if outlets is self._outlets:
            self._alias = alias
        else:
            for outlet in outlets:
                outlet.alias = alias
        return {"err_code": 0}

    def _get_time(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        now = datetime.now(timezone.utc)  # the device clock runs on UTC (zone "UCT")
        return {
            "year": now.year,
            "month": now.month,
            "mday": now.day,
            "hour": now.hour,
            "min": now.minute,
            "sec": now.second,
            "err_code": 0,
        }

    def _get_realtime(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        if outlets is not self._outlets or not self.is_strip:
            return outlets[0].meter.realtime(outlets[0].on)  # type: ignore[union-attr]
        # A whole strip: the sum of its sockets, at their mean voltage.
        readings = [o.meter.realtime(o.on) for o in outlets]  # type: ignore[union-attr]
        total: dict[str, Any] = {}
        for reading in readings:
            for key, value in reading.items():
                total[key] = total.get(key, 0) + value
        if "voltage_mv" in total:
            total["voltage_mv"] = round(total["voltage_mv"] / len(readings))
        if "voltage" in total:
            total["voltage"] /= len(readings)
        total["err_code"] = 0
        return total

    @staticmethod
    def _year_month(args: dict, now: datetime) -> tuple[int, int]:
        year, month = args.get("year", now.year), args.get("month", now.month)
        return (year, month) if isinstance(year, int) and isinstance(month, int) else (0, 0)

    def _get_daystat(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        now = datetime.now()
        year, month = self._year_month(args, now)
        return outlets[0].meter.daystat(year, month, now)  # type: ignore[union-attr]

    def _get_monthstat(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        now = datetime.now()
        year, _ = self._year_month(args, now)
        return outlets[0].meter.monthstat(year, now)  # type: ignore[union-attr]

    def _erase_emeter_stat(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        for outlet in outlets:
            if outlet.meter is not None:
                outlet.meter.today_kwh = outlet.meter.month_kwh = outlet.meter.total_kwh = 0.0
        return {"err_code": 0}

    def _usage_daystat(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        # Minutes switched on: today since midnight or since switched on.
        now = datetime.now()
        year, month = self._year_month(args, now)
        if (year, month) != (now.year, now.month):
            return {"day_list": [], "err_code": 0}
        minutes_today = now.hour * 60 + now.minute
        minutes = min(minutes_today, outlets[0].on_time_s() // 60) if outlets else 0
        entry = {"year": year, "month": month, "day": now.day, "time": minutes}
        return {"day_list": [entry], "err_code": 0}

    def _usage_monthstat(self, args: dict, outlets: list[_Outlet]) -> dict[str, Any]:
        now = datetime.now()
        year, _ = self._year_month(args, now)
        if year != now.year:
            return {"month_list": [], "err_code": 0}
        minutes = self._usage_daystat({}, outlets)["day_list"][0]["time"]
        return {"month_list": [{"year": year, "month": now.month, "time": minutes}], "err_code": 0}

    def __repr__(self) -> str:
        return f"<SimulatedKasaDevice {self.model} {self.host}:{self.port} mode={self.mode}>"


def make_devices(
    fixtures: Sequence[str],
    count: int,
    *,
    port: int | None = None,
    first_index: int = 0,
) -> list[SimulatedKasaDevice]:
    """Build ``count`` devices cycling through ``fixtures``, one loopback address each."""
    return [
        SimulatedKasaDevice(
            fixtures[i % len(fixtures)], host=loopback_host(first_index + i), port=port
        )
        for i in range(count)
    ]


class _TcpSession:
    """Serves one TCP connection of one device."""

    def __init__(self, sim: KasaSimulator, device: SimulatedKasaDevice) -> None:
        self.sim = sim
        self.device = device

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        device = self.device
        self.sim._connections.setdefault(id(device), set()).add(writer)
        try:
            while True:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                if length > _MAX_REQUEST_BYTES:
                    break
                payload = await reader.readexactly(length)
                if device.mode == "hang":
                    continue  # read and drop: the client waits for nothing
                if device.delay_s > 0:
                    await asyncio.sleep(device.delay_s)
                if device.mode == "garbage":
                    body = xor_encrypt(_GARBAGE_TEXT)
                else:
                    try:
                        request = json.loads(xor_decrypt(payload))
                    except ValueError:
                        request = None
                    if not isinstance(request, dict):
                        _LOGGER.debug("%r: undecodable request, closing", device)
                        break  # real devices drop the connection
                    body = _encode(device.handle(request))
                    device.request_count += 1
                writer.write(struct.pack(">I", len(body)) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            self.sim._connections.get(id(device), set()).discard(writer)
            writer.close()


class _UdpEndpoint(asyncio.DatagramProtocol):
    """A UDP socket on (host, port): a device's own, or the discovery address."""

    def __init__(self, sim: KasaSimulator, host: str, port: int) -> None:
        self.sim = sim
        self.host = host
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            request = json.loads(xor_decrypt(data))
        except ValueError:
            return  # not a legacy probe (e.g. python-kasa's AES probe)
        if not isinstance(request, dict):
            return
        if (self.host, self.port) == (self.sim.discovery_host, self.sim.port):
            answering = [d for d in self.sim.devices if d.port == self.port]
        else:
            answering = [d for d in self.sim.devices if (d.host, d.port) == (self.host, self.port)]
        loop = asyncio.get_running_loop()
        for order, device in enumerate(answering):
            if device.mode in ("hang", "refuse"):
                continue
            endpoint = self.sim._udp.get((device.host, self.port))
            if endpoint is None or endpoint.transport is None:
                continue
            if device.mode == "garbage":
                body = xor_encrypt(_GARBAGE_TEXT)
            else:
                body = _encode(device.handle(request))
            # Stagger the answers as a real network does: hundreds at once
            # overflow the prober's receive buffer and get lost.
            delay_s = device.delay_s + order * self.sim.discovery_stagger_s
            loop.call_later(delay_s, endpoint.send, body, addr)

    def send(self, body: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(body, addr)


class KasaSimulator(LoopThreadSimulator):
    """Runs simulated Kasa devices in one asyncio loop on a background thread.

    ``port=None`` picks a free port for every device whose own port is None
    and for discovery. Use as a context manager, or call :meth:`start` and
    :meth:`stop` (both may be called again: the simulator restarts on the
    same port). See the module docstring for the addressing scheme.
    """

    def __init__(
        self,
        devices: Iterable[SimulatedKasaDevice] = (),
        *,
        port: int | None = None,
        discovery_host: str = "127.0.0.1",
        discovery_stagger_s: float = 0.001,
    ) -> None:
        self.devices: list[SimulatedKasaDevice] = []
        self.discovery_stagger_s = discovery_stagger_s
        self.port = port
        self.discovery_host = _check_loopback(discovery_host)
        super().__init__()
        self._servers: dict[int, asyncio.AbstractServer] = {}
        self._connections: dict[int, set[asyncio.StreamWriter]] = {}
        self._udp: dict[tuple[str, int], _UdpEndpoint] = {}
        self._inherit_port: set[int] = set()  # devices that take the simulator's port
        self._background: set[asyncio.Future] = set()
        for device in devices:
            self.add(device)

    @property
    def discovery_target(self) -> tuple[str, int]:
        """Where ``Discover.discover(target=..., port=...)`` should probe."""
        if self.port is None:
            raise RuntimeError("port not chosen yet: start the simulator first")
        return self.discovery_host, self.port

    def add(self, device: SimulatedKasaDevice) -> SimulatedKasaDevice:
        """Add a device; a running simulator starts serving it at once."""
        if device.host == self.discovery_host:
            # python-kasa ends discovery as soon as the target address answers.
            raise ValueError(f"{device.host} is the discovery address: use another host")
        if device._mode_listener is not None:
            raise ValueError(f"{device!r} already belongs to a simulator")
        self.devices.append(device)
        device._mode_listener = self._on_mode_change
        if device.port is None:
            self._inherit_port.add(id(device))
        if self.running:
            if device.port is None:
                device.port = self.port
            try:
                self._call(self._start_device(device))
            except BaseException:
                self.remove(device)
                raise
        return device

    def remove(self, device: SimulatedKasaDevice) -> None:
        """Take a device off the network (a running simulator closes its sockets)."""
        if self.running:
            self._call(self._stop_device(device))
        self.devices.remove(device)
        if id(device) in self._inherit_port:
            self._inherit_port.discard(id(device))
            device.port = None
        device._mode_listener = None

    thread_name = "kasa-simulator"
    what = "simulated Kasa devices"

    # -- running in the loop thread --------------------------------------

    def _on_mode_change(self, device: SimulatedKasaDevice) -> None:
        if not self.running or device not in self.devices:
            return
        if threading.current_thread() is self._thread:
            # Called from the loop itself: waiting for the result would deadlock.
            task = asyncio.ensure_future(self._apply_mode(device))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            self._call(self._apply_mode(device))

    async def _start_all(self) -> None:
        for device in self.devices:
            if id(device) in self._inherit_port:
                device.port = self.port
        await self._udp_open(self.discovery_host, self.port)  # type: ignore[arg-type]
        for device in self.devices:
            await self._start_device(device)

    async def _start_device(self, device: SimulatedKasaDevice) -> None:
        await self._udp_open(device.host, device.port)  # type: ignore[arg-type]
        await self._apply_mode(device)

    async def _udp_open(self, host: str, port: int) -> None:
        if (host, port) in self._udp:
            return
        # No SO_REUSEADDR on UDP: on Linux it would let two sockets share an
        # address silently, hiding a clash with another simulator.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        endpoint = _UdpEndpoint(self, host, port)
        await loop.create_datagram_endpoint(lambda: endpoint, sock=sock)
        self._udp[(host, port)] = endpoint

    async def _apply_mode(self, device: SimulatedKasaDevice) -> None:
        """Open or close the device's TCP port to match its mode."""
        server = self._servers.get(id(device))
        if device.mode == "refuse":
            if server is not None:
                await self._close_tcp(device)
            return
        if server is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Restarts reuse the port while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(device.address)
        except OSError:
            sock.close()
            raise
        session = _TcpSession(self, device)
        self._servers[id(device)] = await asyncio.start_server(session.serve, sock=sock)

    async def _close_tcp(self, device: SimulatedKasaDevice) -> None:
        server = self._servers.pop(id(device), None)
        if server is not None:
            server.close()
        # Close live connections first: wait_closed() waits for them on 3.12+.
        for writer in list(self._connections.pop(id(device), ())):
            writer.close()
        if server is not None:
            await server.wait_closed()

    async def _stop_device(self, device: SimulatedKasaDevice) -> None:
        await self._close_tcp(device)
        shared = any(
            (d.host, d.port) == (device.host, device.port) for d in self.devices if d is not device
        )
        if not shared and (device.host, device.port) != (self.discovery_host, self.port):
            endpoint = self._udp.pop((device.host, device.port), None)  # type: ignore[arg-type]
            if endpoint is not None and endpoint.transport is not None:
                endpoint.transport.close()

    async def _close_all(self) -> None:
        for device in self.devices:
            await self._close_tcp(device)
        for endpoint in self._udp.values():
            if endpoint.transport is not None:
                endpoint.transport.close()
        self._udp.clear()
        # Let the session tasks see their closed connections and finish.
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
