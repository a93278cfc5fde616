"""Property-based tests of the ESP32 receiver (hypothesis): whatever arrives,
no 5xx and no invalid Carbon line; whatever happens to posts, devices and the
receiver, no energy counted twice."""

from __future__ import annotations

import copy
import http.client
import json
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from esp32 import pulse_logic as pl
from esp32_accounting import MeterAccounts, MeterReading
from graphite_helper import is_valid_line
from simulators.esp32 import SimClock, SimulatedEsp32
from tests.test_esp32_receiver import HEADERS, TOKEN, RunningReceiver

ANSWERS = {200, 400, 401, 413, 415}
NOW = int(time.time())  # fixed for the session: hypothesis replays examples
IMP_PER_KWH = 1000

# --- Accounting: energy never counted twice -------------------------------------------

actions = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.integers(0, 27)),  # 10 s, up to ~10 kW of pulses
        st.tuples(st.just("post"), st.integers(1, 6), st.booleans()),  # batch size, answer lost
        st.tuples(st.just("replay"), st.integers(0, 10_000)),  # an earlier post again
        st.tuples(st.just("drop"), st.just(0)),  # the device's buffer overflows
        st.tuples(st.just("reboot"), st.just(0)),
        st.tuples(st.just("save"), st.just(0)),
        st.tuples(st.just("restart"), st.just(0)),  # graceful: state saved first
        st.tuples(st.just("crash"), st.just(0)),  # back to the last save
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(actions)
def test_energy_is_never_counted_twice(steps):
    book = MeterAccounts(None)
    saved = book.to_state()
    boot, seq, pulses, uptime_ms = 0, 0, 0, 0
    outbox: list[MeterReading] = []
    posted: list[list[MeterReading]] = []
    delivered_max: dict[int, int] = {}  # per boot: the highest count the receiver was given
    crashed = False

    def deliver(batch: list[MeterReading]) -> None:
        for reading in sorted(batch, key=lambda r: r.seq):
            book.apply(reading, 1_800_000_000.0)
            key = int(reading.boot_id[1:])
            delivered_max[key] = max(delivered_max.get(key, 0), reading.pulses_total)
        posted.append(batch)

    def reload(state: dict) -> MeterAccounts:
        restored = MeterAccounts(None)
        restored._load(copy.deepcopy(state))
        return restored

    for step in steps:
        kind = step[0]
        if kind == "tick":
            seq, pulses, uptime_ms = seq + 1, pulses + step[1], uptime_ms + 10_000
            outbox.append(MeterReading("esp32-a", f"b{boot}", seq, uptime_ms, IMP_PER_KWH, pulses))
        elif kind == "post" and outbox:
            batch = outbox[: step[1]]
            deliver(batch)
            if not step[2]:
                del outbox[: len(batch)]
        elif kind == "replay" and posted:
            deliver(posted[step[1] % len(posted)])
        elif kind == "drop" and outbox:
            outbox.pop(0)
        elif kind == "reboot":
            boot, seq, pulses, uptime_ms, outbox = boot + 1, 0, 0, 0, []
        elif kind == "save":
            saved = json.loads(json.dumps(book.to_state()))
        elif kind == "restart":
            saved = json.loads(json.dumps(book.to_state()))
            book = reload(saved)
        elif kind == "crash":
            book = reload(saved)
            crashed = True

        expected_kwh = sum(delivered_max.values()) / IMP_PER_KWH
        energy_kwh = book.energy_kwh("esp32-a") or 0.0
        assert energy_kwh <= expected_kwh + 1e-9
        if not crashed:
            assert energy_kwh == pytest.approx(expected_kwh, abs=1e-9)


# --- Over HTTP: whatever arrives, no 5xx and no invalid line ------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "device_id",
    "boot_id",
    "seq",
    "uptime_ms",
    "ts",
    "imp_per_kwh",
    "pulses_total",
    "last_interval_ms",
    "rssi",
    "fw",
]


@st.composite
def readings(draw: Any) -> dict:
    """A firmware reading, often with a field changed, removed or added."""
    now = NOW
    reading = pl.make_reading(
        draw(st.sampled_from(["esp32-a", "esp32-b", "meter:2", "x" * 64])),
        draw(st.sampled_from(["b1", "b2", "0123456789abcdef"])),
        draw(st.integers(1, 50)),
        draw(st.integers(0, 10**9)),
        draw(st.sampled_from([1000, 3200, 800, 0.5])),
        draw(st.integers(0, 10**6)),
        ts=draw(st.one_of(st.none(), st.integers(now - 10**6, now + 10**6))),
        last_interval_ms=draw(st.one_of(st.none(), st.integers(1, 10**8))),
        rssi=draw(st.one_of(st.none(), st.integers(-120, 0))),
        fw=draw(st.one_of(st.none(), st.text(max_size=10))),
    )
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.sampled_from([*FIELDS, "extra"]))
        if draw(st.booleans()):
            reading.pop(field, None)
        else:
            reading[field] = draw(json_values)
    return reading


bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    readings().map(lambda reading: json.dumps(reading).encode()),
    st.lists(readings(), max_size=5).map(lambda items: json.dumps({"readings": items}).encode()),
    st.lists(
        st.sampled_from(
            [b"{", b"}", b"[", b"]", b'"readings"', b":", b",", b"1e999", b"NaN", b'"\\ud800"']
        ),
        max_size=30,
    ).map(b"".join),
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)
content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
            "text/plain",
            "",
            "application/x-www-form-urlencoded",
        ]
    ),
    header_text,
)
authorizations = st.one_of(
    st.sampled_from(
        [
            f"Bearer {TOKEN}",
            f"bearer {TOKEN}",
            "Bearer",
            "Bearer wrong-token-0123456789",
            f"Basic {TOKEN}",
        ]
    ),
    header_text,
    st.none(),
)


def module_receiver(state_dir: Path, **overrides: Any):
    """A receiver kept for the module; at the end, every line that left was valid."""
    receiver = RunningReceiver(state_dir, ESP32_MAX_DEVICES=100_000, **overrides)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
        # Every line that left, over the whole module, was a valid Carbon line.
        assert all(is_valid_line(line) for line in receiver.sink.lines)


@pytest.fixture(scope="module")
def fuzzed_receiver(tmp_path_factory):
    yield from module_receiver(tmp_path_factory.mktemp("fuzz"), ESP32_MAX_BODY_BYTES=4096)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=bodies,
    content_type=content_types,
    authorization=authorizations,
    method=st.sampled_from(["POST", "POST", "PUT", "GET"]),
)
def test_no_post_gets_a_5xx_or_makes_a_bad_line(
    fuzzed_receiver, body, content_type, authorization, method
):
    headers = {"Content-Type": content_type}
    if authorization is not None:
        headers["Authorization"] = authorization
    before = len(fuzzed_receiver.sink.lines)
    status, answer = fuzzed_receiver.request(method, "/api/v1/readings", body, headers)
    if not isinstance(answer, dict):
        # waitress's own plain-text answer to broken HTTP (a control character
        # in a header) or to a body over the limit: the app never saw it.
        assert status in (400, 413), answer
    elif method == "POST":
        assert status in ANSWERS, answer
        assert answer["ok"] is (status == 200)
    else:
        assert status == 405
    fuzzed_receiver.receiver.batcher.flush()
    assert all(is_valid_line(line) for line in fuzzed_receiver.sink.lines[before:])


header_lines = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"Content-Type: application/json",
                b"Authorization: Bearer " + TOKEN.encode(),
                b"Content-Length: 5",
                b"Content-Length: -1",
                b"Content-Length: 99999999999999999999",
                b"Transfer-Encoding: chunked",
                b"Transfer-Encoding: gzip, chunked",
                b"Expect: 100-continue",
                b"Host: 127.0.0.1",
                b"Connection: close",
            ]
        ),
        st.binary(max_size=40),
    ),
    max_size=6,
)
raw_requests = st.one_of(
    st.binary(max_size=300),
    st.tuples(
        st.sampled_from([b"POST", b"GET", b"PUT", b"post", b"", b"\x00"]),
        st.sampled_from(
            [b"/api/v1/readings", b"/healthz", b"/api/v1/status", b"*", b"//", b"/%ff"]
        ),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""]),
        header_lines,
        bodies,
    ).map(
        lambda parts: (
            parts[0]
            + b" "
            + parts[1]
            + b" "
            + parts[2]
            + b"\r\n"
            + b"".join(line + b"\r\n" for line in parts[3])
            + b"\r\n"
            + parts[4]
        )
    ),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=raw_requests)
@example(request=b"POST /api/v1/readings HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\nxx")
def test_raw_http_on_the_socket_gets_no_5xx(fuzzed_receiver, request):
    with socket.create_connection(("127.0.0.1", fuzzed_receiver.server.port), timeout=5) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        try:
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    statuses = re.findall(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ", reply)
    assert not [status for status in statuses if status.startswith(b"5")], reply[:300]
    fuzzed_receiver.receiver.batcher.flush()


# --- Sequences through the simulated ESP32, with receiver restarts ---------------------------

events = st.lists(
    st.one_of(
        st.tuples(st.just("step"), st.integers(1, 90)),
        st.tuples(st.just("load"), st.sampled_from([0, 150, 800, 3000, 9000])),
        st.tuples(st.just("drop_posts"), st.integers(1, 4)),
        st.tuples(st.just("drop_responses"), st.integers(1, 3)),
        st.tuples(st.just("duplicate"), st.just(0)),
        st.tuples(st.just("reboot"), st.integers(0, 30)),
        st.tuples(st.just("restart"), st.integers(0, 60)),  # receiver down for that many s
    ),
    max_size=12,
)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(events, st.sampled_from([1000, 3200]))
# More posts set to be lost than a fixed number of final flushes could spend
# (a CI run drew such a list).
@example([("drop_responses", 3)] * 7 + [("drop_posts", 4)] * 5, 1000)
def test_simulated_esp32_energy_survives_everything(events, imp_per_kwh):
    with tempfile.TemporaryDirectory() as work:
        state_dir = Path(work)
        receiver = RunningReceiver(state_dir).start()
        sim = SimulatedEsp32(
            receiver.url,
            TOKEN,
            "esp32-sim",
            imp_per_kwh=imp_per_kwh,
            clock=SimClock(time.time() - 3000),
            power_watts=2000,
            seed=1,
            backoff_base_s=1,
            backoff_cap_s=20,
        )
        lines: list[str] = []
        try:
            for kind, value in events:
                if kind == "step":
                    sim.step(value)
                elif kind == "load":
                    sim.power_watts = value
                elif kind == "drop_posts":
                    sim.drop_next_posts(value)
                elif kind == "drop_responses":
                    sim.drop_next_responses(value)
                elif kind == "duplicate":
                    sim.duplicate_next_post()
                elif kind == "reboot":
                    sim.reboot(downtime_s=value)
                elif kind == "restart":
                    receiver.stop()
                    lines += receiver.sink.lines
                    sim.step(value)  # posts fail meanwhile; the device buffers
                    receiver = RunningReceiver(state_dir).start()
                    sim.url = receiver.url
            sim.step(10)
            # Each flush spends one post still set to be lost, if any: as many
            # flushes as were set to be lost (drops add up), and then some.
            losses_set = sum(value for kind, value in events if kind.startswith("drop_"))
            assert any(sim.flush() for _ in range(losses_set + 3))
            energy_kwh = receiver.receiver.accounts.energy_kwh("esp32-sim") or 0.0
            assert energy_kwh == pytest.approx(sim.energy_kwh_expected, abs=1e-9)
        finally:
            receiver.stop()
        lines += receiver.sink.lines
        assert all(is_valid_line(line) for line in lines)
        assert all(record.status in (200, None) for record in sim.history)
        energy = [
            float(line.split()[1])
            for line in lines
            if line.startswith("home.electricity.meter.energy_kwh ")
        ]
        assert energy == sorted(energy)  # a counter that only grows
        if energy:
            assert energy[-1] == pytest.approx(sim.energy_kwh_expected, abs=1e-6)


# --- Hostile values: each refused by name, or bounded ----------------------------------------

NUMERIC_FIELDS = [
    "seq",
    "uptime_ms",
    "imp_per_kwh",
    "pulses_total",
    "ts",
    "last_interval_ms",
    "rssi",
]
# Written as JSON text: json.dumps cannot even write an int of over 4,300 digits.
huge_numbers = st.builds(
    lambda sign, digits, tail: sign + "9" * digits + tail,
    st.sampled_from(["", "-"]),
    st.integers(309, 6000),
    st.sampled_from(["", ".5", "e10", "e-10", ".0e400"]),
)


@pytest.fixture(scope="module")
def roomy_receiver(tmp_path_factory):
    """The default body limit (64 KiB): room for 6,000 digits."""
    yield from module_receiver(tmp_path_factory.mktemp("huge"))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(field=st.sampled_from(NUMERIC_FIELDS), number=huge_numbers, batch=st.booleans())
@example(field="pulses_total", number="9" * 4301, batch=False)
@example(field="imp_per_kwh", number="1" + "0" * 310, batch=True)
def test_numbers_beyond_any_float_get_400_naming_the_field(roomy_receiver, field, number, batch):
    item = pl.make_reading("esp32-huge", "b1", 1, 10_000, 1000, 3, ts=NOW, last_interval_ms=900)
    item["rssi"] = -60
    item[field] = "@"
    body = json.dumps({"readings": [item]} if batch else item).replace('"@"', number).encode()
    status, answer = roomy_receiver.request("POST", "/api/v1/readings", body, HEADERS)
    assert status == 400, answer
    assert answer["field"] == (f"readings[0].{field}" if batch else field)


@settings(max_examples=300, deadline=None)
@given(
    imp_per_kwh=st.one_of(st.floats(100, 100_000), st.integers(100, 100_000)),
    steps=st.lists(
        st.tuples(
            st.integers(0, 60_000),  # ms since the last reading
            st.integers(0, 50),  # new pulses
            st.one_of(st.none(), st.floats(1e-9, 1e12, allow_nan=False)),  # last_interval_ms
        ),
        max_size=20,
    ),
)
def test_power_is_bounded_and_energy_finite_whatever_the_device_says(imp_per_kwh, steps):
    max_power_watts = 25_000
    book = MeterAccounts(None, max_power_watts=max_power_watts)
    uptime_ms, pulses = 0, 0
    for seq, (elapsed_ms, new_pulses, interval_ms) in enumerate(steps, start=1):
        uptime_ms, pulses = uptime_ms + elapsed_ms, pulses + new_pulses
        reading = MeterReading("d", "b", seq, uptime_ms, imp_per_kwh, pulses, None, interval_ms)
        applied = book.apply(reading, 1_800_000_000.0)
        if applied.power_watts is not None:
            assert 0 <= applied.power_watts <= max_power_watts
        energy_kwh = book.energy_kwh("d") or 0.0
        # Never more than the maximum power could make, plus each reading's pulse slack.
        limit_kwh = max_power_watts * uptime_ms / 3.6e9 + 2 * seq / imp_per_kwh
        assert 0 <= energy_kwh <= limit_kwh + 1e-9


_devices_made = iter(range(10**9))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    boots=st.lists(st.integers(1, 5), min_size=1, max_size=3),  # readings per boot
    order=st.randoms(use_true_random=False),
    batch_size=st.integers(1, 4),
)
def test_energy_never_goes_down_in_time_order_whatever_order_posts_come(
    fuzzed_receiver, boots, order, batch_size
):
    device = f"esp32-order-{next(_devices_made)}"
    readings = []
    ts, uptime_ms = NOW - 3000, 0
    for boot, count in enumerate(boots):
        pulses, uptime_ms = 0, 0
        for seq in range(1, count + 1):
            ts, uptime_ms, pulses = ts + 10, uptime_ms + 10_000, pulses + 5
            readings.append(
                pl.make_reading(device, f"b{boot}", seq, uptime_ms, 1000, pulses, ts=ts)
            )
    order.shuffle(readings)
    accepted = 0
    for start in range(0, len(readings), batch_size):
        body = json.dumps({"readings": readings[start : start + batch_size]}).encode()
        status, answer = fuzzed_receiver.request("POST", "/api/v1/readings", body, HEADERS)
        assert status == 200
        accepted += answer["accepted"]
    segment = fuzzed_receiver.receiver.runtime.names.name_for(device)
    path = f"home.electricity.{segment}.energy_kwh "
    expected_kwh = 5 * sum(boots) / 1000

    def points() -> list[tuple[int, float]]:
        found = []
        for line in list(fuzzed_receiver.sink.lines):
            if line.startswith(path):
                _name, value, timestamp = line.split()
                found.append((int(timestamp), float(value)))
        return sorted(found)  # in time order, whatever order they were sent in

    # The batcher's own thread may be sending the last lines just now.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(points()) < accepted:
        fuzzed_receiver.receiver.batcher.flush()
        time.sleep(0.01)
    stamps = [timestamp for timestamp, _value in points()]
    assert len(set(stamps)) == len(stamps) == accepted  # one total a second: none overwritten
    series = [value for _timestamp, value in points()]
    assert series == sorted(series)
    assert series[-1] == pytest.approx(expected_kwh)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.from_regex(r"[A-Za-z0-9]{0,8}[A-Za-z][A-Za-z0-9._:-]{0,8}", fullmatch=True))
def test_ids_differing_only_in_case_never_share_a_series(fuzzed_receiver, name):
    device = f"c{next(_devices_made)}-{name}"
    variant = device.swapcase()
    first = pl.make_reading(device, "b1", 1, 10_000, 1000, 3)
    assert fuzzed_receiver.request("POST", "/api/v1/readings", json.dumps(first), HEADERS)[0] == 200
    other = pl.make_reading(variant, "b1", 1, 10_000, 1000, 7)
    status, answer = fuzzed_receiver.request("POST", "/api/v1/readings", json.dumps(other), HEADERS)
    assert (status, answer["field"]) == (400, "device_id")
    assert fuzzed_receiver.receiver.accounts.energy_kwh(variant) is None


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(["boots", "retired_kwh", "retired_boot_ids", "last", "energy_ts", "*"]),
    value=json_values,
    inner=st.booleans(),
)
def test_a_damaged_state_entry_never_raises_nor_takes_energy_back(key, value, inner):
    book = MeterAccounts(None)
    for seq, pulses in ((1, 40), (2, 50)):
        book.apply(MeterReading("d", "b1", seq, seq * 10_000, 1000, pulses), 0.0)
    book.apply(MeterReading("d", "b2", 1, 10_000, 1000, 20), 0.0)
    state = json.loads(json.dumps(book.to_state()))
    entry = state["devices"]["d"]
    if key == "*":
        state["devices"]["d"] = value
    elif inner and key == "boots":
        entry["boots"][0][str(value)[:12] or "pulses"] = value
        entry["boots"][1]["pulses"] = value
    else:
        entry[key] = value
    restored = MeterAccounts(None)
    restored._load(state)
    total = restored.energy_kwh("d") or 0.0
    if key not in ("*", "last"):  # "last" holds the total sent, kept for repairs
        assert total >= 0.07 - 1e-9
    # Posts go on from there, and a repeat of the boot going on adds nothing.
    restored.apply(MeterReading("d", "b2", 1, 10_000, 1000, 20), 0.0)
    restored.apply(MeterReading("d", "b2", 2, 20_000, 1000, 25), 0.0)
    assert (restored.energy_kwh("d") or 0.0) >= total
    json.dumps(restored.to_state())


def test_http_client_sees_json_errors(fuzzed_receiver):
    # A sanity check of the fixture itself: a good post is 200.
    connection = http.client.HTTPConnection("127.0.0.1", fuzzed_receiver.server.port, timeout=5)
    body = json.dumps(pl.make_reading("esp32-z", "b1", 1, 10_000, 1000, 3))
    connection.request("POST", "/api/v1/readings", body=body, headers=HEADERS)
    assert connection.getresponse().status == 200
    connection.close()
