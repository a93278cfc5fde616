"""The Grafana dashboard and alert rules (tools/build_dashboard.py, grafana/).

The dashboard validates against Grafana's JSON Schema; every query of every
panel and alert rule runs against a real graphite-web and carbon-cache
(graphite/'s storage configs) that the real collectors filled from a
simulated home (simulators/home_history.py), and the numbers
that come back are checked against what the simulated devices did.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import json
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from carbon_client import CarbonClient
from graphite_helper import format_line
from harness.carbon import CarbonNotFoundError
from harness.graphite_web import GraphiteWeb, GraphiteWebNotFoundError, graphite_module_file
from harness.mosquitto import MosquittoNotFoundError
from settings import ConfigError, load_settings
from simulators.home import (
    GLOW_ID,
    LAMP_SILENT_S,
    NESTED_DEVICES,
    device_loads,
    house_load,
    unmonitored_load,
)
from simulators.home_history import SimulatedHome, filled_graphite
from tools import build_dashboard
from tools.render_dashboard_png import device_table

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
DASHBOARD_PATH = GRAFANA / "dashboards" / "home-electricity.json"
ALERTS_PATH = GRAFANA / "provisioning" / "alerting" / "home-electricity.yaml"
DATASOURCES_PATH = GRAFANA / "provisioning" / "datasources" / "graphite.yaml"
PROVIDERS_PATH = GRAFANA / "provisioning" / "dashboards" / "home-electricity.yaml"
HISTORY_HOURS = 0.25  # 15 minutes of backdated history: enough for every panel
METER = "home.electricity.meter.energy_kwh"
GLOW_IMPORT = f"home.electricity.glow.{GLOW_ID.lower()}.energy_import_kwh"
RETIRED_AGE_S = 1200  # a collector that stopped 20 minutes ago


def settings_with(**overrides: Any) -> Any:
    """The defaults (no config_local.py, no environment) with ``overrides``."""
    return load_settings(env={}, local_path=os.devnull, overrides=overrides)


def committed_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


# --- The files as Grafana reads them ---------------------------------------------------------


def test_the_dashboard_validates_against_grafanas_schema(fixtures_dir: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((fixtures_dir / "grafana" / "dashboard.jsonschema.json").read_text())
    for dashboard in (
        committed_dashboard(),
        build_dashboard.build_dashboard(
            settings_with(DASHBOARD_HOUSE_METER="glow", DASHBOARD_NESTED_DEVICES=NESTED_DEVICES)
        ),
    ):
        jsonschema.Draft7Validator.check_schema(schema)
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(dashboard), key=str)
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def test_ids_uid_datasource_and_layout() -> None:
    dashboard = committed_dashboard()
    assert "id" not in dashboard
    assert dashboard["uid"] == "home-electricity"
    assert 8 <= len(dashboard["uid"]) <= 40
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) for i in ids)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource_uid = yaml.safe_load(DATASOURCES_PATH.read_text())["datasources"][0]["uid"]
    assert variables["datasource"]["current"]["value"] == datasource_uid
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "graphite", "uid": "${datasource}"}
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells


def test_the_committed_files_are_what_the_tool_builds_from_the_defaults(tmp_path: Path) -> None:
    """Rebuild after changing the tool or a DASHBOARD_ default:
    .venv/bin/python tools/build_dashboard.py --config /dev/null"""
    written = build_dashboard.write_files(settings_with(), tmp_path)
    for path in written:
        committed = GRAFANA / path.relative_to(tmp_path)
        assert path.read_text() == committed.read_text(), f"{committed} is out of date"


def test_the_tool_writes_both_files_and_refuses_bad_settings(tmp_path: Path, capsys) -> None:
    local = tmp_path / "config_local.py"
    local.write_text('DASHBOARD_NESTED_DEVICES = ["kasa.monitor"]\n')
    assert build_dashboard.main(["--config", str(local), "--out", str(tmp_path / "out")]) == 0
    built = json.loads((tmp_path / "out" / "dashboards" / "home-electricity.json").read_text())
    assert "kasa[.]monitor" in json.dumps(built)
    assert yaml.safe_load((tmp_path / "out" / build_dashboard.ALERTS_FILE).read_text())
    local.write_text('DASHBOARD_NESTED_DEVICES = ["monitor"]\n')
    assert build_dashboard.main(["--config", str(local), "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "DASHBOARD_NESTED_DEVICES" in error
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"DASHBOARD_HOUSE_METER": "smart meter"}, "DASHBOARD_HOUSE_METER"),
        ({"DASHBOARD_NESTED_DEVICES": ["kasa.tv.extra"]}, "DASHBOARD_NESTED_DEVICES"),
        ({"DASHBOARD_NESTED_DEVICES": ["Kasa.TV"]}, "DASHBOARD_NESTED_DEVICES"),
        ({"DASHBOARD_UNIT_RATE": -0.1}, "DASHBOARD_UNIT_RATE"),
        ({"DASHBOARD_DATASOURCE_UID": " "}, "DASHBOARD_DATASOURCE_UID"),
    ],
)
def test_bad_dashboard_settings_name_themselves(overrides: dict, setting: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        build_dashboard.build_dashboard(settings_with(**overrides))


def test_another_metric_prefix_moves_every_node_index() -> None:
    dashboard = build_dashboard.build_dashboard(settings_with(METRIC_PREFIX="power.at.home"))
    targets = [t["target"] for panel in panels_of(dashboard) for t in panel["targets"]]
    assert not [t for t in targets if "home.electricity" in t]
    circuits = next(p for p in panels_of(dashboard) if p["title"] == "Circuits")
    assert circuits["targets"][0]["target"] == "aliasByNode(power.at.home.circuit.*.power_watts, 4)"
    alerts = build_dashboard.build_alert_rules(settings_with(METRIC_PREFIX="power.at.home"))
    assert "^power[.]at[.]home[.]health[.]" in json.dumps(alerts)


def test_alert_rules_are_well_formed_unified_alerting() -> None:
    provisioned = yaml.safe_load(ALERTS_PATH.read_text())
    datasources = yaml.safe_load(DATASOURCES_PATH.read_text())["datasources"]
    datasource_uids = {datasource["uid"] for datasource in datasources}
    assert provisioned["apiVersion"] == 1
    (group,) = provisioned["groups"]
    assert group["name"]
    assert group["folder"]
    assert re.fullmatch(r"\d+[smh]", group["interval"])
    uids = [rule["uid"] for rule in group["rules"]]
    assert len(uids) == len(set(uids)) == 3
    assert all(len(uid) <= 40 for uid in uids)
    for rule in group["rules"]:
        queries = {query["refId"]: query for query in rule["data"]}
        assert rule["condition"] in queries
        assert rule["noDataState"] in ("NoData", "Alerting", "OK")
        assert rule["execErrState"] in ("Error", "Alerting", "OK")
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["annotations"]["summary"]
        for ref_id, query in queries.items():
            assert query["model"]["refId"] == ref_id
            if query["datasourceUid"] == build_dashboard.EXPRESSION_UID:
                assert query["model"]["type"] in ("reduce", "threshold", "math")
                assert query["model"]["expression"] in queries
            else:
                assert query["datasourceUid"] in datasource_uids
                assert query["relativeTimeRange"]["from"] > 0
                assert query["model"]["target"]


def test_provisioning_files() -> None:
    (datasource,) = yaml.safe_load(DATASOURCES_PATH.read_text())["datasources"]
    assert datasource["type"] == "graphite"
    assert datasource["access"] == "proxy"
    assert datasource["uid"] == settings_with().dashboard_datasource_uid
    assert datasource["jsonData"]["graphiteVersion"] == "1.1"
    (provider,) = yaml.safe_load(PROVIDERS_PATH.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


_yaml_scalars = (
    st.text(max_size=20)
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
)
_yaml_data = st.recursive(
    _yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.from_regex(r"[a-zA-Z]\w{0,8}", fullmatch=True), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True), _yaml_data))
def test_the_yaml_writer_round_trips(data: dict) -> None:
    assert yaml.safe_load(build_dashboard.to_yaml(data)) == data


def test_grafana_times_and_intervals_as_grafana_sends_them() -> None:
    now = datetime.datetime(2026, 11, 26, 14, 30, tzinfo=datetime.timezone.utc)  # a Thursday
    midnight = int(datetime.datetime(2026, 11, 26, tzinfo=datetime.timezone.utc).timestamp())
    assert build_dashboard.graphite_from("now-6h", now) == "-6h"
    assert build_dashboard.graphite_from("now-15m", now) == "-15min"
    assert build_dashboard.graphite_from("now/d", now) == str(midnight)
    assert build_dashboard.graphite_from("now-6d/d", now) == str(midnight - 6 * 86400)
    assert build_dashboard.graphite_from("now/w", now) == str(midnight - 3 * 86400)
    assert build_dashboard.graphite_from("now/M", now) == str(midnight - 25 * 86400)
    assert build_dashboard.grafana_interval(6 * 3600, 1000, "30s") == "30s"
    assert build_dashboard.grafana_interval(86400, 1000, "30s") == "1min"
    assert build_dashboard.grafana_interval(30 * 86400, 1000, "30s") == "30min"
    target = "offset(scale(x, $unit_rate), ${standing_charge}) summarize(y, '$__interval')"
    assert build_dashboard.expand_variables(target, committed_dashboard(), "1min") == (
        "offset(scale(x, 0.245), 0.6) summarize(y, '1min')"
    )


# --- The queries against a real graphite-web, filled by the real collectors --------------------


class Filled(NamedTuple):
    web: GraphiteWeb
    home: SimulatedHome
    end: int


_NOT_INSTALLED = (CarbonNotFoundError, GraphiteWebNotFoundError, MosquittoNotFoundError)


@pytest.fixture(scope="module")
def filled(tmp_path_factory, fixtures_dir: Path) -> Iterator[Filled]:
    """carbon-cache (graphite/'s storage configs), graphite-web and Mosquitto,
    with 15 minutes of a simulated home's history in them, then one --once
    run of the polling collectors; plus the health of a collector that
    stopped 20 minutes ago. A missing server skips (or, with
    ELECTRICITY_REQUIRE_SERVERS=1, fails) like the conftest fixtures."""
    work = tmp_path_factory.mktemp("grafana")
    with contextlib.ExitStack() as stack:
        try:
            web, home, end = stack.enter_context(
                filled_graphite(work, HISTORY_HOURS, 0, fixtures_dir)
            )
        except _NOT_INSTALLED as exc:
            if os.environ.get("ELECTRICITY_REQUIRE_SERVERS"):
                raise
            pytest.skip(str(exc))
        retired = "home.electricity.health.retired.devices_ok"
        client = CarbonClient([home.carbon.line_address])
        assert client.send_lines([format_line(retired, 1, end - RETIRED_AGE_S)])
        home.carbon.wait_for_points(retired)
        yield Filled(web, home, end)


def render(filled: Filled, target: str, start: str, until: str = "now") -> list[dict]:
    return filled.web.render(target, from_=start, until=until, max_data_points=1000)


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def day_start(filled: Filled, now: datetime.datetime) -> datetime.datetime:
    """Midnight, or the history's start when midnight was minutes ago (so the
    test does not depend on the time of day it runs)."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    history_start = datetime.datetime.fromtimestamp(
        filled.end - HISTORY_HOURS * 3600, datetime.timezone.utc
    )
    return min(midnight, history_start)


def queries(filled: Filled, dashboard: dict) -> Iterator[tuple[dict, str, str]]:
    """(panel, target, from) as Grafana would ask them, 'now/d' kept past the history's start."""
    now = now_utc()
    for panel, target, start in build_dashboard.panel_queries(dashboard, now):
        if panel.get("timeFrom") == "now/d":
            start = str(int(day_start(filled, now).timestamp()))
        yield panel, target, start


def panel_series(filled: Filled, dashboard: dict, title: str) -> list[dict]:
    series = []
    for panel, target, start in queries(filled, dashboard):
        if panel["title"] == title:
            series += render(filled, target, start)
    assert series, f"{title}: no series"
    return series


def last(series: dict) -> float:
    values = [value for value, _ in series["datapoints"] if value is not None]
    assert values, f"{series['target']}: no values"
    return values[-1]


def by_name(series: list[dict]) -> dict[str, float]:
    return {item["target"]: last(item) for item in series}


def dashboards() -> dict[str, dict]:
    return {
        "committed": committed_dashboard(),
        "nested, glow": build_dashboard.build_dashboard(
            settings_with(DASHBOARD_HOUSE_METER="glow", DASHBOARD_NESTED_DEVICES=NESTED_DEVICES)
        ),
    }


def test_the_collectors_ran_as_users_run_them(filled: Filled) -> None:
    for source, (status, log) in filled.home.once_results.items():
        assert status == 0, f"{source}_to_graphite.py --once:\n{log}"
    assert filled.home.push_results == {"esp32": 0, "mqtt": 0}
    paths = set(filled.home.carbon.metric_paths())
    for expected in (
        "home.electricity.kasa.office.power_watts",
        "home.electricity.tuya.washing_machine.energy_kwh",
        "home.electricity.circuit.ev_charger.l3_power_watts",
        "home.electricity.meter.power_kw",
        f"home.electricity.glow.{GLOW_ID.lower()}.power_watts",
        "home.electricity.health.mqtt.devices_ok",
    ):
        assert expected in paths


def graphite_functions() -> set[str]:
    """Names of the render functions of the installed graphite-web (its
    /functions page breaks on Python 3.11, so read its SeriesFunctions table)."""
    tree = ast.parse(graphite_module_file("graphite.render.functions").read_text("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SeriesFunctions":
            return {key.value for key in node.value.keys}
    raise AssertionError("no SeriesFunctions in graphite.render.functions")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["committed", "nested, glow"])
def test_every_panel_query_returns_data(filled: Filled, name: str) -> None:
    functions = graphite_functions()
    failures = []
    for panel, target, start in queries(filled, dashboards()[name]):
        used = set(re.findall(r"([A-Za-z]\w*)\(", target))
        unknown = used - functions
        if unknown:
            failures.append(f"{panel['title']}: not in graphite-web 1.1.10: {sorted(unknown)}")
            continue
        series = render(filled, target, start)
        empty = [s["target"] for s in series if all(v is None for v, _ in s["datapoints"])]
        if not series or empty:
            failures.append(f"{panel['title']}: {target} from {start}: empty {empty}")
    assert not failures, "\n".join(failures)


def test_whole_house_now_both_meters(filled: Filled) -> None:
    now = by_name(panel_series(filled, committed_dashboard(), "Whole house now"))
    expected = house_load(0)
    assert now["ESP32 meter"] == pytest.approx(expected, rel=0.02)  # from pulse intervals
    assert now["Glow display"] == pytest.approx(expected, abs=1)


def test_unmonitored_load_leaves_nested_devices_out(filled: Filled) -> None:
    """The office plug measures the monitor behind it: counting both would
    take the monitor off the unmonitored load twice."""
    expected = unmonitored_load(0)
    monitor = device_loads(0)["Monitor"]
    nested = dashboards()["nested, glow"]
    assert last(panel_series(filled, nested, "Unmonitored load")[0]) == pytest.approx(
        expected, abs=1
    )
    committed = last(panel_series(filled, committed_dashboard(), "Unmonitored load")[0])
    assert committed == pytest.approx(expected - monitor, abs=0.03 * expected)


def test_the_stack_adds_up_to_the_whole_house(filled: Filled) -> None:
    stacked = panel_series(filled, dashboards()["nested, glow"], "Power per device (stacked)")
    assert "monitor" not in {s["target"] for s in stacked}
    # One grid of timestamps for all (plugs every 30 s, circuits every 10 s):
    # Grafana stacks a series missing at a timestamp as a dip to zero.
    assert len({ts % 30 for s in stacked for _, ts in s["datapoints"]}) == 1
    unmonitored = next(s for s in stacked if s["target"] == "unmonitored")
    newest = max(ts for value, ts in unmonitored["datapoints"] if value is not None)
    total = sum(
        value
        for s in stacked
        for value, ts in s["datapoints"]
        if ts == newest and value is not None
    )
    assert total == pytest.approx(house_load(0), abs=1)


def energy_per_day(filled: Filled, counter: str, start: int) -> list[float]:
    """kWh per day since ``start`` from a counter's stored points, as the
    dashboard means it: each rise counted at the reading that shows it, days
    from ``start``. Read straight from whisper, which picks the archive for
    the window as graphite-web does (a month comes from the 1 min one)."""
    points = filled.home.carbon.fetch(counter, from_ts=start)
    points = [(ts, value) for ts, value in points if ts > start]  # graphite-web's (from, until]
    days: dict[int, float] = {}
    for (_, before), (ts, after) in zip(points, points[1:]):
        if after >= before:
            days[(ts - start) // 86400] = days.get((ts - start) // 86400, 0.0) + after - before
    return [days[day] for day in sorted(days)]


@pytest.mark.parametrize(("name", "counter"), [("committed", METER), ("nested, glow", GLOW_IMPORT)])
def test_todays_energy_and_costs(filled: Filled, name: str, counter: str) -> None:
    dashboard = dashboards()[name]
    tariff = {v["name"]: float(v["current"]["value"]) for v in dashboard["templating"]["list"][1:]}
    now = now_utc()
    for title, grafana_from in (
        ("Used today", "now/d"),
        ("Cost today", "now/d"),
        ("Cost this week", "now/w"),
        ("Cost this month", "now/M"),
    ):
        start = (
            int(day_start(filled, now).timestamp())
            if grafana_from == "now/d"
            else int(build_dashboard.graphite_from(grafana_from, now))
        )
        days = energy_per_day(filled, counter, start)
        if title == "Used today":
            expected = sum(days)
        else:
            expected = sum(kwh * tariff["unit_rate"] + tariff["standing_charge"] for kwh in days)
        got = last(panel_series(filled, dashboard, title)[0])
        assert got == pytest.approx(expected, rel=1e-9), title
    used = last(panel_series(filled, dashboard, "Used today")[0])
    assert used > 0.3  # about 2.5 kW for 15 minutes
    daily = panel_series(filled, dashboard, "Energy per day, last 7 days")[0]
    if day_start(filled, now) == now.replace(hour=0, minute=0, second=0, microsecond=0):
        assert last(daily) == pytest.approx(used, rel=1e-9)  # today's bar


def test_device_table_watts_now_and_kwh_today(filled: Filled) -> None:
    table = device_table(panel_series(filled, committed_dashboard(), "Devices now and today"))
    loads = device_loads(0)
    names = {
        "kasa.kettle": "Kettle",
        "kasa.fridge": "Fridge",
        "kasa.office": "Office",
        "kasa.monitor": "Monitor",
        "tuya.washing_machine": "Washing machine",
        "tuya.freezer": "Freezer",
        "circuit.heat_pump": "Heat pump",
        "circuit.ev_charger": "EV charger",
    }
    assert set(table) == {*names, "kasa.lamp"}
    start = int(day_start(filled, now_utc()).timestamp())
    for device, row in table.items():
        # The lamp has been unplugged: its last reading stays.
        watts = (
            device_loads(LAMP_SILENT_S)["Lamp"] if device == "kasa.lamp" else loads[names[device]]
        )
        assert row["watts"] == pytest.approx(watts, abs=0.05), device
        used = sum(energy_per_day(filled, f"home.electricity.{device}.energy_kwh", start))
        assert row["kwh_today"] == pytest.approx(used, abs=1e-9), device


def test_circuits_today(filled: Filled) -> None:
    today = by_name(panel_series(filled, committed_dashboard(), "Circuits today"))
    start = int(day_start(filled, now_utc()).timestamp())
    used = sum(energy_per_day(filled, "home.electricity.circuit.heat_pump.energy_kwh", start))
    assert today["heat_pump"] == pytest.approx(used, rel=1e-9)
    assert today["heat_pump"] > 0.2
    assert today["ev_charger"] == 0


def test_collector_health(filled: Filled) -> None:
    dashboard = committed_dashboard()
    answering = by_name(panel_series(filled, dashboard, "Devices answering"))
    assert answering == {"circuit": 2, "esp32": 1, "kasa": 4, "mqtt": 1, "tuya": 2, "retired": 1}
    failing = by_name(panel_series(filled, dashboard, "Devices failing"))
    # The unplugged lamp, a KASA_HOSTS entry that does not answer, is a failing
    # device (issue 12, item 7), not an absent one.
    assert {source: n for source, n in failing.items() if n} == {"kasa": 1}
    spooled = by_name(panel_series(filled, dashboard, "Spool: lines waiting for Carbon"))
    assert set(spooled.values()) == {0}
    ages = by_name(panel_series(filled, dashboard, "Newest point"))
    since_end = time.time() - filled.end
    for source in ("circuit", "esp32", "kasa", "mqtt", "tuya"):
        assert 0 <= ages[source] <= since_end + 20, source
    assert RETIRED_AGE_S - 20 <= ages["retired"] <= RETIRED_AGE_S + since_end + 20


# --- The alert rules, evaluated as Grafana does, on the same data ------------------------------


def evaluate(filled: Filled, rule: dict) -> dict[str, bool]:
    """Each series of the rule's Graphite query -> firing? (Grafana's reduce and
    threshold expressions, with their dropNN mode.)"""
    queries = {query["refId"]: query for query in rule["data"]}
    (graphite,) = [
        q for q in queries.values() if q["datasourceUid"] != build_dashboard.EXPRESSION_UID
    ]
    start = f"-{graphite['relativeTimeRange']['from']}s"
    values = {}
    for series in render(filled, graphite["model"]["target"], start):
        numbers = [v for v, _ in series["datapoints"] if v is not None and not math.isnan(v)]
        values[series["target"]] = numbers
    reduce_step = next(q["model"] for q in queries.values() if q["model"].get("type") == "reduce")
    threshold = queries[rule["condition"]]["model"]
    evaluator = threshold["conditions"][0]["evaluator"]
    reducer = {"last": lambda v: v[-1], "min": min, "max": max, "mean": lambda v: sum(v) / len(v)}
    compare = {"gt": lambda a, b: a > b, "lt": lambda a, b: a < b}
    return {
        name: bool(numbers)
        and compare[evaluator["type"]](
            reducer[reduce_step["reducer"]](numbers), evaluator["params"][0]
        )
        for name, numbers in values.items()
    }


def rule(settings: Any, uid: str) -> dict:
    rules = build_dashboard.build_alert_rules(settings)["groups"][0]["rules"]
    return next(r for r in rules if r["uid"] == uid)


def test_a_silent_device_fires_and_the_others_do_not(filled: Filled) -> None:
    provisioned = yaml.safe_load(ALERTS_PATH.read_text())["groups"][0]["rules"]
    firing = evaluate(filled, next(r for r in provisioned if r["uid"] == "he-device-silent"))
    assert firing.pop("kasa.lamp") is True
    assert firing.pop("meter") is False
    assert len(firing) == 9, firing  # 8 devices and the Glow display
    assert not any(firing.values()), firing


def test_a_silent_collector_fires_and_the_others_do_not(filled: Filled) -> None:
    provisioned = yaml.safe_load(ALERTS_PATH.read_text())["groups"][0]["rules"]
    firing = evaluate(filled, next(r for r in provisioned if r["uid"] == "he-collector-silent"))
    assert firing == {
        "circuit": False,
        "esp32": False,
        "kasa": False,
        "mqtt": False,
        "tuya": False,
        "retired": True,
    }


@pytest.mark.parametrize(
    ("house_meter", "path"),
    [
        ("esp32", "home.electricity.meter.power_watts"),
        ("glow", f"home.electricity.glow.{GLOW_ID.lower()}.power_watts"),
    ],
)
def test_high_power_fires_only_when_above_the_threshold_all_along(
    filled: Filled, house_meter: str, path: str
) -> None:
    window_s = 600
    now = int(time.time())
    # The window's lowest reading, give or take a reading at either edge.
    lows = [
        min(value for _, value in filled.home.carbon.fetch(path, from_ts=now - window_s + shift))
        for shift in (-20, 20)
    ]
    for watts, fires in ((min(lows) * 0.97, True), (max(lows) * 1.03, False), (8000.0, False)):
        settings = settings_with(
            DASHBOARD_HOUSE_METER=house_meter,
            DASHBOARD_ALERT_HIGH_POWER_WATTS=watts,
            DASHBOARD_ALERT_HIGH_POWER_S=float(window_s),
        )
        assert evaluate(filled, rule(settings, "he-house-power-high")) == {"house": fires}, watts
