"""The P-Series (OpenAPI) simulator over real TLS sockets: tokens, downloads, lists, events.

Every test talks to a running :class:`PSeriesSimulator` on 127.0.0.1 with httpx (HTTPS,
trusting the simulator's own certificate) or the ``websockets`` library (WSS).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from callvault.simulator import (
    PSeriesConfig,
    PSeriesFaults,
    PSeriesSimulator,
    Webhook,
)

UA = {"User-Agent": "OpenAPI"}
API = "/openapi/v1.0"


@contextmanager
def running(**changes: Any) -> Iterator[PSeriesSimulator]:
    config = PSeriesConfig(seed=3, **changes)
    with PSeriesSimulator(config) as sim:
        yield sim


def tls(sim: PSeriesSimulator) -> ssl.SSLContext:
    assert sim.ca_file is not None
    return ssl.create_default_context(cafile=str(sim.ca_file))


def client(sim: PSeriesSimulator, **kwargs: Any) -> httpx.Client:
    headers = kwargs.pop("headers", UA)
    return httpx.Client(base_url=sim.url, verify=tls(sim), headers=headers, **kwargs)


def get_token(http: httpx.Client, sim: PSeriesSimulator, secret: str | None = None) -> Any:
    body = {"username": sim.client_id, "password": sim.client_secret if secret is None else secret}
    response = http.post(f"{API}/get_token", json=body)
    assert response.status_code == 200
    return response.json()


def token(http: httpx.Client, sim: PSeriesSimulator) -> str:
    answer = get_token(http, sim)
    assert answer["errcode"] == 0, answer
    value = answer["access_token"]
    assert isinstance(value, str)
    return value


def api(http: httpx.Client, endpoint: str, access: str, **params: Any) -> Any:
    response = http.get(f"{API}/{endpoint}", params={**params, "access_token": access})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    return response.json()


def ws_url(sim: PSeriesSimulator, access: str) -> str:
    return sim.url.replace("https://", "wss://") + f"{API}/subscribe?access_token={access}"


# -- tokens -------------------------------------------------------------------------------------


def test_get_token_refresh_rotates_both_and_del_token_revokes() -> None:
    with running() as sim, client(sim) as http:
        first = get_token(http, sim)
        assert first["errcode"] == 0 and first["errmsg"] == "SUCCESS"
        assert first["access_token_expire_time"] == 1800
        assert first["refresh_token_expire_time"] == 86400
        assert len(first["access_token"]) == 32 and len(first["refresh_token"]) == 32

        refreshed = http.post(
            f"{API}/refresh_token", json={"refresh_token": first["refresh_token"]}
        ).json()
        assert refreshed["errcode"] == 0
        assert refreshed["access_token"] != first["access_token"]
        assert refreshed["refresh_token"] != first["refresh_token"]
        # The used refresh token is dead; the old access token lives on (default switch).
        again = http.post(f"{API}/refresh_token", json={"refresh_token": first["refresh_token"]})
        assert again.json()["errcode"] == 10004
        assert api(http, "recording/list", first["access_token"])["errcode"] == 0
        assert sim.live_tokens() == 2

        gone = http.get(f"{API}/del_token", params={"access_token": first["access_token"]})
        assert gone.json() == {"errcode": 0, "errmsg": "SUCCESS"}
        assert api(http, "recording/list", first["access_token"])["errcode"] == 10004
        assert sim.live_tokens() == 1
        assert sim.get_token_count == 1


def test_refresh_can_invalidate_the_old_access_token() -> None:
    with running(refresh_invalidates_old_access=True) as sim, client(sim) as http:
        first = get_token(http, sim)
        http.post(f"{API}/refresh_token", json={"refresh_token": first["refresh_token"]})
        assert api(http, "recording/list", first["access_token"])["errcode"] == 10004


def test_cap8_budget_answers_60002_until_a_token_is_freed_or_expires() -> None:
    with running() as sim, client(sim) as http:
        tokens = [token(http, sim) for _ in range(8)]
        ninth = get_token(http, sim)
        assert ninth["errcode"] == 60002 and ninth["errmsg"] == "MAX LIMITATION EXCEEDED"
        http.get(f"{API}/del_token", params={"access_token": tokens[0]})
        assert get_token(http, sim)["errcode"] == 0
        assert get_token(http, sim)["errcode"] == 60002
        sim.clock.advance(1801)  # every access token aged out
        assert sim.live_tokens() == 0
        assert api(http, "cdr/list", tokens[1])["errcode"] == 10004
        assert get_token(http, sim)["errcode"] == 0


def test_invalidate_previous_policy_kills_the_older_token() -> None:
    with running(token_policy="invalidate_previous") as sim, client(sim) as http:
        old = token(http, sim)
        tokens = [token(http, sim) for _ in range(9)]  # no cap under this policy
        assert api(http, "recording/list", old)["errcode"] == 10004
        assert api(http, "recording/list", tokens[-1])["errcode"] == 0
        assert sim.live_tokens() == 1


def test_five_failed_logins_block_the_ip_until_unblocked() -> None:
    with running() as sim, client(sim) as http:
        for _ in range(5):
            bad = get_token(http, sim, secret="wrong")
            assert bad == {
                "errcode": -1,
                "errmsg": "FAILURE",
                "invalid_param_list": [{"field": "username or password", "value": "error"}],
            }
        blocked = get_token(http, sim)  # even the right secret
        assert blocked["errcode"] == 70004
        sim.unblock("127.0.0.1")
        assert get_token(http, sim)["errcode"] == 0


def test_a_timed_lockout_ends_on_the_simulator_clock() -> None:
    with running(lockout_s=600.0) as sim, client(sim) as http:
        for _ in range(5):
            get_token(http, sim, secret="wrong")
        assert get_token(http, sim)["errcode"] == 70004
        sim.clock.advance(601)
        assert get_token(http, sim)["errcode"] == 0


def test_transport_rules_user_agent_bearer_unknown_paths() -> None:
    with running() as sim, client(sim) as http:
        access = token(http, sim)
        no_ua = http.get(
            f"{API}/recording/list", params={"access_token": access}, headers={"User-Agent": ""}
        )
        assert no_ua.status_code == 200 and no_ua.json()["errcode"] == 40002
        bearer = http.get(f"{API}/recording/list", headers={"Authorization": f"Bearer {access}"})
        assert bearer.status_code == 200 and bearer.json()["errcode"] == 10004
        unknown = http.get(f"{API}/nothing/here", params={"access_token": access})
        assert unknown.json() == {"errcode": 10001, "errmsg": "INTERFACE NOT EXISTED"}
        version = http.get("/openapi/v9.9/recording/list", params={"access_token": access})
        assert version.json()["errcode"] == 10003
        assert "access_token" not in repr(sim.request_log) and access not in repr(sim.request_log)


def test_ip_allow_list_and_permissions() -> None:
    with running(ip_allow=("10.1.2.3",)) as sim, client(sim) as http:
        assert get_token(http, sim)["errcode"] == 70087
    with running(permissions=frozenset({"cdr"})) as sim, client(sim) as http:
        access = token(http, sim)
        assert api(http, "recording/list", access)["errcode"] == 10005
        assert api(http, "cdr/list", access)["errcode"] == 0


# -- recordings ---------------------------------------------------------------------------------


def test_download_by_id_and_by_file_byte_exact() -> None:
    with running() as sim, client(sim) as http:
        access = token(http, sim)
        call = sim.place_call(call_from="2005", call_to="2002", talk_seconds=2)
        assert call.file is not None and call.id > 0
        assert call.file.endswith(f"-{call.call_id}-2005-2002-Internal.wav")
        for params in ({"id": call.id}, {"file": call.file}):
            answer = api(http, "recording/download", access, **params)
            assert answer["errcode"] == 0 and answer["file"] == call.file
            url = answer["download_resource_url"]
            assert url.startswith("/api/download/Recording-83.") and url.endswith(".wav")
            got = http.get(url, params={"access_token": access})
            assert got.status_code == 200
            assert got.headers["content-type"] == "audio/wav"
            assert int(got.headers["content-length"]) == len(got.content)
            assert got.content[:4] == b"RIFF"
            assert hashlib.sha256(got.content).hexdigest() == sim.recording_sha256(call.file)
        bad = http.get(url, params={"access_token": "nope"})
        assert bad.status_code == 200 and bad.json()["errcode"] == 10004

        missing = api(http, "recording/download", access)
        assert missing["errcode"] == 40002 and missing["invalid_param_list"]
        assert api(http, "recording/download", access, id=999)["errcode"] == 60001
        assert api(http, "recording/download", access, file="x.wav")["errcode"] == 60001


def test_download_url_expires_after_30_minutes_and_needs_a_live_token() -> None:
    with running() as sim, client(sim) as http:
        access = token(http, sim)
        call = sim.place_call()
        url = api(http, "recording/download", access, id=call.id)["download_resource_url"]
        sim.clock.advance(1700)
        assert http.get(url, params={"access_token": access}).status_code == 200
        sim.clock.advance(200)  # URL and token both past 30 minutes
        stale = http.get(url, params={"access_token": access})
        assert stale.status_code == 200 and stale.json()["errcode"] == 10004
        fresh = token(http, sim)
        gone = http.get(url, params={"access_token": fresh})
        assert gone.status_code == 404 and gone.headers["content-type"].startswith("text/html")


def test_mp3_allows_one_download_at_a_time() -> None:
    with running(download_format="mp3") as sim, client(sim) as http:
        access = token(http, sim)
        big = sim.place_call(size_bytes=64 << 20)  # more than the socket buffers hold
        small = sim.place_call(talk_seconds=1)
        assert big.file is not None and big.file.endswith(".mp3")
        first = api(http, "recording/download", access, id=big.id)["download_resource_url"]
        second = api(http, "recording/download", access, id=small.id)["download_resource_url"]
        with client(sim) as other, http.stream("GET", first, params={"access_token": access}) as r:
            assert r.headers["content-type"] == "audio/mpeg"
            head = next(r.iter_bytes())
            assert head[:3] == b"ID3"
            busy = other.get(second, params={"access_token": access})
            assert busy.json()["errcode"] == 70082
            assert api(other, "recording/download", access, id=small.id)["errcode"] == 70082
        # The abandoned download frees the slot once the PBX notices the closed connection.
        deadline = time.monotonic() + 5
        after = http.get(second, params={"access_token": access})
        while after.headers["content-type"] == "application/json" and time.monotonic() < deadline:
            assert after.json()["errcode"] == 70082
            time.sleep(0.05)
            after = http.get(second, params={"access_token": access})
        assert after.status_code == 200 and after.headers["content-type"] == "audio/mpeg"
        assert b"\xff\xfb" in after.content
        assert hashlib.sha256(after.content).hexdigest() == sim.recording_sha256(small.file or "")


def test_recording_list_and_search_paging_sorting_filters() -> None:
    with running(display_format="DD/MM/YYYY HH:mm:ss") as sim, client(sim) as http:
        access = token(http, sim)
        calls = [sim.place_call(call_from=f"10{n:02d}", talk_seconds=1) for n in range(5)]
        sim.place_call(status="NO ANSWER")  # not recorded
        page = api(http, "recording/list", access, page=2, page_size=2, sort_by="id")
        assert page["total_number"] == 5
        assert [row["id"] for row in page["data"]] == [calls[2].id, calls[3].id]
        row = page["data"][0]
        assert row["file"] == calls[2].file and row["uid"] == calls[2].uid
        assert row["call_from"] == "1002" and row["call_type"] == "Internal"
        assert row["size"] > 44 and row["duration"] == 3
        assert row["time"] == sim.state.local(calls[2].timestamp).strftime("%d/%m/%Y %H:%M:%S")
        desc = api(http, "recording/list", access, order_by="desc", page_size=1)
        assert [r["id"] for r in desc["data"]] == [calls[-1].id]

        ids = api(http, "recording/search", access, ids=f"{calls[0].id},{calls[4].id}")
        assert sorted(r["id"] for r in ids["data"]) == [calls[0].id, calls[4].id]
        caller = api(http, "recording/search", access, caller="1003")
        assert [r["id"] for r in caller["data"]] == [calls[3].id]
        start = str(calls[0].timestamp)
        window = api(http, "recording/search", access, start_time=start, end_time=start)
        assert window["total_number"] >= 1
        later = api(http, "recording/search", access, start_time=str(calls[-1].timestamp + 60))
        assert later["total_number"] == 0
        assert api(http, "recording/list", access, page_size=0)["errcode"] == 40002


def test_cdr_list_and_search_by_display_format_or_unix_seconds() -> None:
    with running(display_format="DD/MM/YYYY hh:mm:ss A") as sim, client(sim) as http:
        access = token(http, sim)
        answered = sim.place_call(call_from="2001", call_to="2002")
        missed = sim.place_call(call_from="2003", call_to="2002", status="NO ANSWER")
        listed = api(http, "cdr/list", access)
        assert listed["total_number"] == 2
        row = listed["data"][0]
        assert row["id"] == answered.cdr_id and row["timestamp"] == answered.timestamp
        assert row["disposition"] == "ANSWERED" and row["record_file"] == answered.file
        assert row["talk_duration"] == 3 and row["ring_duration"] == 2
        assert row["time"].endswith(("AM", "PM"))

        local = sim.state.local(answered.timestamp - 60)
        start = local.strftime("%d/%m/%Y %I:%M:%S %p")
        found = api(http, "cdr/search", access, start_time=start, status="NO ANSWER")
        assert [r["id"] for r in found["data"]] == [missed.cdr_id]
        wrong_format = local.strftime("%Y-%m-%d %H:%M:%S")
        mismatch = api(http, "cdr/search", access, start_time=wrong_format)
        assert mismatch["errcode"] == 0 and mismatch["total_number"] == 0 and mismatch["data"] == []
        unix = api(http, "cdr/search", access, start_time=str(answered.timestamp - 60))
        assert unix["total_number"] == 2
        by_caller = api(http, "cdr/search", access, call_from="2001")
        assert [r["id"] for r in by_caller["data"]] == [answered.cdr_id]
        paged = api(http, "cdr/list", access, page=2, page_size=1, sort_by="time")
        assert [r["id"] for r in paged["data"]] == [missed.cdr_id]
    with running(unix_time_filters=False) as sim, client(sim) as http:
        access = token(http, sim)
        call = sim.place_call()
        old = api(http, "cdr/search", access, start_time=str(call.timestamp - 60))
        assert old["total_number"] == 0


# -- events -------------------------------------------------------------------------------------


def test_websocket_subscribe_heartbeat_event_and_idle_close() -> None:
    with running(ws_idle_timeout_s=1.0) as sim, client(sim) as http:
        access = token(http, sim)

        async def scenario() -> None:
            with pytest.raises(InvalidStatus):
                async with websockets.connect(ws_url(sim, "bad"), ssl=tls(sim)):
                    pass
            async with websockets.connect(ws_url(sim, access), ssl=tls(sim)) as ws:
                await ws.send(json.dumps({"topic_list": [30012]}))
                assert json.loads(await ws.recv()) == {"errcode": 0, "errmsg": "SUCCESS"}
                await ws.send("heartbeat")
                assert await ws.recv() == "heartbeat response"
                assert sim.ws_connections == 1
                call = await asyncio.to_thread(sim.place_call, call_from="2005", call_to="2002")
                event = json.loads(await ws.recv())  # 30011 not subscribed: 30012 comes first
                assert event["type"] == 30012 and event["sn"] == sim.serial
                assert isinstance(event["msg"], str)
                msg = json.loads(event["msg"])
                assert msg["call_id"] == call.call_id and msg["recording"] == call.file
                assert msg["time_start"] == call.time_start
                assert msg["call_duration"] == 5 and msg["talk_duration"] == 3
                assert msg["src_trunk_name"] == " " and msg["status"] == "ANSWERED"
                assert msg["type"] == "Internal" and msg["uid"] == call.uid
                # Silence: the PBX closes the socket after the idle timeout.
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)

        asyncio.run(scenario())
        assert sim.ws_connections == 0


def test_restart_closes_websockets_and_forgets_tokens() -> None:
    with running(msg_as_object=True) as sim, client(sim) as http:
        access = token(http, sim)

        async def scenario() -> None:
            async with websockets.connect(ws_url(sim, access), ssl=tls(sim)) as ws:
                await ws.send(json.dumps({"topic_list": [30011, 30012]}))
                await ws.recv()
                await asyncio.to_thread(sim.place_call)
                kinds = [json.loads(await ws.recv()) for _ in range(4)]
                assert [k["type"] for k in kinds] == [30011, 30011, 30011, 30012]
                assert isinstance(kinds[-1]["msg"], dict)  # msg_as_object
                await asyncio.to_thread(sim.restart)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)

        asyncio.run(scenario())
        assert api(http, "recording/list", access)["errcode"] == 10004


def test_async_download_answers_processing_then_30033_with_the_url() -> None:
    with running(async_downloads=True, async_delay_s=0.05) as sim, client(sim) as http:
        access = token(http, sim)
        call = sim.place_call()

        async def scenario() -> dict[str, Any]:
            async with websockets.connect(ws_url(sim, access), ssl=tls(sim)) as ws:
                await ws.send(json.dumps({"topic_list": [30033]}))
                await ws.recv()
                answer = await asyncio.to_thread(
                    api, http, "recording/download", access, id=call.id
                )
                assert answer == {"errcode": 2, "errmsg": "PROCESSING", "file": call.file}
                event = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert event["type"] == 30033
                msg = event["msg"]
                assert isinstance(msg, dict)
                return msg

        msg = asyncio.run(scenario())
        assert msg["result"] == "success" and msg["file"] == call.file
        url = msg["download_resource_url"]
        assert url.startswith("/api/downloadattachment/")
        got = http.get(url, params={"access_token": access})
        assert hashlib.sha256(got.content).hexdigest() == sim.recording_sha256(call.file or "")


class _Receiver(BaseHTTPRequestHandler):
    """A webhook receiver: answers 500 to the first request, 200 afterwards."""

    received: list[tuple[str, bytes, dict[str, str]]]
    paths: list[str]
    fail_first: bool

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.received.append((self.command, body, dict(self.headers)))
        self.paths.append(self.path)
        status = 500 if self.fail_first and len(self.received) == 1 else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = _handle
    do_GET = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_webhook_is_signed_retried_and_filtered_by_event() -> None:
    _Receiver.received = []
    _Receiver.paths = []
    _Receiver.fail_first = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    secret = "A" * 16 + "b" * 16
    url = f"http://127.0.0.1:{server.server_address[1]}/yeastar"
    try:
        hooks = [Webhook(url=url, secret=secret, events=(30012,))]
        with running(webhooks=hooks, webhook_retry_interval_s=0.05) as sim:
            call = sim.place_call()
            assert sim.wait_events_idle(10)
            assert sim.webhook_deliveries == [(url, 30012, 500), (url, 30012, 200)]
    finally:
        server.shutdown()
        server.server_close()
    assert len(_Receiver.received) == 2  # the 30011 events were not for this webhook
    method, body, headers = _Receiver.received[-1]
    assert method == "POST" and headers["User-Agent"]
    expected = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    assert headers["X-Signature"] == expected
    event = json.loads(body)
    assert event["type"] == 30012 and json.loads(event["msg"])["call_id"] == call.call_id


# -- faults -------------------------------------------------------------------------------------


def test_faults_5xx_html_drop_and_late_recording() -> None:
    faults = PSeriesFaults(error_5xx_next=1, recording_list_delay_s=30.0)
    with running(faults=faults) as sim, client(sim) as http:
        failed = http.post(
            f"{API}/get_token", json={"username": sim.client_id, "password": sim.client_secret}
        )
        assert failed.status_code == 502 and failed.headers["content-type"].startswith("text/html")
        access = token(http, sim)
        call = sim.place_call()
        assert api(http, "recording/list", access)["total_number"] == 0
        assert api(http, "recording/download", access, id=call.id)["errcode"] == 60001
        sim.clock.advance(31)
        access = token(http, sim)
        assert api(http, "recording/list", access)["total_number"] == 1
        url = api(http, "recording/download", access, id=call.id)["download_resource_url"]

        sim.faults.html_error_next = 1
        page = http.get(url, params={"access_token": access})
        assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")

        sim.faults.drop_next_downloads = 1
        with pytest.raises(httpx.RemoteProtocolError):
            http.get(url, params={"access_token": access})
        whole = http.get(url, params={"access_token": access})
        assert hashlib.sha256(whole.content).hexdigest() == sim.recording_sha256(call.file or "")
        outcomes = [outcome for _path, outcome in sim.request_log]
        assert outcomes[0] == "HTTP 502" and "dropped" in outcomes and "HTTP 404" in outcomes


def test_ws_drop_fault_closes_right_after_subscribe() -> None:
    with running(faults=PSeriesFaults(ws_drop_next=1)) as sim, client(sim) as http:
        access = token(http, sim)

        async def scenario() -> None:
            async with websockets.connect(ws_url(sim, access), ssl=tls(sim)) as ws:
                await ws.send(json.dumps({"topic_list": [30012]}))
                assert json.loads(await ws.recv())["errcode"] == 0
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
            async with websockets.connect(ws_url(sim, access), ssl=tls(sim)) as ws:
                await ws.send(json.dumps({"topic_list": [30012]}))
                assert json.loads(await ws.recv())["errcode"] == 0
                await ws.send("heartbeat")
                assert await ws.recv() == "heartbeat response"

        asyncio.run(scenario())


def test_url_switches_single_use_expire_and_deleted_file() -> None:
    with running(single_use_urls=True, expired_url_answer="json10004") as sim, client(sim) as http:
        access = token(http, sim)
        call = sim.place_call()
        url = api(http, "recording/download", access, id=call.id)["download_resource_url"]
        assert http.get(url, params={"access_token": access}).headers["content-type"] == (
            "audio/wav"
        )
        used = http.get(url, params={"access_token": access})
        assert used.status_code == 200 and used.json()["errcode"] == 10004

        sim.faults.expire_urls = True
        url = api(http, "recording/download", access, id=call.id)["download_resource_url"]
        assert http.get(url, params={"access_token": access}).json()["errcode"] == 10004
        sim.faults.expire_urls = False

        url = api(http, "recording/download", access, file=call.file)["download_resource_url"]
        sim.delete_recording(call.file or "")
        assert sim.recording_names() == []
        assert http.get(url, params={"access_token": access}).json()["errcode"] == 10004
        assert api(http, "recording/download", access, id=call.id)["errcode"] == 60001


def test_refresh_token_dies_after_24_hours() -> None:
    with running() as sim, client(sim) as http:
        first = get_token(http, sim)
        sim.clock.advance(86401)
        late = http.post(f"{API}/refresh_token", json={"refresh_token": first["refresh_token"]})
        assert late.json()["errcode"] == 10004
        assert get_token(http, sim)["errcode"] == 0


def test_websocket_closes_when_its_token_expires_if_switched_on() -> None:
    with running(close_ws_on_token_expiry=True) as sim, client(sim) as http:
        access = token(http, sim)

        async def scenario() -> None:
            async with websockets.connect(ws_url(sim, access), ssl=tls(sim)) as ws:
                await ws.send(json.dumps({"topic_list": [30012]}))
                await ws.recv()
                sim.clock.advance(1801)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)

        asyncio.run(scenario())


def test_get_webhook_with_query_payload_and_a_bad_signature_fault() -> None:
    _Receiver.received = []
    _Receiver.paths = []
    _Receiver.fail_first = False
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    secret = "s3cr3t" * 5 + "xy"
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        config: dict[str, Any] = {
            "webhooks": [Webhook(url=url, secret=secret, method="GET", events=(30012,))],
            "webhook_get_payload": "query",
            "faults": PSeriesFaults(bad_signature_next=1),
            "call_status_events": False,
        }
        with running(**config) as sim:
            sim.place_call()
            sim.place_call()
            assert sim.wait_events_idle(10)
    finally:
        server.shutdown()
        server.server_close()
    assert len(_Receiver.received) == 2
    valid = []
    for (method, body, headers), path in zip(_Receiver.received, _Receiver.paths, strict=True):
        assert method == "GET" and body == b""
        event = httpx.URL(path).params["body"].encode()
        assert json.loads(event)["type"] == 30012
        mac = hmac.new(secret.encode(), event, hashlib.sha256).digest()
        valid.append(headers["X-Signature"] == base64.b64encode(mac).decode())
    assert sorted(valid) == [False, True]  # one carried the fault's wrong signature


def test_cli_serves_a_p_series_pbx_and_names_only_the_secret_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CALLVAULT_SIM_CLIENT_SECRET"}
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "callvault", "simulate", "--kind", "p-series"]
    command += ["--port", "0", "--json", "--initial-calls", "1", "--data-dir", str(tmp_path)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stdout is not None
        details = json.loads(process.stdout.readline())
        secret_file = Path(details["client_secret_file"])
        assert secret_file.stat().st_mode & 0o777 == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) == 32
        assert details["client_id"] == "callvault" and len(details["recordings"]) == 1
        context = ssl.create_default_context(cafile=details["ca_file"])
        with httpx.Client(base_url=details["url"], verify=context, headers=UA) as http:
            body = {"username": "callvault", "password": secret}
            assert http.post(f"{API}/get_token", json=body).json()["errcode"] == 0
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert secret not in out + err and "Traceback" not in err
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
