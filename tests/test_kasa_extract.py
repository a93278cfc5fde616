"""kasa_to_graphite's pure parts: stable ids, outlet ids, the energy figures
and the words said about credentials (the wire is tested in test_kasa.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from kasa import Module

from kasa_to_graphite import (
    child_id,
    credentials_problem,
    energy_values,
    extract,
    stable_id,
)


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        ("50:c7:bf:01:02:03", "50:C7:BF:01:02:03"),
        ("50-C7-BF-01-02-03", "50:C7:BF:01:02:03"),
        ("50C7BF010203", "50:C7:BF:01:02:03"),
        ("not a mac", "NOT A MAC"),  # kept as reported (upper-cased), never guessed
    ],
)
def test_stable_id_is_the_mac_in_one_form(reported: str, expected: str) -> None:
    assert stable_id(reported) == expected


def test_outlet_ids_take_the_outlets_own_suffix() -> None:
    outlet = SimpleNamespace(device_id="8006AB0000000000000000000000000000000000002")
    assert child_id("50:c7:bf:01:02:03", outlet, 0) == "50:C7:BF:01:02:03_02"


def test_outlet_without_an_id_is_numbered_by_its_place() -> None:
    assert child_id("50C7BF010203", SimpleNamespace(device_id=""), 4) == "50:C7:BF:01:02:03_04"
    assert child_id("50C7BF010203", SimpleNamespace(), 11) == "50:C7:BF:01:02:03_11"


def test_energy_values_keep_zero_and_drop_what_cannot_be() -> None:
    values = energy_values(0.0, 241.5, 0.012, 12.5, None)
    assert values == {
        "power_watts": 0.0,
        "voltage_volts": 241.5,
        "current_amps": 0.012,
        "energy_kwh": 12.5,
    }


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "12", True])
def test_energy_values_drop_impossible_figures(bad: object) -> None:
    values = energy_values(bad, 230.0, bad, bad, 1.0)  # type: ignore[arg-type]
    assert values == {"voltage_volts": 230.0, "energy_today_kwh": 1.0}


def energy_module(**figures: object) -> SimpleNamespace:
    base = {
        "current_consumption": 100.0,
        "voltage": 230.0,
        "current": 0.45,
        "consumption_total": None,
        "consumption_today": 0.7,
    }
    return SimpleNamespace(**{**base, **figures})


def test_a_device_with_a_lifetime_counter_sends_it() -> None:
    plug = SimpleNamespace(
        is_on=True, modules={Module.Energy: energy_module(consumption_total=412.5)}
    )
    values = extract(plug, lifetime_kwh=lambda device, energy: pytest.fail("not asked"))
    assert values["energy_kwh"] == 412.5
    assert values["is_on"] == 1.0


def test_a_smart_plug_without_one_gets_the_total_made_for_it() -> None:
    plug = SimpleNamespace(is_on=False, modules={Module.Energy: energy_module()})
    assert extract(plug, lifetime_kwh=lambda device, energy: 3.25)["energy_kwh"] == 3.25
    assert "energy_kwh" not in extract(plug)  # never today's figure under the lifetime name
    assert extract(plug)["energy_today_kwh"] == 0.7


def test_a_plug_without_a_meter_sends_only_is_on() -> None:
    assert extract(SimpleNamespace(is_on=True, modules={})) == {"is_on": 1.0}


@pytest.mark.parametrize("have_credentials", [True, False])
def test_credential_problems_name_the_settings_never_values(have_credentials: bool) -> None:
    said = credentials_problem(have_credentials)
    assert "KASA_USERNAME" in said
    assert "KASA_PASSWORD" in said
