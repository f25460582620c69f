"""The P-Series OpenAPI client against the P-Series simulator, over real TLS on 127.0.0.1.

Tokens (reuse through a shared store, refresh before expiry, one re-token on 10004, a
refused get_token never repeated, a full token budget), errcodes, verified downloads (wav,
mp3 serialized, asynchronous via 30033, dropped and refused bodies), the call history of a
time range, the WebSocket event stream with its resume marker, and webhook signatures.
Backoffs are recorded, not slept (`Sleeps`); the client reads the simulator's clock, so a
test can let 25 minutes pass at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from callvault.pbx import (
    ApiIpForbidden,
    ApiPermissionDenied,
    ErrorKind,
    Event,
    EventParseError,
    EventsResumed,
    LoginFailed,
    MemoryTokenStore,
    NewCdrEvent,
    PbxTransportError,
    PSeriesClient,
    RecordingIdMismatch,
    RecordingNotFound,
    TlsOptions,
    TokenBudgetFull,
    TokenSet,
    UnsafeRecordingName,
    parse_pseries_event,
    verify_webhook_signature,
    webhook_signature,
)
from callvault.simulator import PSeriesConfig, PSeriesSimulator, Webhook
from support.pbx_fakes import Sleeps, files_in


@pytest.fixture
def sim() -> Iterator[PSeriesSimulator]:
    with PSeriesSimulator(PSeriesConfig(seed=11)) as simulator:
        yield simulator


def client_for(sim: PSeriesSimulator, **kwargs: Any) -> PSeriesClient:
    """A client trusting `sim` by its pin, on its clock, with a store of its own."""
    assert sim.cert_sha256 is not None
    kwargs.setdefault("tls", TlsOptions(pin_sha256=sim.cert_sha256))
    kwargs.setdefault("sleep", Sleeps())
    kwargs.setdefault("clock", sim.clock.now)
    kwargs.setdefault("token_store", MemoryTokenStore())
    secret = kwargs.pop("secret", sim.client_secret)
    return PSeriesClient(sim.url, sim.client_id, secret, **kwargs)


def outcomes(sim: PSeriesSimulator, endpoint: str) -> list[str]:
    """The simulator's outcome ("0", an errcode, "dropped", "HTTP 404" ...) of each request
    whose path ends with `endpoint`, in order."""
    return [outcome for path, outcome in sim.request_log if path.endswith(endpoint)]


def file_gets(sim: PSeriesSimulator) -> list[str]:
    return [outcome for path, outcome in sim.request_log if path.startswith("/api/download")]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------- tokens


def test_bad_input_fails_at_once() -> None:
    client = PSeriesClient("https://pbx.example:8088/openapi/v1.0/", "app", "secret")
    assert client.base_url == "https://pbx.example:8088"  # a pasted API path is cut
    assert "secret" not in repr(client)
    for args, kwargs, words in (
        (("pbx.example", "app", "s"), {}, "no scheme"),
        (("https://pbx.example", " ", "s"), {}, "client ID is empty"),
        (("https://pbx.example", "app", ""), {}, "secret is empty"),
        (("https://pbx.example", "app", "s"), {"display_format": "whenever"}, "notation"),
        (("https://pbx.example", "app", "s"), {"ws_heartbeat": 45}, "at most 30"),
    ):
        with pytest.raises(ValueError, match=words):
            PSeriesClient(*args, **kwargs)


async def test_unsafe_name_is_refused_before_any_request(
    sim: PSeriesSimulator, tmp_path: Path
) -> None:
    async with client_for(sim) as client:
        with pytest.raises(UnsafeRecordingName):
            await client.download_recording("../../etc/passwd", tmp_path)
    assert sim.request_log == []


async def test_clients_sharing_a_store_share_one_token(
    sim: PSeriesSimulator, tmp_path: Path
) -> None:
    store = MemoryTokenStore()
    call = sim.place_call(talk_seconds=1)
    async with client_for(sim, token_store=store) as first:
        await first.login()
        second = client_for(sim, token_store=store)
        await second.login()
        await second.heartbeat()
        result = await second.download_recording(call.file or "", tmp_path)
        await second.close_connections()  # leaves the token to the store's other users
        assert result.sha256 == sim.recording_sha256(call.file or "")
        assert sim.get_token_count == 1
        assert sim.live_tokens() == 1
    assert outcomes(sim, "del_token") == ["0"]  # revoked once, on the last exit
    assert store.load() is None


async def test_a_renewed_token_is_taken_from_the_shared_store() -> None:
    # Firmware that kills every older token at each get_token: clients that did not share
    # their tokens would take turns killing each other's.
    config = PSeriesConfig(seed=29, token_policy="invalidate_previous")
    with PSeriesSimulator(config) as sim:
        store = MemoryTokenStore()
        async with client_for(sim, token_store=store) as first:
            second = client_for(sim, token_store=store)
            try:
                await first.login()
                await second.login()
                sim.restart()  # every token gone
                await first.heartbeat()  # 10004: renewed (refresh refused, then get_token)
                await second.heartbeat()  # 10004: takes the store's new token
                await first.heartbeat()
                assert sim.get_token_count == 2
                assert outcomes(sim, "recording/list") == ["10004", "0", "10004", "0", "0"]
            finally:
                await second.close_connections()


def test_token_set_checks_what_it_is_given() -> None:
    tokens = TokenSet("access", "refresh", 100, 200.5)
    assert tokens.access_expires_at == 100.0 and tokens.access_left(40.0) == 60.0
    assert "access" not in repr(tokens).replace("access_expires_at", "")
    for args in (("", "r", 1, 2), ("a", None, 1, 2), ("a", "r", "soon", 2), ("a", "r", 1, True)):
        with pytest.raises(TypeError):
            TokenSet(*args)
    with pytest.raises(ValueError):
        TokenSet("a", "r", 1, float("nan"))


class _BrokenStore:
    def load(self) -> TokenSet | None:
        raise OSError("the index is down")

    def save(self, tokens: TokenSet | None) -> None:
        raise OSError("the index is down")


async def test_a_failing_token_store_does_not_stop_the_client(
    sim: PSeriesSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    async with client_for(sim, token_store=_BrokenStore()) as client:
        await client.login()
        await client.heartbeat()
    assert sim.get_token_count == 1
    assert "cannot read the token store" in caplog.text


async def test_heartbeat_refreshes_the_token_before_it_expires(sim: PSeriesSimulator) -> None:
    async with client_for(sim) as client:
        await client.login()
        sim.clock.advance(25 * 60 + 30)  # 4.5 minutes left
        await client.heartbeat()
        assert outcomes(sim, "refresh_token") == ["0"]
        assert client.refresh_count == 1
        sim.clock.advance(20 * 60)  # the first token would be dead by now
        await client.heartbeat()  # a cheap authenticated call, no refresh
        assert outcomes(sim, "recording/list") == ["0"]
        assert sim.get_token_count == 1


async def test_expired_token_is_renewed_once_and_the_call_repeated(
    sim: PSeriesSimulator, tmp_path: Path
) -> None:
    call = sim.place_call(talk_seconds=1)
    async with client_for(sim) as client:
        await client.login()
        sim.restart()  # every token gone: the next call answers 10004
        result = await client.download_recording(call.file or "", tmp_path)
        assert result.sha256 == sim.recording_sha256(call.file or "")
        assert outcomes(sim, "recording/download") == ["10004", "0"]
        # the refresh token died with the restart too: then a new token
        assert outcomes(sim, "refresh_token") == ["10004"]
        assert sim.get_token_count == 2


async def test_wrong_secret_is_never_sent_twice(sim: PSeriesSimulator) -> None:
    client = client_for(sim, secret="not-the-secret")
    try:
        with pytest.raises(LoginFailed) as first:
            await client.login()
        assert first.value.errno == "-1"
        assert first.value.kind is ErrorKind.LOGIN_REFUSED
        for _ in range(6):  # six more tries would block this IP if they were sent
            with pytest.raises(LoginFailed, match="not asking again"):
                await client.login()
        assert outcomes(sim, "get_token") == ["-1"]
        assert "not-the-secret" not in str(first.value)
    finally:
        await client.aclose()
    async with client_for(sim) as good:  # the IP is not blocked
        await good.login()


async def test_full_token_budget_is_reported_without_a_loop(sim: PSeriesSimulator) -> None:
    holders = [client_for(sim) for _ in range(8)]  # eight stores: eight tokens
    for holder in holders:
        await holder.login()
    late = client_for(sim)
    try:
        with pytest.raises(TokenBudgetFull) as caught:
            await late.login()
        assert caught.value.errno == "60002"
        assert "not a login failure" in str(caught.value)
        assert caught.value.kind is ErrorKind.TRANSIENT
        with pytest.raises(TokenBudgetFull, match="not asking again"):
            await late.heartbeat()
        assert outcomes(sim, "get_token") == ["0"] * 8 + ["60002"]  # sent once
    finally:
        for client in [*holders, late]:
            await client.aclose()


async def test_every_request_says_user_agent_openapi(sim: PSeriesSimulator) -> None:
    # The simulator refuses a request without a User-Agent (40002) ...
    async with httpx.AsyncClient(verify=False) as raw:
        request = raw.build_request(
            "POST", f"{sim.url}/openapi/v1.0/get_token", json={"username": "x", "password": "y"}
        )
        del request.headers["User-Agent"]
        answer = await raw.send(request)
    assert answer.json()["errcode"] == 40002
    # ... and the client's are all accepted.
    async with client_for(sim) as client:
        await client.login()
        await client.heartbeat()
    assert "40002" not in [outcome for _, outcome in sim.request_log[1:]]
    assert outcomes(sim, "get_token")[-1] == "0"


async def test_configuration_errors_are_not_retried(tmp_path: Path) -> None:
    config = PSeriesConfig(seed=3, permissions=frozenset({"cdr"}))
    with PSeriesSimulator(config) as sim:
        call = sim.place_call(talk_seconds=1)
        async with client_for(sim) as client:
            with pytest.raises(ApiPermissionDenied, match="lacks the permission") as caught:
                await client.download_recording(call.file or "", tmp_path)
            assert caught.value.errno == "10005"
            assert outcomes(sim, "recording/download") == ["10005"]
    with PSeriesSimulator(PSeriesConfig(seed=3, ip_allow=("192.0.2.7",))) as sim:
        async with client_for(sim) as client:
            with pytest.raises(ApiIpForbidden, match="allow-list") as refused:
                await client.login()
            assert refused.value.errno == "70087"
            with pytest.raises(ApiIpForbidden):
                await client.login()
            assert outcomes(sim, "get_token") == ["70087"]


# -------------------------------------------------------------------- downloads


async def test_download_by_name_is_byte_exact(sim: PSeriesSimulator, tmp_path: Path) -> None:
    call = sim.place_call(talk_seconds=2, size_bytes=300_000)
    name = call.file or ""
    async with client_for(sim) as client:
        result = await client.download_recording(name, tmp_path, filename="copy.wav")
    assert result.path == tmp_path / "copy.wav"
    assert result.size == 300_000
    assert result.sha256 == sim.recording_sha256(name) == sha256_of(result.path)
    assert result.path.read_bytes()[:4] == b"RIFF"
    assert files_in(tmp_path) == ["copy.wav"]


async def test_download_by_recording_id_is_byte_exact(
    sim: PSeriesSimulator, tmp_path: Path
) -> None:
    first = sim.place_call(talk_seconds=2, size_bytes=120_000)
    call = sim.place_call(talk_seconds=2, size_bytes=250_000)
    assert call.file is not None and call.id > 0 and call.id != first.id
    async with client_for(sim) as client:
        result = await client.download_recording(call.file, tmp_path, recording_id=call.id)
        copy = await client.download_recording(
            call.file, tmp_path / "copy", filename="copy.wav", recording_id=call.id
        )
    assert result.path == tmp_path / call.file  # named by the name given, as ever
    assert result.size == 250_000
    assert result.sha256 == sim.recording_sha256(call.file) == sha256_of(result.path)
    assert copy.path == tmp_path / "copy" / "copy.wav" and copy.sha256 == result.sha256
    assert result.path.read_bytes()[:4] == b"RIFF"
    assert outcomes(sim, "recording/download") == ["0", "0"]
    assert files_in(tmp_path) == sorted([call.file, "copy"])


async def test_an_unknown_recording_id_is_not_found(sim: PSeriesSimulator, tmp_path: Path) -> None:
    call = sim.place_call(talk_seconds=1)
    assert call.file is not None
    async with client_for(sim) as client:
        with pytest.raises(RecordingNotFound) as caught:
            await client.download_recording(call.file, tmp_path, recording_id=call.id + 1000)
        # The same as an unknown name: 60001, not found, asked once, nothing fetched.
        with pytest.raises(RecordingNotFound) as by_name:
            await client.download_recording("20200101000000-1.1-1-2-Internal.wav", tmp_path)
    assert caught.value.errno == by_name.value.errno == "60001"
    assert caught.value.kind is by_name.value.kind is ErrorKind.NOT_FOUND
    assert f"id {call.id + 1000}" in str(caught.value)
    assert outcomes(sim, "recording/download") == ["60001", "60001"]
    assert file_gets(sim) == []
    assert files_in(tmp_path) == []


async def test_an_id_of_another_recording_writes_no_file(
    sim: PSeriesSimulator, tmp_path: Path
) -> None:
    """The id wins at the PBX: asked for id B under the name of A, it offers B's file.
    Written as A, it would put B's bytes under A's name: refused, nothing fetched."""
    wanted = sim.place_call(call_from="1001", talk_seconds=1)
    other = sim.place_call(call_from="1002", talk_seconds=2)
    assert wanted.file is not None and other.file is not None
    async with client_for(sim) as client:
        for filename in (None, "copy.wav"):
            with pytest.raises(RecordingIdMismatch) as caught:
                await client.download_recording(
                    wanted.file, tmp_path, filename=filename, recording_id=other.id
                )
            assert caught.value.kind is ErrorKind.PERMANENT
            assert isinstance(caught.value, ValueError)
            assert other.file in str(caught.value) and wanted.file in str(caught.value)
    assert outcomes(sim, "recording/download") == ["0", "0"]  # once each: not retried
    assert file_gets(sim) == []
    assert files_in(tmp_path) == []


async def test_a_bad_recording_id_is_refused_before_any_request(
    sim: PSeriesSimulator, tmp_path: Path
) -> None:
    call = sim.place_call(talk_seconds=1)
    assert call.file is not None
    async with client_for(sim) as client:
        for bad in (-1, True, "7", 7.0):
            with pytest.raises(ValueError, match="not a recording id"):
                await client.download_recording(call.file, tmp_path, recording_id=bad)  # type: ignore[arg-type]
        with pytest.raises(UnsafeRecordingName):
            await client.download_recording("../x.wav", tmp_path, recording_id=call.id)
        with pytest.raises(UnsafeRecordingName):
            await client.download_recording(
                call.file, tmp_path, filename="../x.wav", recording_id=call.id
            )
    assert sim.request_log == []


async def test_an_asynchronous_download_by_id_waits_for_its_30033(tmp_path: Path) -> None:
    with PSeriesSimulator(PSeriesConfig(seed=17, async_downloads=True)) as sim:
        call = sim.place_call(talk_seconds=1)
        assert call.file is not None
        async with client_for(sim) as client:
            result = await client.download_recording(call.file, tmp_path, recording_id=call.id)
        assert result.sha256 == sim.recording_sha256(call.file)
        gets = [path for path, _ in sim.request_log if path.startswith("/api/download")]
        assert gets and all(p.startswith("/api/downloadattachment/") for p in gets)


async def test_dropped_download_is_retried_with_a_fresh_url(
    sim: PSeriesSimulator, tmp_path: Path
) -> None:
    call = sim.place_call(talk_seconds=2, size_bytes=200_000)
    sim.faults.drop_next_downloads = 1
    sleeps = Sleeps()
    async with client_for(sim, sleep=sleeps) as client:
        result = await client.download_recording(call.file or "", tmp_path)
    assert result.sha256 == sim.recording_sha256(call.file or "")
    assert outcomes(sim, "recording/download") == ["0", "0"]
    assert file_gets(sim) == ["dropped", "0"]
    urls = [path for path, _ in sim.request_log if path.startswith("/api/download/")]
    assert len(set(urls)) == 2  # the second attempt asked for a new URL
    assert len(sleeps.delays) == 1
    assert files_in(tmp_path) == [call.file]


async def test_html_page_instead_of_the_file(sim: PSeriesSimulator, tmp_path: Path) -> None:
    call = sim.place_call(talk_seconds=1)
    sim.faults.html_error_next = 1
    async with client_for(sim) as client:
        result = await client.download_recording(call.file or "", tmp_path)
        assert result.sha256 == sim.recording_sha256(call.file or "")
        assert file_gets(sim) == ["HTTP 404", "0"]
        sim.faults.html_error_next = 10
        other = sim.place_call(talk_seconds=1)
        with pytest.raises(PbxTransportError, match="HTML page") as caught:
            await client.download_recording(other.file or "", tmp_path / "other")
        assert "gave up after 4 attempts" in str(caught.value)
    assert files_in(tmp_path / "other") == []


async def test_html_5xx_api_answer_is_retried(sim: PSeriesSimulator, tmp_path: Path) -> None:
    call = sim.place_call(talk_seconds=1)
    sleeps = Sleeps()
    async with client_for(sim, sleep=sleeps) as client:
        await client.login()
        sim.faults.error_5xx_next = 1
        result = await client.download_recording(call.file or "", tmp_path)
    assert result.sha256 == sim.recording_sha256(call.file or "")
    assert outcomes(sim, "recording/download") == ["HTTP 502", "0"]
    assert len(sleeps.delays) == 1


async def test_json_error_body_instead_of_the_file(tmp_path: Path) -> None:
    config = PSeriesConfig(seed=5, expired_url_answer="json10004")
    with PSeriesSimulator(config) as sim:
        call = sim.place_call(talk_seconds=1)
        sim.faults.delete_after_url_next = 1  # gone between its URL and the GET
        async with client_for(sim) as client:
            with pytest.raises(RecordingNotFound) as caught:
                await client.download_recording(call.file or "", tmp_path)
        assert caught.value.errno == "60001"
        assert caught.value.kind is ErrorKind.NOT_FOUND
        # the JSON 10004 body was read as a token error: renewed once, asked again
        assert file_gets(sim) == ["gone"]
        assert outcomes(sim, "recording/download") == ["0", "60001"]
        assert files_in(tmp_path) == []


async def test_mp3_downloads_are_sniffed_and_take_turns(tmp_path: Path) -> None:
    with PSeriesSimulator(PSeriesConfig(seed=9, download_format="mp3")) as sim:
        calls = [sim.place_call(talk_seconds=2, size_bytes=400_000) for _ in range(3)]
        async with client_for(sim) as client:
            results = await asyncio.gather(
                *(client.download_recording(c.file or "", tmp_path) for c in calls)
            )
        for call, result in zip(calls, results, strict=True):
            assert result.sha256 == sim.recording_sha256(call.file or "")
            assert result.content_type == "audio/mpeg"
            head = result.path.read_bytes()[:3]
            assert head == b"ID3" or head[0] == 0xFF
        assert "70082" not in [outcome for _, outcome in sim.request_log]
        assert file_gets(sim) == ["0", "0", "0"]


async def test_mp3_overload_is_retried_later(tmp_path: Path) -> None:
    with PSeriesSimulator(PSeriesConfig(seed=31, download_format="mp3")) as sim:
        big = sim.place_call(talk_seconds=2, size_bytes=40_000_000)
        small = sim.place_call(talk_seconds=2)
        async with (
            client_for(sim, sleep=asyncio.sleep) as first,
            client_for(sim, sleep=asyncio.sleep, backoff_base=0.05, max_attempts=30) as second,
        ):
            running = asyncio.ensure_future(first.download_recording(big.file or "", tmp_path))
            await _until(lambda: sim.state.mp3_busy > 0 or running.done(), timeout=20)
            result = await second.download_recording(small.file or "", tmp_path)
            assert (await running).sha256 == sim.recording_sha256(big.file or "")
        assert result.sha256 == sim.recording_sha256(small.file or "")
        assert "70082" in outcomes(sim, "recording/download")


async def test_asynchronous_download_waits_for_its_30033(tmp_path: Path) -> None:
    with PSeriesSimulator(PSeriesConfig(seed=13, async_downloads=True)) as sim:
        call = sim.place_call(talk_seconds=1)
        async with client_for(sim) as client:
            result = await client.download_recording(call.file or "", tmp_path)
        assert result.sha256 == sim.recording_sha256(call.file or "")
        gets = [path for path, _ in sim.request_log if path.startswith("/api/download")]
        assert gets and all(p.startswith("/api/downloadattachment/") for p in gets)


# ----------------------------------------------------------------------- history


async def test_cdr_range_has_exactly_the_calls_in_it(sim: PSeriesSimulator) -> None:
    first = sim.place_call(call_from="1001", call_to="1002", talk_seconds=1)
    sim.clock.advance(120)
    second = sim.place_call(
        call_from="1003", call_to="1004", talk_seconds=4, from_name="Evelyn", to_name="Ann"
    )
    sim.clock.advance(120)
    third = sim.place_call(call_from="1005", call_to="1006", status="NO ANSWER")
    tz = ZoneInfo(sim.config.timezone)
    async with client_for(sim) as client:
        only = await client.export_cdr_range(
            datetime.fromtimestamp(second.timestamp, UTC),
            datetime.fromtimestamp(third.timestamp, UTC),
            tz,
        )
        everything = await client.export_cdr_range(
            datetime.fromtimestamp(first.timestamp - 1, UTC),
            datetime.fromtimestamp(third.timestamp + 1, UTC),
            tz,
        )
    [row] = only
    assert row.callid == second.call_id
    assert row.recording == second.file
    assert (row.callfrom, row.callto) == ("1003", "1004")  # "Evelyn<1003>" read as a number
    assert row.timestart == second.time_start
    assert row.talkduration == 4 and row.status == "ANSWERED" and row.type == "Internal"
    # a call without a recording is known by its uid (what its 30012 says too)
    by_id = {r.callid: r for r in everything}
    assert set(by_id) == {first.call_id, second.call_id, third.uid}
    assert by_id[first.call_id].recording == first.file
    assert by_id[third.uid].recording is None
    assert by_id[third.uid].status == "NO ANSWER"


async def test_cdr_range_learns_the_display_format() -> None:
    config = PSeriesConfig(seed=17, unix_time_filters=False, display_format="DD/MM/YYYY hh:mm:ss A")
    with PSeriesSimulator(config) as sim:
        before = sim.place_call(talk_seconds=1)
        sim.clock.advance(3 * 3600)
        inside = sim.place_call(talk_seconds=1)
        async with client_for(sim) as client:
            rows = await client.export_cdr_range(
                datetime.fromtimestamp(inside.timestamp - 60, UTC),
                datetime.fromtimestamp(inside.timestamp + 60, UTC),
                ZoneInfo(sim.config.timezone),
            )
        assert [r.callid for r in rows] == [inside.call_id]
        assert before.call_id != inside.call_id


# ------------------------------------------------------------------------ events


async def _next_of(events: AsyncIterator[Event], kind: type[Event], timeout: float = 10.0) -> Event:
    async def find() -> Event:
        async for event in events:
            if isinstance(event, kind):
                return event
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(find(), timeout)


async def _until(condition: Any, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_events_deliver_new_cdr_and_resume_after_a_drop(sim: PSeriesSimulator) -> None:
    sim.faults.ws_drop_next = 1  # the first connection is closed right after subscribing
    async with client_for(sim) as client:
        events = client.events()
        try:
            resumed = await _next_of(events, EventsResumed)
            assert isinstance(resumed, EventsResumed)
            assert resumed.since <= sim.clock.now()
            await _until(lambda: sim.ws_connections == 1)
            call = sim.place_call(call_from="2005", call_to="2002", talk_seconds=2)
            event = await _next_of(events, NewCdrEvent)
            assert isinstance(event, NewCdrEvent)
            assert event.sn == sim.serial
            assert event.fields["call_id"] == call.call_id
            cdr = event.cdr
            assert cdr.callid == call.call_id
            assert cdr.recording == call.file
            assert (cdr.callfrom, cdr.callto) == ("2005", "2002")
            assert cdr.timestart == call.time_start
            assert (cdr.callduration, cdr.talkduration) == (call.call_duration, 2)
            assert cdr.status == "ANSWERED" and cdr.type == "Internal"
            assert cdr.srctrunkname == ""  # the " " placeholder
            # A PBX restart closes the socket and kills the token: a fresh one, resumed.
            sim.restart()
            again = await _next_of(events, EventsResumed)
            assert isinstance(again, EventsResumed)
            await _until(lambda: sim.ws_connections == 1)
            later = sim.place_call(talk_seconds=1)
            event = await _next_of(events, NewCdrEvent)
            assert isinstance(event, NewCdrEvent) and event.cdr.callid == later.call_id
            assert sim.get_token_count == 2
        finally:
            await events.aclose()  # type: ignore[attr-defined]


async def test_closing_the_client_ends_its_event_stream(sim: PSeriesSimulator) -> None:
    client = client_for(sim)
    events = client.events(topics=(30012,))
    waiter = asyncio.ensure_future(_next_of(events, NewCdrEvent))
    await _until(lambda: sim.ws_connections == 1)
    await client.close_connections()
    with pytest.raises(AssertionError, match="ended"):
        await asyncio.wait_for(waiter, 5)
    await _until(lambda: sim.ws_connections == 0)
    assert outcomes(sim, "subscribe") == ["101"]  # not connected again


async def test_heartbeats_keep_the_socket_open() -> None:
    with PSeriesSimulator(PSeriesConfig(seed=37, ws_idle_timeout_s=0.8)) as sim:
        async with client_for(sim, ws_heartbeat=0.2) as client:
            events = client.events(topics=(30012,))
            try:
                waiter = asyncio.ensure_future(_next_of(events, Event))
                await _until(lambda: sim.ws_connections == 1)
                await asyncio.sleep(2.0)  # more than twice the PBX's idle limit
                assert not waiter.done()  # no EventsResumed: never dropped
                assert outcomes(sim, "subscribe") == ["101"]
                call = sim.place_call(talk_seconds=1)
                event = await waiter
                assert isinstance(event, NewCdrEvent) and event.cdr.callid == call.call_id
            finally:
                await events.aclose()  # type: ignore[attr-defined]


async def test_socket_closed_at_token_expiry_reconnects_with_a_refreshed_token() -> None:
    with PSeriesSimulator(PSeriesConfig(seed=41, close_ws_on_token_expiry=True)) as sim:
        async with client_for(sim) as client:
            events = client.events(topics=(30012,))
            try:
                waiter = asyncio.ensure_future(_next_of(events, EventsResumed))
                await _until(lambda: sim.ws_connections == 1)
                sim.clock.advance(31 * 60)  # the access token (not the refresh token) is dead
                resumed = await waiter
                assert isinstance(resumed, EventsResumed)
                assert outcomes(sim, "refresh_token") == ["0"]
                assert sim.get_token_count == 1
                assert outcomes(sim, "subscribe") == ["101", "101"]
            finally:
                await events.aclose()  # type: ignore[attr-defined]


async def test_events_with_msg_as_object() -> None:
    with PSeriesSimulator(PSeriesConfig(seed=19, msg_as_object=True)) as sim:
        async with client_for(sim) as client:
            events = client.events(topics=(30012,))
            try:
                waiter = asyncio.ensure_future(_next_of(events, NewCdrEvent))
                await _until(lambda: sim.ws_connections == 1)
                await asyncio.sleep(0.1)  # the subscription is answered
                call = sim.place_call(talk_seconds=1)
                event = await waiter
                assert isinstance(event, NewCdrEvent) and event.cdr.callid == call.call_id
                # a call without a recording: keyed by its uid, as its CDR row is
                missed = sim.place_call(status="NO ANSWER")
                event = await _next_of(events, NewCdrEvent)
                assert isinstance(event, NewCdrEvent)
                assert event.cdr.callid == missed.uid and event.cdr.recording is None
                tz = ZoneInfo(sim.config.timezone)
                [row] = await client.export_cdr_range(
                    datetime.fromtimestamp(missed.timestamp, UTC),
                    datetime.fromtimestamp(missed.timestamp + 1, UTC),
                    tz,
                )
                assert row == replace(event.cdr, agentringtime=None)
            finally:
                await events.aclose()  # type: ignore[attr-defined]


def test_event_parsing() -> None:
    text = (
        '{"type":30012,"sn":"3631A2124XXX","msg":"{\\"call_id\\":\\"1651057476.362\\",'
        '\\"time_start\\":\\"2022-04-27 19:04:36\\",\\"call_from\\":\\"Evelyn<2005>\\",'
        '\\"call_to\\":\\"2002\\",\\"call_duration\\":24,\\"talk_duration\\":21,'
        '\\"src_trunk_name\\":\\" \\",\\"status\\":\\"ANSWERD\\",\\"type\\":\\"internal\\",'
        '\\"recording\\":\\" \\",\\"agent_ring_time\\":0}"}'
    )
    event = parse_pseries_event(text.encode())
    assert isinstance(event, NewCdrEvent)
    assert event.name == "30012" and event.sn == "3631A2124XXX"
    cdr = event.cdr
    assert (cdr.callid, cdr.callfrom, cdr.status, cdr.type) == (
        "1651057476.362",
        "2005",
        "ANSWERED",
        "Internal",
    )
    assert cdr.recording is None and cdr.srctrunkname == ""
    other = parse_pseries_event('{"type":30033,"sn":"x","msg":{"file":"a.wav"}}')
    assert type(other) is Event and other.fields == {"file": "a.wav"}
    for junk in (b"", b"heartbeat response", b"[1]", b'{"sn":"x"}', b'{"type":30012,"msg":"{"}'):
        with pytest.raises(EventParseError):
            parse_pseries_event(junk)
    with pytest.raises(EventParseError, match="call_id"):
        parse_pseries_event('{"type":30012,"msg":{"status":"BUSY"}}')


# ---------------------------------------------------------------------- webhooks


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[tuple[bytes, str | None]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.received.append((body, self.headers.get("X-Signature")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_webhook_signatures() -> None:
    received: list[tuple[bytes, str | None]] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    secret = "k" * 32
    hook = Webhook(url=f"http://127.0.0.1:{server.server_address[1]}/hook", secret=secret)
    try:
        config = PSeriesConfig(seed=23, webhooks=[hook], call_status_events=False)
        with PSeriesSimulator(config) as sim:
            sim.faults.bad_signature_next = 1
            first = sim.place_call(talk_seconds=1)
            second = sim.place_call(talk_seconds=1)
            assert sim.wait_events_idle(10)
    finally:
        server.shutdown()
        server.server_close()
    assert len(received) == 2
    # The two deliveries may arrive in either order: one of them was sent with a bad
    # signature, the other verifies.
    [(bad_body, bad_sig)] = [r for r in received if not verify_webhook_signature(secret, *r)]
    [(good_body, good_sig)] = [r for r in received if verify_webhook_signature(secret, *r)]
    assert bad_sig is not None and bad_body != good_body
    assert not verify_webhook_signature("x" * 32, good_body, good_sig)
    assert not verify_webhook_signature(secret, good_body + b" ", good_sig)
    assert not verify_webhook_signature(secret, good_body, None)
    assert not verify_webhook_signature(secret, good_body, "Ünïcode")
    assert verify_webhook_signature(secret, b"{}", webhook_signature(secret, b"{}"))
    events = [parse_pseries_event(body) for body, _ in received]
    assert sorted(e.cdr.callid for e in events if isinstance(e, NewCdrEvent)) == sorted(
        [first.call_id, second.call_id]
    )


# ----------------------------------------------------------------------- secrets


async def test_no_secret_in_logs_messages_or_reprs(
    sim: PSeriesSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = MemoryTokenStore()
    call = sim.place_call(talk_seconds=1)
    async with client_for(sim, token_store=store) as client:
        await client.download_recording(call.file or "", tmp_path)
        tokens = store.load()
        assert tokens is not None
        events = client.events(topics=(30012,))
        waiter = asyncio.ensure_future(_next_of(events, NewCdrEvent))
        await _until(lambda: sim.ws_connections == 1)
        await asyncio.sleep(0.1)
        sim.place_call(talk_seconds=1)
        await waiter
        await events.aclose()  # type: ignore[attr-defined]
        shown = repr(client) + repr(tokens) + repr(store)
    for secret in (sim.client_secret, tokens.access_token, tokens.refresh_token):
        assert secret not in caplog.text
        assert secret not in shown
    assert "access_token=" not in caplog.text
