#!/usr/bin/env python3
"""Run every benchmark script (bench/bench_*.py), one after another.

    .venv/bin/python bench/run_all.py [--quick] [NAME ...]

NAME picks scripts by name (``kasa`` runs bench_kasa.py). Each script prints
its own figures and targets (bench/README.md has the latest). Exits non-zero
if any script failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def bench_scripts(names: list[str]) -> list[Path]:
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if names:
        wanted = {name.removeprefix("bench_").removesuffix(".py") for name in names}
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    return scripts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every bench/bench_*.py script.")
    parser.add_argument("--quick", action="store_true", help="pass --quick: small runs")
    parser.add_argument("names", nargs="*", help="only these (e.g. kasa sending)")
    args = parser.parse_args(argv)
    scripts = bench_scripts(args.names)
    if not scripts:
        print(f"run_all: no benchmark matches {' '.join(args.names)}", file=sys.stderr)
        return 2
    failed = []
    for script in scripts:
        command = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        print(f"\n===== {script.name} {'--quick ' if args.quick else ''}=====", flush=True)
        started = time.monotonic()
        # The repo root as the working directory, as in the scripts' own usage lines.
        code = subprocess.call(command, cwd=BENCH_DIR.parent)
        elapsed = time.monotonic() - started
        print(f"===== {script.name}: exit {code} after {elapsed:.0f} s", flush=True)
        if code != 0:
            failed.append(script.name)
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
