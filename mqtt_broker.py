"""The MQTT collector's link to its broker, over paho-mqtt.

One connection kept up for as long as the collector runs: subscribe on every
(re)connect, paho's doubling backoff, a refused login said once and then
retried only every MQTT_AUTH_RETRY_S, and QoS 1 messages acknowledged
(PUBACK) only once the caller says their lines are on disk, so the broker
keeps what the collector could not yet store.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from settings import ConfigError, parse_host_port

log = logging.getLogger("electricity.mqtt")

# CONNACK reasons that mean our credentials, not the network.
LOGIN_REFUSED = {"Bad user name or password", "Not authorized"}


class _Client(mqtt.Client):
    """paho's client, remembering why a connection attempt failed (paho only says that it did)."""

    connect_error = ""

    def reconnect(self) -> mqtt.MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as exc:
            self.connect_error = f"{exc.__class__.__name__}: {exc}"
            raise


class BrokerLink:
    """One connection to the broker, kept up for as long as the collector runs.

    Subscribes in ``on_connect`` (a reconnect starts without subscriptions),
    reconnects with paho's doubling backoff, says once when the broker is
    unreachable or refuses our login (then retries only every
    MQTT_AUTH_RETRY_S) and once when it is back.
    """

    def __init__(
        self,
        settings: Any,
        subscriptions: Sequence[str],
        on_message: Callable[[str, bytes, bool], Any],
        client_suffix: str = "",
        persistent: bool = True,
    ) -> None:
        self.settings = settings
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.host, self.port = broker_address(settings)
        self.connected = False
        self.connects = 0
        self.refused = ""  # the broker's reason while it refuses our login
        self._last_refusal = ""  # any other reason, said once
        self._unreachable = False
        self._stopping = False
        self._unacked: list[tuple[int, int]] = []  # (mid, qos) waiting for the disk
        client_id = settings.mqtt_client_id or f"electricity-mqtt-{socket.gethostname()}"
        # A persistent session keeps QoS 1 messages for us while we restart.
        self.client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id + client_suffix,
            clean_session=not persistent,
            protocol=mqtt.MQTTv311,
            # PUBACK only once the message's lines are safe (see _on_message).
            manual_ack=True,
        )
        if settings.mqtt_username:
            self.client.username_pw_set(settings.mqtt_username, settings.mqtt_password or None)
        if settings.mqtt_tls_ca_file:
            try:
                self.client.tls_set(ca_certs=str(Path(settings.mqtt_tls_ca_file).expanduser()))
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"MQTT_TLS_CA_FILE: cannot use {settings.mqtt_tls_ca_file}: {exc}"
                ) from None
        self._backoff()
        # An exception escaping a callback would end paho's network thread,
        # and with it every reconnect: paho logs it instead.
        self.client.suppress_exceptions = True
        paho_log = logging.getLogger("paho")
        paho_log.setLevel(logging.WARNING)  # its debug log is every packet
        self.client.enable_logger(paho_log)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def describe(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.client.connect_async(
            self.host, self.port, keepalive=int(self.settings.mqtt_keepalive_s)
        )
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def _backoff(self, retry_s: float | None = None) -> None:
        if retry_s is None:
            # paho's stubs say int; it takes seconds as any number.
            self.client.reconnect_delay_set(
                math.ceil(self.settings.mqtt_reconnect_min_s),
                math.ceil(self.settings.mqtt_reconnect_max_s),
            )
        else:
            self.client.reconnect_delay_set(math.ceil(retry_s), math.ceil(retry_s))

    # paho's callbacks, in its network thread

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            reason = str(reason_code)
            log.debug("broker %s refused the connection: %s", self.describe(), reason)
            if reason in LOGIN_REFUSED and not self.refused:
                log.error(
                    "broker %s refused the login of user %r (%s): check MQTT_USERNAME and "
                    "MQTT_PASSWORD; trying again every %g s",
                    self.describe(),
                    self.settings.mqtt_username,
                    reason,
                    self.settings.mqtt_auth_retry_s,
                )
                self._backoff(self.settings.mqtt_auth_retry_s)
                self.refused = reason
            elif reason not in LOGIN_REFUSED and reason != self._last_refusal:
                log.warning(
                    "broker %s refused the connection: %s; retrying", self.describe(), reason
                )
            self._last_refusal = reason
            return
        if self.refused:
            log.info("broker %s accepts the login again", self.describe())
            self.refused = ""
            self._backoff()
        self._last_refusal = ""
        self.connected = True
        self.connects += 1
        self._unreachable = False
        client.subscribe([(topic, 1) for topic in self.subscriptions])
        log.info(
            "%s broker %s; subscribed to %s",
            "connected to" if self.connects == 1 else "reconnected to",
            self.describe(),
            ", ".join(self.subscriptions),
        )

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [
            f"{topic} ({code})"
            for topic, code in zip(self.subscriptions, reason_codes)
            if code.is_failure
        ]
        if refused:  # an ACL on the broker: nothing will ever come on these
            log.error("broker %s refused the subscriptions %s", self.describe(), ", ".join(refused))

    def _on_connect_fail(self, client, userdata) -> None:
        if not self._unreachable:
            log.warning(
                "cannot reach broker %s (%s); retrying, backing off to %g s",
                self.describe(),
                client.connect_error or "no answer",
                self.settings.mqtt_reconnect_max_s,
            )
            self._unreachable = True

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected, self.connected = self.connected, False
        if was_connected and not self._stopping:
            log.warning("lost broker %s (%s); reconnecting", self.describe(), reason_code)

    def _on_message(self, client, userdata, message) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.debug("a message whose topic is not UTF-8: ignored")
            return
        safe = True
        try:
            safe = self.on_message(topic, message.payload, bool(message.retain)) is not False
        except Exception:  # one message must never stop the network thread
            log.exception("%s: message not handled", topic)
        self._acknowledge(message.mid, message.qos, safe)

    def _acknowledge(self, mid: int, qos: int, safe: bool) -> None:
        """PUBACK a QoS 1 message once ``on_message`` said its lines are on
        disk; while the disk refuses them, hold the acks (the broker keeps
        those messages) and send them with the next one that is safe."""
        self._unacked.append((mid, qos))
        if safe:
            for waiting in self._unacked:
                self.client.ack(*waiting)
            self._unacked.clear()


def broker_address(settings: Any) -> tuple[str, int]:
    default_port = 8883 if settings.mqtt_tls_ca_file else 1883
    return parse_host_port(settings.mqtt_broker, default_port, "MQTT_BROKER")
