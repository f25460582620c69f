"""The simulator is as strict as the spec where a lenient one would let client bugs pass.

Each test here failed against the earlier, more lenient simulator (audit of the simulator):
the download random bound to the API client's IP, the report format chosen per API path
version, no CDR export on v1.0.1, the 2017 meaning of errno 20012, a lockout that blocks
the whole IP, periodic faults counted from when they are switched on, faults that also hit
CORS preflights, the blank endpoint, and the statuses and spellings a real PBX pushes.
Everything talks to 127.0.0.1 only; other addresses appear only as plain strings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from callvault.archive import Archiver
from callvault.cli import _register, app
from callvault.index import Index, open_index
from callvault.pbx import (
    ApiVersion,
    EventFormat,
    NewCdrEvent,
    PbxClient,
    RecordingNotFound,
    RequestRejected,
    TlsOptions,
    parse_event,
)
from callvault.simulator import Simulator
from support.archive import archiver_config, cli_env, states, wait_until
from support.sim_helpers import (
    PASSWORD,
    Pbx,
    Receiver,
    md5,
    running_pbx,
    running_receiver,
)


@pytest.fixture
def pbx() -> Iterator[Pbx]:
    yield from running_pbx()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from running_receiver()


class NoSleep:
    """The client's back-off sleep, without sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def client_for(sim: Simulator, **kwargs: Any) -> PbxClient:
    assert sim.cert_sha256 is not None
    kwargs.setdefault("tls", TlsOptions(pin_sha256=sim.cert_sha256))
    kwargs.setdefault("sleep", NoSleep())
    return PbxClient(sim.url, sim.username, PASSWORD, **kwargs)


def outcomes(sim: Simulator, endpoint: str) -> list[str]:
    return [outcome for name, outcome in sim.request_log if name == endpoint]


def _format_of_bye(body: bytes) -> EventFormat:
    """Which format a BYE naming two parties was sent in (the three differ visibly)."""
    pairs: list[tuple[str, Any]] = json.loads(body, object_pairs_hook=lambda p: p)
    keys = [key for key, _value in pairs]
    if keys[0] == "event":
        assert "call" in keys
        return EventFormat.V2_0_0
    assert keys[0] == "action"
    if keys.count("ext") == 2:
        return EventFormat.LEGACY
    assert "call" in keys and "ext" not in keys
    return EventFormat.V1_0_2


# -- 1. only the API client's IP may download -----------------------------------------------


def test_asking_for_the_random_does_not_make_an_ip_allowed_to_download(pbx: Pbx) -> None:
    """Spec 5.2, gotcha 6: without allowedip only the login IP (or the heartbeat's ipaddr)
    may download, not whoever fetched the random."""
    name = pbx.sim.place_call().recording
    assert name is not None
    # An app server that logged in from another host (a plain string: only 127.0.0.1
    # carries traffic in tests); 127.0.0.1 then asks for the random with its token.
    session = pbx.sim.state.login(
        ip="198.51.100.7",
        username="api",
        password_md5=md5(PASSWORD),
        api_version="v1.1.0",
        port=0,
        url="",
        urltag=False,
        version=None,
    )
    token = session.token
    assert pbx.download(token, name, pbx.random(token, name)).json() == {
        "status": "Failed",
        "errno": "20015",
    }
    # allowedip names the downloader: now it may.
    value = pbx.random(token, name, allowedip="127.0.0.1")
    assert pbx.download(token, name, value).content.startswith(b"RIFF")
    # So does a heartbeat whose ipaddr is this host (the API client moved here).
    pbx.ok("heartbeat", token=token, body={"ipaddr": "127.0.0.1", "port": "0"})
    assert pbx.download(token, name, pbx.random(token, name)).content.startswith(b"RIFF")


# -- 2. the report format depends on the API path version -----------------------------------


@pytest.mark.parametrize(
    ("api", "version", "expected"),
    [
        ("v1.0.1", None, EventFormat.LEGACY),
        ("v1.0.1", "1.0.2", EventFormat.LEGACY),  # v1.0.1 has no `version` field
        ("v1.0.1", "2.0.0", EventFormat.LEGACY),
        ("v1.1.0", None, EventFormat.LEGACY),
        ("v1.1.0", "1.0.2", EventFormat.V1_0_2),
        ("v1.1.0", "2.0.0", EventFormat.LEGACY),  # not offered by v1.1.0: its default
        ("v2.0.0", None, EventFormat.LEGACY),  # v2 calls it 1.0.0
        ("v2.0.0", "1.0.0", EventFormat.LEGACY),
        ("v2.0.0", "1.0.2", EventFormat.LEGACY),  # not offered by v2: its default
        ("v2.0.0", "2.0.0", EventFormat.V2_0_0),
    ],
)
def test_report_format_follows_the_path_version_and_the_login_version(
    pbx: Pbx, receiver: Receiver, api: str, version: str | None, expected: EventFormat
) -> None:
    extra = {"version": version} if version is not None else {}
    pbx.login(api=api, port=receiver.port, **extra)
    pbx.sim.push_call_released("1547375817.78", ["1006", "1005"])
    assert receiver.wait_for(1)
    assert _format_of_bye(receiver.received[0].body) is expected


def test_v1_0_1_has_no_urltag_its_url_is_a_path(pbx: Pbx, receiver: Receiver) -> None:
    absolute = f"127.0.0.1:{receiver.port}/report"
    token = pbx.login(api="v1.0.1", port=receiver.port, url=absolute, urltag="1")
    pbx.sim.place_call()
    assert receiver.wait_for(1)
    assert receiver.received[0].path == f"/{absolute}"  # relative to the login IP and port
    # The heartbeat's flag (either spelling) does not exist in v1.0.1 either.
    pbx.ok(
        "heartbeat",
        version="v1.0.1",
        token=token,
        body={
            "ipaddr": "127.0.0.1",
            "port": receiver.port,
            "url": absolute,
            "urlflag": "1",
            "urltag": "1",
        },
    )
    pbx.sim.place_call()
    assert receiver.wait_for(2)
    assert receiver.received[1].path == f"/{absolute}"


def test_only_a_v2_heartbeat_changes_the_report_format(pbx: Pbx, receiver: Receiver) -> None:
    hb = {"ipaddr": "127.0.0.1", "port": receiver.port}
    token = pbx.login(api="v1.1.0", port=receiver.port, version="1.0.2")
    pbx.ok("heartbeat", version="v1.1.0", token=token, body={**hb, "version": "2.0.0"})
    pbx.sim.push_call_released("1.1", ["1006", "1005"])
    assert receiver.wait_for(1)
    assert _format_of_bye(receiver.received[0].body) is EventFormat.V1_0_2  # ignored
    pbx.ok("logout", token=token)
    token = pbx.login(api="v2.0.0", port=receiver.port)
    pbx.ok("heartbeat", version="v2.0.0", token=token, body={**hb, "version": "2.0.0"})
    pbx.sim.push_call_released("1.2", ["1006", "1005"])
    assert receiver.wait_for(2)
    assert _format_of_bye(receiver.received[1].body) is EventFormat.V2_0_0


def test_the_client_asks_only_for_formats_its_api_version_offers() -> None:
    assert ApiVersion.V1_0_1.report_format is None
    assert ApiVersion.V1_1_0.report_format == "1.0.2"
    assert ApiVersion.V2_0_0.report_format == "2.0.0"
    with pytest.raises(ValueError, match=r"v1\.1\.0 or later"):
        PbxClient(
            "https://127.0.0.1:8088",
            "api",
            "pw",
            api_version="v1.0.1",
            events_port=8260,
            events_url="127.0.0.1:8260/x",
            events_urltag=True,
        )


@pytest.mark.parametrize(
    ("api", "expected"),
    [
        (ApiVersion.V1_0_1, EventFormat.LEGACY),
        (ApiVersion.V1_1_0, EventFormat.V1_0_2),
        (ApiVersion.V2_0_0, EventFormat.V2_0_0),
    ],
)
async def test_the_client_gets_well_formed_reports_where_its_version_allows(
    pbx: Pbx, receiver: Receiver, api: ApiVersion, expected: EventFormat
) -> None:
    async with client_for(
        pbx.sim, api_version=api, events_port=receiver.port, events_ip="127.0.0.1"
    ) as client:
        await client.login()
        await client.heartbeat()
        cdr = pbx.sim.place_call(callfrom="1001", callto="1003")
        assert receiver.wait_for(1)
        pbx.sim.push_call_released(cdr.callid, ["1001", "1003"])
        assert receiver.wait_for(2)
    event = parse_event(receiver.received[0].body)
    assert isinstance(event, NewCdrEvent)
    assert event.cdr.callid == cdr.callid and event.cdr.recording == cdr.recording
    # A NewCdr looks alike in legacy and 1.0.2; a BYE naming two parties shows the format.
    assert _format_of_bye(receiver.received[1].body) is expected


# -- 3. no CDR export before v1.1.0 ----------------------------------------------------------


def test_v1_0_1_has_no_cdr_export(pbx: Pbx) -> None:
    pbx.sim.place_call()
    body = {"extid": "all", "starttime": "2000-01-01 00:00:00", "endtime": "2100-01-01 00:00:00"}
    token = pbx.login(api="v1.0.1")
    assert pbx.errno("cdr/get_random", version="v1.0.1", token=token, body=body) == "10003"
    assert (
        pbx.errno(
            "cdr/download",
            version="v1.0.1",
            token=token,
            method="GET",
            params={**body, "random": "0" * 32},
        )
        == "10003"
    )
    token = pbx.login(api="v1.1.0")
    assert pbx.ok("cdr/get_random", version="v1.1.0", token=token, body=body)["random"]


_CDR_NEEDS = "the CDR export needs API v1.1.0 or later; this client uses API v1.0.1"


async def test_the_client_refuses_a_cdr_export_on_v1_0_1_before_asking(pbx: Pbx) -> None:
    async with client_for(pbx.sim, api_version="v1.0.1") as client:
        with pytest.raises(RequestRejected) as refused:
            await client.export_cdr(datetime(2024, 1, 1), datetime(2024, 1, 2))
    assert str(refused.value) == _CDR_NEEDS
    assert refused.value.errno == "10003"
    assert pbx.sim.request_log == []  # nothing sent, not even a login


def test_cdr_and_backfill_commands_say_v1_0_1_has_no_cdr_export(pbx: Pbx, tmp_path: Path) -> None:
    _register()
    pbx.sim.place_call()
    env = cli_env(pbx.sim, tmp_path / "archive")
    cdr = CliRunner().invoke(
        app,
        ["cdr", "--since", "2024-01-01", "--until", "2024-01-02", "--api-version", "v1.0.1"],
        env=env,
    )
    assert cdr.exit_code == 1
    assert cdr.output == f"callvault: error: {_CDR_NEEDS}\n"
    backfill = CliRunner().invoke(
        app,
        ["backfill", "--since", "2024-01-01", "--until", "2024-01-03", "--api-version", "v1.0.1"],
        env=env,
    )
    # Refused before anything is made, as a bad option: one line, and no "run it again",
    # which would fail the same way.
    assert backfill.exit_code == 2
    assert backfill.output == (
        "callvault: error: API v1.0.1 has no CDR export to backfill from (it came with "
        "v1.1.0): give --api-version v1.1.0 or later if the PBX's firmware has it\n"
    )
    assert not (tmp_path / "archive").exists()
    assert not any(endpoint.startswith("cdr/") for endpoint, _ in pbx.sim.request_log)


# -- 4. errno 20012 in its 2017 meaning ------------------------------------------------------


@pytest.mark.parametrize(
    ("api", "switch", "unknown"),
    [
        ("v1.0.1", False, "20012"),
        ("v1.1.0", False, "20014"),
        ("v2.0.0", False, "20014"),
        ("v1.1.0", True, "20012"),
    ],
)
def test_2017_errnos_unknown_is_20012_deleted_is_20014(
    pbx: Pbx, api: str, switch: bool, unknown: str
) -> None:
    pbx.sim.faults.errno_2017 = switch
    token = pbx.login(api=api)

    def get_random(name: str) -> str:
        return pbx.errno("recording/get_random", version=api, token=token, body={"recording": name})

    assert get_random("20170901181806-1504261084.7-1001-1003-Internal.wav") == unknown
    deleted = pbx.sim.place_call().recording
    assert deleted is not None
    pbx.sim.delete_recording(deleted)
    assert get_random(deleted) == "20014"
    pbx.sim.faults.not_ready_seconds = 10  # not written yet: it does not exist (yet)
    fresh = pbx.sim.place_call().recording
    assert fresh is not None
    assert get_random(fresh) == unknown


async def test_the_client_turns_repeated_2017_20012_into_not_found(
    pbx: Pbx, tmp_path: Path
) -> None:
    sleep = NoSleep()
    async with client_for(pbx.sim, api_version="v1.0.1", max_attempts=3, sleep=sleep) as client:
        with pytest.raises(RecordingNotFound) as missing:
            await client.download_recording(
                "20170901181806-1504261084.7-1001-1003-Internal.wav", tmp_path
            )
        assert missing.value.errno == "20012"
        deleted = pbx.sim.place_call().recording
        assert deleted is not None
        pbx.sim.delete_recording(deleted)
        with pytest.raises(RecordingNotFound) as gone:
            await client.download_recording(deleted, tmp_path)
        assert gone.value.errno == "20014"
    assert outcomes(pbx.sim, "recording/get_random") == ["20012"] * 3 + ["20014"]
    assert len(sleep.delays) == 2  # backed off between the three fresh randoms
    assert list(tmp_path.iterdir()) == []


# -- 5. a lockout blocks the IP -------------------------------------------------------------


def test_a_locked_out_ip_gets_20002_for_every_request(pbx: Pbx) -> None:
    name = pbx.sim.place_call().recording
    assert name is not None
    token = pbx.login()
    value = pbx.random(token, name)
    bad = {"username": "api", "password": md5("nope"), "port": "0"}
    assert [pbx.errno("login", body=bad) for _ in range(5)] == ["20003"] * 5
    assert pbx.errno("recording/get_random", token=token, body={"recording": name}) == "20002"
    assert (
        pbx.errno(
            "recording/download",
            method="GET",
            token=token,
            params={"recording": name, "random": value},
        )
        == "20002"
    )
    assert pbx.errno("heartbeat", token=token, body={"ipaddr": "127.0.0.1"}) == "20002"
    assert pbx.errno("login", content=b"") == "20002"  # before the body is looked at
    assert pbx.errno("logout") == "20002"
    assert pbx.errno("dial_extension", body={}) == "20002"
    assert pbx.sim.failed_login_count("127.0.0.1") == 5
    pbx.sim.clock.advance(601)
    assert pbx.download(token, name, pbx.random(token, name)).content.startswith(b"RIFF")


# -- 6. periodic faults count from when they are switched on ---------------------------------


def test_periodic_faults_switched_on_mid_run_do_not_fire_at_once(
    pbx: Pbx, receiver: Receiver
) -> None:
    pbx.sim.clock.advance(1000)  # time has passed since the simulator started
    assert pbx.sim.wait_ticks(2)
    token = pbx.login(port=receiver.port)
    pbx.sim.faults.revoke_every_seconds = 600
    pbx.sim.faults.reboot_every_seconds = 900
    assert pbx.sim.wait_ticks(2)
    pbx.ok("heartbeat", token=token, body={"ipaddr": "127.0.0.1", "port": receiver.port})
    pbx.sim.clock.advance(500)
    assert pbx.sim.wait_ticks(2)
    pbx.sim.faults.revoke_every_seconds = 300  # a new interval counts from now as well
    assert pbx.sim.wait_ticks(2)
    pbx.ok("heartbeat", token=token, body={"ipaddr": "127.0.0.1", "port": receiver.port})
    assert receiver.received == []  # no reboot either
    pbx.sim.clock.advance(301)
    assert pbx.sim.wait_ticks(2)
    assert pbx.errno("logout", token=token) == "20004"  # the timer does run
    assert receiver.received == []
    token = pbx.login(port=receiver.port)
    pbx.sim.faults.revoke_every_seconds = 0
    pbx.sim.clock.advance(100)  # 901 s since the reboot timer was switched on
    assert receiver.wait_for(1)
    assert receiver.received[0].json()["action"] == "BootUp"


# -- 7. faults hit preflights too; the blank endpoint ---------------------------------------


def test_5xx_and_html_faults_also_answer_options(pbx: Pbx) -> None:
    pbx.sim.faults.error_5xx_next = 1
    response = pbx.call("login", method="OPTIONS")
    assert response.status_code in {500, 502, 503}
    assert pbx.sim.faults.error_5xx_next == 0
    pbx.sim.faults.html_error_next = 1
    response = pbx.call("login", method="OPTIONS")
    assert response.status_code == 404 and response.text.startswith("<HTML>")
    assert pbx.sim.faults.html_error_next == 0
    assert pbx.call("login", method="OPTIONS").status_code == 200


def test_a_blank_endpoint_is_20009(pbx: Pbx) -> None:
    assert pbx.errno("", body={}) == "20009"
    assert pbx.errno("", version="v2.0.0", method="GET") == "20009"
    assert pbx.errno("nothing", body={}) == "10003"


# -- 8. statuses and spellings ---------------------------------------------------------------


def test_random_calls_include_failed_and_voicemail(pbx: Pbx) -> None:
    cdrs = [pbx.sim.place_random_call() for _ in range(200)]
    statuses = {cdr.status for cdr in cdrs}
    assert statuses == {"ANSWERED", "NO ANSWER", "BUSY", "FAILED", "VOICEMAIL"}
    for cdr in cdrs:
        assert (cdr.recording is not None) == (cdr.status == "ANSWERED")


def test_a_misspelt_answered_status_is_still_an_answered_call(pbx: Pbx) -> None:
    cdr = pbx.sim.place_call(status="ANSWERD", talk_seconds=2)
    assert cdr.status == "ANSWERD" and cdr.talkduration == 2
    assert cdr.recording is not None
    token = pbx.login()
    assert pbx.download(token, cdr.recording, pbx.random(token, cdr.recording)).content.startswith(
        b"RIFF"
    )


def test_v2_reports_may_use_the_documents_spellings(pbx: Pbx, receiver: Receiver) -> None:
    other = Receiver()
    try:
        pbx.login(api="v2.0.0", port=receiver.port, version="2.0.0")
        pbx.login(api="v1.1.0", port=other.port, version="1.0.2")
        pbx.sim.place_call(
            type="Outbound", callto="+4917012345678", dsttrunkname="SIP-Provider"
        )  # default: the usual spellings
        assert receiver.wait_for(1) and other.wait_for(1)
        usual = receiver.received[0].json()
        assert usual["status"] == "ANSWERED" and usual["dsttrcunkname"] == "SIP-Provider"
        pbx.sim.faults.v2_spellings_rate = 1.0
        answered = pbx.sim.place_call(
            type="Outbound", callto="+4917012345678", dsttrunkname="SIP-Provider"
        )
        assert receiver.wait_for(2) and other.wait_for(2)  # reports of one call at a time
        pbx.sim.place_call(status="NO ANSWER", recorded=False)
        assert receiver.wait_for(3) and other.wait_for(3)
        odd = receiver.received[1].json()
        assert odd["status"] == "ANSWERD" and odd["dstrunkname"] == "SIP-Provider"
        assert "dsttrcunkname" not in odd
        assert receiver.received[2].json()["status"] == "NO ANSWERED"
        # Only v2 reports: the 1.0.2 receiver gets the usual spellings.
        assert [r.json()["status"] for r in other.received] == ["ANSWERED", "ANSWERED", "NO ANSWER"]
        # The client's parser normalises them.
        event = parse_event(receiver.received[1].body)
        assert isinstance(event, NewCdrEvent)
        assert event.cdr.status == "ANSWERED" and event.cdr.dsttrunkname == "SIP-Provider"
        assert event.cdr.recording == answered.recording
        unanswered = parse_event(receiver.received[2].body)
        assert isinstance(unanswered, NewCdrEvent) and unanswered.cdr.status == "NO ANSWER"
    finally:
        other.close()


def _archive_with(api: ApiVersion, tmp_path: Path, **faults: Any) -> None:
    """Run the archiver on API `api` against a fresh simulator; two calls must be archived
    byte for byte, with their statuses and trunks normalised in the index."""
    with contextlib.contextmanager(running_pbx)(seed=5, event_retry_interval=0.2) as pbx:
        for key, value in faults.items():
            setattr(pbx.sim.faults, key, value)
        sim = pbx.sim
        archive = tmp_path / "archive"
        with Archiver(archiver_config(sim, archive, api_version=api)) as archiver:
            assert archiver.index is not None
            index: Index = archiver.index
            cdrs = [
                sim.place_call(
                    callfrom="1001",
                    callto="+4917012345678",
                    type="Outbound",
                    dsttrunkname="SIP-Provider",
                    talk_seconds=1,
                ),
                sim.place_call(callfrom="1002", callto="1003", talk_seconds=1),
            ]
            assert wait_until(lambda: states(index) == {"archived": 2}), states(index)
        with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
            for cdr in cdrs:
                assert cdr.recording is not None
                row = index.recordings.by_name(cdr.recording)
                assert row is not None and row.status == "ANSWERED"
                assert row.storage_key is not None
                data = (archive / row.storage_key).read_bytes()
                assert hashlib.sha256(data).hexdigest() == sim.recording_sha256(cdr.recording)
            first = index.recordings.by_name(cdrs[0].recording or "")
            assert first is not None and first.dst_trunk == "SIP-Provider"


def test_the_archiver_on_v2_with_the_documents_spellings(tmp_path: Path) -> None:
    _archive_with(ApiVersion.V2_0_0, tmp_path, v2_spellings_rate=1.0)


def test_the_archiver_on_v1_0_1_with_legacy_reports(tmp_path: Path) -> None:
    _archive_with(ApiVersion.V1_0_1, tmp_path)


# -- 9. the documents' typo path /api/v1.10/ -------------------------------------------------

WIDE = {"extid": "all", "starttime": "2000-01-01 00:00:00", "endtime": "2099-12-31 23:59:59"}


def test_the_typo_path_v1_10_is_v1_1_0_for_every_endpoint(pbx: Pbx, receiver: Receiver) -> None:
    """The V1 and Cloud login pages print ``/api/v1.10/login``; real clients log in (and
    carry on) that way. Every endpoint answers there as under v1.1.0."""
    token = pbx.login(api="v1.10", port=receiver.port, version="1.0.2")
    heartbeat = {"ipaddr": "127.0.0.1", "port": receiver.port, "urlflag": "0"}
    pbx.ok("heartbeat", version="v1.10", token=token, body=heartbeat)
    cdr = pbx.sim.place_call(callfrom="1001", callto="1003")
    pbx.sim.push_call_released(cdr.callid, ["1001", "1003"])
    assert receiver.wait_for(2)
    # v1.1.0 offers the 1.0.2 format (v1.0.1 would have answered with legacy reports). The
    # two reports are pushed side by side: find the BYE, whichever arrived first.
    [bye] = [r.body for r in receiver.received if b'"BYE"' in r.body]
    assert _format_of_bye(bye) is EventFormat.V1_0_2
    assert cdr.recording is not None
    random = pbx.random(token, cdr.recording, version="v1.10")
    download = pbx.download(token, cdr.recording, random, version="v1.10")
    assert download.status_code == 200
    assert download.content == pbx.sim.recording_path(cdr.recording).read_bytes()
    # The later errno meanings of v1.1.0: a missing file is 20014, not the 2017 20012.
    missing = {"recording": "20170901181806-1504261084.7-1001-1003-Internal.wav"}
    assert pbx.errno("recording/get_random", version="v1.10", token=token, body=missing) == "20014"
    # The CDR export came with v1.1.0; v1.0.1 answers 10003.
    grant = pbx.ok("cdr/get_random", version="v1.10", token=token, body=WIDE)
    export = pbx.call(
        "cdr/download",
        version="v1.10",
        method="GET",
        params={**WIDE, "token": token, "random": grant["random"]},
    )
    assert export.status_code == 200 and cdr.callid in export.text
    assert pbx.ok("logout", version="v1.10", token=token)
    assert pbx.sim.request_paths
    assert all(path.startswith("/api/v1.10/") for path in pbx.sim.request_paths)


def test_other_unknown_path_versions_stay_unknown(pbx: Pbx) -> None:
    body = {"username": "api", "password": md5(PASSWORD), "port": "0"}
    for version in ("v1.1", "v1.100", "v2.0", "1.1.0"):
        assert pbx.errno("login", version=version, body=body) == "10003"


@pytest.mark.parametrize("given", ["v1.10", "1.10", " V1.10 ", "1.1.0", "v1.1.0"])
def test_the_client_reads_the_typo_and_bare_versions_as_v1_1_0(given: str) -> None:
    assert ApiVersion(given) is ApiVersion.V1_1_0
    assert ApiVersion("2.0.0") is ApiVersion.V2_0_0
    for wrong in ("v1.1", "v1.100", "v3.0.0", ""):
        with pytest.raises(ValueError):
            ApiVersion(wrong)


async def test_the_client_given_v1_10_sends_the_canonical_path(pbx: Pbx, tmp_path: Path) -> None:
    cdr = pbx.sim.place_call()
    assert cdr.recording is not None
    async with client_for(pbx.sim, api_version="v1.10") as client:
        assert client.api_version is ApiVersion.V1_1_0
        result = await client.download_recording(cdr.recording, tmp_path)
        assert result.sha256 == pbx.sim.recording_sha256(cdr.recording)
    assert pbx.sim.request_paths
    assert all(path.startswith("/api/v1.1.0/") for path in pbx.sim.request_paths)
