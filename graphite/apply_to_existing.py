#!/usr/bin/env python3
"""Give whisper files that exist already the retentions and aggregation of
graphite/storage-schemas.conf and storage-aggregation.conf.

carbon-cache applies those files only to the metrics it creates from then
on. This converts the others with whisper's own whisper-resize.py, data
kept (its points copied into the new archives):

    sudo systemctl stop carbon-cache
    sudo -u _graphite python3 graphite/apply_to_existing.py /var/lib/graphite/whisper
    sudo systemctl start carbon-cache

Only files a section of these two files names are touched (not those left
to their catch-all [default]); files already right are skipped. --dry-run
lists what would change. Debian's whisper is /var/lib/graphite/whisper
(user _graphite); a pip install's is /opt/graphite/storage/whisper.
"""

from __future__ import annotations

import argparse
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMAS = HERE / "storage-schemas.conf"
AGGREGATION = HERE / "storage-aggregation.conf"
CATCH_ALL = "default"
UNITS_S = {"s": 1, "min": 60, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def sections(path: Path) -> list[tuple[str, re.Pattern, dict[str, str]]]:
    """(name, pattern, options) of each section, in the file's order (first match wins)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path, encoding="utf-8")
    return [
        (name, re.compile(parser[name]["pattern"]), dict(parser[name]))
        for name in parser.sections()
    ]


def first_match(rules: list, metric: str) -> tuple[str, dict[str, str]]:
    for name, pattern, options in rules:
        if pattern.search(metric):
            return name, options
    return CATCH_ALL, {}


def seconds(text: str) -> int:
    """'10s', '1m', '7d', '60' -> seconds."""
    match = re.fullmatch(r"(\d+)([a-z]*)", text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    amount, unit = match.groups()
    return int(amount) * (UNITS_S[unit] if unit else 1)


def archives(retentions: str) -> list[tuple[int, int]]:
    """'10s:7d,1m:30d' -> [(10, 604800), (60, 2592000)]: (seconds per point, retention)."""
    return [
        (seconds(step), seconds(keep))
        for step, keep in (item.split(":") for item in retentions.split(","))
    ]


def find_resize() -> list[str]:
    """whisper's resize script: beside this Python (a virtualenv) or on PATH."""
    beside = Path(sys.executable).parent / "whisper-resize.py"
    if beside.is_file():
        return [sys.executable, str(beside)]
    for name in ("whisper-resize.py", "whisper-resize"):
        found = shutil.which(name)
        if found:
            return [found]
    raise SystemExit("apply_to_existing: whisper-resize.py not found (pip install whisper)")


def plan(whisper_dir: Path) -> list[tuple[Path, str, str, float, str]]:
    """(file, metric, retentions, xFilesFactor, method) of each file to convert."""
    import whisper

    schemas, aggregations = sections(SCHEMAS), sections(AGGREGATION)
    changes = []
    for path in sorted(whisper_dir.rglob("*.wsp")):
        metric = ".".join(path.relative_to(whisper_dir).with_suffix("").parts)
        schema, schema_options = first_match(schemas, metric)
        rule, rule_options = first_match(aggregations, metric)
        if schema == CATCH_ALL or rule == CATCH_ALL:
            continue
        retentions = schema_options["retentions"]
        xff = float(rule_options["xfilesfactor"])
        method = rule_options["aggregationmethod"]
        info = whisper.info(str(path))
        now = [(a["secondsPerPoint"], a["retention"]) for a in info["archives"]]
        if (now, info["xFilesFactor"], info["aggregationMethod"]) != (
            archives(retentions),
            xff,
            method,
        ):
            changes.append((path, metric, retentions, xff, method))
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("whisper_dir", type=Path, help="carbon's whisper directory")
    parser.add_argument("--dry-run", action="store_true", help="list the changes, make none")
    args = parser.parse_args(argv)
    if not args.whisper_dir.is_dir():
        print(f"apply_to_existing: {args.whisper_dir} is not a directory", file=sys.stderr)
        return 2
    changes = plan(args.whisper_dir)
    resize = [] if args.dry_run else find_resize()
    for path, metric, retentions, xff, method in changes:
        print(f"{metric}: {retentions}, {method}, xFilesFactor {xff:g}")
        if not args.dry_run:
            subprocess.run(
                [
                    *resize,
                    str(path),
                    *retentions.split(","),
                    f"--xFilesFactor={xff}",
                    f"--aggregationMethod={method}",
                    "--nobackup",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
    print(f"{len(changes)} files {'to convert' if args.dry_run else 'converted'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
