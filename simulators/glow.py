"""Simulated MQTT power sources: a Hildebrand Glow display and the preset devices.

They publish the real payloads (the Glow local MQTT format; Tasmota, Shelly
Gen1/Gen2, ESPHome and emonhub messages) through a real broker with paho, to
loopback only. For tests, the demo and the benchmark::

    with Publisher("127.0.0.1", broker_port) as pub:
        glow = SimulatedGlow()
        glow.power_kw = 2.5
        pub.publish_all(glow.step(10))  # electricity (and gas, STATE) messages
        pub.publish_all(retime(load_session(path), end=int(time.time())))

``SimulatedGlow.step`` advances a simulated clock without sleeping, so a day
of readings takes milliseconds; ``glitch_next`` makes the next message carry
one of the meter's quirks.
"""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

GLOW_INVALID_POWER_KW = -8388.608


class Message(NamedTuple):
    topic: str
    payload: bytes
    retain: bool = False


def check_loopback(host: str) -> None:
    if not host.startswith("127."):
        raise ValueError(f"simulators publish to loopback only (127.0.0.0/8), not {host!r}")


class Publisher:
    """A paho client publishing to a loopback broker; ``publish_all`` waits
    until the broker has every message (QoS 1)."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str = "",
        password: str = "",
        client_id: str = "",
        qos: int = 1,
        tls_ca_file: str = "",
    ) -> None:
        check_loopback(host)
        self.qos = qos
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if username:
            self.client.username_pw_set(username, password)
        if tls_ca_file:
            self.client.tls_set(ca_certs=tls_ca_file)
        self.client.connect(host, port)
        self.client.loop_start()

    def publish(
        self, topic: str, payload: bytes | str, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=self.qos, retain=retain)

    def publish_all(self, messages: Iterable[Message], timeout_s: float = 10.0) -> int:
        infos = [self.publish(m.topic, m.payload, m.retain) for m in messages]
        for info in infos:
            info.wait_for_publish(timeout_s)
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- Recorded sessions ------------------------------------------------------------


def load_session(path: Path | str) -> list[Message]:
    """A ``{"topic", "payload"}`` JSON-lines recording (the payload as its exact text)."""
    messages = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            messages.append(Message(record["topic"], record["payload"].encode("utf-8")))
    return messages


def _iso(timestamp: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _unix(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


def _timestamps(document: object) -> list[dict]:
    """The dicts in a Glow document that hold a "timestamp"."""
    found = []
    if isinstance(document, dict):
        if isinstance(document.get("timestamp"), str):
            found.append(document)
        for value in document.values():
            found.extend(_timestamps(value))
    return found


def retime(messages: Sequence[Message], end: int) -> list[Message]:
    """The same session moved in time so that its last timestamp is ``end``.

    Values are kept; payloads that are not JSON are passed on untouched. A
    recording's own dates may lie beyond a test Carbon's retention.
    """
    stamps = []
    for message in messages:
        try:
            stamps += [_unix(d["timestamp"]) for d in _timestamps(json.loads(message.payload))]
        except ValueError:
            continue
    if not stamps:
        return list(messages)
    shift = end - max(stamps)
    moved = []
    for message in messages:
        try:
            document = json.loads(message.payload)
        except ValueError:
            moved.append(message)
            continue
        for holder in _timestamps(document):
            holder["timestamp"] = _iso(_unix(holder["timestamp"]) + shift)
        moved.append(message._replace(payload=json.dumps(document).encode("utf-8")))
    return moved


# --- A Glow display ----------------------------------------------------------------


class SimulatedGlow:
    """A Glow display reading an electricity (and optionally a gas) smart meter.

    ``power_kw`` is the house load (negative while exporting); energy registers
    integrate it on a simulated clock. ``step(seconds)`` returns the messages
    the display would publish meanwhile (one per ``interval_s``).
    """

    def __init__(
        self,
        glow_id: str = "1A2B3C4D5E6F",
        prefix: str = "glow",
        start: int | None = None,
        interval_s: int = 10,
        gas: bool = True,
    ) -> None:
        self.glow_id = glow_id
        self.prefix = prefix
        self.clock = int(time.time()) if start is None else start
        self.interval_s = interval_s
        self.gas = gas
        self.power_kw = 0.5
        self.import_kwh = 6613.405
        self.export_kwh = 0.0
        self.day_kwh = 7.211
        self.gas_kwh = 10234.112
        self.gas_m3 = 912.431
        self.gas_power_kw = 1.2
        self.rssi, self.lqi = -74, 160
        self._glitch = ""

    def glitch_next(self, kind: str) -> None:
        """The next electricity message carries a quirk: "invalid_power" or "zero_register"."""
        if kind not in ("invalid_power", "zero_register"):
            raise ValueError(f"unknown glitch {kind!r}")
        self._glitch = kind

    def topic(self, kind: str) -> str:
        return (
            f"{self.prefix}/{self.glow_id}/SENSOR/{kind}"
            if kind != "STATE"
            else f"{self.prefix}/{self.glow_id}/STATE"
        )

    def electricity(self) -> Message:
        power_kw, imported, exported, day = (
            self.power_kw,
            self.import_kwh,
            self.export_kwh,
            self.day_kwh,
        )
        if self._glitch == "invalid_power":
            power_kw = GLOW_INVALID_POWER_KW
        elif self._glitch == "zero_register":
            imported = day = 0.0
        self._glitch = ""
        document = {
            "electricitymeter": {
                "timestamp": _iso(self.clock),
                "energy": {
                    "export": {"cumulative": round(exported, 3), "units": "kWh"},
                    "import": {
                        "cumulative": round(imported, 3),
                        "day": round(day, 3),
                        "units": "kWh",
                        "mpan": "1200012345678",
                        "price": {"unitrate": 0.245, "standingcharge": 0.5316},
                    },
                },
                "power": {"value": round(power_kw, 3), "units": "kW"},
            }
        }
        return Message(self.topic("electricitymeter"), json.dumps(document).encode())

    def gas_meter(self) -> Message:
        document = {
            "gasmeter": {
                "timestamp": _iso(self.clock),
                "energy": {
                    "import": {
                        "cumulative": round(self.gas_kwh, 3),
                        "day": 9.1,
                        "units": "kWh",
                        "cumulativevol": round(self.gas_m3, 3),
                        "cumulativevolunits": "m3",
                        "mprn": "1234567890",
                    }
                },
                "power": {"value": 0.0, "units": "kW"},
            }
        }
        return Message(self.topic("gasmeter"), json.dumps(document).encode())

    def state(self) -> Message:
        document = {
            "software": "v1.8.12",
            "timestamp": _iso(self.clock),
            "hardware": "GLOW-IHD-01-1v4-SMETS2",
            "ethmac": self.glow_id,
            "smetsversion": "SMETS2",
            "han": {"rssi": self.rssi, "status": "joined", "lqi": self.lqi},
        }
        return Message(self.topic("STATE"), json.dumps(document).encode(), retain=True)

    def step(self, seconds: int) -> list[Message]:
        """Advance the clock; the messages published meanwhile, oldest first."""
        messages = []
        for _ in range(max(1, seconds // self.interval_s)):
            self.clock += self.interval_s
            hours = self.interval_s / 3600
            if self.power_kw >= 0:
                self.import_kwh += self.power_kw * hours
                self.day_kwh += self.power_kw * hours
            else:
                self.export_kwh -= self.power_kw * hours
            self.gas_kwh += self.gas_power_kw * hours
            self.gas_m3 += self.gas_power_kw * hours / 11.2  # about 11.2 kWh per m3
            messages.append(self.electricity())
            if self.gas:
                messages.append(self.gas_meter())
        messages.append(self.state())
        return messages


# --- Preset devices: one sample message each, and what it must give --------------


class Sample(NamedTuple):
    preset: str
    message: Message
    expected: dict  # metric path under the prefix -> value


def preset_samples() -> list[Sample]:
    """A typical message of every preset and the metrics it must produce
    (paths under ``home.electricity``)."""

    def message(topic: str, payload: object) -> Message:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        return Message(topic, text.encode())

    tasmota = {
        "Time": "2026-11-20T18:00:00",
        "ENERGY": {
            "TotalStartTime": "2024-01-14T10:22:31",
            "Total": 123.456,
            "Yesterday": 1.234,
            "Today": 0.567,
            "Period": 2,
            "Power": 45,
            "ApparentPower": 52,
            "ReactivePower": 26,
            "Factor": 0.87,
            "Voltage": 231,
            "Current": 0.226,
        },
    }
    shelly_gen2 = {
        "id": 0,
        "source": "init",
        "output": True,
        "apower": 120.5,
        "voltage": 229.8,
        "freq": 50.0,
        "current": 0.532,
        "pf": 0.98,
        "aenergy": {
            "total": 5432.1,
            "by_minute": [2000.1, 2010.2, 1995.3],
            "minute_ts": 1795000000,
        },
        "temperature": {"tC": 45.2, "tF": 113.4},
    }
    gen2 = "mqtt.shellyplus1pm_a8032ab12345_switch0"
    gen1 = "mqtt.shelly1pm_84cca8a12345_relay_0"
    return [
        Sample(
            "tasmota",
            message("tele/tasmota_kitchen/SENSOR", tasmota),
            {
                "mqtt.tasmota_kitchen.power_watts": 45,
                "mqtt.tasmota_kitchen.voltage_volts": 231,
                "mqtt.tasmota_kitchen.current_amps": 0.226,
                "mqtt.tasmota_kitchen.power_factor": 0.87,
                "mqtt.tasmota_kitchen.energy_kwh": 123.456,
                "mqtt.tasmota_kitchen.energy_today_kwh": 0.567,
            },
        ),
        Sample(
            "shelly_gen2",
            message("shellyplus1pm-a8032ab12345/status/switch:0", shelly_gen2),
            {
                f"{gen2}.power_watts": 120.5,
                f"{gen2}.voltage_volts": 229.8,
                f"{gen2}.current_amps": 0.532,
                f"{gen2}.energy_kwh": 5.4321,
                f"{gen2}.is_on": 1,
            },
        ),
        Sample(
            "shelly_gen1",
            message("shellies/shelly1pm-84CCA8A12345/relay/0/power", "87.55"),
            {f"{gen1}.power_watts": 87.55},
        ),
        Sample(
            "shelly_gen1",
            message("shellies/shelly1pm-84CCA8A12345/relay/0/energy", "123456"),
            {f"{gen1}.energy_kwh": 2.0576},
        ),
        Sample(
            "esphome",
            message("esp-washer/sensor/power_watts/state", "1234.5"),
            {"mqtt.esp_washer.power_watts": 1234.5},
        ),
        Sample(
            "emonhub",
            message("emon/emontx4/P1", "1520"),
            {"mqtt.emontx4.p1": 1520},
        ),
    ]
