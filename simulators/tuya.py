"""Simulated Tuya Wi-Fi devices that speak the real local protocol (3.1, 3.3, 3.4, 3.5).

The wire format follows tinytuya 1.20 (``tinytuya/core``), which is the client the
collector uses, so a real ``tinytuya.OutletDevice`` talks to these devices unchanged:

- 3.1: 55AA frames with CRC32; queries and answers are plain JSON, only CONTROL is
  encrypted (AES-ECB, base64, an MD5 slice of the local key).
- 3.3: 55AA frames with CRC32; every payload AES-ECB with the local key, a clear
  ``3.3`` + 12 NUL version header on CONTROL and STATUS frames.
- 3.4: 55AA frames with HMAC-SHA256; a session key is negotiated first
  (SESS_KEY_NEG_START/RESP/FINISH), payloads AES-ECB with the session key.
- 3.5: 6699 frames, AES-GCM with the session key (same negotiation, other derivation).

Like real devices they accept one client at a time, answer a CONTROL or UPDATEDPS with
an empty acknowledgement followed by a STATUS report, answer a payload they cannot
decrypt with ``data format error`` (3.1/3.3) or drop the connection (3.4/3.5 integrity
failure), and announce themselves over UDP, here only ever to a loopback address.

Failure modes for tests: ``hang``, ``garbage``, ``busy`` and ``stale`` (see ``MODES``).

Run ``python -m simulators.tuya --devices devices.json`` to serve a wizard file.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hmac
import ipaddress
import json
import logging
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from hashlib import md5, sha256
from typing import Any

import tinytuya
from tinytuya import AESCipher, TuyaMessage, pack_message, parse_header, unpack_message

log = logging.getLogger(__name__)

VERSIONS = ("3.1", "3.3", "3.4", "3.5")
# normal: answers like a healthy device.
# hang: accepts TCP and reads, never answers (a wedged device or a black-holed path).
# garbage: answers every frame with junk bytes and a corrupt frame, then closes.
# busy: another client (the phone app, Home Assistant) holds the device's only slot,
#       so every connection is accepted and reset as soon as it sends.
# stale: power DPs are left out of DP_QUERY answers until an UPDATEDPS asks for them.
MODES = ("normal", "hang", "garbage", "busy", "stale")

DEFAULT_TCP_PORT = tinytuya.TCPPORT  # 6668
# Where each protocol version's discovery packets go (tinytuya's scanner listens on all).
UDP_PORT_BY_VERSION = {
    "3.1": tinytuya.UDPPORT,  # 6666, plain JSON
    "3.3": tinytuya.UDPPORTS,  # 6667, AES-ECB with the well-known UDP key
    "3.4": tinytuya.UDPPORTS,
    "3.5": tinytuya.UDPPORTAPP,  # 7000, 6699 frame, AES-GCM with the UDP key
}

# Categories whose devices are metering plugs when the wizard gave no DP mapping.
PLUG_CATEGORIES = frozenset({"cz", "pc"})
# DPs a "stale" plug or meter leaves out of DP_QUERY answers until refreshed.
POWER_DPS = frozenset({"4", "5", "6", "18", "19", "20"})
_POWER_CODES = frozenset({"cur_current", "cur_power", "cur_voltage"})
_SWITCH_CODES = frozenset({"switch", "switch_1", "switch_on"})

_CMD_UDP = 0  # 3.1 discovery broadcasts carry command 0
_NO_RETCODE = None
_ACK = b""
_DATA_FORMAT_ERROR = b"data format error"  # what a real 3.x device answers to bad ciphertext
_DATA_UNVALID = b"json obj data unvalid"  # a "device22" refusing DP_QUERY
_HEADER_LEN_55AA = struct.calcsize(tinytuya.MESSAGE_HEADER_FMT_55AA)
_HEADER_LEN_6699 = struct.calcsize(tinytuya.MESSAGE_HEADER_FMT_6699)
_MAX_INPUT_BYTES = 64 * 1024  # a client that sends more without a whole frame is dropped


# --- DIN-rail meter phase encoding ---------------------------------------------------


def encode_phase(voltage_v: float, current_a: float, power_w: float) -> str:
    """Encode one phase the way Tuya DIN-rail meters report DP 6/7/8 (phase_a/b/c).

    Eight bytes, big-endian: voltage in 0.1 V (2 bytes), current in mA (3 bytes),
    power in W (3 bytes); base64 text.
    """
    fields = (
        ("voltage_v", voltage_v, 10, 2),
        ("current_a", current_a, 1000, 3),
        ("power_w", power_w, 1, 3),
    )
    raw = b""
    for name, value, scale, size in fields:
        scaled = round(value * scale)
        if not 0 <= scaled < 1 << (8 * size):
            raise ValueError(f"{name}={value!r} does not fit in {size} bytes")
        raw += scaled.to_bytes(size, "big")
    return base64.b64encode(raw).decode("ascii")


def decode_phase(value: str) -> tuple[float, float, float]:
    """Decode a phase DP back to (voltage V, current A, power W)."""
    raw = base64.b64decode(value, validate=True)
    if len(raw) != 8:
        raise ValueError(f"a phase DP holds 8 bytes, got {len(raw)}")
    voltage_v = int.from_bytes(raw[0:2], "big") / 10
    current_a = int.from_bytes(raw[2:5], "big") / 1000
    power_w = float(int.from_bytes(raw[5:8], "big"))
    return voltage_v, current_a, power_w


# --- default DP sets -----------------------------------------------------------------


# The wizard's devices.json ``mapping`` of a metering plug: the DPs ``plug_dps`` serves.
PLUG_MAPPING = {
    "1": {"code": "switch_1", "type": "Boolean", "values": {}},
    "17": {"code": "add_ele", "type": "Integer", "values": {"scale": 3}},
    "18": {"code": "cur_current", "type": "Integer", "values": {"unit": "mA", "scale": 0}},
    "19": {"code": "cur_power", "type": "Integer", "values": {"unit": "W", "scale": 1}},
    "20": {"code": "cur_voltage", "type": "Integer", "values": {"unit": "V", "scale": 1}},
}


def plug_dps(
    power_w: float,
    voltage_v: float = 240.0,
    *,
    on: bool = True,
    energy_kwh: float = 0.0,
    legacy: bool = False,
) -> dict[str, Any]:
    """DPs of a metering plug: 1 switch, 17 add_ele (kWh x1000), 18 mA, 19 W x10, 20 V x10.

    ``legacy=True`` gives the older layout without a mapping: 4 mA, 5 W x10, 6 V x10.
    A plug that is off measures no load, whatever ``power_w`` says.
    """
    power_w = power_w if on else 0.0
    current_ma = round(power_w / voltage_v * 1000) if voltage_v else 0
    if legacy:
        return {"1": on, "4": current_ma, "5": round(power_w * 10), "6": round(voltage_v * 10)}
    return {
        "1": on,
        "17": round(energy_kwh * 1000),
        "18": current_ma,
        "19": round(power_w * 10),
        "20": round(voltage_v * 10),
    }


def din_meter_dps(
    phases: Sequence[tuple[float, float, float]],
    total_kwh: float,
    *,
    on: bool = True,
) -> dict[str, Any]:
    """DPs of a metering DIN breaker (category ``dlq``).

    DP 1 total energy in 0.01 kWh, DP 6/7/8 one base64 phase each (see
    ``encode_phase``), DP 16 the breaker switch. ``phases`` holds one (V, A, W)
    tuple per phase: one for single-phase, three for three-phase meters.
    """
    if not 1 <= len(phases) <= 3:
        raise ValueError("a meter has one to three phases")
    dps: dict[str, Any] = {"1": round(total_kwh * 100)}
    for dp, phase in zip(("6", "7", "8"), phases):
        dps[dp] = encode_phase(*phase)
    dps["16"] = on
    return dps


def _mapping_default(spec: Mapping[str, Any]) -> Any:
    """A plausible idle value for one DP of a wizard mapping, by its type."""
    code = spec.get("code", "")
    kind = spec.get("type", "")
    values = spec.get("values")
    if isinstance(values, str):
        try:
            values = json.loads(values)
        except ValueError:
            values = {}
    if not isinstance(values, dict):
        values = {}
    if kind == "Boolean":
        return code in _SWITCH_CODES
    if kind == "Integer":
        return max(int(values.get("min", 0)), 0)
    if kind == "Enum":
        options = values.get("range") or [""]
        return options[0]
    if kind == "Bitmap":
        return 0
    return ""


def _scale(spec: Mapping[str, Any]) -> int:
    values = spec.get("values")
    if isinstance(values, dict):
        try:
            return int(values.get("scale", 0))
        except (TypeError, ValueError):
            return 0
    return 0


def default_dps(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A DP set for a devices.json entry, chosen by its mapping and category.

    With a mapping, every mapped DP gets an idle value and the metering DPs
    (cur_power, cur_voltage, cur_current, add_ele) a 60 W load at 240 V in their own
    scale. Without one, ``dlq`` meters get ``din_meter_dps`` and plugs the legacy
    4/5/6 layout; anything else just a switch DP.
    """
    mapping = entry.get("mapping") or {}
    category = entry.get("category") or ""
    if mapping:
        dps = {str(dp): _mapping_default(spec) for dp, spec in mapping.items()}
        load = {"cur_power": 60.0, "cur_voltage": 240.0, "cur_current": 250.0, "add_ele": 0.012}
        for dp, spec in mapping.items():
            code = spec.get("code")
            if code in load:
                dps[str(dp)] = round(load[code] * 10 ** _scale(spec))
        return dps
    if category == "dlq":
        return din_meter_dps([(230.0, 1.5, 345.0)], total_kwh=1234.56)
    if category in PLUG_CATEGORIES:
        return plug_dps(60.0, legacy=True)
    return {"1": False}


def _power_dps_for(entry: Mapping[str, Any]) -> frozenset[str]:
    mapping = entry.get("mapping") or {}
    if mapping:
        return frozenset(
            str(dp) for dp, spec in mapping.items() if spec.get("code") in _POWER_CODES
        )
    if entry.get("category") == "dlq":
        return frozenset({"6", "7", "8"})  # the phase DPs
    return POWER_DPS


# --- helpers ------------------------------------------------------------------------


def _loopback_ipv4(host: str) -> str:
    """Return ``host`` as an IPv4 loopback address, or refuse it: nothing leaves 127/8."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv4 address in 127.0.0.0/8") from None
    if not address.is_loopback:
        raise ValueError(f"{host} is not a loopback address: simulators stay in 127.0.0.0/8")
    return str(address)


def _normalize_version(version: str | float) -> str:
    try:
        text = f"{float(version):.1f}"
    except (TypeError, ValueError):
        raise ValueError(f"unsupported Tuya protocol version {version!r}") from None
    if text not in VERSIONS:
        raise ValueError(f"unsupported Tuya protocol version {version!r}; use one of {VERSIONS}")
    return text


def _json_bytes(obj: Any) -> bytes:
    # Real devices send compact JSON; tinytuya strips spaces from its own too.
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _ecb_encrypt(key: bytes, data: bytes) -> bytes:
    return AESCipher(key).encrypt(data, use_base64=False, pad=True)


def _ecb_decrypt(key: bytes, data: bytes) -> bytes:
    return AESCipher(key).decrypt(data, use_base64=False, decode_text=False, verify_padding=True)


def _md5_slice_31(b64_payload: bytes, key: bytes) -> bytes:
    digest = md5(b"data=" + b64_payload + b"||lpv=3.1||" + key).hexdigest()
    return digest[8:24].encode("ascii")


class _BadRequest(Exception):
    """A frame whose payload the device cannot decrypt or parse."""


class _Drop(Exception):
    """Input that is not a Tuya frame at all: the device drops the connection."""


# --- the device ---------------------------------------------------------------------


class SimulatedTuyaDevice:
    """One simulated Tuya device: its identity, live DPs and failure mode.

    Serve it with ``TuyaSimulator`` (many devices, one thread) or on its own with
    ``start()``/``stop()`` or ``with device:``. ``port=0`` takes a free port, written
    back to ``port`` on start. DPs can change at any time with ``set_dps``; a client
    holding a connection then receives a STATUS report, as from a real device.
    """

    def __init__(
        self,
        dev_id: str,
        local_key: str,
        version: str | float,
        host: str = "127.0.0.1",
        port: int = DEFAULT_TCP_PORT,
        dps: Mapping[Any, Any] | None = None,
        *,
        mode: str = "normal",
        max_clients: int = 1,
        device22: bool = False,
        power_dps: Iterable[Any] | None = None,
        product_key: str | None = None,
        uuid: str | None = None,
    ) -> None:
        self.dev_id = dev_id
        self.version = _normalize_version(version)
        key = local_key.encode("latin1")
        if self.version != "3.1" and len(key) != 16:
            raise ValueError(f"a {self.version} device needs a 16-character local key")
        self.local_key = key
        self.host = _loopback_ipv4(host)
        self.port = port
        self._requested_port = port
        self.max_clients = max_clients
        if device22 and self.version not in ("3.3", "3.4"):
            # tinytuya only detects "data unvalid" on 3.3 and 3.4.
            raise ValueError("device22 behaviour exists for protocol 3.3 and 3.4 only")
        self.device22 = device22
        self.mode = mode
        self.product_key = product_key or "key" + md5(dev_id.encode()).hexdigest()[:13]
        self.uuid = uuid or md5(dev_id.encode()).hexdigest()[:16]
        self._lock = threading.Lock()
        initial = dps if dps is not None else {"1": False}
        self._dps: dict[str, Any] = {str(k): v for k, v in initial.items()}
        # The DPs stale mode hides; only those the device has are ever reported anyway.
        self.power_dps = frozenset(
            str(dp) for dp in (power_dps if power_dps is not None else POWER_DPS)
        )
        self._refreshed: set[str] = set()
        self._counts: collections.Counter[str] = collections.Counter()
        self._seqno = 0
        self._rng = random.Random(dev_id)  # garbage is reproducible per device
        self._engine: TuyaSimulator | None = None
        self._own_engine: TuyaSimulator | None = None

    @classmethod
    def from_devices_json(
        cls,
        entry: Mapping[str, Any],
        dps: Mapping[Any, Any] | None = None,
        **kwargs: Any,
    ) -> SimulatedTuyaDevice:
        """Build a device from one entry of tinytuya's wizard output (devices.json).

        Uses ``id``, ``key``, ``ip`` and ``version``; ``host=`` and ``version=`` in
        ``kwargs`` override the entry (entries without an address need ``host=``).
        Without ``dps`` the DP set comes from ``default_dps(entry)``.
        """
        host = kwargs.pop("host", None) or entry.get("ip")
        version = kwargs.pop("version", None) or entry.get("version")
        if not host:
            raise ValueError(f"devices.json entry {entry.get('id')!r} has no ip: pass host=")
        if not version:
            raise ValueError(f"devices.json entry {entry.get('id')!r} has no version")
        values = dict(dps) if dps is not None else default_dps(entry)
        kwargs.setdefault("power_dps", _power_dps_for(entry))
        kwargs.setdefault("product_key", entry.get("product_id") or None)
        kwargs.setdefault("uuid", entry.get("uuid") or None)
        return cls(entry["id"], entry["key"], version, host=host, dps=values, **kwargs)

    def __repr__(self) -> str:
        return (
            f"SimulatedTuyaDevice({self.dev_id!r}, version={self.version!r}, "
            f"address={self.host}:{self.port}, mode={self.mode!r})"
        )

    # -- state ---------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        self._mode = mode

    @property
    def dps(self) -> dict[str, Any]:
        """A copy of the current DPs, keys as strings like on the wire."""
        with self._lock:
            return dict(self._dps)

    def set_dps(self, values: Mapping[Any, Any], *, push: bool = True) -> None:
        """Change DPs (new keys are added). Connected clients get a STATUS report."""
        changed = {str(k): v for k, v in values.items()}
        with self._lock:
            self._dps.update(changed)
        engine = self._engine
        if push and engine is not None:
            engine._queue_push(self, changed)

    def mark_stale(self) -> None:
        """Forget earlier UPDATEDPS requests: power DPs go missing again in stale mode."""
        with self._lock:
            self._refreshed.clear()

    @property
    def counts(self) -> dict[str, int]:
        """Events seen so far: connections, rejections, commands by name, failures."""
        with self._lock:
            return dict(self._counts)

    @property
    def connected_clients(self) -> int:
        """Clients holding a connection right now (the busy mode's phantom excluded)."""
        engine = self._engine
        return engine._client_count(self) if engine is not None else 0

    def _count(self, event: str) -> None:
        with self._lock:
            self._counts[event] += 1

    def _next_seqno(self) -> int:
        with self._lock:
            self._seqno += 1
            return self._seqno

    def _query_dps(self) -> dict[str, Any]:
        with self._lock:
            dps = dict(self._dps)
            if self._mode == "stale":
                for dp in self.power_dps - self._refreshed:
                    dps.pop(dp, None)
        return dps

    def _select_dps(self, wanted: Iterable[str]) -> dict[str, Any]:
        with self._lock:
            return {dp: self._dps[dp] for dp in wanted if dp in self._dps}

    def _apply(self, values: Mapping[str, Any]) -> dict[str, Any]:
        # Real devices ignore DPs they do not have and report every DP that was set.
        with self._lock:
            applied = {dp: v for dp, v in values.items() if dp in self._dps}
            self._dps.update(applied)
        return applied

    def _refresh(self, wanted: Iterable[str]) -> dict[str, Any]:
        wanted = list(wanted)
        with self._lock:
            self._refreshed.update(wanted)
        return self._select_dps(wanted)

    # -- discovery -----------------------------------------------------------------

    def discovery_info(self) -> dict[str, Any]:
        """The JSON a real device broadcasts to announce itself."""
        info: dict[str, Any] = {
            "ip": self.host,
            "gwId": self.dev_id,
            "active": 2,
            "ability": 0,
            "mode": 0,
            "encrypt": True,
            "productKey": self.product_key,
            "version": self.version,
        }
        if self.version in ("3.4", "3.5"):
            info.update({"token": True, "wf_cfg": True})
        if self.version == "3.5":
            info["uuid"] = self.uuid
        return info

    def announcement(self) -> bytes:
        """The discovery datagram, framed and encrypted as this version's devices do."""
        body = _json_bytes(self.discovery_info())
        retcode = struct.pack(tinytuya.MESSAGE_RETCODE_FMT, 0)
        if self.version == "3.1":
            msg = TuyaMessage(0, _CMD_UDP, 0, retcode + body, 0, True, tinytuya.PREFIX_55AA_VALUE)
            return pack_message(msg)
        if self.version == "3.5":
            msg = TuyaMessage(
                0, tinytuya.UDP_NEW, 0, body, 0, True, tinytuya.PREFIX_6699_VALUE, True
            )
            return pack_message(msg, hmac_key=tinytuya.udpkey)
        payload = retcode + _ecb_encrypt(tinytuya.udpkey, body)
        msg = TuyaMessage(0, tinytuya.UDP_NEW, 0, payload, 0, True, tinytuya.PREFIX_55AA_VALUE)
        return pack_message(msg)

    def announce(self, to: tuple[str, int] | None = None) -> None:
        """Send one discovery packet to a loopback UDP address (never a broadcast).

        Defaults to 127.0.0.1 on this version's discovery port (6666, 6667 or 7000).
        The datagram leaves from the device's own address, as a real one does.
        """
        if to is None:
            to = ("127.0.0.1", UDP_PORT_BY_VERSION[self.version])
        target = (_loopback_ipv4(to[0]), int(to[1]))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((self.host, 0))
            sock.sendto(self.announcement(), target)
        self._count("announce")

    # -- serving on its own ----------------------------------------------------------

    def start(self) -> SimulatedTuyaDevice:
        """Serve this device alone in a background thread."""
        if self._own_engine is not None:
            raise RuntimeError(f"{self!r} is already running")
        self._own_engine = TuyaSimulator([self]).start()
        return self

    def stop(self) -> None:
        engine, self._own_engine = self._own_engine, None
        if engine is not None:
            engine.stop()

    def __enter__(self) -> SimulatedTuyaDevice:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- one client connection: the protocol --------------------------------------------


class _Connection:
    """A TCP client of one device, with its 3.4/3.5 session state."""

    def __init__(self, engine: TuyaSimulator, sock: socket.socket, device: SimulatedTuyaDevice):
        self.engine = engine
        self.sock = sock
        self.device = device
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.rejected = False  # busy: reset as soon as the client sends
        self.closing = False  # flush, half-close, discard input until the client goes
        self.closed = False
        self.serial = 0  # accept order: pushes go only to clients older than the change
        self.session_key: bytes | None = None
        self.client_nonce = b""
        self.device_nonce = b""

    @property
    def version(self) -> str:
        return self.device.version

    @property
    def ready(self) -> bool:
        """Can take commands (3.4/3.5 only once the session key is agreed)."""
        if self.rejected or self.closing or self.closed:
            return False
        return self.version in ("3.1", "3.3") or self.session_key is not None

    # -- input -----------------------------------------------------------------------

    def take_frame(self) -> bytes | None:
        buf = self.inbuf
        if len(buf) < 4:
            return None
        prefix = bytes(buf[:4])
        if prefix == tinytuya.PREFIX_55AA_BIN:
            header_len = _HEADER_LEN_55AA
        elif prefix == tinytuya.PREFIX_6699_BIN:
            header_len = _HEADER_LEN_6699
        else:
            raise _Drop("input does not start with a Tuya frame prefix")
        if len(buf) < header_len:
            return None
        try:
            header = parse_header(bytes(buf[:header_len]))
        except tinytuya.DecodeError as exc:
            raise _Drop(str(exc)) from None
        if len(buf) < header.total_length:
            return None
        raw = bytes(buf[: header.total_length])
        del buf[: header.total_length]
        return raw

    def handle_frame(self, raw: bytes) -> None:
        device = self.device
        handshaking = self.version in ("3.4", "3.5") and self.session_key is None
        key = device.local_key if handshaking else self.session_key
        want_6699 = self.version == "3.5"
        if raw.startswith(tinytuya.PREFIX_6699_BIN) != want_6699:
            raise _Drop("frame format of another protocol version")
        try:
            msg = unpack_message(
                raw, hmac_key=key if self.version in ("3.4", "3.5") else None, no_retcode=True
            )
        except (tinytuya.DecodeError, ValueError, TypeError, struct.error) as exc:
            raise _Drop(f"undecodable frame: {exc}") from None
        if not msg.crc_good:
            # Wrong key (3.4 HMAC, 3.5 GCM tag) or a corrupt frame (CRC).
            device._count("integrity_failure")
            raise _Drop("frame integrity check failed")
        if handshaking:
            self.negotiate(msg)
            return
        try:
            request = self.open_request(msg)
        except _BadRequest:
            device._count("bad_payload")
            self.reply(msg.seqno, msg.cmd, _DATA_FORMAT_ERROR, retcode=1, encrypt=False)
            return
        self.dispatch(msg, request)

    # -- 3.4 / 3.5 session key -------------------------------------------------------

    def negotiate(self, msg: TuyaMessage) -> None:
        device = self.device
        payload = msg.payload
        if self.version == "3.4":
            try:
                payload = _ecb_decrypt(device.local_key, payload)
            except ValueError:
                raise _Drop("undecryptable session negotiation") from None
        if msg.cmd == tinytuya.SESS_KEY_NEG_START and not self.client_nonce:
            if len(payload) < 16:
                raise _Drop("short client nonce")
            self.client_nonce = payload[:16]
            self.device_nonce = os.urandom(16)
            answer = (
                self.device_nonce + hmac.new(device.local_key, self.client_nonce, sha256).digest()
            )
            if self.version == "3.4":
                answer = _ecb_encrypt(device.local_key, answer)
            self.send_frame(msg.seqno, tinytuya.SESS_KEY_NEG_RESP, answer, key=device.local_key)
            return
        if msg.cmd == tinytuya.SESS_KEY_NEG_FINISH and self.client_nonce:
            expected = hmac.new(device.local_key, self.device_nonce, sha256).digest()
            if not hmac.compare_digest(payload[:32], expected):
                device._count("integrity_failure")
                raise _Drop("session negotiation: client HMAC mismatch")
            mixed = bytes(a ^ b for a, b in zip(self.client_nonce, self.device_nonce))
            cipher = AESCipher(device.local_key)
            if self.version == "3.4":
                self.session_key = cipher.encrypt(mixed, use_base64=False, pad=False)
            else:
                iv = self.client_nonce[:12]
                self.session_key = cipher.encrypt(mixed, use_base64=False, pad=False, iv=iv)[12:28]
            device._count("session")
            return  # real devices do not answer FINISH
        raise _Drop(f"command {msg.cmd} before the session key is agreed")

    # -- requests --------------------------------------------------------------------

    def open_request(self, msg: TuyaMessage) -> dict[str, Any]:
        """Decrypt and parse a request payload, as the device would."""
        payload = msg.payload
        version_bytes = self.version.encode("ascii")
        try:
            if self.version == "3.1":
                if msg.cmd == tinytuya.CONTROL:
                    if not payload.startswith(version_bytes):
                        raise _BadRequest("3.1 CONTROL without its prefix")
                    signature, body = payload[3:19], payload[19:]
                    if not hmac.compare_digest(
                        signature, _md5_slice_31(body, self.device.local_key)
                    ):
                        raise _BadRequest("3.1 CONTROL signed with another key")
                    payload = AESCipher(self.device.local_key).decrypt(
                        body, use_base64=True, decode_text=False, verify_padding=True
                    )
            elif self.version == "3.3":
                if payload.startswith(version_bytes):
                    payload = payload[len(tinytuya.PROTOCOL_33_HEADER) :]
                if payload:
                    payload = _ecb_decrypt(self.device.local_key, payload)
            elif self.version == "3.4":
                assert self.session_key is not None
                if payload:
                    payload = _ecb_decrypt(self.session_key, payload)
                if payload.startswith(version_bytes):
                    payload = payload[len(tinytuya.PROTOCOL_34_HEADER) :]
            elif payload.startswith(version_bytes):  # 3.5: already opened by the GCM frame
                payload = payload[len(tinytuya.PROTOCOL_35_HEADER) :]
            if not payload:
                return {}
            request = json.loads(payload)
        except (ValueError, TypeError) as exc:
            raise _BadRequest(str(exc)) from None
        if not isinstance(request, dict):
            raise _BadRequest("request JSON is not an object")
        return request

    def dispatch(self, msg: TuyaMessage, request: Mapping[str, Any]) -> None:
        device = self.device
        cmd = msg.cmd
        if cmd in (tinytuya.DP_QUERY, tinytuya.DP_QUERY_NEW):
            device._count("DP_QUERY")
            if device.device22:
                # tinytuya switches to dev_type "device22" on this and asks again
                # with CONTROL_NEW and an explicit DP list.
                self.reply(msg.seqno, cmd, _DATA_UNVALID, retcode=1)
                return
            self.reply(msg.seqno, cmd, self.state_json(device._query_dps()))
        elif cmd in (tinytuya.CONTROL, tinytuya.CONTROL_NEW):
            wanted = _request_dps(request)
            if wanted and all(v is None for v in wanted.values()):
                # A device22 query: DPs named with null values, answered directly and
                # with the version header (tinytuya strips 15 bytes from such answers).
                device._count("DP_QUERY")
                dps = device._select_dps(wanted)
                self.reply(msg.seqno, cmd, self.state_json(dps), status_report=True)
                return
            device._count("CONTROL")
            applied = device._apply(wanted)
            self.reply(msg.seqno, cmd, _ACK)
            if applied:
                self.engine._push_now(device, applied)
        elif cmd == tinytuya.UPDATEDPS:
            device._count("UPDATEDPS")
            wanted = [str(dp) for dp in request.get("dpId") or []]
            fresh = device._refresh(wanted)
            self.reply(msg.seqno, cmd, _ACK)
            if fresh:
                self.engine._push_now(device, fresh)
        elif cmd == tinytuya.HEART_BEAT:
            device._count("HEART_BEAT")
            self.reply(msg.seqno, cmd, _ACK)
        else:
            device._count(f"command_{cmd}")
            self.reply(msg.seqno, cmd, _ACK)

    def state_json(self, dps: Mapping[str, Any]) -> dict[str, Any]:
        if self.version in ("3.1", "3.3"):
            return {"devId": self.device.dev_id, "dps": dict(dps)}
        return {"dps": dict(dps)}

    def status_json(self, dps: Mapping[str, Any]) -> dict[str, Any]:
        now = int(time.time())
        if self.version in ("3.1", "3.3"):
            return {"devId": self.device.dev_id, "dps": dict(dps), "t": now}
        return {"protocol": 4, "t": now, "data": {"dps": dict(dps)}}

    # -- output ----------------------------------------------------------------------

    def reply(
        self,
        seqno: int,
        cmd: int,
        body: Mapping[str, Any] | bytes,
        *,
        retcode: int = 0,
        encrypt: bool = True,
        status_report: bool = False,
    ) -> None:
        """Frame an answer: JSON or raw bytes, encrypted the way this version does."""
        data = body if isinstance(body, bytes) else _json_bytes(body)
        key = self.session_key or self.device.local_key
        header = self.version.encode("ascii") + tinytuya.PROTOCOL_3x_HEADER
        if not data or not encrypt:
            payload = data
        elif self.version == "3.1":
            if status_report:  # 3.1 reports are signed and encrypted like CONTROL
                b64 = AESCipher(key).encrypt(data, use_base64=True, pad=True)
                payload = b"3.1" + _md5_slice_31(b64, key) + b64
            else:
                payload = data
        elif self.version == "3.3":
            payload = _ecb_encrypt(key, data)
            if status_report:
                payload = header + payload  # 3.3 keeps its version header in clear
        elif self.version == "3.4":
            payload = _ecb_encrypt(key, header + data if status_report else data)
        else:
            payload = header + data if status_report else data
        self.send_frame(seqno, cmd, payload, retcode=retcode, key=key)

    def send_status(self, dps: Mapping[str, Any]) -> None:
        seqno = self.device._next_seqno()
        self.reply(seqno, tinytuya.STATUS, self.status_json(dps), status_report=True)

    def send_frame(
        self, seqno: int, cmd: int, payload: bytes, *, retcode: int = 0, key: bytes
    ) -> None:
        if self.version == "3.5":
            msg = TuyaMessage(
                seqno, cmd, retcode, payload, 0, True, tinytuya.PREFIX_6699_VALUE, True
            )
            frame = pack_message(msg, hmac_key=key)
        else:
            # pack_message leaves the 55AA return code to the caller.
            body = struct.pack(tinytuya.MESSAGE_RETCODE_FMT, retcode) + payload
            msg = TuyaMessage(seqno, cmd, retcode, body, 0, True, tinytuya.PREFIX_55AA_VALUE)
            frame = pack_message(msg, hmac_key=key if self.version == "3.4" else None)
        self.engine._send(self, frame)

    def garbage(self) -> bytes:
        """Junk bytes (never a frame prefix) followed by a well-delimited frame of noise."""
        rng = self.device._rng
        junk = bytes(rng.randrange(1, 256) for _ in range(37))
        if self.version == "3.5":
            noise = bytes(rng.randrange(256) for _ in range(58))
            head = struct.pack(
                tinytuya.MESSAGE_HEADER_FMT_6699, tinytuya.PREFIX_6699_VALUE, 0, 1, 8, 58
            )
            return junk + head + noise + tinytuya.SUFFIX_6699_BIN
        noise = bytes(rng.randrange(256) for _ in range(48))
        head = struct.pack(tinytuya.MESSAGE_HEADER_FMT_55AA, tinytuya.PREFIX_55AA_VALUE, 1, 8, 52)
        return junk + head + noise + tinytuya.SUFFIX_55AA_BIN


def _request_dps(request: Mapping[str, Any]) -> dict[str, Any]:
    dps = request.get("dps")
    if not isinstance(dps, dict):
        data = request.get("data")
        dps = data.get("dps") if isinstance(data, dict) else None
    return {str(k): v for k, v in dps.items()} if isinstance(dps, dict) else {}


# --- the server ---------------------------------------------------------------------


class TuyaSimulator:
    """Serve many simulated devices from one background thread.

    Each device listens on its own ``host:port`` (default port 6668, SO_REUSEADDR, so
    a simulator can start and stop many times). With ``announce_to`` every device
    that has no client sends a discovery packet there every ``announce_interval_s``,
    as real devices broadcast while idle.
    """

    def __init__(
        self,
        devices: Iterable[SimulatedTuyaDevice] = (),
        *,
        announce_to: tuple[str, int] | None = None,
        announce_interval_s: float = 5.0,
    ) -> None:
        self._thread: threading.Thread | None = None
        self.devices: list[SimulatedTuyaDevice] = []
        for device in devices:
            self.add(device)
        if announce_to is not None:
            announce_to = (_loopback_ipv4(announce_to[0]), int(announce_to[1]))
        self.announce_to = announce_to
        self.announce_interval_s = announce_interval_s
        self._selector: selectors.BaseSelector | None = None
        self._stopping = threading.Event()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._listeners: list[socket.socket] = []
        self._conns: dict[SimulatedTuyaDevice, list[_Connection]] = {}
        self._pending_lock = threading.Lock()
        self._pending: list[tuple[SimulatedTuyaDevice, dict[str, Any], int]] = []
        self._accepted = 0  # connections accepted so far, the serial of the newest

    def add(self, device: SimulatedTuyaDevice) -> SimulatedTuyaDevice:
        """Add a device before ``start()``."""
        if self.running:
            raise RuntimeError("add devices before starting the simulator")
        self.devices.append(device)
        return device

    def device(self, dev_id: str) -> SimulatedTuyaDevice:
        for device in self.devices:
            if device.dev_id == dev_id:
                return device
        raise KeyError(dev_id)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> TuyaSimulator:
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        for device in self.devices:
            if device._engine is not None:
                raise RuntimeError(f"{device!r} is already served by another simulator")
        selector = selectors.DefaultSelector()
        listeners: list[socket.socket] = []
        try:
            for device in self.devices:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listeners.append(listener)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    listener.bind((device.host, device._requested_port))
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"{device!r} cannot listen on {device.host}: {exc.strerror}"
                    ) from exc
                listener.listen(16)
                listener.setblocking(False)
                device.port = listener.getsockname()[1]
                selector.register(listener, selectors.EVENT_READ, device)
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            selector.register(self._wake_r, selectors.EVENT_READ, None)
        except BaseException:
            for listener in listeners:
                listener.close()
            selector.close()
            self._close_wake()
            raise
        self._selector = selector
        self._listeners = listeners
        self._conns = {device: [] for device in self.devices}
        self._stopping.clear()
        for device in self.devices:
            device._engine = self
        self._thread = threading.Thread(target=self._run, name="tuya-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every listener and connection and wait for the thread to end."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        thread.join(timeout=10)
        if thread.is_alive():
            raise RuntimeError("tuya simulator thread did not stop")
        self._thread = None

    def __enter__(self) -> TuyaSimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def announce_all(self, to: tuple[str, int] | None = None) -> None:
        """Every device sends one discovery packet (see ``SimulatedTuyaDevice.announce``)."""
        for device in self.devices:
            device.announce(to)

    # -- called from other threads ---------------------------------------------------

    def _queue_push(self, device: SimulatedTuyaDevice, dps: dict[str, Any]) -> None:
        # A client that connects after the change must not receive it as a report:
        # it would take that report for the answer to its own request.
        with self._pending_lock:
            self._pending.append((device, dps, self._accepted))
        self._wake()

    def _wake(self) -> None:
        wake_w = self._wake_w
        if wake_w is not None:
            try:
                wake_w.send(b"\0")
            except OSError:
                pass  # buffer full (a wake-up is pending anyway) or closing

    def _client_count(self, device: SimulatedTuyaDevice) -> int:
        conns = list(self._conns.get(device, ()))
        return sum(1 for conn in conns if not (conn.rejected or conn.closing or conn.closed))

    # -- the loop (simulator thread only) ----------------------------------------------

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        next_announce = time.monotonic()
        try:
            while not self._stopping.is_set():
                timeout = None
                if self.announce_to is not None:
                    timeout = max(0.0, next_announce - time.monotonic())
                for key, mask in selector.select(timeout):
                    try:
                        self._on_event(key, mask)
                    except Exception:
                        log.exception("tuya simulator: error handling an event")
                        if isinstance(key.data, _Connection):
                            self._close(key.data)
                self._flush_pushes()
                if self.announce_to is not None and time.monotonic() >= next_announce:
                    self._announce_idle()
                    next_announce = time.monotonic() + self.announce_interval_s
        finally:
            self._shutdown()

    def _on_event(self, key: selectors.SelectorKey, mask: int) -> None:
        data = key.data
        if data is None:
            try:
                while self._wake_r is not None and self._wake_r.recv(4096):
                    pass
            except OSError:
                pass
        elif isinstance(data, SimulatedTuyaDevice):
            self._accept(key.fileobj, data)  # type: ignore[arg-type]
        else:
            if mask & selectors.EVENT_WRITE:
                self._flush(data)
            if mask & selectors.EVENT_READ and not data.closed:
                self._read(data)

    def _accept(self, listener: socket.socket, device: SimulatedTuyaDevice) -> None:
        while True:
            try:
                sock, _peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.debug("accept failed on %r", device, exc_info=True)
                return
            sock.setblocking(False)
            # An ack and the STATUS report after it go out as two small writes: without
            # NODELAY, Nagle holds the second one for the client's delayed ACK (40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock, device)
            self._accepted += 1
            conn.serial = self._accepted
            self._forget_dead(device)
            if device.mode == "busy" or self._client_count(device) >= device.max_clients:
                # Real devices complete the TCP handshake, then drop the newcomer.
                conn.rejected = True
                device._count("reject")
            else:
                device._count("connect")
            self._conns[device].append(conn)
            assert self._selector is not None
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _forget_dead(self, device: SimulatedTuyaDevice) -> None:
        """Close clients that already hung up but whose EOF is not yet processed."""
        for conn in list(self._conns[device]):
            if conn.closed or conn.rejected:
                continue
            try:
                peek = conn.sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                peek = b""
            if not peek:
                self._close(conn)

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        device = conn.device
        if conn.closing:
            return  # half-closed: discard whatever the client still sends
        if conn.rejected:
            self._close(conn, reset=True)
            return
        if device.mode == "hang":
            return
        conn.inbuf += data
        try:
            if len(conn.inbuf) > _MAX_INPUT_BYTES:
                raise _Drop("too much input without a frame")
            while not (conn.closing or conn.closed):
                raw = conn.take_frame()
                if raw is None:
                    break
                if device.mode == "garbage":
                    device._count("garbage")
                    self._send(conn, conn.garbage())
                    self._half_close(conn)
                    break
                if device.mode == "hang":
                    break
                conn.handle_frame(raw)
        except _Drop as exc:
            log.debug("%r: dropping a client: %s", device, exc)
            device._count("dropped")
            self._half_close(conn)

    def _send(self, conn: _Connection, frame: bytes) -> None:
        if conn.closed:
            return
        conn.outbuf += frame
        self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        while conn.outbuf and not conn.closed:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)  # the client went away mid-answer
                return
            del conn.outbuf[:sent]
        if conn.closed:
            return
        assert self._selector is not None
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        self._selector.modify(conn.sock, events, conn)
        if conn.closing and not conn.outbuf:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(conn)

    def _half_close(self, conn: _Connection) -> None:
        # Send what is queued, then FIN; input is read and discarded until the client
        # closes, so no unread data turns our close into a reset.
        conn.closing = True
        self._flush(conn)

    def _close(self, conn: _Connection, *, reset: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        if self._selector is not None:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        if reset:
            # SO_LINGER 0: close() sends RST, what a busy device answers with.
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        conn.sock.close()
        conns = self._conns.get(conn.device)
        if conns is not None and conn in conns:
            conns.remove(conn)

    def _push_now(
        self, device: SimulatedTuyaDevice, dps: Mapping[str, Any], up_to: int | None = None
    ) -> None:
        for conn in list(self._conns.get(device, ())):
            if conn.ready and (up_to is None or conn.serial <= up_to):
                conn.send_status(dps)

    def _flush_pushes(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for device, dps, up_to in pending:
            self._push_now(device, dps, up_to)

    def _announce_idle(self) -> None:
        for device in self.devices:
            # Devices stop announcing while a client (or busy's phantom) holds them.
            if device.mode == "busy" or self._client_count(device):
                continue
            try:
                device.announce(self.announce_to)
            except OSError:
                log.debug("announce failed for %r", device, exc_info=True)

    def _shutdown(self) -> None:
        for conns in self._conns.values():
            for conn in list(conns):
                self._close(conn)
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self._close_wake()
        for device in self.devices:
            if device._engine is self:
                device._engine = None

    def _close_wake(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None


def devices_from_file(path: str, **kwargs: Any) -> list[SimulatedTuyaDevice]:
    """Devices for every entry of a devices.json that has an address and a version."""
    with open(path, encoding="utf-8") as handle:
        entries = json.load(handle)
    if isinstance(entries, dict):
        entries = entries.get("devices", [])
    return [
        SimulatedTuyaDevice.from_devices_json(entry, **kwargs)
        for entry in entries
        if entry.get("ip") and entry.get("version")
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve simulated Tuya devices on loopback.")
    parser.add_argument("--devices", required=True, help="a tinytuya devices.json")
    parser.add_argument("--mode", default="normal", choices=MODES)
    parser.add_argument(
        "--announce-to",
        metavar="HOST:PORT",
        help="send discovery packets to this loopback UDP address every 5 s",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    announce_to = None
    if args.announce_to:
        host, _, port = args.announce_to.rpartition(":")
        announce_to = (host, int(port))
    devices = devices_from_file(args.devices, mode=args.mode)
    with TuyaSimulator(devices, announce_to=announce_to) as simulator:
        for device in simulator.devices:
            log.info("serving %r", device)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
