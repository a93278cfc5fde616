"""Helpers the tests share (fixtures are in conftest.py): running a collector
script as users run it, in its own process and environment."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.carbon import CarbonServer
from harness.collectors import collector_environment as environment_without_settings
from tuya_devicefile import DeviceEntry, parse_entry

ROOT = Path(__file__).resolve().parents[1]


def collector_environment(tmp_path: Path, config: str = "", **extra: str) -> dict[str, str]:
    """The environment for a collector process: no setting of the developer's
    shell, its own config_local.py holding ``config`` (never a developer's
    own), the state dir in tmp_path, then ``extra`` settings."""
    local = tmp_path / "config_local.py"
    local.write_text(config)
    return {
        **environment_without_settings(config_file=local),
        "ELECTRICITY_STATE_DIR": str(tmp_path / "state"),
        **extra,
    }


def run_collector(
    script: str, args: Sequence[str], env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess:
    """Run ``script`` (beside README.md) to its end: stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def start_collector(
    script: str, args: Sequence[str], env: dict[str, str], **popen: Any
) -> subprocess.Popen:
    """Start ``script`` (beside README.md); stdout and stderr piped, as text,
    unless ``popen`` says otherwise. Stop it with ``stop_collector``."""
    options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    options.update(popen)
    return subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, **options)


def stop_collector(process: subprocess.Popen) -> int:
    """SIGTERM (as systemd stops it), SIGKILL after 20 s; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def carbon_arg(carbon: CarbonServer) -> str:
    """``--carbon``'s HOST:PORT for a carbon_server."""
    host, port = carbon.line_address
    return f"{host}:{port}"


# --- Tuya test data -----------------------------------------------------------------

TUYA_KEY = "0123456789abcdef"  # a local key the simulated devices accept


def by_name(entries: list[DeviceEntry], name: str) -> DeviceEntry:
    """The devices.json entry named ``name``."""
    return next(entry for entry in entries if entry.name == name)


def tuya_entry(**fields: Any) -> DeviceEntry:
    """A devices.json entry of a plug, ``fields`` changed."""
    base = {"id": "bf0000000000000000test", "name": "Test", "key": TUYA_KEY, "category": "cz"}
    return parse_entry({**base, **fields})
