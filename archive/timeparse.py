"""The one definition of time in the archive: parsing what users type, showing what we store.

Stored times are integer microseconds since the epoch, UTC. Accepted input: ISO 8601 with an
offset or `Z`, naive ISO 8601 (taken in the local zone, `TZ` respected), or a date alone
(midnight local time).
"""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, date, datetime, timedelta, tzinfo

from .errors import BadInput

ACCEPTED = (
    "ISO 8601 with an offset or Z (2020-01-03T08:30:00Z, 2020-01-03T00:30-08:00), "
    "naive ISO 8601 in the local time zone (2020-01-03 00:30), or a date (2020-01-03)"
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = 2**62  # "now" as a stored time: later than any stored time
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def now_us() -> int:
    return time.time_ns() // 1000


def to_us(moment: datetime) -> int:
    if moment.tzinfo is None:
        try:
            moment = moment.astimezone()  # local zone
        except (ValueError, OSError) as error:  # the system's conversion ends before year 1
            raise OverflowError(str(error)) from None
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int, tz: tzinfo | None = None) -> datetime:
    return (_EPOCH + timedelta(microseconds=us)).astimezone(tz or UTC)


def parse(text: str) -> int:
    """A user-supplied time as stored microseconds; BadInput names the accepted forms."""
    if isinstance(text, datetime):
        return to_us(text)
    raw = text.strip()
    try:
        if _DATE_ONLY.match(raw):
            day = date.fromisoformat(raw)
            _follow_tz()
            return to_us(datetime(day.year, day.month, day.day))
        moment = datetime.fromisoformat(raw.replace("z", "Z"))
        if moment.tzinfo is None:
            _follow_tz()
        us = to_us(moment)
    except OverflowError:  # a local time the system cannot convert, at the calendar's edge
        raise BadInput(
            f"time {text!r} is outside years 1 to 9999 in UTC, or too near them for a local "
            "time: give an offset or Z"
        ) from None
    except ValueError:
        raise BadInput(f"cannot read time {text!r}: use {ACCEPTED}") from None
    if not _FIRST_US <= us <= _LAST_US:  # an offset can carry a time out of the calendar
        raise BadInput(f"time {text!r} is outside years 1 to 9999 in UTC")
    return us


_FIRST_US = to_us(datetime.min.replace(tzinfo=UTC))
_LAST_US = to_us(datetime.max.replace(tzinfo=UTC))

_seen_tz: list[str | None] = [None]


def _follow_tz() -> None:
    """Honour a TZ changed after start-up (tzset costs more than the parse, so only then)."""
    current = os.environ.get("TZ")
    if current != _seen_tz[0]:
        time.tzset()
        _seen_tz[0] = current


def parse_tz(name: str | None) -> tzinfo | None:
    """`--tz` values: an IANA zone name, `local`, or `UTC` (the default)."""
    if name is None or name.upper() in ("UTC", "Z"):
        return UTC
    if name == "local":
        time.tzset()
        return datetime.now().astimezone().tzinfo
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadInput(f"unknown time zone {name!r}: use an IANA name, 'local' or 'UTC'") from None


def show(us: int, tz: tzinfo | None = None) -> str:
    """ISO 8601 text of a stored time; UTC is written with a `Z`. A time that the zone
    would carry past year 9999 or before year 1 is written in UTC."""
    try:
        moment = from_us(us, tz)
    except OverflowError:
        tz = None
        moment = from_us(us)
    spec = "seconds" if moment.microsecond == 0 else "microseconds"
    text = moment.isoformat(timespec=spec)
    return text[:-6] + "Z" if text.endswith("+00:00") and (tz is None or tz is UTC) else text
