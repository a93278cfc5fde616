"""The foundation's benchmarks run (--quick) and print their tables.

No timing is asserted here: the figures are for bench/README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Every test here starts a server, a simulated device or a process.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_bench_kasa_quick():
    result = run_bench("bench/bench_kasa.py", "--quick")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "late-prompt" in out, out
    assert "dead adds nothing" in out, out
    rows = [
        line.split()
        for line in out.splitlines()
        if line.split()[:1] in (["legacy"], ["smart"]) and line.split()[1:2] in (["1"], ["10"])
    ]
    assert len(rows) == 8, out  # figures and verdicts for N=1 and N=10, legacy and smart
    # Every live plug's lines went out in every cycle, whatever the timings.
    verdicts = [row for row in rows if row[2] in ("met", "MISSED")]
    assert [row[-1] for row in verdicts] == ["met"] * 4, out
    assert "every poll on a new KLAP session" in out, out
    assert "all targets met:" in out


def test_bench_sending_quick():
    result = run_bench("bench/bench_sending.py", "--quick")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "plain loopback socket" in out, out
    assert "client/raw" in out, out
    if "skipped" in out:
        if os.environ.get("ELECTRICITY_REQUIRE_SERVERS"):
            pytest.fail(f"carbon-cache missing:\n{out}")
        pytest.skip("carbon-cache not installed: " + out.split("skipped:", 1)[1].splitlines()[0])
    assert "carbon-cache" in out
    # The replay's count is a correctness figure, not a timing: all must land.
    stored = re.search(r"in whisper\s+([\d,]+) points", out)
    assert stored, out
    assert stored.group(1) == "20,000", out
    assert "target: all 20,000 lines in whisper: met" in out


def test_run_all_selects_scripts_by_name():
    result = run_bench("bench/run_all.py", "--quick", "no_such_bench", timeout_s=30)
    assert result.returncode == 2
    assert "no benchmark matches no_such_bench" in result.stderr


def test_bench_esp32_slow_clients_quick():
    result = run_bench("bench/bench_esp32_slow_clients.py", "--quick")
    assert result.returncode == 0, result.stdout + result.stderr
    answered = re.search(r"posts answered: (\d+) of (\d+)", result.stdout)
    assert answered, result.stdout
    assert answered.group(1) == answered.group(2) != "0", result.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_soak_quick():
    """Two minutes of every fault at once (as root: the full state disk too)."""
    result = run_bench("bench/bench_soak.py", "--quick", timeout_s=840)
    out = result.stdout
    if "soak skipped" in out:
        if os.environ.get("ELECTRICITY_REQUIRE_SERVERS"):
            pytest.fail(f"carbon-cache missing:\n{out}")
        pytest.skip("carbon-cache not installed")
    assert result.returncode == 0, out + result.stderr
    assert "every line in whisper, no boundary missing: yes" in out
    for fault in ("Kasa plug hangs", "Tuya plugs switched off and on", "MQTT broker killed"):
        assert f"| {fault}" in out, out
    if os.geteuid() == 0:
        assert "| state disk full | 1 |" in out, out
