"""Parsing of pushed reports: the three formats, spelling variants, repeated keys."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callvault.pbx import (
    BootUpEvent,
    Event,
    EventFormat,
    EventParseError,
    NewCdrEvent,
    PbxProtocolError,
    parse_event,
)

V2_EXAMPLE = (
    b'{"event":"NewCdr","callid":"1571897930.5","timestart":"2019-10-23 22:18:50",'
    b'"callfrom":"1023","callto":"2023","callduraction":"19","talkduraction":"14",'
    b'"srctrunkname":"","dsttrcunkname":"","pincode":"","status":"ANSWERED","type":"Internal",'
    b'"recording":"20191024201242-1571897930.5-203-201-Internal.wav","didnumber":"",'
    b'"agentringtime":"0","sn":"369451090405"}'
)
V1_EXAMPLE = (
    b'{"action":"NewCdr","callid":"1505352445.265","timestart":"2017-09-14 09:27:25",'
    b'"callfrom":"102","callto":"1000","srctrunkname":"Apple_test","callduraction":"38",'
    b'"talkduraction":"29","status":"ANSWERED","type":"Inbound",'
    b'"recording":"20170914092747-1505352445.265-102-1000-Inbound.wav"}'
)


def test_v2_newcdr_example_from_the_docs() -> None:
    event = parse_event(V2_EXAMPLE)
    assert isinstance(event, NewCdrEvent)
    assert event.name == "NewCdr"
    assert event.format is EventFormat.V2_0_0
    assert event.sn == "369451090405"
    cdr = event.cdr
    assert cdr.callid == "1571897930.5"
    assert cdr.timestart == "2019-10-23 22:18:50"
    assert (cdr.callfrom, cdr.callto) == ("1023", "2023")
    assert (cdr.callduration, cdr.talkduration, cdr.agentringtime) == (19, 14, 0)
    assert cdr.status == "ANSWERED"
    assert cdr.type == "Internal"
    assert cdr.recording == "20191024201242-1571897930.5-203-201-Internal.wav"
    assert cdr.dsttrunkname == ""


def test_v1_newcdr_with_missing_keys() -> None:
    event = parse_event(V1_EXAMPLE)
    assert isinstance(event, NewCdrEvent)
    assert event.format is EventFormat.LEGACY
    assert event.sn == ""
    assert event.cdr.srctrunkname == "Apple_test"
    assert event.cdr.dsttrunkname == ""
    assert event.cdr.didnumber == ""
    assert event.cdr.agentringtime is None
    assert event.cdr.talkduration == 29


@pytest.mark.parametrize("key", ["desttrunkname", "dstrunkname", "dsttrcunkname"])
def test_all_three_destination_trunk_spellings(key: str) -> None:
    body = json.dumps({"action": "NewCdr", "callid": "1.1", key: "Trunk-B"}).encode()
    event = parse_event(body)
    assert isinstance(event, NewCdrEvent)
    assert event.cdr.dsttrunkname == "Trunk-B"


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("ANSWERD", "ANSWERED"),
        ("NO ANSWERED", "NO ANSWER"),
        ("no answer", "NO ANSWER"),
        ("BUSY", "BUSY"),
        ("VOICEMAIL", "VOICEMAIL"),
        ("Failed", "FAILED"),
    ],
)
def test_status_spellings_are_normalised(sent: str, expected: str) -> None:
    body = json.dumps({"event": "NewCdr", "callid": "1.2", "status": sent}).encode()
    event = parse_event(body)
    assert isinstance(event, NewCdrEvent)
    assert event.cdr.status == expected


def test_numbers_sent_as_json_numbers_and_empty_recording() -> None:
    body = b'{"event":"NewCdr","callid":"9.9","callfrom":1000,"callduraction":12,"recording":""}'
    event = parse_event(body)
    assert isinstance(event, NewCdrEvent)
    assert event.cdr.callfrom == "1000"
    assert event.cdr.callduration == 12
    assert event.cdr.recording is None


def test_legacy_repeated_keys_are_all_kept() -> None:
    body = (
        b'{"action":"BYE","callid":"1547375817.78","ext":{"extid":"1000"},'
        b'"ext":{"extid":"1002"},"sn":"369362089179"}'
    )
    event = parse_event(body)
    assert type(event) is Event
    assert event.name == "BYE"
    assert event.format is EventFormat.LEGACY
    assert event.fields["ext"] == [{"extid": "1000"}, {"extid": "1002"}]
    assert event.sn == "369362089179"


def test_legacy_key_repeated_three_times_and_nested() -> None:
    body = (
        b'{"action":"ANSWERED","outbound":{"from":"1","to":"2"},'
        b'"ext":{"extid":"1"},"ext":{"extid":"2"},"ext":{"extid":"3"}}'
    )
    event = parse_event(body)
    assert event.fields["ext"] == [{"extid": "1"}, {"extid": "2"}, {"extid": "3"}]
    assert event.fields["outbound"] == {"from": "1", "to": "2"}


def test_format_1_0_2_with_party_array() -> None:
    body = (
        b'{"action":"BYE","callid":"1547375817.78","call":[{"ext":{"extid":"1006"}},'
        b'{"ext":{"extid":"1005"}}],"sn":"369362089179"}'
    )
    event = parse_event(body)
    assert event.format is EventFormat.V1_0_2
    assert event.fields["call"][1] == {"ext": {"extid": "1005"}}


def test_explicit_format_overrides_inference() -> None:
    event = parse_event(V1_EXAMPLE, format=EventFormat.V1_0_2)
    assert event.format is EventFormat.V1_0_2


def test_bootup_and_unknown_events_are_kept() -> None:
    boot = parse_event(b'{"action":"BootUp","sn":"369351034049"}')
    assert isinstance(boot, BootUpEvent)
    assert boot.sn == "369351034049"
    other = parse_event(b'{"event":"ExtensionStatus","extension":"1000","status":"Registered"}')
    assert type(other) is Event
    assert other.name == "ExtensionStatus"
    assert other.fields["status"] == "Registered"


def test_byte_order_mark_is_tolerated() -> None:
    event = parse_event(b"\xef\xbb\xbf" + V2_EXAMPLE)
    assert isinstance(event, NewCdrEvent)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"callid":"1.1"}',
        b'{"action":""}',
        b'{"action":"NewCdr"}',
        b"\xff\xfe\x00",
        b'{"action": "NewCdr", "callid": ',
    ],
)
def test_malformed_reports_raise_a_parse_error(body: bytes) -> None:
    with pytest.raises(EventParseError) as info:
        parse_event(body)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, PbxProtocolError)


# ---------------------------------------------------------------- property tests

_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), min_size=0, max_size=20
).map(str.strip)
_number = st.integers(min_value=0, max_value=100_000).map(str)

cdr_values = st.fixed_dictionaries(
    {
        "callid": st.from_regex(r"\A[0-9]{10}\.[0-9]{1,5}\Z"),
        "timestart": st.from_regex(
            r"\A20[0-9]{2}-[01][0-9]-[0-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-5][0-9]\Z"
        ),
        "callfrom": _text,
        "callto": _text,
        "callduraction": _number,
        "talkduraction": _number,
        "srctrunkname": _text,
        "dsttrunk": _text,
        "status": st.sampled_from(["ANSWERED", "NO ANSWER", "BUSY", "FAILED", "VOICEMAIL"]),
        "type": st.sampled_from(["Inbound", "Outbound", "Internal", "Callback", "Transfer"]),
        "pincode": _text,
        "recording": _text,
        "didnumber": _text,
        "agentringtime": _number,
        "sn": st.from_regex(r"\A[0-9]{0,12}\Z"),
    }
)


def _render(values: dict[str, str], fmt: EventFormat) -> bytes:
    """Render NewCdr fields the way the PBX sends them in each format."""
    fields = dict(values)
    trunk = fields.pop("dsttrunk")
    if fmt is EventFormat.V2_0_0:
        document: dict[str, Any] = {"event": "NewCdr", **fields, "dsttrcunkname": trunk}
        return json.dumps(document).encode()
    document = {"action": "NewCdr", **fields, "desttrunkname": trunk}
    # v1 leaves empty fields out.
    document = {k: v for k, v in document.items() if v != "" or k in ("action", "callid")}
    if fmt is EventFormat.LEGACY:
        # Hand-built JSON text (legacy reports are not produced by a JSON library).
        return (
            "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in document.items()) + "}"
        ).encode()
    return json.dumps(document, ensure_ascii=False).encode()


@settings(max_examples=60, deadline=None)
@given(values=cdr_values, fmt=st.sampled_from(list(EventFormat)))
def test_generated_newcdr_round_trips_in_every_format(
    values: dict[str, str], fmt: EventFormat
) -> None:
    event = parse_event(_render(values, fmt), format=fmt)
    assert isinstance(event, NewCdrEvent)
    assert event.format is fmt
    cdr = event.cdr
    assert cdr.callid == values["callid"]
    assert cdr.timestart == values["timestart"]
    assert cdr.callfrom == values["callfrom"]
    assert cdr.callto == values["callto"]
    assert cdr.callduration == int(values["callduraction"])
    assert cdr.talkduration == int(values["talkduraction"])
    assert cdr.agentringtime == int(values["agentringtime"])
    assert cdr.srctrunkname == values["srctrunkname"]
    assert cdr.dsttrunkname == values["dsttrunk"]
    assert cdr.status == values["status"]
    assert cdr.type == values["type"]
    assert cdr.pincode == values["pincode"]
    assert cdr.recording == (values["recording"] or None)
    assert cdr.didnumber == values["didnumber"]
    assert event.sn == values["sn"]


@settings(max_examples=40, deadline=None)
@given(
    extids=st.lists(st.from_regex(r"\A[0-9]{3,5}\Z"), min_size=2, max_size=5),
    callid=st.from_regex(r"\A[0-9]{10}\.[0-9]{1,4}\Z"),
)
def test_generated_legacy_repeated_parties_round_trip(extids: list[str], callid: str) -> None:
    parties = ",".join(f'"ext":{{"extid":"{e}"}}' for e in extids)
    body = f'{{"action":"BYE","callid":"{callid}",{parties}}}'.encode()
    event = parse_event(body)
    assert event.format is EventFormat.LEGACY
    assert event.fields["ext"] == [{"extid": e} for e in extids]
    assert event.fields["callid"] == callid
