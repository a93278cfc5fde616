#!/usr/bin/env python3
"""docs/dashboard.png: the dashboard's key graphs, drawn from a real graphite-web
that the real collectors filled from a simulated home.

    .venv/bin/python tools/render_dashboard_png.py [--hours 6] [--days 7] [--out FILE]

Starts carbon-cache (with graphite/'s storage configs), graphite-web and
Mosquitto on loopback in a temporary directory, fills them with the
simulated home's backdated history (simulators/home_history.py, which
tests/test_grafana.py uses too), then draws the figures from graphite-web's
JSON renders of the dashboard's own queries
(grafana/dashboards/home-electricity.json). Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.graphite_web import GraphiteWeb
from simulators.home_history import filled_graphite
from tools import build_dashboard

ROOT = Path(__file__).resolve().parents[1]

DASHBOARD = ROOT / "grafana" / "dashboards" / "home-electricity.json"
OUTPUT = ROOT / "docs" / "dashboard.png"

# --- Drawing -------------------------------------------------------------------------------

BACKGROUND = "#111217"
PANEL = "#181b1f"
TEXT = "#ccccdc"
GRID = "#2c3235"
# Grafana's classic palette.
PALETTE = [
    "#7eb26d",
    "#eab839",
    "#6ed0e0",
    "#ef843c",
    "#e24d42",
    "#1f78c1",
    "#ba43a9",
    "#705da0",
    "#508642",
    "#cca300",
    "#447ebc",
    "#c15c17",
]


def _render(web: GraphiteWeb, dashboard: dict, title: str, now: datetime.datetime) -> list[dict]:
    """graphite-web's answer to every target of the panel titled ``title``."""
    series = []
    for panel, target, start in build_dashboard.panel_queries(dashboard, now):
        if panel["title"] == title:
            series += web.render(target, from_=start, until="now", max_data_points=800)
    return series


def _points(series: dict) -> tuple[list[datetime.datetime], list[float]]:
    pairs = [(ts, v) for v, ts in series["datapoints"] if v is not None]
    return [datetime.datetime.fromtimestamp(ts) for ts, _ in pairs], [v for _, v in pairs]


def _last(series: list[dict]) -> float | None:
    values = [v for s in series for v, _ in s["datapoints"] if v is not None]
    return values[-1] if values else None


def _style(ax, title: str, window: tuple[datetime.datetime, datetime.datetime] | None = None):
    import matplotlib.dates as mdates

    if window is not None:
        ax.set_xlim(*window)
    ax.set_facecolor(PANEL)
    ax.set_title(title, color=TEXT, loc="left", fontsize=11, pad=8)
    ax.tick_params(colors=TEXT, labelsize=8)
    ax.grid(color=GRID, linewidth=0.6)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if ax.xaxis.get_major_formatter().__class__.__name__ in ("AutoDateFormatter", "DateFormatter"):
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))


def _legend(ax) -> None:
    legend = ax.legend(loc="upper left", fontsize=8, frameon=False, ncol=4)
    for text in legend.get_texts():
        text.set_color(TEXT)


def device_table(series: Sequence[dict]) -> dict[str, dict[str, float]]:
    """What the table panel's transformations make of its series: the last
    value of each, its name's key=value pairs pivoted into {device: {column: value}}."""
    table: dict[str, dict[str, float]] = {}
    for item in series:
        fields = dict(pair.split("=", 1) for pair in item["target"].split(","))
        last = _last([item])
        if last is not None:
            table.setdefault(fields["device"], {})[fields["column"]] = last
    return table


@dataclass
class Canvas:
    """What every panel is drawn from: graphite-web, the dashboard, the moment."""

    web: GraphiteWeb
    dashboard: dict
    now: datetime.datetime
    hours: float
    money: str  # the currency sign of the cost panels

    @property
    def window(self) -> tuple[datetime.datetime, datetime.datetime]:
        return (self.now - datetime.timedelta(hours=self.hours), self.now)

    def render(self, title: str) -> list[dict]:
        return _render(self.web, self.dashboard, title, self.now)


def _table(ax, cells: list[list[str]], labels: list[str], fontsize: float, height: float):
    """A table in Grafana's colours, or None when there is nothing to show."""
    if not cells:
        return None
    drawn = ax.table(cellText=cells, colLabels=labels, loc="upper center")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(fontsize)
    drawn.scale(1, height)
    for cell in drawn.get_celld().values():
        cell.set_facecolor(PANEL)
        cell.set_edgecolor(GRID)
        cell.get_text().set_color(TEXT)
    return drawn


def draw_tiles(canvas: Canvas, figure, grid) -> None:
    """The stat tiles along the top, and a note on what is drawn."""
    money = canvas.money
    tiles = [
        ("Whole house now", "W", 0),
        ("Used today", "kWh", 2),
        ("Cost today", money, 2),
        ("Cost this week", money, 2),
        ("Cost this month", money, 2),
    ]
    for column, (title, unit, decimals) in enumerate(tiles):
        ax = figure.add_subplot(grid[0, column])
        ax.set_facecolor(PANEL)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        series = canvas.render(title)
        values = [(s["target"], _last([s])) for s in series if _last([s]) is not None]
        text = "   ".join(
            (f"{money}{v:,.{decimals}f}" if unit == money else f"{v:,.{decimals}f} {unit}")
            for _, v in values
        )
        ax.text(0.5, 0.45, text, color="#73bf69", fontsize=17, ha="center", va="center")
        if len(values) > 1:  # the two whole-house meters: say which is which
            names = "    ".join(name for name, _ in values)
            ax.text(0.5, 0.12, names, color=TEXT, fontsize=8, ha="center", va="center")
        ax.set_title(title, color=TEXT, fontsize=10, loc="left")
    ax = figure.add_subplot(grid[0, 5])
    ax.axis("off")
    variables = canvas.dashboard["templating"]["list"][1:]
    ax.text(
        0,
        0.5,
        "A simulated home, the real\ncollectors, a real carbon-cache\nand graphite-web.\n\n"
        + "\n".join(f"{v['label']}: {v['current']['value']}" for v in variables),
        color=TEXT,
        fontsize=8,
        va="center",
    )


def draw_whole_house(canvas: Canvas, ax) -> None:
    """Whole-house power, both meters."""
    styles = [{"linewidth": 3.2, "alpha": 0.7}, {"linewidth": 1.0, "linestyle": "--"}]
    for color, style, series in zip(PALETTE, styles, canvas.render("Whole-house power")):
        x, y = _points(series)
        ax.plot(x, y, color=color, label=series["target"], **style)
    _style(ax, f"Whole-house power (W), last {canvas.hours:g} h", canvas.window)
    _legend(ax)


def draw_energy_per_day(canvas: Canvas, ax) -> None:
    """Energy per day as bars, each day's cost on top."""
    energy = canvas.render("Energy per day, last 7 days")
    cost = canvas.render("Cost per day, last 7 days")
    if energy:
        days = [
            (datetime.datetime.fromtimestamp(ts), v)
            for v, ts in energy[0]["datapoints"]
            if v is not None
        ]
        costs = {ts: v for v, ts in cost[0]["datapoints"] if v is not None} if cost else {}
        labels = [day.strftime("%a %d") for day, _ in days]
        bars = ax.bar(labels, [v for _, v in days], color="#5794f2")
        for bar, (day, _) in zip(bars, days):
            paid = costs.get(int(day.timestamp()))
            if paid is not None:
                ax.annotate(
                    f"{canvas.money}{paid:.2f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    color=TEXT,
                    fontsize=8,
                )
    _style(ax, "Energy (kWh) and cost per day")


def draw_stacked_devices(canvas: Canvas, ax) -> None:
    """Power per device, stacked, the unmonitored load on top."""
    stacked = canvas.render("Power per device (stacked)")
    stamps = sorted({ts for s in stacked for _, ts in s["datapoints"]})
    layers = []
    for series in stacked:
        by_time = {ts: v for v, ts in series["datapoints"]}
        layers.append([by_time.get(ts) or 0.0 for ts in stamps])
    if stamps:
        ax.stackplot(
            [datetime.datetime.fromtimestamp(ts) for ts in stamps],
            layers,
            labels=[s["target"] for s in stacked],
            colors=[*(PALETTE * 3)[: len(stacked) - 1], "#464c54"],
            linewidth=0,
        )
    _style(ax, "Power per device, stacked, unmonitored load on top (W)", canvas.window)
    _legend(ax)


def draw_device_table(canvas: Canvas, ax) -> None:
    """Every device's watts now and kWh today, the busiest first."""
    ax.axis("off")
    ax.set_title("Devices now and today", color=TEXT, loc="left", fontsize=11)
    table = device_table(canvas.render("Devices now and today"))
    rows = sorted(table.items(), key=lambda item: -(item[1].get("watts") or 0))
    cells = [
        [device, f"{row.get('watts', 0):,.0f} W", f"{row.get('kwh_today', 0):.2f} kWh"]
        for device, row in rows
    ]
    _table(ax, cells, ["Device", "Watts now", "kWh today"], fontsize=8.5, height=1.25)


def draw_circuits(canvas: Canvas, ax) -> None:
    for color, series in zip(PALETTE[2:], canvas.render("Circuits")):
        x, y = _points(series)
        ax.plot(x, y, color=color, linewidth=1.1, label=series["target"])
    _style(ax, "Circuits (W)", canvas.window)
    _legend(ax)


def draw_health(canvas: Canvas, ax) -> None:
    """Each collector's health; a failing device in red."""
    ax.axis("off")
    ax.set_title("Collector health", color=TEXT, loc="left", fontsize=11)
    health: dict[str, dict[str, str]] = {}
    for title, key in (
        ("Devices answering", "ok"),
        ("Devices failing", "failed"),
        ("Newest point", "age"),
        ("Spool: lines waiting for Carbon", "spool"),
    ):
        for series in canvas.render(title):
            value = _last([series])
            if value is not None:
                shown = f"{value:.0f} s" if key == "age" else f"{value:.0f}"
                health.setdefault(series["target"], {})[key] = shown
    columns = ("ok", "failed", "age", "spool")
    cells = [
        [source, *(row.get(column, "-") for column in columns)]
        for source, row in sorted(health.items())
    ]
    labels = ["Collector", "Answering", "Failing", "Newest point", "Spooled"]
    drawn = _table(ax, cells, labels, fontsize=9, height=1.4)
    if drawn is not None:
        for (row, column), cell in drawn.get_celld().items():
            if row and column == 2 and cell.get_text().get_text() not in ("0", "-"):
                cell.get_text().set_color("#f2495c")


def draw(web: GraphiteWeb, dashboard: dict, out: Path, hours: float) -> None:
    """The dashboard's key panels, drawn with matplotlib from graphite-web's JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    currency = {"currencyGBP": "£", "currencyEUR": "€", "currencyUSD": "$"}
    cost_panel = next(p for p in dashboard["panels"] if p["title"] == "Cost today")
    canvas = Canvas(
        web,
        dashboard,
        datetime.datetime.now().astimezone(),
        hours,
        currency.get(cost_panel["fieldConfig"]["defaults"]["unit"], ""),
    )
    figure = plt.figure(figsize=(16, 13), facecolor=BACKGROUND)
    grid = figure.add_gridspec(
        4,
        6,
        height_ratios=[0.42, 1, 1.15, 1],
        hspace=0.42,
        wspace=0.35,
        left=0.04,
        right=0.99,
        top=0.94,
        bottom=0.03,
    )
    draw_tiles(canvas, figure, grid)
    draw_whole_house(canvas, figure.add_subplot(grid[1, :4]))
    draw_energy_per_day(canvas, figure.add_subplot(grid[1, 4:]))
    draw_stacked_devices(canvas, figure.add_subplot(grid[2, :4]))
    draw_device_table(canvas, figure.add_subplot(grid[2, 4:]))
    draw_circuits(canvas, figure.add_subplot(grid[3, :3]))
    draw_health(canvas, figure.add_subplot(grid[3, 3:]))
    figure.suptitle(
        "Home electricity: grafana/dashboards/home-electricity.json, queries rendered by "
        "graphite-web",
        color=TEXT,
        fontsize=13,
        x=0.01,
        ha="left",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80, facecolor=BACKGROUND, bbox_inches="tight")
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=6, help="detailed history (default 6)")
    parser.add_argument(
        "--days", type=float, default=7, help="days of meter history before it (default 7)"
    )
    parser.add_argument("--out", type=Path, default=OUTPUT, help="the PNG (docs/dashboard.png)")
    args = parser.parse_args(argv)
    if not 0 < args.hours <= 23:
        parser.error("--hours: 0 to 23 (the Glow display's readings are kept up to a day old)")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dashboard-png-")))
        web, _home, _end = stack.enter_context(filled_graphite(work, args.hours, args.days))
        filled = time.monotonic() - started
        draw(web, dashboard, args.out, args.hours)
    print(
        f"{args.out}: {args.hours:g} h of history ({args.days:g} days of meter before it) "
        f"filled in {filled:.0f} s, drawn in {time.monotonic() - started - filled:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
