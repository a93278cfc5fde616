#!/usr/bin/env python3
"""See it work before owning a device: all five collectors against simulated
devices, into a real carbon-cache and graphite-web, on loopback.

    ./electricity demo                          a minute, or until Ctrl-C
    ./electricity demo --duration 15 --output /tmp/demo

The simulated home (simulators/home.py, the one the dashboard picture and
the tests use), each device speaking its real protocol: Kasa plugs and a
Tapo P110, two Tuya plugs (protocols 3.3 and 3.4), an ESP32 posting meter
pulses, a Glow display publishing through a local Mosquitto broker, and
Eastron SDM120 and SDM630 meters behind a Modbus gateway, its day played
twenty times faster than life (simulators/home_live.py). Each collector runs as its own
process, as on a Raspberry Pi, with the demo's settings in
<output>/config_local.py. A progress line shows series and points arriving;
at the end a table lists every series (points, last value) and a chart goes
to <output>/demo.png, the collectors' logs to <output>/logs/.

Nothing leaves 127.0.0.0/8: every simulator, server and collector binds to or
talks to loopback only, and settings from the environment are not passed on.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.carbon import CarbonNotFoundError, CarbonServer, log_tail, terminate
from harness.collectors import Running
from runtime import format_table
from simulators.home_live import (
    SOURCE_NAMES,
    LiveHome,
    start_source_collector,
    start_sources,
    write_home_config,
)

ROOT = Path(__file__).resolve().parent

# Every collector polls or flushes this often in the demo (at home: 5 to 30 s).
INTERVAL_S = 5.0
PREFIX = "home.electricity"


def say(message: str) -> None:
    """Progress and notes go to stderr; stdout holds the summary table."""
    print(message, file=sys.stderr, flush=True)


# --- Reading back: progress, summary, chart ----------------------------------------


def source_of(path: str) -> str:
    """The collector behind a metric path."""
    parts = path.split(".")
    if parts[:2] == ["home", "gas"]:
        return "mqtt"  # the Glow display's gas meter
    group = parts[2] if len(parts) > 2 else ""
    if group == "health" and len(parts) > 3:
        return parts[3]
    return {"meter": "esp32", "glow": "mqtt"}.get(group, group)


def is_health(path: str) -> bool:
    return path.startswith(f"{PREFIX}.health.")


Series = dict[str, list[tuple[int, float]]]


def read_whisper(carbon: CarbonServer, since: int) -> Series:
    series = {}
    for path in carbon.metric_paths():
        with contextlib.suppress(Exception):  # a file carbon is creating right now
            series[path] = carbon.fetch(path, from_ts=since)
    return series


def read_graphite_web(graphite: Any, since: int) -> Series:
    """Every series through graphite-web's /render, as Grafana reads it."""
    window = f"-{int(time.time()) - since + 5}s"
    series = {}
    for item in graphite.render(["home.*.*.*", "home.*.*.*.*"], from_=window):
        points = [(int(ts), value) for value, ts in item["datapoints"] if value is not None]
        if points:
            series[item["target"]] = points
    return series


def progress(elapsed_s: float, duration_s: float, series: Series, names: list[str]) -> str:
    counts = {name: [0, 0] for name in names}
    for path, points in series.items():
        if not is_health(path) and source_of(path) in counts:
            counts[source_of(path)][0] += 1
            counts[source_of(path)][1] += len(points)
    parts = "  ".join(f"{name} {n}/{p}" for name, (n, p) in counts.items())
    return f"{elapsed_s:3.0f}/{duration_s:g} s  series/points: {parts}"


def summary_tables(series: Series) -> str:
    """Every series (points, last value), then each collector's own health."""

    def order(path: str) -> tuple[int, str]:
        name = source_of(path)
        return (SOURCE_NAMES.index(name) if name in SOURCE_NAMES else len(SOURCE_NAMES), path)

    rows = [
        (path, str(len(series[path])), f"{series[path][-1][1]:g}")
        for path in sorted(series, key=order)
        if not is_health(path)
    ]
    health = []
    for name in SOURCE_NAMES:
        figures = [
            series.get(f"{PREFIX}.health.{name}.{figure}")
            for figure in ("devices_ok", "devices_failed", "metrics_sent", "spool_lines")
        ]
        if any(figures):
            health.append((name, *(f"{f[-1][1]:g}" if f else "-" for f in figures)))
    return (
        format_table(("series", "points", "last value"), rows)
        + "\n"
        + format_table(("collector", "devices ok", "failed", "lines sent", "in spool"), health)
    )


def write_chart(series: Series, names: list[str], path: Path, started: int) -> bool:
    """Power of every device, one panel per collector. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = []
    for name in names:
        found = {
            path: points
            for path, points in series.items()
            if source_of(path) == name and path.endswith(".power_watts") and not is_health(path)
        }
        if found:
            panels.append((name, found))
    if not panels:
        return False
    figure, _ = plt.subplots(len(panels), 1, figsize=(10, 2.4 * len(panels)), sharex=True)
    for axis, (name, found) in zip(list(figure.axes), panels):
        for metric_path, points in sorted(found.items()):
            label = ".".join(metric_path.split(".")[2:-1])
            times = [ts - started for ts, _ in points]
            axis.plot(times, [v for _, v in points], marker=".", label=label)
        axis.set_title(f"{name}: power_watts", fontsize=9, loc="left")
        axis.set_ylabel("W")
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axis.grid(alpha=0.3)
    figure.axes[-1].set_xlabel("seconds into the demo")
    figure.suptitle("Home electricity demo: simulated devices, real collectors, real Carbon")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


# --- Run it ------------------------------------------------------------------------------


def start_graphite_web(stack: contextlib.ExitStack, work: Path, carbon: CarbonServer) -> Any:
    """graphite-web over the carbon-cache, or None (the summary then reads the
    whisper files, as graphite-web would)."""
    from harness.graphite_web import GraphiteWeb, GraphiteWebNotFoundError

    try:
        graphite = GraphiteWeb(work / "graphite-web", carbon).start()
    except GraphiteWebNotFoundError as exc:
        say(f"  graphite-web skipped: {exc}")
        return None
    except Exception as exc:  # the demo goes on with the whisper files
        say(f"  graphite-web skipped: it did not start: {exc}")
        return None
    stack.callback(graphite.stop)
    return graphite


def watch(
    home: LiveHome,
    names: list[str],
    running: list[Running],
    carbon: CarbonServer,
    duration_s: float,
) -> float:
    """Vary the load and show what arrives, until the time is up or Ctrl-C.
    Returns the wall time the demo started."""
    interactive = sys.stderr.isatty()
    started = time.time()
    last_shown = -math.inf
    try:
        while (elapsed := time.time() - started) < duration_s:
            home.tick(elapsed)
            for item in running:
                if item.process.poll() is not None and not item.reported:
                    item.reported = True
                    say(
                        f"\n{item.name}: collector exited with status "
                        f"{item.process.returncode}:\n{log_tail(item.log_path, 5)}"
                    )
            line = progress(elapsed, duration_s, read_whisper(carbon, int(started)), names)
            if interactive:
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
            elif elapsed - last_shown >= 10:  # a log, not a terminal: a line now and then
                say(line)
                last_shown = elapsed
            time.sleep(1.0 - (time.time() - started) % 1.0)
    except KeyboardInterrupt:
        say("\nstopping early")
    if interactive:
        say("")
    return started


def read_back(carbon: CarbonServer, graphite: Any, since: int) -> Series:
    """Every series, through graphite-web when it runs (as Grafana reads them)."""
    series = settle(carbon, since)
    if graphite is not None:
        try:
            series = read_graphite_web(graphite, since)
            say(f"read back through graphite-web ({graphite.url})")
        except Exception as exc:  # the whisper files hold the same
            say(f"graphite-web did not answer ({exc}); read back from the whisper files")
    return series


def settle(
    carbon: CarbonServer, since: int, quiet_s: float = 2.0, timeout_s: float = 15.0
) -> Series:
    """The whisper files once carbon has written what it was sent (no new
    point for ``quiet_s``)."""
    deadline = time.monotonic() + timeout_s
    last_total, last_change = -1, time.monotonic()
    while True:
        series = read_whisper(carbon, since)
        total = sum(map(len, series.values()))
        if total != last_total:
            last_total, last_change = total, time.monotonic()
        if time.monotonic() - last_change >= quiet_s or time.monotonic() > deadline:
            return series
        time.sleep(0.25)


def report(series: Series, names: list[str], output: Path, started: int) -> int:
    """The summary on stdout and the chart; 1 when a collector sent nothing."""
    print(summary_tables(series))
    chart = output / "demo.png"
    if write_chart(series, names, chart, started):
        say(f"chart: {chart}")
    else:
        say("no chart: matplotlib is missing (pip install -r requirements-dev.txt)")
    sent = {source_of(path) for path in series if not is_health(path)}
    for name in names:
        if name not in sent:
            say(f"demo: {name} sent nothing; see {output / 'logs' / (name + '.log')}")
    return 0 if sent >= set(names) else 1


def run(duration_s: float, output: Path) -> int:
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()  # closed first: servers stop before their files go
    with tempfile.TemporaryDirectory(prefix="electricity-demo-") as temp, stack:
        work = Path(temp)
        try:
            carbon = CarbonServer(work / "carbon").start()
        except CarbonNotFoundError as exc:
            say(f"demo: {exc}")
            return 2
        stack.callback(carbon.stop)
        graphite = start_graphite_web(stack, work, carbon)
        home, sources = start_sources(stack, work, INTERVAL_S, say)
        names = [source.name for source in sources]

        config = output / "config_local.py"
        write_home_config(config, carbon.line_address, home, sources)
        running = [start_source_collector(s, config, work / "state", logs) for s in sources]
        stack.callback(lambda: [terminate(item.process) for item in running])
        say(f"collectors sending to carbon-cache at {carbon.host}:{carbon.port}")
        if graphite is not None:
            say(f"graphite-web: {graphite.url}/render?format=json&target={PREFIX}.*.*.power_watts")
        say(f"settings: {config}; logs: {logs}/; Ctrl-C ends early")

        started = int(watch(home, names, running, carbon, duration_s))
        # SIGTERM: each collector sends (or spools) what it holds, then exits.
        for item in running:
            terminate(item.process, timeout_s=30)
        series = read_back(carbon, graphite, started)
        return report(series, names, output, started)


def stop_early(signum: int, frame: Any) -> None:
    """SIGTERM ends the demo as Ctrl-C does: summary, chart, everything stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "demo-output",
        help="where the chart, the logs and the demo's settings go (default demo-output/)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, stop_early)
    say("Simulated on 127.0.0.0/8, read by the real collectors:")
    return run(args.duration, args.output)


if __name__ == "__main__":
    sys.exit(main())
