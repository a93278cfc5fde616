"""mqtt_to_graphite.py end to end: a real Mosquitto, a real carbon-cache, the script
run as users run it (a process with flags and environment), simulated publishers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

import settings
from harness.carbon import CarbonServer, free_port
from harness.mosquitto import MosquittoBroker
from simulators.glow import Message, Publisher, SimulatedGlow, load_session, preset_samples, retime

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "mqtt_to_graphite.py"
GLOW = "home.electricity.glow.1a2b3c4d5e6f."
GAS = "home.gas.glow.1a2b3c4d5e6f."
HEALTH = "home.electricity.health.mqtt."

pytestmark = pytest.mark.slow

# Short everything, so a test takes seconds.
FAST = {
    "MQTT_RECONNECT_MIN_S": "0.1",
    "MQTT_RECONNECT_MAX_S": "0.5",
    "MQTT_FLUSH_INTERVAL_S": "0.2",
    "MQTT_HEALTH_INTERVAL_S": "0.5",
    "MQTT_ONCE_TIMEOUT_S": "5",
    "MQTT_DISCOVER_S": "1",
    "CARBON_TIMEOUT_S": "2",
}


class Collector:
    """mqtt_to_graphite.py in its own process; stderr kept in a file to read while it runs."""

    def __init__(self, tmp_path: Path, broker_port: int, *args: str, **env: str) -> None:
        self.stderr_path = tmp_path / f"collector-{time.monotonic_ns()}.log"
        self.state_dir = tmp_path / "state"
        local_config = tmp_path / "config_local.py"
        local_config.touch()  # never a developer's own config_local.py
        environment = {
            name: value
            for name, value in os.environ.items()
            if name not in settings.defaults() and not name.startswith("ELECTRICITY_")
        }
        environment.update(FAST, ELECTRICITY_CONFIG=str(local_config), **env)
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(SCRIPT),
                    "--broker",
                    f"127.0.0.1:{broker_port}",
                    "--state-dir",
                    str(self.state_dir),
                    *args,
                ],
                cwd=ROOT,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout_s: float = 10.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        while self.log.count(text) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"collector exited ({self.process.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout_s} s:\n{self.log}")
            time.sleep(0.05)

    def finish(self, timeout_s: float = 20.0) -> tuple[int, str]:
        """Wait for it to exit by itself: (status, stdout)."""
        try:
            stdout, _ = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            raise AssertionError(
                f"collector still running after {timeout_s} s:\n{self.log}"
            ) from None
        return self.process.returncode, stdout.decode()

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.finish()[0]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture
def run_collector(tmp_path: Path):
    """Start collectors; any still running when the test ends is killed."""
    started: list[Collector] = []

    def start(broker_port: int, *args: str, **env: str) -> Collector:
        started.append(Collector(tmp_path, broker_port, *args, **env))
        return started[-1]

    yield start
    for collector in started:
        collector.kill()


def carbon_flag(carbon: CarbonServer) -> str:
    return f"--carbon=127.0.0.1:{carbon.port}"


def wait_for_value(carbon: CarbonServer, path: str, value: float, timeout_s: float = 10.0) -> None:
    """Until the newest point of ``path`` is ``value`` (health figures keep changing)."""

    def newest_is_value() -> bool:
        points = carbon.fetch(path)
        return bool(points) and points[-1][1] == value

    carbon.wait_for(newest_is_value, timeout_s, f"{path} == {value}")


def publish_until(
    carbon: CarbonServer, publish: Callable[[], int], path: str, timeout_s: float = 15.0
):
    """Publish (returns the sample time) until that sample is in Carbon: the broker
    may see our message before the collector's new subscription."""
    deadline = time.monotonic() + timeout_s
    while True:
        stamp = publish()
        try:
            return carbon.wait_for(
                lambda stamp=stamp: [p for p in carbon.fetch(path) if p[0] == stamp],
                0.5,
                f"{path} at {stamp}",
            )
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


# --- The recorded Glow session -------------------------------------------------------


def test_recorded_glow_session_lands_in_carbon_with_quirks_dropped(
    carbon_server: CarbonServer,
    mosquitto_broker: MosquittoBroker,
    fixtures_dir: Path,
    run_collector,
) -> None:
    collector = run_collector(mosquitto_broker.port, carbon_flag(carbon_server))
    collector.wait_log("subscribed to")
    # Replayed at today's date (a test Carbon keeps an hour), values untouched.
    end = int(time.time()) - 60
    session = retime(load_session(fixtures_dir / "glow" / "glow_session.jsonl"), end=end)
    with Publisher(*mosquitto_broker.address) as publisher:
        publisher.publish_all(session)

    def t(seconds_before_end: int) -> int:  # the recording ends at 18:00:50
        return end - seconds_before_end

    expected = {
        GLOW + "power_watts": [(t(44), 951), (t(34), 2314), (t(14), 2298), (t(4), -412)],
        GLOW + "power_kw": [(t(44), 0.951), (t(34), 2.314), (t(14), 2.298), (t(4), -0.412)],
        GLOW + "energy_import_kwh": [
            (t(44), 6613.405),
            (t(34), 6613.411),
            (t(24), 6613.418),
            (t(4), 6613.425),
        ],
        GLOW + "energy_today_kwh": [(t(44), 7.211), (t(34), 7.217), (t(24), 7.224), (t(4), 7.231)],
        GLOW + "energy_export_kwh": [(t(4), 12.004)],
        GAS + "energy_kwh": [(t(0), 10234.112)],
        GAS + "energy_today_kwh": [(t(0), 9.1)],
        GAS + "volume_m3": [(t(0), 912.431)],
        HEALTH + "glow.1a2b3c4d5e6f.han_rssi_dbm": [(t(48), -74)],
        HEALTH + "glow.1a2b3c4d5e6f.han_lqi": [(t(48), 160)],
        HEALTH + "glow.1a2b3c4d5e6f.han_joined": [(t(48), 1)],
    }
    for path, points in expected.items():
        assert carbon_server.wait_for_points(path, len(points)) == points, path
    wait_for_value(carbon_server, HEALTH + "messages_invalid", 1)  # the line that is not JSON
    wait_for_value(carbon_server, HEALTH + "glow_power_invalid", 1)
    wait_for_value(carbon_server, HEALTH + "glow_register_glitches", 1)
    wait_for_value(carbon_server, HEALTH + "messages_ok", 7)
    wait_for_value(carbon_server, HEALTH + "connected", 1)
    assert collector.terminate() == 0
    data = [p for p in carbon_server.metric_paths() if not p.startswith(HEALTH)]
    assert sorted(data) == sorted(p for p in expected if not p.startswith(HEALTH))


# --- A flaky broker -----------------------------------------------------------------------


def test_broker_late_then_restarted_mid_stream(
    carbon_server: CarbonServer, start_server, tmp_path: Path, run_collector
) -> None:
    broker = MosquittoBroker(tmp_path / "mosquitto")  # not started yet
    collector = run_collector(broker.port, carbon_flag(carbon_server))
    collector.wait_log("cannot reach broker")
    start_server(broker)
    collector.wait_log("connected to broker")

    glow = SimulatedGlow(start=int(time.time()) - 600)
    glow.power_kw = 1.5

    def publish_glow(publisher: Publisher) -> Callable[[], int]:
        def publish() -> int:
            publisher.publish_all(glow.step(10))
            return glow.clock

        return publish

    with Publisher(*broker.address) as publisher:
        publish_until(carbon_server, publish_glow(publisher), GLOW + "power_watts")
    before_restart = glow.clock

    broker.restart()
    collector.wait_log("lost broker")
    collector.wait_log("reconnected to broker")
    with Publisher(*broker.address) as publisher:
        glow.power_kw = 2.5
        publish_until(carbon_server, publish_glow(publisher), GLOW + "power_watts")
    points = dict(carbon_server.fetch(GLOW + "power_watts"))
    assert points[before_restart] == 1500
    assert points[glow.clock] == 2500
    assert collector.log.count("cannot reach broker") == 1  # said once, not per attempt
    assert collector.terminate() == 0


# --- Logins -------------------------------------------------------------------------------

USER, PASSWORD = "meter", "correct horse battery"


@pytest.fixture
def broker_with_users(start_server, tmp_path: Path) -> MosquittoBroker:
    return start_server(MosquittoBroker(tmp_path / "mosquitto", users={USER: PASSWORD}))


def retained_glow_reading() -> list[Message]:
    """A Glow STATE and one electricity reading, both retained: --once gets them at once."""
    glow = SimulatedGlow(start=int(time.time()) - 60, gas=False)
    glow.power_kw = 1.25
    electricity, state = glow.step(10)
    return [state, electricity._replace(retain=True)]


def test_good_login(broker_with_users: MosquittoBroker, run_collector) -> None:
    with Publisher(*broker_with_users.address, username=USER, password=PASSWORD) as publisher:
        publisher.publish_all(retained_glow_reading())
    collector = run_collector(
        broker_with_users.port, "--once", "--dry-run", MQTT_USERNAME=USER, MQTT_PASSWORD=PASSWORD
    )
    status, stdout = collector.finish()
    assert status == 0, collector.log
    assert GLOW + "power_watts 1250 " in stdout
    assert HEALTH + "glow.1a2b3c4d5e6f.han_rssi_dbm -74 " in stdout


def test_bad_login_with_once_is_a_config_error(
    broker_with_users: MosquittoBroker, run_collector
) -> None:
    collector = run_collector(
        broker_with_users.port,
        "--once",
        "--dry-run",
        MQTT_USERNAME=USER,
        MQTT_PASSWORD="wrong secret",
    )
    status, _stdout = collector.finish()
    assert status == 2
    assert "refused the login" in collector.log.splitlines()[-1]
    assert "wrong secret" not in collector.log


def test_bad_login_is_reported_once_and_not_retried_in_a_loop(
    broker_with_users: MosquittoBroker, run_collector
) -> None:
    collector = run_collector(
        broker_with_users.port,
        "--dry-run",
        "-v",
        MQTT_USERNAME=USER,
        MQTT_PASSWORD="wrong secret",
        MQTT_AUTH_RETRY_S="600",
    )
    collector.wait_log("refused the login of user 'meter'")
    # With the 0.1 s reconnect backoff a loop would have made several attempts by now.
    time.sleep(1.5)
    assert collector.terminate() == 0
    assert collector.log.count("refused the login of user") == 1  # said once
    assert collector.log.count("refused the connection: ") == 1  # tried once (debug, every try)
    assert "wrong secret" not in collector.log


# --- Every preset, and bad payloads -------------------------------------------------------


def test_every_preset_and_bad_payloads(
    carbon_server: CarbonServer, mosquitto_broker: MosquittoBroker, run_collector
) -> None:
    collector = run_collector(
        mosquitto_broker.port,
        carbon_flag(carbon_server),
        MQTT_PRESETS="tasmota,shelly_gen2,shelly_gen1,esphome,emonhub",
    )
    collector.wait_log("subscribed to")
    samples = preset_samples()
    bad = [
        Message("tele/tasmota_kitchen/SENSOR", b"not json"),
        Message("tele/tasmota_kitchen/SENSOR", b'{"ENERGY": {"Power": NaN}}'),
        Message("tele/tasmota_kitchen/SENSOR", b'{"ENERGY": {"Power": 1e999}}'),
        Message("esp-washer/sensor/power_watts/state", b"inf"),
        Message("emon/emontx4/P1", b"\xff\xfe\x00binary"),
        Message("emon/emontx4/P2", b"9" * 70_000),
        Message(
            "glow/1A2B3C4D5E6F/SENSOR/electricitymeter",
            b'{"electricitymeter": {"power": {"value": NaN}}}',
        ),
        # Numbers no float holds, past Python's int() limit too; -Infinity; deep nesting.
        Message("tele/tasmota_kitchen/SENSOR", b'{"ENERGY": {"Power": ' + b"9" * 5000 + b"}}"),
        Message("tele/tasmota_kitchen/SENSOR", b'{"ENERGY": {"Power": ' + b"9" * 400 + b"}}"),
        Message("tele/tasmota_kitchen/SENSOR", b'{"ENERGY": {"Power": -Infinity}}'),
        Message("tele/tasmota_kitchen/SENSOR", b"[" * 30_000 + b"]" * 30_000),
        Message("esp-washer/sensor/power_watts/state", b"9" * 5000),
        Message(
            "glow/1A2B3C4D5E6F/SENSOR/electricitymeter",
            b'{"electricitymeter": {"power": {"value": ' + b"1" * 4301 + b"}}}",
        ),
    ]
    with Publisher(*mosquitto_broker.address) as publisher:
        publisher.publish_all([sample.message for sample in samples] + bad)
    for sample in samples:
        for path, value in sample.expected.items():
            [(_ts, got)] = carbon_server.wait_for_points(f"home.electricity.{path}")
            assert got == pytest.approx(value), path
    wait_for_value(carbon_server, HEALTH + "messages_invalid", len(bad))
    wait_for_value(carbon_server, HEALTH + "messages_ok", len(samples))
    wait_for_value(carbon_server, HEALTH + "devices_ok", 5)
    assert collector.terminate() == 0
    sent = {p for p in carbon_server.metric_paths() if not p.startswith(HEALTH)}
    assert sent == {f"home.electricity.{path}" for s in samples for path in s.expected}


def test_devices_that_name_alike_keep_series_of_their_own(
    carbon_server: CarbonServer, mosquitto_broker: MosquittoBroker, run_collector
) -> None:
    # All three became mqtt.unknown, and Kitchen/kitchen one mqtt.kitchen, without a word.
    topics = ["кухня", "спальня", "台所", "Kitchen", "kitchen"]
    expected = ["kukhnia", "spalnia", "unicode_1bcb3703", "kitchen", "kitchen_3171d89a"]
    for run in range(2):  # and again after a restart, in the other order
        collector = run_collector(
            mosquitto_broker.port, carbon_flag(carbon_server), MQTT_PRESETS="tasmota"
        )
        collector.wait_log("subscribed to")
        order = topics if run == 0 else topics[::-1]
        messages = [
            Message(f"tele/{topic}/SENSOR", b'{"ENERGY": {"Power": %d}}' % (10 * run + index))
            for index, topic in enumerate(order)
        ]
        with Publisher(*mosquitto_broker.address) as publisher:
            publisher.publish_all(messages)
        for index, topic in enumerate(order):
            segment = expected[topics.index(topic)]
            path = f"home.electricity.mqtt.{segment}.power_watts"
            carbon_server.wait_for(
                lambda path=path, value=10 * run + index: (
                    value in [v for _t, v in carbon_server.fetch(path)]
                ),
                10,
                path,
            )
        assert collector.terminate() == 0
        warnings = collector.log.count("would both write mqtt.kitchen")
        assert warnings == (1 if run == 0 else 0), collector.log  # said once, not every start
    sent = {p for p in carbon_server.metric_paths() if not p.startswith(HEALTH)}
    assert sent == {f"home.electricity.mqtt.{segment}.power_watts" for segment in expected}


# --- --once, --discover, signals ------------------------------------------------------


def test_once_waits_for_each_source_then_sends(
    carbon_server: CarbonServer, mosquitto_broker: MosquittoBroker, run_collector
) -> None:
    with Publisher(*mosquitto_broker.address) as publisher:
        publisher.publish_all(retained_glow_reading())
    collector = run_collector(
        mosquitto_broker.port,
        carbon_flag(carbon_server),
        "--once",
        MQTT_PRESETS="tasmota",
        MQTT_ONCE_TIMEOUT_S="1",
    )
    status, stdout = collector.finish()
    assert (status, stdout) == (0, "")
    assert "no reading within 1 s from: tasmota" in collector.log
    carbon_server.wait_for_points(GLOW + "power_watts")
    carbon_server.wait_for_points(HEALTH + "glow.1a2b3c4d5e6f.han_lqi")
    carbon_server.wait_for_points(HEALTH + "messages_ok")


def test_once_waits_for_a_reading_not_just_the_state(
    mosquitto_broker: MosquittoBroker, run_collector
) -> None:
    with Publisher(*mosquitto_broker.address) as publisher:
        publisher.publish_all([SimulatedGlow().state()])  # retained, health only
    collector = run_collector(mosquitto_broker.port, "--once", "--dry-run", MQTT_ONCE_TIMEOUT_S="1")
    status, stdout = collector.finish()
    assert status == 3
    assert collector.log.splitlines()[-1] == "mqtt: no reading within 1 s"
    assert HEALTH + "glow.1a2b3c4d5e6f.han_lqi 160 " in stdout  # still sent


def test_once_without_broker_says_so(tmp_path: Path, run_collector) -> None:
    collector = run_collector(free_port(), "--once", "--dry-run", MQTT_ONCE_TIMEOUT_S="1")
    status, _stdout = collector.finish()
    assert status == 3
    last = collector.log.splitlines()[-1]
    assert last.startswith("mqtt: broker 127.0.0.1:")
    assert "unreachable" in last


def test_once_with_carbon_down_spools(mosquitto_broker: MosquittoBroker, run_collector) -> None:
    with Publisher(*mosquitto_broker.address) as publisher:
        publisher.publish_all(retained_glow_reading())
    collector = run_collector(mosquitto_broker.port, f"--carbon=127.0.0.1:{free_port()}", "--once")
    status, _stdout = collector.finish()
    assert status == 1
    assert "lines kept in the spool" in collector.log.splitlines()[-1]
    spooled = "".join(
        p.read_text() for p in (collector.state_dir / "mqtt" / "spool").glob("*.spool")
    )
    assert GLOW + "power_watts 1250 " in spooled


def test_discover_lists_topics_with_their_rules(
    mosquitto_broker: MosquittoBroker, run_collector
) -> None:
    tasmota = preset_samples()[0].message
    with Publisher(*mosquitto_broker.address) as publisher:
        publisher.publish_all(
            [
                tasmota._replace(retain=True),
                SimulatedGlow().state(),
                Message("zigbee2mqtt/bridge/state", b"online", retain=True),
            ]
        )
    collector = run_collector(mosquitto_broker.port, "--discover", MQTT_PRESETS="tasmota")
    status, stdout = collector.finish()
    assert status == 0, collector.log
    rows = {line.split()[0]: line for line in stdout.splitlines()[2:]}
    assert stdout.split()[:5] == ["topic", "messages", "rule", "device", "values"]
    assert rows.keys() == {tasmota.topic, "glow/1A2B3C4D5E6F/STATE", "zigbee2mqtt/bridge/state"}
    assert rows[tasmota.topic].split()[2:5] == ["tasmota", "tasmota_kitchen", "power_watts=45"]
    assert rows["glow/1A2B3C4D5E6F/STATE"].split()[2:4] == ["glow", "1a2b3c4d5e6f"]
    assert "(ignored: no rule matches)" in rows["zigbee2mqtt/bridge/state"]
    assert not collector.state_dir.exists()  # discovery writes nothing


def test_sigterm_sends_what_is_pending(
    carbon_server: CarbonServer, mosquitto_broker: MosquittoBroker, run_collector
) -> None:
    collector = run_collector(
        mosquitto_broker.port,
        carbon_flag(carbon_server),
        "-v",
        MQTT_FLUSH_INTERVAL_S="3600",
        MQTT_HEALTH_INTERVAL_S="3600",
    )
    collector.wait_log("subscribed to")
    collector.wait_log("sending to")
    glow = SimulatedGlow(start=int(time.time()) - 100, gas=False)
    glow.power_kw = 0.75
    with Publisher(*mosquitto_broker.address) as publisher:
        publisher.publish_all(glow.step(10))
    collector.wait_log("SENSOR/electricitymeter: ok")
    # Its lines wait for a flush an hour away: SIGTERM must send them.
    assert collector.terminate() == 0
    assert carbon_server.wait_for_points(GLOW + "power_watts") == [(glow.clock, 750)]
    assert (collector.state_dir / "mqtt" / "glow_registers.json").exists()


# --- TLS ----------------------------------------------------------------------------------


def make_certificates(directory: Path, name: str) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it, with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found: apt-get install openssl")
    directory.mkdir(parents=True, exist_ok=True)
    files = {key: directory / f"{name}-{key}" for key in ("ca.crt", "ca.key", "crt", "key", "csr")}
    extensions = directory / f"{name}-ext.cnf"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "authorityKeyIdentifier=keyid,issuer\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )

    def run(*args: object) -> None:
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name} CA",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", files["ca.key"], "-out", files["ca.crt"])  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", files["key"], "-out", files["csr"])  # fmt: skip
    run("x509", "-req", "-in", files["csr"], "-CA", files["ca.crt"], "-CAkey", files["ca.key"],
        "-CAcreateserial", "-days", "2", "-extfile", extensions, "-out", files["crt"])  # fmt: skip
    return files


class TlsBroker(MosquittoBroker):
    """The harness broker with TLS on its listener."""

    def __init__(self, work_dir: Path, certificates: dict[str, Path]) -> None:
        super().__init__(work_dir)
        self.certificates = certificates

    def _write_config(self) -> None:
        super()._write_config()
        with open(self.conf_path, "a", encoding="utf-8") as conf:
            conf.write(f"certfile {self.certificates['crt']}\n")
            conf.write(f"keyfile {self.certificates['key']}\n")


def test_tls_with_a_ca_file(start_server, tmp_path: Path, run_collector) -> None:
    certificates = make_certificates(tmp_path / "tls", "home")
    broker = start_server(TlsBroker(tmp_path / "mosquitto", certificates))
    ca_file = str(certificates["ca.crt"])
    with Publisher(*broker.address, tls_ca_file=ca_file) as publisher:
        publisher.publish_all(retained_glow_reading())
    collector = run_collector(broker.port, "--once", "--dry-run", MQTT_TLS_CA_FILE=ca_file)
    status, stdout = collector.finish()
    assert status == 0, collector.log
    assert GLOW + "power_watts 1250 " in stdout

    # A broker certificate the CA did not sign: no connection, and the reason why.
    stranger = make_certificates(tmp_path / "tls", "stranger")
    collector = run_collector(
        broker.port,
        "--once",
        "--dry-run",
        MQTT_TLS_CA_FILE=str(stranger["ca.crt"]),
        MQTT_ONCE_TIMEOUT_S="1",
    )
    status, _stdout = collector.finish()
    assert status == 3
    assert "certificate verify failed" in collector.log.splitlines()[-1]


def test_missing_ca_file_is_a_config_error(tmp_path: Path, run_collector) -> None:
    collector = run_collector(free_port(), "--once", MQTT_TLS_CA_FILE=str(tmp_path / "none.crt"))
    status, _stdout = collector.finish()
    assert status == 2
    assert collector.log.splitlines()[-1].startswith("mqtt: MQTT_TLS_CA_FILE: cannot use ")
