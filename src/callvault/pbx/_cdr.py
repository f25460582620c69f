"""Call detail records: from NewCdr event fields or the CDR CSV export into `CallDetail`.

Both sources use the same key names (with the PBX's own spellings: ``callduraction``,
``talkduraction`` and three spellings of the destination trunk), so one function maps a
mapping of fields to a record and the CSV parser only has to find the header row.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

from callvault.pbx._errors import PbxProtocolError, PbxTransportError
from callvault.pbx._types import CallDetail, normalise_status

# Every spelling seen in documents or clients -> the CallDetail field it fills.
FIELD_ALIASES: dict[str, str] = {
    "callid": "callid",
    "timestart": "timestart",
    "callfrom": "callfrom",
    "callto": "callto",
    "callduraction": "callduration",
    "callduration": "callduration",
    "talkduraction": "talkduration",
    "talkduration": "talkduration",
    "srctrunkname": "srctrunkname",
    "desttrunkname": "dsttrunkname",
    "dstrunkname": "dsttrunkname",
    "dsttrcunkname": "dsttrunkname",
    "dsttrunkname": "dsttrunkname",
    "status": "status",
    "type": "type",
    "pincode": "pincode",
    "recording": "recording",
    "didnumber": "didnumber",
    "agentringtime": "agentringtime",
    "sn": "sn",
}

_INT_FIELDS = frozenset({"callduration", "talkduration", "agentringtime"})


def _text(value: Any) -> str:
    """A field value as text: the PBX sends strings, but numbers and lists occur."""
    if value is None:
        return ""
    if isinstance(value, list):
        # A repeated key in a legacy report: the first occurrence is the call's own.
        return _text(value[0]) if value else ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dict):
        return ""
    return str(value).strip()


# The largest number of seconds `parse_seconds` returns: a duration written larger (a PBX
# with a broken counter, "99999999999999999999999:00") reads as this, which is still absurd
# (over 30,000 years: the index refuses it, see callvault.times.MAX_DURATION_S) but fits
# every database's integer, and is computed without turning a thousand digits into an int.
MAX_SECONDS = 10**12
_MAX_DIGITS = len(str(MAX_SECONDS))


def parse_seconds(value: Any) -> int | None:
    """Seconds from "29", 29, "29.0" or "00:10:00"; None when absent or not a duration.

    At most `MAX_SECONDS`: a larger number reads as `MAX_SECONDS`.
    """
    text = _text(value)
    if not text:
        return None
    if ":" in text:
        parts = [part.strip() for part in text.split(":")]
        if len(parts) > 3 or not all(part.isascii() and part.isdigit() for part in parts):
            return None
        total = 0
        for part in parts:
            digits = part.lstrip("0")
            if len(digits) > _MAX_DIGITS:
                return MAX_SECONDS
            total = total * 60 + int(digits or "0")
        return min(total, MAX_SECONDS)
    try:
        number = float(text)
    except ValueError:
        return None
    if number != number or number < 0:  # NaN, negative
        return None
    return int(min(number, MAX_SECONDS))


def normalise_key(key: str) -> str:
    """A header or JSON key in the form FIELD_ALIASES uses: lowercase, no spaces/underscores."""
    return "".join(ch for ch in key.strip().lower() if ch not in " _-")


def call_detail_from_fields(fields: Mapping[str, Any]) -> CallDetail:
    """Build a CallDetail from NewCdr/CSV fields; unknown keys are ignored, missing ones empty."""
    values: dict[str, Any] = {}
    for key, value in fields.items():
        target = FIELD_ALIASES.get(normalise_key(key))
        if target is None:
            continue
        if target in values and _text(values[target]) and not _text(value):
            continue  # an empty alias never hides a filled one
        values[target] = value
    kwargs: dict[str, Any] = {}
    for target, value in values.items():
        if target in _INT_FIELDS:
            kwargs[target] = parse_seconds(value)
        elif target == "status":
            kwargs[target] = normalise_status(_text(value))
        elif target == "recording":
            kwargs[target] = _text(value) or None
        else:
            kwargs[target] = _text(value)
    kwargs.setdefault("callid", "")
    return CallDetail(**kwargs)


def parse_cdr_csv(text: str) -> list[CallDetail]:
    """Parse the body of ``cdr/download`` into records, by header name.

    Tolerates a byte-order mark, CRLF line ends, blank lines, unknown columns, any of the
    three destination-trunk spellings and short rows. Raises PbxProtocolError when there is
    no header row with a ``callid`` column (an empty body included), and PbxTransportError
    when the text stops in the middle of its last row (no line end, fewer cells than the
    header): the transfer was cut off.
    """
    text = text.lstrip("\ufeff")
    rows = [
        row
        for row in csv.reader(io.StringIO(text, newline=""))
        if row and any(cell.strip() for cell in row)
    ]
    header: list[str] | None = None
    records: list[CallDetail] = []
    if len(rows) > 1 and not text.endswith(("\n", "\r")) and len(rows[-1]) < len(rows[0]):
        raise PbxTransportError(
            f"the CDR export stops in the middle of a row ({len(rows[-1])} of "
            f"{len(rows[0])} columns): the transfer was cut off"
        )
    for row in rows:
        if header is None:
            header = [normalise_key(cell.lstrip("\ufeff")) for cell in row]
            if "callid" not in header:
                raise PbxProtocolError(
                    "the CDR export has no header row with a callid column; "
                    "it is not the CSV the API documents"
                )
            continue
        fields = {name: row[i] for i, name in enumerate(header) if i < len(row) and name}
        if not fields.get("callid", "").strip():
            continue
        records.append(call_detail_from_fields(fields))
    if header is None:
        raise PbxProtocolError("the CDR export is empty: not even its header row arrived")
    return records


CSV_COLUMNS: tuple[str, ...] = (
    "callid",
    "timestart",
    "callfrom",
    "callto",
    "callduraction",
    "talkduraction",
    "srctrunkname",
    "desttrunkname",
    "status",
    "type",
    "pincode",
    "recording",
    "didnumber",
    "agentringtime",
    "sn",
)


def call_detail_row(detail: CallDetail) -> dict[str, str]:
    """A record as the CSV export spells it (for printing and for writing CSV back)."""

    def num(value: int | None) -> str:
        return "" if value is None else str(value)

    return {
        "callid": detail.callid,
        "timestart": detail.timestart,
        "callfrom": detail.callfrom,
        "callto": detail.callto,
        "callduraction": num(detail.callduration),
        "talkduraction": num(detail.talkduration),
        "srctrunkname": detail.srctrunkname,
        "desttrunkname": detail.dsttrunkname,
        "status": detail.status,
        "type": detail.type,
        "pincode": detail.pincode,
        "recording": detail.recording or "",
        "didnumber": detail.didnumber,
        "agentringtime": num(detail.agentringtime),
        "sn": detail.sn,
    }
