"""Settings: defaults, config_local.py, environment, and errors naming the setting."""

from __future__ import annotations

import pytest

from settings import ConfigError, describe, load_settings, parse_host_port


def load(tmp_path, env=None, local=None, **overrides):
    local_path = tmp_path / "config_local.py"
    if local is not None:
        local_path.write_text(local)
    return load_settings(env=env or {}, local_path=local_path, overrides=overrides)


def test_defaults(tmp_path):
    settings = load(tmp_path)
    assert (settings.carbon_host, settings.carbon_port) == ("127.0.0.1", 2003)
    assert settings.metric_prefix == "home.electricity"
    assert settings.plug_interval_s == 30 and settings.meter_interval_s == 5
    assert settings.rediscover_interval_s == 600


def test_local_file_then_environment_then_flags(tmp_path):
    local = 'CARBON_HOST = "192.168.86.123"\nCARBON_PORT = 2004\nKASA_HOSTS = ["10.0.0.5"]\n'
    settings = load(tmp_path, local=local)
    assert settings.carbon_host == "192.168.86.123" and settings.kasa_hosts == ["10.0.0.5"]
    env = {"CARBON_PORT": "2005", "KASA_HOSTS": "a, b:9998", "ELECTRICITY_STATE_DIR": "/x"}
    settings = load(tmp_path, env=env, local=local)
    assert settings.carbon_port == 2005 and settings.kasa_hosts == ["a", "b:9998"]
    assert settings.state_dir == "/x"
    settings = load(tmp_path, env=env, local=local, CARBON_PORT=2006)
    assert settings.carbon_port == 2006


def test_float_setting_accepts_int(tmp_path):
    assert load(tmp_path, local="DEVICE_TIMEOUT_S = 3\n").device_timeout_s == 3.0


@pytest.mark.parametrize(
    "local, env, named",
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
    "text, expected",
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
