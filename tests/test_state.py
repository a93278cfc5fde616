"""Stable names, the energy integrator and the state lock."""

from __future__ import annotations

import json

import pytest

from settings import ConfigError
from state import EnergyIntegrator, NameMap, StateLock, atomic_write_json, prepare_state_dir


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
    assert first == "plug"
    assert second != first
    assert second.startswith("plug_")


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
    with pytest.raises(ValueError, match="is not finite"):
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


# --- names.json edited by hand ---------------------------------------------------


@pytest.mark.parametrize("bad", [5, ["kitchen"], None, {"name": "x"}, "💡", ""])
def test_unusable_entry_is_ignored_once_and_the_device_named_afresh(tmp_path, caplog, bad):
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"id-1": bad, "id-2": "lamp"}))
    names = NameMap(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert str(path) in warnings[0]
    assert "'id-1'" in warnings[0]
    assert names.name_for("id-1", "Kettle") == "kettle"
    assert names.name_for("id-2", "Lamp 2") == "lamp"
    # The file now holds usable names only: the next start says nothing.
    assert json.loads(path.read_text()) == {"id-1": "kettle", "id-2": "lamp"}
    caplog.clear()
    NameMap(path)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize(
    ("edited", "used"),
    [("Living room", "living_room"), ("kitchen.left", "kitchenleft"), ("Hall/Lamp", "halllamp")],
)
def test_hand_edited_name_is_cleaned_like_a_reported_one(tmp_path, caplog, edited, used):
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"50:c7:bf:00:00:01": edited}))
    names = NameMap(path)
    assert names.name_for("50:C7:BF:00:00:01", "Plug") == used
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "'50:c7:bf:00:00:01'" in warnings[0]
    assert repr(used) in warnings[0]
    assert json.loads(path.read_text()) == {"50:c7:bf:00:00:01": used}


def test_names_json_that_is_not_an_object_is_said(tmp_path, caplog):
    path = tmp_path / "names.json"
    path.write_text("[1, 2]")
    assert NameMap(path).name_for("id-1", "Plug") == "plug"
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_upper_case_ids_in_names_json_still_match(tmp_path):
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"50:C7:BF:00:00:01": "kettle"}))
    assert NameMap(path).name_for("50:c7:bf:00:00:01", "Tea") == "kettle"


def test_two_entries_with_one_name_in_names_json_are_told_apart(tmp_path):
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"id-1": "kitchen", "id-2": "kitchen"}))
    names = NameMap(path)
    first, second = names.name_for("id-1"), names.name_for("id-2")
    assert first == "kitchen"
    assert second != first


# --- No two devices ever share a series ------------------------------------------


def test_appended_id_never_lands_on_a_name_already_taken(tmp_path):
    names = NameMap(tmp_path / "names.json")
    taken = names.name_for("x3", "plug_x2")  # a device whose own name looks like a suffix
    first = names.name_for("x", "Plug")
    second = names.name_for("x2", "Plug")
    assert len({taken, first, second}) == 3


def test_renamed_for_an_override_never_lands_on_a_name_already_taken(tmp_path):
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"id-1": "meter", "id-3": "meter_id_1"}))
    names = NameMap(path, {"id-2": "meter"})
    found = {key: names.name_for(key) for key in ("id-1", "id-2", "id-3")}
    assert len(set(found.values())) == 3
    assert found["id-2"] == "meter"


def test_pinned_name_never_takes_a_configured_one(tmp_path):
    names = NameMap(tmp_path / "names.json", {"other": "heat_pump"})
    names.pin("circuit-1", "Heat pump")
    assert names.name_for("other") == "heat_pump"
    assert names.name_for("circuit-1") not in ("heat_pump", "")


def test_two_ids_given_one_name_are_refused():
    with pytest.raises(ConfigError, match="both named 'kitchen'") as raised:
        NameMap(None, {"50:c7:bf:00:00:01": "kitchen", "50:c7:bf:00:00:02": "Kitchen"})
    assert "50:c7:bf:00:00:01" in str(raised.value)
    assert "50:c7:bf:00:00:02" in str(raised.value)


@pytest.mark.parametrize("kind", ["a file", "read-only"])
def test_prepare_state_dir_refuses_what_cannot_be_written(tmp_path, kind, monkeypatch):
    target = tmp_path / "state"
    if kind == "a file":
        target.write_text("x")
        target = target / "kasa"
    else:
        target.mkdir()

        def refuse(self, data):
            raise OSError(30, "Read-only file system")

        monkeypatch.setattr(type(target), "write_bytes", refuse)
    with pytest.raises(ConfigError, match=r"^STATE_DIR: cannot write in"):
        prepare_state_dir(target)


def test_prepare_state_dir_leaves_nothing_behind(tmp_path):
    prepare_state_dir(tmp_path / "state" / "kasa")
    assert list((tmp_path / "state" / "kasa").iterdir()) == []


def test_ids_with_nothing_usable_still_get_distinct_names(tmp_path):
    # MQTT topics tele/кухня, tele/спальня, tele/台所: no ASCII to name them by.
    path = tmp_path / "names.json"
    names = NameMap(path)
    given = [names.name_for(topic, topic) for topic in ("кухня", "спальня", "台所")]
    assert len(set(given)) == 3
    again = NameMap(path)
    assert [again.name_for(topic, topic) for topic in ("кухня", "спальня", "台所")] == given
