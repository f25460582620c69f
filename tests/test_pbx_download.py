"""Downloading a recording: the flow, the checks of the body, retries, cancellation, the file.

Which path each test exercises: every test here downloads over real sockets on 127.0.0.1
with no transport injected, so the recording goes through the production socket pump
(`SocketBody`): the scripted fake PBX over HTTP (`connect`, `serve_fake_pbx`), a bare
socket server where the fake cannot misbehave enough (`StallingServer`), or the simulator
over HTTPS (`sim`). The one exception is the last section: the httpx pump (`HttpxBody`),
which only a client with an injected transport uses, meets the same checks there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import hashlib
import logging
import os
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from starlette.requests import Request

from callvault import cipher
from callvault.pbx import (
    AllowedIpError,
    ApiVersion,
    DownloadResult,
    InvalidRecording,
    PbxClient,
    PbxProtocolError,
    PbxTlsError,
    PbxTransportError,
    RecordingNotFound,
    TlsOptions,
    _download,
)
from callvault.simulator import Simulator
from callvault.simulator._tls import ServerCertificate, generate_certificate
from support.pbx_fakes import (
    PASSWORD,
    WAV,
    ClientFactory,
    FakePbx,
    Sleeps,
    client_for,
    files_in,
    make_wav,
    serve_fake_pbx,
)
from support.pbx_sim import after_sim_answer, outcomes, pinned, sim_client

# ------------------------------------------------------------------ the flow


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
    assert files_in(tmp_path) == [name]


async def test_download_to_another_filename_and_allowedip(
    tmp_path: Path, connect: ClientFactory
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV})
    async with connect(pbx, allowedip="127.0.0.5") as client:
        result = await client.download_recording("a.wav", tmp_path / "sub", filename="b.wav")
    assert result.path == tmp_path / "sub" / "b.wav"
    assert result.path.read_bytes() == WAV
    assert pbx.calls[1].body == {"recording": "a.wav", "allowedip": "127.0.0.5"}


async def test_request_headers_of_the_get(tmp_path: Path) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV})
    with serve_fake_pbx(pbx) as base:
        async with PbxClient(base, "api", PASSWORD) as client:
            await client.download_recording("a.wav", tmp_path)
    get = next(r for r in pbx.http_requests if r.url.path.endswith("recording/download"))
    assert get.method == "GET"
    assert get.headers["connection"] == "close"
    assert get.headers["accept-encoding"] == "identity"
    assert get.headers["user-agent"] == "callvault"
    assert get.headers["host"] == base.removeprefix("http://")


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
async def test_non_ascii_bytes_in_the_response_headers_are_decoded(
    tmp_path: Path, connect: ClientFactory, encoding: str
) -> None:
    """A PBX names the file in Content-Disposition with the bytes of its own encoding."""
    name = "Müller-1001.wav"
    disposition = f'attachment; filename="{name}"'.encode(encoding)
    pbx = FakePbx(recordings={name: WAV}, download_headers=[(b"Content-Disposition", disposition)])
    async with connect(pbx, max_attempts=1) as client:
        result = await client.download_recording(name, tmp_path)
    assert result.path == tmp_path / name and result.path.read_bytes() == WAV


def test_raw_header_bytes_are_decoded_as_utf_8_when_valid_else_latin_1() -> None:
    on_the_wire = 'filename="Müller.wav"'
    for encoding in ("utf-8", "latin-1"):
        as_http_client_gives_it = on_the_wire.encode(encoding).decode("latin-1")
        headers = _download.headers_from_wire([("Content-Disposition", as_http_client_gives_it)])
        assert headers["content-disposition"] == on_the_wire


@pytest.mark.parametrize("version", [v.value for v in ApiVersion])
async def test_download_over_pinned_https_with_plus_in_name(
    sim: Simulator, tmp_path: Path, version: str
) -> None:
    call = sim.place_call(callfrom="+4915112345678", callto="1000", type="Inbound")
    assert call.recording is not None and "+" in call.recording
    async with sim_client(sim, api_version=version) as pbx:
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.path == tmp_path / call.recording
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == result.sha256
    assert result.size == sim.recording_path(call.recording).stat().st_size
    assert sorted(os.listdir(tmp_path)) == [call.recording]
    assert outcomes(sim, "recording/download") == ["Success"]
    assert outcomes(sim, "logout") == ["Success"]


async def test_allowedip(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording
    async with sim_client(sim, allowedip="127.0.0.2") as pbx:
        await pbx.download_recording(call.recording, tmp_path)
    async with sim_client(sim, allowedip="not-an-ip") as pbx:
        with pytest.raises(AllowedIpError) as info:
            await pbx.download_recording(call.recording, tmp_path / "x")
    assert info.value.errno == "20015"
    assert outcomes(sim, "recording/get_random").count("20015") == 1


async def test_every_connection_leaves_from_the_local_address(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node bound to its own address (serve --bind): the login, the random and the
    download all come from it, so the PBX's rule that a random is used from the address
    that logged in holds; the download is refused from any other address."""
    call = sim.place_call()
    assert call.recording
    seen: dict[str, set[str]] = {}
    for handler in ("login", "recording_get_random", "recording_download"):

        def note(request: Request, handler: str = handler) -> None:
            assert request.client is not None
            seen.setdefault(handler, set()).add(request.client.host)

        after_sim_answer(monkeypatch, handler, note)
    async with sim_client(sim, local_address="127.0.0.2") as pbx:
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert seen == {
        "login": {"127.0.0.2"},
        "recording_get_random": {"127.0.0.2"},
        "recording_download": {"127.0.0.2"},
    }


# ------------------------------------------------------------------ randoms


async def test_random_expired_between_the_two_steps_gets_a_fresh_one(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    call = sim.place_call()
    assert call.recording is not None
    randoms: list[str] = []
    asked: list[Request] = []

    def expire_the_first(request: Request) -> None:
        asked.append(request)
        if len(asked) == 1:
            sim.clock.advance(31)  # the random lives 30 s

    after_sim_answer(monkeypatch, "recording_get_random", expire_the_first)
    after_sim_answer(
        monkeypatch, "recording_download", lambda r: randoms.append(r.query_params["random"])
    )
    async with sim_client(sim) as pbx:
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert outcomes(sim, "recording/download") == ["20012", "Success"]
    assert len(randoms) == 2 and randoms[0] != randoms[1]


async def test_randoms_are_never_reused_and_the_pbx_refuses_reuse(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [sim.place_call(callfrom=str(1000 + i)) for i in range(3)]
    sim.faults.drop_next_downloads = 2
    urls: list[str] = []
    after_sim_answer(monkeypatch, "recording_download", lambda r: urls.append(str(r.url)))
    async with sim_client(sim) as pbx:
        for call in calls:
            assert call.recording is not None
            await pbx.download_recording(call.recording, tmp_path)
        randoms = [httpx.URL(url).params["random"] for url in urls]
        assert len(randoms) == 5  # 3 files, 2 dropped attempts
        assert len(set(randoms)) == 5
        # Replaying a used download URL is refused: reuse would have been caught above.
        async with httpx.AsyncClient(verify=pinned(sim).ssl_context()) as raw:
            again = await raw.get(urls[-1])
        assert again.json() == {"status": "Failed", "errno": "20012"}


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


# ------------------------------------------------------------- not found


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
    assert files_in(tmp_path) == []


async def test_missing_recording_at_get_random(tmp_path: Path, connect: ClientFactory) -> None:
    pbx = FakePbx(get_random_errors=["20014"])
    async with connect(pbx) as client:
        with pytest.raises(RecordingNotFound):
            await client.download_recording("gone.wav", tmp_path)
    assert pbx.count("recording/download") == 0


async def test_json_error_with_http_200_names_the_recording(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording is not None
    sim.delete_recording(call.recording)
    async with sim_client(sim) as pbx:
        with pytest.raises(RecordingNotFound) as info:
            await pbx.download_recording(call.recording, tmp_path)
    assert info.value.errno == "20014"
    assert str(info.value) == (
        f"recording {call.recording}: recording not found on the PBX, errno 20014"
    )
    assert os.listdir(tmp_path) == []


async def test_file_deleted_between_random_and_download(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    call = sim.place_call()
    assert call.recording is not None
    name = call.recording
    after_sim_answer(monkeypatch, "recording_get_random", lambda _: sim.delete_recording(name))
    async with sim_client(sim) as pbx:
        with pytest.raises(RecordingNotFound):
            await pbx.download_recording(name, tmp_path)
    assert outcomes(sim, "recording/download") == ["20014"]
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ retries


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
    assert files_in(tmp_path) == ["a.wav"]


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
    assert files_in(tmp_path) == []


async def test_a_body_cut_short_is_reported_with_its_sizes(tmp_path: Path) -> None:
    """Headers announce the whole file; half arrives, then the server hangs up."""
    data = make_wav(600_000)
    pbx = FakePbx(recordings={"a.wav": data}, download_faults=["truncate"])
    with serve_fake_pbx(pbx) as base:
        async with PbxClient(base, "api", PASSWORD, sleep=Sleeps(), max_attempts=1) as client:
            with pytest.raises(PbxTransportError) as info:
                await client.download_recording("a.wav", tmp_path)
    assert f"received {len(data) // 2} bytes but the PBX announced {len(data)}" in str(info.value)
    assert files_in(tmp_path) == []


async def test_connection_dropped_mid_body_is_retried(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call(talk_seconds=20)
    assert call.recording is not None
    sim.faults.drop_next_downloads = 1
    async with sim_client(sim) as pbx:
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert outcomes(sim, "recording/download") == ["dropped", "Success"]
    assert sorted(os.listdir(tmp_path)) == [call.recording]


async def test_connection_always_dropped_leaves_no_file(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call(talk_seconds=20)
    assert call.recording is not None
    sim.faults.drop_next_downloads = 10
    sleeps = Sleeps()
    async with sim_client(sim, max_attempts=3, sleep=sleeps) as pbx:
        with pytest.raises(PbxTransportError) as info:
            await pbx.download_recording(call.recording, tmp_path)
    assert call.recording in str(info.value)
    assert outcomes(sim, "recording/download") == ["dropped"] * 3
    assert len(sleeps.delays) == 2
    assert os.listdir(tmp_path) == []


async def test_5xx_and_html_pages_are_retried(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording is not None
    sim.faults.error_5xx_next = 1
    sim.faults.html_error_next = 1
    async with sim_client(sim) as pbx:
        result = await pbx.download_recording(call.recording, tmp_path)
    assert result.sha256 == sim.recording_sha256(call.recording)
    assert sim.failed_login_count() == 0


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
    tmp_path: Path, connect: ClientFactory, name: str, body: bytes, content_type: str, error: str
) -> None:
    pbx = AnswersWith(body, content_type)
    async with connect(pbx, max_attempts=2) as client:
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
    tmp_path: Path, connect: ClientFactory, name: str, body: bytes, content_type: str
) -> None:
    pbx = AnswersWith(body, content_type)
    async with connect(pbx) as client:
        result = await client.download_recording(name, tmp_path)
    assert (tmp_path / name).read_bytes() == body and result.size == len(body)


async def test_body_that_is_not_wav_is_a_transport_failure_retried_with_a_fresh_random(
    tmp_path: Path, connect: ClientFactory
) -> None:
    # Spec 9.5: RIFF is audio, "{" a JSON error, anything else a transport error.
    pbx = FakePbx(recordings={"a.wav": WAV}, download_faults=["notwav"])
    async with connect(pbx) as client:
        result = await client.download_recording("a.wav", tmp_path)
    assert pbx.count("recording/get_random") == 2
    assert (tmp_path / "a.wav").read_bytes() == WAV and result.size == len(WAV)
    assert files_in(tmp_path) == ["a.wav"]


async def test_body_that_is_never_wav_is_refused_after_the_attempts(
    tmp_path: Path, connect: ClientFactory
) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, download_faults=["notwav"] * 3)
    async with connect(pbx, max_attempts=3) as client:
        with pytest.raises(InvalidRecording, match=r"not a WAV file.*gave up after 3 attempts"):
            await client.download_recording("a.wav", tmp_path)
    assert pbx.count("recording/get_random") == 3
    assert files_in(tmp_path) == []


async def test_encoded_recording_is_refused(tmp_path: Path, connect: ClientFactory) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, download_faults=["gzip"])
    async with connect(pbx) as client:
        with pytest.raises(PbxProtocolError, match="gzip-encoded"):
            await client.download_recording("a.wav", tmp_path)
    assert files_in(tmp_path) == []


# ------------------------------------------------------------------ the file


@pytest.fixture
def umask_027() -> Iterator[None]:
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("umask_027")
async def test_saved_file_has_normal_permissions(tmp_path: Path, connect: ClientFactory) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV})
    async with connect(pbx) as client:
        result = await client.download_recording("a.wav", tmp_path)
    assert result.path.stat().st_mode & 0o777 == 0o666 & ~0o027


async def test_write_failure_propagates_and_leaves_nothing(
    tmp_path: Path, connect: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    pbx = FakePbx(recordings={"a.wav": make_wav(1_500_000)})
    real_write = _download.TempFile.write_hashed  # what the pump writes through

    def write(self: _download.TempFile, data: bytes | memoryview) -> None:
        if self.size > 0:
            raise OSError(28, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(_download.TempFile, "write_hashed", write)
    async with connect(pbx) as client:
        with pytest.raises(OSError, match="No space left"):
            await client.download_recording("a.wav", tmp_path)
    assert files_in(tmp_path) == []
    assert pbx.count("recording/get_random") == 1  # a full disk is not retried


async def test_large_body_in_many_reads_with_progress(
    tmp_path: Path, connect: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Start writeback every 256 KiB instead of 4 MiB, so that path runs here too.
    monkeypatch.setattr(_download, "WRITEBACK_STEP", 256 * 1024)
    data = make_wav(1_800_000)  # 3.6 MB: several of the socket pump's 1 MiB reads
    pbx = FakePbx(recordings={"big.wav": data})
    seen: list[tuple[int, int | None, int]] = []

    def progress(done: int, total: int | None) -> None:
        seen.append((done, total, threading.get_ident()))

    async with connect(pbx) as client:
        result = await client.download_recording("big.wav", tmp_path, progress=progress)
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.path.read_bytes() == data
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and done[-1] == len(data)
    assert {t for _, t, _ in seen} == {len(data)}
    assert {ident for _, _, ident in seen} == {threading.get_ident()}  # on the event loop


async def test_a_large_recording_is_made_durable_while_it_downloads(
    tmp_path: Path, connect: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every WRITEBACK_STEP bytes the file is synced in a thread of its own, and the final
    fsync comes after those syncs, so it has only the tail left (on a disk with a write
    cache it would otherwise wait for the whole recording)."""
    monkeypatch.setattr(_download, "WRITEBACK_STEP", 256 * 1024)
    events: list[tuple[str, str]] = []  # (which sync, the thread that ran it)
    real_datasync, real_fsync = _download._DATASYNC, os.fsync

    def datasync(fd: int) -> None:
        real_datasync(fd)
        events.append(("datasync", threading.current_thread().name))

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", threading.current_thread().name))

    monkeypatch.setattr(_download, "_DATASYNC", datasync)
    monkeypatch.setattr(_download.os, "fsync", fsync)
    data = make_wav(1_800_000)
    pbx = FakePbx(recordings={"big.wav": data})
    async with connect(pbx) as client:
        result = await client.download_recording("big.wav", tmp_path)
    assert result.path.read_bytes() == data
    syncs = [sync for sync, _ in events]
    assert syncs[0] == "datasync", "nothing was synced before the final fsync"
    assert {thread for sync, thread in events if sync == "datasync"} == {"callvault-flush"}
    # The file's fsync comes after every background sync (then the directory's).
    assert syncs[syncs.index("fsync") :] == ["fsync", "fsync"]


async def test_a_failed_background_sync_fails_the_download_and_leaves_nothing(
    tmp_path: Path, connect: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel reports a write error to one sync only: the error the background sync
    saw must fail the download, not be lost because the final fsync then succeeds."""
    monkeypatch.setattr(_download, "WRITEBACK_STEP", 256 * 1024)

    def datasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_download, "_DATASYNC", datasync)
    pbx = FakePbx(recordings={"big.wav": make_wav(1_800_000)})
    async with connect(pbx) as client:
        with pytest.raises(OSError, match="Input/output error"):
            await client.download_recording("big.wav", tmp_path)
    assert files_in(tmp_path) == []
    # No descriptor of this process still holds the (deleted) temporary file: neither
    # the writer's nor the flusher's own copy.
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # listdir's own, closed by now
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert not [path for path in held if str(tmp_path) in path], held
    assert pbx.count("recording/get_random") == 1  # a disk error is not retried


# ------------------------------------------------- bypassing the page cache

DIRECT_SIZES = [1, 4095, 4096 + 1, 1024 * 1024, 1024 * 1024 + 1, 3 * 1024 * 1024 + 12_345]


def writes_in_pieces(temp: _download.TempFile, data: bytes, piece: int) -> None:
    for start in range(0, len(data), piece):
        temp.write(data[start : start + piece])


@pytest.mark.parametrize("size", DIRECT_SIZES)
def test_a_file_is_written_around_the_page_cache_whole_stages_at_a_time(
    tmp_path: Path, size: int
) -> None:
    """Where the file system allows O_DIRECT (this machine's ext4 does), whole stages go
    straight to the disk and the tail, whatever its size, through the cache: the file
    holds exactly the bytes given, written in pieces of any size."""
    data = os.urandom(size)
    temp = _download.TempFile(tmp_path, buffering=0)
    flags = fcntl.fcntl(temp._file.fileno(), fcntl.F_GETFL)
    assert flags & os.O_DIRECT, "the temporary file was not opened with O_DIRECT"
    writes_in_pieces(temp, data, 7_777)
    temp.commit(tmp_path / "a.wav")
    assert (tmp_path / "a.wav").read_bytes() == data
    assert temp.size == size and temp.sha256 == hashlib.sha256(data).hexdigest()
    assert files_in(tmp_path) == ["a.wav"]


def test_a_file_on_a_file_system_that_is_no_local_disk_is_written_through_the_cache() -> None:
    """/dev/shm is a tmpfs here (memory, or on another machine a network file system: a
    direct write would wait for the server's disk): not written around the cache."""
    shm = Path("/dev/shm")
    assert _download.file_system_type(os.stat(shm).st_dev) == "tmpfs"
    assert _download.file_system_type(os.stat(Path.cwd()).st_dev) in {"ext4", "xfs", "btrfs"}
    data = os.urandom(1024 * 1024 + 3)
    temp = _download.TempFile(shm, buffering=0)
    try:
        assert not fcntl.fcntl(temp._file.fileno(), fcntl.F_GETFL) & os.O_DIRECT
        writes_in_pieces(temp, data, 65_536)
        temp.commit(temp.path.with_name(temp.path.name + ".done"))
        done = temp.path.with_name(temp.path.name + ".done")
        assert done.read_bytes() == data
        done.unlink()
    finally:
        temp.discard()


def test_a_file_system_that_refuses_o_direct_at_open_gets_cached_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without O_DIRECT (tmpfs before Linux 6.6, some FUSE ones) refuses it
    with EINVAL, and Linux does so after it has created the file. Nothing here refuses
    it, so `os.open` stands in for one: it creates the file, then raises as Linux would.
    The file is written all the same, and no empty file is left behind."""
    real_open = os.open

    def refusing_open(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            os.close(real_open(path, flags & ~os.O_DIRECT, mode))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(_download.os, "open", refusing_open)
    data = os.urandom(2 * 1024 * 1024 + 99)
    temp = _download.TempFile(tmp_path, buffering=0)
    assert not fcntl.fcntl(temp._file.fileno(), fcntl.F_GETFL) & os.O_DIRECT
    writes_in_pieces(temp, data, 65_536)
    temp.commit(tmp_path / "a.wav")
    assert (tmp_path / "a.wav").read_bytes() == data
    assert files_in(tmp_path) == ["a.wav"]


@pytest.mark.parametrize("buffering", [0, _download.WRITE_BUFFER])
def test_a_direct_write_the_disk_refuses_goes_on_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buffering: int
) -> None:
    """A file system may accept O_DIRECT at open and refuse a write with EINVAL (memory
    or blocks not aligned as it needs). The kernel's own refusal, provoked with a stage
    one byte off a page boundary: the file leaves O_DIRECT and is written whole (through
    the write buffer the caller asked for, if any)."""

    class Misaligned:
        @staticmethod
        def mmap(fileno: int, length: int) -> memoryview:
            return memoryview(bytearray(length + 1))[1:]

    monkeypatch.setattr(_download, "mmap", Misaligned)
    data = os.urandom(3 * 1024 * 1024 + 5)
    temp = _download.TempFile(tmp_path, buffering=buffering)
    writes_in_pieces(temp, data, 300_000)
    assert not fcntl.fcntl(temp._file.fileno(), fcntl.F_GETFL) & os.O_DIRECT
    temp.commit(tmp_path / "a.wav")
    assert (tmp_path / "a.wav").read_bytes() == data


async def test_a_download_through_an_encryptor_is_written_around_the_cache_too(
    tmp_path: Path, sim: Simulator
) -> None:
    """The ciphertext's pieces (segments and tags: no multiple of a disk block) are staged
    like any other bytes; what is stored decrypts to the recording."""
    call = sim.place_call(talk_seconds=1, size_bytes=3 * 1024 * 1024 + 777)
    assert call.recording is not None
    key = cipher.new_data_key()
    associated = cipher.recording_associated_data(1)
    async with sim_client(sim) as pbx:
        result = await pbx.download_recording(
            call.recording, tmp_path, transform=lambda: cipher.Encryptor(key, associated)
        )
    assert result.sha256 == sim.recording_sha256(call.recording)
    stored = result.path.read_bytes()
    assert result.stored_sha256 == hashlib.sha256(stored).hexdigest()
    with result.path.open("rb") as handle:
        plain = b"".join(cipher.decrypt_file(key, handle, len(stored), associated))
    assert hashlib.sha256(plain).hexdigest() == result.sha256


# ------------------------------------------------------------- cancellation


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
            await asyncio.wait_for(part_file_written(tmp_path, task), 10)  # a hang guard only
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
    finally:
        hold.set()
    assert files_in(tmp_path) == []


async def part_file_written(directory: Path, task: asyncio.Task[DownloadResult]) -> None:
    while not any(n.endswith(".part") for n in files_in(directory)):
        assert not task.done(), "the download ended before it wrote a file"
        await asyncio.sleep(0.01)


class StallingServer:
    """Answers every GET with headers and part of a WAV body, then sends nothing more
    (with ``headers=False``: answers the GET with nothing at all). Sets `get_arrived` when
    a GET has come in, and `closed_by_client` if the client then closes its end within
    10 s (otherwise the server closes the connection itself). With `tls` it speaks HTTPS
    with that certificate; with ``hang_up=True`` it closes the connection as soon as the
    part is sent (over TLS without TLS's close: a "ragged EOF")."""

    def __init__(
        self,
        sent_bytes: int = 300_000,
        *,
        headers: bool = True,
        tls: ServerCertificate | None = None,
        hang_up: bool = False,
        handshake_fault: Literal["silent", "reset"] | None = None,
    ) -> None:
        self.sent_bytes = sent_bytes
        self.headers = headers
        self.hang_up = hang_up
        self.handshake_fault = handshake_fault
        self.wav = make_wav(5_000_000)
        self.context: ssl.SSLContext | None = None
        if tls is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(tls.cert_file, tls.key_file)
        self.scheme = "https" if tls is not None else "http"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.get_arrived = threading.Event()
        self.closed_by_client = threading.Event()
        self.connections = 0  # the login's, get_random's, then the GET's
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.handshake_fault is not None and self.connections == 3:  # the GET's
                self._break_handshake(conn)
                continue
            if self.context is not None:
                try:
                    conn = self.context.wrap_socket(conn, server_side=True)
                except OSError:  # a client that gave up during the handshake
                    conn.close()
                    continue
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                if request.startswith(b"POST"):  # login and get_random
                    body = b'{"status":"Success","token":"t1","random":"r1"}'
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + body
                    )
                    continue
                self.get_arrived.set()
                conn.sendall(
                    b""
                    if not self.headers
                    else b"HTTP/1.1 200 OK\r\nContent-Type: audio/x-wav\r\n"
                    + f"Content-Length: {len(self.wav)}\r\nConnection: close\r\n\r\n".encode()
                    + self.wav[: self.sent_bytes]
                )
                if self.hang_up:
                    continue
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    if conn.recv(1) == b"":  # the client closed its end
                        self.closed_by_client.set()

    def _break_handshake(self, conn: socket.socket) -> None:
        """Take the ClientHello, then answer nothing (until the client gives up) or reset
        the connection."""
        with conn:
            conn.recv(65536)
            if self.handshake_fault == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                if conn.recv(1) == b"":
                    self.closed_by_client.set()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> ServerCertificate:
    return generate_certificate(tmp_path_factory.mktemp("tls"), "127.0.0.1", "STALL")


@pytest.fixture(params=["http", "https"])
def stalling_tls(request: pytest.FixtureRequest) -> bool:
    return request.param == "https"


def stalling_client(
    server: StallingServer, certificate: ServerCertificate, **options: Any
) -> PbxClient:
    """A client of `server`, trusting its certificate by pin when it speaks HTTPS."""
    if server.context is not None:
        options["tls"] = TlsOptions(pin_sha256=certificate.sha256)
    base = f"{server.scheme}://127.0.0.1:{server.port}"
    return PbxClient(base, "api", PASSWORD, sleep=Sleeps(), **options)


async def test_cancelled_while_blocked_reading_removes_temp_file_and_closes_socket(
    tmp_path: Path, certificate: ServerCertificate, stalling_tls: bool
) -> None:
    """Cancelled while the worker thread is blocked reading the body: the cancellation
    shuts the socket down (a socket timeout of an hour cannot be what ends the read) and
    the temporary file goes. Over TLS too, where the read waits under the TLS layer."""
    server = StallingServer(tls=certificate if stalling_tls else None)
    try:
        client = stalling_client(server, certificate, timeout=3600)
        async with client:
            task = asyncio.create_task(client.download_recording("a.wav", tmp_path))
            await asyncio.wait_for(part_file_written(tmp_path, task), 10)  # hang guards only
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
            assert files_in(tmp_path) == []
            # The server saw the client close its end (not its own 10 s wait run out).
            assert await asyncio.to_thread(server.closed_by_client.wait, 10)
    finally:
        server.close()


async def test_a_body_cut_off_mid_way_says_how_much_arrived(
    tmp_path: Path, certificate: ServerCertificate, stalling_tls: bool
) -> None:
    """The server hangs up after part of the body; over TLS without TLS's close (a
    "ragged EOF"), which reads as the end of the stream: the Content-Length check says
    what happened, and nothing is left behind."""
    server = StallingServer(tls=certificate if stalling_tls else None, hang_up=True)
    try:
        async with stalling_client(server, certificate, max_attempts=1) as client:
            with pytest.raises(PbxTransportError) as info:
                await client.download_recording("a.wav", tmp_path)
        assert f"received 300000 bytes but the PBX announced {len(server.wav)}" in str(info.value)
        assert files_in(tmp_path) == []
    finally:
        server.close()


async def test_a_body_that_stops_coming_times_out(
    tmp_path: Path, certificate: ServerCertificate, stalling_tls: bool
) -> None:
    """The server sends part of the body, then nothing, and keeps the connection open: the
    socket's timeout ends the read (over TLS too) and nothing is left behind."""
    server = StallingServer(tls=certificate if stalling_tls else None)
    try:
        # Long enough for the first part to arrive on a busy machine (the message then
        # says how much had); the rest never comes.
        async with stalling_client(server, certificate, max_attempts=1, timeout=3) as client:
            with pytest.raises(PbxTransportError) as info:
                await client.download_recording("a.wav", tmp_path)
        assert "the connection broke off after" in str(info.value)
        assert "(TimeoutError)" in str(info.value)
        assert files_in(tmp_path) == []
    finally:
        server.close()


async def test_a_tls_handshake_that_times_out_is_a_timeout_not_a_tls_refusal(
    tmp_path: Path, certificate: ServerCertificate
) -> None:
    """The GET's connection is accepted and its ClientHello never answered: the socket's
    timeout, said as such and retried like any, not a TLS error (which is never retried
    and stops `fetch`)."""
    server = StallingServer(tls=certificate, handshake_fault="silent")
    try:
        async with stalling_client(server, certificate, max_attempts=1, timeout=0.5) as client:
            with pytest.raises(PbxTransportError) as info:
                await client.download_recording("a.wav", tmp_path)
        assert not isinstance(info.value, PbxTlsError), info.value
        assert "timed out" in str(info.value)
        assert not server.get_arrived.is_set()  # the GET was never sent
        assert files_in(tmp_path) == []
    finally:
        server.close()


async def test_a_tls_handshake_cut_by_a_reset_is_a_broken_connection_retried(
    tmp_path: Path, certificate: ServerCertificate
) -> None:
    """A PBX restarting resets the GET's connection during its handshake: a broken
    connection, retried with a fresh random, not a TLS refusal."""
    server = StallingServer(tls=certificate, handshake_fault="reset")
    try:
        async with stalling_client(server, certificate, max_attempts=1) as client:
            with pytest.raises(PbxTransportError) as info:
                await client.download_recording("a.wav", tmp_path)
        assert not isinstance(info.value, PbxTlsError), info.value
        assert "during the TLS handshake" in str(info.value)
        assert files_in(tmp_path) == []
    finally:
        server.close()


async def test_cancel_while_waiting_for_headers_releases_the_gate_and_closes_socket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled inside the critical section (the GET sent, no answer yet)."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    server = StallingServer(headers=False)
    try:
        client = PbxClient(
            f"http://127.0.0.1:{server.port}", "api", PASSWORD, sleep=Sleeps(), timeout=3600
        )
        async with client:
            await client.login()
            task = asyncio.create_task(client.download_recording("a.wav", tmp_path))
            # get_random answered, GET sent; its headers never come.
            assert await asyncio.to_thread(server.get_arrived.wait, 10)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)  # a hang guard only
            # The server saw the client close its end (not its own 10 s wait run out).
            assert await asyncio.to_thread(server.closed_by_client.wait, 10)
            # The gate was released: a re-login (which needs it exclusive) gets in.
            await asyncio.wait_for(client.login(), 10)
            await asyncio.wait_for(client.heartbeat(), 10)
        assert files_in(tmp_path) == []
        gc.collect()  # an unretrieved exception of the abandoned worker would be logged now
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    finally:
        server.close()


async def test_large_recording_cancelled_mid_body_leaves_nothing(
    sim: Simulator, tmp_path: Path
) -> None:
    call = sim.place_call(talk_seconds=1, size_bytes=24 * 1024 * 1024)
    assert call.recording is not None
    async with sim_client(sim) as pbx:
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


# ------------------------------------- the httpx pump (an injected transport)

HTTPX_PUMP_CASES = [
    ([], None),  # saved
    (["truncate"], None),  # retried, then saved
    (["notwav"] * 2, "not a WAV file"),
    (["truncate"] * 2, "received"),
    (["json20014"], "recording not found"),
    (["gzip"], "gzip-encoded"),
]


@pytest.mark.parametrize(("faults", "error"), HTTPX_PUMP_CASES)
async def test_the_httpx_pump_of_an_injected_transport_meets_the_same_checks(
    tmp_path: Path, faults: list[str], error: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's tests may inject an httpx transport (MockTransport); its downloads go
    through HttpxBody, which must refuse and save the same bodies as the socket pump (and
    sync them in the background as they grow, through its buffered writer)."""
    monkeypatch.setattr(_download, "WRITEBACK_STEP", 64 * 1024)
    pbx = FakePbx(recordings={"a.wav": make_wav(200_000)}, download_faults=list(faults))
    async with client_for(pbx, max_attempts=2) as client:
        if error is None:
            result = await client.download_recording("a.wav", tmp_path)
            assert result.path.read_bytes() == pbx.recordings["a.wav"]
        else:
            with pytest.raises((PbxTransportError, PbxProtocolError, RecordingNotFound)) as info:
                await client.download_recording("a.wav", tmp_path)
            assert error in str(info.value)
    assert files_in(tmp_path) == ([] if error else ["a.wav"])


async def test_the_httpx_pump_decodes_non_ascii_header_bytes_too(tmp_path: Path) -> None:
    disposition = 'attachment; filename="Müller-1001.wav"'.encode("latin-1")
    pbx = FakePbx(
        recordings={"a.wav": WAV}, download_headers=[(b"Content-Disposition", disposition)]
    )
    async with client_for(pbx, max_attempts=1) as client:
        result = await client.download_recording("a.wav", tmp_path)
    assert result.path.read_bytes() == WAV
