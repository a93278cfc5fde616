"""Load and check the settings: config.py defaults, config_local.py, environment.

Every UPPERCASE name in config.py is a setting. Its default's type is the
setting's type, so a wrong type anywhere (config_local.py or an environment
variable) is caught before any polling, with one line naming the setting.
"""

from __future__ import annotations

import json
import math
import os
import runpy
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import config

# Settings whose values never appear in logs or error messages.
SECRET_SETTINGS = frozenset(
    {"KASA_PASSWORD", "ESP32_TOKEN", "ESP32_DEVICE_TOKENS", "MQTT_PASSWORD"}
)
# Environment variable names that differ from the setting's name.
ENV_ALIASES = {"STATE_DIR": "ELECTRICITY_STATE_DIR"}
LOCAL_CONFIG_ENV = "ELECTRICITY_CONFIG"
LOCAL_CONFIG_DEFAULT = Path(__file__).resolve().parent / "config_local.py"


class ConfigError(ValueError):
    """A setting is wrong; the message names it and says why."""


def _positive(value: float) -> bool:
    return value > 0 and math.isfinite(value)


def _port(value: int) -> bool:
    return 1 <= value <= 65535


def _prefix(value: str) -> bool:
    from graphite_helper import is_valid_path

    return is_valid_path(value)


def _host_port_list(value: list) -> bool:
    return all(isinstance(item, str) and item.strip() for item in value)


# Extra checks beyond the type, by setting name (suffixes catch families).
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "CARBON_PORT": (_port, "must be a TCP port, 1 to 65535"),
    "ESP32_PORT": (_port, "must be a TCP port, 1 to 65535"),
    "METRIC_PREFIX": (_prefix, "must be dotted segments of [a-z0-9_]"),
    "SPOOL_MAX_LINES": (lambda v: v >= 1000, "must be at least 1000"),
    "CARBON_DESTINATIONS": (_host_port_list, "must be a list of 'host:port' strings"),
    "KASA_HOSTS": (_host_port_list, "must be a list of 'host' or 'host:port' strings"),
    "LOG_LEVEL": (
        lambda v: v.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
        "must be DEBUG, INFO, WARNING or ERROR",
    ),
}
SUFFIX_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "_S": (_positive, "must be a positive number of seconds"),
}


def defaults() -> dict[str, Any]:
    """Every setting with its default, from config.py."""
    return {name: value for name, value in vars(config).items() if name.isupper()}


def describe(name: str, value: Any) -> str:
    """A setting's value for messages: secrets are masked."""
    if name in SECRET_SETTINGS:
        return "<hidden>" if value else "<empty>"
    return repr(value)


def _from_env(name: str, raw: str, default: Any) -> Any:
    """Convert an environment string to the default's type."""
    try:
        if isinstance(default, bool):
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError("not a boolean")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, list):
            stripped = raw.strip()
            if stripped.startswith("["):
                return json.loads(stripped)
            return [item.strip() for item in stripped.split(",") if item.strip()]
        if isinstance(default, dict):
            return json.loads(raw)
    except ValueError as exc:
        shown = "<hidden>" if name in SECRET_SETTINGS else repr(raw)
        raise ConfigError(
            f"{name}: cannot read {shown} from the environment as "
            f"{type(default).__name__} ({exc.__class__.__name__})"
        ) from None
    return raw


def _check(name: str, value: Any, default: Any, origin: str) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(
            f"{name}: must be {expected.__name__}, got {type(value).__name__} "
            f"{describe(name, value)} (from {origin})"
        )
    check = CHECKS.get(name)
    if check is None:
        check = next(
            (c for suffix, c in SUFFIX_CHECKS.items() if name.endswith(suffix)),
            None,
        )
    if check is not None and isinstance(value, (int, float, str, list)):
        predicate, reason = check
        if not predicate(value):
            raise ConfigError(f"{name}: {reason}, got {describe(name, value)} (from {origin})")
    return value


def load_settings(
    env: Mapping[str, str] | None = None,
    local_path: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SimpleNamespace:
    """All settings, lowercase attributes: defaults < config_local.py < env < overrides.

    ``overrides`` are command-line flags, already typed. Raises ConfigError.
    """
    env = os.environ if env is None else env
    base = defaults()
    values: dict[str, Any] = dict(base)
    origins = dict.fromkeys(base, "config.py")

    if local_path is None:
        local_path = env.get(LOCAL_CONFIG_ENV) or LOCAL_CONFIG_DEFAULT
    local_path = Path(local_path).expanduser()
    if local_path.exists():
        try:
            local = runpy.run_path(str(local_path))
        except Exception as exc:  # a syntax error in the user's file, say
            raise ConfigError(
                f"{LOCAL_CONFIG_ENV}: cannot load {local_path}: {exc.__class__.__name__}: {exc}"
            ) from None
        for name, value in local.items():
            if name.isupper():
                if name not in base:
                    raise ConfigError(
                        f"{name}: unknown setting in {local_path} (see config.py for the names)"
                    )
                values[name], origins[name] = value, str(local_path)
    elif env.get(LOCAL_CONFIG_ENV):
        raise ConfigError(f"{LOCAL_CONFIG_ENV}: {local_path} does not exist")

    for name, default in base.items():
        env_name = ENV_ALIASES.get(name, name)
        if env_name in env:
            values[name] = _from_env(name, env[env_name], default)
            origins[name] = f"environment {env_name}"

    for name, value in (overrides or {}).items():
        if value is not None:
            values[name], origins[name] = value, "command line"

    for name, default in base.items():
        values[name] = _check(name, values[name], default, origins[name])
    values["STATE_DIR"] = str(Path(values["STATE_DIR"]).expanduser())
    return SimpleNamespace(**{name.lower(): value for name, value in values.items()})


def parse_host_port(text: str, default_port: int, setting: str = "address") -> tuple[str, int]:
    """'host', 'host:port' or '[v6]:port' -> (host, port). Raises ConfigError."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ConfigError(f"{setting}: no host in {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not _port(int(port_text)):
        raise ConfigError(f"{setting}: bad port in {text!r}")
    return host, int(port_text)
