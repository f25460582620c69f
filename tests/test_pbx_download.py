"""The download pumps: both meet the same checks; the socket pump's own duties.

`PbxClient.download_recording` reads a recording's body with a blocking-socket pump in a
worker thread unless a transport is injected (then through httpx). The shared checks are
run against both pumps in test_pbx_client.py (fixture `connect`); here: what only one pump
can get wrong (cancellation and socket closing, progress from the worker thread, request
headers, large bodies), and what both must do alike (permissions, write failures,
encodings).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from callvault.pbx import PbxClient, PbxProtocolError, PbxTransportError, _download
from support.pbx_fakes import PASSWORD, WAV, FakePbx, Sleeps, make_wav, serve_fake_pbx

ClientFactory = Callable[..., PbxClient]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(params=["mock-transport", "socket-pump"])
def connect(request: pytest.FixtureRequest) -> Iterator[ClientFactory]:
    with contextlib.ExitStack() as stack:

        def factory(pbx: FakePbx, **kwargs: Any) -> PbxClient:
            kwargs.setdefault("sleep", Sleeps())
            if request.param == "mock-transport":
                transport = httpx.MockTransport(pbx.handler)
                return PbxClient(
                    "https://127.0.0.1:8088", "api", PASSWORD, transport=transport, **kwargs
                )
            base = stack.enter_context(serve_fake_pbx(pbx))
            return PbxClient(base, "api", PASSWORD, **kwargs)

        yield factory


@pytest.fixture
def umask_027() -> Iterator[None]:
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


# ------------------------------------------------------------- both pumps


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
    real_write = _download.TempFile.write_hashed  # what both pumps write through

    def write(self: _download.TempFile, data: bytes | memoryview) -> None:
        if self.size > 0:
            raise OSError(28, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(_download.TempFile, "write_hashed", write)
    async with connect(pbx) as client:
        with pytest.raises(OSError, match="No space left"):
            await client.download_recording("a.wav", tmp_path)
    assert leftovers(tmp_path) == []
    assert pbx.count("recording/get_random") == 1  # a full disk is not retried


async def test_encoded_recording_is_refused(tmp_path: Path, connect: ClientFactory) -> None:
    pbx = FakePbx(recordings={"a.wav": WAV}, download_faults=["gzip"])
    async with connect(pbx) as client:
        with pytest.raises(PbxProtocolError, match="gzip-encoded"):
            await client.download_recording("a.wav", tmp_path)
    assert leftovers(tmp_path) == []


async def test_large_body_in_many_reads_with_progress(
    tmp_path: Path, connect: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Start writeback every 256 KiB instead of 16 MiB, so that path runs here too.
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


# ------------------------------------------------------------ socket pump


async def test_socket_pump_request_headers(tmp_path: Path) -> None:
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


class StallingServer:
    """Answers every GET with headers and part of a WAV body, then sends nothing more
    (with ``headers=False``: answers the GET with nothing at all). Sets `get_arrived` when
    a GET has come in, and `closed_by_client` if the client then closes its end within
    10 s (otherwise the server closes the connection itself)."""

    def __init__(self, sent_bytes: int = 300_000, *, headers: bool = True) -> None:
        self.sent_bytes = sent_bytes
        self.headers = headers
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.get_arrived = threading.Event()
        self.closed_by_client = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
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
                wav = make_wav(5_000_000)
                conn.sendall(
                    b""
                    if not self.headers
                    else b"HTTP/1.1 200 OK\r\nContent-Type: audio/x-wav\r\n"
                    + f"Content-Length: {len(wav)}\r\nConnection: close\r\n\r\n".encode()
                    + wav[: self.sent_bytes]
                )
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    if conn.recv(1) == b"":  # the client closed its end
                        self.closed_by_client.set()

    def close(self) -> None:
        self.listener.close()


async def test_cancelled_socket_download_removes_temp_file_and_closes_socket(
    tmp_path: Path,
) -> None:
    """Cancelled while the worker thread is blocked reading the body: the cancellation
    shuts the socket down (a socket timeout of an hour cannot be what ends the read) and
    the temporary file goes."""
    server = StallingServer()
    try:
        client = PbxClient(
            f"http://127.0.0.1:{server.port}", "api", PASSWORD, sleep=Sleeps(), timeout=3600
        )
        async with client:
            task = asyncio.create_task(client.download_recording("a.wav", tmp_path))

            async def part_file_written() -> None:
                while not any(n.endswith(".part") for n in leftovers(tmp_path)):
                    assert not task.done(), "the download ended before it wrote a file"
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(part_file_written(), 10)  # hang guards only, here on
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
            assert leftovers(tmp_path) == []
            # The server saw the client close its end (not its own 10 s wait run out).
            assert await asyncio.to_thread(server.closed_by_client.wait, 10)
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
        assert leftovers(tmp_path) == []
        gc.collect()  # an unretrieved exception of the abandoned worker would be logged now
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    finally:
        server.close()


async def test_socket_pump_reports_a_body_cut_short(tmp_path: Path) -> None:
    """Headers announce the whole file; half arrives, then the server hangs up."""
    data = make_wav(600_000)
    pbx = FakePbx(recordings={"a.wav": data}, download_faults=["truncate"])
    with serve_fake_pbx(pbx) as base:
        async with PbxClient(base, "api", PASSWORD, sleep=Sleeps(), max_attempts=1) as client:
            with pytest.raises(PbxTransportError) as info:
                await client.download_recording("a.wav", tmp_path)
    assert f"received {len(data) // 2} bytes but the PBX announced {len(data)}" in str(info.value)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
async def test_non_ascii_bytes_in_the_response_headers_are_decoded(
    tmp_path: Path, encoding: str
) -> None:
    """A PBX names the file in Content-Disposition with the bytes of its own encoding."""
    name = "Müller-1001.wav"
    disposition = f'attachment; filename="{name}"'.encode(encoding)
    pbx = FakePbx(recordings={name: WAV}, download_headers=[(b"Content-Disposition", disposition)])
    with serve_fake_pbx(pbx) as base:
        async with PbxClient(base, "api", PASSWORD, sleep=Sleeps(), max_attempts=1) as client:
            result = await client.download_recording(name, tmp_path)
    assert result.path == tmp_path / name and result.path.read_bytes() == WAV
