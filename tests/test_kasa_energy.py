"""The lifetime energy total of smart plugs, from their day and month counters."""

from __future__ import annotations

import json

import pytest

from kasa_energy import DayCounters, SmartEnergyTotals, next_counters


def total(counters: DayCounters) -> float:
    return counters.base_kwh + counters.today_kwh


def test_first_reading_starts_at_the_months_energy():
    counters, event = next_counters(None, "2026-03-14", 1.5, 20.0)
    assert total(counters) == pytest.approx(20.0)
    assert event == "first reading"
    counters, _ = next_counters(None, "2026-03-14", 1.5, None)
    assert total(counters) == pytest.approx(1.5)


def test_midnight_counts_what_was_used_after_the_last_poll():
    last = DayCounters("2026-03-14", 1.2, 20.2, 19.0)
    counters, event = next_counters(last, "2026-03-15", 0.05, 20.35)
    assert event == "new day"
    # Yesterday ended at 1.3 kWh (month before today went 19.0 -> 20.3).
    assert total(counters) == pytest.approx(20.35)


def test_midnight_without_a_month_counter_keeps_the_last_figure():
    last = DayCounters("2026-03-14", 1.2, None, 5.0)
    counters, _ = next_counters(last, "2026-03-15", 0.05, None)
    assert total(counters) == pytest.approx(6.25)


def test_days_missed_while_the_collector_was_down_are_counted():
    last = DayCounters("2026-03-10", 1.0, 11.0, 40.0)  # 10 kWh this month before the 10th
    counters, _ = next_counters(last, "2026-03-14", 0.5, 16.5)  # 16 before the 14th
    assert total(counters) == pytest.approx(40.0 + 10.0 - 10.0 + 6.0 + 0.5)


def test_new_month_adds_the_last_figure_and_the_new_months_earlier_days():
    last = DayCounters("2026-03-31", 2.0, 30.0, 100.0)
    counters, _ = next_counters(last, "2026-04-02", 0.5, 3.5)  # April 1st: 3 kWh
    assert total(counters) == pytest.approx(100.0 + 2.0 + 3.0 + 0.5)


@pytest.mark.parametrize(
    ("today", "month", "day"),
    [(0.0, 0.0, "2026-03-14"), (0.1, 25.0, "2026-03-14"), (0.2, 0.2, "2026-03-13")],
)
def test_a_device_reset_is_not_a_day_and_the_total_never_goes_down(today, month, day):
    last = DayCounters("2026-03-14", 1.2, 20.2, 19.0)
    counters, event = next_counters(last, day, today, month)
    assert event in ("device reset", "clock went back")
    assert total(counters) == pytest.approx(20.2 + today)


def test_never_goes_down_over_a_random_walk():
    import random

    rng = random.Random(7)
    counters = None
    day_index, today, month, previous = 1, 0.0, 0.0, 0.0
    for _ in range(2000):
        step = rng.random()
        if step < 0.05:
            day_index += 1
            if day_index > 28:
                day_index, month = 1, 0.0
            today = 0.0
        elif step < 0.07:
            today = month = 0.0  # device reset
        else:
            used = rng.random() * 0.1
            today += used
            month += used
        counters, _ = next_counters(counters, f"2026-03-{day_index:02d}", today, month)
        assert total(counters) >= previous - 1e-9
        previous = total(counters)


def test_kept_across_restarts_and_bad_state_ignored(tmp_path):
    path = tmp_path / "smart_energy.json"
    totals = SmartEnergyTotals(path)
    assert totals.total_kwh("AA", "2026-03-14", 1.0, 20.0) == pytest.approx(20.0)
    totals.save()
    again = SmartEnergyTotals(path)
    assert again.total_kwh("AA", "2026-03-15", 0.5, 21.5) == pytest.approx(21.5)
    stored = json.loads(path.read_text())
    stored["BB"] = {"day": "x", "today_kwh": "1"}
    stored["CC"] = {"day": "2026-03-14", "today_kwh": -1, "month_kwh": None, "base_kwh": 0}
    path.write_text(json.dumps(stored))
    third = SmartEnergyTotals(path)
    assert third.total_kwh("BB", "2026-03-15", 0.5, None) == pytest.approx(0.5)
    assert third.total_kwh("CC", "2026-03-15", 0.5, None) == pytest.approx(0.5)
    path.write_text("{not json")
    assert SmartEnergyTotals(path).total_kwh("AA", "2026-03-15", 0.5, None) == 0.5


def test_saved_at_once_when_the_base_changes_else_at_most_every_interval(tmp_path):
    path = tmp_path / "smart_energy.json"
    totals = SmartEnergyTotals(path)
    totals.total_kwh("AA", "2026-03-14", 1.0, 20.0)
    totals.save()
    first = path.read_text()
    totals.total_kwh("AA", "2026-03-14", 1.1, 20.1)  # same base: not yet
    totals.save()
    assert path.read_text() == first
    totals.total_kwh("AA", "2026-03-15", 0.1, 20.2)  # new base: at once
    totals.save()
    assert json.loads(path.read_text())["AA"]["day"] == "2026-03-15"
