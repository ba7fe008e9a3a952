"""The enriched event as SPEC-4 JSON, the same text as the Rust SDK's ``event_json_string``:
fields in SPEC order, absent values present as ``null``, ``event_ts`` as
``YYYY-MM-DD HH:MM:SS`` UTC (whole seconds), floats in their shortest exact form
(``7.0``, ``0.02``), non-finite floats as ``null``, non-ASCII text unescaped."""

import json
import math

MICROS_PER_SECOND = 1_000_000


def _civil_from_days(z):
    # Howard Hinnant's days -> (year, month, day), proleptic Gregorian, any sign.
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d


def format_datetime(micros):
    """``YYYY-MM-DD HH:MM:SS`` UTC of a time in Unix microseconds (fractions dropped)."""
    secs = micros // MICROS_PER_SECOND
    days, rest = divmod(secs, 86400)
    y, m, d = _civil_from_days(days)
    return "%04d-%02d-%02d %02d:%02d:%02d" % (y, m, d, rest // 3600, rest // 60 % 60, rest % 60)


def minute_key(micros):
    """``YYYYMMDDHHMM`` of the UTC minute that contains ``micros``."""
    return format_datetime(micros).replace("-", "").replace(" ", "").replace(":", "")[:12]


def _finite(v):
    return v if v is not None and math.isfinite(v) else None


def event_record(e):
    """The SPEC-4 record of an event as a dict, keys in SPEC order."""
    return {
        "event_id": e.event_id,
        "content_id": e.content_id,
        "user_id": e.user_id,
        "event_type": e.event_type,
        "event_ts": format_datetime(e.event_ts_micros),
        "duration_ms": e.duration_ms,
        "device": e.device,
        "content_type": e.content_type,
        "length_seconds": e.length_seconds,
        "engagement_seconds": _finite(e.engagement_seconds),
        "engagement_pct": _finite(e.engagement_pct),
    }


def event_json_string(e):
    """The SPEC-4 JSON of an event as compact text (what sdk/src/event.rs prints)."""
    return json.dumps(event_record(e), separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
