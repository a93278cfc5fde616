#!/usr/bin/env python3
"""Kasa poll-cycle benchmark: the real KasaCollector in the shared PollLoop.

N = 1, 10, 100 and 500 simulated plugs (real python-kasa) run in a process
of their own: KP115 plugs on the legacy protocol (``--protocol legacy``),
Tapo P110 plugs on the smart protocol over KLAP (``--protocol smart``:
a handshake per session, AES and a signature per request), or both in
turn, beside a loopback socket that reads what the collector's real
CarbonClient sends and closes on end of stream. This process is the
collector alone, so its CPU time is the collector's. For each N, after
discovery and one warm-up cycle:

- prompt: every plug answers at once;
- late: every answer 200 ms late;
- dead: one more plug that accepts TCP and never answers, among N prompt ones.

Figures (medians over the cycles): time from the start of a cycle until the
live plugs' lines are delivered, and CPU time per device poll. Targets:

- latency overlaps: late - prompt <= 1.5 x (round trips per poll x 200 ms);
- the dead plug adds nothing to the live plugs' lines: the dead run's time
  is the prompt run's, within a noise allowance of 10 ms or 10%;
- under 2 ms of CPU per device poll.

Also counted: KLAP handshakes during the measured cycles (0: sessions are
kept from one cycle to the next).

    .venv/bin/python bench/bench_kasa.py [--quick] [--protocol legacy|smart|both]

Loopback only; the simulator process is stopped before this one exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench_sending import serve_discard, start_child, stop_child

import collector
import kasa_to_graphite
from runtime import Runtime
from service import setup_logging
from settings import load_settings
from simulators.kasa import KasaSimulator, SimulatedKasaDevice, loopback_host
from simulators.kasa_smart import SimulatedSmartDevice, SmartKasaSimulator

FIXTURES = {"legacy": "KP115(EU)_1.0_1.0.16.json", "smart": "smart_P110(UK)_1.0_1.3.0.json"}
USERNAME, PASSWORD = "bench@example.com", "bench-password"
LATE_S = 0.2
CPU_TARGET_S = 0.002
LATE_FACTOR = 1.5


# --- The simulated plugs, in a process of their own -------------------------------


def _simulator_child(conn, count: int, protocol: str) -> None:
    """Runs ``count`` plugs and a discard sink; obeys messages from the bench."""
    devices: list
    if protocol == "smart":
        devices = [
            SimulatedSmartDevice(
                FIXTURES[protocol],
                host=loopback_host(i),
                alias=f"plug {i}",
                username=USERNAME,
                password=PASSWORD,
            )
            for i in range(count)
        ]
        simulator: Any = SmartKasaSimulator(devices, discovery_host="127.0.0.1")
    else:
        devices = [
            SimulatedKasaDevice(FIXTURES[protocol], host=loopback_host(i), alias=f"plug {i}")
            for i in range(count)
        ]
        simulator = KasaSimulator(devices)
    sink, sink_address = serve_discard()
    try:
        with simulator as sim:
            conn.send((sim.port, sink_address))
            while True:
                try:
                    message = conn.recv()
                except EOFError:  # the bench is gone
                    break
                if message[0] == "delay":
                    for device in devices:
                        device.delay_s = message[1]
                    conn.send("ok")
                elif message[0] == "mode":
                    if protocol == "smart":
                        sim.set_mode(devices[message[1]], message[2])
                    else:
                        devices[message[1]].mode = message[2]
                    conn.send("ok")
                elif message[0] == "requests":
                    conn.send(sum(device.request_count for device in devices))
                elif message[0] == "handshakes":
                    conn.send(sum(getattr(device, "handshake_count", 0) for device in devices))
                else:
                    break
    finally:
        sink.shutdown()
        sink.server_close()


class SimulatedPlugs:
    """``count`` plugs on 127.0.0.2... and a discard sink, in a child process."""

    def __init__(self, count: int, protocol: str) -> None:
        self.count = count
        self.protocol = protocol
        self.port = 0
        self.sink_address = ("", 0)
        self._process = None
        self._conn = None

    def __enter__(self) -> SimulatedPlugs:
        self._process, self._conn, ready = start_child(_simulator_child, self.count, self.protocol)
        self.port, self.sink_address = ready
        return self

    def __exit__(self, *exc_info: object) -> None:
        stop_child(self._process, self._conn)

    def hosts(self) -> list[str]:
        return [f"{loopback_host(i)}:{self.port}" for i in range(self.count)]

    def set_delay(self, seconds: float) -> None:
        self._conn.send(("delay", seconds))
        self._conn.recv()  # applied before the next request

    def set_mode(self, index: int, mode: str) -> None:
        self._conn.send(("mode", index, mode))
        self._conn.recv()

    def requests(self) -> int:
        self._conn.send(("requests",))
        return self._conn.recv()

    def handshakes(self) -> int:
        self._conn.send(("handshakes",))
        return self._conn.recv()


# --- Cycles through the real collector ---------------------------------------------


@dataclass
class Cycle:
    lines_out_s: float  # cycle start until the live plugs' last lines were delivered
    cycle_s: float
    cpu_s: float
    plugs_sent: int  # plugs whose lines went out
    batches: int  # connections that carried the plugs' lines
    ok: int
    failed: int


class CollectorUnderTest:
    """A KasaCollector with its PollLoop and real CarbonClient; records when
    each batch of device lines has been delivered."""

    def __init__(self, plugs: SimulatedPlugs, state_dir: Path, device_timeout_s: float) -> None:
        local = state_dir / "config_local.py"
        local.write_text("")
        settings = load_settings(
            env={
                "ELECTRICITY_STATE_DIR": str(state_dir),
                "KASA_DISCOVERY_TIMEOUT_S": "1",
                "KASA_USERNAME": USERNAME,
                "KASA_PASSWORD": PASSWORD,
            },
            local_path=local,
            overrides={
                "KASA_HOSTS": plugs.hosts(),
                "KASA_DISCOVERY_ENABLED": False,
                "DEVICE_TIMEOUT_S": device_timeout_s,
                "CARBON_DESTINATIONS": ["{}:{}".format(*plugs.sink_address)],
            },
        )
        self.runtime = Runtime("kasa", settings)
        self.sent: list[tuple[float, list[str]]] = []
        sink = self.runtime.sink
        submit = sink.submit

        def recording_submit(lines):
            # Into the spool, then (for the figure) until Carbon confirmed it.
            submit(lines)
            delivered = sink.drain(30.0)
            self.sent.append((time.monotonic(), list(lines)))
            return delivered

        sink.submit = recording_submit
        self.kasa = kasa_to_graphite.KasaCollector(self.runtime, args=None)
        self.loop = collector.PollLoop(self.kasa, interval_s=30)

    async def cycle(self) -> Cycle:
        self.sent.clear()
        cpu_started = time.process_time()
        started = time.monotonic()
        ok, failed, delivered = await self.loop.cycle(int(time.time()))
        finished = time.monotonic()
        cpu_s = time.process_time() - cpu_started
        if not delivered:
            raise RuntimeError("lines not delivered to the loopback sink")
        device_sends = [(at, lines) for at, lines in self.sent if ".health." not in lines[0]]
        plugs = {line.split(".")[3] for _, lines in device_sends for line in lines}
        lines_out = max((at for at, _ in device_sends), default=finished)
        return Cycle(
            lines_out_s=lines_out - started,
            cycle_s=finished - started,
            cpu_s=cpu_s,
            plugs_sent=len(plugs),
            batches=len(device_sends),
            ok=ok,
            failed=failed,
        )


@dataclass
class Run:
    cycles: list[Cycle]

    def median(self, field: str) -> float:
        return statistics.median(getattr(cycle, field) for cycle in self.cycles)

    def worst(self, field: str) -> float:
        return max(getattr(cycle, field) for cycle in self.cycles)

    def complete(self, live: int) -> bool:
        return all(c.plugs_sent == live and c.ok == live for c in self.cycles)


@dataclass
class Result:
    protocol: str
    count: int
    discover_s: float
    round_trips: float
    prompt: Run
    late: Run
    dead: Run
    handshakes: int  # during the measured cycles (after discovery and warm-up)
    fresh: Run | None = None  # smart: every poll on a new session (a handshake each)


async def measure(plugs: SimulatedPlugs, count: int, cycles: int, timeout_s: float) -> Result:
    with tempfile.TemporaryDirectory(prefix="bench-kasa-") as tmp:
        under_test = CollectorUnderTest(plugs, Path(tmp), timeout_s)
        poll_loop = under_test.loop
        try:
            started = time.monotonic()
            await poll_loop.rediscover()
            await under_test.kasa.connected()
            discover_s = time.monotonic() - started
            if len(poll_loop.devices) != count + 1:
                raise RuntimeError(f"found {len(poll_loop.devices)} of {count + 1} plugs")
            # The last plug plays dead; it is polled in the dead runs only.
            dead_id = next(i for i, d in poll_loop.devices.items() if d.name == f"plug {count}")
            dead = poll_loop.devices.pop(dead_id)
            await under_test.cycle()  # warm-up

            requests_before = plugs.requests()
            await under_test.cycle()
            round_trips = (plugs.requests() - requests_before) / count

            handshakes_before = plugs.handshakes()
            plugs.set_mode(count, "hang")
            # Interleaved, so that whatever else the machine is doing weighs
            # on the three runs alike.
            prompt, late, dead_cycles = [], [], []
            for _ in range(cycles):
                prompt.append(await under_test.cycle())
                plugs.set_delay(LATE_S)
                late.append(await under_test.cycle())
                plugs.set_delay(0.0)
                poll_loop.devices[dead_id] = dead
                dead_cycles.append(await under_test.cycle())
                del poll_loop.devices[dead_id]
            handshakes = plugs.handshakes() - handshakes_before
            fresh = []
            if plugs.protocol == "smart":
                # What a handshake costs: drop every session before the cycle.
                for _ in range(cycles):
                    for device in poll_loop.devices.values():
                        await device.handle.disconnect()
                    fresh.append(await under_test.cycle())
        finally:
            await under_test.kasa.close()
            under_test.runtime.close()
    return Result(
        plugs.protocol,
        count,
        discover_s,
        round_trips,
        Run(prompt),
        Run(late),
        Run(dead_cycles),
        handshakes,
        Run(fresh) if fresh else None,
    )


def run_size(protocol: str, count: int, cycles: int, timeout_s: float) -> Result:
    with SimulatedPlugs(count + 1, protocol) as plugs:
        return asyncio.run(measure(plugs, count, cycles, timeout_s))


# --- Report -----------------------------------------------------------------------


def noise_allowance(seconds: float) -> float:
    return max(0.010, 0.10 * seconds)


@dataclass
class Verdicts:
    overlap: bool  # late - prompt within 1.5 x one plug's own latency cost
    dead: bool  # the dead plug delays the live plugs' lines by no more than noise
    cpu: bool  # under 2 ms of CPU per device poll
    complete: bool  # every live plug's lines in every cycle, the dead one failed

    @classmethod
    def of(cls, r: Result) -> Verdicts:
        prompt_s = r.prompt.median("lines_out_s")
        complete = all(run.complete(r.count) for run in (r.prompt, r.late, r.dead))
        return cls(
            overlap=r.late.median("lines_out_s") - prompt_s <= late_limit_s(r),
            dead=r.dead.median("lines_out_s") - prompt_s <= noise_allowance(prompt_s),
            cpu=r.prompt.median("cpu_s") / r.count < CPU_TARGET_S,
            complete=complete and all(c.failed == 1 for c in r.dead.cycles),
        )

    def all(self) -> bool:
        return self.overlap and self.dead and self.cpu and self.complete


def late_limit_s(r: Result) -> float:
    return LATE_FACTOR * r.round_trips * LATE_S


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(results: list[Result], timeout_s: float) -> bool:
    print(
        "\nms from the start of a cycle until the live plugs' lines were delivered: median (worst)"
    )
    header = (
        f"{'proto':>6}  {'N':>4}  {'prompt':>15}  {'late':>15}  {'late-prompt':>11}  {'limit':>6}  "
        f"{'dead run':>15}  {'dead adds':>9}  {'CPU/poll ms':>11}  {'trips':>5}  {'hs':>3}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        prompt_s = r.prompt.median("lines_out_s")
        late_s = r.late.median("lines_out_s")
        dead_s = r.dead.median("lines_out_s")
        print(
            f"{r.protocol:>6}  {r.count:>4}  "
            f"{ms(prompt_s):>7} ({ms(r.prompt.worst('lines_out_s')):>5})  "
            f"{ms(late_s):>7} ({ms(r.late.worst('lines_out_s')):>5})  "
            f"{ms(late_s - prompt_s):>11}  {ms(late_limit_s(r)):>6}  "
            f"{ms(dead_s):>7} ({ms(r.dead.worst('lines_out_s')):>5})  "
            f"{ms(dead_s - prompt_s):>9}  {ms(r.prompt.median('cpu_s') / r.count):>11}  "
            f"{r.round_trips:>5.2f}  {r.handshakes:>3}"
        )
    print(
        f"\nlimit: 1.5 x round trips per poll (trips) x {ms(LATE_S)} ms. dead adds: at most "
        "10 ms or 10% of prompt (noise); ready lines go out at once, one batch in flight "
        f"at a time; the dead plug's own timeout is {timeout_s:g} s. CPU/poll: this "
        "process's CPU time per device poll in the prompt run, lines formatted and "
        "delivered included. trips: requests the plugs answered per poll. hs: KLAP "
        "handshakes during the measured cycles (0: sessions kept between cycles)."
    )
    columns = ("latency overlaps", "dead adds nothing", "CPU < 2 ms", "all lines")
    print(f"\n{'proto':>6}  {'N':>4}  " + "".join(f"{column:<19}" for column in columns).rstrip())
    met = True
    for r in results:
        v = Verdicts.of(r)
        met &= v.all()
        cells = "".join(f"{verdict(ok):<19}" for ok in (v.overlap, v.dead, v.cpu, v.complete))
        print(f"{r.protocol:>6}  {r.count:>4}  {cells.rstrip()}")
    print()
    for r in results:
        if r.fresh is not None:
            print(
                f"{r.protocol} N={r.count}: every poll on a new KLAP session (handshake1, "
                f"handshake2, then the requests): lines out "
                f"{ms(r.fresh.median('lines_out_s'))} ms, CPU/poll "
                f"{ms(r.fresh.median('cpu_s') / r.count)} ms"
            )
    for r in results:
        print(
            f"{r.protocol} N={r.count}: discovery of {r.count + 1} static hosts "
            f"{r.discover_s:.2f} s; "
            f"cycle with the dead plug {r.dead.median('cycle_s'):.2f} s; "
            f"CPU/poll late {ms(r.late.median('cpu_s') / r.count)} ms; batches of lines per "
            f"cycle: prompt {r.prompt.median('batches'):g}, late {r.late.median('batches'):g}, "
            f"dead {r.dead.median('batches'):g}"
        )
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run (seconds)")
    parser.add_argument("--sizes", help="comma-separated plug counts (default 1,10,100,500)")
    parser.add_argument("--cycles", type=int, help="measured cycles per run")
    parser.add_argument(
        "--protocol", choices=("legacy", "smart", "both"), default="both", help="plugs to poll"
    )
    args = parser.parse_args(argv)
    sizes = [1, 10] if args.quick else [1, 10, 100, 500]
    if args.sizes:
        sizes = [int(size) for size in args.sizes.split(",")]
    cycles = args.cycles or (1 if args.quick else 7)
    protocols = ["legacy", "smart"] if args.protocol == "both" else [args.protocol]
    # The dead plug costs one timeout per dead cycle.
    timeout_s = 0.5 if args.quick else 1.0
    setup_logging("ERROR")
    # The collector logs as "kasa", python-kasa's own logger, which
    # setup_logging keeps at WARNING: the dead plug's warning is expected.
    logging.getLogger("kasa").setLevel(logging.ERROR)
    print(
        f"# bench_kasa (Python {sys.version.split()[0]}, python-kasa {version('python-kasa')}, "
        f"{os.cpu_count()} CPUs): {', '.join(FIXTURES[p] for p in protocols)} plugs, "
        f"{cycles} cycles per run, "
        f"late = +{LATE_S * 1000:g} ms per answer, dead plug timeout {timeout_s:g} s",
        flush=True,
    )
    results = []
    for protocol in protocols:
        for count in sizes:
            results.append(run_size(protocol, count, cycles, timeout_s))
            print(f"{protocol} N={count} done", file=sys.stderr, flush=True)
    met = report(results, timeout_s)
    print(f"\nall targets met: {'yes' if met else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
