#!/usr/bin/env python3
"""The Grafana dashboard and alert rules, built from the settings.

    .venv/bin/python tools/build_dashboard.py [--config FILE] [--out DIR]

writes ``DIR/dashboards/home-electricity.json`` and
``DIR/provisioning/alerting/home-electricity.yaml`` (DIR: this repository's
``grafana/``). What varies from home to home comes from the DASHBOARD_*
settings (config.py, config_local.py, the environment): which whole-house
meter counts, which devices sit behind another monitored one, the tariff's
defaults, the alert thresholds, and METRIC_PREFIX. The committed files are
built from the defaults; docs/grafana.md explains each panel's query.

Every query is plain Graphite (graphite-web 1.1.10 functions), so it can be
run and checked against a real graphite-web; tests/test_grafana.py does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from settings import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]

DASHBOARD_UID = "home-electricity"
DASHBOARD_FILE = Path("dashboards") / "home-electricity.json"
ALERTS_FILE = Path("provisioning") / "alerting" / "home-electricity.yaml"
ALERT_FOLDER = "Home electricity"
HOUSE_METERS = ("esp32", "glow")
# Grafana's expression engine (reduce, threshold) as an alert query's datasource.
EXPRESSION_UID = "__expr__"

# A summarize() bucket longer than any panel's range: one bucket, the whole range.
WHOLE_RANGE = "1y"
PLUG_STEP_S = 30  # the plugs' finest archive (graphite/storage-schemas.conf)
# A device's last power reading still counts in the sum this many points
# after it (plugs report every 30 s, the meter every 10 s: without it every
# moment between two plug readings would read as unmonitored load).
KEEP_LAST_POINTS = 3
_DEVICE_ID = re.compile(r"[a-z0-9_]+\.[a-z0-9_]+")


# --- Graphite queries ------------------------------------------------------------


class Queries:
    """The Graphite targets, for one METRIC_PREFIX and one home's settings.

    Paths (docs/design.md): ``<prefix>.<source>.<device>.<metric>``; the
    whole-house meter ``<prefix>.meter.<metric>``; health
    ``<prefix>.health.<source>.<metric>``.
    """

    def __init__(self, prefix: str, house_meter: str, nested_devices: Sequence[str]) -> None:
        self.prefix = prefix
        self.house_meter = house_meter
        self.nested_devices = tuple(nested_devices)
        self.source_node = len(prefix.split("."))  # node index of <source>
        self.device_node = self.source_node + 1

    def path(self, *segments: str) -> str:
        return ".".join((self.prefix, *segments))

    def _regex(self, *segments: str) -> str:
        # Character classes, not backslashes: they survive every layer of quoting.
        return "^" + "[.]".join((*self.prefix.split("."), *segments))

    # Whole house

    def house_power(self) -> str:
        if self.house_meter == "glow":
            return f"sumSeries({self.path('glow', '*', 'power_watts')})"
        return self.path("meter", "power_watts")

    def house_energy_counter(self) -> str:
        if self.house_meter == "glow":
            return self.path("glow", "*", "energy_import_kwh")
        return self.path("meter", "energy_kwh")

    def esp32_power(self) -> str:
        return self.path("meter", "power_watts")

    def glow_power(self) -> str:
        return f"sumSeries({self.path('glow', '*', 'power_watts')})"

    # Devices: every source's devices but the Glow displays (whole-house meters)

    def devices(self, metric: str) -> str:
        """``metric`` of every device (plugs, MQTT devices, circuits)."""
        return f"exclude({self.path('*', '*', metric)}, '{self._regex('glow')}[.]')"

    def counted_devices_power(self) -> str:
        """Power of the devices whose sum is the monitored load: nested ones left out."""
        left_out = ["glow[.][^.]+", *(d.replace(".", "[.]") for d in self.nested_devices)]
        pattern = self._regex(f"({'|'.join(left_out)})") + "[.]power_watts$"
        return f"exclude({self.path('*', '*', 'power_watts')}, '{pattern}')"

    def unmonitored_power(self) -> str:
        """Whole house minus the counted devices.

        aggregate's xFilesFactor 1: a moment with no meter reading is a gap,
        never "minus the devices". xFilesFactor 0 after it: when Grafana asks
        for fewer points than there are, one gap does not blank the whole
        consolidated point.
        """
        devices = f"sumSeries(keepLastValue({self.counted_devices_power()}, {KEEP_LAST_POINTS}))"
        return f"xFilesFactor(aggregate(group({self.house_power()}, {devices}), 'diff', 1), 0)"

    # Energy and cost from cumulative counters

    @staticmethod
    def energy_per_bucket(counters: str, bucket: str, total: bool = True) -> str:
        """kWh used in each ``bucket`` of the range, buckets starting at its start.

        keepLastValue bridges gaps, so the energy used during a gap is counted
        when readings return instead of being lost; nonNegativeDerivative
        skips a counter that went back (a replaced meter, a reset plug).
        """
        used = f"nonNegativeDerivative(keepLastValue({counters}))"
        if total:
            used = f"sumSeries({used})"
        return f"summarize({used}, '{bucket}', 'sum', true)"

    def house_energy(self, bucket: str = WHOLE_RANGE) -> str:
        return self.energy_per_bucket(self.house_energy_counter(), bucket)

    def house_cost_per_day(self) -> str:
        """Money per day: the day's kWh at the unit rate plus the standing charge."""
        return f"offset(scale({self.house_energy('1d')}, $unit_rate), $standing_charge)"

    def house_cost(self) -> str:
        """Money over the whole range, each day's standing charge included."""
        return f"summarize({self.house_cost_per_day()}, '{WHOLE_RANGE}', 'sum', true)"

    def device_energy(self, bucket: str = WHOLE_RANGE) -> str:
        return self.energy_per_bucket(self.devices("energy_kwh"), bucket, total=False)

    # Health

    def health(self, metric: str) -> str:
        return self.path("health", "*", metric)

    def newest_point_age(self) -> str:
        """Seconds since each collector's newest health point (about ±10 s).

        For each source: the timestamp of each point it sent, carried forward
        (keepLastValue), subtracted from the time itself (timeFunction); none
        before its first point. Consolidated by 'last' so Grafana's
        maxDataPoints shows the newest age, not an average over the bucket.
        """
        stamps = "multiplySeries(isNonNull(%.devices_ok), timeFunction('t', 10))"
        newest = f"keepLastValue(removeBelowValue({stamps}, 1))"
        age = f"xFilesFactor(aggregate(group(timeFunction('now', 10), {newest}), 'diff', 1), 0)"
        per_source = (
            f"applyByNode({self.health('devices_ok')}, {self.device_node}, "
            f"\"{age}\", '%.age_seconds')"
        )
        return f"aliasByNode(consolidateBy({per_source}, 'last'), {self.device_node})"

    # Silence, for the alerts: points each series sent within the range

    @staticmethod
    def points_in_range(series: str) -> str:
        return f"summarize(isNonNull({series}), '{WHOLE_RANGE}', 'sum', true)"

    def device_points(self) -> str:
        """Per device (and per whole-house meter): points it sent within the range."""
        everything = f"exclude({self.path('*', '*', '*')}, '{self._regex('health')}[.]')"
        devices = (
            f"groupByNodes({self.points_in_range(everything)}, 'max', "
            f"{self.source_node}, {self.device_node})"
        )
        meters = self.points_in_range(self.path("meter*", "*"))
        meters = f"groupByNode({meters}, {self.source_node}, 'max')"
        return f"group({devices}, {meters})"

    def collector_points(self) -> str:
        """Per collector: health points it sent within the range."""
        return (
            f"groupByNode({self.points_in_range(self.health('devices_ok'))}, "
            f"{self.device_node}, 'max')"
        )


def alias(series: str, name: str) -> str:
    return f"alias({series}, '{name}')"


def per_interval(series: str) -> str:
    """Averages over Grafana's ``$__interval``, on boundaries shared by every
    series: stacked series must share timestamps (plugs report every 30 s,
    circuits every 10 s; Grafana stacks a missing point as a dip to zero)."""
    return f"summarize({series}, '$__interval', 'avg')"


# --- Dashboard pieces -----------------------------------------------------------------

DATASOURCE = {"type": "graphite", "uid": "${datasource}"}


def _target(ref_id: str, expression: str) -> dict[str, Any]:
    return {"refId": ref_id, "target": expression, "datasource": DATASOURCE}


def _thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


GREEN = _thresholds((None, "green"))


def _panel(
    kind: str,
    title: str,
    description: str,
    targets: list[str],
    unit: str,
    *,
    decimals: int | None = None,
    thresholds: dict[str, Any] = GREEN,
    options: dict[str, Any] | None = None,
    custom: dict[str, Any] | None = None,
    time_from: str | None = None,
    interval: str | None = None,
    transformations: list[dict[str, Any]] | None = None,
    mappings: list[dict[str, Any]] | None = None,
    no_value: str | None = None,
) -> dict[str, Any]:
    """One panel; its position is set by ``_layout``."""
    defaults: dict[str, Any] = {"unit": unit, "thresholds": thresholds}
    if decimals is not None:
        defaults["decimals"] = decimals
    if custom is not None:
        defaults["custom"] = custom
    if mappings is not None:
        defaults["mappings"] = mappings
    if no_value is not None:
        defaults["noValue"] = no_value
    defaults["color"] = (
        {"mode": "thresholds"} if thresholds is not GREEN else {"mode": "palette-classic"}
    )
    panel: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [_target(chr(ord("A") + i), t) for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
    }
    if time_from is not None:
        panel["timeFrom"] = time_from
    if interval is not None:
        panel["interval"] = interval  # the shortest $__interval Grafana may ask for
    if transformations:
        panel["transformations"] = transformations
    return panel


def _stat(title: str, description: str, targets: list[str], unit: str, **kwargs: Any):
    options = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "none",
        "justifyMode": "auto",
        "textMode": "auto",
        "orientation": "auto",
    }
    return _panel("stat", title, description, targets, unit, options=options, **kwargs)


def _timeseries(
    title: str,
    description: str,
    targets: list[str],
    unit: str,
    *,
    stacked: bool = False,
    bars: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 80 if bars else (60 if stacked else 10),
        "showPoints": "never",
        # Plugs report every 30 s: draw through the empty 10 s slots between.
        "spanNulls": 120000,
        "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
    }
    if bars:
        custom["barAlignment"] = 1  # a day's bar starts at its midnight
    options = {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return _panel(
        "timeseries", title, description, targets, unit, custom=custom, options=options, **kwargs
    )


def _row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def _layout(rows: list[tuple[dict[str, Any] | None, list[tuple[dict[str, Any], int, int]]]]):
    """Panels with ids and grid positions: each row a header and (panel, width, height)s."""
    panels: list[dict[str, Any]] = []
    y = 0
    for header, row in rows:
        if header is not None:
            header["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            panels.append(header)
            y += 1
        x = 0
        for panel, width, height in row:
            panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
            panels.append(panel)
            x += width
        y += max((height for _, _, height in row), default=0)
    for panel_id, panel in enumerate(panels, start=1):
        panel["id"] = panel_id
    return panels


def _variables(settings: Any) -> list[dict[str, Any]]:
    def textbox(name: str, label: str, value: float, description: str) -> dict[str, Any]:
        text = f"{value:g}"
        return {
            "type": "textbox",
            "name": name,
            "label": label,
            "description": description,
            "query": text,
            "current": {"text": text, "value": text},
            "options": [{"text": text, "value": text, "selected": True}],
            "hide": 0,
        }

    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Graphite",
            "query": "graphite",
            "current": {"text": "Graphite", "value": settings.dashboard_datasource_uid},
            "hide": 0,
            "refresh": 1,
            "regex": "",
        },
        textbox(
            "unit_rate",
            "Unit rate (per kWh)",
            settings.dashboard_unit_rate,
            "Price of one kWh, in the dashboard's currency",
        ),
        textbox(
            "standing_charge",
            "Standing charge (per day)",
            settings.dashboard_standing_charge,
            "Fixed charge per day, in the dashboard's currency",
        ),
    ]


def build_dashboard(settings: Any) -> dict[str, Any]:
    """The dashboard JSON (Grafana's schema; no ``id``, so any Grafana takes it)."""
    q = queries_for(settings)
    money = settings.dashboard_currency_unit
    meter_name = "ESP32 pulse reader" if q.house_meter == "esp32" else "Glow display"
    panels = _layout(
        [
            (None, _now_row(q, money, meter_name)),
            (None, _house_row(q, money, meter_name)),
            (_row("Devices"), _devices_row(q)),
            (_row("Circuits"), _circuits_row(q, meter_name)),
            (_row("Collector health"), _health_row(q)),
        ]
    )
    return {
        "uid": DASHBOARD_UID,
        "title": "Home electricity",
        "description": "Whole house, devices, circuits, costs and collector health "
        "(home electricity monitoring; built by tools/build_dashboard.py).",
        "tags": ["electricity", "home"],
        "timezone": "browser",
        "weekStart": "monday",
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {"refresh_intervals": ["30s", "1m", "5m", "15m", "1h"]},
        "refresh": "1m",
        "schemaVersion": 39,
        "version": 1,
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": _variables(settings)},
        "panels": panels,
    }


def _now_row(q: Queries, money: str, meter_name: str) -> list[tuple[dict[str, Any], int, int]]:
    """Whole house now, used and cost today, this week, this month."""
    return [
        (
            _stat(
                "Whole house now",
                "The ESP32 pulse reader and the Glow display side by side (each shows "
                "only if you have it).",
                [
                    alias(q.esp32_power(), "ESP32 meter"),
                    alias(q.glow_power(), "Glow display"),
                ],
                "watt",
                decimals=0,
                time_from="now-15m",
            ),
            6,
            5,
        ),
        (
            _stat(
                "Used today",
                f"kWh since midnight, from the {meter_name}'s counter.",
                [alias(q.house_energy(), "today")],
                "kwatth",
                decimals=2,
                time_from="now/d",
            ),
            4,
            5,
        ),
        (
            _stat(
                "Cost today",
                "Today's kWh at the unit rate plus today's standing charge (the "
                "dashboard's variables).",
                [alias(q.house_cost(), "today")],
                money,
                decimals=2,
                time_from="now/d",
            ),
            4,
            5,
        ),
        (
            _stat(
                "Cost this week",
                "Since Monday: each day's kWh at the unit rate plus its standing charge.",
                [alias(q.house_cost(), "this week")],
                money,
                decimals=2,
                time_from="now/w",
            ),
            5,
            5,
        ),
        (
            _stat(
                "Cost this month",
                "Since the 1st: each day's kWh at the unit rate plus its standing charge.",
                [alias(q.house_cost(), "this month")],
                money,
                decimals=2,
                time_from="now/M",
            ),
            5,
            5,
        ),
    ]


def _house_row(q: Queries, money: str, meter_name: str) -> list[tuple[dict[str, Any], int, int]]:
    """Whole-house power from both meters, energy and cost per day."""
    day_bars = {"bars": True, "time_from": "now-6d/d"}
    return [
        (
            _timeseries(
                "Whole-house power",
                "Both whole-house meters side by side: they should agree.",
                [
                    alias(q.esp32_power(), "ESP32 pulse reader"),
                    alias(q.glow_power(), "Glow display"),
                ],
                "watt",
            ),
            12,
            8,
        ),
        (
            _timeseries(
                "Energy per day, last 7 days",
                f"kWh per day from the {meter_name}'s counter (days from local midnight).",
                [alias(q.house_energy("1d"), "kWh")],
                "kwatth",
                decimals=1,
                **day_bars,
            ),
            6,
            8,
        ),
        (
            _timeseries(
                "Cost per day, last 7 days",
                "Each day's kWh at the unit rate plus the standing charge.",
                [alias(q.house_cost_per_day(), "cost")],
                money,
                decimals=2,
                **day_bars,
            ),
            6,
            8,
        ),
    ]


def _devices_row(q: Queries) -> list[tuple[dict[str, Any], int, int]]:
    """Every device's power stacked up to the whole house, and the device table."""
    return [
        (
            _timeseries(
                "Power per device (stacked)",
                "Every monitored device (plugs, MQTT devices, circuits) stacked, devices "
                "behind another monitored one left out (DASHBOARD_NESTED_DEVICES), and the "
                "unmonitored rest on top: the stack's top is the whole house.",
                [
                    f"aliasByNode({per_interval(q.counted_devices_power())}, {q.device_node})",
                    alias(per_interval(q.unmonitored_power()), "unmonitored"),
                ],
                "watt",
                stacked=True,
                interval=f"{PLUG_STEP_S}s",
            ),
            15,
            10,
        ),
        (
            _device_table(q),
            9,
            10,
        ),
    ]


def _circuits_row(q: Queries, meter_name: str) -> list[tuple[dict[str, Any], int, int]]:
    """Power and today's energy per circuit, and the load nothing monitors."""
    return [
        (
            _timeseries(
                "Circuits",
                "Power per metered circuit; negative is export.",
                [f"aliasByNode({q.path('circuit', '*', 'power_watts')}, {q.device_node})"],
                "watt",
            ),
            10,
            8,
        ),
        (
            _panel(
                "bargauge",
                "Circuits today",
                "kWh per circuit since midnight, from each meter's import counter.",
                [
                    f"aliasByNode({q.energy_per_bucket(q.path('circuit', '*', 'energy_kwh'), WHOLE_RANGE, total=False)}, {q.device_node})"  # noqa: E501
                ],
                "kwatth",
                decimals=2,
                time_from="now/d",
                options={
                    "displayMode": "gradient",
                    "orientation": "horizontal",
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "showUnfilled": True,
                },
            ),
            6,
            8,
        ),
        (
            _timeseries(
                "Unmonitored load",
                f"The {meter_name}'s whole-house power minus the sum of the monitored "
                "devices: what no plug or circuit meter sees.",
                [alias(q.unmonitored_power(), "unmonitored")],
                "watt",
            ),
            8,
            8,
        ),
    ]


def _health_row(q: Queries) -> list[tuple[dict[str, Any], int, int]]:
    """Each collector's devices, newest point and spool."""
    return [
        (
            _stat(
                "Devices answering",
                "Devices that answered each collector's last cycle.",
                [f"aliasByNode({q.health('devices_ok')}, {q.device_node})"],
                "none",
                decimals=0,
                time_from="now-1h",
            ),
            6,
            5,
        ),
        (
            _stat(
                "Devices failing",
                "Devices that did not answer each collector's last cycle.",
                [f"aliasByNode({q.health('devices_failed')}, {q.device_node})"],
                "none",
                decimals=0,
                time_from="now-1h",
                thresholds=_thresholds((None, "green"), (1, "red")),
            ),
            6,
            5,
        ),
        (
            _stat(
                "Newest point",
                "Seconds since each collector last reported (about ±10 s); 'over a day' "
                "when it sent nothing in the last 24 hours.",
                [q.newest_point_age()],
                "s",
                decimals=0,
                time_from="now-24h",
                thresholds=_thresholds((None, "green"), (120, "orange"), (600, "red")),
                no_value="over a day",
                mappings=[
                    {
                        "type": "special",
                        "options": {
                            "match": "null",
                            "result": {"text": "over a day", "color": "red"},
                        },
                    }
                ],
            ),
            6,
            5,
        ),
        (
            _timeseries(
                "Spool: lines waiting for Carbon",
                "Lines each collector keeps on disk while Carbon is unreachable; they are "
                "sent, oldest first, once it answers.",
                [f"aliasByNode({q.health('spool_lines')}, {q.device_node})"],
                "short",
            ),
            6,
            5,
        ),
    ]


def _device_table(q: Queries) -> dict[str, Any]:
    """One row per device, its watts now and its kWh today.

    Graphite returns one series per device and figure; each series is named
    ``device=<source.device>,column=<figure>`` so Grafana can take the name
    apart (extractFields, key=value pairs) and pivot the figures into columns
    (groupingToMatrix).
    """

    def named(series: str, column: str) -> str:
        by_device = f"aliasByNode({series}, {q.source_node}, {q.device_node})"
        return f"aliasSub(aliasSub({by_device}, '^', 'device='), '$', ',column={column}')"

    return _panel(
        "table",
        "Devices now and today",
        "Watts now and kWh since midnight per device (from each device's own energy "
        "counter; nested devices included).",
        [named(q.devices("power_watts"), "watts"), named(q.device_energy(), "kwh_today")],
        "none",
        decimals=2,
        time_from="now/d",
        options={"showHeader": True, "sortBy": [{"displayName": "Watts now", "desc": True}]},
        transformations=[
            {
                "id": "reduce",
                "options": {"mode": "seriesToRows", "reducers": ["lastNotNull"]},
            },
            {
                "id": "extractFields",
                "options": {"source": "Field", "format": "kvp", "replace": False},
            },
            {
                "id": "groupingToMatrix",
                "options": {"columnField": "column", "rowField": "device", "valueField": "Last *"},
            },
            {
                "id": "organize",
                "options": {
                    "renameByName": {
                        "device\\column": "Device",
                        "watts": "Watts now",
                        "kwh_today": "kWh today",
                    }
                },
            },
        ],
    )


# --- Alert rules ---------------------------------------------------------------------------


def _alert_rule(
    uid: str,
    title: str,
    summary: str,
    target: str,
    range_s: float,
    reducer: str,
    threshold: tuple[str, float],
    settings: Any,
    no_data: str = "NoData",
) -> dict[str, Any]:
    """A Grafana-managed rule: Graphite query A, reduced to B, compared in C."""
    evaluator, value = threshold
    return {
        "uid": uid,
        "title": title,
        "condition": "C",
        "data": [
            {
                "refId": "A",
                "relativeTimeRange": {"from": int(range_s), "to": 0},
                "datasourceUid": settings.dashboard_datasource_uid,
                "model": {"refId": "A", "target": target},
            },
            {
                "refId": "B",
                "datasourceUid": EXPRESSION_UID,
                "model": {
                    "refId": "B",
                    "type": "reduce",
                    "expression": "A",
                    "reducer": reducer,
                    "settings": {"mode": "dropNN"},
                },
            },
            {
                "refId": "C",
                "datasourceUid": EXPRESSION_UID,
                "model": {
                    "refId": "C",
                    "type": "threshold",
                    "expression": "B",
                    "conditions": [{"evaluator": {"type": evaluator, "params": [value]}}],
                },
            },
        ],
        "noDataState": no_data,
        "execErrState": "Error",
        "for": "0s",
        "annotations": {"summary": summary},
        "labels": {"project": "home-electricity"},
        "isPaused": False,
    }


def build_alert_rules(settings: Any) -> dict[str, Any]:
    """Grafana's file-provisioned alert rules (unified alerting, apiVersion 1)."""
    q = queries_for(settings)
    silent_s = settings.dashboard_alert_silent_s
    high_s = settings.dashboard_alert_high_power_s
    watts = settings.dashboard_alert_high_power_watts
    rules = [
        _alert_rule(
            "he-device-silent",
            "A device is silent",
            f"Nothing from this device or meter for {silent_s / 60:g} minutes: "
            "{{ $labels.name }}",
            q.device_points(),
            silent_s,
            "last",
            ("lt", 1),
            settings,
        ),
        _alert_rule(
            "he-collector-silent",
            "A collector is silent",
            f"No health figures from this collector for {silent_s / 60:g} minutes: "
            "{{ $labels.name }}",
            q.collector_points(),
            silent_s,
            "last",
            ("lt", 1),
            settings,
        ),
        _alert_rule(
            "he-house-power-high",
            "Whole-house power high",
            f"Whole-house power has stayed above {watts:g} W for {high_s / 60:g} minutes.",
            alias(q.house_power(), "house"),
            high_s,
            # The lowest reading of the window above the threshold: above it all along.
            "min",
            ("gt", watts),
            settings,
            no_data="OK",
        ),
    ]
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": "home-electricity",
                "folder": ALERT_FOLDER,
                "interval": "1m",
                "rules": rules,
            }
        ],
    }


# --- What Grafana asks Graphite for ----------------------------------------------------------

_GRAFANA_TIME = re.compile(r"now(?:-(\d+)([smhdwMy]))?(?:/([dwMy]))?")
_GRAPHITE_UNITS = {"s": "s", "m": "min", "h": "h", "d": "d", "w": "w", "M": "mon", "y": "y"}


def graphite_from(grafana_time: str, now: datetime.datetime) -> str:
    """Grafana's relative time as the ``from=`` Grafana sends Graphite.

    ``now-6h`` becomes ``-6h``; a rounded one (``now/d``, ``now-6d/d``,
    ``now/w``, ``now/M``) becomes the epoch second of that local midnight,
    in ``now``'s time zone (weeks start on Monday, as the dashboard says).
    """
    match = _GRAFANA_TIME.fullmatch(grafana_time)
    if match is None:
        raise ValueError(f"not a relative Grafana time: {grafana_time!r}")
    amount, unit, rounding = match.groups()
    if rounding is None:
        return f"-{amount}{_GRAPHITE_UNITS[unit]}" if amount else "now"
    start = now
    if amount:
        if unit not in "smhdw":
            raise ValueError(f"rounded times are shifted by s, m, h, d or w: {grafana_time!r}")
        seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
        start = now - datetime.timedelta(seconds=int(amount) * seconds)
    start = start.replace(hour=0, minute=0, second=0, microsecond=0)
    if rounding == "w":
        start -= datetime.timedelta(days=start.weekday())
    elif rounding == "M":
        start = start.replace(day=1)
    elif rounding == "y":
        start = start.replace(month=1, day=1)
    return str(int(start.timestamp()))


# Grafana's kbn.roundInterval: (below this many seconds, use this interval).
_ROUNDED_INTERVALS = [
    (1.5, 1),
    (3.5, 2),
    (7.5, 5),
    (12.5, 10),
    (17.5, 15),
    (25, 20),
    (45, 30),
    (90, 60),
    (210, 120),
    (450, 300),
    (750, 600),
    (1050, 900),
    (1500, 1200),
    (2700, 1800),
    (5400, 3600),
    (9000, 7200),
    (16200, 10800),
    (32400, 21600),
    (86400, 43200),
    (604800, 86400),
    (1814400, 604800),
    (3628800, 2592000),
]


def grafana_interval(range_s: float, max_data_points: int, min_interval: str = "") -> str:
    """``$__interval`` as Grafana sends it to Graphite: the range over the panel's
    points, rounded as Grafana rounds it, no finer than the panel's ``interval``."""
    raw_s = range_s / max_data_points
    seconds = next((chosen for below, chosen in _ROUNDED_INTERVALS if raw_s < below), 31536000)
    if min_interval:
        amount, unit = re.fullmatch(r"(\d+)([smhd])", min_interval).groups()
        seconds = max(seconds, int(amount) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])
    for unit_s, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds % unit_s == 0:
            return f"{seconds // unit_s}{unit}"
    return f"{seconds}s"


def expand_variables(target: str, dashboard: dict[str, Any], interval: str = "") -> str:
    """``target`` as Grafana sends it: the dashboard's variables at their current
    values, ``$__interval`` as given."""
    values = {
        v["name"]: str(v.get("current", {}).get("value", ""))
        for v in dashboard["templating"]["list"]
    }
    if interval:
        values["__interval"] = interval
    for name, value in values.items():
        name = re.escape(name)
        pattern = rf"\$\{{{name}\}}|\[\[{name}\]\]|\${name}\b"
        target = re.sub(pattern, value.replace("\\", "\\\\"), target)
    return target


def panel_queries(dashboard: dict[str, Any], now: datetime.datetime, max_data_points: int = 1000):
    """(panel, Graphite target, from) for every target of every panel, as Grafana
    asks graphite-web for them when ``max_data_points`` fit across the panel."""
    default_from = dashboard["time"]["from"]
    for panel in dashboard["panels"]:
        start = graphite_from(panel.get("timeFrom", default_from), now)
        range_s = now.timestamp() - int(start) if start.isdigit() else -_graphite_offset_s(start)
        interval = grafana_interval(range_s, max_data_points, panel.get("interval", ""))
        for target in panel.get("targets", []):
            yield panel, expand_variables(target["target"], dashboard, interval), start


def _graphite_offset_s(offset: str) -> int:
    """'-6h' -> -21600 (the units graphite_from writes)."""
    sign, amount, unit = re.fullmatch(r"(-?)(\d+)([a-z]+)", offset).groups()
    seconds = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 604800, "mon": 2592000, "y": 31536000}
    return int(amount) * seconds[unit] * (-1 if sign else 1)


# --- Settings and files -----------------------------------------------------------------


def queries_for(settings: Any) -> Queries:
    """The queries for these settings. Raises ConfigError on a bad DASHBOARD_ setting."""
    if settings.dashboard_house_meter not in HOUSE_METERS:
        raise ConfigError(
            f"DASHBOARD_HOUSE_METER: must be one of {', '.join(HOUSE_METERS)}, "
            f"got {settings.dashboard_house_meter!r}"
        )
    for device in settings.dashboard_nested_devices:
        if not isinstance(device, str) or not _DEVICE_ID.fullmatch(device):
            raise ConfigError(
                'DASHBOARD_NESTED_DEVICES: each must be "<source>.<device>" as in the '
                f'metric paths (e.g. "kasa.monitor"), got {device!r}'
            )
    for name in ("dashboard_unit_rate", "dashboard_standing_charge"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{name.upper()}: must not be negative")
    if not settings.dashboard_datasource_uid.strip():
        raise ConfigError("DASHBOARD_DATASOURCE_UID: must not be empty")
    return Queries(
        settings.metric_prefix, settings.dashboard_house_meter, settings.dashboard_nested_devices
    )


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Keys YAML 1.1 (PyYAML, Go's yaml.v2) would read as booleans or null.
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def to_yaml(value: Any, indent: int = 0) -> str:
    """YAML for plain data (dicts, lists, strings, numbers, booleans).

    Strings are JSON-quoted, which YAML reads as the same string. Written
    here so building needs nothing beyond the runtime requirements.
    """
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}\n"
        out = ""
        for key, item in value.items():
            plain = _PLAIN_KEY.fullmatch(key) and key.lower() not in _YAML_WORDS
            name = key if plain else _yaml_string(key)
            if isinstance(item, (dict, list)) and item:
                out += f"{pad}{name}:\n{to_yaml(item, indent + 2)}"
            else:
                out += f"{pad}{name}: {to_yaml(item).strip()}\n"
        return out
    if isinstance(value, list):
        if not value:
            return "[]\n"
        out = ""
        for item in value:
            if isinstance(item, (dict, list)) and item:
                out += f"{pad}- " + to_yaml(item, indent + 2).lstrip()
            else:
                out += f"{pad}- {to_yaml(item).strip()}\n"
        return out
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} has no place in a provisioning file")
        mantissa, e, exponent = repr(value).partition("e")
        # YAML 1.1 (PyYAML, older Grafana) reads 1e+16 as a string: it wants a dot.
        return mantissa + ("" if "." in mantissa else ".0") + e + exponent
    return _yaml_string(str(value))


def _yaml_string(text: str) -> str:
    """A double-quoted YAML scalar: JSON's quoting, and YAML's escapes for what
    YAML does not allow raw (or would read as a line break)."""

    def plain(char: str) -> bool:
        code = ord(char)
        if code in (0x2028, 0x2029, 0xFEFF) or 0xD800 <= code <= 0xDFFF:
            return False
        return 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xFFFD or code >= 0x10000

    return "".join(
        char
        if plain(char)
        else (f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
        for char in json.dumps(text, ensure_ascii=False)
    )


def write_files(settings: Any, out_dir: Path) -> list[Path]:
    """Build both files into ``out_dir``; returns their paths."""
    dashboard = json.dumps(build_dashboard(settings), indent=2) + "\n"
    alerts = (
        "# Grafana alert rules (unified alerting), written by tools/build_dashboard.py\n"
        "# from the DASHBOARD_* settings: edit those and run it again.\n"
        + to_yaml(build_alert_rules(settings))
    )
    written = []
    for relative, text in ((DASHBOARD_FILE, dashboard), (ALERTS_FILE, alerts)):
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", metavar="FILE", help="local settings (default config_local.py)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=ROOT / "grafana",
        help="where dashboards/ and provisioning/alerting/ go (default: grafana/)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(local_path=args.config)
        written = write_files(settings, args.out)
    except ConfigError as exc:
        print(f"build_dashboard: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
