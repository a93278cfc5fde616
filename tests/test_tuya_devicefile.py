"""tuya_devicefile: the wizard's devices.json in both forms, bad entries left
out alone (never showing a key), per-device settings."""

from __future__ import annotations

import json

import pytest

import tuya_devicefile as devicefile
import tuya_scaling as scaling
from settings import ConfigError
from simulators.tuya import PLUG_MAPPING
from tests.helpers import TUYA_KEY, by_name

# --- devices.json -------------------------------------------------------------------


def test_both_wizard_forms_load_the_same(tmp_path, fixtures_dir):
    raw = json.loads((fixtures_dir / "tuya" / "devices.json").read_text(encoding="utf-8"))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"devices": raw}), encoding="utf-8")
    listed, _ = devicefile.load_devices_file(fixtures_dir / "tuya" / "devices.json")
    assert devicefile.load_devices_file(wrapped) == (listed, [])
    assert len(listed) == 21
    kettle = by_name(listed, "Kettle")
    assert (kettle.ip, kettle.version, kettle.port, kettle.category) == (
        "127.0.0.13",
        "3.4",
        6668,
        "cz",
    )
    assert by_name(listed, "Main Oven").version == ""  # no address, no version


def test_bad_entries_are_left_out_with_a_reason_and_never_the_key():
    entries, problems = devicefile.parse_devices(
        [
            {"id": "a1", "name": "Good", "key": TUYA_KEY, "ip": "127.0.0.1", "version": 3.3},
            {"name": "No id", "key": TUYA_KEY},
            {"id": "a2", "name": "Bad version", "key": TUYA_KEY, "version": "2.9"},
            {"id": "a1", "name": "Twice", "key": TUYA_KEY},
            "not an object",
        ]
    )
    assert [e.name for e in entries] == ["Good"]
    assert entries[0].version == "3.3"
    assert len(problems) == 4
    assert "No id" in problems[0]
    assert "2.9" in problems[1]
    assert "twice" in problems[2]
    assert not any(TUYA_KEY in problem for problem in problems)
    assert TUYA_KEY not in repr(entries[0])


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not found"), ("{not json", "not valid JSON"), ('{"x": 1}', "expected a list")],
)
def test_unusable_devices_file_is_a_config_error(tmp_path, content, message):
    path = tmp_path / "devices.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as info:
        devicefile.load_devices_file(path)
    assert str(info.value).startswith("TUYA_DEVICES_FILE:")


def test_sub_devices_are_marked(wizard):
    assert by_name(wizard, "Diivoo smart dual water timer").node_id == "3980b14ccbf2c6ef"
    assert [e.name for e in wizard if e.node_id] == ["Diivoo smart dual water timer"]


def test_per_device_settings_match_id_or_name(wizard):
    kettle = by_name(wizard, "Kettle")
    assert devicefile.lookup({"kettle ": "127.0.0.9"}, kettle) == "127.0.0.9"
    assert devicefile.lookup({kettle.id: "a", "Kettle": "b"}, kettle) == "a"
    assert devicefile.matches(["KETTLE"], kettle)
    assert not devicefile.matches(["Shed"], kettle)


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"mapping": {"19": {"code": ["cur_power"]}}}, "mapping DP 19: code is a list"),
        ({"mapping": {"19": {"code": {"x": 1}}}}, "mapping DP 19: code is an object"),
        ({"mapping": {"19": {"code": 19}}}, "mapping DP 19: code is a number"),
        ({"mapping": {"19": {"code": "cur_power", "values": [1]}}}, "values is a list"),
        ({"mapping": {"19": {"code": "cur_power", "type": 3}}}, "type is a number"),
        ({"mapping": {"19": ["cur_power"]}}, "mapping DP 19: is a list"),
        ({"mapping": ["cur_power"]}, "mapping is a list"),
        ({"key": 1234567890123456}, "key is a number"),
        ({"name": ["Kettle"]}, "name is a list"),
        ({"ip": 127}, "ip is a number"),
        ({"category": ["cz"]}, "category is a list"),
        ({"product_id": True}, "product_id is true/false"),
        ({"node_id": {"a": 1}}, "node_id is an object"),
    ],
)
def test_a_wrong_type_anywhere_leaves_out_only_that_entry(fields, said):
    good = {"id": "a1", "name": "Good", "key": TUYA_KEY, "mapping": PLUG_MAPPING, "category": "cz"}
    bad = {"id": "a2", "name": "Bad", "key": TUYA_KEY, "category": "cz", **fields}
    entries, problems = devicefile.parse_devices([bad, good])
    assert [entry.id for entry in entries] == ["a1"]
    assert len(problems) == 1
    assert said in problems[0]
    assert "left out" in problems[0]
    assert not any(TUYA_KEY in problem or "1234567890123456" in problem for problem in problems)
    # The good entry is planned as usual (the bad one would have raised here).
    assert scaling.plan_for(entries[0]).measures_power


def test_null_fields_are_as_good_as_missing():
    entry = devicefile.parse_entry(
        {"id": "a1", "key": None, "name": None, "ip": None, "mapping": None, "category": None}
    )
    assert (entry.key, entry.name, entry.ip, entry.category, dict(entry.mapping)) == (
        "",
        "a1",
        "",
        "",
        {},
    )
