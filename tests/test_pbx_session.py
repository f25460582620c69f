"""The API session of PbxClient: login, lockout, tokens, keepalive, logout, secrets.

Which path each test exercises: tests of API calls alone (login, heartbeat, logout) use the
fake PBX behind an injected httpx.MockTransport (`client_for`); every test that downloads
meets the fake over real HTTP (`connect`) or the simulator over real HTTPS (`sim`), so
its download goes through the production socket pump.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from callvault.pbx import (
    ApiVersion,
    LoginFailed,
    LoginLockedOut,
    PbxBusy,
    PbxClient,
    PbxProtocolError,
    PbxTransportError,
    PbxUnreachable,
    PSeriesClient,
    RequestRejected,
    SyncPbxClient,
    TlsOptions,
    TokenExpired,
    TokenInvalid,
    error_for_errno,
    password_md5,
)
from callvault.simulator import PSeriesConfig, PSeriesSimulator, Simulator
from support.pbx_fakes import (
    BASE,
    PASSWORD,
    WAV,
    ClientFactory,
    FakePbx,
    Sleeps,
    client_for,
    files_in,
)
from support.pbx_sim import SIM_PASSWORD, outcomes, pinned, sim_client

# ------------------------------------------------------------------ login


async def test_login_sends_md5_and_event_settings() -> None:
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


async def test_wrong_password_raises_at_once_and_is_never_retried(
    tmp_path: Path, connect: ClientFactory
) -> None:
    now = [0.0]
    pbx = FakePbx(password_md5=password_md5("other"))
    async with connect(pbx, clock=lambda: now[0]) as client:
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
    assert files_in(tmp_path) == [result.path.name]


async def test_lockout_blocks_logins_for_ten_minutes_of_injected_clock(
    tmp_path: Path, connect: ClientFactory
) -> None:
    now = [1000.0]
    pbx = FakePbx(login_errno="20002")
    async with connect(pbx, clock=lambda: now[0]) as client:
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


async def test_a_login_refused_for_another_reason_is_remembered_like_a_wrong_password() -> None:
    pbx = FakePbx(login_errno="10004")
    async with client_for(pbx) as client:
        for _ in range(3):
            with pytest.raises(RequestRejected, match="errno 10004"):
                await client.login()
    assert pbx.count("login") == 1


async def test_a_busy_pbx_is_retried(tmp_path: Path, connect: ClientFactory) -> None:
    assert all(isinstance(error_for_errno(e), PbxBusy) for e in ("20010", "30001", "30003"))
    pbx = FakePbx(recordings={"a.wav": WAV}, get_random_errors=["30003", "20010"])
    async with connect(pbx) as client:
        result = await client.download_recording("a.wav", tmp_path)
    assert (tmp_path / "a.wav").read_bytes() == WAV and result.size == len(WAV)
    assert pbx.count("recording/get_random") == 3


async def test_wrong_password_never_adds_up_to_a_lockout(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording
    pbx = PbxClient(sim.url, sim.username, "not-the-password", tls=pinned(sim), sleep=Sleeps())
    async with pbx:
        for _ in range(8):
            with pytest.raises(LoginFailed):
                await pbx.download_recording(call.recording, tmp_path)
    assert sim.failed_login_count() == 1
    assert outcomes(sim, "login") == ["20003"]
    # The right password still gets in: the IP was never locked out.
    async with sim_client(sim) as good:
        await good.download_recording(call.recording, tmp_path)


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


async def test_token_expiry_and_relogin(sim: Simulator, tmp_path: Path) -> None:
    first, second = sim.place_call(), sim.place_call(callfrom="1002")
    assert first.recording and second.recording
    async with sim_client(sim) as pbx:
        await pbx.download_recording(first.recording, tmp_path)
        assert sim.login_count == 1
        sim.clock.advance(31 * 60)  # the sliding token dies after 30 idle minutes
        await pbx.download_recording(second.recording, tmp_path)
        assert sim.login_count == 2
    assert outcomes(sim, "recording/get_random") == ["Success", "20006", "Success"]


async def test_reboot_loses_tokens_and_client_logs_in_again(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording
    async with sim_client(sim) as pbx:
        await pbx.login()
        sim.reboot()
        await pbx.heartbeat()
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.size > 44
    assert sim.login_count == 2


# ------------------------------------------------------ keepalive and logout


async def test_keepalive_heartbeats_and_relogs_after_expiry() -> None:
    pbx = FakePbx()
    ticks: list[float] = []

    async def sleep(delay: float) -> None:
        ticks.append(delay)
        if len(ticks) == 2:
            pbx.tokens.clear()  # token expired between two heartbeats
        if len(ticks) > 4:
            raise asyncio.CancelledError

    async with client_for(pbx, sleep=sleep, events_port=8260, events_ip="127.0.0.1") as client:
        await client.login()
        with pytest.raises(asyncio.CancelledError):
            await client.run_keepalive(interval=300)
    assert ticks == [300] * 5
    assert pbx.count("heartbeat") == 5
    assert pbx.count("login") == 2
    beat = next(c for c in pbx.calls if c.endpoint == "heartbeat")
    assert beat.body["ipaddr"] == "127.0.0.1"
    assert beat.body["port"] == "8260"


async def test_keepalive_stops_at_a_wrong_password_instead_of_locking_the_ip_out() -> None:
    pbx = FakePbx()
    ticks: list[float] = []

    async def tick(delay: float) -> None:  # every interval passes at once; a loop is caught
        ticks.append(delay)
        if len(ticks) > 10:
            raise AssertionError("the keepalive went on after its login was refused")

    client = client_for(pbx, sleep=tick)
    await client.login()
    pbx.tokens.clear()  # the token is gone (PBX restarted) ...
    pbx.password_md5 = "0" * 32  # ... and the API password was changed meanwhile
    with pytest.raises(LoginFailed):
        await client.run_keepalive(interval=600)
    # One heartbeat, one re-login refused, and no more: five would lock the IP out.
    assert pbx.count("login") == 2
    assert pbx.count("heartbeat") == 1
    assert ticks == [600]


async def test_keepalive_heartbeat_keeps_the_token(sim: Simulator) -> None:
    async with sim_client(sim) as pbx:
        await pbx.login()
        for _ in range(3):
            sim.clock.advance(20 * 60)
            await pbx.heartbeat()
        assert sim.login_count == 1  # 60 minutes, one token
        assert pbx.last_success_at is not None


async def test_logout_on_exit_ignores_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/login"):
            return httpx.Response(200, json={"status": "Success", "token": "t" * 32})
        raise httpx.ReadError("connection reset")

    async with PbxClient(BASE, "api", PASSWORD, transport=httpx.MockTransport(handler)) as client:
        await client.login()
        assert client.logged_in
    assert not client.logged_in


# ------------------------------------------------------------- the way there


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
    assert files_in(tmp_path) == []


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


# ------------------------------------------------------------------ secrets


async def test_secrets_never_in_logs_reprs_or_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, connect: ClientFactory
) -> None:
    caplog.set_level(logging.DEBUG)
    pbx = FakePbx(
        recordings={"a.wav": WAV},
        download_faults=["truncate", "html", "token20006"],
        get_random_errors=["20006"],
    )
    async with connect(pbx) as client:
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


def test_httpcore_sub_loggers_are_redacted_too(caplog: pytest.LogCaptureFixture) -> None:
    # A logger's filters do not reach its children's records: httpcore logs from these.
    PbxClient("https://127.0.0.1:9", "api", PASSWORD)  # installs the redaction
    with caplog.at_level(logging.DEBUG, logger="httpcore"):
        for name in ("httpcore.connection", "httpcore.http11"):
            logging.getLogger(name).debug(
                "send_request url=%s", "https://127.0.0.1/api/x?token=tok123&random=rnd456"
            )
    text = caplog.text
    assert "send_request url=https://127.0.0.1/api/x" in text
    assert "tok123" not in text and "rnd456" not in text


def test_sync_client_logs_in_downloads_exports_and_logs_out(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call(talk_seconds=30)
    assert call.recording
    start = datetime.fromisoformat(call.timestart)
    with SyncPbxClient(sim.url, sim.username, SIM_PASSWORD, tls=pinned(sim)) as pbx:
        result = pbx.download_recording(call.recording, tmp_path)
        rows = pbx.export_cdr(start - timedelta(hours=1), start + timedelta(hours=1))
        assert pbx.logged_in
        assert SIM_PASSWORD not in repr(pbx)
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == result.sha256
    assert [row.recording for row in rows] == [call.recording]
    assert outcomes(sim, "logout") == ["Success"]


async def test_a_pseries_pbx_taken_for_an_s_series_one_says_which_kind_to_give() -> None:
    """The P-Series answers 404 to the S-Series API: the error names the likely cause."""
    with PSeriesSimulator(PSeriesConfig(seed=2)) as psim:
        assert psim.cert_sha256 is not None
        client = PbxClient(
            psim.url,
            psim.client_id,
            psim.client_secret,
            tls=TlsOptions(pin_sha256=psim.cert_sha256),
            max_attempts=1,
        )
        async with client:
            with pytest.raises(PbxTransportError) as info:
                await client.login()
    assert "HTTP 404" in str(info.value) and "--kind p-series" in str(info.value)
    assert psim.client_secret not in str(info.value)


async def test_an_s_series_pbx_taken_for_a_pseries_one_says_which_kind_to_give(
    sim: Simulator,
) -> None:
    """The S-Series PBX answers 404 to the OpenAPI: the error names the likely cause."""
    client = PSeriesClient(
        sim.url, "callvault", SIM_PASSWORD, tls=pinned(sim), max_attempts=1, sleep=Sleeps()
    )
    async with client:
        with pytest.raises(PbxTransportError) as info:
            await client.login()
    assert "HTTP 404" in str(info.value) and "--kind s-series or cloud" in str(info.value)
    assert SIM_PASSWORD not in str(info.value)
