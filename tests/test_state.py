"""Stable names, the energy integrator and the state lock."""

from __future__ import annotations

import json

import pytest

from state import EnergyIntegrator, NameMap, StateLock, atomic_write_json


def test_first_name_is_kept_after_a_rename(tmp_path):
    path = tmp_path / "names.json"
    names = NameMap(path)
    assert names.name_for("50:C7:BF:00:00:01", "Kettle") == "kettle"
    # The user renames the plug in the phone app; its history must not split.
    assert NameMap(path).name_for("50:C7:BF:00:00:01", "Tea maker") == "kettle"


def test_config_override_wins(tmp_path):
    names = NameMap(tmp_path / "names.json", {"50:c7:bf:00:00:01": "Hot Water"})
    assert names.name_for("50:C7:BF:00:00:01", "Kettle") == "hot_water"


def test_two_devices_never_share_a_name(tmp_path):
    names = NameMap(tmp_path / "names.json")
    first = names.name_for("id-1", "Plug")
    second = names.name_for("id-2", "Plug")
    assert first == "plug" and second != first and second.startswith("plug_")


def test_unusable_name_falls_back_to_id(tmp_path):
    assert NameMap(tmp_path / "n.json").name_for("AB:CD", "💡") == "abcd"


def test_corrupt_names_file_is_not_overwritten_with_nothing(tmp_path):
    path = tmp_path / "names.json"
    path.write_text("{not json")
    names = NameMap(path)
    assert path.read_text() == "{not json"  # nothing written until there is a name
    names.name_for("id-1", "Plug")
    assert json.loads(path.read_text()) == {"id-1": "plug"}


def test_dry_run_map_writes_nothing(tmp_path):
    NameMap(None).name_for("id", "Plug")
    assert not list(tmp_path.iterdir())


def test_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_integrator_trapezoids_and_gaps(tmp_path):
    path = tmp_path / "energy.json"
    energy = EnergyIntegrator(path, max_gap_s=3600)
    assert energy.add("plug", 1000, 1000.0) == 0.0
    # 1 kW to 2 kW over one hour: mean 1.5 kW -> 1.5 kWh.
    assert energy.add("plug", 4600, 2000.0) == pytest.approx(1.5)
    # A gap longer than max_gap_s is not bridged.
    assert energy.add("plug", 4600 + 7200, 2000.0) == pytest.approx(1.5)
    # A repeated sample adds nothing.
    assert energy.add("plug", 4600 + 7200, 9000.0) == pytest.approx(1.5)
    energy.save()
    assert EnergyIntegrator(path, max_gap_s=3600).total_kwh("plug") == pytest.approx(1.5)


def test_integrator_rejects_non_finite():
    with pytest.raises(ValueError):
        EnergyIntegrator(None, 60).add("p", 1, float("nan"))


def test_second_lock_fails(tmp_path):
    first, second = StateLock(tmp_path / "lock"), StateLock(tmp_path / "lock")
    assert first.acquire()
    try:
        assert not second.acquire()
    finally:
        first.release()
    assert second.acquire()
    second.release()


def test_override_takes_a_name_from_the_device_that_had_it(tmp_path):
    path = tmp_path / "names.json"
    NameMap(path).name_for("id-1", "Meter")
    names = NameMap(path, {"id-2": "meter"})
    assert names.name_for("id-2", "x") == "meter"
    assert names.name_for("id-1", "Meter") == "meter_id_1"
