"""The wizard's devices.json: what it says about each Tuya device.

``python -m tinytuya wizard`` writes one entry per device (id, local key,
address, protocol version, category, product id, and a ``mapping`` of data
points to codes and scales). ``load_devices_file`` reads either of its two
forms; an entry with a wrong type anywhere is left out alone, said once.

Local keys live in ``DeviceEntry.key`` only: never in a repr, a log line or
an exception message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from settings import ConfigError

DEFAULT_PORT = 6668
VERSIONS = ("3.1", "3.2", "3.3", "3.4", "3.5")
# Tried in this order when neither devices.json, the config nor an
# announcement says (3.1 last: its reads are plain JSON and need no key).
DETECT_ORDER = ("3.3", "3.4", "3.5", "3.1")

CATEGORY_NAMES = {
    "cz": "socket",
    "pc": "power strip",
    "kg": "switch",
    "tdq": "breaker",
    "dlq": "metering breaker",
    "zndb": "energy meter",
    "ggq": "water timer",
    "mal": "alarm",
    "wg2": "gateway",
    "wsdcg": "sensor",
    "dj": "light",
    "dd": "light strip",
    "fs": "fan",
}


# --- devices.json ----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceEntry:
    """One device of the wizard's devices.json (the fields this project uses)."""

    id: str
    name: str
    key: str = field(repr=False)
    ip: str = ""
    port: int = DEFAULT_PORT
    version: str = ""
    category: str = ""
    product_id: str = ""
    product_name: str = ""
    mapping: Mapping[str, Any] = field(default_factory=dict, repr=False, hash=False)
    node_id: str = ""  # a Zigbee/BLE sub-device, reached only through its gateway

    @property
    def label(self) -> str:
        """For logs: the name and the id."""
        return f"{self.name} ({self.id})" if self.name != self.id else self.id

    @property
    def kind_name(self) -> str:
        return CATEGORY_NAMES.get(self.category, f"category {self.category or '?'}")


def normalize_version(value: Any) -> str:
    """'3.3', 3.3, '3.30' -> '3.3'; '' or None -> ''. Raises ValueError."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    try:
        text = f"{float(value):.1f}"
    except (TypeError, ValueError):
        raise ValueError(f"protocol version {value!r} is not a number") from None
    if text not in VERSIONS:
        raise ValueError(f"protocol version {text} is not one of {', '.join(VERSIONS)}")
    return text


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _checked_mapping(mapping: Any) -> dict[str, Any]:
    """The wizard's DP mapping, every type checked: one wrong type (a list
    where a code should be) is this entry's problem, not every device's."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ValueError(f"mapping is {_type_name(mapping)}, not an object")
    for dp, spec in mapping.items():
        if not isinstance(spec, dict):
            raise ValueError(f"mapping DP {dp}: is {_type_name(spec)}, not an object")
        for field_name in ("code", "type"):
            value = spec.get(field_name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"mapping DP {dp}: {field_name} is {_type_name(value)}, not text")
        values = spec.get("values")
        if values is not None and not isinstance(values, (dict, str)):
            raise ValueError(f"mapping DP {dp}: values is {_type_name(values)}")
    return mapping


def parse_entry(raw: Any) -> DeviceEntry:
    """One devices.json entry. Raises ValueError (never naming the key)."""
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    dev_id = raw.get("id")
    if not isinstance(dev_id, str) or not dev_id.strip():
        raise ValueError("no device id")
    # A wrong type is said (the value never: it may be the key), not guessed at.
    for field_name in ("key", "name", "ip", "category", "product_id", "product_name", "node_id"):
        value = raw.get(field_name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{field_name} is {_type_name(value)}, not text")
    key = raw.get("key") or ""
    name = raw.get("name")
    name = name.strip() if isinstance(name, str) and name.strip() else dev_id
    port = raw.get("port") or DEFAULT_PORT
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r} is not a TCP port")
    mapping = _checked_mapping(raw.get("mapping"))

    def text(field_name: str) -> str:
        return (raw.get(field_name) or "").strip()

    return DeviceEntry(
        id=dev_id.strip(),
        name=name,
        key=key,
        ip=text("ip"),
        port=port,
        version=normalize_version(raw.get("version")),
        category=text("category"),
        product_id=text("product_id"),
        product_name=text("product_name"),
        mapping=mapping,
        node_id=text("node_id"),
    )


def parse_devices(data: Any) -> tuple[list[DeviceEntry], list[str]]:
    """The entries of a devices.json document, in either form the wizard has
    written (a list, or ``{"devices": [...]}``), and one problem line per entry
    left out. Raises ValueError when the document is neither form."""
    if isinstance(data, dict) and isinstance(data.get("devices"), list):
        data = data["devices"]
    if not isinstance(data, list):
        raise ValueError('expected a list of devices or {"devices": [...]}')
    entries: list[DeviceEntry] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, raw in enumerate(data):
        where = f"entry {index}"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            where += f" ({raw['name']})"
        try:
            entry = parse_entry(raw)
        except ValueError as exc:
            problems.append(f"{where}: {exc}; left out")
            continue
        if entry.id in seen:
            problems.append(f"{where}: device id {entry.id} appears twice; the first one is used")
            continue
        seen.add(entry.id)
        entries.append(entry)
    return entries, problems


def load_devices_file(path: Path | str) -> tuple[list[DeviceEntry], list[str]]:
    """devices.json from disk. Raises ConfigError when it cannot be used at all."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"TUYA_DEVICES_FILE: {path} not found: run 'python -m tinytuya wizard' "
            "and point TUYA_DEVICES_FILE or --devices at the devices.json it writes"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"TUYA_DEVICES_FILE: cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"TUYA_DEVICES_FILE: {path} is not valid JSON: {exc}") from None
    try:
        return parse_devices(data)
    except ValueError as exc:
        raise ConfigError(f"TUYA_DEVICES_FILE: {path}: {exc}") from None


def lookup(table: Mapping[str, Any], entry: DeviceEntry) -> Any:
    """A per-device setting keyed by device id or name (names case-insensitively)."""
    if entry.id in table:
        return table[entry.id]
    wanted = entry.name.casefold()
    for key, value in table.items():
        if isinstance(key, str) and key.strip().casefold() == wanted:
            return value
    return None


def matches(names: Iterable[str], entry: DeviceEntry) -> bool:
    """True when ``entry``'s id or name is among ``names``."""
    return lookup(dict.fromkeys(names, True), entry) is True
