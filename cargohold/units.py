"""Values people write in settings and rules files: durations, sizes, rates, time windows.

Pure parsing, no I/O; every other package may use it. Each parser raises ValueError with a
message that says what it expected.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value).strip())
    if not match:
        raise ValueError(f"bad duration {value!r}: use e.g. 90s, 30m, 12h, 30d, 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_size(value: object) -> int:
    """Bytes from 1048576, "512K", "50M", "2G", "1T" (powers of 1024)."""
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(float(text))


def parse_window(text: str) -> tuple[int, int]:
    """"HH:MM-HH:MM" as minutes of the day (the end may be before the start: over midnight)."""
    start, _, end = text.partition("-")

    def minutes(part: str) -> int:
        hours, _, mins = part.strip().partition(":")
        value = int(hours) * 60 + int(mins or 0)
        if not 0 <= value < 1440:
            raise ValueError(text)
        return value

    return minutes(start), minutes(end)


def parse_rate(text: str) -> tuple[int, float]:
    """"N/SECONDS" (e.g. "10/300": ten failures per five minutes); ValueError if malformed."""
    count, sep, window = str(text).partition("/")
    if not sep:
        raise ValueError(f"a rate is N/SECONDS, not {text!r}")
    limit, seconds = int(count), float(window)
    if limit < 1 or not 0 < seconds <= 86400:
        raise ValueError(f"a rate needs N >= 1 and 0 < SECONDS <= 86400, not {text!r}")
    return limit, seconds
