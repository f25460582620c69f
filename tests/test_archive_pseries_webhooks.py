"""A P-Series PBX's webhooks taken by `callvault serve`, beside its WebSocket.

The webhook secret is kept sealed in the registry (`pbx add/edit --webhook-secret-env`);
the PBX's receiver, at its secret path, checks each webhook's `X-Signature` over the raw
body before anything parses it (401 otherwise), commits a NewCdr (30012) as an S-Series
report would be, and ignores the other events. A call reported by both the WebSocket and
the webhook is stored once.

The receiver alone is driven in process; `serve` runs as a child process against the real
P-Series simulator (HTTPS, WSS and its signed webhooks on 127.0.0.1), SQLite.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from callvault.archive import GroupCommitter, SourceAllowList, create_receiver_app
from callvault.index import Index, RecordResult
from callvault.index.pbxs import (
    PbxConfig,
    PbxRegistryError,
    password_context,
    webhook_secret_context,
)
from callvault.keys import Keyring, MasterKey
from callvault.pbx import CallDetail, webhook_signature
from callvault.simulator import PSeriesConfig, PSeriesSimulator, Webhook
from support.archive import (
    ServeProcess,
    all_archived,
    outer_env,
    registry_env,
    run_cli,
    wait_until,
)
from support.web import ADMIN, audit_entries, live_web

PARIS = ZoneInfo("Europe/Paris")
SECRET = "0123456789abcdefABCDEF0123456789"  # 32 characters, as the PBX makes them
PATH = "callvault-events-webhook-test-path"
NEW_SECRET = "fedcba9876543210FEDCBA9876543210"


def _envelope(event_type: int, msg: dict[str, Any]) -> bytes:
    """A P-Series event as the PBX pushes it: `msg` JSON-encoded as a string."""
    body = {"type": event_type, "sn": "3631A2124001", "msg": json.dumps(msg)}
    return json.dumps(body, separators=(",", ":")).encode()


def _newcdr(call_id: str) -> bytes:
    return _envelope(
        30012,
        {
            "call_id": call_id,
            "time_start": "2026-12-04 10:15:30",
            "call_from": "1001",
            "call_to": "1003",
            "call_duration": 12,
            "talk_duration": 9,
            "status": "ANSWERED",
            "type": "Internal",
            "recording": f"20261204101530-{call_id}-1001-1003-Internal.wav",
        },
    )


# -- the receiver alone -------------------------------------------------------------------


class _Receiver:
    """A P-Series receiver app called directly (ASGI), with what it committed and every
    HTTP status it told the metrics."""

    def __init__(self, secret: str | None = SECRET, allowed: str = "127.0.0.1") -> None:
        self.committed: list[CallDetail] = []
        self.answers: list[int] = []

        async def commit(cdr: CallDetail) -> RecordResult:
            self.committed.append(cdr)
            return RecordResult(1, 1, True)

        self.app = create_receiver_app(
            secret_path=PATH,
            allowed=SourceAllowList([allowed]),
            commit=commit,
            on_answer=self.answers.append,
            tz=PARIS,
            webhook=True,
            webhook_secret=secret,
        )

    def call(
        self,
        body: bytes = b"",
        *,
        method: str = "POST",
        signature: str | None = None,
        path: str = PATH,
        query: bytes = b"",
        source: str = "127.0.0.1",
    ) -> tuple[int, str]:
        headers = [(b"content-type", b"application/json")]
        if signature is not None:
            headers.append((b"x-signature", signature.encode()))
        scope = {
            "type": "http",
            "method": method,
            "path": f"/{path}",
            "raw_path": f"/{path}".encode(),
            "query_string": query,
            "headers": headers,
            "client": (source, 40000),
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        asyncio.run(self.app(scope, receive, send))
        return int(sent[0]["status"]), str(json.loads(sent[1]["body"])["message"])


def test_a_signed_newcdr_is_committed_and_other_events_are_ignored() -> None:
    receiver = _Receiver()
    body = _newcdr("1733303730.41")
    assert receiver.call(body, signature=webhook_signature(SECRET, body)) == (200, "stored")
    [cdr] = receiver.committed
    assert cdr.callid == "1733303730.41" and cdr.recording is not None
    status = _envelope(30011, {"call_id": "1733303730.41", "members": []})
    assert receiver.call(status, signature=webhook_signature(SECRET, status)) == (200, "ignored")
    assert len(receiver.committed) == 1
    assert receiver.answers == [200, 200]


def test_a_get_webhook_carries_the_event_as_its_body_or_its_body_parameter() -> None:
    receiver = _Receiver()
    first, second = _newcdr("1733303730.51"), _newcdr("1733303730.52")
    as_body = receiver.call(first, method="GET", signature=webhook_signature(SECRET, first))
    query = urllib.parse.urlencode({"body": second.decode()}).encode()
    as_query = receiver.call(method="GET", query=query, signature=webhook_signature(SECRET, second))
    assert as_body == as_query == (200, "stored")
    assert [cdr.callid for cdr in receiver.committed] == ["1733303730.51", "1733303730.52"]


def test_a_missing_or_wrong_signature_is_401_and_nothing_is_parsed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = _Receiver()
    body = _newcdr("1733303730.61")
    caplog.set_level(logging.INFO, logger="callvault.archive")
    missing = receiver.call(body)
    wrong = receiver.call(body, signature=webhook_signature("another-secret", body))
    garbage = receiver.call(b"\x00 not json at all", signature="bm90IGl0")  # never parsed: 401
    altered = receiver.call(
        body.replace(b"1001", b"1009"), signature=webhook_signature(SECRET, body)
    )
    assert [missing[0], wrong[0], garbage[0], altered[0]] == [401, 401, 401, 401]
    assert "X-Signature" in missing[1] and "X-Signature" in wrong[1]
    assert receiver.committed == []
    assert receiver.answers == [401, 401, 401, 401]  # counted as refused by the metrics
    refusals = [r.getMessage() for r in caplog.records if "webhook refused" in r.getMessage()]
    assert len(refusals) == 4 and all("\n" not in line for line in refusals)
    assert all(SECRET not in r.getMessage() and PATH not in r.getMessage() for r in caplog.records)


def test_the_path_allow_list_and_method_still_apply_and_a_pbx_without_secret_is_refused() -> None:
    receiver = _Receiver()
    body = _newcdr("1733303730.71")
    good = webhook_signature(SECRET, body)
    assert receiver.call(body, signature=good, path="callvault-events-other")[0] == 404
    assert receiver.call(body, signature=good, source="192.0.2.9")[0] == 403
    assert receiver.call(body, signature=good, method="PUT")[0] == 405
    bad_json = b'{"type": 30012, "msg": "not an object"}'
    assert receiver.call(bad_json, signature=webhook_signature(SECRET, bad_json))[0] == 400
    assert receiver.committed == []
    without = _Receiver(secret=None)
    assert without.call(body, signature=good) == (401, "no webhook secret is set for this PBX")
    assert without.committed == []


def test_a_call_reported_twice_is_stored_once(index: Index) -> None:
    """The WebSocket and the webhook both report each call: committed twice, at once or
    one after the other, through the same `GroupCommitter`, it is one call and one
    recording (`index.calls.record` upserts by PBX and callid, and inserts a recording
    name once), and its recording is queued once: the committer tells of one new
    recording only (its `on_committed`, which wakes the workers)."""
    cdr = CallDetail(
        callid="1733303730.81",
        timestart="2026-12-04 10:15:30",
        callfrom="1001",
        callto="1003",
        status="ANSWERED",
        type="Internal",
        recording="20261204101530-1733303730.81-1001-1003-Internal.wav",
    )
    told: list[RecordResult] = []
    committer = GroupCommitter(index, tz=PARIS, on_committed=told.extend)
    committer.start()

    async def twice() -> list[RecordResult]:
        together = await asyncio.gather(committer.commit(cdr), committer.commit(cdr))
        return [*together, await committer.commit(cdr)]

    try:
        results = asyncio.run(twice())
    finally:
        committer.stop()
    assert len({result.call_id for result in results}) == 1
    assert len({result.recording_id for result in results}) == 1
    assert [result.new_recording for result in told].count(True) == 1
    assert sum(index.recordings.counts_by_state().values()) == 1


# -- serve and the simulated P-Series PBX --------------------------------------------------


@pytest.fixture
def pbx() -> Iterator[PSeriesSimulator]:
    config = PSeriesConfig(
        seed=11, timezone="Europe/Paris", webhook_retries=3, webhook_retry_interval_s=0.3
    )
    with PSeriesSimulator(config) as sim:
        yield sim


def _env(tmp_path: Path, sim: PSeriesSimulator) -> dict[str, str]:
    return registry_env(
        tmp_path,
        CALLVAULT_TRANSIENT_BACKOFF_S="0.2",
        CALLVAULT_TRANSIENT_BACKOFF_MAX_S="1",
        CALLVAULT_RECONCILE_INTERVAL_S="600",  # none but the one at start
        CALLVAULT_REGISTRY_POLL_S="0.3",
        PBX_SECRET=sim.client_secret,
        WEBHOOK_SECRET=SECRET,
    )


def _calls(db: Path) -> dict[str, list[str]]:
    """Each callid of the index, with the source of every row of it."""
    found: dict[str, list[str]] = {}
    with sqlite3.connect(db) as conn:
        for callid, source in conn.execute("SELECT callid, source FROM calls"):
            found.setdefault(callid, []).append(source)
    return found


def _deliveries(sim: PSeriesSimulator) -> list[int]:
    """The HTTP status of every 30012 webhook attempt so far, in order."""
    return [status for _url, kind, status in sim.webhook_deliveries if kind == 30012]


def _mute_websockets(sim: PSeriesSimulator) -> None:
    """The PBX stops sending events over the WebSockets open now (the socket stays up and
    answers heartbeats): from then on only its webhook reports calls."""
    sim.mute_websockets()


def test_serve_takes_a_p_series_pbx_s_signed_webhooks(
    pbx: PSeriesSimulator, tmp_path: Path
) -> None:
    env = _env(tmp_path, pbx)
    (tmp_path / "archive").mkdir()
    assert run_cli(env, "keys", "create", "--file", str(tmp_path / "master.key")).returncode == 0
    added = run_cli(
        env,
        "pbx",
        "add",
        "lyon",
        "--kind",
        "p-series",
        "--url",
        pbx.url,
        "--client-id",
        pbx.client_id,
        "--secret-env",
        "PBX_SECRET",
        "--webhook-secret-env",
        "WEBHOOK_SECRET",
        "--pin-sha256",
        str(pbx.cert_sha256),
        "--timezone",
        "Europe/Paris",
    )
    assert added.returncode == 0, added.stderr
    assert "webhook URL" in added.stdout
    shown = run_cli(env, "pbx", "show", "lyon")
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^webhook secret\s+set$", shown.stdout, re.M), shown.stdout
    url = re.search(r"^webhook url\s+(\S+)$", shown.stdout, re.M)
    assert url is not None, shown.stdout
    webhook_url = url.group(1)
    listen = env["CALLVAULT_EVENTS_LISTEN"]
    assert webhook_url.startswith(f"http://{listen}/callvault-events-")
    secret_path = webhook_url.rsplit("/", 1)[1]
    as_json = run_cli(env, "pbx", "show", "lyon", "--json")
    assert json.loads(as_json.stdout)["webhook_secret"] is True
    for output in (added, shown, as_json):
        assert SECRET not in output.stdout + output.stderr
    assert secret_path not in as_json.stdout  # the JSON view never has the path
    with sqlite3.connect(tmp_path / "archive" / "callvault.db") as conn:
        [(sealed,)] = conn.execute("SELECT webhook_secret_sealed FROM pbxs").fetchall()
    assert sealed.startswith("v1.") and SECRET not in sealed
    pbx.config.webhooks.append(Webhook(url=webhook_url, secret=SECRET, method="POST"))

    db = tmp_path / "archive" / "callvault.db"
    serve = ServeProcess(env, tmp_path)
    try:
        serve.start()
        assert wait_until(lambda: pbx.ws_connections == 1, 30), serve.log_text()
        assert wait_until(
            lambda: "from its WebSocket and its webhook at http://127.0.0.1:" in serve.log_text(),
            10,
        ), serve.log_text()
        # The reconciliation at start is done before any call is placed: the calls below
        # can only come by an event.
        assert wait_until(lambda: any("/cdr/" in path for path, _ in pbx.request_log), 30), (
            serve.log_text()
        )
        time.sleep(1.5)

        # Both ways at once: the WebSocket and the webhook report the call; it is stored
        # (and archived) once.
        both = pbx.place_call(talk_seconds=2)
        assert both.file is not None
        assert wait_until(lambda: all_archived(db, [both.file or ""]), 60), serve.log_text()
        assert pbx.wait_events_idle(10)
        assert _deliveries(pbx) == [200]
        assert _calls(db)[both.call_id] == ["event"]
        with sqlite3.connect(db) as conn:
            [(count,)] = conn.execute(
                "SELECT count(*) FROM recordings WHERE name = ?", (both.file,)
            ).fetchall()
        assert count == 1

        # The WebSocket falls silent: the calls still arrive, by the webhook alone.
        _mute_websockets(pbx)
        quiet = [pbx.place_call(call_from="1002"), pbx.place_call(call_from="1004")]
        names = [call.file or "" for call in quiet]
        assert wait_until(lambda: all_archived(db, names), 60), serve.log_text()
        assert pbx.wait_events_idle(10)
        assert _deliveries(pbx) == [200, 200, 200]
        assert all(_calls(db)[call.call_id] == ["event"] for call in quiet)
        # The other events (30011, call status) were answered 200, and ignored.
        others = [status for _url, kind, status in pbx.webhook_deliveries if kind != 30012]
        assert others and set(others) == {200}

        pbx.config.call_status_events = False  # from now on, 30012 only

        # A webhook with a wrong signature is refused (401, never parsed); the PBX sends
        # it again, rightly signed, and the call is archived.
        pbx.faults.bad_signature_next = 1
        resent = pbx.place_call(call_from="1005")
        assert wait_until(lambda: all_archived(db, [resent.file or ""]), 60), serve.log_text()
        assert pbx.wait_events_idle(10)
        assert _deliveries(pbx)[3:] == [401, 200]
        assert "webhook refused from 127.0.0.1: its X-Signature is wrong" in serve.log_text()

        # Every attempt wrongly signed: the call is not taken from the webhook, and is
        # found by the reconciliation of the next start.
        pbx.faults.bad_signature_next = 4
        refused = pbx.place_call(call_from="1007")
        assert pbx.wait_events_idle(10)
        assert _deliveries(pbx)[5:] == [401, 401, 401, 401]
        assert refused.call_id not in _calls(db)
        assert serve.terminate() == 0
        serve.start()
        assert wait_until(lambda: all_archived(db, [refused.file or ""]), 60), serve.log_text(2)
        assert _calls(db)[refused.call_id] == ["cdr"]

        # A new secret, set while serve runs, is taken at once (the PBX's revision
        # changed): webhooks signed with the old one are refused from then on.
        renewed = run_cli(
            {**env, "WEBHOOK_SECRET": NEW_SECRET},
            "pbx",
            "edit",
            "lyon",
            "--webhook-secret-env",
            "WEBHOOK_SECRET",
        )
        assert renewed.returncode == 0, renewed.stderr
        assert "webhook-secret" in renewed.stdout and NEW_SECRET not in renewed.stdout
        assert wait_until(lambda: "its settings changed" in serve.log_text(2), 30)
        assert wait_until(lambda: "is archived from now on (registry)" in serve.log_text(2), 30), (
            serve.log_text(2)
        )
        seen = len(_deliveries(pbx))
        pbx.place_call(call_from="1008")
        assert pbx.wait_events_idle(10)
        assert _deliveries(pbx)[seen:] == [401, 401, 401, 401]
        pbx.config.webhooks[0].secret = NEW_SECRET
        pbx.place_call(call_from="1009")
        assert pbx.wait_events_idle(10)
        assert _deliveries(pbx)[seen + 4 :] == [200]
        assert serve.terminate() == 0
    finally:
        serve.stop()
    log = serve.log_text()
    assert SECRET not in log and NEW_SECRET not in log and pbx.client_secret not in log
    assert secret_path not in log


def test_a_webhook_secret_is_refused_for_a_pbx_that_is_not_p_series(tmp_path: Path) -> None:
    env = outer_env()
    env.update(
        {
            "CALLVAULT_ARCHIVE": str(tmp_path / "archive"),
            "CALLVAULT_MASTER_KEY_FILE": str(tmp_path / "master.key"),
            "PBX_PASSWORD": "api-password",
            "WEBHOOK_SECRET": SECRET,
        }
    )
    (tmp_path / "archive").mkdir()
    assert run_cli(env, "keys", "create", "--file", str(tmp_path / "master.key")).returncode == 0
    common = ["--url", "https://pbx.paris.example:8088", "--username", "api"]
    common += ["--password-env", "PBX_PASSWORD"]
    refused = run_cli(env, "pbx", "add", "paris", *common, "--webhook-secret-env", "WEBHOOK_SECRET")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0, refused.stderr  # one line
    assert "only a P-Series PBX" in refused.stderr and SECRET not in refused.stderr
    assert run_cli(env, "pbx", "add", "paris", *common).returncode == 0
    edited = run_cli(env, "pbx", "edit", "paris", "--webhook-secret-env", "WEBHOOK_SECRET")
    assert edited.returncode == 2
    assert edited.stderr.strip().count("\n") == 0, edited.stderr
    assert "only a P-Series PBX" in edited.stderr and SECRET not in edited.stderr
    shown = run_cli(env, "pbx", "show", "paris")
    assert "webhook" not in shown.stdout  # nothing of webhooks for an S-Series PBX
    assert (
        json.loads(run_cli(env, "pbx", "show", "paris", "--json").stdout)["webhook_secret"] is False
    )


# -- the registry and the web API ------------------------------------------------------------


def test_the_sealed_webhook_secret_changes_the_revision_and_is_p_series_only(
    index: Index,
) -> None:
    """Setting, changing or dropping the secret changes the PBX's revision (a running
    serve takes it); only a P-Series PBX keeps one; it is never in a record's repr."""
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    p_series = PbxConfig(url="https://pbx.lyon.example:8088", username="id", kind="p-series")
    index.pbxs.add("lyon", p_series, password_sealed="v1.k.pw", events_path="path-1", now=now)
    index.pbxs.add(
        "paris",
        PbxConfig(url="https://pbx.paris.example:8088", username="api"),
        password_sealed="v1.k.pw2",
        events_path="path-2",
        now=now,
    )
    before = index.pbxs.require("lyon")
    assert not before.has_webhook_secret
    with_secret = index.pbxs.set_webhook_secret("lyon", "v1.k.sealed-secret", now=now)
    assert with_secret.has_webhook_secret and with_secret.revision != before.revision
    assert "sealed-secret" not in repr(with_secret)
    other = index.pbxs.set_webhook_secret("lyon", "v1.k.another", now=now)
    assert other.revision not in (before.revision, with_secret.revision)
    with pytest.raises(PbxRegistryError, match="only a P-Series PBX"):
        index.pbxs.set_webhook_secret("paris", "v1.k.sealed", now=now)
    # A PBX that is no longer P-Series keeps no webhook secret.
    changed = index.pbxs.update("lyon", {"kind": "s-series", "username": "api"}, now=now)
    assert not changed.has_webhook_secret
    assert webhook_secret_context("lyon") == "pbx:lyon:webhook" != password_context("lyon")


def test_the_web_api_seals_a_webhook_secret_and_never_returns_it(tmp_path: Path) -> None:
    keyring = Keyring((MasterKey.generate(),), "tests")
    body = {
        "name": "lyon",
        "kind": "p-series",
        "url": "https://pbx.lyon.example:8088",
        "username": "client-id",
        "password": "client-secret",
        "webhook_secret": SECRET,
    }
    with live_web(tmp_path / "archive", keyring=keyring) as web:
        admin, _ = web.bearer(ADMIN[0])
        created = admin.post("/api/pbxs", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["webhook_secret"] is True
        record = web.archive.index.pbxs.require("lyon")
        assert record.webhook_secret_sealed is not None
        opened = keyring.open(record.webhook_secret_sealed, webhook_secret_context("lyon"))
        assert opened == SECRET.encode()
        s_series = {**body, "name": "paris", "kind": "s-series", "url": "https://p.example"}
        refused = admin.post("/api/pbxs", json=s_series)
        assert refused.status_code == 422 and "only a P-Series PBX" in refused.json()["detail"]
        dropped = admin.patch("/api/pbxs/lyon", json={"webhook_secret": None})
        assert dropped.status_code == 200 and dropped.json()["webhook_secret"] is False
        texts = [created.text, refused.text, dropped.text, admin.get("/api/pbxs").text]
        audit = repr(audit_entries(web))
    assert all(SECRET not in text for text in [*texts, audit])
