"""graphite/storage-schemas.conf and storage-aggregation.conf: carbon's own
loader reads them, a real carbon-cache starts with them, and the whisper
files it creates for the collectors' metrics have the retentions and the
aggregation each metric needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import settings
from carbon_client import CarbonClient
from graphite_helper import format_line
from harness.carbon import CarbonNotFoundError, CarbonServer, find_carbon_python

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "graphite" / "storage-schemas.conf"
AGGREGATION = ROOT / "graphite" / "storage-aggregation.conf"

DAY_S = 86400
PLAN = [(10, 7 * DAY_S), (60, 30 * DAY_S), (600, 365 * DAY_S)]  # 10 s/7 d, 1 min/30 d, 10 min/1 y
PLUGS = [(30, 7 * DAY_S), (60, 30 * DAY_S), (600, 365 * DAY_S)]

# metric -> ((seconds per point, retention seconds) of each archive, xFilesFactor, method)
EXPECTED = {
    "home.electricity.kasa.kettle.power_watts": (PLUGS, 0.0, "average"),
    "home.electricity.kasa.kettle.energy_kwh": (PLUGS, 0.0, "max"),
    "home.electricity.kasa.kettle.energy_today_kwh": (PLUGS, 0.0, "last"),
    "home.electricity.kasa.kettle.is_on": (PLUGS, 0.0, "max"),
    "home.electricity.tuya.freezer.voltage_volts": (PLUGS, 0.0, "average"),
    "home.electricity.tuya.freezer.energy_kwh": (PLUGS, 0.0, "max"),
    "home.electricity.meter.power_kw": (PLAN, 0.0, "average"),
    "home.electricity.meter.power_watts": (PLAN, 0.0, "average"),
    "home.electricity.meter.energy_kwh": (PLAN, 0.0, "max"),
    "home.electricity.meter.pulses_total": (PLAN, 0.0, "max"),
    "home.electricity.meter.rssi": (PLAN, 0.0, "average"),
    "home.electricity.glow.1a2b3c4d5e6f.power_watts": (PLAN, 0.0, "average"),
    "home.electricity.glow.1a2b3c4d5e6f.energy_import_kwh": (PLAN, 0.0, "max"),
    "home.electricity.glow.1a2b3c4d5e6f.energy_today_kwh": (PLAN, 0.0, "last"),
    "home.electricity.circuit.ev_charger.l1_power_watts": (PLAN, 0.0, "average"),
    "home.electricity.circuit.ev_charger.energy_export_kwh": (PLAN, 0.0, "max"),
    "home.electricity.circuit.heat_pump.power_factor": (PLAN, 0.0, "average"),
    "home.electricity.mqtt.washer.power_watts": (PLAN, 0.0, "average"),
    "home.electricity.health.kasa.devices_failed": (PLAN, 0.0, "max"),
    "home.electricity.health.esp32.spool_lines": (PLAN, 0.0, "max"),
    "home.electricity.health.mqtt.metrics_sent": (PLAN, 0.0, "max"),
    "home.gas.glow.1a2b3c4d5e6f.volume_m3": (PLAN, 0.0, "max"),
    "home.gas.glow.1a2b3c4d5e6f.energy_kwh": (PLAN, 0.0, "max"),
    "someone.elses.metric": ([(60, DAY_S)], 0.5, "average"),
}


# Run by the Python that runs carbon-cache: PyPI's carbon in this venv (Python
# <= 3.11), Debian's with the system Python elsewhere. It prints, per metric,
# the archives and aggregation carbon's own storage module gives it.
_CARBON_STORAGE_SCRIPT = """
import json, sys
from carbon.conf import settings
settings["CONF_DIR"] = sys.argv[1]
import carbon.storage as storage
storage.STORAGE_SCHEMAS_CONFIG = sys.argv[2]
storage.STORAGE_AGGREGATION_CONFIG = sys.argv[3]
schemas = storage.loadStorageSchemas()
aggregations = storage.loadAggregationSchemas()
def first(found, metric):
    return next(item for item in found if item.matches(metric))
json.dump({
    "schemas": [schema.name for schema in schemas],
    "metrics": {
        metric: [
            [archive.getTuple() for archive in first(schemas, metric).archives],
            list(first(aggregations, metric).archives),
        ]
        for metric in sys.argv[4:]
    },
}, sys.stdout)
"""


@pytest.fixture(scope="module")
def carbon_storage() -> dict:
    """What carbon's own storage module makes of the two files in graphite/."""
    try:
        python = find_carbon_python()
    except CarbonNotFoundError as exc:
        if os.environ.get("ELECTRICITY_REQUIRE_SERVERS"):
            raise
        pytest.skip(str(exc))
    loaded = subprocess.run(
        [
            python,
            "-c",
            _CARBON_STORAGE_SCRIPT,
            str(SCHEMAS.parent),
            str(SCHEMAS),
            str(AGGREGATION),
            *EXPECTED,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loaded.returncode == 0, loaded.stderr
    return json.loads(loaded.stdout)


def test_carbon_loads_both_files_and_every_metric_gets_its_archives(carbon_storage) -> None:
    import whisper

    assert carbon_storage["schemas"][:4] == [
        "carbon",
        "home_electricity_plugs",
        "home_electricity",
        "home_gas",
    ]
    for metric, (archives, xff, method) in EXPECTED.items():
        got, aggregation = carbon_storage["metrics"][metric]
        assert [(step, step * points) for step, points in got] == archives, metric
        whisper.validateArchiveList([tuple(archive) for archive in got])
        assert tuple(aggregation) == (xff, method), metric


def test_the_finest_archive_matches_each_collectors_interval() -> None:
    """Plugs every PLUG_INTERVAL_S, circuits every CIRCUIT_INTERVAL_S, the ESP32
    every POST_INTERVAL_S of its firmware (the Glow display every 10 s)."""
    from esp32 import config_example as firmware

    defaults = settings.defaults()
    plug_step = EXPECTED["home.electricity.kasa.kettle.power_watts"][0][0][0]
    meter_step = EXPECTED["home.electricity.meter.power_watts"][0][0][0]
    circuit_step = EXPECTED["home.electricity.circuit.heat_pump.power_factor"][0][0][0]
    assert plug_step == defaults["PLUG_INTERVAL_S"]
    assert circuit_step == defaults["CIRCUIT_INTERVAL_S"]
    assert meter_step == firmware.POST_INTERVAL_S


@pytest.mark.slow
def test_carbon_cache_starts_with_them_and_writes_files_to_match(start_server, tmp_path) -> None:
    import whisper

    carbon = start_server(
        CarbonServer(tmp_path / "carbon", storage_schemas=SCHEMAS, storage_aggregation=AGGREGATION)
    )
    now = int(time.time())
    client = CarbonClient([carbon.line_address], timeout_s=5)
    assert client.send_lines([format_line(metric, 1.5, now) for metric in EXPECTED])
    for metric, (archives, xff, method) in EXPECTED.items():
        carbon.wait_for_points(metric)
        info = whisper.info(str(carbon.wsp_path(metric)))
        got = [(a["secondsPerPoint"], a["retention"]) for a in info["archives"]]
        assert got == archives, metric
        assert (info["xFilesFactor"], info["aggregationMethod"]) == (xff, method), metric
        assert info["maxRetention"] == archives[-1][1]


@pytest.mark.slow
def test_a_minute_of_plug_readings_rolls_up_whole(start_server, tmp_path) -> None:
    """xFilesFactor 0: one 30 s reading in a minute still makes the minute's
    point (whisper's default 0.5 would need both), and counters keep the
    minute's largest value."""
    import whisper

    carbon = start_server(
        CarbonServer(tmp_path / "carbon", storage_schemas=SCHEMAS, storage_aggregation=AGGREGATION)
    )
    power = "home.electricity.kasa.kettle.power_watts"
    energy = "home.electricity.kasa.kettle.energy_kwh"
    minute = int(time.time()) // 600 * 600 - 600  # a whole minute, well within a day
    lines = [
        format_line(power, 2000.0, minute),
        format_line(power, 1000.0, minute + 30),
        format_line(energy, 10.25, minute),
        format_line(energy, 10.5, minute + 30),
        format_line(power, 500.0, minute + 60),  # alone in its minute
    ]
    assert CarbonClient([carbon.line_address], timeout_s=5).send_lines(lines)
    carbon.wait_for_points(power, count=3)
    carbon.wait_for_points(energy, count=2)

    def minute_points(metric: str) -> list:
        # A window longer than the 30 s archive's 7 days is answered from the 1 min one.
        (start, _end, step), values = whisper.fetch(
            str(carbon.wsp_path(metric)), minute - 8 * DAY_S, minute + 120
        )
        assert step == 60
        return [v for i, v in enumerate(values) if start + i * step in (minute, minute + 60)]

    assert minute_points(power) == [1500.0, 500.0]
    assert minute_points(energy)[0] == 10.5


@pytest.mark.slow
def test_existing_whisper_files_are_converted_and_keep_their_data(tmp_path) -> None:
    """graphite/apply_to_existing.py: carbon's default (1 min for a day, average,
    xFilesFactor 0.5) becomes what the two files say; other metrics are left alone."""
    import whisper

    whisper_dir = tmp_path / "whisper"
    minute = int(time.time()) // 60 * 60 - 600
    for metric in EXPECTED:
        path = whisper_dir.joinpath(*metric.split(".")).with_suffix(".wsp")
        path.parent.mkdir(parents=True, exist_ok=True)
        whisper.create(str(path), [(60, 1440)], xFilesFactor=0.5, aggregationMethod="average")
        whisper.update_many(str(path), [(minute, 42.5), (minute + 60, 43.5)])
    script = ROOT / "graphite" / "apply_to_existing.py"
    dry = subprocess.run(
        [sys.executable, str(script), "--dry-run", str(whisper_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert dry.stdout.splitlines()[-1] == f"{len(EXPECTED) - 1} files to convert"
    assert (
        whisper.info(str(whisper_dir / "home/electricity/meter/energy_kwh.wsp"))[
            "aggregationMethod"
        ]
        == "average"
    )  # a dry run changes nothing
    run = [sys.executable, str(script), str(whisper_dir)]
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout.endswith(
        f"{len(EXPECTED) - 1} files converted\n"
    )
    for metric, (archives, xff, method) in EXPECTED.items():
        path = str(whisper_dir.joinpath(*metric.split(".")).with_suffix(".wsp"))
        info = whisper.info(path)
        if metric == "someone.elses.metric":  # not ours: as carbon made it
            assert [(a["secondsPerPoint"], a["retention"]) for a in info["archives"]] == [
                (60, DAY_S)
            ]
            continue
        assert [(a["secondsPerPoint"], a["retention"]) for a in info["archives"]] == archives
        assert (info["xFilesFactor"], info["aggregationMethod"]) == (xff, method), metric
        (_start, _end, _step), values = whisper.fetch(path, minute - 8 * DAY_S)
        assert [v for v in values if v is not None][-2:] == [42.5, 43.5], metric
    again = subprocess.run(run, capture_output=True, text=True, check=True)
    assert again.stdout == "0 files converted\n"
