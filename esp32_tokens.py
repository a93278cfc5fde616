"""Who may post to the ESP32 receiver: bearer tokens, compared in constant time.

ESP32_TOKEN for every device and/or ESP32_DEVICE_TOKENS per device (which
binds that device to its own token). Without any token the receiver only
listens on loopback (``is_loopback``). A token is never logged: a bad one is
refused naming the setting only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Any

from settings import ConfigError

MIN_TOKEN_CHARS = 16


def _digest(token: str) -> bytes:
    # Equal-length digests: the comparison time says nothing about the token.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenCheck:
    """Bearer tokens: one for every device (ESP32_TOKEN) and/or per device
    (ESP32_DEVICE_TOKENS, which then bind that device to its own token).
    Compared in constant time; never logged."""

    def __init__(self, token: str = "", device_tokens: dict[str, str] | None = None) -> None:
        self._token = _digest(token) if token else None
        self._device_tokens = {
            device_id: _digest(device_token)
            for device_id, device_token in (device_tokens or {}).items()
        }

    @property
    def enabled(self) -> bool:
        return self._token is not None or bool(self._device_tokens)

    def allowed(self, authorization: str | None) -> Allowed | None:
        """Which devices this Authorization header may post for; None: nobody."""
        if not self.enabled:
            return Allowed(everyone=True)
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        digest = _digest(given.strip())
        # Every comparison is made, so the time taken does not say which matched.
        devices = {
            device_id
            for device_id, expected in self._device_tokens.items()
            if hmac.compare_digest(digest, expected)
        }
        shared = self._token is not None and hmac.compare_digest(digest, self._token)
        if not devices and not shared:
            return None
        return Allowed(
            devices=frozenset(devices), shared=shared, own=frozenset(self._device_tokens)
        )


@dataclass(frozen=True)
class Allowed:
    """The devices one Authorization header may post for."""

    everyone: bool = False  # no token configured (loopback only)
    devices: frozenset[str] = frozenset()  # whose own token it is
    shared: bool = False  # it is ESP32_TOKEN
    own: frozenset[str] = frozenset()  # devices that have a token of their own

    def may_post(self, device_id: str) -> bool:
        if self.everyone:
            return True
        if device_id in self.own:
            return device_id in self.devices
        return self.shared


def check_tokens(settings: Any) -> TokenCheck:
    """The configured tokens; raises ConfigError (naming the setting, never the token)."""
    token = settings.esp32_token
    device_tokens = settings.esp32_device_tokens
    for name, value in [("ESP32_TOKEN", token)] + [
        (f"ESP32_DEVICE_TOKENS[{device_id!r}]", value) for device_id, value in device_tokens.items()
    ]:
        if name != "ESP32_TOKEN" and not isinstance(value, str):
            raise ConfigError(f"{name}: must be a string")
        if value and (
            len(value) < MIN_TOKEN_CHARS
            or not (value.isascii() and value.isprintable())
            or " " in value
        ):
            raise ConfigError(
                f"{name}: a token must be at least {MIN_TOKEN_CHARS} printable ASCII characters"
                " without spaces (python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )
    return TokenCheck(token, device_tokens)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
