"""The CDR export: parsing its CSV by header name, and `export_cdr`'s requests and failures.

Which path each test exercises: the export is fetched through httpx whether a transport is
injected or not, so its flows run against the fake PBX behind an httpx.MockTransport
(`client_for`); what only a real connection shows (raw header bytes) against the fake over
real HTTP (`serve_fake_pbx`), and the whole export against the simulator over HTTPS (`sim`).
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callvault.pbx import (
    CSV_COLUMNS,
    CdrError,
    PbxClient,
    PbxProtocolError,
    PbxTransportError,
    RequestRejected,
    call_detail_row,
    parse_cdr_csv,
)
from callvault.simulator import Simulator
from support.pbx_fakes import BASE, PASSWORD, FakePbx, client_for, serve_fake_pbx
from support.pbx_sim import sim_client

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


# ------------------------------------------------------------------ export_cdr


@pytest.mark.parametrize(("version", "field"), [("v1.1.0", "extid"), ("v2.0.0", "number")])
async def test_export_cdr_flow_per_version(version: str, field: str) -> None:
    pbx = FakePbx()
    async with client_for(pbx, api_version=version, allowedip="127.0.0.9") as client:
        rows = await client.export_cdr(datetime(2024, 1, 2), datetime(2024, 1, 2, 23, 59, 59))
    assert [(r.callid, r.recording) for r in rows] == [("1.1", "a.wav")]
    get_random, download = pbx.calls[1], pbx.calls[2]
    assert get_random.endpoint == "cdr/get_random"
    assert get_random.body == {
        field: "all",
        "starttime": "2024-01-02 00:00:00",
        "endtime": "2024-01-02 23:59:59",
        "allowedip": "127.0.0.9",
    }
    assert download.endpoint == "cdr/download"
    assert download.query[field] == "all"
    assert download.query["starttime"] == "2024-01-02 00:00:00"
    assert download.query["random"] == pbx.issued_randoms[0]


async def test_export_cdr_url_encodes_space_as_percent_20() -> None:
    raw_paths: list[bytes] = []
    pbx = FakePbx()

    async def spy(request: httpx.Request) -> httpx.Response:
        raw_paths.append(request.url.raw_path)
        return await pbx.handler(request)

    client = PbxClient(BASE, "api", PASSWORD, transport=httpx.MockTransport(spy))
    async with client:
        await client.export_cdr(datetime(2024, 1, 2), datetime(2024, 1, 2, 1))
    download = next(p for p in raw_paths if p.startswith(b"/api/v1.1.0/cdr/download"))
    assert b"starttime=2024-01-02%2000%3A00%3A00" in download


async def test_export_cdr_errors() -> None:
    pbx = FakePbx(cdr_errno="20021")
    async with client_for(pbx) as client:
        assert await client.export_cdr(datetime(2024, 1, 2), datetime(2024, 1, 3)) == []
        pbx.cdr_errno = "20019"
        with pytest.raises(CdrError):
            await client.export_cdr(datetime(2024, 1, 2), datetime(2024, 1, 3))
        with pytest.raises(ValueError):
            await client.export_cdr(datetime(2024, 1, 3), datetime(2024, 1, 2))
    async with client_for(FakePbx(), api_version="v1.0.1") as old:
        with pytest.raises(RequestRejected, match=r"needs API v1\.1\.0 or later"):
            await old.export_cdr(datetime(2024, 1, 2), datetime(2024, 1, 3))


async def test_an_empty_cdr_export_is_a_failure_not_no_calls() -> None:
    pbx = FakePbx(cdr_csv="")
    async with client_for(pbx, max_attempts=2) as client:
        with pytest.raises(PbxTransportError, match=r"empty CDR export.*gave up after 2"):
            await client.export_cdr(datetime(2026, 11, 1), datetime(2026, 11, 1, 23, 59, 59))
    assert pbx.count("cdr/download") == 2


async def test_a_cut_off_cdr_export_is_retried() -> None:
    pbx = FakePbx(cdr_csv="callid,timestart,recording\n1.1,2026-11-01 10:00:00,a.wav\n1.2,2026-")
    async with client_for(pbx, max_attempts=2) as client:
        with pytest.raises(PbxTransportError, match=r"cut off.*gave up after 2"):
            await client.export_cdr(datetime(2026, 11, 1), datetime(2026, 11, 1, 23, 59, 59))
    pbx.cdr_csv += "11-01 10:05:00,b.wav\r\n"
    async with client_for(pbx) as client:
        rows = await client.export_cdr(datetime(2026, 11, 1), datetime(2026, 11, 1, 23, 59, 59))
    assert [row.recording for row in rows] == ["a.wav", "b.wav"]


@pytest.mark.parametrize("version", ["v1.1.0", "v2.0.0"])
async def test_cdr_export_from_the_simulator(sim: Simulator, version: str) -> None:
    placed = [
        sim.place_call(
            callfrom="+4915112345678", callto="1000", type="Inbound", srctrunkname="SIP-A"
        ),
        sim.place_call(status="NO ANSWER", dsttrunkname="SIP-B", type="Outbound"),
    ]
    now = datetime.fromisoformat(placed[0].timestart)
    async with sim_client(sim, api_version=version) as pbx:
        rows = await pbx.export_cdr(now - timedelta(hours=1), now + timedelta(hours=1))
        empty = await pbx.export_cdr(now - timedelta(days=3), now - timedelta(days=2))
    by_id = {r.callid: r for r in rows}
    assert set(by_id) == {c.callid for c in placed}
    for call in placed:
        row = by_id[call.callid]
        assert row.recording == call.recording
        assert row.callfrom == call.callfrom
        assert row.status == call.status
        assert row.talkduration == call.talkduration
        assert row.srctrunkname == call.srctrunkname
        assert row.dsttrunkname == call.dsttrunkname
    assert empty == []


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
async def test_non_ascii_header_bytes_of_the_export_are_decoded(encoding: str) -> None:
    disposition = 'attachment; filename="cdr-Müller.csv"'.encode(encoding)
    pbx = FakePbx(download_headers=[(b"Content-Disposition", disposition)])
    with serve_fake_pbx(pbx) as base:
        async with PbxClient(base, "api", PASSWORD, max_attempts=1) as client:
            rows = await client.export_cdr(datetime(2024, 1, 2), datetime(2024, 1, 2, 1))
    assert [(r.callid, r.recording) for r in rows] == [("1.1", "a.wav")]
