"""A scripted fake PBX for httpx.MockTransport, shared by the test_pbx_* modules."""

from __future__ import annotations

import asyncio
import json
import secrets
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from callvault.pbx import password_md5

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
    cdr_csv: str = "callid,recording\n1.1,a.wav\n"
    cdr_errno: str | None = None
    hold_download_body: asyncio.Event | None = None
    on_get_random: Callable[[str], None] | None = None

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
        self.calls.append(Call(endpoint, query, body, path.split("/")[2]))
        if endpoint == "login":
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
                return httpx.Response(
                    200, content=self.cdr_csv.encode(), headers={"Content-Type": "text/csv"}
                )
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
        if fault == "token20006":
            return self._failed("20006")
        hold = self.hold_download_body

        async def stream() -> AsyncIterator[bytes]:
            if hold is not None:
                await asyncio.wait_for(hold.wait(), 5)
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        headers["Content-Length"] = str(len(data))
        return httpx.Response(200, content=stream(), headers=headers)


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
