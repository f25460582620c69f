"""Parsing of the CDR CSV export, by header name."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callvault.pbx import (
    CSV_COLUMNS,
    PbxProtocolError,
    PbxTransportError,
    call_detail_row,
    parse_cdr_csv,
)

HEADER = (
    "callid,timestart,callfrom,callto,callduraction,talkduraction,srctrunkname,"
    "desttrunkname,status,type,pincode,recording,didnumber,sn"
)


def test_rows_are_read_by_header_name() -> None:
    text = (
        HEADER + "\n"
        "1505352445.265,2017-09-14 09:27:25,102,1000,38,29,Apple_test,,ANSWERED,Inbound,,"
        "20170914092747-1505352445.265-102-1000-Inbound.wav,,369351034049\n"
        "1505352615.274,2017-09-14 09:30:15,1000,91000,20,0,,SIP-1,NO ANSWERED,Outbound,,,,"
        "369351034049\n"
    )
    rows = parse_cdr_csv(text)
    assert len(rows) == 2
    first, second = rows
    assert first.callid == "1505352445.265"
    assert first.callduration == 38 and first.talkduration == 29
    assert first.srctrunkname == "Apple_test"
    assert first.recording == "20170914092747-1505352445.265-102-1000-Inbound.wav"
    assert first.sn == "369351034049"
    assert second.recording is None
    assert second.status == "NO ANSWER"
    assert second.dsttrunkname == "SIP-1"


def test_columns_in_another_order_with_bom_crlf_and_v2_spelling() -> None:
    text = (
        "\ufeffrecording,dsttrcunkname,callid,status,agentringtime,extra\r\n"
        "a+4915112345678.wav,Trunk-X,1.5,ANSWERD,3,ignored\r\n"
        "\r\n"
        ",,2.5,BUSY,,\r\n"
    )
    rows = parse_cdr_csv(text)
    assert [r.callid for r in rows] == ["1.5", "2.5"]
    assert rows[0].recording == "a+4915112345678.wav"
    assert rows[0].dsttrunkname == "Trunk-X"
    assert rows[0].status == "ANSWERED"
    assert rows[0].agentringtime == 3
    assert rows[1].recording is None
    assert rows[1].agentringtime is None


@pytest.mark.parametrize("spelling", ["desttrunkname", "dstrunkname", "dsttrcunkname"])
def test_each_trunk_spelling(spelling: str) -> None:
    rows = parse_cdr_csv(f"callid,{spelling}\n7.7,T1\n")
    assert rows[0].dsttrunkname == "T1"


def test_short_rows_and_quoted_commas() -> None:
    rows = parse_cdr_csv('callid,callfrom,callto,recording\n3.3,"Doe, John"\n')
    assert rows[0].callfrom == "Doe, John"
    assert rows[0].callto == ""
    assert rows[0].recording is None


def test_header_only_gives_no_rows() -> None:
    assert parse_cdr_csv(HEADER + "\r\n") == []
    assert parse_cdr_csv(HEADER) == []


def test_empty_export_is_not_read_as_no_calls() -> None:
    # An empty range is errno 20021 or a header row; nothing at all means nothing arrived.
    for text in ("", "\r\n", "\ufeff"):
        with pytest.raises(PbxProtocolError, match="empty"):
            parse_cdr_csv(text)


def test_export_cut_off_mid_row_is_a_transport_error() -> None:
    whole = HEADER + "\r\n" + ",".join(["1.2", "2026-01-01 10:00:00"] + ["x"] * 12) + "\r\n"
    assert len(parse_cdr_csv(whole)) == 1
    cut = whole[: whole.index("2026-01-01") + 7]
    with pytest.raises(PbxTransportError, match="cut off"):
        parse_cdr_csv(cut)


def test_text_without_callid_header_is_refused() -> None:
    with pytest.raises(PbxProtocolError):
        parse_cdr_csv("<html><body>504 Gateway Time-out</body></html>\n")


_cell = st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), max_size=15).map(
    str.strip
)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "callid": st.from_regex(r"\A[0-9]{10}\.[0-9]{1,4}\Z"),
                "callfrom": _cell,
                "recording": _cell,
                "callduraction": st.integers(0, 99999).map(str),
                "status": st.sampled_from(["ANSWERED", "BUSY", "NO ANSWER"]),
            }
        ),
        max_size=8,
    ),
    crlf=st.booleans(),
)
def test_generated_csv_round_trips(rows: list[dict[str, str]], crlf: bool) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\r\n" if crlf else "\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    parsed = parse_cdr_csv(out.getvalue())
    assert [p.callid for p in parsed] == [r["callid"] for r in rows]
    for original, record in zip(rows, parsed, strict=True):
        assert record.callfrom == original["callfrom"]
        assert record.recording == (original["recording"] or None)
        assert record.callduration == int(original["callduraction"])
        assert call_detail_row(record)["callduraction"] == original["callduraction"]
