"""RFC 3339 timestamps as llama-swap writes and reads them (Go's ``time.Time`` JSON)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Union

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:(Z)|([+-])(\d{2}):(\d{2}))\Z"
)


def format_rfc3339(moment: Union[datetime, float]) -> str:
    """Local time, trailing fraction zeros trimmed, ``Z`` for UTC."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, timezone.utc)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    local = moment.astimezone()
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{local.microsecond:06d}".rstrip("0")
    if fraction:
        text += "." + fraction
    offset = local.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset else 0
    if minutes == 0:
        return text + "Z"
    sign = "+" if minutes > 0 else "-"
    return text + f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or ``±hh:mm``, optional fraction)."""
    match = _RFC3339.match(text)
    if match is None:
        raise ValueError(f"not RFC3339: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    fraction = match.group(7) or ""
    micros = int((fraction + "000000")[:6])
    offset = timedelta(0)
    if match.group(8) is None:
        hours, minutes = int(match.group(10)), int(match.group(11))
        if hours > 23 or minutes > 59:
            raise ValueError(f"bad offset in {text!r}")
        offset = timedelta(hours=hours, minutes=minutes)
        if match.group(9) == "-":
            offset = -offset
    return datetime(year, month, day, hour, minute, second, micros, timezone(offset))
