"""Simulator: the CDR export (cdr/get_random + cdr/download) as CSV, over real HTTPS."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import pytest

from callvault.pbx._types import CallDetail
from test_sim_helpers import Pbx, running_pbx

V1_HEADER = [
    "callid",
    "timestart",
    "callfrom",
    "callto",
    "callduraction",
    "talkduraction",
    "srctrunkname",
    "desttrunkname",
    "pincode",
    "status",
    "type",
    "recording",
    "didnumber",
    "agentringtime",
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
