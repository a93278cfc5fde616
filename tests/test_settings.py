"""Settings: defaults, config_local.py, environment, and errors naming the setting."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import settings as settings_module
from settings import RANGES, ConfigError, defaults, describe, load_settings, parse_host_port
from tests.helpers import ROOT, collector_environment, run_collector


def load(tmp_path, env=None, local=None, **overrides):
    local_path = tmp_path / "config_local.py"
    if local is not None:
        local_path.write_text(local)
    return load_settings(env=env or {}, local_path=local_path, overrides=overrides)


def test_defaults(tmp_path):
    settings = load(tmp_path)
    assert (settings.carbon_host, settings.carbon_port) == ("127.0.0.1", 2003)
    assert settings.metric_prefix == "home.electricity"
    assert settings.plug_interval_s == 30
    assert settings.meter_interval_s == 5
    assert settings.rediscover_interval_s == 600


def test_local_file_then_environment_then_flags(tmp_path):
    local = 'CARBON_HOST = "192.168.86.123"\nCARBON_PORT = 2004\nKASA_HOSTS = ["10.0.0.5"]\n'
    settings = load(tmp_path, local=local)
    assert settings.carbon_host == "192.168.86.123"
    assert settings.kasa_hosts == ["10.0.0.5"]
    env = {"CARBON_PORT": "2005", "KASA_HOSTS": "a, b:9998", "ELECTRICITY_STATE_DIR": "/x"}
    settings = load(tmp_path, env=env, local=local)
    assert settings.carbon_port == 2005
    assert settings.kasa_hosts == ["a", "b:9998"]
    assert settings.state_dir == "/x"
    settings = load(tmp_path, env=env, local=local, CARBON_PORT=2006)
    assert settings.carbon_port == 2006


def test_float_setting_accepts_int(tmp_path):
    assert load(tmp_path, local="DEVICE_TIMEOUT_S = 3\n").device_timeout_s == 3.0


@pytest.mark.parametrize(
    ("local", "env", "named"),
    [
        ('CARBON_PORT = "2003"\n', {}, "CARBON_PORT"),
        ("CARBON_PORT = 70000\n", {}, "CARBON_PORT"),
        ("", {"CARBON_PORT": "abc"}, "CARBON_PORT"),
        ("PLUG_INTERVAL_S = 0\n", {}, "PLUG_INTERVAL_S"),
        ("", {"DEVICE_TIMEOUT_S": "-1"}, "DEVICE_TIMEOUT_S"),
        ('METRIC_PREFIX = "Home Power"\n', {}, "METRIC_PREFIX"),
        ("KASA_DISCOVERY_ENABLED = 1\n", {}, "KASA_DISCOVERY_ENABLED"),
        ("CARBON_HOSTT = 'x'\n", {}, "CARBON_HOSTT"),
        ("CARBON_HOST = (\n", {}, "ELECTRICITY_CONFIG"),
        ('DEVICE_NAMES = ["a"]\n', {}, "DEVICE_NAMES"),
    ],
)
def test_bad_setting_names_itself(tmp_path, local, env, named):
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, env=env, local=local)
    message = str(raised.value)
    assert message.startswith(named + ":")
    assert "\n" not in message


def test_secrets_never_in_messages(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, local="KASA_PASSWORD = 12345678\n")
    assert "12345678" not in str(raised.value)
    assert describe("KASA_PASSWORD", "hunter2") == "<hidden>"


def test_missing_named_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="ELECTRICITY_CONFIG"):
        load_settings(env={"ELECTRICITY_CONFIG": str(tmp_path / "nope.py")})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5", ("10.0.0.5", 9999)),
        ("10.0.0.5:9998", ("10.0.0.5", 9998)),
        ("[::1]:2003", ("::1", 2003)),
        ("plug.lan", ("plug.lan", 9999)),
    ],
)
def test_parse_host_port(text, expected):
    assert parse_host_port(text, 9999) == expected


@pytest.mark.parametrize("text", ["", ":80", "host:0", "host:http", "host:99999"])
def test_parse_host_port_rejects(text):
    with pytest.raises(ConfigError):
        parse_host_port(text, 9999, "KASA_HOSTS")


# --- Every setting checked: type and range -------------------------------------------


def _numeric_settings() -> dict[str, object]:
    return {
        name: value
        for name, value in defaults().items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def test_every_numeric_setting_has_its_own_range():
    assert set(_numeric_settings()) <= set(RANGES)
    for name, default in _numeric_settings().items():
        low, high = RANGES[name]
        assert low <= default <= high, name


def _bad_values() -> list[tuple[str, object]]:
    """(setting, value) pairs that must each stop a collector: every number
    below its minimum, above its maximum and not finite; every text setting
    that needs a value left empty."""
    bad: list[tuple[str, object]] = []
    for name, default in _numeric_settings().items():
        low, high = RANGES[name]
        kind = type(default)
        bad += [
            (name, kind(low) - (1 if kind is int else low / 2 or 1)),
            (name, kind(high) * 2 + 1),
        ]
        if kind is float:
            bad += [(name, math.nan), (name, math.inf), (name, 1e300), (name, -1.0)]
    for name, default in defaults().items():
        if isinstance(default, str) and default:
            bad += [(name, ""), (name, "   ")]
    return bad


@pytest.mark.parametrize(("name", "value"), _bad_values(), ids=repr)
def test_every_bad_value_is_refused_naming_the_setting(tmp_path, name, value):
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, local=f"from math import inf, nan\n{name} = {value!r}\n")
    message = str(raised.value)
    assert message.startswith(f"{name}:")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("local", "named"),
    [
        ("CARBON_TIMEOUT_S = 1e300\n", "CARBON_TIMEOUT_S"),
        ("PLUG_INTERVAL_S = 1e-9\n", "PLUG_INTERVAL_S"),
        ("METER_INTERVAL_S = 1e300\n", "METER_INTERVAL_S"),
        ("ESP32_MAX_POWER_WATTS = float('nan')\n", "ESP32_MAX_POWER_WATTS"),
        ("ESP32_MAX_POWER_WATTS = -1\n", "ESP32_MAX_POWER_WATTS"),
        ("ESP32_MAX_DEVICES = -1\n", "ESP32_MAX_DEVICES"),
        ("ESP32_MAX_BODY_BYTES = 0\n", "ESP32_MAX_BODY_BYTES"),
        ("MQTT_FLUSH_LINES = -5\n", "MQTT_FLUSH_LINES"),
        ("MQTT_KEEPALIVE_S = 10**9\n", "MQTT_KEEPALIVE_S"),
        ('MQTT_BROKER = ""\n', "MQTT_BROKER"),
        ('MQTT_BROKER = "host:port"\n', "MQTT_BROKER"),
        ('CARBON_HOST = ""\n', "CARBON_HOST"),
        ('CARBON_HOST = "my host"\n', "CARBON_HOST"),
        ('STATE_DIR = ""\n', "STATE_DIR"),
        ('CARBON_DESTINATIONS = ["a:b"]\n', "CARBON_DESTINATIONS"),
        ('MQTT_GAS_PREFIX = "Gas Meter"\n', "MQTT_GAS_PREFIX"),
        ('DASHBOARD_HOUSE_METER = "gas"\n', "DASHBOARD_HOUSE_METER"),
        ("TUYA_EXCLUDE = [1]\n", "TUYA_EXCLUDE"),
        ("TUYA_ADDRESSES = {1: 'x'}\n", "TUYA_ADDRESSES"),
        ("MQTT_RECONNECT_MIN_S = 30.0\nMQTT_RECONNECT_MAX_S = 5.0\n", "MQTT_RECONNECT_MIN_S"),
    ],
)
def test_the_values_issue_12_found(tmp_path, local, named):
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, local=local)
    assert str(raised.value).startswith(named + ":")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CARBON_TIMEOUT_S": "1e300"}, "CARBON_TIMEOUT_S"),
        ({"CARBON_TIMEOUT_S": "nan"}, "CARBON_TIMEOUT_S"),
        ({"ELECTRICITY_STATE_DIR": ""}, "STATE_DIR"),
        ({"CARBON_HOST": ""}, "CARBON_HOST"),
        ({"MQTT_KEEPALIVE_S": "1" * 5000}, "MQTT_KEEPALIVE_S"),
    ],
)
def test_bad_environment_values(tmp_path, env, named):
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, env=env)
    assert str(raised.value).startswith(named + ":")
    assert len(str(raised.value)) < 300


def test_command_line_interval_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"^PLUG_INTERVAL_S: .*command line"):
        load(tmp_path, PLUG_INTERVAL_S=1e-9)


# --- config_local.py: names that are not settings, a file that raises -----------------


@pytest.mark.parametrize(
    ("local", "named", "hint"),
    [
        ('carbon_host = "10.0.0.9"\n', "carbon_host", "did you mean CARBON_HOST?"),
        ('Carbon_Host = "10.0.0.9"\n', "Carbon_Host", "did you mean CARBON_HOST?"),
        ('CARBON_HOTS = "10.0.0.9"\n', "CARBON_HOTS", "did you mean CARBON_HOST?"),
        ("plug_intervall_s = 10\n", "plug_intervall_s", "did you mean PLUG_INTERVAL_S?"),
        ("NOT_A_SETTING_AT_ALL = 1\n", "NOT_A_SETTING_AT_ALL", "see config.py"),
    ],
)
def test_misspelt_settings_are_refused_with_a_suggestion(tmp_path, local, named, hint):
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, local=local)
    message = str(raised.value)
    assert message.startswith(named + ": unknown setting")
    assert hint in message


def test_helpers_in_config_local_are_allowed(tmp_path):
    local = (
        "import os\nfrom pathlib import Path\n"
        "home = '192.168.86.123'\n"
        "def port():\n    return 2004\n"
        "CARBON_HOST = home\nCARBON_PORT = port()\n"
    )
    settings = load(tmp_path, local=local)
    assert (settings.carbon_host, settings.carbon_port) == ("192.168.86.123", 2004)


@pytest.mark.parametrize(
    "local",
    [
        "import sys\nsys.exit(0)\n",
        "import sys\nsys.exit('stop')\n",
        "raise RuntimeError('line one\\nline two')\n",
        "raise KeyboardInterrupt\n",
        "import no_such_module_here\n",
        "CARBON_HOST = undefined_name\n",
    ],
)
def test_config_local_that_raises_or_exits_is_one_line(tmp_path, local):
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, local=local)
    message = str(raised.value)
    assert message.startswith("ELECTRICITY_CONFIG: cannot load")
    assert "\n" not in message


def test_secret_never_shown_when_out_of_range_or_wrong(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, env={"MQTT_PASSWORD": "x"}, local="ESP32_DEVICE_TOKENS = ['tok-secret']\n")
    assert "tok-secret" not in str(raised.value)


# --- DEVICE_NAMES: one name, one device ------------------------------------------------


def test_two_devices_given_one_name_are_refused(tmp_path):
    local = "DEVICE_NAMES = {'50:C7:BF:00:00:01': 'kitchen', '50:C7:BF:00:00:02': 'Kitchen'}\n"
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, local=local)
    message = str(raised.value)
    assert message.startswith("DEVICE_NAMES:")
    assert "50:C7:BF:00:00:01" in message
    assert "50:C7:BF:00:00:02" in message


@pytest.mark.parametrize("names", ["{'a': 5}", "{'a': '💡'}", "{'a': ''}"])
def test_device_names_must_be_names(tmp_path, names):
    with pytest.raises(ConfigError, match=r"^DEVICE_NAMES: 'a'"):
        load(tmp_path, local=f"DEVICE_NAMES = {names}\n")


# --- Through a real collector process: exit 2, one line, no traceback ------------------

COLLECTORS = {
    "kasa": "kasa_to_graphite.py",
    "tuya": "tuya_to_graphite.py",
    "circuit": "circuit_to_graphite.py",
    "esp32": "esp32_receiver.py",
    "mqtt": "mqtt_to_graphite.py",
}


def assert_config_exit(result, source: str, named: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{source}: {named}"), lines[0]
    assert "Traceback" not in result.stderr
    assert not result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "config", "extra", "named"),
    [
        ("kasa", "", {"CARBON_TIMEOUT_S": "1e300"}, "CARBON_TIMEOUT_S"),
        ("kasa", 'carbon_host = "10.0.0.9"\n', {}, "carbon_host"),
        ("kasa", "import sys\nsys.exit(0)\n", {}, "ELECTRICITY_CONFIG"),
        (
            "kasa",
            "DEVICE_NAMES = {'50:c7:bf:00:00:01': 'kitchen', '50:c7:bf:00:00:02': 'kitchen'}\n",
            {},
            "DEVICE_NAMES",
        ),
        ("tuya", "", {"PLUG_INTERVAL_S": "1e-9"}, "PLUG_INTERVAL_S"),
        ("tuya", "", {"CARBON_HOST": ""}, "CARBON_HOST"),
        ("circuit", "", {"ELECTRICITY_STATE_DIR": ""}, "STATE_DIR"),
        ("circuit", "CIRCUIT_INTERVAL_S = 1e300\n", {}, "CIRCUIT_INTERVAL_S"),
        ("esp32", "", {"ESP32_MAX_POWER_WATTS": "nan"}, "ESP32_MAX_POWER_WATTS"),
        ("esp32", "ESP32_MAX_DEVICES = -1\n", {}, "ESP32_MAX_DEVICES"),
        ("esp32", "ESP32_MAX_BODY_BYTES = 0\n", {}, "ESP32_MAX_BODY_BYTES"),
        ("mqtt", "MQTT_KEEPALIVE_S = 10**9\n", {}, "MQTT_KEEPALIVE_S"),
        ("mqtt", "", {"MQTT_FLUSH_LINES": "-5"}, "MQTT_FLUSH_LINES"),
        ("mqtt", "", {"MQTT_BROKER": ""}, "MQTT_BROKER"),
        ("mqtt", "raise ValueError('oops')\n", {}, "ELECTRICITY_CONFIG"),
    ],
)
def test_bad_settings_stop_a_collector_with_one_line(tmp_path, source, config, extra, named):
    env = collector_environment(tmp_path, config, **extra)
    result = run_collector(COLLECTORS[source], ["--once"], env)
    assert_config_exit(result, source, named)
    assert not (tmp_path / "state").exists()  # stopped before writing anything


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "named"), [("--state-dir", "STATE_DIR"), ("--carbon", "CARBON_DESTINATIONS")]
)
def test_empty_flag_is_refused_not_ignored(tmp_path, flag, named):
    result = run_collector(
        "kasa_to_graphite.py", ["--once", flag, ""], collector_environment(tmp_path)
    )
    assert_config_exit(result, "kasa", named)


def _read_only(directory: Path, command: list[str]) -> list[str]:
    """``command`` seeing ``directory`` read-only: a read-only bind mount in a
    private mount namespace when we are root (root writes through chmod),
    else chmod."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return command
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: cannot make a read-only directory")
    mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", mount, str(directory), *command]


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(COLLECTORS))
@pytest.mark.parametrize("problem", ["a file", "read-only"])
def test_unusable_state_dir_is_exit_2(tmp_path, source, problem):
    state = tmp_path / "state"
    command = [sys.executable, COLLECTORS[source], "--once", "--state-dir", str(state)]
    if problem == "a file":
        state.write_text("not a directory")
    else:
        state.mkdir()
        command = _read_only(state, command)
    env = collector_environment(tmp_path)
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        state.chmod(0o755)
    assert_config_exit(result, source, "STATE_DIR: cannot write in")
    assert str(state) in result.stderr


def test_every_setting_is_a_typed_field_and_every_field_a_setting() -> None:
    """settings.Settings declares what config.py defines: same names, and each
    default of its field's type (so mypy sees what the loader checks)."""
    declared = {field.name: field.type for field in dataclasses.fields(settings_module.Settings)}
    defaults = settings_module.defaults()
    assert sorted(declared) == sorted(name.lower() for name in defaults)
    hints = typing.get_type_hints(settings_module.Settings)
    for name, default in defaults.items():
        expected = typing.get_origin(hints[name.lower()]) or hints[name.lower()]
        assert type(default) is expected, f"{name}: {declared[name.lower()]} vs {default!r}"


def test_a_misspelt_setting_is_an_error_at_once() -> None:
    loaded = load_settings(env={}, local_path=os.devnull)
    with pytest.raises(AttributeError, match="carbon_hots"):
        loaded.carbon_hots  # noqa: B018
    with pytest.raises(dataclasses.FrozenInstanceError, match="carbon_host"):
        loaded.carbon_host = "elsewhere"  # type: ignore[misc]
