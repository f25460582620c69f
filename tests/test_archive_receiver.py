"""The events receiver over real HTTP on 127.0.0.1: what it stores and what it refuses.

The archiver here points at a PBX address where nothing listens (port 1 on loopback), so
no download happens: these tests are about the receiver alone, with its index on both
engines. Every refusal is checked to have stored nothing in the index; a report that can
never be stored (impossible times, a field the index refuses) gets 400 and one log line,
never a 503 that the PBX would re-send for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn

from callvault.archive import (
    Archiver,
    ArchiverConfig,
    GroupCommitter,
    SourceAllowList,
    create_receiver_app,
    validate_cdr,
)
from callvault.index import Index, InvalidCallDetail, RecordResult, SettingKey, open_index
from callvault.pbx import CallDetail
from support.archive import wait_until

BERLIN = ZoneInfo("Europe/Berlin")


def _config(tmp_path: Path, db_url: str | None = None, **overrides: object) -> ArchiverConfig:
    values: dict[str, object] = {
        "pbx_url": "http://127.0.0.1:1",  # nothing listens: sessions fail, the receiver works
        "username": "api",
        "password": "not-used-here",
        "archive": tmp_path / "archive",
        "db_url": db_url,
        "events_host": "127.0.0.1",
        "events_port": 0,
        "timezone": BERLIN,
        "reconcile_at_start": False,
    }
    values.update(overrides)
    return ArchiverConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def archiver(tmp_path: Path, db_url: str) -> Iterator[Archiver]:
    with Archiver(_config(tmp_path, db_url)) as running:
        yield running


def _newcdr(callid: str, recording: str | None, *, key: str = "action") -> dict[str, str]:
    body = {
        key: "NewCdr",
        "callid": callid,
        "timestart": "2024-05-01 10:00:00",
        "callfrom": "1001",
        "callto": "+4915112345678",
        "callduraction": "20",
        "talkduraction": "15",
        "status": "ANSWERED",
        "type": "Outbound",
        "sn": "369351034049",
    }
    if recording is not None:
        body["recording"] = recording
    return body


def _recordings(archiver: Archiver) -> int:
    with open_index(archiver.config.resolved_db_url()) as index:
        return sum(index.recordings.counts_by_state().values())


def test_newcdr_in_each_format_is_committed_before_200(archiver: Archiver) -> None:
    legacy = _newcdr("1714550400.1", "20240501100005-1714550400.1-1001-1003-Internal.wav")
    legacy["desttrunkname"] = "SIP1"
    v102 = _newcdr("1714550400.2", "20240501100005-1714550400.2-1001-+4915112345678-Outbound.wav")
    v2 = _newcdr("1714550400.3", "20240501100005-1714550400.3-1001-1003-Internal.wav", key="event")
    v2["dsttrcunkname"] = "SIP2"
    no_recording = _newcdr("1714550400.4", "")
    for body in (legacy, v102, v2, no_recording):
        answer = httpx.post(archiver.events_url, json=body, headers={"User-Agent": "WebAPI"})
        assert answer.status_code == 200, answer.text
        # 200 means committed: a fresh connection to the database already sees it.
        with open_index(archiver.config.resolved_db_url()) as index:
            name = body.get("recording")
            if name:
                row = index.recordings.by_name(name)
                assert row is not None and row.state == "pending" and row.callid == body["callid"]
    with open_index(archiver.config.resolved_db_url()) as index:
        assert index.recordings.counts_by_state()["pending"] == 3
        row = index.recordings.by_name(v2["recording"])
        assert row is not None and row.dst_trunk == "SIP2" and row.pbx_serial == "369351034049"
        assert index.settings.get(SettingKey.LAST_EVENT_AT) is not None


def test_resent_event_is_harmless(archiver: Archiver) -> None:
    body = _newcdr("1714550400.9", "20240501100005-1714550400.9-1001-1003-Internal.wav")
    for _ in range(5):
        assert httpx.post(archiver.events_url, json=body).status_code == 200
    assert _recordings(archiver) == 1


def test_concurrent_events_are_all_committed(archiver: Archiver) -> None:
    async def send_all() -> list[int]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as client:
            bodies = [
                _newcdr(f"1714551000.{n}", f"20240501101000-1714551000.{n}-1001-1003-Internal.wav")
                for n in range(200)
            ]
            answers = await asyncio.gather(
                *(client.post(archiver.events_url, json=body) for body in bodies)
            )
            return [answer.status_code for answer in answers]

    statuses = asyncio.run(send_all())
    assert statuses == [200] * 200
    assert _recordings(archiver) == 200
    assert archiver.committer is not None and archiver.committer.batches < 200


def test_idle_and_half_sent_connections_are_closed_and_store_nothing(
    tmp_path: Path, db_url: str
) -> None:
    """Someone (allowed or not) who connects and then sends nothing, or only part of a
    report, does not hold the receiver open: headers and body each have a time limit."""
    config = _config(
        tmp_path,
        db_url,
        events_allow=["10.0.0.0/8"],  # 127.0.0.1 may not post at all
        event_header_timeout_s=0.3,
        event_body_timeout_s=0.3,
    )
    with Archiver(config) as running:
        port = running.events_port
        assert port is not None
        for sent in (b"", b"POST /x HTTP/1.1\r\nHost: pbx\r\nContent-Len"):
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(sent)
                conn.settimeout(10)
                assert conn.recv(4096) == b""  # closed by the receiver, nothing answered
    config = _config(tmp_path, db_url, event_header_timeout_s=0.3, event_body_timeout_s=0.3)
    with Archiver(config) as running:
        port, path = running.events_port, running.secret_path
        assert port is not None and path is not None
        body = json.dumps(_newcdr("1714550400.7", "x-1714550400.7.wav")).encode()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            head = f"POST /{path} HTTP/1.1\r\nHost: pbx\r\nContent-Length: {len(body)}\r\n\r\n"
            conn.sendall(head.encode() + body[:10])  # the rest never comes
            conn.settimeout(10)
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert _recordings(running) == 0


def test_wrong_path_is_404_and_stores_nothing(archiver: Archiver) -> None:
    body = _newcdr("1714550401.1", "20240501100005-1714550401.1-1001-1003-Internal.wav")
    base = archiver.events_url.rsplit("/", 1)[0]
    secret = archiver.secret_path
    assert secret is not None
    for path in ("/", "/events", "/" + secret + "x", "/callvault-events-"):
        answer = httpx.post(base + path, json=body)
        assert answer.status_code == 404, path
        assert secret not in answer.text
    assert _recordings(archiver) == 0


def test_source_not_allowed_is_403_and_stores_nothing(tmp_path: Path, db_url: str) -> None:
    body = _newcdr("1714550402.1", "20240501100005-1714550402.1-1001-1003-Internal.wav")
    allow = ["203.0.113.13", "192.0.2.0/24"]
    with Archiver(_config(tmp_path, db_url, events_allow=allow)) as archiver:
        answer = httpx.post(archiver.events_url, json=body)
        assert answer.status_code == 403
        assert _recordings(archiver) == 0


def test_source_address_is_checked_not_just_the_allow_list(tmp_path: Path, db_url: str) -> None:
    """The default allow-list is the PBX's address (127.0.0.1 here); 127.0.0.2 is refused."""
    body = _newcdr("1714550403.1", "20240501100005-1714550403.1-1001-1003-Internal.wav")
    with Archiver(_config(tmp_path, db_url)) as archiver:
        other = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=other) as client:
            assert client.post(archiver.events_url, json=body).status_code == 403
        assert _recordings(archiver) == 0
        assert httpx.post(archiver.events_url, json=body).status_code == 200
        assert _recordings(archiver) == 1


def test_oversize_body_is_413_and_stores_nothing(archiver: Archiver) -> None:
    body = _newcdr("1714550404.1", "20240501100005-1714550404.1-1001-1003-Internal.wav")
    body["padding"] = "x" * (70 * 1024)
    answer = httpx.post(archiver.events_url, json=body)
    assert answer.status_code == 413
    assert "larger than" in answer.json()["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        yield json.dumps(body).encode()

    assert httpx.post(archiver.events_url, content=chunks()).status_code == 413
    assert _recordings(archiver) == 0


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"action":"NewCdr","callid":', "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"callid":"1.1"}', "no action or event"),
        (b'{"action":"NewCdr","recording":"a.wav"}', "callid"),
        (
            b'{"action":"NewCdr","callid":"1.2","timestart":"yesterday","recording":"a.wav"}',
            "timestart",
        ),
        (
            b'{"action":"NewCdr","callid":"1.3","recording":"' + b"a" * 300 + b'.wav"}',
            "longer than 255",
        ),
    ],
)
def test_malformed_report_is_400_with_the_reason(
    archiver: Archiver, content: bytes, reason: str
) -> None:
    answer = httpx.post(
        archiver.events_url, content=content, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400
    assert reason in answer.json()["message"]
    assert _recordings(archiver) == 0


def test_get_is_405_and_unknown_events_are_acknowledged(archiver: Archiver) -> None:
    assert httpx.get(archiver.events_url).status_code == 405
    answer = httpx.post(archiver.events_url, json={"action": "ExtensionStatus", "extension": "1"})
    assert answer.status_code == 200
    assert _recordings(archiver) == 0


def test_secret_path_is_kept_across_restarts(tmp_path: Path, db_url: str) -> None:
    config = _config(tmp_path, db_url)
    with Archiver(config) as first:
        path = first.secret_path
    assert path is not None and len(path) > 30
    with Archiver(_config(tmp_path, db_url)) as second:
        assert second.secret_path == path
    with open_index(config.resolved_db_url()) as index:
        assert index.settings.get(SettingKey.EVENTS_SECRET_PATH) == path
    other = tmp_path / "other"
    with Archiver(_config(other)) as third:  # another archive, another index
        assert third.secret_path != path


@pytest.mark.parametrize(
    ("timestart", "valid"),
    [
        ("2024-05-01 10:00:00", True),
        ("2024-02-29 23:59:59", True),  # a leap year
        ("2023-02-29 10:00:00", False),  # not a leap year
        ("2024-04-31 10:00:00", False),
        ("2024-13-01 10:00:00", False),
        ("2024-05-01 24:00:00", False),
        ("2024-05-01 10:60:00", False),
        ("2024-05-01 10:00:60", False),  # strptime's %S reads 60 and 61; datetime does not
        ("2024-05-01 10:00:61", False),
        ("0000-05-01 10:00:00", False),
        ("2024-05-01T10:00:00", False),
        ("2024-05-01 10:00:00\n", False),
        ("2024-05-01 10:00:00.5", False),
        ("2024-5-1 10:0:0", False),  # strptime would read it; not the PBX's form
        (" 2024-05-01 10:00:00", False),
        ("", True),  # no timestart at all: stored without one
        # Arabic-Indic digits: strptime would read them as 2024; the PBX writes ASCII.
        ("\u0662\u0660\u0662\u0664-05-01 10:00:00", False),
        # Real dates and times, but no call's: a broken clock.
        ("9999-12-31 23:59:59", False),
        ("0001-01-01 00:00:00", False),  # year 0 in UTC, from Berlin: not even a datetime
        ("1969-12-31 23:59:59", False),
        ("2000-01-01 00:00:00", True),  # a clock reset after a power cut: believed
    ],
)
def test_timestart_must_be_a_real_date_and_time_in_the_pbx_form(
    timestart: str, valid: bool
) -> None:
    problem = validate_cdr(CallDetail(callid="1.1", timestart=timestart), BERLIN)
    assert (problem is None) == valid, problem
    if not valid:
        assert problem is not None and "timestart" in problem


def test_allow_list_verdicts_stay_right_past_the_cache() -> None:
    allowed = SourceAllowList(["203.0.113.13", "192.0.2.0/24"])
    for _ in range(2):  # second pass: from the remembered verdicts
        assert allowed.allows("203.0.113.13")
        assert allowed.allows("::ffff:192.0.2.7")
        assert not allowed.allows("203.0.113.14")
        assert not allowed.allows("not-an-address")
        assert not allowed.allows(None)
    for n in range(3000):  # more distinct peers than are remembered
        host = f"198.51.{n // 256}.{n % 256}"
        assert not allowed.allows(host)
        assert allowed.allows(f"192.0.2.{n % 256}")
    assert allowed.allows("203.0.113.13") and not allowed.allows("203.0.113.14")


class _GatedRecorder:
    """Holds the first batch until released, so the next commits pile up into one batch.
    Stands in for the index: `calls.record` and `settings.set` are all the committer uses."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[list[str]] = []
        self.calls = self
        self.settings = self

    def record(
        self,
        cdrs: Sequence[CallDetail],
        *,
        source: str,
        tz: ZoneInfo,
        now: datetime,
        pbx_id: int = 0,
    ) -> list[RecordResult]:
        self.entered.set()
        self.release.wait(10)
        if any(cdr.callid == "bad" for cdr in cdrs):
            raise ValueError("a bad record")
        self.batches.append([cdr.callid for cdr in cdrs])
        return [RecordResult(int(cdr.callid.split(".")[1]), None, False) for cdr in cdrs]

    def set(self, key: SettingKey, value: str, now: datetime) -> None:
        pass


def test_group_commit_answers_every_waiter_of_a_batch_on_its_own_loop() -> None:
    """Requests from two event loops share a batch; each loop gets its own outcomes, a bad
    record fails alone, and nothing is answered before its transaction returned."""
    recorder = _GatedRecorder()
    committer = GroupCommitter(recorder, tz=ZoneInfo("UTC"))
    committer.start()
    outcomes: dict[str, list[object]] = {}
    queued: dict[str, threading.Event] = {}
    answered: dict[str, threading.Event] = {}
    any_answered = threading.Event()

    def loop_thread(name: str, callids: list[str]) -> None:
        async def main() -> list[object]:
            tasks = [asyncio.ensure_future(committer.commit(CallDetail(callid=c))) for c in callids]
            await asyncio.sleep(0)  # each task ran up to its wait: its record is queued
            queued[name].set()
            results: list[object] = list(await asyncio.gather(*tasks, return_exceptions=True))
            # Seen by the test thread the moment the answers arrive, not when the loop ends.
            answered[name].set()
            any_answered.set()
            return results

        outcomes[name] = asyncio.run(main())

    def start(name: str, callids: list[str]) -> threading.Thread:
        queued[name] = threading.Event()
        answered[name] = threading.Event()
        thread = threading.Thread(target=loop_thread, args=(name, callids))
        thread.start()
        assert queued[name].wait(10)
        return thread

    threads: list[threading.Thread] = []
    try:
        threads.append(start("first", ["1.0"]))
        assert recorder.entered.wait(10)  # the writer holds 1.0 in the gate
        threads += [start("a", ["1.1", "1.2", "bad"]), start("b", ["1.3", "1.4"])]
        # Nothing answered while the transaction is open: an early answer would set the
        # event within this wait (a lower bound only: a slow machine cannot break it).
        assert not any_answered.wait(0.3)
        recorder.release.set()
        for name in ("first", "a", "b"):
            assert answered[name].wait(10), f"{name} was never answered"
    finally:
        recorder.release.set()
        committer.stop()
        for thread in threads:
            thread.join(10)
    assert outcomes["first"] == [RecordResult(0, None, False)]
    assert outcomes["a"][:2] == [RecordResult(1, None, False), RecordResult(2, None, False)]
    assert isinstance(outcomes["a"][2], ValueError)
    assert outcomes["b"] == [RecordResult(3, None, False), RecordResult(4, None, False)]
    # 1.0 alone; then 1.1-1.4 and bad as one batch, which failed and was redone one by one.
    assert recorder.batches == [["1.0"], ["1.1"], ["1.2"], ["1.3"], ["1.4"]]
    assert committer.batches == 2


# -- reports that can never be stored: 400 with the reason, never 503 ----------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"timestart": "9999-12-31 23:59:59"}, "out of range"),
        # Year 1 in Berlin is year 0 in UTC: no datetime can hold it.
        ({"timestart": "0001-01-01 00:00:00"}, "out of range"),
        ({"callduraction": "99999999999999999999999:00"}, "callduration"),
        ({"talkduraction": "1e30"}, "talkduration"),
    ],
    ids=["year-9999", "year-1", "huge-duration", "huge-talk"],
)
def test_a_report_with_impossible_times_is_400_with_the_reason_and_one_log_line(
    archiver: Archiver,
    caplog: pytest.LogCaptureFixture,
    fields: dict[str, str],
    reason: str,
) -> None:
    body = _newcdr("1714550405.1", "20240501100005-1714550405.1-1001-1003-Internal.wav")
    body.update(fields)
    caplog.set_level(logging.INFO, logger="callvault.archive")
    answers = [httpx.post(archiver.events_url, json=body) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [400, 400]
    assert reason in answers[0].json()["message"]
    lines = [r for r in caplog.records if "1714550405.1" in r.getMessage()]
    assert len(lines) == 2 and all(r.levelno == logging.WARNING for r in lines)  # one each
    assert all(reason in r.getMessage() for r in lines)
    assert _recordings(archiver) == 0
    # A good report after it is stored as ever.
    good = _newcdr("1714550405.2", "20240501100005-1714550405.2-1001-1003-Internal.wav")
    assert httpx.post(archiver.events_url, json=good).status_code == 200
    assert _recordings(archiver) == 1


@contextlib.contextmanager
def _serve_asgi(application: Any) -> Iterator[str]:
    """`application` under a real uvicorn on 127.0.0.1 (a free port); yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(application, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started or not thread.is_alive(), timeout=30)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_receiver_answers_400_not_503_for_a_report_the_index_refuses(
    index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    """Should the index refuse a report the receiver let through (`InvalidCallDetail`),
    re-sending it cannot help: 400 and one log line, not a 503 that the PBX would re-send
    for ever. A failing database is still a 503."""
    secret = "callvault-events-test-secret-path"
    seen: list[str] = []

    async def commit(cdr: CallDetail) -> RecordResult:
        seen.append(cdr.callid)
        if cdr.callid.endswith(".1"):
            raise InvalidCallDetail("call detail field recording is longer than 255 characters")
        if cdr.callid.endswith(".2"):
            raise RuntimeError("database is locked")
        result = await asyncio.to_thread(
            index.calls.record, [cdr], source="event", tz=UTC, now=datetime.now(UTC)
        )
        return result[0]

    receiver = create_receiver_app(
        secret_path=secret, allowed=SourceAllowList(["127.0.0.1"]), commit=commit
    )

    def report(callid: str) -> dict[str, str]:
        return {
            "action": "NewCdr",
            "callid": callid,
            "timestart": "2024-05-01 10:00:00",
            "callfrom": "1001",
            "callto": "1003",
            "status": "ANSWERED",
            "type": "Internal",
            "recording": f"20240501100005-{callid}-1001-1003-Internal.wav",
        }

    caplog.set_level(logging.INFO, logger="callvault.archive")
    with _serve_asgi(receiver) as base:
        url = f"{base}/{secret}"
        refused = [httpx.post(url, json=report("1714550400.1")) for _ in range(3)]
        locked = httpx.post(url, json=report("1714550400.2"))
        stored = httpx.post(url, json=report("1714550400.3"))
    assert [answer.status_code for answer in refused] == [400, 400, 400]
    assert "refuses" in refused[0].json()["message"]
    assert locked.status_code == 503
    assert stored.status_code == 200
    assert seen.count("1714550400.1") == 3
    refusals = [r for r in caplog.records if "refused by the index" in r.getMessage()]
    assert len(refusals) == 3  # one line per report
    assert all(r.levelno == logging.WARNING for r in refusals)
    assert all(secret not in r.getMessage() for r in caplog.records)
    assert all("\n" not in r.getMessage() for r in refusals)
    assert sum(index.recordings.counts_by_state().values()) == 1


async def test_a_report_whose_sender_is_unknown_is_refused_in_plain_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server could not tell who sent it (the connection closed before it was read:
    seen under heavy load): refused, and the log says so instead of 'source None'."""

    async def commit(cdr: CallDetail) -> RecordResult:  # pragma: no cover - never called
        raise AssertionError("committed")

    receiver = create_receiver_app(
        secret_path="secret", allowed=SourceAllowList(["127.0.0.1"]), commit=commit
    )
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/secret", "headers": [], "client": None}
    with caplog.at_level(logging.WARNING, logger="callvault.archive"):
        await receiver(scope, receive, send)
    assert sent[0]["status"] == 403
    assert "its sender's address is unknown" in caplog.text and "None" not in caplog.text
