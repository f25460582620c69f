"""Helpers for the web tests (test_web_*): a real archive (WAV files through LocalStorage,
rows through the index API), a controllable clock, a real uvicorn server on 127.0.0.1,
logging in, and reading the audit log back."""

from __future__ import annotations

import hashlib
import html.parser
import io
import json
import math
import re
import socket
import struct
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from callvault.index import (
    Index,
    RecordingRow,
    SearchFilters,
    SettingKey,
    Worker,
    audit,
    open_index,
)
from callvault.keys import Keyring
from callvault.pbx._types import CallDetail
from callvault.storage import LocalStorage, Storage, recording_key
from callvault.web import create_app

T0 = datetime(2024, 5, 1, 9, 0, 0, tzinfo=UTC)
ADMIN = ("alice", "alice-password-1")
LISTENER_2000 = ("bob", "bob-password-1")  # scope 2000-2099
LISTENER_1000 = ("carol", "carol-password-1")  # scope 1000-1099


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.value = start

    def __call__(self) -> datetime:
        return self.value

    def advance(self, delta: timedelta) -> None:
        self.value += delta


def make_wav(seconds: float, freq: float = 440.0, rate: int = 8000) -> bytes:
    """A real 8 kHz 16-bit mono PCM WAV with a sine tone, as an S-Series PBX records."""
    frames = int(seconds * rate)
    samples = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * freq * n / rate)))
        for n in range(frames)
    )
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples)
    return buffer.getvalue()


@dataclass
class WebArchive:
    root: Path
    index: Index
    storage: Storage
    audio: dict[int, bytes] = field(default_factory=dict)  # recording id -> archived bytes
    _seq: int = 0

    def add(
        self,
        *,
        start: datetime,
        call_from: str,
        call_to: str,
        direction: str = "Internal",
        status: str = "ANSWERED",
        talk_s: int = 10,
        did: str = "",
        seconds: float = 1.0,
        state: str = "archived",
        freq: float = 440.0,
    ) -> RecordingRow:
        """One call with a recording; `state` archived (WAV stored), pending, failed,
        missing, or retrying (pending again after a failed attempt, due an hour later).

        Add pending ones last: a pending job is due, and the next add claims the oldest."""
        self._seq += 1
        callid = f"{int(start.timestamp())}.{self._seq}"
        name = f"{start:%Y%m%d%H%M%S}-{callid}-{call_from}-{call_to}-{direction}.wav"
        cdr = CallDetail(
            callid=callid,
            timestart=start.strftime("%Y-%m-%d %H:%M:%S"),
            callfrom=call_from,
            callto=call_to,
            callduration=talk_s + 5,
            talkduration=talk_s,
            status=status,
            type=direction,
            recording=name,
            didnumber=did,
            sn="369451090405",
        )
        now = start + timedelta(minutes=1)
        result = self.index.calls.record([cdr], source="event", tz=UTC, now=now)[0]
        assert result.recording_id is not None
        if state != "pending":
            jobs = self.index.jobs.claim(
                Worker(None, "test"), 1, now=now, lease=timedelta(minutes=5)
            )
            assert [j.recording_id for j in jobs] == [result.recording_id]
            if state == "archived":
                data = make_wav(seconds, freq)
                key = recording_key(cdr.sn, start, name)
                stored = self.storage.put(key, io.BytesIO(data))
                assert self.index.jobs.mark_archived(
                    result.recording_id,
                    worker=Worker(None, "test"),
                    size=stored.size,
                    sha256=hashlib.sha256(data).hexdigest(),
                    storage_key=key,
                    content_type="audio/wav",
                    now=now,
                )
                self.audio[result.recording_id] = data
            elif state == "retrying":
                assert self.index.jobs.mark_retry(
                    result.recording_id,
                    worker=Worker(None, "test"),
                    error="PBX busy (HTTP 503)",
                    next_attempt_at=now + timedelta(hours=1),
                    now=now,
                    not_found=False,
                )
            elif state == "missing":
                assert self.index.jobs.mark_missing(
                    result.recording_id,
                    worker=Worker(None, "test"),
                    reason="the PBX says the file does not exist (8 answers in 30 min)",
                    now=now,
                )
            else:
                assert self.index.jobs.mark_failed(
                    result.recording_id,
                    worker=Worker(None, "test"),
                    reason="PBX said 20014",
                    now=now,
                )
        row = self.index.recordings.by_id(result.recording_id)
        assert row is not None
        return row

    def add_unrecorded_call(
        self, *, start: datetime, call_from: str, call_to: str, status: str = "NO ANSWER"
    ) -> None:
        """A call without a recording (not answered, or not recorded): a call, no file."""
        self._seq += 1
        cdr = CallDetail(
            callid=f"{int(start.timestamp())}.{self._seq}",
            timestart=start.strftime("%Y-%m-%d %H:%M:%S"),
            callfrom=call_from,
            callto=call_to,
            callduration=20,
            talkduration=0,
            status=status,
            type="Inbound",
            recording=None,
            sn="369451090405",
        )
        [result] = self.index.calls.record(
            [cdr], source="event", tz=UTC, now=start + timedelta(minutes=1)
        )
        assert result.recording_id is None


def build_archive(root: Path, storage: Storage | None = None) -> WebArchive:
    """The standard test archive: six calls across extensions 1000s and 2000s, three users
    (the recordings in `storage`, by default a directory in `root`)."""
    index = open_index(f"sqlite:///{root / 'callvault.db'}")
    archive = WebArchive(root, index, storage if storage is not None else LocalStorage(root))
    archive.add(start=T0, call_from="1001", call_to="1003", talk_s=30, seconds=2.0)
    archive.add(
        start=T0 + timedelta(days=1, hours=1),
        call_from="0612345678",
        call_to="1000",
        direction="Inbound",
        talk_s=45,
        did="0215550100",
        seconds=3.0,
        freq=330.0,
    )
    archive.add(
        start=T0 + timedelta(days=2, hours=2),
        call_from="1000",
        call_to="0799887766",
        direction="Outbound",
        talk_s=5,
    )
    archive.add(
        start=T0 + timedelta(days=2, hours=3),
        call_from="2001",
        call_to="2002",
        talk_s=60,
        seconds=1.5,
        freq=550.0,
    )
    archive.add(
        start=T0 + timedelta(days=2, hours=5),
        call_from="1003",
        call_to="1002",
        talk_s=12,
        state="failed",
    )
    archive.add(
        start=T0 + timedelta(days=2, hours=6),
        call_from="1002",
        call_to="1001",
        status="NO ANSWER",
        talk_s=0,
        state="pending",
    )
    index.users.add(ADMIN[0], "admin", ADMIN[1])
    index.users.add(LISTENER_2000[0], "listener", LISTENER_2000[1], "2000-2099")
    index.users.add(LISTENER_1000[0], "listener", LISTENER_1000[1], "1000-1099")
    return archive


def rows_by_from(archive: WebArchive) -> dict[str, RecordingRow]:
    """The standard archive's recordings by caller (each caller makes one call)."""
    return {
        row.call_from: row for row in archive.index.recordings.search(SearchFilters(), limit=100)
    }


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run the app under a real uvicorn on 127.0.0.1 (a free port); yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@dataclass
class LiveWeb:
    base: str
    archive: WebArchive
    clock: FakeClock

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=10, follow_redirects=False)

    def login(self, name: str, password: str) -> httpx.Client:
        client = self.client()
        response = login(client, name, password)
        assert response.status_code == 303, response.text
        return client

    def bearer(self, name: str) -> tuple[httpx.Client, str]:
        _token, secret = self.archive.index.tokens.create(name, label="tests")
        client = httpx.Client(
            base_url=self.base, timeout=10, headers={"Authorization": f"Bearer {secret}"}
        )
        return client, secret


_CSRF_RE = re.compile(r'name="csrf" value="([^"]*)"')


def csrf_of(html: str) -> str:
    match = _CSRF_RE.search(html)
    assert match is not None, "no CSRF field in the page"
    return match.group(1)


def login(client: httpx.Client, name: str, password: str) -> httpx.Response:
    page = client.get("/login")
    assert page.status_code == 200
    return client.post(
        "/login",
        data={
            "username": name,
            "password": password,
            "csrf": csrf_of(page.text),
            "next": "/search",
        },
    )


@contextmanager
def live_web(
    root: Path,
    *,
    secure_cookies: bool = False,
    keyring: Keyring | None = None,
    storage: Storage | None = None,
) -> Iterator[LiveWeb]:
    archive = build_archive(root, storage)
    clock = FakeClock(T0 + timedelta(days=10))
    app = create_app(
        archive.index,
        archive.storage,
        secure_cookies=secure_cookies,
        clock=clock,
        keyring=keyring,
    )
    try:
        with serve(app) as base:
            yield LiveWeb(base, archive, clock)
    finally:
        archive.index.close()


def audit_entries(web: LiveWeb, **where: str) -> list[audit.AuditEntry]:
    """The audit log's entries matching `where` (AuditFilter's fields), newest first."""
    return web.archive.index.audit.query(audit.AuditFilter(**where), limit=1000)


# Text that a spreadsheet would run as a formula if a CSV cell started with it.
SPREADSHEET_FORMULAS = ["=HYPERLINK(A1)", "+1+2", "-3+4", "@SUM(A1)", "\t=1", "\r=2"]

# Sec-Fetch-Site values: requests another site made the browser send, and those from this
# site's own pages or the address bar (None: a client that does not send the header).
CROSS_SITE = ("cross-site", "same-site")
OWN_SITE = ("same-origin", "none", None)


def fetch_site(value: str | None) -> dict[str, str]:
    """The Sec-Fetch-Site header a browser would send (none for None)."""
    return {} if value is None else {"Sec-Fetch-Site": value}


class _Finder(html.parser.HTMLParser):
    """Collects the elements of a page matching a test (tag, attributes): their attributes
    and their text, with whitespace collapsed."""

    VOID = frozenset({"input", "br", "img", "meta", "link", "hr", "source", "wbr"})

    def __init__(self, wanted: dict[str, str]) -> None:
        super().__init__(convert_charrefs=True)
        self.wanted = wanted
        self.found: list[tuple[dict[str, str], list[str]]] = []
        self._open: list[tuple[int, list[str]]] = []  # (depth, text parts) of matches
        self._depth = 0

    # Elements whose text reads apart from the text before them (as innerText has it).
    APART = frozenset({"td", "th", "li", "br", "p", "div", "tr", "dt", "dd", "option"})

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.APART:
            self.handle_data(" ")
        values = {k: v or "" for k, v in attrs}
        values["<tag>"] = tag
        match = all(values.get(k) == v for k, v in self.wanted.items())
        if tag in self.VOID:
            if match:
                self.found.append((values, []))
            return
        self._depth += 1
        if match:
            parts: list[str] = []
            self.found.append((values, parts))
            self._open.append((self._depth, parts))

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        while self._open and self._open[-1][0] >= self._depth:
            self._open.pop()
        self._depth -= 1

    def handle_data(self, data: str) -> None:
        for _depth, parts in self._open:
            parts.append(data)


def elements(page: str, tag: str | None = None, **attrs: str) -> list[tuple[dict[str, str], str]]:
    """The elements of `page` with this tag and these attribute values (`class_` for
    class): each one's attributes and its text, whitespace collapsed."""
    wanted = {k.rstrip("_"): v for k, v in attrs.items()}
    if tag is not None:
        wanted["<tag>"] = tag
    finder = _Finder(wanted)
    finder.feed(page)
    return [(a, " ".join("".join(parts).split())) for a, parts in finder.found]


def text_of(page: str, element_id: str) -> str:
    """The text of the one element with this id (AssertionError if there is none)."""
    found = elements(page, id=element_id)
    assert len(found) == 1, f"{len(found)} elements with id {element_id!r}"
    return found[0][1]


def a_working_day(web: LiveWeb) -> None:
    """The standard archive on a working day: serve running with one of its two workers,
    a backfill that ended yesterday, the PBX answering, a report 3 minutes ago, a recording
    the PBX no longer has, one being retried, and a call that was not recorded."""
    archive, index, now = web.archive, web.archive.index, web.clock()
    # Before the standard archive's pending call, so that each add claims its own job.
    archive.add(
        start=T0 + timedelta(days=2, hours=4),
        call_from="1004",
        call_to="1001",
        state="missing",
    )
    archive.add(
        start=T0 + timedelta(days=2, hours=4, minutes=30),
        call_from="1005",
        call_to="1001",
        state="retrying",
    )
    archive.add_unrecorded_call(
        start=T0 + timedelta(days=2, hours=7), call_from="0612345678", call_to="1000"
    )
    serve = index.processes.register(
        node="archiver", kind="serve", hostname="pbx-archiver", pid=4242, workers=2,
        now=now - timedelta(hours=2),
    )  # fmt: skip
    assert index.processes.heartbeat(serve.id, now=now - timedelta(seconds=10), workers_alive=1)
    backfill = index.processes.register(
        node="archiver", kind="backfill", hostname="pbx-archiver", pid=4100, workers=2,
        now=now - timedelta(days=1),
    )  # fmt: skip
    index.processes.stop(backfill.id, now=now - timedelta(hours=23))
    health = {
        "state": "ok",
        "error": None,
        "last_success_at": (now - timedelta(minutes=2)).isoformat(),
        "updated_at": (now - timedelta(seconds=10)).isoformat(),
    }
    index.settings.set(SettingKey.PBX_HEALTH, json.dumps(health), now)
    index.settings.set(SettingKey.LAST_EVENT_AT, (now - timedelta(minutes=3)).isoformat(), now)
