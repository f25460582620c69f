"""P-Series events and records: parsing, call details, webhook signatures.

An event is ``{"type": <int>, "sn": "<serial>", "msg": ...}``, one per WebSocket text
frame or webhook request, where `msg` is a JSON-encoded string (30005-30028) or an object
(30033-30036); both are accepted for every type. 30012 (New CDR) becomes a `NewCdrEvent`
whose `cdr` is built by `pseries_call_detail`, which also maps the rows of ``cdr/list`` /
``cdr/search`` (other key names, the same meaning). The PBX fills empty strings with one
space; those read as empty.

Kept free of the HTTP stack (the receiver verifies and parses webhooks with it alone).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from callvault.pbx._cdr import parse_seconds
from callvault.pbx._errors import EventParseError
from callvault.pbx._types import CallDetail, Event, EventFormat, NewCdrEvent, normalise_status

MAX_EVENT_BYTES = 1024 * 1024

EVENT_FORMAT = EventFormat.OPENAPI
"""The `format` of every P-Series event: the P-Series envelope has a single format."""

NEW_CDR = 30012
CALL_STATUS_CHANGED = 30011
RECORDING_DOWNLOADED = 30033

EVENT_NAMES: dict[int, str] = {
    30005: "OrganizationStatusChanged",
    30007: "ExtensionRegistrationChanged",
    30008: "ExtensionCallStatusChanged",
    30009: "ExtensionPresenceChanged",
    30010: "TrunkRegistrationChanged",
    CALL_STATUS_CHANGED: "CallStatusChanged",
    NEW_CDR: "NewCdr",
    30015: "CallFailed",
    30016: "InboundCallInvitation",
    30028: "CallNoteStatusChanged",
    RECORDING_DOWNLOADED: "RecordingDownloadCompleted",
    30034: "SystemEventInformation",
    30035: "SystemEventWarning",
    30036: "SystemEventAlert",
}
"""Readable names of the event types, for logs (an `Event`'s `name` is the type number)."""


@dataclass(frozen=True, slots=True)
class EventsResumed(Event):
    """Not from the PBX: the event stream was interrupted and is connected again.

    Events of the gap (from `since`, Unix epoch seconds, when the connection was lost, to
    now) were not delivered: reconcile them from the call history
    (`PSeriesClient.export_cdr_range`).
    """

    since: float = 0.0


_PARTY = re.compile(r"<\s*([^<>]*?)\s*>\s*$")
_CALL_ID_IN_NAME = re.compile(r"^\d{14}-(\d+\.\d+)-")
_ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
_TYPES = {"inbound": "Inbound", "outbound": "Outbound", "internal": "Internal"}


def _text(value: Any) -> str:
    """A field as text: " " placeholders and padding read as empty; numbers as digits."""
    if value is None or isinstance(value, dict | list):
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value).strip()


def party_number(value: Any) -> str:
    """The number of a party as the PBX writes it: ``Evelyn<5566>`` -> ``5566``; a plain
    number stays as it is."""
    text = _text(value)
    match = _PARTY.search(text)
    return match.group(1) if match else text


def call_type(value: Any) -> str:
    """``inbound``/``INBOUND``/``Inbound`` -> ``Inbound`` (likewise Outbound, Internal);
    other values as sent."""
    text = _text(value)
    return _TYPES.get(text.lower(), text)


def _first(row: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in row and _text(row[key]):
            return row[key]
    return None


def pseries_call_detail(
    row: Mapping[str, Any], *, sn: str = "", timestart: str | None = None
) -> CallDetail:
    """A `CallDetail` from a 30012 `msg` or a ``cdr/list``/``cdr/search`` row.

    `callid` is chosen so that the event and the CDR row of one call agree, although CDR
    rows carry no ``call_id`` and older 30012s no ``uid``: for a recorded call, its
    ``call_id`` (CDR rows: the one inside the recording's name,
    ``{YYYYMMDDhhmmss}-{call_id}-...``); for a call without a recording, its ``uid`` (CDR
    rows and newer 30012s), else its ``call_id``, else its ``id``. (An unrecorded call's
    30012 from firmware without ``uid`` keys it by ``call_id``: it cannot match its row.)

    `timestart` replaces the row's own time (CDR rows write theirs in the PBX's display
    format; the client passes the "YYYY-MM-DD hh:mm:ss" it computed from their Unix
    ``timestamp``).
    """
    recording = _text(_first(row, "recording", "record_file")) or None
    callid = ""
    if recording is not None:
        match = _CALL_ID_IN_NAME.match(recording)
        callid = _text(row.get("call_id")) or (match.group(1) if match else "")
    if not callid:
        callid = _text(row.get("uid")) or _text(row.get("call_id")) or _text(row.get("id"))
    if timestart is None:
        timestart = _text(_first(row, "time_start", "time"))
    return CallDetail(
        callid=callid,
        timestart=timestart,
        callfrom=party_number(_first(row, "call_from_number", "call_from")),
        callto=party_number(_first(row, "call_to_number", "call_to")),
        callduration=parse_seconds(_first(row, "call_duration", "duration")),
        talkduration=parse_seconds(row.get("talk_duration")),
        srctrunkname=_text(_first(row, "src_trunk_name", "src_trunk")),
        dsttrunkname=_text(_first(row, "dst_trunk_name", "dst_trunk")),
        status=normalise_status(_text(_first(row, "status", "disposition"))),
        type=call_type(_first(row, "type", "call_type")),
        pincode=_text(row.get("pin_code")),
        recording=recording,
        didnumber=_text(row.get("did_number")),
        agentringtime=parse_seconds(row.get("agent_ring_time")),
        sn=sn or _text(row.get("sn")),
    )


def _type_of(value: Any) -> int:
    if isinstance(value, bool):
        raise EventParseError("event type is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise EventParseError("event has no numeric type")


def parse_pseries_event(data: bytes | str) -> Event:
    """Parse one P-Series event (a WebSocket text frame or a webhook body).

    Returns a `NewCdrEvent` for 30012 (its `cdr` from `pseries_call_detail`), a plain
    `Event` for any other type. `name` is the type number as text (see `EVENT_NAMES`),
    `sn` the PBX serial, `fields` the `msg` object as sent (decoded when it came as a JSON
    string). Raises `EventParseError` for anything else (not JSON, no type, a `msg` that is
    neither an object nor a JSON-encoded object, a 30012 without any call ID).
    """
    if len(data) > MAX_EVENT_BYTES:
        raise EventParseError(f"event of {len(data)} bytes is too large to be a PBX event")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise EventParseError("event is not UTF-8 text") from exc
    else:
        text = data.lstrip("\ufeff")
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise EventParseError("event is not JSON") from exc
    if not isinstance(document, dict):
        raise EventParseError("event is not a JSON object")
    if "type" not in document:
        raise EventParseError("event has no type")
    event_type = _type_of(document["type"])
    sn = _text(document.get("sn"))
    msg = document.get("msg")
    if msg is None or (isinstance(msg, str) and not msg.strip()):
        fields: dict[str, Any] = {}
    elif isinstance(msg, dict):
        fields = msg
    elif isinstance(msg, str):
        try:
            decoded = json.loads(msg)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise EventParseError(f"event {event_type}: msg is not JSON") from exc
        if not isinstance(decoded, dict):
            raise EventParseError(f"event {event_type}: msg is not a JSON object")
        fields = decoded
    else:
        raise EventParseError(f"event {event_type}: msg is neither an object nor a string")
    name = str(event_type)
    if event_type == NEW_CDR:
        cdr = pseries_call_detail(fields, sn=sn)
        if not cdr.callid:
            raise EventParseError("New CDR event (30012) without a call_id or uid")
        return NewCdrEvent(name=name, sn=sn, fields=fields, format=EVENT_FORMAT, cdr=cdr)
    return Event(name=name, sn=sn, fields=fields, format=EVENT_FORMAT)


def webhook_signature(secret: str, body: bytes) -> str:
    """What the PBX sends in ``X-Signature``: Base64 of HMAC-SHA256(secret, raw body)."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_webhook_signature(secret: str, body: bytes, signature_header: str | None) -> bool:
    """Whether a webhook request's ``X-Signature`` header is right for its raw `body`.

    Compared in constant time; a missing, empty or non-ASCII header is simply wrong. Check
    it before parsing the body.
    """
    if not secret or signature_header is None:
        return False
    given = signature_header.strip()
    if not given or not given.isascii():
        return False
    return hmac.compare_digest(given.encode("ascii"), webhook_signature(secret, body).encode())


def iso_time(text: str) -> bool:
    """Whether `text` is already "YYYY-MM-DD hh:mm:ss"."""
    return bool(_ISO_TIME.match(text))
