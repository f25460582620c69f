"""Simulator: the call-progress reports a PBX pushes before NewCdr, in every format, and that
callvault's parser reads them and its receiver answers them 200 and archives as before."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callvault.archive import Archiver
from callvault.index import Index
from callvault.pbx import ApiVersion, EventFormat, NewCdrEvent, parse_event
from callvault.pbx._types import CallDetail
from callvault.simulator._progress import CallParties, parties_of, progress_reports
from support.archive import archiver_config, states, wait_until
from support.sim_helpers import Pbx, Receiver, running_pbx, running_receiver

SERIAL = "369351034049"
API_FOR = {None: "v1.1.0", "1.0.2": "v1.1.0", "2.0.0": "v2.0.0"}


@pytest.fixture
def pbx() -> Iterator[Pbx]:
    yield from running_pbx(call_progress_reports=True)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from running_receiver()


def _pairs(body: bytes) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = json.loads(body, object_pairs_hook=lambda p: p)
    return pairs


def _strict(body: bytes) -> dict[str, Any]:
    """Parse well-formed JSON, failing on a repeated key (which only legacy may have)."""

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _value in pairs]
        assert len(keys) == len(set(keys)), keys
        return dict(pairs)

    data: dict[str, Any] = json.loads(body, object_pairs_hook=no_repeats)
    return data


def _name(report: dict[str, Any]) -> str:
    name = report.get("event", report.get("action"))
    assert isinstance(name, str)
    if name == "ExtensionStatus":
        return f"{name}:{report['extension']}:{report['status']}"
    return name


def _reports(pbx: Pbx, receiver: Receiver, version: str | None, **call: Any) -> list[bytes]:
    extra = {"version": version} if version else {}
    pbx.login(api=API_FOR[version], port=receiver.port, **extra)
    pbx.sim.place_call(**call)
    assert pbx.sim.wait_events_idle(10)
    assert pbx.sim.events_delivered == pbx.sim.events_queued
    return [r.body for r in receiver.received]


ANSWERED_INTERNAL = [
    "ExtensionStatus:1001:Busy",
    "ALERT",
    "RING",
    "ExtensionStatus:1003:Ringing",
    "ANSWER",
    "ANSWERED",
    "ExtensionStatus:1003:Busy",
    "BYE",
    "ExtensionStatus:1001:Idle",
    "ExtensionStatus:1003:Idle",
    "NewCdr",
]


def test_an_answered_internal_call_legacy_repeats_the_ext_key(pbx: Pbx, receiver: Receiver) -> None:
    bodies = _reports(pbx, receiver, None, callfrom="1001", callto="1003")
    assert [_name(dict(_pairs(body))) for body in bodies] == ANSWERED_INTERNAL
    callid = dict(_pairs(bodies[-1]))["callid"]
    ext = [("extid", "1001")], [("extid", "1003")]
    sn = ("sn", SERIAL)
    # 2017 samples: one "ext" key per party; ALERT names the caller, RING and ANSWER the
    # callee first, ANSWERED the caller first; BYE first names who hung up (the caller).
    assert _pairs(bodies[1]) == [("action", "ALERT"), ("callid", callid), ("ext", ext[0]), sn]
    for index, name, first, second in [
        (2, "RING", 1, 0),
        (4, "ANSWER", 1, 0),
        (5, "ANSWERED", 0, 1),
        (7, "BYE", 0, 1),
    ]:
        assert _pairs(bodies[index]) == [
            ("action", name),
            ("callid", callid),
            ("ext", ext[first]),
            ("ext", ext[second]),
            sn,
        ]
    assert _pairs(bodies[0]) == [
        ("action", "ExtensionStatus"),
        ("extension", "1001"),
        ("status", "Busy"),
        sn,
    ]


def test_an_answered_outbound_call_in_1_0_2_names_the_trunk_leg(
    pbx: Pbx, receiver: Receiver
) -> None:
    bodies = _reports(
        pbx,
        receiver,
        "1.0.2",
        callfrom="1001",
        callto="015112345678",
        type="Outbound",
        dsttrunkname="SIP-Provider",
    )
    reports = [_strict(body) for body in bodies]
    assert [_name(r) for r in reports] == [
        "ExtensionStatus:1001:Busy",
        "ALERT",
        "RING",
        "ANSWER",
        "ANSWERED",
        "BYE",
        "ExtensionStatus:1001:Idle",
        "NewCdr",
    ]
    callid = reports[-1]["callid"]
    epoch, seq = callid.split(".")
    leg = {
        "outbound": {
            "from": "1001",
            "to": "015112345678",
            "trunk": "SIP-Provider",
            "outboundid": f"{epoch}.{int(seq) + 1}",  # the trunk leg's own id
        }
    }
    caller = {"ext": {"extid": "1001"}}
    assert reports[1] == {"action": "ALERT", "callid": callid, "call": [caller], "sn": SERIAL}
    assert reports[2]["call"] == [leg, caller]  # V1 example: the outbound object first
    assert reports[3]["call"] == [leg, caller]
    assert reports[4]["call"] == [caller, leg]
    assert all(r["sn"] == SERIAL and r.get("callid", callid) == callid for r in reports)


def test_an_answered_inbound_call_in_2_0_0_is_told_as_call_status(
    pbx: Pbx, receiver: Receiver
) -> None:
    bodies = _reports(
        pbx,
        receiver,
        "2.0.0",
        callfrom="015112345678",
        callto="1003",
        type="Inbound",
        srctrunkname="SIP-Provider",
        didnumber="0301234567",
    )
    reports = [_strict(body) for body in bodies]
    assert [_name(r) for r in reports] == [
        "CallStatus",
        "ExtensionStatus:1003:Ringing",
        "CallStatus",
        "ExtensionStatus:1003:Busy",
        "CallStatus",
        "ExtensionStatus:1003:Registered",  # v2: a SIP extension back from busy
        "NewCdr",
    ]
    callid = reports[-1]["callid"]
    statuses = []
    for report in (reports[0], reports[2], reports[4]):
        assert set(report) == {"event", "callid", "members", "sn"}
        assert report["callid"] == callid
        inbound, ext = report["members"]
        assert set(inbound) == {"inbound"} and set(ext) == {"ext"}
        leg, extension = inbound["inbound"], ext["ext"]
        assert (leg["from"], leg["to"], leg["trunkname"]) == (
            "015112345678",
            "1003",
            "SIP-Provider",
        )
        assert leg["channelid"].startswith("PJSIP/trunk-SIP-Provider-endpoint-")
        assert extension["number"] == "1003"
        assert extension["channelid"].startswith("PJSIP/1003-")
        statuses.append((leg["memberstatus"], extension["memberstatus"]))
    assert statuses == [("ALERT", "RING"), ("ANSWERED", "ANSWER"), ("BYE", "BYE")]


@pytest.mark.parametrize("version", [None, "1.0.2", "2.0.0"])
@pytest.mark.parametrize(
    ("status", "reason"), [("BUSY", "486 Busy Here"), ("FAILED", "404 NOT found")]
)
def test_busy_and_failed_calls_send_call_failed(
    pbx: Pbx, receiver: Receiver, version: str | None, status: str, reason: str
) -> None:
    bodies = _reports(
        pbx, receiver, version, callfrom="1001", callto="1003", status=status, recorded=False
    )
    reports = [dict(_pairs(body)) for body in bodies]
    idle = "Registered" if version == "2.0.0" else "Idle"
    assert [_name(r) for r in reports] == [
        "ExtensionStatus:1001:Busy",
        "CallFailed",
        f"ExtensionStatus:1001:{idle}",
        "NewCdr",
    ]
    failed = reports[1]
    assert failed["reason"] == reason and failed["callid"] == reports[-1]["callid"]
    if version == "2.0.0":
        [member] = _strict(bodies[1])["members"]
        assert member["ext"]["number"] == "1001" and "memberstatus" not in member["ext"]
    else:
        assert dict(failed["ext"]) == {"extid": "1001"}


def test_a_failed_outbound_call_names_its_trunk_leg(pbx: Pbx, receiver: Receiver) -> None:
    bodies = _reports(
        pbx,
        receiver,
        "1.0.2",
        callfrom="1002",
        callto="015112345678",
        type="Outbound",
        dsttrunkname="SIP-Provider",
        status="FAILED",
        recorded=False,
    )
    failed = _strict(bodies[1])
    assert list(failed) == ["action", "reason", "callid", "outbound", "ext", "sn"]
    assert failed["reason"] == "Line unreachable"
    assert failed["outbound"]["to"] == "015112345678"
    assert failed["ext"] == {"extid": "1002"}


@pytest.mark.parametrize("status", ["NO ANSWER", "VOICEMAIL"])
def test_an_unanswered_call_rings_and_ends_without_answer(
    pbx: Pbx, receiver: Receiver, status: str
) -> None:
    bodies = _reports(
        pbx, receiver, "1.0.2", callfrom="1001", callto="1003", status=status, recorded=False
    )
    assert [_name(_strict(body)) for body in bodies] == [
        "ExtensionStatus:1001:Busy",
        "ALERT",
        "RING",
        "ExtensionStatus:1003:Ringing",
        "BYE",
        "ExtensionStatus:1001:Idle",
        "ExtensionStatus:1003:Idle",
        "NewCdr",
    ]


def test_switched_off_only_newcdr_is_sent(receiver: Receiver) -> None:
    for pbx in running_pbx(call_progress_reports=False):
        pbx.login(port=receiver.port, version="1.0.2")
        pbx.sim.place_call()
        assert pbx.sim.wait_events_idle(10)
    assert [_strict(r.body)["action"] for r in receiver.received] == ["NewCdr"]


def test_the_reports_of_one_call_arrive_in_order_despite_resends(
    pbx: Pbx, receiver: Receiver
) -> None:
    receiver.statuses = [503, 200, 500]  # the first ALERT... and RING are sent twice
    bodies = _reports(pbx, receiver, "1.0.2", callfrom="1001", callto="1003")
    names = [_name(_strict(body)) for body in bodies]
    assert names[:5] == [
        "ExtensionStatus:1001:Busy",
        "ExtensionStatus:1001:Busy",
        "ALERT",
        "ALERT",
        "RING",
    ]
    assert [name for i, name in enumerate(names) if i not in (0, 2)] == ANSWERED_INTERNAL


# -- what callvault does with them ---------------------------------------------------------


def _every_call() -> Iterator[tuple[CallDetail, CallParties]]:
    serial = iter(range(1, 1000))
    for kind in ("Internal", "Inbound", "Outbound"):
        for status in ("ANSWERED", "NO ANSWER", "BUSY", "FAILED", "VOICEMAIL"):
            cdr = CallDetail(
                callid="1767268800.12",
                callfrom="015112345678" if kind == "Inbound" else "1001",
                callto="015112345678" if kind == "Outbound" else "1003",
                srctrunkname="SIP-Provider" if kind == "Inbound" else "",
                dsttrunkname="SIP-Provider" if kind == "Outbound" else "",
                status=status,
                type=kind,
                sn=SERIAL,
            )
            parties = parties_of(
                cdr, outbound_leg_id="1767268800.13", next_channel=lambda: next(serial)
            )
            yield cdr, parties


@pytest.mark.parametrize("fmt", list(EventFormat))
def test_the_parser_reads_every_progress_report(fmt: EventFormat) -> None:
    seen: set[str] = set()
    for cdr, parties in _every_call():
        for body in progress_reports(cdr, parties, fmt, SERIAL):
            for given in (fmt, None):  # format known from the login, or inferred
                event = parse_event(body, format=given)
                assert not isinstance(event, NewCdrEvent)
                assert event.sn == SERIAL
                if given is not None:
                    assert event.format is fmt
                if event.name != "ExtensionStatus":
                    assert event.fields["callid"] == cdr.callid
            seen.add(event.name)
            if fmt is not EventFormat.LEGACY:
                _strict(body)  # 1.0.2 and 2.0.0 are well-formed: no repeated key
    expected = {"ExtensionStatus", "CallFailed"}
    if fmt is EventFormat.V2_0_0:
        expected |= {"CallStatus"}
    else:
        expected |= {"ALERT", "RING", "ANSWER", "ANSWERED", "BYE"}
    assert seen == expected


def test_the_parser_keeps_both_parties_of_a_legacy_report() -> None:
    cdr, parties = next(_every_call())
    ring = progress_reports(cdr, parties, EventFormat.LEGACY, SERIAL)[2]
    event = parse_event(ring)
    assert event.name == "RING" and event.format is EventFormat.LEGACY
    assert event.fields["ext"] == [{"extid": "1003"}, {"extid": "1001"}]


@pytest.mark.parametrize("api", [ApiVersion.V1_0_1, ApiVersion.V1_1_0, ApiVersion.V2_0_0])
def test_the_archiver_answers_every_report_200_and_archives_each_recording_once(
    tmp_path: Path, api: ApiVersion
) -> None:
    with contextlib.contextmanager(running_pbx)(
        seed=11, event_retry_interval=0.2, call_progress_reports=True
    ) as pbx:
        sim = pbx.sim
        with Archiver(archiver_config(sim, tmp_path / "archive", api_version=api)) as archiver:
            assert archiver.index is not None
            index: Index = archiver.index
            cdrs = [sim.place_random_call() for _ in range(12)]
            recorded = [cdr for cdr in cdrs if cdr.recording is not None]
            assert recorded and len(recorded) < len(cdrs)  # some unanswered among them
            assert wait_until(lambda: states(index) == {"archived": len(recorded)}), states(index)
            assert sim.wait_events_idle(20)
            # Every report, progress reports included, was answered 200 the first time.
            assert sim.events_queued > 5 * len(cdrs)
            assert sim.events_delivered == sim.events_queued
            for cdr in recorded:
                assert cdr.recording is not None
                row = index.recordings.by_name(cdr.recording)
                assert row is not None and row.storage_key is not None
        downloads = [o for name, o in sim.request_log if name == "recording/download"]
        assert downloads == ["Success"] * len(recorded)  # each one once, none twice
