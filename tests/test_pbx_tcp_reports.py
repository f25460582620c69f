"""`tcp_reports` against the simulator's TCP report port (API v2.0.0, "Report Method =
TCP"), over real sockets on 127.0.0.1: every framing and login answer the simulator can be
switched to, refusals, drops, junk, TLS; and the HTTP path where the switch is off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from callvault.pbx import (
    Event,
    EventFormat,
    EventsResumed,
    LoginFailed,
    LoginLockedOut,
    NewCdrEvent,
    TlsOptions,
    tcp_reports,
)
from callvault.pbx._tcp_reports import _Framer
from callvault.simulator import Simulator
from callvault.simulator._tcp import FRAMINGS, JUNK_FRAMES
from support.sim_helpers import (
    PASSWORD,
    Receiver,
    make_config,
    md5,
    running_receiver,
    trusting_context,
)

FAST = {"backoff_base": 0.01, "backoff_max": 0.05}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from running_receiver()


@contextlib.contextmanager
def tcp_pbx(**changes: Any) -> Iterator[Simulator]:
    config = make_config(report_transport="tcp", tls=False, **changes)
    with Simulator(config) as sim:
        yield sim


class Stream:
    """`tcp_reports` consumed by a task into a queue, so a test can wait for each item."""

    def __init__(self, sim: Simulator, *, password: str = PASSWORD, **options: Any) -> None:
        self.items: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self._iterator: AsyncIterator[Event] = tcp_reports(
            "127.0.0.1", sim.tcp_report_port, "api", password, **{**FAST, **options}
        )
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self._iterator:
                await self.items.put(event)
        except Exception as exc:
            await self.items.put(exc)

    async def next(self, timeout: float = 5.0) -> Event:
        item = await asyncio.wait_for(self.items.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            await aclose()


@contextlib.asynccontextmanager
async def streaming(sim: Simulator, **options: Any) -> AsyncIterator[Stream]:
    stream = Stream(sim, **options)
    try:
        yield stream
    finally:
        await stream.close()


async def connected(sim: Simulator, count: int = 1) -> None:
    assert await asyncio.to_thread(sim.wait_tcp_connections, count, 10.0)


async def next_cdr(stream: Stream) -> NewCdrEvent:
    event = await stream.next()
    assert isinstance(event, NewCdrEvent), event
    return event


@pytest.mark.parametrize("answer", ["ami", "json", "silent"])
@pytest.mark.parametrize("framing", list(FRAMINGS))
async def test_reports_arrive_in_every_framing_and_answer_style(
    framing: str, answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="callvault")
    with tcp_pbx(tcp_framing=framing, tcp_login_answer=answer) as sim:
        async with streaming(sim, login_answer_wait=0.2) as stream:
            await connected(sim)
            first = sim.place_call(callfrom="1001", callto="1003")
            second = sim.place_call(callfrom="1002", callto="1004", status="NO ANSWER")
            got = [await next_cdr(stream), await next_cdr(stream)]
        assert [e.cdr.callid for e in got] == [first.callid, second.callid]
        assert got[0].cdr.recording == first.recording and got[0].format is EventFormat.V2_0_0
        assert got[0].fields["event"] == "NewCdr" and got[0].sn == sim.serial
        assert sim.wait_events_idle(5)
        assert sim.tcp_reports_sent == 2 and sim.tcp_login_count == 1
        [block] = sim.tcp_login_blocks
        assert block == {"action": "login", "username": "api", "secret": "***", "version": "2.0.0"}
    assert PASSWORD not in caplog.text


async def test_progress_reports_come_before_newcdr_in_order() -> None:
    with tcp_pbx(call_progress_reports=True, tcp_framing="concatenated") as sim:
        async with streaming(sim) as stream:
            await connected(sim)
            cdr = sim.place_call(callfrom="1001", callto="1003")
            names = []
            while not names or names[-1] != "NewCdr":
                names.append((await stream.next()).name)
    assert len(names) > 1 and names[-1] == "NewCdr", names
    assert "CallStatus" in names and cdr.callid


@pytest.mark.parametrize("answer", ["ami", "json"])
async def test_wrong_password_fails_at_once_without_retry(
    answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="callvault")
    wrong = "not-the-Passw0rd"
    with tcp_pbx(tcp_login_answer=answer) as sim:
        started = time.monotonic()
        with pytest.raises(LoginFailed) as caught:
            async for _event in tcp_reports(
                "127.0.0.1", sim.tcp_report_port, "api", wrong, backoff_base=5, backoff_max=5
            ):
                pass
        assert time.monotonic() - started < 3  # no backoff sleep: not a single retry
        assert sim.failed_login_count() == 1
        assert sim.tcp_login_count == 0 and len(sim.tcp_login_blocks) == 1
        assert caught.value.errno == "20003"
    assert wrong not in str(caught.value) and wrong not in repr(caught.value.args)
    assert wrong not in caplog.text


async def test_silent_pbx_refusal_is_taken_after_two_unanswered_closes() -> None:
    """A PBX that answers nothing and just closes on a wrong password: two closes in a row
    (not five: that would lock the IP out) end the stream with LoginFailed."""
    with tcp_pbx(tcp_login_answer="silent") as sim:
        with pytest.raises(LoginFailed):
            async for _event in tcp_reports(
                "127.0.0.1", sim.tcp_report_port, "api", "wrong-one", **FAST
            ):
                pass
        assert sim.failed_login_count() == 2


@pytest.mark.parametrize("answer", ["ami", "json"])
async def test_locked_out_ip_raises_login_locked_out(answer: str) -> None:
    with tcp_pbx(tcp_login_answer=answer) as sim:
        for _ in range(5):
            with contextlib.suppress(Exception):
                sim.state.tcp_login(ip="127.0.0.1", username="api", secret="wrong")
        with pytest.raises(LoginLockedOut):
            async for _event in tcp_reports("127.0.0.1", sim.tcp_report_port, "api", PASSWORD):
                pass
        assert sim.tcp_login_count == 0


@pytest.mark.parametrize("answer", ["ami", "json"])
async def test_drop_after_login_reconnects_and_says_events_resumed(answer: str) -> None:
    with tcp_pbx(tcp_login_answer=answer) as sim:
        sim.faults.tcp_drop_next = 1
        before = time.time()
        async with streaming(sim) as stream:
            resumed = await stream.next()
            assert isinstance(resumed, EventsResumed)
            assert before <= resumed.since <= time.time()
            assert resumed.fields == {"since": resumed.since}
            await connected(sim)
            cdr = sim.place_call()
            assert (await next_cdr(stream)).cdr.callid == cdr.callid
        assert sim.tcp_login_count == 2 and sim.failed_login_count() == 0


async def test_silent_pbx_one_drop_is_not_a_refusal() -> None:
    """Without an answer a drop right after the login looks like a refusal: one is retried
    (no EventsResumed: nothing had been received), only a second in a row would end it."""
    with tcp_pbx(tcp_login_answer="silent") as sim:
        sim.faults.tcp_drop_next = 1
        async with streaming(sim, login_answer_wait=0.1) as stream:
            await connected(sim)
            cdr = sim.place_call()
            assert (await next_cdr(stream)).cdr.callid == cdr.callid
        assert sim.tcp_login_count == 2 and sim.failed_login_count() == 0


async def test_close_after_reports_reconnects_and_later_events_arrive() -> None:
    with tcp_pbx(tcp_framing="blank-line") as sim:
        sim.faults.tcp_close_after_reports = 1
        async with streaming(sim) as stream:
            await connected(sim)
            before = time.time()
            first = sim.place_call()
            assert (await next_cdr(stream)).cdr.callid == first.callid
            resumed = await stream.next()  # the drop came after the report
            assert isinstance(resumed, EventsResumed)
            assert before <= resumed.since <= time.time()
            sim.faults.tcp_close_after_reports = 0
            await connected(sim)
            second = sim.place_call()
            assert (await next_cdr(stream)).cdr.callid == second.callid
        assert sim.tcp_login_count == 2


async def test_reports_while_nobody_is_connected_are_not_kept() -> None:
    with tcp_pbx() as sim:
        lost = sim.place_call()
        assert sim.wait_events_idle(5)
        assert sim.tcp_reports_dropped == 1
        async with streaming(sim) as stream:
            await connected(sim)
            kept = sim.place_call()
            event = await next_cdr(stream)
        assert event.cdr.callid == kept.callid != lost.callid


@pytest.mark.parametrize("framing", list(FRAMINGS))
async def test_junk_between_reports_is_logged_and_skipped(
    framing: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callvault.pbx")
    with tcp_pbx(tcp_framing=framing) as sim:
        sim.faults.tcp_junk_next = len(JUNK_FRAMES)
        async with streaming(sim) as stream:
            await connected(sim)
            calls = [sim.place_call(callfrom=f"10{i:02d}") for i in range(len(JUNK_FRAMES))]
            got = [await next_cdr(stream) for _ in calls]
        assert [e.cdr.callid for e in got] == [c.callid for c in calls]
        assert sim.faults.tcp_junk_next == 0
    assert "this is not a report" in caplog.text
    assert "Heartbeat" in caplog.text


async def test_reports_over_tls_with_a_pinned_certificate() -> None:
    with tcp_pbx(tcp_report_tls=True) as sim:
        assert sim.cert_sha256 is not None
        tls = TlsOptions(pin_sha256=sim.cert_sha256)
        async with streaming(sim, tls=tls) as stream:
            await connected(sim)
            cdr = sim.place_call()
            assert (await next_cdr(stream)).cdr.callid == cdr.callid


async def test_connection_refused_is_retried_until_the_port_opens() -> None:
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)
        if len(slept) >= 3:
            raise RuntimeError("enough")

    with pytest.raises(RuntimeError, match="enough"):
        async for _event in tcp_reports("127.0.0.1", 1, "api", PASSWORD, sleep=sleep):
            pass
    assert len(slept) == 3 and slept[0] <= slept[2]


def test_login_says_tcp_and_v2_reports_are_not_posted(receiver: Receiver) -> None:
    with tcp_pbx() as sim, httpx.Client() as client:
        body = {"username": "api", "password": md5(PASSWORD), "port": receiver.port}
        v2 = client.post(f"{sim.url}/api/v2.0.0/login", json={**body, "version": "2.0.0"})
        assert v2.json()["transport"] == "TCP"
        v1 = client.post(f"{sim.url}/api/v1.1.0/login", json={**body, "version": "1.0.2"})
        assert "transport" not in v1.json()
        sim.place_call()
        assert sim.wait_events_idle(5)
        assert receiver.wait_for(1)
        time.sleep(0.2)
        # Only the v1.1.0 session got it over HTTP (format 1.0.2: key "action").
        assert [r.json().get("action") for r in receiver.received] == ["NewCdr"]


def test_http_path_unchanged_when_the_switch_is_off(receiver: Receiver) -> None:
    with (
        Simulator(make_config()) as sim,
        httpx.Client(verify=trusting_context(sim)) as client,
    ):
        assert sim.tcp_report_port == 0
        body = {"username": "api", "password": md5(PASSWORD), "port": receiver.port}
        answer = client.post(f"{sim.url}/api/v2.0.0/login", json={**body, "version": "2.0.0"})
        assert answer.json()["transport"] == "HTTP"
        cdr = sim.place_call()
        assert receiver.wait_for(1)
        assert receiver.received[0].json()["event"] == "NewCdr"
        assert receiver.received[0].json()["callid"] == cdr.callid
        assert sim.tcp_reports_sent == 0 and sim.tcp_reports_dropped == 0


def test_unknown_switch_values_are_refused() -> None:
    for change in ({"report_transport": "udp"}, {"tcp_framing": "xml"}, {"tcp_login_answer": "x"}):
        with pytest.raises(ValueError):
            Simulator(make_config(**change))


# -- the framer alone, fed one byte at a time (the worst chunking) ------------------------------

REPORT_A = b'{"event":"NewCdr","callid":"1.1","status":"ANSWERED","sn":"1"}'
REPORT_B = b'{"event":"BYE","callid":"1.2","call":[{"ext":{"extid":"1001"}}],"sn":"1"}'


@pytest.mark.parametrize("delimiter", list(FRAMINGS.values()))
def test_framer_cuts_every_framing_with_junk_at_any_chunking(delimiter: bytes) -> None:
    stream = delimiter.join(
        [
            b"Asterisk Call Manager/1.1\r\n",
            b"Response: Success\r\nMessage: Authentication accepted\r\n\r\n",
            *JUNK_FRAMES[:1],
            REPORT_A,
            JUNK_FRAMES[1],
            REPORT_B,
            b"[1, 2]",
            b'{"broken": 1x}',
            REPORT_A,
            b"",
        ]
    )
    for chunk in (1, 7, len(stream)):
        framer = _Framer()
        items = []
        for at in range(0, len(stream), chunk):
            framer.feed(stream[at : at + chunk])
            while (item := framer.take()) is not None:
                items.append(item)
        while (item := framer.take(final=True)) is not None:
            items.append(item)
        reports = [i.text.encode() for i in items if i.kind == "report"]
        assert reports == [REPORT_A, REPORT_B, REPORT_A], (chunk, items)
        answers = [i for i in items if i.kind == "answer"]
        assert len(answers) == 1 and answers[0].accepted


def test_framer_reads_json_answers_and_refusals() -> None:
    framer = _Framer()
    framer.feed(b'{"status":"Failed","errno":"20003"}\r\n')
    item = framer.take()
    assert item is not None and item.kind == "answer" and item.refused and item.errno == "20003"
    framer.feed(b"Response: Error\r\nMessage: Authentication failed\r\n")
    assert framer.take() is None  # the block's empty line has not come yet
    item = framer.take(final=True)
    assert item is not None and item.refused and item.message == "Authentication failed"


def test_framer_keeps_duplicate_keys_for_the_legacy_parser() -> None:
    framer = _Framer()
    framer.feed(b'{"action":"BYE","ext":{"extid":"1"},"ext":{"extid":"2"}}\n')
    item = framer.take()
    assert item is not None and item.kind == "report" and item.text.count('"ext"') == 2
