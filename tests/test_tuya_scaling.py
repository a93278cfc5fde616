"""tuya_scaling: what each device of a real home measures and in which scale,
decoding phases, and the checks that catch a scale off by ten (pure)."""

from __future__ import annotations

import base64

import pytest

import tuya_scaling as scaling
from settings import ConfigError, load_settings
from simulators.tuya import (
    din_meter_dps,
    encode_phase,
    plug_dps,
)
from tests.helpers import by_name, tuya_entry

# --- what each device of the real home measures ---------------------------------------

EXPECTED_KINDS = {
    "Diivoo smart dual water timer": scaling.SKIP,
    "Gateway": scaling.SKIP,
    "Multifunction alarm": scaling.SKIP,
    "Electric blanket": scaling.SWITCH,
    "Dining room lights": scaling.SWITCH,
    "Amaryllis Fridge": scaling.SWITCH,
    "Front room fairy lights": scaling.SWITCH,
    "Towel Rail": scaling.SWITCH,
    "Dishwasher": scaling.SWITCH,  # no mapping: power if its DPs show it
    "Boot room freezer": scaling.SWITCH,
    "Garage power A": scaling.SWITCH,
    "Main Oven": scaling.METER,
    "Top Oven": scaling.METER,
}


def test_every_wizard_device_gets_the_right_plan(wizard):
    for device in wizard:
        plan = scaling.plan_for(device)
        assert plan.kind == EXPECTED_KINDS.get(device.name, scaling.PLUG), device.name
        if plan.kind == scaling.PLUG:  # mapped plugs: 18 mA, 19 W x10, 20 V x10
            assert plan.channels == {
                "current_amps": scaling.Channel("18", 0, 1, 1000),
                "power_watts": scaling.Channel("19", 1),
                "voltage_volts": scaling.Channel("20", 1),
            }
            assert plan.switch_dp == "1"
            assert plan.source == "mapping"
            assert not plan.has_counter  # add_ele is an increment, not a total
    oven = scaling.plan_for(by_name(wizard, "Main Oven"))
    assert oven.phase_dps == ("6", "7", "8")
    assert oven.switch_dp == "16"
    assert oven.channels == {"energy_kwh": scaling.Channel("1", scale=2)}
    assert "profile" in oven.source
    timer = scaling.plan_for(by_name(wizard, "Diivoo smart dual water timer"))
    assert "water timer" in timer.describe()


def test_scaling_precedence_override_then_mapping_then_profile_then_defaults(wizard):
    kettle = by_name(wizard, "Kettle")
    override = scaling.parse_scaling("TUYA_SCALING['Kettle']", {"power_watts": {"dp": 19}})
    plan = scaling.plan_for(kettle, override)
    assert plan.channels["power_watts"] == scaling.Channel("19", 0)  # override
    assert plan.channels["voltage_volts"] == scaling.Channel("20", 1)  # mapping
    assert plan.source.startswith("TUYA_SCALING")
    # A dlq with a mapping of its own follows the mapping, not the profile.
    mapped_meter = tuya_entry(
        category="dlq",
        mapping={
            "1": {"code": "total_forward_energy", "values": {"unit": "kW·h", "scale": 3}},
            "6": {"code": "phase_a", "type": "Raw", "values": {}},
            "16": {"code": "switch", "type": "Boolean", "values": {}},
        },
    )
    plan = scaling.plan_for(mapped_meter)
    assert plan.channels == {"energy_kwh": scaling.Channel("1", 3)}
    assert plan.phase_dps == ("6",)
    assert plan.source == "mapping"
    assert plan.kind == scaling.METER
    # No mapping, no profile: a socket is read with the usual DPs once seen.
    bare = scaling.plan_for(tuya_entry())
    assert bare.kind == scaling.SWITCH
    assert bare.probe_layouts
    assert bare.switch_dp == "1"
    resolved = scaling.resolve_layout(bare, plug_dps(40.0, legacy=True))
    assert resolved is not None
    assert resolved.channels["power_watts"] == scaling.Channel("5", 1)
    assert scaling.resolve_layout(bare, {"1": True}) is None


def test_usual_dps_are_not_taken_when_the_mapping_gives_them_another_meaning():
    device = tuya_entry(
        mapping={
            "1": {"code": "switch_1", "type": "Boolean"},
            "19": {"code": "countdown_1", "type": "Integer", "values": {"scale": 0}},
        }
    )
    plan = scaling.plan_for(device)
    assert scaling.resolve_layout(plan, plug_dps(40.0)) is None
    assert scaling.resolve_layout(plan, plug_dps(40.0, legacy=True)) is not None


@pytest.mark.parametrize(
    ("code", "values", "raw", "expected"),
    [
        ("cur_power", {"unit": "W", "scale": 1}, 405, 40.5),
        ("cur_power", {"unit": "W", "scale": 0}, 40, 40.0),
        ("cur_power", {"unit": "kW", "scale": 3}, 40, 40.0),
        ("cur_current", {"unit": "mA", "scale": 0}, 170, 0.17),
        ("cur_current", {"unit": "A", "scale": 3}, 170, 0.17),
        ("cur_current", {"scale": 0}, 170, 0.17),  # no unit: mA, the convention
        ("cur_voltage", {"unit": "V", "scale": 1}, 2398, 239.8),
        ("cur_voltage", '{"unit":"V","scale":2}', 23980, 239.8),  # values as JSON text
        ("forward_energy_total", {"unit": "kW·h", "scale": 2}, 123456, 1234.56),
        ("forward_energy_total", {"unit": "W·h", "scale": 0}, 1234560, 1234.56),
    ],
)
def test_mapping_scale_and_unit(code, values, raw, expected):
    metric, channel = scaling.channel_from_mapping("9", code, {"code": code, "values": values})
    assert channel.convert(raw) == pytest.approx(expected, rel=1e-12)
    assert metric == scaling.UNITS[scaling.CONVENTIONAL_UNITS[code]][0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("19", "must be a dict"),
        ({"watts": {"dp": 19}}, "unknown metric"),
        ({"power_watts": {"dp": "x"}}, "'dp' must be a DP number"),
        ({"power_watts": {"dp": 19, "scale": 1.5}}, "'scale'"),
        ({"power_watts": {"dp": 19, "unit": "mA"}}, "unit 'ma'"),
        ({"power_watts": {"dp": 19, "factor": 10}}, "must be"),
        ({"is_on": {"dp": 1, "scale": 1}}, "only 'dp'"),
    ],
)
def test_bad_scaling_override_is_a_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        scaling.parse_scaling("TUYA_SCALING['Kettle']", spec)


# --- decoding and checks -----------------------------------------------------------------


def test_phase_decoding_known_bytes():
    raw = bytes.fromhex("08fc0005dc000159")  # 230.0 V, 1.500 A, 345 W
    assert scaling.decode_phase(base64.b64encode(raw).decode()) == (230.0, 1.5, 345.0)
    assert scaling.decode_phase(encode_phase(241.3, 12.345, 2980)) == (241.3, 12.345, 2980.0)
    for bad in ("not base64!", base64.b64encode(b"1234567").decode(), 12):
        with pytest.raises(ValueError, match="phase DP"):
            scaling.decode_phase(bad)


def test_meter_values_one_and_three_phases(wizard):
    plan = scaling.plan_for(by_name(wizard, "Main Oven"))
    values, problems = scaling.extract_values(plan, din_meter_dps([(230.0, 1.5, 345.0)], 1234.56))
    assert problems == []
    assert scaling.combine_phases(values) == {
        "is_on": 1.0,
        "energy_kwh": 1234.56,
        "voltage_volts": 230.0,
        "current_amps": 1.5,
        "power_watts": 345.0,
    }
    phases = [(230.0, 10.0, 2300.0), (231.0, 2.0, 462.0), (229.0, 0.5, 100.0)]
    values, _ = scaling.extract_values(plan, din_meter_dps(phases, 10.0, on=False))
    combined = scaling.combine_phases(values)
    assert combined["l2_power_watts"] == 462.0
    assert combined["l3_current_amps"] == 0.5
    assert combined["power_watts"] == 2862.0
    assert combined["current_amps"] == 12.5
    assert combined["voltage_volts"] == pytest.approx(230.0)
    assert combined["is_on"] == 0.0


def test_single_phase_meter_reporting_empty_phases_stays_single(wizard):
    plan = scaling.plan_for(by_name(wizard, "Main Oven"))
    dps = din_meter_dps([(230.0, 1.0, 230.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)], 1.0)
    values, _ = scaling.extract_values(plan, dps)
    assert set(scaling.combine_phases(values)) == {
        "is_on",
        "energy_kwh",
        "voltage_volts",
        "current_amps",
        "power_watts",
    }


def test_unreadable_dps_are_reported_not_sent(wizard):
    plan = scaling.plan_for(by_name(wizard, "Kettle"))
    dps = {"1": "on", "18": None, "19": "lots", "20": 2401, "17": 3}
    values, problems = scaling.extract_values(plan, dps)
    assert values == {"voltage_volts": 240.1}
    assert len(problems) == 3
    assert all(p.startswith("DP ") for p in problems)


def test_values_outside_physical_sense_are_dropped():
    ranges = scaling.parse_ranges(load_settings(env={}, local_path="/nonexistent").tuya_ranges)
    values = {"power_watts": 4400.0, "voltage_volts": 40.0, "current_amps": 0.2, "is_on": 1.0}
    kept, dropped = scaling.check_ranges(values, ranges["plug"])
    assert kept == {"current_amps": 0.2, "is_on": 1.0}
    assert [line.split()[0] for line in dropped] == ["power_watts", "voltage_volts"]
    kept, dropped = scaling.check_ranges(
        {"l2_voltage_volts": 500.0, "energy_kwh": -1.0}, ranges["meter"]
    )
    assert kept == {}
    assert len(dropped) == 2


def test_power_above_voltage_times_current_is_the_classic_scaling_mistake():
    # 400 W read for a 40 W plug (power taken as whole watts instead of W x10).
    wrong = {"power_watts": 400.0, "voltage_volts": 240.0, "current_amps": 0.17, "is_on": 1.0}
    kept, dropped = scaling.check_apparent_power(wrong)
    assert kept == {"voltage_volts": 240.0, "is_on": 1.0}
    assert "disagree" in dropped[0]
    right = {"power_watts": 40.0, "voltage_volts": 240.0, "current_amps": 0.17}
    assert scaling.check_apparent_power(right) == (right, [])
    low_power_factor = {"power_watts": 3.0, "voltage_volts": 240.0, "current_amps": 0.05}
    assert scaling.check_apparent_power(low_power_factor)[1] == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"plug": {"power_watts": [10, 1]}}, "min, max"),
        ({"plug": {"watts": [0, 1]}}, "power_watts"),
        ({"oven": {}}, "keys are"),
        ([], "must be a dict"),
    ],
)
def test_bad_ranges_are_a_config_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        scaling.parse_ranges(raw)
