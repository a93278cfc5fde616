#!/usr/bin/env python3
"""MQTT power sources to Graphite: a Hildebrand Glow display and rule-mapped devices.

Subscribe (again on every reconnect), match each message's topic, extract:

- Glow (``glow/<id>/SENSOR/electricitymeter``, ``.../gasmeter``, ``glow/<id>/STATE``):
  ``home.electricity.glow.<device>.`` ``power_watts``, ``power_kw``,
  ``energy_import_kwh``, ``energy_export_kwh``, ``energy_today_kwh``; gas under
  ``home.gas.glow.<device>.`` ``energy_kwh``, ``energy_today_kwh``, ``volume_m3``;
  the Zigbee link (STATE) as health. Stamped with the meter's own timestamp.
  The meter's quirks are dropped and counted: power ``-8388.608`` kW (no
  reading) and a cumulative register reading 0 or less than before
  (``mqtt_glow.py`` parses and checks).
- Everything else through rules (``mqtt_rules.py``): built-in presets for
  Tasmota, Shelly Gen1/Gen2, ESPHome and emonhub, and the user's own, to
  ``home.electricity.mqtt.<device>.<metric>``, stamped with the receive time.

Lines are batched and sent (or spooled) through graphite_helper; health goes
to ``home.electricity.health.mqtt.*``. The broker connection (reconnects,
refused logins, PUBACK once lines are on disk) is ``mqtt_broker.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from graphite_helper import is_valid_path
from line_batcher import LineBatcher
from mqtt_broker import BrokerLink, broker_address
from mqtt_glow import (
    GLOW_INVALID_POWER_KW,
    RegisterGuard,
    parse_glow_electricity,
    parse_glow_gas,
    parse_glow_state,
    sample_time,
)
from mqtt_rules import (
    PayloadError,
    RuleError,
    RuleTable,
    decode_json,
    split_filter,
    topic_matches,
)
from runtime import (
    EXIT_CONFIG,
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
from state import read_json, save_json

SOURCE = "mqtt"
log = logging.getLogger(f"electricity.{SOURCE}")  # the runtime's logger too

# A topic's refused payloads are said at warning level once this often.
COMPLAINT_INTERVAL_S = 3600.0
# Devices named at most: a rule that takes its device from a level that keeps
# changing (a counter, a time) must not grow names.json for ever.
MAX_DEVICES = 500


# --- Match: every message, Glow or rules ----------------------------------------


@dataclass
class Outcome:
    """What one message gave: lines, and what ``--discover``/``--once``/health need."""

    status: str  # "ok", "invalid" or "ignored"
    sources: list[str] = field(default_factory=list)  # "glow" or the rule names that matched
    devices: list[str] = field(default_factory=list)  # metric segments
    lines: list[str] = field(default_factory=list)
    note: str = ""
    health_only: bool = False  # Glow's STATE: the link to the meter, no reading


class MessageHandler:
    """Topic and payload in, Carbon lines out. No MQTT here: tests call it directly."""

    def __init__(self, runtime: Runtime, rules: RuleTable) -> None:
        self.runtime = runtime
        settings = runtime.settings
        self.rules = rules
        self.glow_levels = glow_prefix_levels(settings.mqtt_glow_prefix)
        glow_id = (*self.glow_levels, "+")
        self._glow_filters = {"STATE": (*glow_id, "STATE"), "SENSOR": (*glow_id, "SENSOR", "+")}
        self.gas_prefix = settings.mqtt_gas_prefix
        if not is_valid_path(self.gas_prefix):
            raise ConfigError(
                f"MQTT_GAS_PREFIX: must be dotted segments of [a-z0-9_], got {self.gas_prefix!r}"
            )
        self.registers = RegisterGuard(runtime.state_path("glow_registers.json"))
        self.stale_s = settings.mqtt_stale_s
        self.counts = dict.fromkeys(
            (
                "messages_ok",
                "messages_invalid",
                "messages_ignored",
                "glow_power_invalid",
                "glow_register_glitches",
            ),
            0,
        )
        self._segments: dict[tuple[str, str], str] = {}  # (source, device id) -> segment
        # Which device id writes each segment, kept across restarts, so two
        # ids that name alike (tele/Kitchen, tele/kitchen) never share a series.
        self._owners_path = runtime.state_path("mqtt_device_ids.json")
        owners = read_json(self._owners_path, {}) if self._owners_path else {}
        self._owners: dict[str, str] = {
            str(segment): device_id
            for segment, device_id in (owners.items() if isinstance(owners, dict) else ())
            if isinstance(device_id, str)
        }
        self._too_many_devices = False
        self._last_heard: dict[str, float] = {}  # device segment -> monotonic time
        self._complaints: dict[str, float] = {}  # topic -> when its bad payload was last said

    @property
    def subscriptions(self) -> list[str]:
        glow = []
        if self.glow_levels:
            prefix = "/".join(self.glow_levels)
            glow = [f"{prefix}/+/SENSOR/#", f"{prefix}/+/STATE"]
        return glow + self.rules.subscriptions

    def segment(self, device_id: str, source: str = "glow") -> str | None:
        """A device's metric segment (named once, then remembered); None past MAX_DEVICES."""
        segment = self._segments.get((source, device_id))
        if segment is not None:
            return segment
        if len(self._segments) >= MAX_DEVICES:
            if not self._too_many_devices:
                log.warning(
                    "more than %d devices: new ones are dropped (does a rule take its "
                    "device from a topic level that keeps changing?)",
                    MAX_DEVICES,
                )
                self._too_many_devices = True
            return None
        segment = self._claim(source, device_id, self.runtime.names.name_for(device_id, device_id))
        self._segments[source, device_id] = segment
        return segment

    def _claim(self, source: str, device_id: str, segment: str) -> str:
        """``segment`` for ``device_id`` unless another id writes it already;
        then a segment of its own (its name and a hash of its id), said once."""
        owner = self._owners.get(f"{source}.{segment}")
        if owner is None or owner == device_id:
            if owner is None:
                self._owners[f"{source}.{segment}"] = device_id
                self._save_owners()
            return segment
        names = self.runtime.names
        if names.overrides.get(device_id.lower()) == segment:
            # A replaced device named as its predecessor: it takes the series
            # (the name map gives the old one another name).
            self._owners[f"{source}.{segment}"] = device_id
            self._save_owners()
            log.info(
                "%s.%s now belongs to %r, as DEVICE_NAMES says (it was %r)",
                source,
                segment,
                device_id,
                owner,
            )
            return segment
        suffix = hashlib.sha256(device_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        alias = f"{device_id}#{suffix}"  # a NameMap key of its own, whatever the case
        own = names.name_for(alias, f"{segment}_{suffix}")
        if self._owners.get(f"{source}.{own}") == device_id:
            return own  # found and said on an earlier run
        self._owners[f"{source}.{own}"] = device_id
        self._save_owners()
        log.warning(
            "devices %r and %r would both write %s.%s: %r writes %s instead",
            owner,
            device_id,
            source,
            segment,
            device_id,
            own,
        )
        return own

    def _save_owners(self) -> None:
        if self._owners_path is None:
            return
        save_json(self._owners_path, self._owners, "MQTT device ids", log)

    @property
    def sources(self) -> list[str]:
        """What ``--once`` waits for: Glow (when on) and each rule set."""
        return (["glow"] if self.glow_levels else []) + self.rules.names

    def handle(self, topic: str, payload: bytes, retained: bool, received: float) -> Outcome:
        levels = topic.split("/")
        glow_kind = self._glow_kind(levels)
        if glow_kind:
            outcome = self._glow(levels[len(self.glow_levels)], glow_kind, payload, int(received))
        elif retained:
            # Its value may be days old and it has no timestamp of its own.
            outcome = Outcome("ignored", note="retained message without a timestamp")
        else:
            outcome = self._rules(topic, payload, int(received))
        self.counts[f"messages_{outcome.status}"] += 1
        now = time.monotonic()
        shown = topic if len(topic) <= 120 else topic[:117] + "..."
        if outcome.status == "invalid" and self._first_complaint(topic, now):
            # The note names what is wrong, never the payload's content.
            log.warning(
                "%s: message refused: %s (said once an hour per topic)", shown, outcome.note
            )
        else:
            log.debug(
                "%s: %s, %d lines %s", shown, outcome.status, len(outcome.lines), outcome.note
            )
        for device in outcome.devices:
            self._last_heard[device] = now
        return outcome

    def _first_complaint(self, topic: str, now: float) -> bool:
        """True once an hour per topic (at most 1000 topics remembered)."""
        if now - self._complaints.get(topic, -math.inf) < COMPLAINT_INTERVAL_S:
            return False
        if len(self._complaints) >= 1000:
            self._complaints.clear()
        self._complaints[topic] = now
        return True

    def _glow_kind(self, levels: Sequence[str]) -> str:
        """'electricitymeter', 'gasmeter', 'STATE', or '' for a topic that is not Glow's."""
        if not self.glow_levels:
            return ""
        if topic_matches(self._glow_filters["STATE"], levels):
            return "STATE"
        if topic_matches(self._glow_filters["SENSOR"], levels):
            return levels[-1]
        return ""

    def _glow(self, glow_id: str, kind: str, payload: bytes, received: int) -> Outcome:
        parse = {
            "electricitymeter": parse_glow_electricity,
            "gasmeter": parse_glow_gas,
            "STATE": parse_glow_state,
        }.get(kind)
        if parse is None:
            return Outcome("ignored", note=f"Glow {kind} is not read")
        try:
            reading = parse(decode_json(payload))
        except PayloadError as exc:
            return Outcome("invalid", ["glow"], note=str(exc))
        timestamp = sample_time(reading.timestamp, received)
        device = self.segment(glow_id)
        if device is None:
            return Outcome("ignored", ["glow"], note="too many devices")
        values = dict(reading.values)
        if reading.power_invalid:
            self.counts["glow_power_invalid"] += 1
            log.debug(
                "glow %s: power %g kW means no reading: dropped", glow_id, GLOW_INVALID_POWER_KW
            )
        for register in reading.registers:
            verdict = self.registers.check(f"{glow_id}/{register.key}", register.cumulative)
            if verdict == "ok":
                values[register.metric] = register.cumulative
                values.update(register.companions)
            elif verdict == "glitch":
                self.counts["glow_register_glitches"] += 1
                log.debug(
                    "glow %s: %s reads %g: a glitch, dropped",
                    glow_id,
                    register.key,
                    register.cumulative,
                )
        if kind == "STATE":
            lines = self.runtime.lines(device, values, timestamp, group=f"health.{SOURCE}.glow")
        elif kind == "gasmeter":
            lines = self.runtime.lines(
                device, values, timestamp, group="glow", prefix=self.gas_prefix
            )
        else:
            lines = self.runtime.lines(device, values, timestamp, group="glow")
        return Outcome(
            "ok" if lines else "ignored", ["glow"], [device], lines, health_only=kind == "STATE"
        )

    def _rules(self, topic: str, payload: bytes, received: int) -> Outcome:
        extraction = self.rules.extract(topic, payload)
        names = list(dict.fromkeys(rule.name for rule in extraction.rules))
        if not extraction.rules:
            return Outcome("ignored", note="no rule matches")
        by_device: dict[tuple[str, str], dict[str, float]] = {}
        refused = False
        for value in extraction.values:
            device = self.segment(value.device_id, value.rule.source)
            if device is None:
                refused = True
                continue
            by_device.setdefault((value.rule.source, device), {})[value.metric] = value.value
        lines: list[str] = []
        for (source, device), values in by_device.items():
            lines += self.runtime.lines(device, values, received, group=source)
        devices = list(dict.fromkeys(device for _source, device in by_device))
        if extraction.problems:
            return Outcome("invalid", names, devices, lines, "; ".join(extraction.problems))
        if not lines and extraction.values and not refused:
            # Figures, but no valid metric path from them (a topic level of
            # hundreds of characters): counted in values_rejected too.
            return Outcome("invalid", names, note="no valid metric path for its figures")
        if not lines:
            note = "too many devices" if refused else "none of the rules' figures in it"
            return Outcome("ignored", names, note=note)
        return Outcome("ok", names, devices, lines)

    def health_lines(self, timestamp: int, **extra: Any) -> list[str]:
        """The runtime's health figures plus this source's counters."""
        # Called from the sender thread while paho's thread counts: copying a
        # dict is one step for CPython, so the copies are consistent.
        heard = list(self._last_heard.values())
        counts = dict(self.counts)
        cutoff = time.monotonic() - self.stale_s
        health = self.runtime.health
        health.devices_ok = sum(1 for at in heard if at >= cutoff)
        health.devices_failed = len(heard) - health.devices_ok
        return self.runtime.health_lines(timestamp, **counts, **extra)

    def close(self) -> None:
        self.registers.save()


def glow_prefix_levels(prefix: str) -> tuple[str, ...]:
    """MQTT_GLOW_PREFIX as topic levels (none when Glow is off). Raises ConfigError."""
    if not prefix:
        return ()
    try:
        levels = split_filter(prefix)
    except RuleError as exc:
        raise ConfigError(f"MQTT_GLOW_PREFIX: {exc}") from None
    if any(level in ("", "+", "#") for level in levels):
        raise ConfigError(f"MQTT_GLOW_PREFIX: must be plain topic levels, got {prefix!r}")
    return levels


# --- Run: listen, --once, --discover ------------------------------------------------


def _no_answer(link: BrokerLink, waited_s: float) -> str:
    if not link.connects:
        reason = link.client.connect_error or "no connection"
        return f"{SOURCE}: broker {link.describe()} unreachable within {waited_s:g} s ({reason})"
    return f"{SOURCE}: no reading within {waited_s:g} s"


def listen(runtime: Runtime, handler: MessageHandler, once: bool) -> int:
    """Subscribe and send until stopped (or, with --once, until every source spoke)."""
    settings = runtime.settings
    wanted = set(handler.sources)
    heard: set[str] = set()
    all_heard = threading.Event()
    batcher: LineBatcher

    def on_message(topic: str, payload: bytes, retained: bool) -> bool:
        outcome = handler.handle(topic, payload, retained, time.time())
        safe = batcher.store(outcome.lines)  # on disk before the PUBACK
        if once and outcome.status == "ok" and not outcome.health_only:
            heard.update(outcome.sources)
            if heard >= wanted:
                all_heard.set()
        return safe

    link = BrokerLink(
        settings,
        handler.subscriptions,
        on_message,
        client_suffix="-once" if once else "",
        persistent=not once,
    )
    batcher = LineBatcher(
        runtime,
        flush_interval_s=settings.mqtt_flush_interval_s,
        max_lines=settings.mqtt_flush_lines,
        periodic=lambda ts: handler.health_lines(
            ts, connected=int(link.connected), connects=link.connects
        ),
        periodic_interval_s=settings.mqtt_health_interval_s,
    )
    # Installed before anything starts and kept until the last line is out: a
    # second SIGTERM or Ctrl-C cannot cut the final flush short.
    with stop_on_signals() as stop:
        batcher.start()
        link.start()
        sd_notify("READY=1")
        runtime.log.info(
            "listening to broker %s, sending to %s",
            link.describe(),
            "stdout" if runtime.dry_run else runtime.sink.describe_destinations(),
        )
        deadline = time.monotonic() + settings.mqtt_once_timeout_s
        while not stop.wait(0.2):
            if once and (all_heard.is_set() or link.refused or time.monotonic() >= deadline):
                break
        sd_notify("STOPPING=1")
        # No message after this; what is waiting is sent or spooled.
        link.stop()
        batcher.stop()
        handler.close()
    delivered = batcher.delivered_all
    if not once:
        runtime.log.info("stopped")
        return EXIT_OK
    if link.refused:
        print(
            f"{SOURCE}: broker {link.describe()} refused the login ({link.refused})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if not delivered:
        print(runtime.undelivered_message(), file=sys.stderr)
        return EXIT_UNDELIVERED
    if not heard:
        print(_no_answer(link, settings.mqtt_once_timeout_s), file=sys.stderr)
        return EXIT_NO_DEVICE
    if heard < wanted:
        runtime.log.warning(
            "no reading within %g s from: %s",
            settings.mqtt_once_timeout_s,
            ", ".join(sorted(wanted - heard)),
        )
    return EXIT_OK


@dataclass
class TopicSeen:
    messages: int = 0
    outcome: Outcome | None = None


def discover(runtime: Runtime, handler: MessageHandler) -> int:
    """Listen to every topic for MQTT_DISCOVER_S; print each with what reads it."""
    settings = runtime.settings
    seen: dict[str, TopicSeen] = {}
    lock = threading.Lock()

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        # Retained messages are what make discovery quick: read them like fresh ones.
        outcome = handler.handle(topic, payload, False, time.time())
        with lock:
            entry = seen.setdefault(topic, TopicSeen())
            entry.messages += 1
            entry.outcome = outcome

    link = BrokerLink(settings, ["#"], on_message, client_suffix="-discover", persistent=False)
    with stop_on_signals() as stop:
        link.start()
        runtime.log.info(
            "listening to every topic on %s for %g s", link.describe(), settings.mqtt_discover_s
        )
        deadline = time.monotonic() + settings.mqtt_discover_s
        while not stop.wait(0.2) and not link.refused and time.monotonic() < deadline:
            pass
        link.stop()
    if link.refused:
        print(
            f"{SOURCE}: broker {link.describe()} refused the login ({link.refused})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    with lock:
        rows = [_discover_row(topic, entry) for topic, entry in sorted(seen.items())]
    if not rows:
        print(_no_answer(link, settings.mqtt_discover_s), file=sys.stderr)
        return EXIT_NO_DEVICE
    sys.stdout.write(format_table(("topic", "messages", "rule", "device", "values"), rows))
    return EXIT_OK


def _discover_row(topic: str, entry: TopicSeen) -> tuple[str, ...]:
    outcome = entry.outcome
    assert outcome is not None
    values = " ".join(
        f"{path.rsplit('.', 1)[-1]}={value}"
        for path, value, _ts in (line.split() for line in outcome.lines)
    )
    if outcome.status != "ok":
        values = f"({outcome.status}: {outcome.note})" if outcome.note else f"({outcome.status})"
    return (
        topic,
        str(entry.messages),
        ",".join(outcome.sources) or "-",
        ",".join(outcome.devices) or "-",
        values,
    )


class MqttSource(Source):
    source = SOURCE
    description = "MQTT power sources (Glow, Tasmota, Shelly, ...) to Graphite"
    interval_setting = "mqtt_flush_interval_s"
    discover_dry_run = True  # discovery sends nothing and writes no state

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--broker", metavar="HOST[:PORT]", help="MQTT broker (or MQTT_BROKER)")

    @classmethod
    def overrides(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {"MQTT_BROKER": args.broker} if args.broker else {}

    @classmethod
    def run(cls, runtime: Runtime, args: argparse.Namespace) -> int:
        settings = runtime.settings
        broker_address(settings)
        try:
            rules = RuleTable.from_settings(settings.mqtt_presets, settings.mqtt_rules)
        except RuleError as exc:
            raise ConfigError(str(exc)) from None
        handler = MessageHandler(runtime, rules)
        if not handler.subscriptions:
            raise ConfigError("MQTT_GLOW_PREFIX is empty and no MQTT_PRESETS or MQTT_RULES are set")
        if args.discover:
            return discover(runtime, handler)
        return listen(runtime, handler, once=args.once)


def main(argv: Sequence[str] | None = None) -> int:
    return run_source(MqttSource, argv)


if __name__ == "__main__":
    sys.exit(main())
