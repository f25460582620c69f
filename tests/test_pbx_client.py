"""Exact request flows of PbxClient, against an in-process fake PBX (httpx.MockTransport).

These pin down the order of requests: one login per failing call, a fresh random for every
attempt, every random used by its own GET in the session that asked for it (no login in
between), and the session gate released once the download's headers arrived. The same
rules are tested over real HTTPS against the simulator in test_pbx_integration.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from callvault.pbx import (
    ApiVersion,
    CdrError,
    InvalidRecording,
    LoginFailed,
    LoginLockedOut,
    PbxClient,
    PbxProtocolError,
    PbxTransportError,
    PbxUnreachable,
    RecordingNotFound,
    SyncPbxClient,
    TokenExpired,
    TokenInvalid,
    password_md5,
)
from support.pbx_fakes import (
    BASE,
    PASSWORD,
    WAV,
    FakePbx,
    Sleeps,
    assert_randoms_used_in_their_session,
    make_wav,
    serve_fake_pbx,
)


def client_for(pbx: FakePbx, **kwargs: Any) -> PbxClient:
    kwargs.setdefault("sleep", Sleeps())
    return PbxClient(BASE, "api", PASSWORD, transport=httpx.MockTransport(pbx.handler), **kwargs)


ClientFactory = Callable[..., PbxClient]


@pytest.fixture(params=["mock-transport", "socket-pump"])
def connect(request: pytest.FixtureRequest) -> Iterator[ClientFactory]:
    """Build a client for a FakePbx, once per download pump.

    "mock-transport": the fake behind an injected httpx.MockTransport (the httpx pump).
    "socket-pump": the fake behind a real HTTP server on 127.0.0.1 and no transport, so the
    recording's body goes through the blocking-socket pump (API calls still use httpx).
    """
    with contextlib.ExitStack() as stack:

        def factory(pbx: FakePbx, **kwargs: Any) -> PbxClient:
            kwargs.setdefault("sleep", Sleeps())
            if request.param == "mock-transport":
                return client_for(pbx, **kwargs)
            base = stack.enter_context(serve_fake_pbx(pbx))
            return PbxClient(base, "api", PASSWORD, **kwargs)

        yield factory


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ------------------------------------------------------------------ login


async def test_login_sends_md5_and_event_settings(tmp_path: Path) -> None:
    pbx = FakePbx()
    async with client_for(pbx, events_port=8260, events_url="cdr", api_version="v2.0.0") as client:
        await client.login()
        assert client.logged_in
    login = pbx.calls[0]
    assert login.endpoint == "login"
    assert login.body == {
        "username": "api",
        "password": hashlib.md5(PASSWORD.encode()).hexdigest(),
        "port": "8260",
        "url": "cdr",
        "urltag": "0",
        "version": "2.0.0",
    }
    assert "token" not in login.query
    assert pbx.endpoints() == ["login", "logout"]


@pytest.mark.parametrize("version", ["v1.0.1", "v1.1.0", "v2.0.0"])
async def test_login_without_events_asks_for_no_reports(version: str) -> None:
    # Port "0" in every version: v2 makes the port optional, but without it the PBX pushes
    # reports to port 8260 (spec 3.1), where `callvault serve` may listen.
    pbx = FakePbx()
    async with client_for(pbx, api_version=version) as client:
        await client.login()
        await client.heartbeat()
    login = {"username": "api", "password": password_md5(PASSWORD), "port": "0"}
    assert pbx.calls[0].body == login
    assert pbx.calls[1].endpoint == "heartbeat" and pbx.calls[1].body["port"] == "0"


async def test_wrong_password_raises_at_once_and_is_never_retried(tmp_path: Path) -> None:
    now = [0.0]
    pbx = FakePbx(password_md5=password_md5("other"))
    async with client_for(pbx, clock=lambda: now[0]) as client:
        with pytest.raises(LoginFailed) as info:
            await client.download_recording("a.wav", tmp_path)
        assert info.value.errno == "20003"
        for _ in range(6):  # even many later calls never reach the PBX's login again
            with pytest.raises(LoginFailed):
                await client.download_recording("a.wav", tmp_path)
            with pytest.raises(LoginFailed):
                await client.heartbeat()
        assert pbx.count("login") == 1
        now[0] += 601  # after the pause, one more try is allowed (an operator may fix it)
        pbx.password_md5 = password_md5(PASSWORD)
        pbx.recordings["a.wav"] = WAV
        result = await client.download_recording("a.wav", tmp_path)
    assert pbx.count("login") == 2
    assert leftovers(tmp_path) == [result.path.name]


async def test_lockout_blocks_logins_for_ten_minutes_of_injected_clock(tmp_path: Path) -> None:
    now = [1000.0]
    pbx = FakePbx(login_errno="20002")
    async with client_for(pbx, clock=lambda: now[0]) as client:
        with pytest.raises(LoginLockedOut):
            await client.login()
        now[0] += 599
        with pytest.raises(LoginLockedOut):
            await client.download_recording("a.wav", tmp_path)
        assert pbx.count("login") == 1
        now[0] += 2
        pbx.login_errno = None
        pbx.recordings["a.wav"] = WAV
        result = await client.download_recording("a.wav", tmp_path)
        assert result.size == len(WAV)
    assert pbx.count("login") == 2


# --------------------------------------------------------------- download


async def test_download_saves_verified_file_and_uses_fresh_random(
    tmp_path: Path, connect: ClientFactory
) -> None:
    name = "20240101120000-1704110400.1-+4915112345678-1000-Inbound.wav"
    pbx = FakePbx(recordings={name: WAV})
    async with connect(pbx) as client:
        result = await client.download_recording(name, tmp_path)
        assert client.last_success_at is not None
    assert result.path == tmp_path / name
    assert result.path.read_bytes() == WAV
    assert result.size == len(WAV)
    assert result.sha256 == hashlib.sha256(WAV).hexdigest()
    assert result.name == name
    assert result.content_type == "audio/x-wav"
    assert pbx.endpoints() == ["login", "recording/get_random", "recording/download", "logout"]
    get_random, download = pbx.calls[1], pbx.calls[2]
    assert get_random.body == {"recording": name}
    assert download.query["recording"] == name  # "+" arrived intact
    assert download.query["random"] == pbx.issued_randoms[0]
    assert leftovers(tmp_path) == [name]


async def test_download_to_another_filename_and_allowedip(
    tmp_path: Path, connect: ClientFactory
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV})
    async with connect(pbx, allowedip="127.0.0.5") as client:
        result = await client.download_recording("a.wav", tmp_path / "sub", filename="b.wav")
    assert result.path == tmp_path / "sub" / "b.wav"
    assert result.path.read_bytes() == WAV
    assert pbx.calls[1].body == {"recording": "a.wav", "allowedip": "127.0.0.5"}


@pytest.mark.parametrize("fault", ["503", "html", "truncate", "truncate-nolength", "hangup"])
async def test_transient_failure_is_retried_with_a_fresh_random(
    fault: str, tmp_path: Path, connect: ClientFactory
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, download_faults=[fault])
    sleeps = Sleeps()
    async with connect(pbx, sleep=sleeps) as client:
        result = await client.download_recording("a.wav", tmp_path)
    assert result.path.read_bytes() == WAV
    assert pbx.count("login") == 1
    assert pbx.count("recording/get_random") == 2
    assert len(set(pbx.issued_randoms)) == 2
    downloads = [c for c in pbx.calls if c.endpoint == "recording/download"]
    assert [d.query["random"] for d in downloads] == pbx.issued_randoms
    assert len(sleeps.delays) == 1
    assert leftovers(tmp_path) == ["a.wav"]


async def test_retries_are_bounded_and_back_off(tmp_path: Path, connect: ClientFactory) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, download_faults=["truncate"] * 10)
    sleeps = Sleeps()
    async with connect(pbx, sleep=sleeps, max_attempts=5, backoff_base=1.0, backoff_max=4.0) as c:
        with pytest.raises(PbxTransportError) as info:
            await c.download_recording("a.wav", tmp_path)
    assert "recording a.wav" in str(info.value)
    assert "5 attempts" in str(info.value)
    assert pbx.count("recording/get_random") == 5
    assert pbx.count("login") == 1
    assert len(sleeps.delays) == 4
    caps = [1.0, 2.0, 4.0, 4.0]
    assert all(cap / 2 <= d <= cap for d, cap in zip(sleeps.delays, caps, strict=True))
    assert leftovers(tmp_path) == []


async def test_json_error_with_http_200_is_not_retried(
    tmp_path: Path, connect: ClientFactory
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, download_faults=["json20014"])
    async with connect(pbx) as client:
        with pytest.raises(RecordingNotFound) as info:
            await client.download_recording("a.wav", tmp_path)
    assert str(info.value) == "recording a.wav: recording not found on the PBX, errno 20014"
    assert info.value.errno == "20014"
    assert pbx.count("recording/get_random") == 1
    assert leftovers(tmp_path) == []


async def test_missing_recording_at_get_random(tmp_path: Path, connect: ClientFactory) -> None:
    pbx = FakePbx(get_random_errors=["20014"])
    async with connect(pbx) as client:
        with pytest.raises(RecordingNotFound):
            await client.download_recording("gone.wav", tmp_path)
    assert pbx.count("recording/download") == 0


async def test_body_that_is_not_wav_is_a_transport_failure_retried_with_a_fresh_random(
    tmp_path: Path, connect: ClientFactory
) -> None:
    # Spec 9.5: RIFF is audio, "{" a JSON error, anything else a transport error.
    pbx = FakePbx(recordings={"a.wav": WAV}, download_faults=["notwav"])
    async with connect(pbx) as client:
        result = await client.download_recording("a.wav", tmp_path)
    assert pbx.count("recording/get_random") == 2
    assert (tmp_path / "a.wav").read_bytes() == WAV and result.size == len(WAV)
    assert leftovers(tmp_path) == ["a.wav"]


async def test_body_that_is_never_wav_is_refused_after_the_attempts(
    tmp_path: Path, connect: ClientFactory
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, download_faults=["notwav"] * 3)
    async with connect(pbx, max_attempts=3) as client:
        with pytest.raises(InvalidRecording, match=r"not a WAV file.*gave up after 3 attempts"):
            await client.download_recording("a.wav", tmp_path)
    assert pbx.count("recording/get_random") == 3
    assert leftovers(tmp_path) == []


async def test_random_invalid_every_time_means_not_found(
    tmp_path: Path, connect: ClientFactory
) -> None:
    pbx = FakePbx(get_random_errors=["20012"] * 10)
    async with connect(pbx, max_attempts=3) as client:
        with pytest.raises(RecordingNotFound) as info:
            await client.download_recording("a.wav", tmp_path)
    assert info.value.errno == "20012"
    assert pbx.count("recording/get_random") == 3
    assert pbx.count("login") == 1


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "a/b.wav", "a\\b.wav", ".", "..", "", "a\x00.wav"]
)
async def test_unsafe_names_are_refused_before_any_request(
    name: str, tmp_path: Path, connect: ClientFactory
) -> None:
    pbx = FakePbx()
    async with connect(pbx) as client:
        with pytest.raises(ValueError, match="name"):
            await client.download_recording(name, tmp_path)
    assert pbx.calls == []


# ------------------------------------------------------------------ tokens


async def test_token_error_logs_in_once_and_repeats_once(
    tmp_path: Path, connect: ClientFactory
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV})
    async with connect(pbx) as client:
        await client.login()
        pbx.tokens.clear()  # PBX forgot the token (expiry, reboot)
        result = await client.download_recording("a.wav", tmp_path)
    assert result.size == len(WAV)
    assert pbx.endpoints()[:5] == [
        "login",
        "recording/get_random",
        "login",
        "recording/get_random",
        "recording/download",
    ]


class ForgetfulTokens(set[str]):
    """A PBX that forgets every token at once (e.g. a clock far ahead)."""

    def add(self, element: str) -> None:
        pass


async def test_persistent_token_error_gives_exactly_one_relogin(
    tmp_path: Path, connect: ClientFactory
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, get_random_errors=["20006"] * 10)
    async with connect(pbx) as client:
        with pytest.raises(TokenExpired):
            await client.download_recording("a.wav", tmp_path)
        assert pbx.count("login") == 2
        assert pbx.count("recording/get_random") == 2
        pbx.tokens = ForgetfulTokens()
        with pytest.raises(TokenInvalid):
            await client.heartbeat()
        # One re-login per failing call, never a loop.
        assert pbx.count("login") == 3
    assert pbx.count("logout") == 1


async def test_token_error_in_download_body_relogs_and_fetches_new_random(
    tmp_path: Path, connect: ClientFactory
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, download_faults=["token20006"])
    async with connect(pbx) as client:
        result = await client.download_recording("a.wav", tmp_path)
    assert result.path.read_bytes() == WAV
    assert pbx.count("login") == 2
    assert pbx.count("recording/get_random") == 2


async def test_concurrent_token_errors_share_one_relogin(
    tmp_path: Path, connect: ClientFactory
) -> None:
    names = [f"r{i}.wav" for i in range(5)]
    pbx = FakePbx(recordings=dict.fromkeys(names, WAV))
    async with connect(pbx) as client:
        await client.login()
        pbx.tokens.clear()
        results = await asyncio.gather(*(client.download_recording(n, tmp_path) for n in names))
    assert [r.size for r in results] == [len(WAV)] * 5
    assert pbx.count("login") == 2


async def test_each_random_is_used_in_its_own_session_and_body_streams_unlocked(
    tmp_path: Path,
    connect: ClientFactory,
) -> None:
    """Downloads run concurrently; the gate covers get_random..headers, not the body."""
    names = [f"r{i}.wav" for i in range(4)]
    pbx = FakePbx(recordings=dict.fromkeys(names, WAV))
    release = threading.Event()  # set from the fake's handler, in either pump's thread
    pbx.hold_download_body = release
    seen: list[str] = []

    def on_get_random(name: str) -> None:
        seen.append(name)
        if len(seen) == len(names):
            release.set()  # only reachable if earlier bodies did not hold the gate

    pbx.on_get_random = on_get_random
    async with connect(pbx) as client:
        await client.login()
        pbx.tokens.clear()  # forces a re-login in the middle of everything
        results = await asyncio.wait_for(
            asyncio.gather(*(client.download_recording(n, tmp_path) for n in names)), 10
        )
    assert sorted(r.name for r in results) == names
    assert assert_randoms_used_in_their_session(pbx) == pbx.count("recording/download")
    assert pbx.count("recording/download") >= len(names)


async def test_cancelled_download_leaves_no_temp_file(
    tmp_path: Path, connect: ClientFactory
) -> None:
    """Cancelled in the middle of the body, with the temporary file already written to."""
    pbx = FakePbx(recordings={"a.wav": make_wav(200_000)}, hold_after_bytes=1000)
    hold = threading.Event()
    pbx.hold_download_body = hold  # the first 1000 bytes go out, then the body stalls
    try:
        async with connect(pbx) as client:
            task = asyncio.create_task(client.download_recording("a.wav", tmp_path))

            async def part_file_written() -> None:
                while not any(n.endswith(".part") for n in leftovers(tmp_path)):
                    assert not task.done(), "the download ended before it wrote a file"
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(part_file_written(), 10)  # a hang guard only
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
    finally:
        hold.set()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- transport


async def test_unreachable_pbx_is_retried_then_reported(tmp_path: Path) -> None:
    attempts: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        raise httpx.ConnectError("[Errno 111] Connection refused")

    sleeps = Sleeps()
    client = PbxClient(BASE, "api", PASSWORD, transport=httpx.MockTransport(refuse), sleep=sleeps)
    async with client:
        with pytest.raises(PbxUnreachable) as info:
            await client.download_recording("a.wav", tmp_path)
    assert "127.0.0.1:8088" in str(info.value)
    assert "Connection refused" in str(info.value)
    assert len(attempts) == 4
    assert leftovers(tmp_path) == []


async def test_http_redirect_to_https_says_which_url_to_use() -> None:
    def redirect(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "https://127.0.0.1:8088/api/v1.1.0/login"})

    client = PbxClient("http://127.0.0.1", "api", PASSWORD, transport=httpx.MockTransport(redirect))
    async with client:
        with pytest.raises(PbxProtocolError) as info:
            await client.login()
    assert "redirects to https://127.0.0.1:8088/api/v1.1.0/login" in str(info.value)


def test_bad_urls_are_refused() -> None:
    for url in ("127.0.0.1:8088", "ftp://127.0.0.1", "https://", "https://u:p@127.0.0.1"):
        with pytest.raises(ValueError) as info:
            PbxClient(url, "api", PASSWORD)
        assert PASSWORD not in str(info.value)


# ---------------------------------------------------------------- CDR


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


# -------------------------------------------------------- keepalive & logout


async def test_keepalive_heartbeats_and_relogs_after_expiry() -> None:
    pbx = FakePbx()
    ticks: list[float] = []

    async def sleep(delay: float) -> None:
        ticks.append(delay)
        if len(ticks) == 2:
            pbx.tokens.clear()  # token expired between two heartbeats
        if len(ticks) > 4:
            raise asyncio.CancelledError

    client = PbxClient(
        BASE,
        "api",
        PASSWORD,
        transport=httpx.MockTransport(pbx.handler),
        sleep=sleep,
        events_port=8260,
        events_ip="127.0.0.1",
    )
    async with client:
        await client.login()
        with pytest.raises(asyncio.CancelledError):
            await client.run_keepalive(interval=300)
    assert ticks == [300] * 5
    assert pbx.count("heartbeat") == 5
    assert pbx.count("login") == 2
    beat = next(c for c in pbx.calls if c.endpoint == "heartbeat")
    assert beat.body["ipaddr"] == "127.0.0.1"
    assert beat.body["port"] == "8260"


async def test_logout_on_exit_ignores_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/login"):
            return httpx.Response(200, json={"status": "Success", "token": "t" * 32})
        raise httpx.ReadError("connection reset")

    async with PbxClient(BASE, "api", PASSWORD, transport=httpx.MockTransport(handler)) as client:
        await client.login()
        assert client.logged_in
    assert not client.logged_in


# ------------------------------------------------------------------ secrets


async def test_secrets_never_in_logs_reprs_or_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pbx = FakePbx(
        recordings={"a.wav": WAV},
        download_faults=["truncate", "html", "token20006"],
        get_random_errors=["20006"],
    )
    async with client_for(pbx) as client:
        await client.download_recording("a.wav", tmp_path)
        pbx.download_faults = ["truncate"] * 5
        with pytest.raises(PbxTransportError) as info:
            await client.download_recording("a.wav", tmp_path, filename="b.wav")
        client_repr = repr(client)  # while logged in, i.e. while it holds a token
        assert client.logged_in
    error, error_repr = str(info.value), repr(info.value)
    assert "recording a.wav" in error and "4 attempts" in error
    assert any(r.name == "httpx" for r in caplog.records)
    secrets_seen = [PASSWORD, password_md5(PASSWORD), *pbx.issued_randoms, *pbx.tokens]
    secrets_seen += [c.query["token"] for c in pbx.calls if "token" in c.query]
    assert len(pbx.issued_randoms) == 8 and pbx.count("login") == 3
    for secret in secrets_seen:
        assert secret not in error
        assert secret not in error_repr
        assert secret not in client_repr
        for record in caplog.records:
            assert secret not in record.getMessage()


def test_sync_facade_downloads(tmp_path: Path) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV})
    with SyncPbxClient(BASE, "api", PASSWORD, transport=httpx.MockTransport(pbx.handler)) as c:
        result = c.download_recording("a.wav", tmp_path)
        assert c.logged_in
        rows = c.export_cdr(datetime(2024, 1, 1), datetime(2024, 1, 1, 12))
    assert result.path.read_bytes() == WAV
    assert rows[0].recording == "a.wav"
    assert pbx.endpoints()[-1] == "logout"
    assert "s3cret" not in repr(c)


def test_api_version_in_every_path() -> None:
    pbx = FakePbx()
    with SyncPbxClient(
        BASE,
        "api",
        PASSWORD,
        api_version=ApiVersion.V1_0_1,
        transport=httpx.MockTransport(pbx.handler),
    ) as c:
        c.heartbeat()
    assert pbx.endpoints() == ["login", "heartbeat", "logout"]
    assert {c.version for c in pbx.calls} == {"v1.0.1"}
