"""systemd: the rendered units, install.sh, and the watchdog ping logic.

Units are rendered into a temporary prefix and checked with
``systemd-analyze verify``; nothing is enabled or started on this machine.
The notify messages are read from a real AF_UNIX datagram socket given to
the collectors as NOTIFY_SOCKET, as systemd does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import collector
from line_batcher import LineBatcher
from runtime import EXIT_OK, Runtime
from service import ensure_watchdog_covers, sd_notify
from settings import load_settings
from simulators.kasa import KasaSimulator, SimulatedKasaDevice, loopback_host

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "systemd" / "install.sh"
# The virtual environment running the tests: its python exists, as verify wants.
VENV = Path(sys.prefix)
COLLECTORS = {
    "kasa": "kasa_to_graphite.py",
    "tuya": "tuya_to_graphite.py",
    "esp32": "esp32_receiver.py",
    "mqtt": "mqtt_to_graphite.py",
    "circuit": "circuit_to_graphite.py",
}
# Settings only a system unit can have (mount namespaces, users).
SYSTEM_ONLY = (
    "User=",
    "Group=",
    "ProtectSystem=",
    "ProtectHome=",
    "ReadWritePaths=",
    "PrivateTmp=",
)


# --- install.sh -----------------------------------------------------------------------


def install(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        cwd=ROOT,
        env=env if env is not None else {**os.environ, "ELECTRICITY_CONFIG": os.devnull},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    return tmp_path / "root"


def render(prefix: Path, state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    result = install(
        "--prefix", str(prefix), "--venv", str(VENV), "--state-dir", str(state_dir), *args
    )
    assert result.returncode == 0, result.stderr
    return result


def system_units(prefix: Path) -> Path:
    return prefix / "etc" / "systemd" / "system"


def user_units(prefix: Path) -> Path:
    home = Path(os.path.expanduser("~"))
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return Path(str(prefix) + str(config)) / "systemd" / "user"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """key -> values of a unit file (keys may repeat, e.g. Environment=)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.slow
def test_system_units_render_for_this_checkout(prefix: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    result = render(prefix, state_dir, "kasa", "mqtt")
    units = system_units(prefix)
    assert sorted(p.name for p in units.iterdir()) == sorted(
        f"electricity-{name}.service" for name in COLLECTORS
    )
    for name, script in COLLECTORS.items():
        text = (units / f"electricity-{name}.service").read_text()
        assert "@" not in text, "a placeholder was left"
        unit = unit_settings(units / f"electricity-{name}.service")
        assert unit["ExecStart"] == [f"{VENV}/bin/python {ROOT}/{script}"]
        assert (ROOT / script).is_file()
        assert unit["Type"] == ["notify"]
        assert unit["WatchdogSec"] == ["5min"]
        assert unit["Restart"] == ["always"]
        assert unit["RestartSec"] == ["10"]
        assert unit["Wants"] == ["network-online.target"]
        assert unit["After"] == ["network-online.target time-sync.target"]
        assert unit["User"] == [
            subprocess.check_output(["stat", "-c", "%U", ROOT], text=True).strip()
        ]
        assert f"ELECTRICITY_STATE_DIR={state_dir}" in unit["Environment"]
        assert unit["ReadWritePaths"] == [str(state_dir)]
        assert unit["NoNewPrivileges"] == ["yes"]
        assert unit["ProtectSystem"] == ["strict"]
        assert unit["ProtectHome"] == ["read-only"]
        assert unit["PrivateTmp"] == ["yes"]
        assert unit["WantedBy"] == ["multi-user.target"]
        assert unit["SyslogIdentifier"] == [f"electricity-{name}"]
        # Serial Modbus adapters must stay reachable for the circuit collector.
        assert unit["PrivateDevices"] == ["no" if name == "circuit" else "yes"]
        assert unit["Description"][0].startswith("Home electricity: ")
        assert text.startswith(
            "# Rendered by systemd/install.sh from systemd/electricity.service.in"
        )
    # Only the named collectors are enabled and (re)started.
    assert "would run: systemctl enable electricity-kasa.service electricity-mqtt.service" in (
        result.stdout
    )
    assert "would run: systemctl restart electricity-kasa.service electricity-mqtt.service" in (
        result.stdout
    )


@pytest.mark.slow
def test_user_units_have_no_user_and_no_namespaces(prefix: Path, tmp_path: Path) -> None:
    result = render(prefix, tmp_path / "state", "--user", "esp32")
    units = user_units(prefix)
    assert len(list(units.glob("electricity-*.service"))) == len(COLLECTORS)
    for name in COLLECTORS:
        text = (units / f"electricity-{name}.service").read_text()
        assert "@" not in text
        assert not [line for line in text.splitlines() if line.startswith(SYSTEM_ONLY)]
        assert "network-online.target" not in text  # a system unit, absent in user managers
        unit = unit_settings(units / f"electricity-{name}.service")
        assert unit["WantedBy"] == ["default.target"]
        assert unit["NoNewPrivileges"] == ["yes"]
        assert unit["WatchdogSec"] == ["5min"]
    assert "would run: systemctl --user enable electricity-esp32.service" in result.stdout
    assert not system_units(prefix).exists()


@pytest.mark.slow
def test_install_twice_changes_nothing_and_uninstall_removes(prefix: Path, tmp_path: Path) -> None:
    render(prefix, tmp_path / "state", "all")
    units = system_units(prefix)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in units.iterdir()}
    again = render(prefix, tmp_path / "state", "all")
    assert "wrote" not in again.stdout
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in units.iterdir()} == before

    # A moved state dir rewrites every unit.
    moved = render(prefix, tmp_path / "elsewhere", "kasa")
    assert moved.stdout.count("wrote") == len(COLLECTORS)

    removed = install("--prefix", str(prefix), "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert "would run: systemctl disable --now electricity-kasa.service" in removed.stdout
    assert list(units.iterdir()) == []
    assert install("--prefix", str(prefix), "--uninstall").returncode == 0  # twice is fine


@pytest.mark.slow
def test_install_refuses_what_it_cannot_do(prefix: Path, tmp_path: Path) -> None:
    nothing = install("--prefix", str(prefix))
    assert nothing.returncode == 2
    assert "name the collectors" in nothing.stderr
    unknown = install("--prefix", str(prefix), "kasa", "zigbee")
    assert unknown.returncode == 2
    assert "unknown collector 'zigbee'" in unknown.stderr
    spaced = install("--prefix", str(prefix), "--state-dir", str(tmp_path / "my state"), "kasa")
    assert spaced.returncode == 2
    assert "plain path" in spaced.stderr

    bad = tmp_path / "config_local.py"
    bad.write_text("PLUG_INTERVAL_S = 'often'\n")
    env = {**os.environ, "ELECTRICITY_CONFIG": str(bad)}
    wrong = install("--prefix", str(prefix), "kasa", env=env)
    assert wrong.returncode == 2
    assert "PLUG_INTERVAL_S" in wrong.stderr
    assert "fix the settings" in wrong.stderr
    assert not system_units(prefix).exists(), "nothing is rendered from bad settings"


@pytest.mark.slow
def test_state_dir_comes_from_the_settings(prefix: Path, tmp_path: Path) -> None:
    local = tmp_path / "config_local.py"
    local.write_text(f"STATE_DIR = {str(tmp_path / 'from_settings')!r}\n")
    env = {**os.environ, "ELECTRICITY_CONFIG": str(local)}
    env.pop("ELECTRICITY_STATE_DIR", None)
    result = install("--prefix", str(prefix), "--venv", str(VENV), "kasa", env=env)
    assert result.returncode == 0, result.stderr
    unit = unit_settings(system_units(prefix) / "electricity-kasa.service")
    assert unit["ReadWritePaths"] == [str(tmp_path / "from_settings")]


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if os.environ.get("ELECTRICITY_REQUIRE_SERVERS"):
        pytest.fail("systemd-analyze not found: apt-get install systemd")
    pytest.skip("systemd-analyze not found: apt-get install systemd")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["system", "user"])
def test_units_pass_systemd_analyze_verify(mode: str, prefix: Path, tmp_path: Path) -> None:
    analyze = systemd_analyze()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    render(prefix, state_dir, *(["--user"] if mode == "user" else []), "all")
    units = system_units(prefix) if mode == "system" else user_units(prefix)
    paths = sorted(str(p) for p in units.glob("*.service"))
    env = dict(os.environ)
    command = [analyze, "verify", *paths]
    if mode == "user":
        runtime_dir = tmp_path / "xdg-runtime"
        runtime_dir.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(runtime_dir)
        command.insert(1, "--user")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    # verify warns about a bad line yet exits 0: any word about our units fails.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "electricity-" in line]
    assert result.returncode == 0, result.stderr
    assert ours == []


# --- The notify socket ------------------------------------------------------------------


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[str] = []

    def receive(self, timeout_s: float, count: int = 0) -> list[str]:
        """Messages arriving within timeout_s, or the first ``count`` of them
        (all of them are also kept in ``messages``)."""
        got: list[str] = []
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (count and len(got) >= count):
                return got
            self.sock.settimeout(remaining)
            try:
                got.append(self.sock.recv(4096).decode())
            except socket.timeout:
                return got
            self.messages.append(got[-1])

    def wait_for(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self.receive(min(0.5, max(0.0, deadline - time.monotonic()))):
                if message.startswith(prefix):
                    return message
        raise AssertionError(f"no {prefix!r} within {timeout_s} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    # A short directory: AF_UNIX paths are limited to about 100 bytes.
    directory = tempfile.mkdtemp(prefix="notify-")
    listener = NotifySocket(os.path.join(directory, "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield listener
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_sd_notify_path_and_abstract_sockets(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sd_notify("READY=1")
    assert notify_socket.receive(1, count=1) == ["READY=1"]

    abstract = NotifySocket(f"@electricity-test-{uuid.uuid4().hex}")
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", abstract.address)
        assert sd_notify("WATCHDOG=1")
        assert abstract.receive(1, count=1) == ["WATCHDOG=1"]
    finally:
        abstract.close()

    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    assert not sd_notify("WATCHDOG=1")  # no systemd listening: no error either
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("WATCHDOG=1")


class Sink:
    """Delivers, spools (returns False) or fails (raises) every batch."""

    spool = None

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome
        self.batches: list[list[str]] = []

    def describe_destinations(self) -> str:
        return "a test sink"

    def send_lines(self, lines: list[str]) -> bool:
        if self.outcome == "fail":
            raise OSError(28, "No space left on device")
        self.batches.append(list(lines))
        return self.outcome == "deliver"


class OnePlug(collector.Collector):
    source = "fake"

    async def discover(self) -> list[collector.Device]:
        return [collector.Device(stable_id="p1", name="Plug")]

    async def poll(self, device: collector.Device) -> list[collector.Reading]:
        return [collector.Reading("p1", "Plug", {"power_watts": 5.0})]


def make_runtime(tmp_path: Path, outcome: str) -> Runtime:
    local = tmp_path / "config_local.py"
    local.write_text("")
    settings = load_settings(env={"ELECTRICITY_STATE_DIR": str(tmp_path)}, local_path=local)
    runtime = Runtime("fake", settings)
    runtime.sink = Sink(outcome)
    return runtime


def run_loop(runtime: Runtime, cycles: int) -> int:
    """Run the poll loop every 0.2 s until ``cycles`` cycles handed lines to the sink."""

    async def scenario() -> int:
        # Made inside the event loop: on Python 3.9 an asyncio.Event binds to
        # the loop current when it is made.
        loop = collector.PollLoop(OnePlug(runtime, None), interval_s=0.2)
        task = asyncio.ensure_future(loop.run())
        while len(runtime.sink.batches) < 2 * cycles and not task.done():
            await asyncio.sleep(0.02)
        loop.stopping.set()
        return await task

    return asyncio.run(scenario())


@pytest.mark.parametrize("outcome", ["deliver", "spool"])
def test_each_cycle_that_delivers_or_spools_pings(
    outcome: str, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    runtime = make_runtime(tmp_path, outcome)
    assert run_loop(runtime, cycles=3) == EXIT_OK
    messages = notify_socket.receive(0.5)
    assert messages[0] == "READY=1"
    assert messages[-1] == "STOPPING=1"
    pings = [m for m in messages if m.startswith("WATCHDOG=1\n")]
    assert len(pings) >= 3
    status = pings[0].split("\n")[1]
    assert status.startswith("STATUS=")
    assert "1 devices answered, 0 failed" in status
    assert ("delivered" if outcome == "deliver" else "spooled") in status


def test_a_cycle_that_cannot_deliver_or_spool_never_pings(
    notify_socket: NotifySocket, tmp_path: Path
) -> None:
    runtime = make_runtime(tmp_path, "fail")
    with pytest.raises(OSError, match="No space left"):
        run_loop(runtime, cycles=1)
    messages = notify_socket.receive(0.5)
    assert messages == ["READY=1"]


def test_line_batcher_pings_after_each_send_only(
    notify_socket: NotifySocket, tmp_path: Path
) -> None:
    runtime = make_runtime(tmp_path, "spool")
    batcher = LineBatcher(runtime, flush_interval_s=60)
    assert batcher.flush()  # nothing waiting: nothing sent, no ping
    assert notify_socket.receive(0.3) == []
    batcher.add(["home.electricity.fake.p.power_watts 1 1700000000\n"])
    assert not batcher.flush()  # spooled
    [ping] = notify_socket.receive(1, count=1)
    assert ping.startswith("WATCHDOG=1\nSTATUS=")
    assert "1 lines spooled" in ping

    runtime.sink = Sink("fail")
    batcher.add(["home.electricity.fake.p.power_watts 2 1700000001\n"])
    with pytest.raises(OSError, match="No space left on device"):
        batcher.flush()
    assert notify_socket.receive(0.3) == []


def test_watchdog_is_extended_for_long_intervals(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(300 * 1_000_000))  # WatchdogSec=5min
    assert not ensure_watchdog_covers(30)  # 3 x 30 s + 60 s fits
    assert notify_socket.receive(0.3) == []
    assert ensure_watchdog_covers(600)
    assert notify_socket.receive(1, count=1) == [f"WATCHDOG_USEC={(3 * 600 + 60) * 1_000_000}"]
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # another process's watchdog
    assert not ensure_watchdog_covers(600)
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.delenv("WATCHDOG_USEC")  # no watchdog configured
    assert not ensure_watchdog_covers(600)
    assert notify_socket.receive(0.3) == []


# --- A real collector under a notify socket --------------------------------------------


@pytest.mark.slow
def test_real_collector_pings_only_while_carbon_takes_its_lines(
    carbon_server, tmp_path: Path
) -> None:
    """kasa_to_graphite.py every second: pings while Carbon confirms, and while
    Carbon hangs too, since polling never waits for Carbon: each cycle's lines
    are on disk in the spool before its ping. They land once it answers."""
    listener = NotifySocket(f"@electricity-test-{uuid.uuid4().hex}")
    plug = SimulatedKasaDevice("KP115(EU)_1.0_1.0.16.json", host=loopback_host(0), alias="Kettle")
    local = tmp_path / "config_local.py"
    local.write_text("")
    host, port = carbon_server.line_address
    env = {
        **os.environ,
        "NOTIFY_SOCKET": listener.address,
        "WATCHDOG_USEC": str(300 * 1_000_000),
        "ELECTRICITY_CONFIG": str(local),
        "ELECTRICITY_STATE_DIR": str(tmp_path / "state"),
        "CARBON_TIMEOUT_S": "60",  # longer than the test: a send hangs throughout
        "DEVICE_TIMEOUT_S": "3",
    }
    with KasaSimulator([plug]) as sim:
        command = [
            sys.executable,
            "kasa_to_graphite.py",
            "--host",
            f"{plug.host}:{sim.port}",
            "--interval",
            "1",
            "--carbon",
            f"{host}:{port}",
        ]
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        try:
            assert listener.wait_for("READY=1", 30) == "READY=1"
            assert "delivered" in listener.wait_for("WATCHDOG=1", 10)
            listener.wait_for("WATCHDOG=1", 10)

            carbon_server.pause()
            listener.receive(1.5)
            assert len([m for m in listener.receive(3) if m.startswith("WATCHDOG")]) >= 2
            carbon_server.resume()
            assert "delivered" in listener.wait_for("WATCHDOG=1", 30)

            proc.send_signal(signal.SIGTERM)
            listener.wait_for("STOPPING=1", 30)
            _, stderr = proc.communicate(timeout=30)
            assert proc.returncode == 0, stderr
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            listener.close()
    assert carbon_server.wait_for_points("home.electricity.kasa.kettle.power_watts", count=2)


def test_every_unit_comes_from_one_template() -> None:
    """One template: what differs between collectors is filled in by install.sh."""
    assert sorted(p.name for p in (ROOT / "systemd").glob("*.in")) == ["electricity.service.in"]
