"""Alerts (`Alerter`), on SQLite and PostgreSQL, delivered to a real webhook receiver
(an HTTP server on 127.0.0.1) and a real SMTP server (aiosmtpd on 127.0.0.1), with a clock
of the test's own: each condition told once when it has lasted its delay, told once as
cleared, whatever the number of nodes evaluating; a failed delivery is tried again."""

from __future__ import annotations

import email.policy
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from callvault.archive import Alerter, AlertSettings
from callvault.cli._settings import Settings, SettingsError
from callvault.index import Index, Worker
from callvault.storage import LocalStorage
from support.index_data import queue, register_pbx


@dataclass
class Hook:
    """A webhook receiver: every POSTed JSON body, and what to answer."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200

    def statuses(self) -> list[tuple[str, list[str]]]:
        return [(b["status"], [a["key"] for a in b["alerts"]]) for b in self.bodies]


@pytest.fixture
def hook() -> Iterator[Hook]:
    received = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            if received.status == 200:
                received.bodies.append(body)
            self.send_response(received.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    received.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Mailbox:
    port: int = 0
    messages: list[Any] = field(default_factory=list)

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((envelope.rcpt_tos, message))
        return "250 OK"


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        box.port = int(probe.getsockname()[1])
    controller = Controller(box, hostname="127.0.0.1", port=box.port)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@dataclass
class Clock:
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now


def alerter(
    index: Index, tmp_path: Path, hook: Hook, clock: Clock, *, node: str = "a", **more: Any
) -> Alerter:
    settings = AlertSettings(webhook_url=hook.url, **more)
    return Alerter(index, LocalStorage(tmp_path / "archive"), settings, node=node, clock=clock)


def health(state: str, error: str | None = None) -> str:
    return json.dumps({"state": state, "error": error, "last_success_at": None})


def test_a_pbx_down_for_ten_minutes_is_told_once_and_cleared_once(
    index: Index, tmp_path: Path, hook: Hook, mailbox: Mailbox
) -> None:
    pbx = register_pbx(index, "paris")
    clock = Clock()
    a = alerter(
        index,
        tmp_path,
        hook,
        clock,
        smtp_host="127.0.0.1",
        smtp_port=mailbox.port,
        email_to=("ops@example.org",),
        email_from="callvault@example.org",
    )
    index.pbxs.report_session(pbx.id, health("error", "cannot log in to the PBX: refused"))
    assert a.round() == []
    clock.now += timedelta(minutes=9)
    assert a.round() == []  # not ten minutes yet
    clock.now += timedelta(minutes=1, seconds=1)
    [fired] = a.round()
    assert a.round() == []  # once
    index.pbxs.report_session(pbx.id, health("ok"))
    clock.now += timedelta(seconds=30)
    [cleared] = a.round()
    assert a.round() == []
    assert (fired.status, cleared.status) == ("firing", "resolved")
    assert hook.statuses() == [("firing", ["pbx:paris:down"]), ("resolved", ["pbx:paris:down"])]
    [alert] = hook.bodies[0]["alerts"]
    assert alert["summary"] == "PBX paris cannot be reached or refuses the login"
    assert "refused" in alert["detail"] and hook.bodies[0]["node"] == "a"
    subjects = [message["Subject"] for _to, message in mailbox.messages]
    assert subjects == [
        "[callvault] FIRING: PBX paris cannot be reached or refuses the login",
        "[callvault] RESOLVED: PBX paris cannot be reached or refuses the login",
    ]
    assert all(to == ["ops@example.org"] for to, _message in mailbox.messages)
    # Down again later: a new alert.
    index.pbxs.report_session(pbx.id, health("error", "timed out"))
    assert a.round() == []
    clock.now += timedelta(minutes=11)
    assert [n.status for n in a.round()] == ["firing"]


def test_several_nodes_tell_each_alert_once(index: Index, tmp_path: Path, hook: Hook) -> None:
    [recording_id] = queue(index, 1)
    clock = Clock()
    nodes = [alerter(index, tmp_path, hook, clock, node=name) for name in ("a", "b", "c")]
    [job] = index.jobs.claim(Worker(None, "w"), 1, now=clock.now, lease=timedelta(minutes=5))
    index.jobs.mark_failed(job.recording_id, worker=Worker(None, "w"), reason="boom", now=clock.now)
    results: list[int] = []
    threads = [threading.Thread(target=lambda n=n: results.append(len(n.round()))) for n in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0, 0, 1]
    assert hook.statuses() == [("firing", [f"recording:{recording_id}"])]
    assert "boom" in hook.bodies[0]["alerts"][0]["detail"]
    # Queued again and archived: cleared, once.
    index.jobs.requeue(["failed"], now=clock.now)
    for node in nodes:
        node.round()
    assert hook.statuses()[-1] == ("resolved", [f"recording:{recording_id}"])
    assert len(hook.bodies) == 2


def test_a_node_that_stopped_heartbeating_is_told_and_cleared_when_back(
    index: Index, tmp_path: Path, hook: Hook
) -> None:
    clock = Clock()
    gone = index.processes.register(
        node="site-2", kind="node", hostname="h2", pid=42, workers=0, now=clock.now
    )
    a = alerter(index, tmp_path, hook, clock)
    clock.now += timedelta(seconds=30)
    assert a.round() == []
    clock.now += timedelta(seconds=31)
    assert [n.status for n in a.round()] == ["firing"]
    assert hook.bodies[0]["alerts"][0]["summary"] == "node site-2 stopped without shutting down"
    index.processes.stop(gone.id, now=clock.now)  # found gone and stopped, or restarted
    assert [n.status for n in a.round()] == ["resolved"]


def test_storage_a_node_cannot_use_is_that_nodes_alert(
    index: Index, tmp_path: Path, hook: Hook
) -> None:
    clock = Clock()
    a = alerter(index, tmp_path, hook, clock, node="a")
    b = alerter(index, tmp_path, hook, clock, node="b")
    archive = tmp_path / "archive"
    for child in archive.iterdir():
        if child.is_dir():
            child.rmdir()
    archive.rmdir()  # the disk went away under node a's and b's feet
    archive.write_text("not a directory")
    assert a.round() == [] and b.round() == []
    clock.now += timedelta(seconds=61)
    a.round()
    b.round()
    keys = sorted(key for _status, keys in hook.statuses() for key in keys)
    assert keys == ["storage:a:failing", "storage:b:failing"]


def test_an_undelivered_alert_is_tried_again(index: Index, tmp_path: Path, hook: Hook) -> None:
    queue(index, 1)
    clock = Clock()
    a = alerter(index, tmp_path, hook, clock)
    [job] = index.jobs.claim(Worker(None, "w"), 1, now=clock.now, lease=timedelta(minutes=5))
    index.jobs.mark_failed(job.recording_id, worker=Worker(None, "w"), reason="x", now=clock.now)
    hook.status = 500
    assert a.round() == []
    hook.status = 200
    assert [n.status for n in a.round()] == ["firing"]
    assert a.round() == []
    assert len(hook.bodies) == 1


def test_alert_settings_from_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().alert_settings() is None
    monkeypatch.setenv("CALLVAULT_SMTP_PASSWORD", "smtp-secret")
    settings = Settings(
        alert_smtp="mail.example:587",
        alert_smtp_starttls=True,
        alert_smtp_user="callvault",
        alert_email_to=["ops@example.org", "boss@example.org"],
        alert_pbx_down_minutes=5,
    ).alert_settings()
    assert settings is not None and settings.enabled
    assert (settings.smtp_host, settings.smtp_port, settings.smtp_password) == (
        "mail.example",
        587,
        "smtp-secret",
    )
    assert settings.pbx_down_after_s == 300
    assert "smtp-secret" not in repr(settings)
    with pytest.raises(SettingsError, match="needs both alert_smtp"):
        Settings(alert_email_to=["ops@example.org"]).alert_settings()


def test_serve_tells_that_its_pbx_is_down(
    events_sim: Any, tmp_path: Path, hook: Hook, db_url: str
) -> None:
    """The alerter runs inside serve: a PBX that cannot be reached is told by webhook."""
    from callvault.archive import Archiver
    from support.archive import archiver_config, wait_until

    alerts = AlertSettings(webhook_url=hook.url, pbx_down_after_s=0.5, interval_s=0.2)
    config = archiver_config(
        events_sim,
        tmp_path / "archive",
        db_url=db_url,
        pbx_url="https://127.0.0.1:9",
        alerts=alerts,
    )
    with Archiver(config):
        assert wait_until(lambda: bool(hook.bodies), 20), hook.bodies
    [body] = hook.bodies[:1]
    assert body["status"] == "firing"
    assert [a["key"] for a in body["alerts"]] == ["pbx:main:down"]


def test_the_webhook_url_is_kept_out_of_reprs() -> None:
    """A hook URL often carries its secret in the path (Slack, Teams...)."""
    url = "https://hooks.example/services/T000/B000/secret-part"
    assert "secret-part" not in repr(Settings(alert_webhook=url))
    assert "secret-part" not in repr(AlertSettings(webhook_url=url))


def test_a_pbx_left_out_for_its_key_is_told_as_such(
    index: Index, tmp_path: Path, hook: Hook
) -> None:
    from callvault.archive._session import note_left_out

    register_pbx(index, "paris")
    clock = Clock()
    a = alerter(index, tmp_path, hook, clock)
    problem = "pbx:paris:password: sealed with master key 0123abcd, which is not among ..."
    note_left_out(index, "paris", problem, "n1")
    assert a.round() == []  # seen now; told once it has lasted ten minutes
    clock.now += timedelta(minutes=10, seconds=1)
    [_fired] = a.round()
    [alert] = hook.bodies[0]["alerts"]
    assert alert["summary"] == "PBX paris is not archived: a node cannot open its password"
    assert "0123abcd" in alert["detail"]
