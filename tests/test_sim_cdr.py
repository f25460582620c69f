"""Simulator: the CDR export (cdr/get_random + cdr/download) as CSV, over real HTTPS."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterator
from datetime import datetime

import pytest

from callvault.pbx import ApiVersion, PbxClient, TlsOptions
from callvault.pbx._types import CallDetail
from support.sim_helpers import PASSWORD, Pbx, running_pbx

V1_HEADER = [
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
    "sn",
]
WIDE = {"starttime": "2000-01-01 00:00:00", "endtime": "2099-12-31 23:59:59"}


@pytest.fixture
def pbx() -> Iterator[Pbx]:
    yield from running_pbx()


@pytest.fixture
def calls(pbx: Pbx) -> list[CallDetail]:
    return [
        pbx.sim.place_call(callfrom="1001", callto="1003"),
        pbx.sim.place_call(
            callfrom="+4915112345678",
            callto="1002",
            type="Inbound",
            srctrunkname="SIP-Provider",
            didnumber="+49301234567",
        ),
        pbx.sim.place_call(callfrom="1004", callto="1005", status="NO ANSWER", recorded=False),
    ]


def _export(
    pbx: Pbx,
    token: str,
    *,
    api: str = "v1.1.0",
    ext: str = "all",
    starttime: str = WIDE["starttime"],
    endtime: str = WIDE["endtime"],
) -> str:
    field = "number" if api == "v2.0.0" else "extid"
    query = {field: ext, "starttime": starttime, "endtime": endtime}
    data = pbx.ok("cdr/get_random", version=api, token=token, body=query)
    assert data[field] == ext and data["starttime"] == starttime
    response = pbx.call(
        "cdr/download",
        version=api,
        method="GET",
        params={**query, "token": token, "random": data["random"]},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    return response.text


def test_v1_export_has_a_header_row_named_like_newcdr(pbx: Pbx, calls: list[CallDetail]) -> None:
    token = pbx.login()
    reader = csv.DictReader(io.StringIO(_export(pbx, token)))
    assert reader.fieldnames == V1_HEADER
    rows = list(reader)
    assert [row["callid"] for row in rows] == [cdr.callid for cdr in calls]
    assert [row["recording"] for row in rows] == [calls[0].recording, calls[1].recording, ""]
    inbound = rows[1]
    assert inbound["callfrom"] == "+4915112345678"
    assert inbound["srctrunkname"] == "SIP-Provider"
    assert inbound["didnumber"] == "+49301234567"
    assert inbound["timestart"] == calls[1].timestart
    assert rows[2]["status"] == "NO ANSWER" and rows[2]["talkduraction"] == "0"


def test_v2_export_takes_number_and_spells_the_trunk_column_oddly(
    pbx: Pbx, calls: list[CallDetail]
) -> None:
    token = pbx.login(api="v2.0.0")
    reader = csv.DictReader(io.StringIO(_export(pbx, token, api="v2.0.0", ext="1002")))
    assert reader.fieldnames is not None
    assert "dsttrcunkname" in reader.fieldnames and "desttrunkname" not in reader.fieldnames
    assert [row["callid"] for row in reader] == [calls[1].callid]
    v1_field = {"extid": "all", **WIDE}
    assert pbx.errno("cdr/get_random", version="v2.0.0", token=token, body=v1_field) == "10004"


@pytest.mark.parametrize("api", ["v1.1.0", "v2.0.0"])
def test_peers_reading_by_position_find_every_field(
    pbx: Pbx, calls: list[CallDetail], api: str
) -> None:
    """Two peers skip the header and read 14 cells by position (v1.1.0 and v2.0.0): status
    is cell 8, pincode 10, recording 11, didnumber 12, sn 13; no agentringtime."""
    token = pbx.login(api=api)
    lines = _export(pbx, token, api=api).splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    trunk = "dsttrcunkname" if api == "v2.0.0" else "desttrunkname"
    assert header == [trunk if name == "desttrunkname" else name for name in V1_HEADER]
    assert [len(row) for row in rows] == [14, 14, 14]
    for row, cdr in zip(rows, calls, strict=True):
        assert row[0] == cdr.callid and row[1] == cdr.timestart
        assert (row[2], row[3]) == (cdr.callfrom, cdr.callto)
        assert (row[4], row[5]) == (str(cdr.callduration), str(cdr.talkduration))
        assert (row[6], row[7]) == (cdr.srctrunkname, cdr.dsttrunkname)
        assert (row[8], row[9], row[10]) == (cdr.status, cdr.type, cdr.pincode)
        assert (row[11], row[12], row[13]) == (cdr.recording or "", cdr.didnumber, cdr.sn)


@pytest.mark.parametrize("api", [ApiVersion.V1_1_0, ApiVersion.V2_0_0])
async def test_the_client_reads_the_export_by_header_name(
    pbx: Pbx, calls: list[CallDetail], api: ApiVersion
) -> None:
    assert pbx.sim.cert_sha256 is not None
    client = PbxClient(
        pbx.sim.url,
        pbx.sim.username,
        PASSWORD,
        api_version=api,
        tls=TlsOptions(pin_sha256=pbx.sim.cert_sha256),
    )
    async with client:
        rows = await client.export_cdr(datetime(2000, 1, 1), datetime(2099, 12, 31))
    # agentringtime is not in the export: everything else comes back as placed.
    assert rows == [dataclasses.replace(cdr, agentringtime=None) for cdr in calls]


def test_extension_filter_takes_a_comma_list(pbx: Pbx, calls: list[CallDetail]) -> None:
    token = pbx.login()
    rows = list(csv.DictReader(io.StringIO(_export(pbx, token, ext="1003,1005"))))
    assert [row["callid"] for row in rows] == [calls[0].callid, calls[2].callid]


def test_rows_are_limited_to_the_time_range(pbx: Pbx, calls: list[CallDetail]) -> None:
    token = pbx.login()
    first = calls[0].timestart
    rows = list(csv.DictReader(io.StringIO(_export(pbx, token, starttime=first, endtime=first))))
    assert calls[0].callid in [row["callid"] for row in rows]
    assert all(row["timestart"] == first for row in rows)
    empty = {"extid": "all", "starttime": "2001-01-01 00:00:00", "endtime": "2001-01-01 23:59:59"}
    assert pbx.errno("cdr/get_random", token=token, body=empty) == "20021"


@pytest.mark.parametrize(
    ("starttime", "endtime"),
    [
        ("2024-01-01", "2024-01-02 00:00:00"),
        ("2024-01-01T00:00:00", "2024-01-02 00:00:00"),
        ("2024-01-02 00:00:00", "2024-01-01 00:00:00"),
    ],
)
def test_bad_times_answer_20019(
    pbx: Pbx, calls: list[CallDetail], starttime: str, endtime: str
) -> None:
    token = pbx.login()
    body = {"extid": "all", "starttime": starttime, "endtime": endtime}
    assert pbx.errno("cdr/get_random", token=token, body=body) == "20019"


def test_cdr_randoms_are_single_use_short_lived_and_bound(
    pbx: Pbx, calls: list[CallDetail]
) -> None:
    token = pbx.login()
    query = {"extid": "all", **WIDE}

    def download(value: str, **changes: str) -> str:
        params = {**query, **changes, "token": token, "random": value}
        return pbx.call("cdr/download", method="GET", params=params).text

    value = pbx.ok("cdr/get_random", token=token, body=query)["random"]
    assert download(value).startswith("callid,")
    assert download(value) == '{"status":"Failed","errno":"20020"}'
    value = pbx.ok("cdr/get_random", token=token, body=query)["random"]
    pbx.sim.clock.advance(31)
    assert download(value) == '{"status":"Failed","errno":"20020"}'
    value = pbx.ok("cdr/get_random", token=token, body=query)["random"]
    assert download(value, extid="1001") == '{"status":"Failed","errno":"20020"}'
    value = pbx.ok("cdr/get_random", token=token, body=query)["random"]
    recording_random = pbx.random(token, calls[0].recording or "")
    assert download(recording_random) == '{"status":"Failed","errno":"20020"}'
    assert download(value).startswith("callid,")
