"""Traps found in a review of the client and `fetch`, each pinned by a test.

A keepalive that would lock the IP out, bodies that are not recordings under any name,
login refusals that `fetch` would repeat per name, TLS connections cut mid-handshake,
SIGTERM during a download, an unreadable CA file, a password typed into the PBX URL, an
empty or cut-off CDR export, and the PBX's "busy" errnos.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from callvault.pbx import (
    InvalidRecording,
    LoginFailed,
    PbxBusy,
    PbxClient,
    PbxTlsError,
    PbxTransportError,
    RequestRejected,
    TlsOptions,
    error_for_errno,
)
from callvault.pbx._tls import is_broken_connection
from support.pbx_fakes import PASSWORD, WAV, FakePbx, Sleeps, serve_fake_pbx

CALLVAULT = str(Path(sys.executable).with_name("callvault"))


def client_for(pbx: FakePbx, **kwargs: Any) -> PbxClient:
    kwargs.setdefault("sleep", Sleeps())
    transport = httpx.MockTransport(pbx.handler)
    return PbxClient("https://127.0.0.1:8088", "api", PASSWORD, transport=transport, **kwargs)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ------------------------------------------------------------------ keepalive


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


# ------------------------------------------------------- what is a recording


class AnswersWith(FakePbx):
    """Answers every download with a fixed body and content type."""

    def __init__(self, body: bytes, content_type: str) -> None:
        super().__init__(recordings={})
        self.body = body
        self.content_type = content_type

    async def _download(self, name: str) -> httpx.Response:
        return httpx.Response(200, content=self.body, headers={"Content-Type": self.content_type})


@pytest.mark.parametrize(
    ("name", "body", "content_type", "error"),
    [
        ("a.mp3", b"", "audio/mpeg", "empty body"),
        ("b.yswav", b"Not Found\n", "text/plain", r"with text \(text/plain\)"),
        ("c.gsm", b"404 page not found", "text/plain; charset=utf-8", r"with text \(text/plain\)"),
        ("d.yswav", b"\x00\x01" * 10, "application/octet-stream", "20 bytes is not a recording"),
        ("e.wav", b"", "audio/x-wav", "empty body"),
    ],
)
async def test_a_body_that_is_not_a_recording_is_refused_whatever_the_name(
    tmp_path: Path, name: str, body: bytes, content_type: str, error: str
) -> None:
    pbx = AnswersWith(body, content_type)
    async with client_for(pbx, max_attempts=2) as client:
        with pytest.raises((PbxTransportError, InvalidRecording), match=error) as info:
            await client.download_recording(name, tmp_path)
    assert "gave up after 2 attempts" in str(info.value)  # a transport failure: retried
    assert pbx.count("recording/get_random") == 2
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "body", "content_type"),
    [
        ("a.yswav", bytes(range(256)) * 8, "application/octet-stream"),  # format undocumented
        ("b.wav", WAV, "text/plain"),  # a RIFF body is audio, whatever the header says
        ("c.mp3", b"ID3\x04" + b"\x00" * 500, ""),
    ],
)
async def test_audio_under_other_names_and_types_is_still_saved(
    tmp_path: Path, name: str, body: bytes, content_type: str
) -> None:
    pbx = AnswersWith(body, content_type)
    async with client_for(pbx) as client:
        result = await client.download_recording(name, tmp_path)
    assert (tmp_path / name).read_bytes() == body and result.size == len(body)


# --------------------------------------------------------- refused logins


async def test_a_login_refused_for_another_reason_is_remembered_like_a_wrong_password() -> None:
    pbx = FakePbx(login_errno="10004")
    async with client_for(pbx) as client:
        for _ in range(3):
            with pytest.raises(RequestRejected, match="errno 10004"):
                await client.login()
    assert pbx.count("login") == 1


async def test_a_busy_pbx_is_retried(tmp_path: Path) -> None:
    assert all(isinstance(error_for_errno(e), PbxBusy) for e in ("20010", "30001", "30003"))
    pbx = FakePbx(recordings={"a.wav": WAV}, get_random_errors=["30003", "20010"])
    async with client_for(pbx) as client:
        result = await client.download_recording("a.wav", tmp_path)
    assert (tmp_path / "a.wav").read_bytes() == WAV and result.size == len(WAV)
    assert pbx.count("recording/get_random") == 3


def test_fetch_stops_at_a_refused_login_instead_of_logging_in_per_name(tmp_path: Path) -> None:
    pbx = FakePbx(login_errno="10004")
    with serve_fake_pbx(pbx) as base:
        done = run_fetch(base, ["a.wav", "b.wav", "c.wav"], tmp_path)
    assert done.returncode == 1
    assert pbx.count("login") == 1
    assert done.stderr.strip().splitlines() == [
        HTTP_WARNING,
        "callvault: error: login: a required parameter is blank, errno 10004 "
        "(3 recording(s) not fetched)",
    ]


# The fake PBX speaks plain HTTP, which fetch warns about.
HTTP_WARNING = (
    "callvault: warning: the PBX URL is plain http: the password hash, the token and every "
    "recording cross the network unencrypted; use https"
)


def run_fetch(
    base: str, names: list[str], out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}
    env["PBX_SECRET"] = PASSWORD
    argv = [CALLVAULT, "fetch", "--pbx", base, "--username", "api"]
    argv += ["--password-env", "PBX_SECRET", "--out", str(out), *extra, *names]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------- SIGTERM


def test_sigterm_during_a_download_leaves_no_partial_file(tmp_path: Path) -> None:
    release = threading.Event()
    big = WAV + b"\x00" * 200_000
    pbx = FakePbx(recordings={"a.wav": big}, hold_download_body=release, hold_after_bytes=1000)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}
    env["PBX_SECRET"] = PASSWORD
    try:
        with serve_fake_pbx(pbx) as base:
            argv = [CALLVAULT, "fetch", "--pbx", base, "--username", "api"]
            argv += ["--password-env", "PBX_SECRET", "--out", str(out), "a.wav"]
            process = subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            try:
                deadline = time.monotonic() + 30
                while not any(n.endswith(".part") for n in files_in(out)):
                    assert process.poll() is None, process.communicate()
                    assert time.monotonic() < deadline, "the download never started"
                    time.sleep(0.02)
                process.send_signal(signal.SIGTERM)
                _, stderr = process.communicate(timeout=30)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                release.set()
    finally:
        release.set()
    assert process.returncode == 143
    assert stderr.strip().splitlines() == [
        HTTP_WARNING,
        "callvault: terminated; no partial file was kept",
    ]
    assert files_in(out) == []


# ----------------------------------------------------------------- TLS


@pytest.fixture
def closes_at_once() -> Iterator[tuple[str, list[int]]]:
    """A TCP server on 127.0.0.1 that accepts each connection and closes it at once: the
    TLS handshake meets an EOF (a PBX restarting, a proxy dropping the connection)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(5)
        listener.close()


async def test_a_connection_cut_during_the_handshake_is_retried_not_a_certificate_error(
    tmp_path: Path, closes_at_once: tuple[str, list[int]]
) -> None:
    base, accepted = closes_at_once
    tls = TlsOptions(pin_sha256="ab" * 32)
    async with PbxClient(base, "api", PASSWORD, tls=tls, max_attempts=3, sleep=Sleeps()) as c:
        with pytest.raises(PbxTransportError, match="during the TLS handshake") as info:
            await c.download_recording("a.wav", tmp_path)
    assert not isinstance(info.value, PbxTlsError)
    assert "gave up after 3 attempts" in str(info.value)
    assert len(accepted) == 3


def test_which_tls_errors_are_a_broken_connection() -> None:
    assert is_broken_connection(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))
    assert is_broken_connection(ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"))
    assert not is_broken_connection(ssl.SSLCertVerificationError(1, "certificate verify failed"))
    assert not is_broken_connection(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER]"))


# ------------------------------------------------------ command-line input


def test_an_unreadable_ca_file_is_one_line(tmp_path: Path) -> None:
    # /proc/self/mem is a file that cannot be read from the start (EIO), even by root.
    done = run_fetch("https://127.0.0.1:9", ["a.wav"], tmp_path, "--ca-file", "/proc/self/mem")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "callvault: error: --ca-file /proc/self/mem: cannot read it (Input/output error)"
    ]


@pytest.mark.parametrize(
    "url", ["api:S3cret-pw@pbx.example:8088", "https://api:S3cret-pw@pbx.example:80x88"]
)
def test_a_password_typed_into_the_pbx_url_is_not_echoed(tmp_path: Path, url: str) -> None:
    done = run_fetch(url, ["a.wav"], tmp_path)
    assert done.returncode == 2
    assert "S3cret-pw" not in done.stderr + done.stdout
    assert "pbx.example" in done.stderr and len(done.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------- CDR


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--since", "2026-11-01", "--until", "2026-11-02", "--json", "--csv"],
            "choose one of --json and --csv",
        ),
        (["--since", "yesterday", "--until", "2026-11-02"], "'yesterday' is not a time"),
        (["--since", "2026-11-02", "--until", "2026-11-01"], "--until is before --since"),
    ],
)
def test_cdr_bad_options_exit_2(args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}
    argv = [CALLVAULT, "cdr", "--pbx", "https://127.0.0.1:9", "--username", "api", *args]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("callvault: error: ") and message in line


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


def test_fetch_saves_a_recording_whose_header_names_it_in_utf_8(tmp_path: Path) -> None:
    name = "Müller-1001.wav"
    disposition = f'attachment; filename="{name}"'.encode()
    pbx = FakePbx(recordings={name: WAV}, download_headers=[(b"Content-Disposition", disposition)])
    with serve_fake_pbx(pbx) as base:
        done = run_fetch(base, [name], tmp_path)
    assert done.stderr.strip().splitlines() == [HTTP_WARNING]
    assert done.returncode == 0
    assert (tmp_path / name).read_bytes() == WAV
