"""The client against the simulated PBX over real HTTPS on 127.0.0.1: each gotcha of spec §9.

The simulator is a separate implementation of the protocol (it shares only data types with the
client), so these tests check the client against the rules, not against itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from callvault.pbx import (
    AllowedIpError,
    ApiVersion,
    DownloadResult,
    LoginFailed,
    PbxClient,
    PbxTlsError,
    PbxTransportError,
    RecordingNotFound,
    SyncPbxClient,
    TlsOptions,
)
from callvault.simulator import Simulator, SimulatorConfig

PASSWORD = "integration-Pa55"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(password=PASSWORD, seed=7)) as simulator:
        yield simulator


class NoSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def pinned(sim: Simulator) -> TlsOptions:
    assert sim.cert_sha256 is not None
    return TlsOptions(pin_sha256=sim.cert_sha256)


def client(sim: Simulator, **kwargs: Any) -> PbxClient:
    kwargs.setdefault("tls", pinned(sim))
    kwargs.setdefault("sleep", NoSleep())
    return PbxClient(sim.url, sim.username, PASSWORD, **kwargs)


class Spy(httpx.AsyncBaseTransport):
    """A real network transport that also lets a test act between requests."""

    def __init__(self, sim: Simulator, after: Any = None) -> None:
        self._inner = httpx.AsyncHTTPTransport(verify=pinned(sim).ssl_context())
        self.after = after
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = await self._inner.handle_async_request(request)
        if self.after is not None:
            self.after(request)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()

    def endpoint_params(self, endpoint: str) -> list[dict[str, str]]:
        return [dict(r.url.params) for r in self.requests if r.url.path.endswith(endpoint)]


def outcomes(sim: Simulator, endpoint: str) -> list[str]:
    return [outcome for name, outcome in sim.request_log if name == endpoint]


# ------------------------------------------------------------------ download


@pytest.mark.parametrize("version", [v.value for v in ApiVersion])
async def test_download_over_pinned_https_with_plus_in_name(
    sim: Simulator, tmp_path: Path, version: str
) -> None:
    call = sim.place_call(callfrom="+4915112345678", callto="1000", type="Inbound")
    assert call.recording is not None and "+" in call.recording
    async with client(sim, api_version=version) as pbx:
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.path == tmp_path / call.recording
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == result.sha256
    assert result.size == sim.recording_path(call.recording).stat().st_size
    assert sorted(os.listdir(tmp_path)) == [call.recording]
    assert outcomes(sim, "recording/download") == ["Success"]
    assert outcomes(sim, "logout") == ["Success"]


async def test_random_expired_between_the_two_steps_gets_a_fresh_one(
    sim: Simulator, tmp_path: Path
) -> None:
    call = sim.place_call()
    assert call.recording is not None
    expired_once: list[bool] = []

    def after(request: httpx.Request) -> None:
        if request.url.path.endswith("recording/get_random") and not expired_once:
            expired_once.append(True)
            sim.clock.advance(31)  # the random lives 30 s

    spy = Spy(sim, after)
    async with client(sim, transport=spy) as pbx:
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert outcomes(sim, "recording/download") == ["20012", "Success"]
    randoms = [p["random"] for p in spy.endpoint_params("recording/download")]
    assert len(randoms) == 2 and randoms[0] != randoms[1]


async def test_randoms_are_never_reused_and_the_pbx_refuses_reuse(
    sim: Simulator, tmp_path: Path
) -> None:
    calls = [sim.place_call(callfrom=str(1000 + i)) for i in range(3)]
    sim.faults.drop_next_downloads = 2
    spy = Spy(sim)
    async with client(sim, transport=spy) as pbx:
        for call in calls:
            assert call.recording is not None
            await pbx.download_recording(call.recording, tmp_path)
        randoms = [p["random"] for p in spy.endpoint_params("recording/download")]
        assert len(randoms) == 5  # 3 files, 2 dropped attempts
        assert len(set(randoms)) == 5
        # Replaying a used download URL is refused: reuse would have been caught above.
        used = next(r for r in reversed(spy.requests) if r.url.path.endswith("recording/download"))
        async with httpx.AsyncClient(verify=pinned(sim).ssl_context()) as raw:
            again = await raw.get(used.url)
        assert again.json() == {"status": "Failed", "errno": "20012"}


async def test_json_error_with_http_200_names_the_recording(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording is not None
    sim.delete_recording(call.recording)
    async with client(sim) as pbx:
        with pytest.raises(RecordingNotFound) as info:
            await pbx.download_recording(call.recording, tmp_path)
    assert info.value.errno == "20014"
    assert str(info.value) == (
        f"recording {call.recording}: recording not found on the PBX, errno 20014"
    )
    assert os.listdir(tmp_path) == []


async def test_file_deleted_between_random_and_download(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording is not None
    name = call.recording

    def after(request: httpx.Request) -> None:
        if request.url.path.endswith("recording/get_random"):
            sim.delete_recording(name)

    async with client(sim, transport=Spy(sim, after)) as pbx:
        with pytest.raises(RecordingNotFound):
            await pbx.download_recording(name, tmp_path)
    assert outcomes(sim, "recording/download") == ["20014"]
    assert os.listdir(tmp_path) == []


async def test_connection_dropped_mid_body_is_retried(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call(talk_seconds=20)
    assert call.recording is not None
    sim.faults.drop_next_downloads = 1
    async with client(sim) as pbx:
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert outcomes(sim, "recording/download") == ["dropped", "Success"]
    assert sorted(os.listdir(tmp_path)) == [call.recording]


async def test_connection_always_dropped_leaves_no_file(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call(talk_seconds=20)
    assert call.recording is not None
    sim.faults.drop_next_downloads = 10
    sleeps = NoSleep()
    async with client(sim, max_attempts=3, sleep=sleeps) as pbx:
        with pytest.raises(PbxTransportError) as info:
            await pbx.download_recording(call.recording, tmp_path)
    assert call.recording in str(info.value)
    assert outcomes(sim, "recording/download") == ["dropped"] * 3
    assert len(sleeps.delays) == 2
    assert os.listdir(tmp_path) == []


async def test_large_recording_cancelled_mid_body_leaves_nothing(
    sim: Simulator, tmp_path: Path
) -> None:
    call = sim.place_call(talk_seconds=1, size_bytes=24 * 1024 * 1024)
    assert call.recording is not None
    async with client(sim) as pbx:
        task: asyncio.Task[DownloadResult] | None = None

        def progress(done: int, total: int | None) -> None:
            if done > 2 * 1024 * 1024 and task is not None:
                task.cancel()

        task = asyncio.create_task(
            pbx.download_recording(call.recording, tmp_path, progress=progress)
        )
        with pytest.raises(asyncio.CancelledError):
            await task
        assert os.listdir(tmp_path) == []
        # The session is intact: the next download of the same recording works.
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert sorted(os.listdir(tmp_path)) == [call.recording]


async def test_download_connection_checks_the_pin_too(sim: Simulator, tmp_path: Path) -> None:
    """The GET has its own connection (the socket pump): a wrong pin stops it before a
    byte of the request (token, random) is written."""
    call = sim.place_call()
    assert call.recording
    async with client(sim) as pbx:
        await pbx.login()
        wrong = TlsOptions(pin_sha256=hashlib.sha256(b"another certificate").hexdigest())
        pbx._ssl_context = wrong.ssl_context()  # as if the PBX changed after the login
        with pytest.raises(PbxTlsError) as info:
            await pbx.download_recording(call.recording, tmp_path)
    assert "--pin-sha256" in str(info.value)
    assert outcomes(sim, "recording/get_random") == ["Success"]
    assert outcomes(sim, "recording/download") == []  # the GET never reached the PBX
    assert os.listdir(tmp_path) == []


def test_sync_client_downloads_over_https(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call(talk_seconds=30)
    assert call.recording
    with SyncPbxClient(sim.url, sim.username, PASSWORD, tls=pinned(sim)) as pbx:
        result = pbx.download_recording(call.recording, tmp_path)
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == result.sha256


async def test_5xx_and_html_pages_are_retried(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording is not None
    sim.faults.error_5xx_next = 1
    sim.faults.html_error_next = 1
    async with client(sim) as pbx:
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert sim.failed_login_count() == 0


# -------------------------------------------------------------------- tokens


async def test_token_expiry_and_relogin(sim: Simulator, tmp_path: Path) -> None:
    first, second = sim.place_call(), sim.place_call(callfrom="1002")
    assert first.recording and second.recording
    async with client(sim) as pbx:
        await pbx.download_recording(first.recording, tmp_path)
        assert sim.login_count == 1
        sim.clock.advance(31 * 60)  # the sliding token dies after 30 idle minutes
        await pbx.download_recording(second.recording, tmp_path)
        assert sim.login_count == 2
    assert outcomes(sim, "recording/get_random") == ["Success", "20006", "Success"]


async def test_reboot_loses_tokens_and_client_logs_in_again(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording
    async with client(sim) as pbx:
        await pbx.login()
        sim.reboot()
        await pbx.heartbeat()
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.size > 44
    assert sim.login_count == 2


async def test_keepalive_heartbeat_keeps_the_token(sim: Simulator) -> None:
    async with client(sim) as pbx:
        await pbx.login()
        for _ in range(3):
            sim.clock.advance(20 * 60)
            await pbx.heartbeat()
        assert sim.login_count == 1  # 60 minutes, one token
        assert pbx.last_success_at is not None


async def test_wrong_password_never_adds_up_to_a_lockout(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording
    pbx = PbxClient(sim.url, sim.username, "not-the-password", tls=pinned(sim), sleep=NoSleep())
    async with pbx:
        for _ in range(8):
            with pytest.raises(LoginFailed):
                await pbx.download_recording(call.recording, tmp_path)
    assert sim.failed_login_count() == 1
    assert outcomes(sim, "login") == ["20003"]
    # The right password still gets in: the IP was never locked out.
    async with client(sim) as good:
        await good.download_recording(call.recording, tmp_path)


async def test_allowedip(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording
    async with client(sim, allowedip="127.0.0.2") as pbx:
        await pbx.download_recording(call.recording, tmp_path)
    async with client(sim, allowedip="not-an-ip") as pbx:
        with pytest.raises(AllowedIpError) as info:
            await pbx.download_recording(call.recording, tmp_path / "x")
    assert info.value.errno == "20015"
    assert outcomes(sim, "recording/get_random").count("20015") == 1


# ----------------------------------------------------------------------- TLS


async def test_wrong_pin_is_refused_before_any_request(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording
    wrong = TlsOptions(pin_sha256=hashlib.sha256(b"another certificate").hexdigest())
    async with client(sim, tls=wrong) as pbx:
        with pytest.raises(PbxTlsError) as info:
            await pbx.download_recording(call.recording, tmp_path)
    assert "--pin-sha256" in str(info.value)
    assert sim.request_log == []  # not even the login reached the PBX
    assert os.listdir(tmp_path) == []


async def test_unverified_self_signed_certificate_is_refused(sim: Simulator) -> None:
    async with client(sim, tls=TlsOptions()) as pbx:
        with pytest.raises(PbxTlsError) as info:
            await pbx.login()
    assert "--ca-file or --pin-sha256" in str(info.value)
    assert sim.request_log == []


async def test_ca_file_and_pin_with_colons_are_accepted(sim: Simulator) -> None:
    assert sim.ca_file is not None and sim.cert_sha256 is not None
    async with client(sim, tls=TlsOptions(ca_file=sim.ca_file)) as pbx:
        await pbx.login()
    colons = ":".join(sim.cert_sha256[i : i + 2] for i in range(0, 64, 2)).upper()
    async with client(sim, tls=TlsOptions(pin_sha256=colons)) as pbx:
        await pbx.login()
    assert outcomes(sim, "login") == ["Success", "Success"]


def test_sync_client_pin_mismatch_also_refused_on_blocking_sockets(sim: Simulator) -> None:
    wrong = TlsOptions(pin_sha256="ab" * 32)
    with (
        SyncPbxClient(sim.url, sim.username, PASSWORD, tls=wrong) as pbx,
        pytest.raises(PbxTlsError),
    ):
        pbx.login()
    assert sim.request_log == []


# ----------------------------------------------------------------------- CDR


@pytest.mark.parametrize("version", ["v1.1.0", "v2.0.0"])
async def test_cdr_export(sim: Simulator, version: str) -> None:
    placed = [
        sim.place_call(
            callfrom="+4915112345678", callto="1000", type="Inbound", srctrunkname="SIP-A"
        ),
        sim.place_call(status="NO ANSWER", dsttrunkname="SIP-B", type="Outbound"),
    ]
    now = datetime.fromisoformat(placed[0].timestart)
    async with client(sim, api_version=version) as pbx:
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


# ----------------------------------------------------------------------- CLI


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callvault", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_fetch_end_to_end_with_pin(sim: Simulator, tmp_path: Path) -> None:
    ok = sim.place_call(callfrom="+4915112345678", callto="1000", type="Inbound")
    gone = sim.place_call(callfrom="1005")
    assert ok.recording and gone.recording and sim.cert_sha256
    sim.delete_recording(gone.recording)
    out = tmp_path / "out"
    env = {
        "CALLVAULT_PBX": sim.url,
        "CALLVAULT_USERNAME": sim.username,
        "MY_PBX_PASSWORD": PASSWORD,
    }
    result = _cli(
        "fetch",
        "--password-env",
        "MY_PBX_PASSWORD",
        "--pin-sha256",
        sim.cert_sha256,
        "--out",
        str(out),
        ok.recording,
        gone.recording,
        env=env,
    )
    assert result.returncode == 1
    assert (out / ok.recording).read_bytes() == sim.recording_path(ok.recording).read_bytes()
    assert sorted(os.listdir(out)) == [ok.recording]
    assert result.stderr.strip().splitlines() == [
        f"callvault: {gone.recording}: recording not found on the PBX, errno 20014"
    ]
    assert ok.recording in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr

    again = _cli(
        "fetch",
        "--password-env",
        "MY_PBX_PASSWORD",
        "--pin-sha256",
        sim.cert_sha256,
        "--out",
        str(out),
        ok.recording,
        env=env,
    )
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(
    ("args", "env_extra", "expected"),
    [
        (["--pin-sha256", "00" * 32], {}, "does not match --pin-sha256"),
        ([], {}, "certificate not trusted"),
        (["--insecure"], {"CALLVAULT_PASSWORD": "wrong"}, "wrong API username or password"),
        (["--insecure"], {"CALLVAULT_PASSWORD": ""}, "the API password is not set"),
        (["--insecure", "--pbx", "https://127.0.0.1:1"], {}, "cannot reach the PBX"),
        (["--insecure", "--pbx", "127.0.0.1:8088"], {}, "has no scheme"),
        (["--insecure", "--api-version", "v9"], {}, "unknown --api-version"),
        (["--insecure", "--pin-sha256", "ab" * 32], {}, "choose one of"),
    ],
)
def test_cli_fetch_expected_failures_are_one_line(
    sim: Simulator, tmp_path: Path, args: list[str], env_extra: dict[str, str], expected: str
) -> None:
    call = sim.place_call()
    assert call.recording
    env = {
        "CALLVAULT_PBX": sim.url,
        "CALLVAULT_USERNAME": sim.username,
        "CALLVAULT_PASSWORD": PASSWORD,
        **env_extra,
    }
    result = _cli("fetch", *args, "--out", str(tmp_path), call.recording, env=env)
    assert result.returncode != 0
    lines = [
        line for line in result.stderr.splitlines() if not line.startswith("callvault: warning")
    ]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("callvault: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []
    assert sim.failed_login_count() <= 1


def test_cli_cdr_json_and_csv(sim: Simulator) -> None:
    call = sim.place_call(callfrom="+4915112345678", callto="1000", type="Inbound")
    assert sim.ca_file is not None
    day = call.timestart[:10]
    env = {
        "CALLVAULT_PBX": sim.url,
        "CALLVAULT_USERNAME": sim.username,
        "CALLVAULT_PASSWORD": PASSWORD,
    }
    as_json = _cli(
        "cdr", "--ca-file", str(sim.ca_file), "--since", day, "--until", day, "--json", env=env
    )
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert [(r["callid"], r["recording"]) for r in rows] == [(call.callid, call.recording)]
    as_csv = _cli(
        "cdr",
        "--ca-file",
        str(sim.ca_file),
        "--since",
        f"{day} 00:00:00",
        "--until",
        day,
        "--csv",
        env=env,
    )
    assert as_csv.returncode == 0, as_csv.stderr
    lines = as_csv.stdout.strip().splitlines()
    assert lines[0].startswith("callid,timestart,")
    assert call.recording is not None and call.recording in lines[1]
    table = _cli("cdr", "--ca-file", str(sim.ca_file), "--since", day, "--until", day, env=env)
    assert table.returncode == 0
    assert call.recording in table.stdout
