#!/usr/bin/env python3
"""How long graphite-web takes to answer the dashboard, as Grafana asks it.

    .venv/bin/python bench/bench_grafana.py [--plugs 20] [--repeat 3] [--quick]

Whisper files for a home (plugs, two circuits, the ESP32 meter, a Glow
display, five collectors' health) are written straight in whisper's format,
every archive of graphite/storage-schemas.conf full (a home that has run for
a year); a real graphite-web serves them on loopback. Every panel
of grafana/dashboards/home-electricity.json is then asked for as Grafana
asks it (one /render request per panel, all its targets, 1000 points wide,
variables and $__interval filled in), for the dashboard's default 6 hours,
a day, a week and a month. Prints each panel's median time and the whole
dashboard's (one refresh), the whisper files' size, graphite-web's start.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import circuit_model
from harness.graphite_web import GraphiteWeb
from tools import build_dashboard

ROOT = Path(__file__).resolve().parents[1]

DASHBOARD = ROOT / "grafana" / "dashboards" / "home-electricity.json"
PLUG_METRICS = ("power_watts", "voltage_volts", "current_amps", "energy_kwh", "is_on")
CIRCUIT_METRICS = circuit_model.METRICS
HEALTH_METRICS = ("devices_ok", "devices_failed", "spool_lines", "metrics_sent", "poll_seconds")
RANGES = {"6 h": "now-6h", "1 day": "now-24h", "7 days": "now-7d", "30 days": "now-30d"}


def storage_rules():
    """graphite/apply_to_existing.py's reading of the two storage files (loaded by
    path: the installed graphite-web owns the name ``graphite``)."""
    path = ROOT / "graphite" / "apply_to_existing.py"
    spec = importlib.util.spec_from_file_location("apply_to_existing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def home_metrics(plugs: int) -> list[str]:
    metrics = []
    for i in range(plugs):
        source = "kasa" if i % 2 else "tuya"
        extra = ("energy_today_kwh",) if source == "kasa" else ()
        metrics += [f"home.electricity.{source}.plug_{i:02d}.{m}" for m in PLUG_METRICS + extra]
    for circuit in ("heat_pump", "ev_charger"):
        metrics += [f"home.electricity.circuit.{circuit}.{m}" for m in CIRCUIT_METRICS]
    metrics += [
        f"home.electricity.meter.{m}"
        for m in ("power_kw", "power_watts", "energy_kwh", "pulses_total", "rssi")
    ]
    metrics += [
        f"home.electricity.glow.1a2b3c4d5e6f.{m}"
        for m in ("power_watts", "power_kw", "energy_import_kwh", "energy_export_kwh")
    ]
    for source in ("kasa", "tuya", "circuit", "esp32", "mqtt"):
        metrics += [f"home.electricity.health.{source}.{m}" for m in HEALTH_METRICS]
    return metrics


def value(metric: str, ts: int, seed: int) -> float:
    """A plausible reading: counters rise with time, the rest wander."""
    if metric.endswith(("_kwh", "_total")):
        return (ts - 1.7e9) * (0.0001 + seed * 1e-6)
    if metric.endswith("is_on"):
        return 1.0
    return 100 + 80 * math.sin(ts / (900 + seed * 37)) + seed


def write_whisper(path: Path, archives: list[tuple[int, int]], metric: str, seed: int, now: int):
    """A whisper file with every archive full up to now, written in whisper's
    own format (whisper.update_many takes seconds per file for a week at 10 s)."""
    import whisper

    path.parent.mkdir(parents=True, exist_ok=True)
    whisper.create(str(path), [(step, keep // step) for step, keep in archives], xFilesFactor=0.0)
    info = whisper.info(str(path))
    with open(path, "r+b") as handle:
        for archive in info["archives"]:
            step, points = archive["secondsPerPoint"], archive["points"]
            first = now - now % step - (points - 1) * step
            handle.seek(archive["offset"])
            handle.write(
                b"".join(
                    struct.pack("!Ld", ts, value(metric, ts, seed))
                    for ts in range(first, first + points * step, step)
                )
            )


def render_panel(web: GraphiteWeb, targets: list[str], start: str) -> float:
    params = [("target", target) for target in targets]
    params += [("from", start), ("until", "now"), ("format", "json"), ("maxDataPoints", "1000")]
    started = time.perf_counter()
    web.get_json("/render", params, timeout_s=300)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 plugs, 6 h and 1 day, once")
    args = parser.parse_args(argv)
    plugs, repeat, ranges = args.plugs, args.repeat, RANGES
    if args.quick:
        plugs, repeat, ranges = 8, 1, {k: RANGES[k] for k in ("6 h", "1 day")}

    rules = storage_rules()
    schemas = rules.sections(rules.SCHEMAS)
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="bench-grafana-") as work:
        whisper_dir = Path(work) / "whisper"
        now = int(time.time())
        started = time.monotonic()
        metrics = home_metrics(plugs)
        for seed, metric in enumerate(metrics):
            _name, options = rules.first_match(schemas, metric)
            path = whisper_dir.joinpath(*metric.split(".")).with_suffix(".wsp")
            write_whisper(path, rules.archives(options["retentions"]), metric, seed, now)
        size = sum(p.stat().st_size for p in whisper_dir.rglob("*.wsp"))
        print(
            f"{len(metrics)} metrics ({plugs} plugs), {size / 1e6:.0f} MB of whisper files, "
            f"written in {time.monotonic() - started:.1f} s"
        )
        with GraphiteWeb(Path(work) / "web", whisper_dir=whisper_dir, carbonlink=False) as web:
            print(f"graphite-web started in {web.start_seconds:.1f} s")
            render_panel(web, [metrics[0]], "-1h")  # warm up (Django's first request)
            totals = {}
            rows = []
            for label, grafana_from in ranges.items():
                dashboard["time"]["from"] = grafana_from
                per_panel = {}
                now_local = datetime.datetime.now().astimezone()
                queries = list(build_dashboard.panel_queries(dashboard, now_local))
                for panel in (p for p in dashboard["panels"] if p.get("targets")):
                    targets = [t for p, t, _ in queries if p is panel]
                    start = next(s for p, _, s in queries if p is panel)
                    times = [render_panel(web, targets, start) for _ in range(repeat)]
                    per_panel[panel["title"]] = statistics.median(times)
                totals[label] = sum(per_panel.values())
                rows.append((label, per_panel))
        titles = list(rows[0][1])
        width = max(map(len, titles))
        print(
            f"\nmedian of {repeat} per panel, ms (panels with their own range ignore the column's)"
        )
        print(f"{'panel'.ljust(width)}  " + "  ".join(f"{label:>8}" for label, _ in rows))
        for title in titles:
            cells = "  ".join(f"{per_panel[title] * 1000:8.0f}" for _, per_panel in rows)
            print(f"{title.ljust(width)}  {cells}")
        print(
            f"{'whole dashboard'.ljust(width)}  "
            + "  ".join(f"{totals[label] * 1000:8.0f}" for label, _ in rows)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
