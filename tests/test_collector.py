"""The shared runner: cycles, alignment, failures, bad values, health.

A fake source stands in for the devices here (narrow unit tests); the real
sources are exercised end to end in their own test files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import pytest

import collector
from runtime import EXIT_NO_DEVICE, EXIT_OK, Health, Once, Runtime, format_table
from service import configured_secrets, protect_secrets, setup_logging
from settings import load_settings


class RecordingSink:
    spool = None

    def __init__(self):
        self.sends: list[tuple[float, list[str]]] = []

    def describe_destinations(self):
        return "a recording sink"

    def send_lines(self, lines):
        self.sends.append((time.monotonic(), list(lines)))
        return True

    @property
    def lines(self):
        return [line for _, lines in self.sends for line in lines]


class FakeSource(collector.Collector):
    source = "fake"
    interval_setting = "plug_interval_s"

    def __init__(self, runtime, behaviour):
        super().__init__(runtime, args=None)
        self.behaviour = behaviour  # stable id -> (delay_s, values or exception)
        self.polls: list[tuple[str, float]] = []

    async def discover(self):
        return [collector.Device(stable_id=i, name=f"Dev {i}") for i in self.behaviour]

    async def poll(self, device):
        self.polls.append((device.stable_id, time.time()))
        delay_s, outcome = self.behaviour[device.stable_id]
        await asyncio.sleep(delay_s)
        if isinstance(outcome, Exception):
            raise outcome
        return [collector.Reading(device.stable_id, device.name, dict(outcome))]


def make_runtime(tmp_path, **overrides):
    local = tmp_path / "config_local.py"
    local.write_text("")
    settings = load_settings(
        env={"ELECTRICITY_STATE_DIR": str(tmp_path / "state")},
        local_path=local,
        overrides=overrides,
    )
    runtime = Runtime("fake", settings)
    runtime.sink = RecordingSink()
    return runtime


def run_cycle(runtime, behaviour, timestamp=1_700_000_000):
    source = FakeSource(runtime, behaviour)
    loop = collector.PollLoop(source, interval_s=30)

    async def scenario():
        await loop.rediscover()
        return await loop.cycle(timestamp)

    return asyncio.run(scenario())


def test_cycle_lines_share_the_cycle_timestamp(tmp_path):
    runtime = make_runtime(tmp_path)
    ok, failed, delivered = run_cycle(
        runtime,
        {"a": (0, {"power_watts": 12.5, "is_on": True}), "b": (0.05, {"power_watts": 3})},
    )
    assert (ok, failed, delivered) == (2, 0, True)
    lines = runtime.sink.lines
    assert "home.electricity.fake.dev_a.power_watts 12.5 1700000000\n" in lines
    assert "home.electricity.fake.dev_a.is_on 1 1700000000\n" in lines
    assert "home.electricity.fake.dev_b.power_watts 3 1700000000\n" in lines
    assert all(line.endswith(" 1700000000\n") for line in lines)
    assert "home.electricity.health.fake.devices_ok 2 1700000000\n" in lines


def test_slow_device_does_not_hold_back_prompt_ones(tmp_path):
    runtime = make_runtime(tmp_path, DEVICE_TIMEOUT_S=2.0)
    started = time.monotonic()
    ok, failed, _ = run_cycle(
        runtime,
        {"fast": (0, {"power_watts": 1}), "stuck": (60, {"power_watts": 2})},
    )
    assert (ok, failed) == (1, 1)
    first_at, first_lines = runtime.sink.sends[0]
    assert any(".dev_fast." in line for line in first_lines)
    assert first_at - started < 1.0  # the stuck device's 2 s timeout came later
    assert not any(".dev_stuck." in line for line in runtime.sink.lines)


def test_bad_values_are_counted_and_never_sent(tmp_path):
    runtime = make_runtime(tmp_path)
    run_cycle(
        runtime,
        {"a": (0, {"power_watts": math.nan, "voltage_volts": math.inf, "x": "12", "ok": 1.0})},
    )
    sent = [line for line in runtime.sink.lines if ".dev_a." in line]
    assert sent == ["home.electricity.fake.dev_a.ok 1 1700000000\n"]
    assert "home.electricity.health.fake.values_rejected 3 1700000000\n" in runtime.sink.lines


def test_failure_is_logged_once_then_recovery(tmp_path, caplog):
    runtime = make_runtime(tmp_path)
    behaviour = {"a": (0, OSError("connection refused"))}
    source = FakeSource(runtime, behaviour)
    loop = collector.PollLoop(source, interval_s=30)

    async def scenario():
        await loop.rediscover()
        for _ in range(3):
            await loop.cycle(1_700_000_000)
        behaviour["a"] = (0, {"power_watts": 1})
        await loop.cycle(1_700_000_030)

    with caplog.at_level(logging.INFO, logger="electricity.fake"):
        asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "connection refused" in warnings[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_once_says_a_problem_once_then_debug_and_when_it_clears(caplog):
    once = Once(logging.getLogger("electricity.once"))
    with caplog.at_level(logging.DEBUG, logger="electricity.once"):
        assert once.say(("a", "x"), "%s: %s", "a", "broken")
        assert not once.say(("a", "x"), "%s: %s", "a", "broken", again="%s: still %s")
        assert once.say(("b", "x"), "%s left out", "b", level=logging.INFO)
        assert ("a", "x") in once
        assert len(once) == 2
        assert once.clear(("a", "x"), "%s fixed", "a")
        assert not once.clear(("a", "x"), "%s fixed", "a")
        assert once.clear(("b", "x"))  # silently
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert said == [
        (logging.WARNING, "a: broken"),
        (logging.DEBUG, "a: still broken"),
        (logging.INFO, "b left out"),
        (logging.INFO, "a fixed"),
    ]
    assert not once


def test_health_count_adds_to_the_source_counters():
    health = Health()
    health.count("read_errors", 0)
    assert health.extra == {"read_errors": 0}
    health.count("read_errors")
    health.count("values_out_of_range", 3)
    health.count("read_errors", 0)
    assert health.extra == {"read_errors": 1, "values_out_of_range": 3}


def test_loop_cycles_on_interval_boundaries(tmp_path):
    runtime = make_runtime(tmp_path)
    source = FakeSource(runtime, {"a": (0, {"power_watts": 1})})
    loop = collector.PollLoop(source, interval_s=1)

    async def scenario():
        task = asyncio.ensure_future(loop.run())
        while len(source.polls) < 3 and not task.done():
            await asyncio.sleep(0.05)
        loop.stopping.set()
        return await task

    assert asyncio.run(scenario()) == EXIT_OK
    stamps = sorted({int(line.split()[2]) for line in runtime.sink.lines if ".dev_a." in line})
    assert len(stamps) >= 3
    # Every cycle is stamped with its boundary, and polled right after it.
    for (_, polled_at), stamp in zip(source.polls[1:], stamps[1:]):
        assert stamp <= polled_at < stamp + 1


def test_once_exit_codes(tmp_path):
    runtime = make_runtime(tmp_path)

    def once(behaviour):
        loop = collector.PollLoop(FakeSource(runtime, behaviour), interval_s=30, once=True)
        return asyncio.run(loop.run())

    assert once({"a": (0, {"power_watts": 1})}) == EXIT_OK
    assert once({"a": (0, OSError("down"))}) == EXIT_NO_DEVICE
    assert once({}) == EXIT_NO_DEVICE


def test_format_table():
    table = format_table(("name", "id"), [("Kettle", "AA:BB"), ("x", "1")])
    assert table.splitlines() == ["name    id", "------  -----", "Kettle  AA:BB", "x       1"]


@pytest.mark.parametrize("journal", [False, True])
def test_logging_goes_to_stderr(journal, monkeypatch, capsys):
    if journal:
        monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("INFO")
    logging.getLogger("fake").warning("plug down")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.rstrip().endswith("fake: plug down")
    assert captured.err.startswith("<4>") == journal


def test_configured_secrets_never_reach_the_log(tmp_path, capsys):
    """Every secret setting, however nested, is scrubbed from every log line,
    whichever library writes it."""
    local = tmp_path / "config_local.py"
    local.write_text(
        'KASA_PASSWORD = "kasa-pass-1234"\n'
        'ESP32_DEVICE_TOKENS = {"meter": "token-abcdefgh-12345678"}\n'
    )
    settings = load_settings(env={}, local_path=local)
    setup_logging("DEBUG")
    protect_secrets(configured_secrets(settings))
    logging.getLogger("some.library").warning("login with %s", "kasa-pass-1234")
    logging.getLogger("other.library").error("bad header Bearer token-abcdefgh-12345678")
    err = capsys.readouterr().err
    assert "kasa-pass-1234" not in err
    assert "token-abcdefgh-12345678" not in err
    assert err.count("<key>") == 2


@pytest.mark.parametrize(("edited", "segment"), [("Living room", "living_room"), (7, "dev_a")])
def test_hand_edited_names_json_never_costs_a_device_its_data(tmp_path, edited, segment):
    # README's troubleshooting says to edit names.json; a space, a dot or a
    # number there must not silently drop the device or crash every cycle.
    names = tmp_path / "state" / "fake" / "names.json"
    names.parent.mkdir(parents=True)
    names.write_text(json.dumps({"a": edited}))
    runtime = make_runtime(tmp_path)
    for timestamp in (1_700_000_000, 1_700_000_030):
        assert run_cycle(runtime, {"a": (0, {"power_watts": 5})}, timestamp)[:2] == (1, 0)
    lines = runtime.sink.lines
    assert f"home.electricity.fake.{segment}.power_watts 5 1700000030\n" in lines
    assert "home.electricity.health.fake.values_rejected 0 1700000030\n" in lines
