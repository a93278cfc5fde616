"""The real collector scripts run as processes, as systemd runs them on a Pi.

Used by the demo, the benchmarks and the simulated home's history. A
collector started here reads only the settings given to it: settings
exported in the developer's shell (a CARBON_HOST or KASA_HOSTS for their own
home) are not passed on, so nothing started here talks to the LAN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import settings as settings_module
from harness._process import spawn

ROOT = Path(__file__).resolve().parents[1]


def collector_environment(
    settings: Mapping[str, Any] | None = None, config_file: Path | None = None
) -> dict[str, str]:
    """This environment without any setting, then ``settings`` as environment
    variables (lists and dicts as JSON) and ``config_file`` as the local config."""
    names = set(settings_module.defaults()) | set(settings_module.ENV_ALIASES.values())
    names.add(settings_module.LOCAL_CONFIG_ENV)
    env = {key: value for key, value in os.environ.items() if key not in names}
    env["PYTHONUNBUFFERED"] = "1"
    if config_file is not None:
        env[settings_module.LOCAL_CONFIG_ENV] = str(config_file)
    for name, value in (settings or {}).items():
        name = settings_module.ENV_ALIASES.get(name, name)  # STATE_DIR: ELECTRICITY_STATE_DIR
        if isinstance(value, bool):
            env[name] = "1" if value else "0"
        elif isinstance(value, (list, dict)):
            env[name] = json.dumps(value)
        else:
            env[name] = str(value)
    return env


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """A config_local.py, with the names a home's own file uses: one commented
    block per section title."""
    lines = ["# Written for a simulated home: your own config_local.py uses the same names."]
    for title, values in sections.items():
        lines.append(f"\n# {title}")
        lines.extend(f"{name} = {value!r}" for name, value in values.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class Running:
    """A collector process, its log, and whether its early exit was reported."""

    name: str
    process: subprocess.Popen
    log_path: Path
    reported: bool = False


def script_command(script: str, *args: str) -> list[str]:
    """How a script of this repository runs here: this Python, the script's file."""
    return [sys.executable, str(ROOT / script), *args]


def start_collector(
    name: str, script: str, args: Sequence[str], config: Path, state_dir: Path, log_path: Path
) -> Running:
    """``script`` (a file in this repository) with ``config`` and ``state_dir``."""
    log_path.write_bytes(b"")
    command = script_command(script, "--config", str(config), "--state-dir", str(state_dir), *args)
    process = spawn(command, log_path, env=collector_environment(), cwd=ROOT)
    return Running(name, process, log_path)
