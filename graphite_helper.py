"""Carbon's plaintext protocol: metric names, values and lines, made and checked.

``<prefix>.<source>.<device>.<metric> <value> <timestamp>``: segments are
ASCII ``[a-z0-9_]`` (device names are folded and transliterated into that
by ``format_device_name``), values finite numbers, timestamps whole seconds.
Every line is checked here before it leaves (``format_line``) and again
when it is read back from the spool (``is_valid_line``): Carbon drops a
connection and the rest of its stream on a bad line, and splits a line at a
space. Sending is carbon_client.py's, the on-disk spool spool.py's.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from typing import Union

DEFAULT_CARBON = ("127.0.0.1", 2003)
# Carbon drops the connection (and the rest of the stream) on a line over
# 16 KiB; ours are never near that, so anything long is a bug.
MAX_LINE_BYTES = 512
# Seconds, not milliseconds: Carbon would store a millisecond stamp in 2500 AD.
MIN_TIMESTAMP = 946_684_800  # 2000-01-01
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01

_PATH = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*")
_LINE = re.compile(r"([a-z0-9_]+(?:\.[a-z0-9_]+)*) (-?[0-9][0-9.e+-]*|-?\.[0-9][0-9e+-]*) ([0-9]+)")

Number = Union[int, float, bool]


class InvalidMetric(ValueError):
    """A path, value or timestamp that must never become a Carbon line."""


# Letters NFKD does not fold to ASCII: Cyrillic (Russian, Ukrainian,
# Belarusian, Serbian, Macedonian, Bulgarian), Greek and a few Latin ones.
# Accented forms (й, ё, ї, ά) decompose to these first.
_TRANSLITERATION = str.maketrans(
    {
        **dict(zip("абвгдезиклмнопрстуфыэ", "abvgdeziklmnoprstufye")),
        **{"ж": "zh", "х": "kh", "ц": "ts", "ч": "ch", "ш": "sh", "щ": "shch"},
        **{"ю": "iu", "я": "ia", "ъ": "", "ь": "", "є": "ie", "і": "i", "ґ": "g", "ў": "u"},
        **{"ђ": "dj", "ј": "j", "љ": "lj", "њ": "nj", "ћ": "c", "џ": "dz", "ѓ": "gj"},
        **{"ќ": "kj", "ѕ": "dz"},
        **dict(zip("αβγδεζηικλμνξοπρστυφω", "avgdeziiklmnxoprstyfo")),
        **{"θ": "th", "χ": "ch", "ψ": "ps", "ς": "s"},
        **{"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d"},
        **{"þ": "th", "ı": "i", "ħ": "h", "ŋ": "ng"},
    }
)
# A name whose letters cannot all be written in [a-z0-9_] gets this many hex
# digits of its hash, so 台所 and 居間 stay two devices, and stay themselves.
NAME_HASH_DIGITS = 8


def format_device_name(name: str, fallback: str = "") -> str:
    """One metric path segment from a free-form name.

    Lowercase ASCII ``[a-z0-9_]``: accents folded (é -> e), Cyrillic and
    Greek transliterated (кухня -> kukhnia), spaces and dashes to ``_``,
    punctuation, symbols and emoji dropped, repeats collapsed, edges trimmed.
    Letters or digits that cannot be written so (台所) are replaced by a
    short stable hash of the whole name (``plug_5d1e0c2a``), so distinct
    names stay distinct. A name that leaves nothing falls back to
    ``fallback`` (formatted the same way), then to ``unicode_<hash>``, and
    an empty name to ``"unknown"``.
    """
    text = str(name)
    folded = unicodedata.normalize("NFKD", text).lower().translate(_TRANSLITERATION)
    spaced = re.sub(r"[\s\-]+", "_", folded)
    kept = re.sub(r"[^a-z0-9_]", "", spaced)
    segment = re.sub(r"_+", "_", kept).strip("_")
    lost = any(
        unicodedata.category(char)[0] in "LN" and not ("a" <= char <= "z" or "0" <= char <= "9")
        for char in folded
    )
    if segment and not lost:
        return segment
    digest = hashlib.sha256(unicodedata.normalize("NFC", text).encode("utf-8", "surrogatepass"))
    name_hash = digest.hexdigest()[:NAME_HASH_DIGITS]
    if segment:
        return f"{segment}_{name_hash}"
    if fallback:
        return format_device_name(fallback)
    return f"unicode_{name_hash}" if text.strip() else "unknown"


def is_valid_path(path: str) -> bool:
    """True for dotted ``[a-z0-9_]`` segments, nothing empty."""
    return bool(_PATH.fullmatch(path))


def metric_path(*segments: str) -> str:
    """Join segments (the prefix may hold dots) into a checked metric path."""
    path = ".".join(segments)
    if not is_valid_path(path):
        raise InvalidMetric(f"invalid metric path {path!r}")
    return path


def format_value(value: Number) -> str:
    """A finite number as Carbon reads it; booleans as 0/1. Raises InvalidMetric."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, float):
        raise InvalidMetric(f"value {value!r} is not a number")
    number = value
    if not math.isfinite(number):
        raise InvalidMetric(f"value {value!r} is not finite")
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def format_line(path: str, value: Number, timestamp: float) -> str:
    """One Carbon plaintext line, newline included. Raises InvalidMetric."""
    if not is_valid_path(path):
        raise InvalidMetric(f"invalid metric path {path!r}")
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        raise InvalidMetric(f"timestamp {timestamp!r} is not a number")
    if not math.isfinite(timestamp) or not MIN_TIMESTAMP <= timestamp < MAX_TIMESTAMP:
        raise InvalidMetric(f"timestamp {timestamp!r} is not whole seconds since 1970")
    line = f"{path} {format_value(value)} {int(timestamp)}\n"
    if len(line) > MAX_LINE_BYTES:
        raise InvalidMetric(f"line of {len(line)} bytes is too long")
    return line


def is_valid_line(line: str) -> bool:
    """True for a line exactly as ``format_line`` writes it (newline included)."""
    if not line.endswith("\n") or len(line) > MAX_LINE_BYTES:
        return False
    match = _LINE.fullmatch(line[:-1])
    if not match:
        return False
    try:
        value = float(match.group(2))
    except ValueError:
        return False
    return math.isfinite(value) and MIN_TIMESTAMP <= int(match.group(3)) < MAX_TIMESTAMP
