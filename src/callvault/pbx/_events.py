"""Parsing of the reports the PBX pushes (NewCdr, BootUp and the rest).

Three formats exist (spec section 6.2): legacy v1 JSON whose multi-party reports repeat a key,
``1.0.2`` (well-formed, parties in arrays) and ``2.0.0`` (key ``event`` instead of ``action``).
The parser keeps every pair of a repeated key: such a key's value becomes the list of all its
values, in order, so nothing the PBX sent is lost.
"""

from __future__ import annotations

import json
from typing import Any

from callvault.pbx._cdr import call_detail_from_fields
from callvault.pbx._errors import EventParseError
from callvault.pbx._types import BootUpEvent, Event, EventFormat, NewCdrEvent

MAX_EVENT_BYTES = 1024 * 1024


class _PairsDict(dict[str, Any]):
    """A JSON object that remembers whether one of its keys was repeated."""

    had_duplicates: bool = False


def _keep_all_pairs(pairs: list[tuple[str, Any]]) -> _PairsDict:
    result = _PairsDict()
    repeated: set[str] = set()
    for key, value in pairs:
        if key in result:
            result.had_duplicates = True
            if key not in repeated:
                result[key] = [result[key]]
                repeated.add(key)
            result[key].append(value)
        else:
            result[key] = value
    return result


def _any_duplicates(value: Any) -> bool:
    if isinstance(value, _PairsDict):
        return value.had_duplicates or any(_any_duplicates(v) for v in value.values())
    if isinstance(value, list):
        return any(_any_duplicates(v) for v in value)
    return False


def _plain(value: Any) -> Any:
    """Drop the helper dict subclass so events hold ordinary dicts."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _name(value: Any) -> str:
    if isinstance(value, list):  # "action" itself repeated: the first is the report's name
        value = value[0] if value else ""
    return value.strip() if isinstance(value, str) else ""


def parse_event(body: bytes, *, format: EventFormat | None = None) -> Event:
    """Parse one pushed report.

    Returns a NewCdrEvent, a BootUpEvent, or a plain Event for any other report. `format` is
    the format asked for at login when the caller knows it; otherwise it is inferred: the
    ``event`` key means 2.0.0, repeated keys mean legacy, arrays of parties mean 1.0.2.
    Raises EventParseError (a PbxProtocolError and a ValueError) for malformed input.
    """
    if len(body) > MAX_EVENT_BYTES:
        raise EventParseError(f"report of {len(body)} bytes is too large to be a PBX event")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EventParseError("report is not UTF-8 text") from exc
    try:
        document = json.loads(text, object_pairs_hook=_keep_all_pairs)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise EventParseError("report is not JSON") from exc
    if not isinstance(document, dict):
        raise EventParseError("report is not a JSON object")

    if "event" in document and _name(document["event"]):
        name = _name(document["event"])
        inferred = EventFormat.V2_0_0
    elif "action" in document and _name(document["action"]):
        name = _name(document["action"])
        if _any_duplicates(document):
            inferred = EventFormat.LEGACY
        elif any(isinstance(v, list) for v in document.values()):
            inferred = EventFormat.V1_0_2
        else:
            inferred = EventFormat.LEGACY
    else:
        raise EventParseError("report has no action or event name")

    fields: dict[str, Any] = _plain(document)
    sn_value = fields.get("sn", "")
    if isinstance(sn_value, list):
        sn_value = sn_value[0] if sn_value else ""
    sn = "" if sn_value is None or isinstance(sn_value, dict) else str(sn_value).strip()
    event_format = format if format is not None else inferred
    kind = name.lower()
    if kind == "newcdr":
        cdr = call_detail_from_fields(fields)
        if not cdr.callid:
            raise EventParseError("NewCdr report without a callid")
        return NewCdrEvent(name=name, sn=sn, fields=fields, format=event_format, cdr=cdr)
    if kind == "bootup":
        return BootUpEvent(name=name, sn=sn, fields=fields, format=event_format)
    return Event(name=name, sn=sn, fields=fields, format=event_format)
