"""Simulated Kasa/Tapo "smart" devices: discovery on UDP 20002, KLAP v2 over HTTP.

Plugs people buy now (Tapo P110/P115, Kasa KP125M, EP25 v2, P304M strips) speak
TP-Link's smart protocol, which the real python-kasa (0.7.7 and 0.12) reaches so:

- UDP discovery: a 16-byte TDP header (version 2, op code 1, length, flags,
  serial, CRC32) then, in the probe, the client's RSA public key; the answer
  is the same header and ``{"error_code": 0, "result": {...}}`` with the
  device's type, model, MAC and ``mgt_encrypt_schm`` (``encrypt_type``
  ``KLAP``, ``lv`` 2, ``http_port``), sent from port 20002; with
  ``encrypt_info=True``, also newer firmware's ``encrypt_info`` (a JSON
  block AES-encrypted with a key sealed by the probe's RSA key, OAEP).
- KLAP v2 on HTTP (``POST /app/handshake1``, ``/app/handshake2``,
  ``/app/request?seq=N``). The owner's auth hash is
  ``sha256(sha1(username) + sha1(password))``. handshake1 takes the client's
  16-byte seed and answers the device's seed and
  ``sha256(local_seed + remote_seed + auth_hash)`` with a ``TP_SESSIONID``
  cookie; the client checks that hash against its own credentials (so wrong
  credentials fail there, as with a real device); handshake2 must carry
  ``sha256(remote_seed + local_seed + auth_hash)``. Requests are AES-128-CBC
  (key, IV and signing key derived from both seeds and the auth hash; the
  IV's last four bytes are the sequence number in the URL), prefixed with a
  SHA-256 signature; answers are encrypted with the same sequence number.
- The smart methods ``update()`` asks for (``component_nego``,
  ``get_device_info``, ``get_energy_usage``, ``get_current_power``,
  ``get_device_usage``, ``get_device_time``, ..., batched in
  ``multipleRequest``), answered from the dumps in ``tests/fixtures/kasa``;
  a strip's outlets through ``get_child_device_list``,
  ``get_child_device_component_list`` and ``control_child``. Unknown methods
  get ``error_code`` -1002 (``UNKNOWN_METHOD_ERROR``), as real firmware answers.

Addressing: like :mod:`simulators.kasa`, each device has its own loopback
address. All devices of one :class:`SmartKasaSimulator` serve HTTP on one
port ``P`` (80 on a real network; the simulator picks a free one), which
they announce as ``http_port`` in discovery, and answer discovery on
``(host, 20002)``: python-kasa only takes smart answers whose source port is
20002 (or 20004) and cannot be told another. The simulator also listens at
``(discovery_host, 20002)`` (``127.0.0.1``): a probe there is answered by
every device, each from its own address, so
``Discover.discover(target="127.0.0.1", port=P)`` finds smart devices beside
legacy ones of a :class:`simulators.kasa.KasaSimulator` on the same port
``P``. python-kasa 0.7.7 ignores ``http_port`` and uses port 80 unless given
``port``; ``discover(port=P)`` and ``discover_single(host, port=P)`` make
both lines use ``P``.

Failure modes (``mode``): ``"normal"``; ``"hang"`` answers discovery but
never answers HTTP; ``"refuse"`` answers discovery but closes the HTTP port;
``"garbage"`` answers requests with bytes that do not decrypt. ``delay_s``
delays every HTTP answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import hashlib
import ipaddress
import json
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from simulators._loop_thread import LoopThreadSimulator
from simulators.kasa import _check_loopback, load_fixture, loopback_host

_LOGGER = logging.getLogger(__name__)

#: python-kasa sends smart discovery here and takes answers only from here.
DISCOVERY_PORT = 20002

SMART_FIXTURES: tuple[str, ...] = (
    "smart_P110(UK)_1.0_1.3.0.json",
    "smart_P115(EU)_1.0_1.2.3.json",
)

MODES = ("normal", "hang", "refuse", "garbage")

#: Real firmware sets this TIMEOUT cookie (seconds) with the session id.
SESSION_TIMEOUT_S = 86400

_UNKNOWN_METHOD = -1002  # UNKNOWN_METHOD_ERROR
_PARAMS_ERROR = -1008
_MAX_BODY_BYTES = 64 * 1024
_TDP_HEADER = struct.Struct(">BBHHBBII")
_TDP_CRC_SEED = 0x5A6B7C8D
_SEQ = struct.Struct(">l")
_STRIP_OUTLETS = 4
_CHILD_CATEGORY = "plug.powerstrip.sub-plug"
# Components a strip's parent has and its plugs do not (and the reverse).
_PARENT_ONLY = ("child_device", "control_child")
_OUTLET_ONLY = ("energy_monitoring", "power_protection", "current_protection")


def auth_hash(username: str, password: str) -> bytes:
    """KLAP v2 owner hash: sha256(sha1(username) + sha1(password))."""
    return hashlib.sha256(
        hashlib.sha1(username.encode()).digest() + hashlib.sha1(password.encode()).digest()
    ).digest()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class KlapSession:
    """One device-side KLAP v2 session: the seeds, the derived keys, and AES."""

    def __init__(self, local_seed: bytes, remote_seed: bytes, owner_hash: bytes) -> None:
        material = local_seed + remote_seed + owner_hash
        self.local_seed = local_seed
        self.remote_seed = remote_seed
        self.owner_hash = owner_hash
        self.key = hashlib.sha256(b"lsk" + material).digest()[:16]
        full_iv = hashlib.sha256(b"iv" + material).digest()
        self.iv = full_iv[:12]
        self.signing_key = hashlib.sha256(b"ldk" + material).digest()[:28]
        self.confirmed = False  # handshake2 seen
        self.expires_at = time.monotonic() + SESSION_TIMEOUT_S

    def expected_handshake2(self) -> bytes:
        return hashlib.sha256(self.remote_seed + self.local_seed + self.owner_hash).digest()

    def _cipher(self, seq: int) -> Cipher:
        return Cipher(algorithms.AES(self.key), modes.CBC(self.iv + _SEQ.pack(seq)))

    def decrypt(self, body: bytes, seq: int) -> bytes | None:
        """The request's plain text, or None if its signature or padding is wrong."""
        signature, ciphertext = body[:32], body[32:]
        expected = hashlib.sha256(self.signing_key + _SEQ.pack(seq) + ciphertext).digest()
        if not secrets.compare_digest(signature, expected) or len(ciphertext) % 16:
            return None
        decryptor = self._cipher(seq).decryptor()
        padded = decryptor.update(ciphertext) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        try:
            return unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            return None

    def encrypt(self, plain: bytes, seq: int) -> bytes:
        padder = padding.PKCS7(128).padder()
        padded = padder.update(plain) + padder.finalize()
        encryptor = self._cipher(seq).encryptor()
        ciphertext = encryptor.update(padded) + encryptor.finalize()
        signature = hashlib.sha256(self.signing_key + _SEQ.pack(seq) + ciphertext).digest()
        return signature + ciphertext


class _SmartMeter:
    """A plug's own energy counters, in SI units (the wire has mW and Wh)."""

    def __init__(self, usage: Mapping[str, Any], power: Mapping[str, Any]) -> None:
        if "current_power" in usage:
            self.power_w = float(usage["current_power"]) / 1000  # mW
        else:
            self.power_w = float(power.get("current_power", 0))  # W
        self.today_kwh = float(usage.get("today_energy", 0)) / 1000
        self.month_kwh = float(usage.get("month_energy", 0)) / 1000
        self.today_runtime_min = int(usage.get("today_runtime", 0))
        self.month_runtime_min = int(usage.get("month_runtime", 0))

    def emeter_data(self, on: bool, voltage_v: float) -> dict[str, Any]:
        power_w = self.power_w if on else 0.0
        return {
            "current_ma": round(power_w / voltage_v * 1000),
            "energy_wh": round(self.today_kwh * 1000),
            "power_mw": round(power_w * 1000),
            "voltage_mv": round(voltage_v * 1000),
        }

    def energy_usage(self, on: bool, now: datetime) -> dict[str, Any]:
        return {
            "current_power": round(self.power_w * 1000) if on else 0,
            "electricity_charge": [0, 0, 0],
            "local_time": now.strftime("%Y-%m-%d %H:%M:%S"),
            "month_energy": round(self.month_kwh * 1000),
            "month_runtime": self.month_runtime_min,
            "today_energy": round(self.today_kwh * 1000),
            "today_runtime": self.today_runtime_min,
        }


class _SmartOutlet:
    """A relay with its own info and meter: the plug itself, or a strip socket."""

    def __init__(self, info: dict[str, Any], meter: _SmartMeter | None, dump: Mapping) -> None:
        self.info = info
        self.meter = meter
        self.dump = dump  # the answers of methods nothing here computes
        self.on = bool(info.get("device_on"))
        self.on_since = time.monotonic() - int(info.get("on_time", 0))

    def set_on(self, on: bool) -> None:
        if on and not self.on:
            self.on_since = time.monotonic()
        self.on = on


class SimulatedSmartDevice:
    """One simulated smart plug (or, with ``strip=True``, a P304M-style strip
    of metering outlets) built from a smart dump.

    ``username`` / ``password`` are the owner's TP-Link account: a client
    with other credentials fails the KLAP handshake. ``None`` for both is a
    device never bound to an account (blank credentials work).
    """

    def __init__(
        self,
        fixture: str | Path | Mapping[str, Any] = SMART_FIXTURES[0],
        *,
        host: str = "127.0.2.2",
        port: int | None = None,
        alias: str | None = None,
        username: str | None = "owner@example.com",
        password: str | None = "owner-password",
        strip: bool = False,
        child_aliases: Sequence[str] | None = None,
        mode: str = "normal",
        clock: Callable[[], datetime] = datetime.now,
        voltage_v: float = 230.0,
        encrypt_info: bool = False,
    ) -> None:
        dump = (
            copy.deepcopy(dict(fixture)) if isinstance(fixture, Mapping) else load_fixture(fixture)
        )
        if "get_device_info" not in dump or "component_nego" not in dump:
            raise ValueError("not a smart Kasa dump: no get_device_info / component_nego")
        self.host = _check_loopback(host)
        self.port = port
        self.mode = mode
        #: Seconds every HTTP answer waits (a slow Wi-Fi link).
        self.delay_s = 0.0
        self.clock = clock
        self.owner_hash = auth_hash(username or "", password or "")
        self.owner = hashlib.md5((username or "").encode()).hexdigest().upper() if username else ""
        self.is_strip = strip
        #: Mains voltage get_emeter_data reports (the dumps hold none).
        self.voltage_v = voltage_v
        #: Newer firmware adds ``encrypt_info`` to its discovery answer: a
        #: JSON block AES-encrypted with a key sealed by the probe's RSA key.
        self.encrypt_info = encrypt_info
        self._lock = threading.Lock()
        self._dump = dump
        self.discovery_result = copy.deepcopy(dump.get("discovery_result", {}).get("result", {}))
        info = copy.deepcopy(dump["get_device_info"])
        self.model = str(self.discovery_result.get("device_model") or info.get("model", ""))
        self._alias = alias or f"{info.get('model', 'Tapo')} {host}"
        #: Requests answered (after decryption), handshakes completed.
        self.request_count = 0
        self.handshake_count = 0
        #: handshake1s received (attempts, refused or not).
        self.handshake1_count = 0
        self.sessions: dict[str, KlapSession] = {}
        components = copy.deepcopy(dump["component_nego"]["component_list"])
        meter = self._meter(dump)
        if not strip:
            self._components = components
            self._outlets = [_SmartOutlet(info, meter, dump)]
            return
        self.model = "P304M(UK)"
        self._components = [c for c in components if c["id"] not in _OUTLET_ONLY] + [
            {"id": name, "ver_code": 1} for name in _PARENT_ONLY
        ]
        self._child_components = [c for c in components if c["id"] not in _PARENT_ONLY]
        aliases = list(child_aliases or [])
        self._outlets = []
        for index in range(_STRIP_OUTLETS):
            child = copy.deepcopy(info)
            child.update(
                category=_CHILD_CATEGORY,
                model="P304M",
                position=index + 1,
                slot_number=_STRIP_OUTLETS,
                device_on=index % 2 == 0,
            )
            name = aliases[index] if index < len(aliases) else f"Outlet {index + 1}"
            child["nickname"] = _b64(name)
            self._outlets.append(_SmartOutlet(child, self._meter(dump), dump))
        for key in ("device_on", "on_time", "auto_off_status", "auto_off_remain_time"):
            info.pop(key, None)  # a P304M's parent has no relay of its own
        self._strip_info = info

    @staticmethod
    def _meter(dump: Mapping[str, Any]) -> _SmartMeter | None:
        usage = dump.get("get_energy_usage")
        if not isinstance(usage, dict):
            return None
        return _SmartMeter(usage, dump.get("get_current_power") or {})

    # -- identity ---------------------------------------------------------

    @property
    def alias(self) -> str:
        return self._alias

    @property
    def mac(self) -> str:
        """``AA-BB-...`` as smart devices report it, derived from the address."""
        raw = bytes([0x06, 0x00]) + ipaddress.ip_address(self.host).packed
        return "-".join(f"{b:02X}" for b in raw)

    @property
    def device_id(self) -> str:
        return hashlib.sha1(self.mac.encode()).hexdigest().upper()

    @property
    def child_ids(self) -> list[str]:
        """Outlet ids: the strip's id and a two-digit index, as on a P304M."""
        if not self.is_strip:
            return []
        return [f"{self.device_id}{i:02d}" for i in range(len(self._outlets))]

    def child_alias(self, index: int) -> str:
        return base64.b64decode(self._outlets[index].info["nickname"]).decode()

    # -- live state -----------------------------------------------------------

    def _outlet(self, child: int | None) -> _SmartOutlet:
        if self.is_strip and child is None:
            raise ValueError("a strip's readings are per outlet: pass child=")
        return self._outlets[child or 0]

    def set_energy(
        self,
        *,
        power_w: float | None = None,
        today_kwh: float | None = None,
        month_kwh: float | None = None,
        child: int | None = None,
    ) -> None:
        """Change a meter's readings (SI units); ``None`` keeps a value."""
        meter = self._outlet(child).meter
        if meter is None:
            raise ValueError(f"{self.model} has no energy meter")
        with self._lock:
            if power_w is not None:
                meter.power_w = float(power_w)
            if today_kwh is not None:
                meter.today_kwh = float(today_kwh)
            if month_kwh is not None:
                meter.month_kwh = float(month_kwh)

    def energy(self, child: int | None = None) -> dict[str, Any]:
        """The ``get_energy_usage`` answer the device gives now."""
        outlet = self._outlet(child)
        assert outlet.meter is not None
        with self._lock:
            return outlet.meter.energy_usage(outlet.on, self.clock())

    def set_relay(self, on: bool, child: int | None = None) -> None:
        with self._lock:
            self._outlet(child).set_on(on)

    def is_on(self, child: int | None = None) -> bool:
        return self._outlet(child).on

    # -- discovery ----------------------------------------------------------

    def discovery_answer(self, probe: bytes, http_port: int) -> bytes | None:
        """The UDP answer to a discovery probe, or None if it is not one."""
        if len(probe) < _TDP_HEADER.size or probe[0] != 2:
            return None
        serial = _TDP_HEADER.unpack_from(probe)[6]
        result = copy.deepcopy(self.discovery_result)
        result.update(
            ip=self.host,
            mac=self.mac,
            device_id=self.device_id,
            owner=self.owner,
            factory_default=False,
        )
        result["device_model"] = self.model
        scheme = result.setdefault("mgt_encrypt_schm", {})
        # Firmware that speaks KLAP says so; P115 1.2.3 said AES in the dump,
        # its 1.3 firmware KLAP, which is what this simulator speaks.
        scheme.update(encrypt_type="KLAP", lv=2, http_port=http_port, is_support_https=False)
        if self.encrypt_info:
            sealed = _sealed_info(probe[_TDP_HEADER.size :], {"owner": self.owner})
            if sealed is not None:
                result["encrypt_info"] = sealed
        body = json.dumps({"error_code": 0, "result": result}, separators=(",", ":")).encode()
        header = bytearray(_TDP_HEADER.pack(2, 0, 1, len(body), 17, 0, serial, _TDP_CRC_SEED))
        packet = header + body
        packet[12:16] = binascii.crc32(packet).to_bytes(4, "big")
        return bytes(packet)

    # -- KLAP -----------------------------------------------------------------

    def handshake1(self, local_seed: bytes) -> tuple[str, bytes] | None:
        if len(local_seed) != 16:
            return None
        self.handshake1_count += 1
        remote_seed = secrets.token_bytes(16)
        session = KlapSession(local_seed, remote_seed, self.owner_hash)
        session_id = secrets.token_hex(16).upper()
        with self._lock:
            now = time.monotonic()
            for key in [k for k, s in self.sessions.items() if s.expires_at < now]:
                del self.sessions[key]
            self.sessions[session_id] = session
        proof = hashlib.sha256(local_seed + remote_seed + self.owner_hash).digest()
        return session_id, remote_seed + proof

    def handshake2(self, session_id: str | None, body: bytes) -> bool:
        session = self.sessions.get(session_id or "")
        if session is None or not secrets.compare_digest(body, session.expected_handshake2()):
            return False
        session.confirmed = True
        self.handshake_count += 1
        return True

    def request(self, session_id: str | None, seq: int, body: bytes) -> bytes | None:
        """The encrypted answer to one KLAP request; None: 403 (no session)."""
        session = self.sessions.get(session_id or "")
        if session is None or not session.confirmed or session.expires_at < time.monotonic():
            return None
        plain = session.decrypt(body, seq)
        if plain is None:
            return None
        if self.mode == "garbage":
            return secrets.token_bytes(48)
        try:
            request = json.loads(plain)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            answer: dict[str, Any] = {"error_code": -1003}  # JSON_DECODE_FAIL_ERROR
        else:
            with self._lock:
                answer = self.handle(request)
            self.request_count += 1
        return session.encrypt(json.dumps(answer, separators=(",", ":")).encode(), seq)

    # -- smart methods ----------------------------------------------------------

    def handle(self, request: Mapping[str, Any], outlet: _SmartOutlet | None = None) -> dict:
        """Answer one ``{"method": ..., "params": ...}`` (caller holds the lock)."""
        method = request.get("method")
        params = request.get("params")
        if method == "multipleRequest":
            requests = params.get("requests") if isinstance(params, dict) else None
            if not isinstance(requests, list):
                return {"error_code": _PARAMS_ERROR}
            responses = []
            for sub in requests:
                if not isinstance(sub, dict):
                    continue
                answer = self.handle(sub, outlet)
                responses.append({"method": sub.get("method"), **answer})
            return {"error_code": 0, "result": {"responses": responses}}
        if outlet is None and self.is_strip:
            return self._strip_method(method, params)
        target = outlet or self._outlets[0]
        return self._outlet_method(target, method, params, child=outlet is not None)

    def _strip_method(self, method: Any, params: Any) -> dict[str, Any]:
        if method == "get_device_info":
            info = copy.deepcopy(self._strip_info)
            self._identity(info)
            return {"error_code": 0, "result": info}
        if method == "component_nego":
            return {"error_code": 0, "result": {"component_list": self._components}}
        if method == "get_child_device_list":
            children = [self._child_info(i) for i in range(len(self._outlets))]
            return self._page("child_device_list", children, params)
        if method == "get_child_device_component_list":
            components = [
                {"device_id": child_id, "component_list": self._child_components}
                for child_id in self.child_ids
            ]
            return self._page("child_component_list", components, params)
        if method == "control_child":
            if not isinstance(params, dict) or params.get("device_id") not in self.child_ids:
                return {"error_code": _PARAMS_ERROR}
            outlet = self._outlets[self.child_ids.index(params["device_id"])]
            data = params.get("requestData")
            if not isinstance(data, dict):
                return {"error_code": _PARAMS_ERROR}
            return {"error_code": 0, "result": {"responseData": self.handle(data, outlet)}}
        if method in ("get_energy_usage", "get_current_power", "set_device_info"):
            return {"error_code": _UNKNOWN_METHOD}
        return self._outlet_method(self._outlets[0], method, params, child=False)

    @staticmethod
    def _page(name: str, items: list, params: Any) -> dict[str, Any]:
        start = params.get("start_index", 0) if isinstance(params, dict) else 0
        start = start if isinstance(start, int) and start >= 0 else 0
        # Real strips answer ten at most per page.
        page = items[start : start + 10]
        return {"error_code": 0, "result": {name: page, "start_index": start, "sum": len(items)}}

    def _identity(self, info: dict[str, Any]) -> None:
        info.update(
            ip=self.host,
            mac=self.mac,
            device_id=self.device_id,
            nickname=_b64(self._alias),
            model=self.model.partition("(")[0],
        )

    def _child_info(self, index: int) -> dict[str, Any]:
        outlet = self._outlets[index]
        info = copy.deepcopy(outlet.info)
        info.update(
            device_id=self.child_ids[index],
            original_device_id=self.device_id,
            mac=self.mac,
            device_on=outlet.on,
            on_time=int(time.monotonic() - outlet.on_since) if outlet.on else 0,
        )
        return info

    def _outlet_method(
        self, outlet: _SmartOutlet, method: Any, params: Any, *, child: bool
    ) -> dict[str, Any]:
        now = self.clock()
        if method == "get_device_info":
            if child:
                return {"error_code": 0, "result": self._child_info(self._outlets.index(outlet))}
            info = copy.deepcopy(outlet.info)
            self._identity(info)
            info["device_on"] = outlet.on
            info["on_time"] = int(time.monotonic() - outlet.on_since) if outlet.on else 0
            return {"error_code": 0, "result": info}
        if method == "component_nego":
            components = self._child_components if child else self._components
            return {"error_code": 0, "result": {"component_list": components}}
        if method == "set_device_info":
            if not isinstance(params, dict):
                return {"error_code": _PARAMS_ERROR}
            if "device_on" in params:
                outlet.set_on(bool(params["device_on"]))
            if isinstance(params.get("nickname"), str):
                if child:
                    outlet.info["nickname"] = params["nickname"]
                else:
                    self._alias = base64.b64decode(params["nickname"]).decode()
            return {"error_code": 0}
        if method == "get_device_time":
            utc_now = datetime.now(timezone.utc).replace(tzinfo=None)
            offset_min = round((now - utc_now).total_seconds() / 60)
            return {
                "error_code": 0,
                "result": {
                    "region": outlet.dump.get("get_device_time", {}).get("region", "UTC"),
                    "time_diff": offset_min,
                    "timestamp": int((now - timedelta(minutes=offset_min)).timestamp()),
                },
            }
        if outlet.meter is not None and method == "get_energy_usage":
            return {"error_code": 0, "result": outlet.meter.energy_usage(outlet.on, now)}
        if outlet.meter is not None and method == "get_emeter_data":
            return {"error_code": 0, "result": outlet.meter.emeter_data(outlet.on, self.voltage_v)}
        if outlet.meter is not None and method == "get_emeter_vgain_igain":
            return {"error_code": 0, "result": {"v_gain": 118108, "i_gain": 7350}}
        if outlet.meter is not None and method == "get_current_power":
            power_w = round(outlet.meter.power_w) if outlet.on else 0
            return {"error_code": 0, "result": {"current_power": power_w}}
        if isinstance(method, str) and method.startswith("get_") and method in outlet.dump:
            return {"error_code": 0, "result": copy.deepcopy(outlet.dump[method])}
        return {"error_code": _UNKNOWN_METHOD}

    def __repr__(self) -> str:
        kind = "strip" if self.is_strip else "plug"
        return f"<SimulatedSmartDevice {self.model} {kind} {self.host}:{self.port} {self.mode}>"


def _sealed_info(probe_body: bytes, info: Mapping[str, Any]) -> dict[str, str] | None:
    """``encrypt_info`` as newer firmware sends it: ``info`` encrypted with a
    fresh AES key and IV, which are sealed with the prober's RSA public key
    (OAEP, SHA-1). None if the probe carries no usable key."""
    try:
        pem = json.loads(probe_body)["params"]["rsa_key"]
        public_key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(public_key, RSAPublicKey):
        return None
    key_and_iv = secrets.token_bytes(32)
    sealed_key = public_key.encrypt(
        key_and_iv,
        asymmetric_padding.OAEP(
            mgf=asymmetric_padding.MGF1(algorithm=hashes.SHA1()),
            algorithm=hashes.SHA1(),
            label=None,
        ),
    )
    padder = padding.PKCS7(128).padder()
    plain = json.dumps({"connect_ssid": "", "connect_type": "wireless", **info}).encode()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key_and_iv[:16]), modes.CBC(key_and_iv[16:])).encryptor()
    data = encryptor.update(padded) + encryptor.finalize()
    return {
        "sym_schm": "AES",
        "key": base64.b64encode(sealed_key).decode(),
        "data": base64.b64encode(data).decode(),
    }


def make_smart_devices(
    count: int,
    *,
    fixtures: Sequence[str] = SMART_FIXTURES,
    first_index: int = 500,
    **kwargs: Any,
) -> list[SimulatedSmartDevice]:
    """``count`` plugs cycling through ``fixtures``, from 127.0.2.2 on (so they
    never share an address with :func:`simulators.kasa.make_devices`' ones)."""
    return [
        SimulatedSmartDevice(
            fixtures[i % len(fixtures)], host=loopback_host(first_index + i), **kwargs
        )
        for i in range(count)
    ]


# --- network --------------------------------------------------------------------


class _HttpConnection:
    """One HTTP/1.1 keep-alive connection to a device (the subset TP-Link speaks)."""

    def __init__(self, sim: SmartKasaSimulator, device: SimulatedSmartDevice) -> None:
        self.sim = sim
        self.device = device

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sim._connections.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _version = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length > _MAX_BODY_BYTES:
                    break
                body = await reader.readexactly(length)
                if self.device.mode == "hang":
                    # Read and drop until the client gives up and closes.
                    while await reader.read(_MAX_BODY_BYTES):
                        pass
                    break
                if self.device.delay_s > 0:
                    await asyncio.sleep(self.device.delay_s)
                status, payload, cookie = self.respond(method, target, headers, body)
                response = [
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Forbidden'}",
                    "Content-Type: application/octet-stream",
                    f"Content-Length: {len(payload)}",
                ]
                if cookie:
                    response.append(f"Set-Cookie: {cookie}")
                writer.write(("\r\n".join(response) + "\r\n\r\n").encode() + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except ValueError:
            _LOGGER.debug("%r: malformed HTTP request, closing", self.device)
        except asyncio.CancelledError:
            # The simulator is stopping. Ending quietly: asyncio's stream
            # server asks a cancelled handler for its exception and logs it.
            pass
        finally:
            self.sim._connections.discard(writer)
            writer.close()

    def respond(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, bytes, str]:
        device = self.device
        url = urlsplit(target)
        session_id = _cookie(headers.get("cookie", ""), "TP_SESSIONID")
        if method != "POST":
            return 404, b"", ""
        if url.path == "/app/handshake1":
            started = device.handshake1(body)
            if started is None:
                return 400, b"", ""
            new_id, payload = started
            return 200, payload, f"TP_SESSIONID={new_id};TIMEOUT={SESSION_TIMEOUT_S}"
        if url.path == "/app/handshake2":
            return (200 if device.handshake2(session_id, body) else 403), b"", ""
        if url.path == "/app/request":
            try:
                seq = int(parse_qs(url.query)["seq"][0])
            except (KeyError, ValueError, IndexError):
                return 400, b"", ""
            answer = device.request(session_id, seq, body)
            return (403, b"", "") if answer is None else (200, answer, "")
        return 404, b"", ""


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class _Discovery(asyncio.DatagramProtocol):
    """UDP 20002 on a device's address, or on the discovery address (all answer)."""

    def __init__(self, sim: SmartKasaSimulator, host: str) -> None:
        self.sim = sim
        self.host = host
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.host == self.sim.discovery_host:
            answering = list(self.sim.devices)
        else:
            answering = [d for d in self.sim.devices if d.host == self.host]
        loop = asyncio.get_running_loop()
        for order, device in enumerate(answering):
            answer = device.discovery_answer(data, self.sim.port or 0)
            endpoint = self.sim._udp.get(device.host)
            if answer is None or endpoint is None or endpoint.transport is None:
                continue
            loop.call_later(order * self.sim.discovery_stagger_s, endpoint.send, answer, addr)

    def send(self, body: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(body, addr)


class SmartKasaSimulator(LoopThreadSimulator):
    """Runs simulated smart devices in one asyncio loop on a background thread.

    ``port`` is the HTTP port of every device (``None``: a free one); UDP
    discovery is on 20002 at each device's address and at ``discovery_host``.
    Use as a context manager, or :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        devices: Iterable[SimulatedSmartDevice] = (),
        *,
        port: int | None = None,
        discovery_host: str = "127.0.0.1",
        discovery_stagger_s: float = 0.001,
    ) -> None:
        self.devices: list[SimulatedSmartDevice] = list(devices)
        self.port = port
        self.discovery_host = _check_loopback(discovery_host)
        self.discovery_stagger_s = discovery_stagger_s
        super().__init__()
        self._servers: dict[int, asyncio.AbstractServer] = {}
        self._connections: set[asyncio.StreamWriter] = set()
        self._udp: dict[str, _Discovery] = {}
        for device in self.devices:
            if device.host == discovery_host:
                raise ValueError(f"{device.host} is the discovery address: use another host")

    thread_name = "kasa-smart-simulator"
    what = "simulated smart devices"

    def set_mode(self, device: SimulatedSmartDevice, mode: str) -> None:
        """Change a device's failure mode (``refuse`` closes its HTTP port)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        device.mode = mode
        if self.running:
            self._call(self._apply_mode(device))

    async def _start_all(self) -> None:
        await self._udp_open(self.discovery_host)
        for device in self.devices:
            device.port = self.port
            await self._udp_open(device.host)
            await self._apply_mode(device)

    async def _udp_open(self, host: str) -> None:
        if host in self._udp:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, DISCOVERY_PORT))
        except OSError:
            sock.close()
            raise
        endpoint = _Discovery(self, host)
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: endpoint, sock=sock)
        self._udp[host] = endpoint

    async def _apply_mode(self, device: SimulatedSmartDevice) -> None:
        server = self._servers.get(id(device))
        if device.mode == "refuse":
            if server is not None:
                del self._servers[id(device)]
                server.close()
                await server.wait_closed()
            return
        if server is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((device.host, self.port))
        except OSError:
            sock.close()
            raise
        connection = _HttpConnection(self, device)
        self._servers[id(device)] = await asyncio.start_server(
            lambda r, w: connection.serve(r, w), sock=sock
        )

    async def _close_all(self) -> None:
        servers = list(self._servers.values())
        self._servers.clear()
        for server in servers:
            server.close()
        for writer in list(self._connections):
            writer.close()
        for server in servers:
            await server.wait_closed()
        for endpoint in self._udp.values():
            if endpoint.transport is not None:
                endpoint.transport.close()
        self._udp.clear()
        current = asyncio.current_task()
        # Connections accepted while closing start tasks of their own: repeat.
        for _round in range(5):
            tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
