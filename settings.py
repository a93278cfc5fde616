"""Load and check the settings: config.py defaults, config_local.py, environment.

Every UPPERCASE name in config.py is a setting. Its default's type is the
setting's type, so a wrong type anywhere (config_local.py or an environment
variable) is caught before any polling, with one line naming the setting.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import runpy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
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


@dataclass(frozen=True)
class Settings:
    """Every setting, typed: one field per UPPERCASE name in config.py, in
    lower case (``tests/test_settings.py`` keeps the two in step). A misspelt
    setting is an AttributeError at once, and an error in mypy."""

    carbon_host: str
    carbon_port: int
    carbon_destinations: list[str]
    carbon_timeout_s: float
    carbon_confirm_delivery: bool
    carbon_resend_window_s: float
    metric_prefix: str
    state_dir: str
    spool_max_lines: int
    plug_interval_s: float
    meter_interval_s: float
    circuit_interval_s: float
    rediscover_interval_s: float
    device_timeout_s: float
    device_names: dict[str, str]
    log_level: str
    kasa_discovery_target: str
    kasa_discovery_enabled: bool
    kasa_discovery_timeout_s: float
    kasa_hosts: list[str]
    kasa_username: str
    kasa_password: str
    tuya_devices_file: str
    tuya_addresses: dict[str, str]
    tuya_versions: dict[str, str]
    tuya_exclude: list[str]
    tuya_scaling: dict[str, Any]
    tuya_ranges: dict[str, Any]
    tuya_timeout_s: float
    tuya_persistent: bool
    tuya_busy_backoff_s: float
    tuya_stale_polls: int
    tuya_announce_bind: str
    tuya_announce_ports: list[int]
    tuya_announce_listen_s: float
    esp32_bind: str
    esp32_port: int
    esp32_token: str
    esp32_device_tokens: dict[str, str]
    esp32_max_body_bytes: int
    esp32_max_clock_skew_s: float
    esp32_max_reading_age_s: float
    esp32_idle_timeout_s: float
    esp32_max_power_watts: float
    esp32_stale_s: float
    esp32_max_devices: int
    mqtt_broker: str
    mqtt_username: str
    mqtt_password: str
    mqtt_tls_ca_file: str
    mqtt_client_id: str
    mqtt_keepalive_s: int
    mqtt_reconnect_min_s: float
    mqtt_reconnect_max_s: float
    mqtt_auth_retry_s: float
    mqtt_glow_prefix: str
    mqtt_gas_prefix: str
    mqtt_presets: list[str]
    mqtt_rules: list[Any]
    mqtt_flush_interval_s: float
    mqtt_flush_lines: int
    mqtt_health_interval_s: float
    mqtt_stale_s: float
    mqtt_once_timeout_s: float
    mqtt_discover_s: float
    circuits: list[Any]
    circuit_modbus_timeout_s: float
    circuit_ranges: dict[str, Any]
    dashboard_house_meter: str
    dashboard_nested_devices: list[str]
    dashboard_unit_rate: float
    dashboard_standing_charge: float
    dashboard_currency_unit: str
    dashboard_datasource_uid: str
    dashboard_alert_high_power_watts: float
    dashboard_alert_high_power_s: float
    dashboard_alert_silent_s: float


def _port(value: int) -> bool:
    return 1 <= value <= 65535


def _prefix(value: str) -> bool:
    from graphite_helper import is_valid_path

    return is_valid_path(value)


def _host_port(default_port: int) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        try:
            return isinstance(value, str) and bool(parse_host_port(value, default_port))
        except ConfigError:
            return False

    return check


def _host_port_list(default_port: int) -> Callable[[list], bool]:
    return lambda value: all(map(_host_port(default_port), value))


def _host(value: str) -> bool:
    return bool(value) and not any(char.isspace() for char in value)


def _strings(value: list) -> bool:
    return all(isinstance(item, str) and item.strip() for item in value)


DAY_S = 86_400.0
# (min, max) of every numeric setting, in its unit. Below the minimum an
# interval makes a busy loop (1e-9 s logged thousands of lines a second);
# above the maximum a timer overflows or a collector never wakes (1e300 s).
RANGES: dict[str, tuple[float, float]] = {
    "CARBON_PORT": (1, 65535),
    "CARBON_TIMEOUT_S": (0.1, 600.0),
    "CARBON_RESEND_WINDOW_S": (1.0, DAY_S),
    "SPOOL_MAX_LINES": (1000, 100_000_000),
    "PLUG_INTERVAL_S": (0.1, DAY_S),
    "METER_INTERVAL_S": (0.1, DAY_S),
    "CIRCUIT_INTERVAL_S": (0.1, DAY_S),
    "REDISCOVER_INTERVAL_S": (1.0, 7 * DAY_S),
    "DEVICE_TIMEOUT_S": (0.1, 600.0),
    "KASA_DISCOVERY_TIMEOUT_S": (0.1, 600.0),
    "TUYA_TIMEOUT_S": (0.1, 600.0),
    "TUYA_BUSY_BACKOFF_S": (1.0, DAY_S),
    "TUYA_STALE_POLLS": (1, 1_000_000),
    "TUYA_ANNOUNCE_LISTEN_S": (0.1, 600.0),
    "ESP32_PORT": (1, 65535),
    "ESP32_MAX_BODY_BYTES": (1024, 64 * 1024 * 1024),
    "ESP32_MAX_CLOCK_SKEW_S": (1.0, DAY_S),
    "ESP32_MAX_READING_AGE_S": (60.0, 366 * DAY_S),
    "ESP32_IDLE_TIMEOUT_S": (1.0, DAY_S),
    "ESP32_MAX_POWER_WATTS": (1.0, 10_000_000.0),
    "ESP32_STALE_S": (1.0, 366 * DAY_S),
    "ESP32_MAX_DEVICES": (1, 100_000),
    # MQTT's keep-alive is a 16-bit number of seconds.
    "MQTT_KEEPALIVE_S": (5, 65535),
    "MQTT_RECONNECT_MIN_S": (0.1, 3600.0),
    "MQTT_RECONNECT_MAX_S": (0.1, DAY_S),
    "MQTT_AUTH_RETRY_S": (1.0, 7 * DAY_S),
    "MQTT_FLUSH_INTERVAL_S": (0.1, 3600.0),
    "MQTT_FLUSH_LINES": (1, 10_000_000),
    "MQTT_HEALTH_INTERVAL_S": (0.1, DAY_S),
    "MQTT_STALE_S": (1.0, 366 * DAY_S),
    "MQTT_ONCE_TIMEOUT_S": (0.1, DAY_S),
    "MQTT_DISCOVER_S": (0.1, DAY_S),
    "CIRCUIT_MODBUS_TIMEOUT_S": (0.01, 600.0),
    "DASHBOARD_UNIT_RATE": (0.0, 1_000_000.0),
    "DASHBOARD_STANDING_CHARGE": (0.0, 1_000_000.0),
    "DASHBOARD_ALERT_HIGH_POWER_WATTS": (1.0, 10_000_000.0),
    "DASHBOARD_ALERT_HIGH_POWER_S": (1.0, 7 * DAY_S),
    "DASHBOARD_ALERT_SILENT_S": (1.0, 7 * DAY_S),
}
# A numeric setting missing above: seconds, or any other count or amount.
FALLBACK_RANGES: dict[str, tuple[float, float]] = {"_S": (0.001, 366 * DAY_S), "": (0, 1e12)}

# Extra checks beyond the type and range, by setting name.
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "CARBON_HOST": (_host, "must be a host name or address"),
    "METRIC_PREFIX": (_prefix, "must be dotted segments of [a-z0-9_]"),
    "MQTT_GAS_PREFIX": (_prefix, "must be dotted segments of [a-z0-9_]"),
    "CARBON_DESTINATIONS": (_host_port_list(2003), "must be a list of 'host:port' strings"),
    "KASA_HOSTS": (_host_port_list(9999), "must be a list of 'host' or 'host:port' strings"),
    "MQTT_BROKER": (_host_port(1883), "must be 'host' or 'host:port'"),
    "TUYA_EXCLUDE": (_strings, "must be a list of device ids or names"),
    "MQTT_PRESETS": (_strings, "must be a list of preset names"),
    "DASHBOARD_NESTED_DEVICES": (_strings, "must be a list of '<source>.<device>' names"),
    "DASHBOARD_HOUSE_METER": (lambda v: v in {"esp32", "glow"}, "must be 'esp32' or 'glow'"),
    "LOG_LEVEL": (
        lambda v: v.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
        "must be DEBUG, INFO, WARNING or ERROR",
    ),
}


def defaults() -> dict[str, Any]:
    """Every setting with its default, from config.py."""
    return {name: value for name, value in vars(config).items() if name.isupper()}


def describe(name: str, value: Any) -> str:
    """A setting's value for messages: secrets are masked, long values cut."""
    if name in SECRET_SETTINGS:
        return "<hidden>" if value else "<empty>"
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line, cut to ``limit`` characters (for a message)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


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
    except (ValueError, RecursionError) as exc:
        shown = "<hidden>" if name in SECRET_SETTINGS else one_line(repr(raw), 80)
        raise ConfigError(
            f"{name}: cannot read {shown} from the environment as "
            f"{type(default).__name__} ({exc.__class__.__name__})"
        ) from None
    return raw


def value_range(name: str) -> tuple[float, float]:
    """The (min, max) a numeric setting must lie in."""
    if name in RANGES:
        return RANGES[name]
    return next(limits for suffix, limits in FALLBACK_RANGES.items() if name.endswith(suffix))


def _check(name: str, value: Any, default: Any, origin: str) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(
            f"{name}: must be {expected.__name__}, got {type(value).__name__} "
            f"{describe(name, value)} (from {origin})"
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = value_range(name)
        if not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(
                f"{name}: must be from {low:g} to {high:g}, got {describe(name, value)}"
                f" (from {origin})"
            )
    # A text setting with a default must have a value ("" would mean the
    # current directory, no host, ...); an empty default means "optional".
    if isinstance(value, str) and default.strip() and not value.strip():
        raise ConfigError(f"{name}: must not be empty (from {origin})")
    if isinstance(value, dict) and not all(isinstance(key, str) for key in value):
        raise ConfigError(f"{name}: keys must be strings (from {origin})")
    check = CHECKS.get(name)
    if check is not None:
        predicate, reason = check
        if not predicate(value):
            raise ConfigError(f"{name}: {reason}, got {describe(name, value)} (from {origin})")
    return value


def usable_name(name: Any) -> str:
    """``name`` as a metric segment (graphite_helper.format_device_name), or
    "" when it is not text or nothing of it is usable (an emoji, a dot)."""
    from graphite_helper import format_device_name

    if not isinstance(name, str):
        return ""
    segment = format_device_name(name, fallback="x")
    return segment if segment == format_device_name(name, fallback="y") else ""


def check_device_names(names: Mapping[str, Any], origin: str = "config.py") -> None:
    """DEVICE_NAMES: every name usable, and no two devices given one series.

    Raises ConfigError naming both ids when two names clean to one segment.
    """
    owners: dict[str, str] = {}
    for device_id, name in names.items():
        segment = usable_name(name)
        if not segment:
            raise ConfigError(
                f"DEVICE_NAMES: {device_id!r} must be named with letters or digits,"
                f" got {describe('DEVICE_NAMES', name)} (from {origin})"
            )
        other = owners.setdefault(segment, device_id)
        if other.lower() != device_id.lower():
            raise ConfigError(
                f"DEVICE_NAMES: {other!r} and {device_id!r} are both named {segment!r};"
                f" their readings would be written into one series (from {origin})"
            )


def _cross_check(values: Mapping[str, Any], origins: Mapping[str, str]) -> None:
    """Checks between settings."""
    check_device_names(values["DEVICE_NAMES"], origins["DEVICE_NAMES"])
    if values["MQTT_RECONNECT_MIN_S"] > values["MQTT_RECONNECT_MAX_S"]:
        raise ConfigError(
            f"MQTT_RECONNECT_MIN_S: must not exceed MQTT_RECONNECT_MAX_S"
            f" ({values['MQTT_RECONNECT_MIN_S']:g} > {values['MQTT_RECONNECT_MAX_S']:g})"
        )


def _run_local_file(path: Path) -> dict[str, Any]:
    """The names config_local.py defines. Anything it raises (a syntax error,
    sys.exit(), a failed import) is a ConfigError, never a traceback."""
    try:
        return runpy.run_path(str(path))
    except BaseException as exc:  # SystemExit too: the file is the user's
        reason = exc.__class__.__name__
        detail = one_line(str(exc)) if not isinstance(exc, SystemExit) else f"code {exc.code!r}"
        raise ConfigError(f"{LOCAL_CONFIG_ENV}: cannot load {path}: {reason}: {detail}") from None


def _closest(name: str, known: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name.upper(), list(known), n=1, cutoff=0.8)
    return matches[0] if matches else None


def _local_settings(path: Path, known: Mapping[str, Any]) -> dict[str, Any]:
    """The settings config_local.py assigns; a name that is not one (a typo,
    lower case) is refused rather than silently ignored."""
    found: dict[str, Any] = {}
    for name, value in _run_local_file(path).items():
        if name.startswith("_") or isinstance(value, (type, ModuleType)) or callable(value):
            continue  # imports, helpers and the module's own dunders
        if name in known:
            found[name] = value
            continue
        guess = _closest(name, known)
        if name.isupper() or guess is not None:
            hint = f"; did you mean {guess}?" if guess else " (see config.py for the names)"
            raise ConfigError(f"{name}: unknown setting in {path}{hint}")
    return found


def load_settings(
    env: Mapping[str, str] | None = None,
    local_path: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
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
        for name, value in _local_settings(local_path, base).items():
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
    _cross_check(values, origins)
    values["STATE_DIR"] = str(Path(values["STATE_DIR"]).expanduser())
    return Settings(**{name.lower(): value for name, value in values.items()})


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
