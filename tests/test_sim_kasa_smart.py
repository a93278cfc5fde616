"""The smart-device simulator on the wire, checked by a client written here from
the protocol (python-kasa itself talks to it in test_kasa_smart.py)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import secrets
import socket
import struct

import pytest

from simulators.kasa_smart import (
    DISCOVERY_PORT,
    SMART_FIXTURES,
    KlapSession,
    SimulatedSmartDevice,
    SmartKasaSimulator,
    auth_hash,
)

USERNAME, PASSWORD = "owner@example.com", "pa55"


@pytest.fixture
def subnet(hosts):
    return next(hosts).rsplit(".", 1)[0]


def post(connection: http.client.HTTPConnection, path: str, body: bytes, cookie: str = ""):
    headers = {"Cookie": cookie} if cookie else {}
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read(), response.getheader("Set-Cookie") or ""


def handshake(connection, owner_hash: bytes) -> tuple[KlapSession, str]:
    local_seed = secrets.token_bytes(16)
    status, body, cookie = post(connection, "/app/handshake1", local_seed)
    assert status == 200
    assert len(body) == 48
    remote_seed, proof = body[:16], body[16:]
    assert proof == hashlib.sha256(local_seed + remote_seed + owner_hash).digest()
    session_cookie = cookie.split(";")[0]
    assert session_cookie.startswith("TP_SESSIONID=")
    assert "TIMEOUT=86400" in cookie
    answer = hashlib.sha256(remote_seed + local_seed + owner_hash).digest()
    status, _, _ = post(connection, "/app/handshake2", answer, session_cookie)
    assert status == 200
    return KlapSession(local_seed, remote_seed, owner_hash), session_cookie


def call(connection, session: KlapSession, cookie: str, seq: int, request: dict) -> dict:
    body = session.encrypt(json.dumps(request).encode(), seq)
    status, answer, _ = post(connection, f"/app/request?seq={seq}", body, cookie)
    assert status == 200
    # The answer is signed and encrypted with the request's sequence number.
    plain = session.decrypt(answer, seq)
    assert plain is not None
    return json.loads(plain)


@pytest.mark.slow
def test_klap_v2_session_and_smart_methods(subnet):
    plug = SimulatedSmartDevice(
        SMART_FIXTURES[1], host=f"{subnet}.2", username=USERNAME, password=PASSWORD
    )
    with SmartKasaSimulator([plug], discovery_host=f"{subnet}.1") as sim:
        connection = http.client.HTTPConnection(plug.host, sim.port, timeout=5)
        try:
            session, cookie = handshake(connection, auth_hash(USERNAME, PASSWORD))
            info = call(connection, session, cookie, 7, {"method": "get_device_info"})
            assert info["error_code"] == 0
            assert info["result"]["model"] == "P115"
            batch = call(
                connection,
                session,
                cookie,
                8,
                {
                    "method": "multipleRequest",
                    "params": {
                        "requests": [{"method": "get_energy_usage"}, {"method": "get_nothing"}]
                    },
                },
            )
            energy, unknown = batch["result"]["responses"]
            assert energy["result"]["current_power"] == 8962  # mW, as in the dump
            assert unknown == {"method": "get_nothing", "error_code": -1002}
            # A request signed with another key, or without a session: 403.
            forged = b"\0" * 32 + session.encrypt(b"{}", 9)[32:]
            assert post(connection, "/app/request?seq=9", forged, cookie)[0] == 403
            assert post(connection, "/app/request?seq=9", session.encrypt(b"{}", 9))[0] == 403
        finally:
            connection.close()
    assert plug.handshake_count == 1
    assert plug.request_count == 2


@pytest.mark.slow
def test_wrong_credentials_cannot_finish_a_handshake(subnet):
    plug = SimulatedSmartDevice(
        SMART_FIXTURES[0], host=f"{subnet}.2", username=USERNAME, password=PASSWORD
    )
    with SmartKasaSimulator([plug], discovery_host=f"{subnet}.1") as sim:
        connection = http.client.HTTPConnection(plug.host, sim.port, timeout=5)
        try:
            wrong = auth_hash(USERNAME, "guess")
            local_seed = secrets.token_bytes(16)
            _, body, cookie = post(connection, "/app/handshake1", local_seed)
            # The device's proof does not match the client's hash...
            assert body[16:] != hashlib.sha256(local_seed + body[:16] + wrong).digest()
            # ...and the device refuses the client's answer.
            answer = hashlib.sha256(body[:16] + local_seed + wrong).digest()
            assert post(connection, "/app/handshake2", answer, cookie.split(";")[0])[0] == 403
        finally:
            connection.close()
    assert plug.handshake_count == 0


def probe() -> bytes:
    payload = json.dumps({"params": {"rsa_key": "-----BEGIN PUBLIC KEY-----"}}).encode()
    header = bytearray(struct.pack(">BBHHBBII", 2, 0, 1, len(payload), 17, 0, 1234, 0x5A6B7C8D))
    query = header + payload
    query[12:16] = binascii.crc32(query).to_bytes(4, "big")
    return bytes(query)


@pytest.mark.slow
def test_discovery_answers_from_port_20002_of_each_device(subnet):
    devices = [
        SimulatedSmartDevice(SMART_FIXTURES[i % 2], host=f"{subnet}.{i + 2}") for i in range(3)
    ]
    simulator = SmartKasaSimulator(devices, discovery_host=f"{subnet}.1")
    with simulator as sim, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(probe(), (f"{subnet}.1", DISCOVERY_PORT))
        answers = {}
        while len(answers) < 3:
            data, (host, port) = sock.recvfrom(4096)
            assert port == DISCOVERY_PORT
            answers[host] = data
        sock.sendto(b"not a probe", (f"{subnet}.1", DISCOVERY_PORT))
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            sock.recvfrom(4096)
    for device in devices:
        data = answers[device.host]
        checked = bytearray(data)
        crc = bytes(checked[12:16])
        checked[12:16] = (0x5A6B7C8D).to_bytes(4, "big")
        assert binascii.crc32(checked).to_bytes(4, "big") == crc
        assert struct.unpack(">H", data[4:6])[0] == len(data) - 16
        result = json.loads(data[16:])["result"]
        assert result["ip"] == device.host
        assert result["mac"] == device.mac
        assert result["device_type"] == "SMART.TAPOPLUG"
        assert result["mgt_encrypt_schm"] == {
            "encrypt_type": "KLAP",
            "http_port": sim.port,
            "is_support_https": False,
            "lv": 2,
        }


def test_strip_children_listed_by_pages_and_reached_by_control_child():
    strip = SimulatedSmartDevice(SMART_FIXTURES[0], host="127.0.2.9", strip=True)
    listed = strip.handle({"method": "get_child_device_list", "params": {"start_index": 2}})
    result = listed["result"]
    assert result["sum"] == 4
    assert result["start_index"] == 2
    assert [c["device_id"] for c in result["child_device_list"]] == strip.child_ids[2:]
    answer = strip.handle(
        {
            "method": "control_child",
            "params": {
                "device_id": strip.child_ids[1],
                "requestData": {"method": "set_device_info", "params": {"device_on": True}},
            },
        }
    )
    assert answer == {"error_code": 0, "result": {"responseData": {"error_code": 0}}}
    assert strip.is_on(1)
    # The strip has no relay or meter of its own.
    assert strip.handle({"method": "get_energy_usage"})["error_code"] == -1002
    assert "device_on" not in strip.handle({"method": "get_device_info"})["result"]


def test_loopback_only():
    with pytest.raises(ValueError, match="is not a loopback address"):
        SimulatedSmartDevice(SMART_FIXTURES[0], host="192.168.1.20")


def test_encrypt_info_sealed_with_the_probes_rsa_key(subnet):
    """Newer firmware's encrypt_info: readable with the prober's private key only."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    payload = json.dumps({"params": {"rsa_key": pem.decode()}}).encode()
    header = struct.pack(">BBHHBBII", 2, 0, 1, len(payload), 17, 0, 1, 0x5A6B7C8D)
    plug = SimulatedSmartDevice(
        SMART_FIXTURES[0], host=f"{subnet}.2", username=USERNAME, encrypt_info=True
    )
    answer = plug.discovery_answer(header + payload, 80)
    info = json.loads(answer[16:])["result"]["encrypt_info"]
    assert info["sym_schm"] == "AES"
    oaep = asymmetric_padding.OAEP(
        mgf=asymmetric_padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None
    )
    key_and_iv = private_key.decrypt(base64.b64decode(info["key"]), oaep)
    cipher = Cipher(algorithms.AES(key_and_iv[:16]), modes.CBC(key_and_iv[16:]))
    decryptor = cipher.decryptor()
    padded = decryptor.update(base64.b64decode(info["data"])) + decryptor.finalize()
    data = json.loads(padded[: -padded[-1]])
    assert data["owner"] == plug.owner
    assert data["connect_type"] == "wireless"
    # A probe without a key gets no encrypt_info (as python-kasa's older probe).
    bare = plug.discovery_answer(struct.pack(">BBHHBBII", 2, 0, 1, 0, 17, 0, 1, 0), 80)
    assert "encrypt_info" not in json.loads(bare[16:])["result"]
