"""A scripted fake PBX, shared by the test_pbx_* modules.

`serve_fake_pbx` puts it behind a real HTTP server on 127.0.0.1, so a client without an
injected transport meets it over real sockets and a download goes through the production
socket pump (`SocketBody`); the fixture `connect` builds such clients. For tests of API
calls alone (login, heartbeat, CDR export), `client_for` puts the same fake behind an
injected ``httpx.MockTransport``; a download through that goes through `HttpxBody`, which
only callers' own tests with an injected transport use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from callvault.pbx import PbxClient, password_md5

PASSWORD = "s3cret-Passw0rd"
BASE = "https://127.0.0.1:8088"


def make_wav(n_samples: int = 800) -> bytes:
    data = b"\x01\x00" * n_samples
    fmt = struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16)
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


WAV = make_wav()


@dataclass
class Call:
    endpoint: str
    query: dict[str, str]
    body: dict[str, Any]
    version: str = ""
    random: str = ""  # what a successful get_random handed out


@dataclass
class FakePbx:
    """A scripted PBX: records every request; answers per endpoint from overridable hooks."""

    username: str = "api"
    password_md5: str = field(default_factory=lambda: password_md5(PASSWORD))
    recordings: dict[str, bytes] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    issued_randoms: list[str] = field(default_factory=list)
    live_randoms: set[str] = field(default_factory=set)
    # Queues of canned answers; when empty, normal behaviour.
    get_random_errors: list[str] = field(default_factory=list)
    download_faults: list[str] = field(default_factory=list)
    login_errno: str | None = None
    login_503_next: int = 0  # the next N logins answer HTTP 503 (a web server struggling)
    cdr_csv: str = "callid,recording\n1.1,a.wav\n"
    cdr_errno: str | None = None
    # Set to hold every download body until the event is set (an asyncio.Event with
    # MockTransport; a threading.Event with serve_fake_pbx, whose requests run in threads).
    hold_download_body: asyncio.Event | threading.Event | None = None
    # How much of the body goes out before that hold (in whole 1000-byte chunks): 0 holds
    # back the whole body; e.g. 1000 lets the client start writing its temporary file.
    hold_after_bytes: int = 0
    on_get_random: Callable[[str], None] | None = None
    # Extra headers of every successful download (recording or CDR), as raw bytes (e.g. a
    # Content-Disposition with a non-ASCII file name; serve_fake_pbx sends them as they are).
    download_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    http_requests: list[httpx.Request] = field(default_factory=list)  # via serve_fake_pbx

    def endpoints(self) -> list[str]:
        return [c.endpoint for c in self.calls]

    def count(self, endpoint: str) -> int:
        return sum(1 for c in self.calls if c.endpoint == endpoint)

    @staticmethod
    def _json(document: dict[str, Any]) -> httpx.Response:
        return httpx.Response(200, json=document, headers={"Connection": "close"})

    def _failed(self, errno: str) -> httpx.Response:
        return self._json({"status": "Failed", "errno": errno})

    async def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        assert path.startswith("/api/")
        endpoint = path.split("/", 3)[3]
        query = dict(request.url.params)
        body = json.loads(request.content) if request.content else {}
        call = Call(endpoint, query, body, path.split("/")[2])
        self.calls.append(call)
        if endpoint == "login":
            if self.login_503_next:
                self.login_503_next -= 1
                return httpx.Response(503, text="Service Unavailable")
            if self.login_errno is not None:
                return self._failed(self.login_errno)
            if body.get("username") != self.username or body.get("password") != self.password_md5:
                return self._failed("20003")
            new_token = secrets.token_hex(16)
            self.tokens.add(new_token)
            return self._json({"status": "Success", "token": new_token})
        token = query.get("token")
        if not token:
            return self._failed("20005")
        if token not in self.tokens:
            return self._failed("20004")
        if endpoint in ("heartbeat", "logout"):
            if endpoint == "logout":
                self.tokens.discard(token)
            return self._json({"status": "Success"})
        if endpoint in ("recording/get_random", "cdr/get_random"):
            if self.on_get_random is not None:
                self.on_get_random(body.get("recording", ""))
            if self.get_random_errors:
                return self._failed(self.get_random_errors.pop(0))
            value = secrets.token_hex(16)
            call.random = value
            self.issued_randoms.append(value)
            self.live_randoms.add(value)
            return self._json({"status": "Success", "random": value, **body})
        if endpoint in ("recording/download", "cdr/download"):
            if query.get("random") not in self.live_randoms:
                return self._failed("20012" if endpoint.startswith("rec") else "20020")
            self.live_randoms.discard(query["random"])
            if endpoint == "cdr/download":
                if self.cdr_errno:
                    return self._failed(self.cdr_errno)
                csv_headers = [(b"Content-Type", b"text/csv"), *self.download_headers]
                return httpx.Response(200, content=self.cdr_csv.encode(), headers=csv_headers)
            return await self._download(query["recording"])
        return self._failed("10003")

    async def _download(self, name: str) -> httpx.Response:
        fault = self.download_faults.pop(0) if self.download_faults else None
        if name not in self.recordings:
            return self._failed("20014")
        data = self.recordings[name]
        headers = {"Content-Type": "audio/x-wav", "Connection": "close"}
        if fault == "503":
            return httpx.Response(503, text="Service Unavailable")
        if fault == "html":
            return httpx.Response(
                200, text="<html><body>Error</body></html>", headers={"Content-Type": "text/html"}
            )
        if fault == "notwav":
            return httpx.Response(200, content=b"ID3\x03" + b"\x00" * 200, headers=headers)
        if fault == "truncate":
            # Announces the full length, delivers half: the client must notice.
            headers["Content-Length"] = str(len(data))
            return httpx.Response(200, content=data[: len(data) // 2], headers=headers)
        if fault == "truncate-nolength":
            return httpx.Response(200, content=data[: len(data) // 2], headers=headers)
        if fault == "json20014":
            return self._failed("20014")
        if fault == "hangup":  # the connection closes before any answer
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        if fault == "gzip":  # streamed, so that httpx does not try to decode it itself

            async def gzip_body() -> AsyncIterator[bytes]:
                yield data

            headers["Content-Encoding"] = "gzip"
            return httpx.Response(200, content=gzip_body(), headers=headers)
        if fault == "token20006":
            return self._failed("20006")
        hold = self.hold_download_body
        hold_at = self.hold_after_bytes

        async def stream() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 1000):
                if i == hold_at:
                    if isinstance(hold, threading.Event):
                        await asyncio.to_thread(hold.wait, 5)
                    elif hold is not None:
                        await asyncio.wait_for(hold.wait(), 5)
                yield data[i : i + 1000]

        headers["Content-Length"] = str(len(data))
        raw = [(k.encode(), v.encode()) for k, v in headers.items()] + self.download_headers
        return httpx.Response(200, content=stream(), headers=raw)


class Sleeps:
    """An injectable `sleep` for the client: records each backoff and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def files_in(directory: Path) -> list[str]:
    """The names in `directory` (a temporary file ends in .part), sorted; [] if it is absent."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def client_for(pbx: FakePbx, **kwargs: Any) -> PbxClient:
    """A client talking to `pbx` through an injected httpx.MockTransport (no network): for
    tests of API calls alone. Backoffs are recorded, not slept."""
    kwargs.setdefault("sleep", Sleeps())
    transport = httpx.MockTransport(pbx.handler)
    return PbxClient(BASE, "api", PASSWORD, transport=transport, **kwargs)


ClientFactory = Callable[..., PbxClient]


@pytest.fixture
def connect() -> Iterator[ClientFactory]:
    """`connect(pbx, **kwargs)`: a client for a FakePbx served over real HTTP on 127.0.0.1
    (`serve_fake_pbx`, until the test ends), so downloads go through the socket pump.
    Backoffs are recorded, not slept."""
    with contextlib.ExitStack() as stack:

        def factory(pbx: FakePbx, **kwargs: Any) -> PbxClient:
            kwargs.setdefault("sleep", Sleeps())
            base = stack.enter_context(serve_fake_pbx(pbx))
            return PbxClient(base, "api", PASSWORD, **kwargs)

        yield factory


@contextlib.contextmanager
def serve_fake_pbx(pbx: FakePbx) -> Iterator[str]:
    """Serve `pbx` over real HTTP on 127.0.0.1; yields the base URL.

    Each request is answered in its own thread by running the fake's handler on a fresh
    event loop; the response goes out as the fake built it, headers first (their raw bytes,
    non-ASCII ones too), then the body as it comes (a "truncate" fault announces more bytes
    than it sends, then the connection closes).
    """

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # URLs hold tokens and randoms; tests assert on requests, not logs

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            host = self.headers.get("Host", "127.0.0.1")
            request = httpx.Request(
                self.command,
                f"http://{host}{self.path}",
                headers=list(self.headers.items()),
                content=self.rfile.read(length),
            )
            pbx.http_requests.append(request)

            async def respond() -> None:
                response = await pbx.handler(request)
                self.send_response(response.status_code)
                for name, value in response.headers.raw:
                    if name.lower() not in (b"connection", b"transfer-encoding"):
                        # send_header encodes as Latin-1: this sends the raw bytes as they are.
                        self.send_header(name.decode("latin-1"), value.decode("latin-1"))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.flush()  # headers first: a held body must not hold them back
                # A response built from bytes is already read; only aiter_bytes replays it.
                body = (
                    response.aiter_bytes() if response.is_stream_consumed else response.aiter_raw()
                )
                async for chunk in body:
                    self.wfile.write(chunk)

            asyncio.run(respond())
            self.close_connection = True

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # the client hung up early (a cancelled or refused download): expected

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, args=(0.02,), name="fake-pbx", daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def assert_randoms_used_in_their_session(pbx: FakePbx) -> int:
    """Check, on the server's log in arrival order, that every download GET used a random
    that a get_random for the same recording obtained with the same token, once, and that
    no login arrived between that get_random and the GET. Returns how many GETs it checked."""
    issued: dict[str, tuple[int, Call]] = {}
    used: set[str] = set()
    for index, call in enumerate(pbx.calls):
        if call.endpoint == "recording/get_random" and call.random:
            issued[call.random] = (index, call)
        if call.endpoint != "recording/download":
            continue
        value = call.query["random"]
        assert value in issued, "a GET used a random no get_random handed out"
        assert value not in used, "a random was used twice"
        used.add(value)
        start, asked = issued[value]
        assert asked.body["recording"] == call.query["recording"]
        assert asked.query["token"] == call.query["token"], "the token changed in between"
        between = [c.endpoint for c in pbx.calls[start + 1 : index]]
        assert "login" not in between, "a login came between a random and its GET"
    return len(used)
