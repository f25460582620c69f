"""Simulator: NewCdr and BootUp pushed to a small receiver on 127.0.0.1, in each format."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from callvault.pbx import EventFormat
from callvault.simulator import Clock, Faults, PbxState, Simulator
from callvault.simulator._events import EventPusher
from callvault.simulator._state import EventTarget
from support.sim_helpers import Pbx, Receiver, make_config, running_pbx, running_receiver

V1_KEYS = [
    "action",
    "callid",
    "timestart",
    "callfrom",
    "callto",
    "callduraction",
    "talkduraction",
    "srctrunkname",
    "desttrunkname",
    "pincode",
    "status",
    "type",
    "recording",
    "didnumber",
    "agentringtime",
    "sn",
]


@pytest.fixture
def pbx() -> Iterator[Pbx]:
    yield from running_pbx()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from running_receiver()


def _pairs(body: bytes) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = json.loads(body, object_pairs_hook=lambda p: p)
    return pairs


def test_legacy_newcdr_omits_empty_fields(pbx: Pbx, receiver: Receiver) -> None:
    pbx.login(port=str(receiver.port), url="cdr/events")
    cdr = pbx.sim.place_call(callfrom="1001", callto="1003", talk_seconds=3, ring_seconds=2)
    assert receiver.wait_for(1)
    report = receiver.received[0]
    assert report.path == "/cdr/events"
    assert report.headers["User-Agent"] == "WebAPI"
    assert report.headers["Content-Type"] == "application/json"
    keys = [key for key, _value in _pairs(report.body)]
    assert keys[0] == "action" and len(keys) == len(set(keys))
    assert "srctrunkname" not in keys and "didnumber" not in keys
    data = report.json()
    assert data["action"] == "NewCdr" and data["desttrunkname"] == ""
    assert data["callid"] == cdr.callid and data["recording"] == cdr.recording
    assert (data["callduraction"], data["talkduraction"]) == ("5", "3")
    assert data["sn"] == pbx.sim.serial


def test_v1_0_2_newcdr_has_every_field(pbx: Pbx, receiver: Receiver) -> None:
    pbx.login(port=receiver.port, version="1.0.2")
    pbx.sim.place_call(callfrom="1001", callto="1003", status="NO ANSWER", recorded=False)
    assert receiver.wait_for(1)
    assert receiver.received[0].path == "/"
    pairs = _pairs(receiver.received[0].body)
    assert [key for key, _value in pairs] == V1_KEYS
    data = dict(pairs)
    assert data["status"] == "NO ANSWER" and data["recording"] == ""
    assert data["talkduraction"] == "0"
    assert all(isinstance(value, str) for value in data.values())


def test_v2_newcdr_uses_event_and_the_odd_trunk_spelling(pbx: Pbx, receiver: Receiver) -> None:
    pbx.login(api="v2.0.0", port=str(receiver.port), url="/v2", version="2.0.0")
    cdr = pbx.sim.place_call(
        callfrom="1001",
        callto="+4917012345678",
        type="Outbound",
        talk_seconds=7,
        ring_seconds=4,
        dsttrunkname="SIP-Provider",
    )
    assert receiver.wait_for(1)
    assert receiver.received[0].path == "/v2"
    pairs = _pairs(receiver.received[0].body)
    expected = ["event", *[k if k != "desttrunkname" else "dsttrcunkname" for k in V1_KEYS[1:]]]
    assert [key for key, _value in pairs] == expected
    data = dict(pairs)
    assert data["event"] == "NewCdr" and data["dsttrcunkname"] == "SIP-Provider"
    # callid "{epoch}.{seq}", timestart = local time of the epoch, name = answer time.
    epoch, seq = str(data["callid"]).split(".")
    assert seq.isdigit()
    berlin = ZoneInfo("Europe/Berlin")
    start = datetime.fromtimestamp(int(epoch), berlin)
    assert data["timestart"] == start.strftime("%Y-%m-%d %H:%M:%S") == cdr.timestart
    answered = datetime.fromtimestamp(int(epoch) + 4, berlin).strftime("%Y%m%d%H%M%S")
    assert data["recording"] == f"{answered}-{cdr.callid}-1001-+4917012345678-Outbound.wav"


def test_reports_are_resent_until_the_receiver_answers_200(pbx: Pbx, receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    pbx.login(port=receiver.port, version="1.0.2")
    pbx.sim.place_call()
    assert pbx.sim.wait_events_idle(5)
    assert len(receiver.received) == 3
    assert len({r.body for r in receiver.received}) == 1
    assert pbx.sim.events_delivered == 1


def test_resending_stops_after_the_configured_retries(pbx: Pbx, receiver: Receiver) -> None:
    receiver.statuses = [500] * 10
    pbx.login(port=receiver.port)
    pbx.sim.place_call()
    assert pbx.sim.wait_events_idle(5)
    assert len(receiver.received) == 4  # first try + event_max_retries (3)
    assert pbx.sim.events_delivered == 0


def test_urltag_one_makes_url_absolute(pbx: Pbx, receiver: Receiver) -> None:
    pbx.login(port="8260", url=f"127.0.0.1:{receiver.port}/report", urltag="1")
    pbx.sim.place_call()
    assert receiver.wait_for(1)
    assert receiver.received[0].path == "/report"


def test_heartbeat_moves_the_report_target(pbx: Pbx, receiver: Receiver) -> None:
    other = Receiver()
    try:
        token = pbx.login(port=receiver.port)
        pbx.ok(
            "heartbeat",
            token=token,
            body={
                "ipaddr": "127.0.0.1",
                "port": other.port,
                "url": "hb",
                "urlflag": "0",
                "version": "1.0.2",
            },
        )
        pbx.sim.place_call()
        assert other.wait_for(1)
        assert other.received[0].path == "/hb"
        assert other.received[0].json()["action"] == "NewCdr"
        assert receiver.received == []
    finally:
        other.close()


@pytest.mark.parametrize(
    ("version", "key"), [(None, "action"), ("1.0.2", "action"), ("2.0.0", "event")]
)
def test_reboot_pushes_bootup_and_forgets_tokens(
    pbx: Pbx, receiver: Receiver, version: str | None, key: str
) -> None:
    extra = {"version": version} if version else {}
    api = "v2.0.0" if version == "2.0.0" else "v1.1.0"  # the versions that offer the format
    token = pbx.login(api=api, port=receiver.port, **extra)
    pbx.sim.reboot()
    assert receiver.wait_for(1)
    assert json.loads(receiver.received[0].body) == {key: "BootUp", "sn": pbx.sim.serial}
    assert pbx.errno("logout", token=token) == "20004"
    pbx.sim.place_call()  # nobody is logged in any more
    assert pbx.sim.wait_events_idle(5)
    assert len(receiver.received) == 1


def test_a_delivered_report_refreshes_the_token(pbx: Pbx, receiver: Receiver) -> None:
    token = pbx.login(port=receiver.port)
    pbx.sim.clock.advance(1700)
    pbx.sim.place_call()
    assert pbx.sim.wait_events_idle(5) and pbx.sim.events_delivered == 1
    pbx.sim.clock.advance(1700)  # 3400 s after the last request, 1700 s after the report
    assert pbx.ok("logout", token=token)


def test_no_reports_once_the_token_expired(pbx: Pbx, receiver: Receiver) -> None:
    pbx.login(port=receiver.port)
    pbx.sim.clock.advance(1801)
    pbx.sim.place_call()
    assert pbx.sim.wait_events_idle(5)
    assert receiver.received == []


def test_port_zero_asks_for_no_reports(pbx: Pbx) -> None:
    pbx.login(port="0")
    pbx.sim.place_call()
    assert pbx.sim.wait_events_idle(5)
    assert pbx.sim.events_delivered == 0


def test_revoke_every_seconds_runs_on_the_simulator_clock(pbx: Pbx) -> None:
    token = pbx.login()
    pbx.sim.faults.revoke_every_seconds = 60
    assert pbx.sim.wait_ticks(2)  # the interval counts from when the switch is seen
    assert pbx.ok("logout", token=pbx.login())
    pbx.sim.clock.advance(61)
    assert pbx.sim.wait_ticks(2)
    assert pbx.errno("logout", token=token) == "20004"


def test_reboot_every_seconds_sends_bootup(pbx: Pbx, receiver: Receiver) -> None:
    pbx.login(port=receiver.port)
    pbx.sim.faults.reboot_every_seconds = 300
    assert pbx.sim.wait_ticks(2)  # the interval counts from when the switch is seen
    pbx.sim.clock.advance(301)
    assert receiver.wait_for(1)
    assert receiver.received[0].json()["action"] == "BootUp"


def test_background_calls_make_a_mix_of_records(receiver: Receiver) -> None:
    with Simulator(make_config(calls_per_minute=3000.0, seed=3)) as sim:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(sim.state.cdrs()) < 12:
            time.sleep(0.05)
        cdrs = sim.state.cdrs()
        assert len(cdrs) >= 12
        assert {"Internal", "Inbound", "Outbound"} <= {cdr.type for cdr in cdrs}
        for cdr in cdrs:
            assert re.fullmatch(r"\d+\.\d+", cdr.callid)
            if cdr.status == "ANSWERED":
                assert cdr.recording is not None
                assert sim.recording_path(cdr.recording).read_bytes()[:4] == b"RIFF"
            else:
                assert cdr.recording is None
        assert any(cdr.callfrom.startswith("015") for cdr in cdrs)
        assert all(cdr.callfrom.isdigit() and cdr.callto.isdigit() for cdr in cdrs)


@pytest.mark.parametrize("version", [None, "1.0.2", "2.0.0"])
def test_bye_names_every_party(pbx: Pbx, receiver: Receiver, version: str | None) -> None:
    extra = {"version": version} if version else {}
    api = "v2.0.0" if version == "2.0.0" else "v1.1.0"  # the versions that offer the format
    pbx.login(api=api, port=receiver.port, **extra)
    pbx.sim.push_call_released("1547375817.78", ["1006", "1005"])
    assert receiver.wait_for(1)
    pairs = _pairs(receiver.received[0].body)
    if version is None:  # legacy: the same key twice
        assert pairs == [
            ("action", "BYE"),
            ("callid", "1547375817.78"),
            ("ext", [("extid", "1006")]),
            ("ext", [("extid", "1005")]),
            ("sn", pbx.sim.serial),
        ]
    else:
        data = json.loads(receiver.received[0].body)
        key = "event" if version == "2.0.0" else "action"
        assert data == {
            key: "BYE",
            "callid": "1547375817.78",
            "sn": pbx.sim.serial,
            "call": [{"ext": {"extid": "1006"}}, {"ext": {"extid": "1005"}}],
        }


class OnceReader:
    """An app server that reads each connection ONCE (one recv), as some peers do, answers
    200 whatever it got, and keeps what that one read returned."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self._lock = threading.Condition()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _address = self._server.accept()
            except OSError:  # closed
                return
            with conn:
                data = conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            with self._lock:
                self.reads.append(data)
                self._lock.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self.reads) >= count, timeout)

    def close(self) -> None:
        self._server.close()


def test_a_receiver_that_reads_once_gets_every_whole_report(pbx: Pbx) -> None:
    """Request line, headers and body go out in one write: 13 of 18 reports reached such a
    peer without their body while the simulator pushed with an HTTP client library."""
    once = OnceReader()
    try:
        pbx.login(port=once.port, url="events", version="1.0.2")
        cdrs = [pbx.sim.place_call(callfrom=str(1000 + n), callto="1099") for n in range(20)]
        assert pbx.sim.wait_events_idle(10)
        assert once.wait_for(20)
    finally:
        once.close()
    callids = []
    for data in once.reads:
        head, blank, body = data.partition(b"\r\n\r\n")
        assert blank, data
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0] == "POST /events HTTP/1.1"
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert headers["user-agent"] == "WebAPI"
        assert headers["connection"] == "close"
        assert headers["host"] == f"127.0.0.1:{once.port}"
        assert int(headers["content-length"]) == len(body)
        report = json.loads(body)
        assert report["action"] == "NewCdr"
        callids.append(report["callid"])
    assert sorted(callids) == sorted(cdr.callid for cdr in cdrs)
    assert pbx.sim.events_delivered == 20


def test_a_report_is_sent_again_after_no_answer_at_all(pbx: Pbx) -> None:
    """A connection closed without any answer counts like a non-200 answer: send again."""
    silent = socket.create_server(("127.0.0.1", 0))
    attempts: list[bytes] = []

    def hang_up_twice_then_answer() -> None:
        for n in range(3):
            conn, _address = silent.accept()
            with conn:
                attempts.append(conn.recv(65536))
                if n == 2:
                    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")

    thread = threading.Thread(target=hang_up_twice_then_answer, daemon=True)
    thread.start()
    try:
        pbx.login(port=silent.getsockname()[1])
        pbx.sim.place_call()
        assert pbx.sim.wait_events_idle(10)
    finally:
        silent.close()
    thread.join(5)
    assert len(attempts) == 3 and len(set(attempts)) == 1
    assert pbx.sim.events_delivered == 1


async def test_closing_the_pusher_ends_every_delivery_and_refuses_later_reports(
    tmp_path: Path,
) -> None:
    """The simulator closes its pusher before its loop stops. Deliveries still waiting for
    an answer must be over by then, and a report queued later (a call placed by a worker
    thread while the simulator stops) must not start: a delivery left behind was torn
    down by the garbage collector after the loop had gone, with a traceback."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    state = PbxState(
        username="api",
        password="pw",
        serial="1",
        clock=Clock(),
        faults=Faults(),
        recordings_dir=tmp_path,
    )
    loop = asyncio.get_running_loop()
    pusher = EventPusher(state, loop, retry_interval=0.01, max_retries=0)
    target = EventTarget(
        url=f"http://127.0.0.1:{silent.getsockname()[1]}/", format=EventFormat.V1_0_2
    )
    before = asyncio.all_tasks()
    try:
        pusher.push(target, b'{"action":"BootUp","sn":"1"}', None)
        conn, _address = await asyncio.to_thread(silent.accept)  # the delivery is under way
        with conn:
            assert len(asyncio.all_tasks() - before) == 1
            await pusher.aclose()
            assert asyncio.all_tasks() - before == set()
            pusher.push(target, b'{"action":"BootUp","sn":"1"}', None)
            await asyncio.sleep(0)
            assert asyncio.all_tasks() - before == set()
            assert pusher.pending == 0 and state.events_delivered == 0
    finally:
        silent.close()
