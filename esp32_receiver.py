#!/usr/bin/env python3
"""ESP32 meter receiver: the pulse reader on the smart meter's LED posts here.

    POST /api/v1/readings   Authorization: Bearer <token>, JSON:
        {device_id, boot_id, seq, uptime_ms, ts?, imp_per_kwh, pulses_total,
         last_interval_ms?, rssi?, fw?}  or  {"readings": [...]}
    GET  /healthz           liveness
    GET  /api/v1/status     each device's last reading, for people

Answers 200 {"ok": true, "seq": n}; 400 naming the bad field; 401; 413; 415.
The body is checked in esp32_readings.py, energy accounted in
esp32_accounting.py (never counted twice) and the app served by the hardened
waitress server of esp32_http.py, tokens checked in esp32_tokens.py; this
file turns accepted readings into Carbon lines (``home.electricity.meter.power_kw``,
``power_watts``, ``energy_kwh``, ``pulses_total``, ``rssi``) and answers.
docs/esp32.md describes the contract and the set-up.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from esp32_accounting import (
    ACCEPTED,
    DUPLICATE,
    IMPLAUSIBLE,
    OUTCOMES,
    REGRESSION,
    Applied,
    MeterAccounts,
    MeterReading,
)
from esp32_http import ReceiverServer
from esp32_readings import BadReading, parse_body, shown
from esp32_tokens import TokenCheck, check_tokens, is_loopback
from line_batcher import LineBatcher
from runtime import (
    EXIT_NO_DEVICE,
    EXIT_OK,
    EXIT_UNDELIVERED,
    Runtime,
    Source,
    format_table,
    run_source,
)
from service import sd_notify, stop_on_signals
from settings import ConfigError
from state import save_json

SOURCE = "esp32"
READINGS_PATH = "/api/v1/readings"
# The first device to post is the whole-house meter, "meter"; others become
# "meter_<device_id>" unless DEVICE_NAMES names them (state.NameMap).
MAIN_METER_NAME = "meter"
# A client's repeated mistakes are logged at warning level once a minute.
COMPLAINT_INTERVAL_S = 60.0

# --- Timestamps and metrics ------------------------------------------------------------


def sample_timestamp(
    device_ts: float | None,
    received_at: float,
    behind_ms: float,
    max_skew_s: float,
    max_age_s: float,
) -> tuple[int, bool]:
    """(whole seconds, True if the device's own ``ts`` was used).

    The device's ts wins when it is at most ``max_skew_s`` ahead of the server
    and ``max_age_s`` behind (a reading buffered while off-line). Otherwise the
    receive time, less how far the reading's uptime is ``behind_ms`` the newest
    reading of the same post, so a batch does not pile onto one second.
    """
    if device_ts is not None and received_at - max_age_s <= device_ts <= received_at + max_skew_s:
        return int(device_ts), True
    return int(received_at - behind_ms / 1000), False


def energy_timestamp(timestamp: int, last_energy_ts: int) -> int:
    """When to send a device's energy total: at ``timestamp``, but always
    after the last total sent. A late reading (of an earlier boot, say) raises
    the total; sent back at its own time it would make the series go down
    there. One total per second, so no total overwrites another in whisper,
    whatever order the lines reach Carbon in."""
    return max(timestamp, last_energy_ts + 1)


def meter_values(reading: MeterReading, applied: Applied) -> dict[str, float | None]:
    """The metrics of one accepted reading (None: not sent)."""
    power_watts = applied.power_watts
    return {
        "power_kw": None if power_watts is None else round(power_watts / 1000, 6),
        "power_watts": None if power_watts is None else round(power_watts, 3),
        "energy_kwh": applied.energy_kwh,
        "pulses_total": reading.pulses_total,
        "rssi": reading.rssi,
    }


# --- The receiver --------------------------------------------------------------------


class Answer:
    """An HTTP answer: status, JSON payload, and the health counter it counts in."""

    def __init__(self, status: int, payload: dict[str, Any], kind: str = "requests_ok") -> None:
        self.status = status
        self.payload = payload
        self.kind = kind


def _error(status: int, kind: str, message: str, field: str = "") -> Answer:
    payload: dict[str, Any] = {"ok": False, "error": message}
    if field:
        payload["field"] = field
    return Answer(status, payload, kind)


class MeterReceiver:
    """Checks posts, accounts readings, queues their lines, keeps health.

    Thread-safe: waitress calls ``receive`` from several threads; one lock
    keeps the accounting, the names and the order of lines consistent.
    """

    REQUEST_COUNTERS = (
        "requests_ok",
        "requests_bad",
        "requests_unauthorized",
        "requests_too_large",
        "requests_wrong_type",
        "connections_dropped",
    )

    def __init__(self, runtime: Runtime, tokens: TokenCheck) -> None:
        self.runtime = runtime
        self.settings = settings = runtime.settings
        self.log = runtime.log
        self.tokens = tokens
        self.state_path = runtime.state_path("meter.json")
        self.accounts = MeterAccounts(
            self.state_path,
            idle_timeout_s=settings.esp32_idle_timeout_s,
            max_power_watts=settings.esp32_max_power_watts,
        )
        self.lock = threading.Lock()
        self.first_accepted = threading.Event()  # for --once
        self.started_at = time.time()
        self.counters = runtime.health.extra  # read by the status page
        for name in (*self.REQUEST_COUNTERS, "timestamps_replaced"):
            runtime.health.count(name, 0)
        for outcome in OUTCOMES:
            runtime.health.count(f"readings_{outcome}", 0)
        self._complaints: dict[tuple[str, str], float] = {}
        interval_s = settings.meter_interval_s
        self.batcher = LineBatcher(
            runtime, interval_s, periodic=self.periodic, periodic_interval_s=interval_s
        )

    # --- one POST -------------------------------------------------------------------

    def receive(
        self,
        authorization: str | None,
        content_type: str | None,
        content_length: int | None,
        read_body: Any,
        client: str = "",
    ) -> Answer:
        """Answer one POST. ``read_body()`` returns the bytes (or raises
        RequestEntityTooLarge); it is called only once the headers pass."""
        answer = self._receive(authorization, content_type, content_length, read_body)
        with self.lock:
            self.runtime.health.count(answer.kind)
        if answer.status != 200:
            self._complain(client, answer.kind, answer.payload["error"])
        return answer

    def _receive(
        self,
        authorization: str | None,
        content_type: str | None,
        content_length: int | None,
        read_body: Any,
    ) -> Answer:
        allowed = self.tokens.allowed(authorization)
        if allowed is None:
            return _error(401, "requests_unauthorized", "missing or wrong bearer token")
        mimetype = (content_type or "").split(";")[0].strip().lower()
        if mimetype != "application/json":
            return _error(
                415,
                "requests_wrong_type",
                f"Content-Type must be application/json, got {shown(mimetype)}",
            )
        limit = self.settings.esp32_max_body_bytes
        if content_length is not None and content_length > limit:
            return _error(413, "requests_too_large", f"body over {limit} bytes")
        try:
            body = read_body()
        except RequestEntityTooLarge:
            return _error(413, "requests_too_large", f"body over {limit} bytes")
        if len(body) > limit:
            return _error(413, "requests_too_large", f"body over {limit} bytes")
        try:
            readings = parse_body(body)
        except BadReading as exc:
            return _error(400, "requests_bad", str(exc), exc.field)
        for index, reading in enumerate(readings):
            if not allowed.may_post(reading.device_id):
                field = f"readings[{index}].device_id" if len(readings) > 1 else "device_id"
                return _error(
                    401,
                    "requests_unauthorized",
                    f"{field}: this token may not post for {reading.device_id!r}",
                    field,
                )
        return self.accept(readings, time.time())

    def accept(self, readings: Sequence[MeterReading], received_at: float) -> Answer:
        """Account checked readings, queue their lines; the 200 (or 400) answer."""
        settings = self.settings
        # Oldest first within each boot, whatever order the body had.
        order: dict[tuple[str, str], int] = {}
        for reading in readings:
            order.setdefault((reading.device_id, reading.boot_id), len(order))
        readings = sorted(readings, key=lambda r: (order[(r.device_id, r.boot_id)], r.seq))
        newest_uptime: dict[tuple[str, str], int] = {}
        for reading in readings:
            key = (reading.device_id, reading.boot_id)
            newest_uptime[key] = max(newest_uptime.get(key, 0), reading.uptime_ms)

        lines: list[str] = []
        accepted = 0
        with self.lock:
            new_devices = {r.device_id for r in readings} - set(self.accounts.devices)
            if len(self.accounts.devices) + len(new_devices) > settings.esp32_max_devices:
                return _error(
                    400,
                    "requests_bad",
                    f"device_id: more than ESP32_MAX_DEVICES={settings.esp32_max_devices}"
                    " devices; raise it in config_local.py",
                    "device_id",
                )
            refused = self._series_clash(new_devices)
            if refused is not None:
                return refused
            for reading in readings:
                applied = self.accounts.apply(reading, received_at)
                self.runtime.health.count(f"readings_{applied.outcome}")
                if applied.outcome != ACCEPTED:
                    self._note_refused(reading, applied.outcome, applied.reason)
                    continue
                accepted += 1
                behind_ms = newest_uptime[(reading.device_id, reading.boot_id)] - reading.uptime_ms
                timestamp, own_ts = sample_timestamp(
                    reading.ts,
                    received_at,
                    behind_ms,
                    settings.esp32_max_clock_skew_s,
                    settings.esp32_max_reading_age_s,
                )
                if reading.ts is not None and not own_ts:
                    self.runtime.health.count("timestamps_replaced")
                segment = self.runtime.names.name_for(reading.device_id, MAIN_METER_NAME)
                values = meter_values(reading, applied)
                device = self.accounts.devices[reading.device_id]
                energy_ts = device.energy_ts = energy_timestamp(timestamp, device.energy_ts)
                energy = {"energy_kwh": values.pop("energy_kwh")}
                lines.extend(self.runtime.lines("", values, timestamp, group=segment))
                lines.extend(self.runtime.lines("", energy, energy_ts, group=segment))
            # On disk before the 200: the device drops what we acknowledge.
            self.batcher.store(lines)
        if accepted and not self.first_accepted.is_set():
            self.first_accepted.set()
        return Answer(200, {"ok": True, "seq": readings[-1].seq, "accepted": accepted})

    def _series_clash(self, new_devices: set[str]) -> Answer | None:
        """Refuses a new device that would write the series of a known one:
        an id differing only in case (names ignore case). Ids whose names
        come out alike (``a.b`` and ``ab``) get names of their own from the
        name map; this is the last guard that no two ids share a series."""
        names = self.runtime.names
        writers = {
            names.name_for(device_id, MAIN_METER_NAME): device_id
            for device_id in self.accounts.devices
        }
        for device_id in sorted(new_devices):
            segment = names.name_for(device_id, MAIN_METER_NAME)
            other = writers.setdefault(segment, device_id)
            if other == device_id:
                continue
            if other.lower() == device_id.lower():
                why = f"differs from the known device {other!r} only in case"
            else:
                why = f"would write {segment}, the series of the known device {other!r}"
            return _error(
                400,
                "requests_bad",
                f"device_id: {device_id!r} {why}; give it another id, or a name of its own"
                " in DEVICE_NAMES",
                "device_id",
            )
        return None

    def _note_refused(self, reading: MeterReading, outcome: str, reason: str = "") -> None:
        where = f"{reading.device_id} boot {reading.boot_id} seq {reading.seq}"
        if outcome == DUPLICATE:
            self.log.debug("%s: seen already; ignored", where)
        elif outcome == REGRESSION:
            self.log.warning(
                "%s: pulses_total %d is below the boot's count; change ignored",
                where,
                reading.pulses_total,
            )
        elif outcome == IMPLAUSIBLE and reason:
            self.log.warning("%s: %s; reading refused", where, reason)
        elif outcome == IMPLAUSIBLE:
            self.log.warning(
                "%s: pulses_total %d is more than %g W could make (or imp_per_kwh changed"
                " within the boot); reading refused",
                where,
                reading.pulses_total,
                self.settings.esp32_max_power_watts,
            )

    def dropped_connection(self, client: str, why: str) -> None:
        """A connection closed for being too slow or to make room (waitress's
        thread): counted, and said once a minute per client."""
        with self.lock:
            self.runtime.health.count("connections_dropped")
        self._complain(client, "connections_dropped", why)

    def _complain(self, client: str, kind: str, message: str) -> None:
        """Log a refused post: a warning once a minute per client and kind."""
        now = time.monotonic()
        key = (client, kind)
        if now - self._complaints.get(key, -math.inf) >= COMPLAINT_INTERVAL_S:
            if len(self._complaints) > 1000:
                self._complaints.clear()
            self._complaints[key] = now
            self.log.warning("post from %s refused (%s): %s", client or "?", kind, message)
        else:
            self.log.debug("post from %s refused (%s): %s", client or "?", kind, message)

    # --- every flush: health and the saved state ---------------------------------------

    def periodic(self, timestamp: int) -> list[str]:
        """Health lines; saves the accounting state when it changed."""
        now = time.time()
        with self.lock:
            fresh = [
                device
                for device in self.accounts.devices.values()
                if now - device.last.get("received_at", -math.inf) <= self.settings.esp32_stale_s
            ]
            self.runtime.health.devices_ok = len(fresh)
            self.runtime.health.devices_failed = len(self.accounts.devices) - len(fresh)
            state = self.accounts.to_state() if self.accounts.changed else None
            lines = self.runtime.health_lines(timestamp)
        path = self.state_path
        if (
            state is not None
            and path is not None
            and not save_json(path, state, "the energy state", self.log)
        ):
            with self.lock:
                self.accounts.changed = True  # not on disk: written at the next cycle
        return lines

    def status(self) -> dict[str, Any]:
        """Each device's last reading and the receiver's counters, for people."""
        with self.lock:
            devices = [
                {
                    "device_id": device.device_id,
                    "name": self.runtime.names.name_for(device.device_id, MAIN_METER_NAME),
                    "energy_kwh": device.energy_kwh,
                    "boots_seen": len(device.boots) + len(device.retired_boot_ids),
                    "last": dict(device.last),
                }
                for device in self.accounts.devices.values()
            ]
            counters = dict(self.counters)
        return {
            "ok": True,
            "started_at": int(self.started_at),
            "devices": devices,
            "counters": counters,
        }


# --- The web app ------------------------------------------------------------------------


def create_app(receiver: MeterReceiver) -> Flask:
    app = Flask(__name__)
    # Chunked bodies are cut off at the limit too (waitress also enforces it).
    app.config["MAX_CONTENT_LENGTH"] = receiver.settings.esp32_max_body_bytes

    def answer(result: Answer) -> Response:
        response = Response(
            json.dumps(result.payload, separators=(",", ":")),
            status=result.status,
            mimetype="application/json",
        )
        if result.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="esp32"'
        return response

    @app.post(READINGS_PATH)
    def readings() -> Response:
        return answer(
            receiver.receive(
                request.headers.get("Authorization"),
                request.headers.get("Content-Type"),
                request.content_length,
                lambda: request.get_data(cache=False),
                client=request.remote_addr or "",
            )
        )

    @app.get("/healthz")
    def healthz() -> Response:
        return answer(Answer(200, {"ok": True}))

    @app.get("/api/v1/status")
    def status() -> Response:
        return answer(Answer(200, receiver.status()))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        # 404, 405 and the like, as JSON like everything else.
        return answer(Answer(exc.code or 400, {"ok": False, "error": exc.name}))

    return app


# --- Running it ---------------------------------------------------------------------------


def discover_table(receiver: MeterReceiver) -> str:
    """--discover: the devices that have posted (from the saved state)."""
    rows = []
    for device in receiver.status()["devices"]:
        last = device["last"]
        seen = last.get("received_at")
        rows.append(
            (
                device["name"],
                device["device_id"],
                last.get("fw", ""),
                f"{device['energy_kwh']:.3f}",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seen)) if seen else "never",
            )
        )
    columns = ("name", "device id", "firmware", "energy kWh", "last post")
    return format_table(columns, rows)


def open_receiver(runtime: Runtime, tokens: TokenCheck) -> tuple[MeterReceiver, ReceiverServer]:
    """The receiver and its listening server; raises ConfigError."""
    settings = runtime.settings
    if not tokens.enabled and not is_loopback(settings.esp32_bind):
        raise ConfigError(
            f"ESP32_TOKEN: no token set; set ESP32_TOKEN (or ESP32_DEVICE_TOKENS) before"
            f" listening on {settings.esp32_bind}, or use --bind 127.0.0.1"
        )
    receiver = MeterReceiver(runtime, tokens)
    try:
        server = ReceiverServer(
            create_app(receiver),
            settings.esp32_bind,
            settings.esp32_port,
            settings.esp32_max_body_bytes,
            on_dropped=receiver.dropped_connection,
        )
    except OSError as exc:
        raise ConfigError(
            f"ESP32_PORT: cannot listen on {settings.esp32_bind}:{settings.esp32_port}:"
            f" {exc.strerror or exc}"
        ) from None
    return receiver, server


def serve(
    args: argparse.Namespace,
    runtime: Runtime,
    receiver: MeterReceiver,
    server: ReceiverServer,
) -> int:
    """Serve until SIGTERM/SIGINT (or, with --once, the first accepted
    reading); then finish, send or spool what is left, save the state."""
    with stop_on_signals() as stop:
        if not receiver.tokens.enabled:
            runtime.log.warning("no token set: any local client may post (loopback only)")
        receiver.batcher.start()
        server.start()
        runtime.log.info(
            "listening on %s:%d%s, sending to %s",
            server.host,
            server.port,
            READINGS_PATH,
            "stdout" if runtime.dry_run else runtime.sink.describe_destinations(),
        )
        sd_notify("READY=1")
        try:
            while not stop.is_set() and server.alive:
                if args.once and receiver.first_accepted.is_set():
                    break
                stop.wait(0.2)
            server_died = not server.alive
        finally:
            sd_notify("STOPPING=1")
            runtime.log.info("stopping: finishing requests under way, sending what is left")
            try:
                server.stop()
            finally:
                delivered = receiver.batcher.stop()  # also saves the energy state
    if server_died:
        print(f"{SOURCE}: the HTTP server stopped unexpectedly (see the log)", file=sys.stderr)
        return EXIT_UNDELIVERED
    # A service reports how its last lines went; --once, how the whole run went.
    if not delivered or (args.once and not receiver.batcher.delivered_all):
        print(runtime.undelivered_message(), file=sys.stderr)
        return EXIT_UNDELIVERED
    return EXIT_OK


class Esp32Source(Source):
    source = SOURCE
    description = "ESP32 meter pulse reader: HTTP receiver to Graphite"
    interval_setting = "meter_interval_s"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.prog = "esp32_receiver"
        parser.add_argument("--bind", metavar="ADDRESS", help="listen address (ESP32_BIND)")
        parser.add_argument("--port", type=int, metavar="N", help="listen port (ESP32_PORT)")

    @classmethod
    def overrides(cls, args: argparse.Namespace) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        if args.bind:
            overrides["ESP32_BIND"] = args.bind
        if args.port is not None:
            overrides["ESP32_PORT"] = args.port
        return overrides

    @classmethod
    def run(cls, runtime: Runtime, args: argparse.Namespace) -> int:
        tokens = check_tokens(runtime.settings)
        if args.discover:
            receiver = MeterReceiver(runtime, tokens)
            sys.stdout.write(discover_table(receiver))
            return EXIT_OK if receiver.accounts.devices else EXIT_NO_DEVICE
        receiver, server = open_receiver(runtime, tokens)
        return serve(args, runtime, receiver, server)


def main(argv: Sequence[str] | None = None) -> int:
    return run_source(Esp32Source, argv)


if __name__ == "__main__":
    sys.exit(main())
