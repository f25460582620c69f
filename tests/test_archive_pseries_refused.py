"""A P-Series PBX registered with a wrong Client Secret: `callvault serve` asks for a token
once, logs the refusal as one line (no traceback, no restarts of its event stream every few
seconds), and `callvault status` says what to do about it; once the secret is fixed with
`callvault pbx edit`, serve picks the change up and archives the PBX's calls.

Everything real: the P-Series simulator over HTTPS and WSS on 127.0.0.1, `serve` as a
child process, SQLite. Also, at unit level, how the supervisor of serve's background tasks
logs a failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from callvault.archive import _service
from callvault.archive._session import PbxSession
from callvault.pbx import LoginFailed, PbxTransportError
from callvault.simulator import PSeriesConfig, PSeriesSimulator
from support.archive import (
    ServeProcess,
    all_archived,
    registry_env,
    run_cli,
    until,
    wait_until,
)

WRONG = "not-the-client-secret"


@pytest.fixture
def pbx() -> Iterator[PSeriesSimulator]:
    with PSeriesSimulator(PSeriesConfig(seed=11, timezone="Europe/Paris")) as sim:
        yield sim


def _get_tokens(pbx: PSeriesSimulator) -> list[str]:
    """The outcome of every get_token the simulator saw ("-1": refused, "0": granted)."""
    return [outcome for path, outcome in pbx.request_log if path.endswith("/get_token")]


def test_a_wrong_client_secret_is_one_quiet_refusal_then_fixed_with_pbx_edit(
    pbx: PSeriesSimulator, tmp_path: Path
) -> None:
    env = registry_env(
        tmp_path,
        CALLVAULT_TRANSIENT_BACKOFF_S="0.2",
        CALLVAULT_TRANSIENT_BACKOFF_MAX_S="1",
        CALLVAULT_RECONCILE_INTERVAL_S="600",
        CALLVAULT_REGISTRY_POLL_S="0.5",
        WRONG_SECRET=WRONG,
        PBX_SECRET=pbx.client_secret,
    )
    (tmp_path / "archive").mkdir()
    created = run_cli(env, "keys", "create", "--file", str(tmp_path / "master.key"))
    assert created.returncode == 0, created.stderr
    added = run_cli(
        env,
        "pbx",
        "add",
        "badsec",
        "--kind",
        "p-series",
        "--url",
        pbx.url,
        "--client-id",
        pbx.client_id,
        "--secret-env",
        "WRONG_SECRET",
        "--pin-sha256",
        str(pbx.cert_sha256),
        "--timezone",
        "Europe/Paris",
    )
    assert added.returncode == 0, added.stderr

    db = tmp_path / "archive" / "callvault.db"
    serve = ServeProcess(env, tmp_path)
    try:
        serve.start()
        assert wait_until(lambda: _get_tokens(pbx) == ["-1"], 30), serve.log_text()
        refused_at = time.monotonic()

        def told() -> str:
            return run_cli(env, "status").stdout

        assert wait_until(lambda: "--secret-env" in told(), 20), told() + serve.log_text()
        status = told()
        assert "callvault pbx edit badsec --secret-env VAR" in status, status
        assert "Client ID or Client Secret" in status, status
        assert "next login attempt in" in status, status
        assert "--password-env" not in status and "username or password" not in status
        assert "((" not in status and "))" not in status, status  # no nested reasons
        # Past the supervisor's restarts after 1 s and 5 s (which the event stream went
        # through before): still one get_token, and the refusal said once, in one line.
        time.sleep(max(0.0, refused_at + 6.5 - time.monotonic()))
        serve_log = serve.log_text()
        assert _get_tokens(pbx) == ["-1"], pbx.request_log
        assert "Traceback" not in serve_log, serve_log
        errors = [line for line in serve_log.splitlines() if " ERROR " in line]
        assert 1 <= len(errors) <= 2, serve_log
        assert all("starting it again" not in line for line in errors), serve_log
        [said] = [line for line in errors if "next login attempt" in line]
        assert "Client ID or Client Secret" in said and "--secret-env" in said, said
        assert "not asking again" not in said, said  # one retry time: the session's
        assert WRONG not in serve_log and pbx.client_secret not in serve_log

        # The operator fixes the secret: serve picks the registry change up and archives.
        edited = run_cli(env, "pbx", "edit", "badsec", "--secret-env", "PBX_SECRET")
        assert edited.returncode == 0, edited.stderr
        assert wait_until(lambda: pbx.ws_connections == 1, 30), serve.log_text()
        call = pbx.place_call(call_from="1003")
        assert call.file is not None
        assert wait_until(lambda: all_archived(db, [call.file or ""]), 30), serve.log_text()
        assert _get_tokens(pbx) == ["-1", "0"], pbx.request_log
        assert wait_until(lambda: "logged in, last contact" in told(), 20), told()
        assert "Traceback" not in serve.log_text()
        assert serve.terminate() == 0
    finally:
        serve.stop()


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "callvault.archive"]


def test_the_supervisor_logs_a_pbx_error_as_one_line_and_a_bug_with_its_traceback(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_service, "_RESTART_DELAYS_S", (0.01,))
    caplog.set_level(logging.INFO, logger="callvault.archive")

    async def supervise(failures: list[Exception]) -> int:
        stop = asyncio.Event()
        runs = 0

        async def task() -> None:
            nonlocal runs
            runs += 1
            if failures:
                raise failures.pop(0)
            stop.set()  # the task ran through: nothing more to restart

        await asyncio.wait_for(_service._supervised("the thing", task, stop), 5)
        return runs

    failures: list[Exception] = [
        PbxTransportError("event subscription: connection refused"),
        LoginFailed("get_token: the PBX refused the API client ID or secret, errcode -1"),
    ]
    assert asyncio.run(supervise(failures)) == 3  # restarted after each failure
    lines = [r for r in _records(caplog) if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in lines] == [
        "the thing failed: event subscription: connection refused; starting it again in 0 s",
        "the thing failed: get_token: the PBX refused the API client ID or secret, errcode "
        "-1; starting it again in 0 s",
    ]
    assert all(r.exc_info is None for r in lines)  # no traceback for the PBX's failures

    caplog.clear()
    assert asyncio.run(supervise([KeyError("oops"), KeyError("again")])) == 3
    lines = [r for r in _records(caplog) if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in lines] == [
        "the thing failed: KeyError: 'oops'; starting it again in 0 s",
        "the thing failed: KeyError: 'again'; starting it again in 0 s",
    ]
    assert lines[0].exc_info is not None and lines[1].exc_info is None  # a bug: traced once


class _Client:
    """A session's client whose get_token is refused (`refuse`), or that logs in with a
    stored token, a word to nobody (its heartbeat is the first contact)."""

    def __init__(self, *, refuse: bool) -> None:
        self.refuse = refuse
        self.logins = 0
        self.heartbeats = 0
        self.last_success_at: float | None = None

    async def login(self) -> None:
        self.logins += 1
        if self.refuse:
            first = LoginFailed(
                "get_token: the PBX refused the API client ID or secret, errcode -1", errno="-1"
            )
            # As the client raises it again while it remembers it (`_refuse_while_paused`).
            again = LoginFailed(f"{first.message} (not asking again for 599 s: ...)", errno="-1")
            raise again from first

    async def heartbeat(self) -> None:
        self.heartbeats += 1
        self.last_success_at = time.time()

    async def logout(self) -> None:
        pass


def test_a_refused_login_pauses_the_session_once_and_says_what_to_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="callvault.archive")
    written: list[dict[str, object]] = []
    client = _Client(refuse=True)
    fix = "`callvault pbx edit badsec --secret-env VAR`"

    async def scenario() -> PbxSession:
        session = PbxSession(
            client,
            write_health=lambda text: written.append(json.loads(text)),
            label="PBX badsec",
            kind="p-series",
            fix=fix,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(session.run(stop))
        await until(lambda: client.logins == 1)
        await asyncio.sleep(0.05)
        # The event stream and a worker meet the refusal the client remembers: no second
        # line, no longer pause.
        for _ in range(3):
            session.report_auth_failure(LoginFailed("get_token: refused again", errno="-1"))
        await asyncio.sleep(0.05)
        stop.set()
        await running
        return session

    session = asyncio.run(scenario())
    assert client.logins == 1 and not session.ready.is_set()
    errors = [r.getMessage() for r in _records(caplog) if r.levelno == logging.ERROR]
    assert errors == [
        "PBX badsec: the PBX refused the API Client ID or Client Secret (errcode -1); "
        f"downloads paused, next login attempt in 15 min; to fix it: {fix}"
    ]
    health = written[-1]
    assert health["state"] == "error" and health["reason"] == "login-refused"
    assert health["fix"] == fix and health["error"] == (
        "the PBX refused the API Client ID or Client Secret (errcode -1); downloads paused"
    )
    retry_at = datetime.fromisoformat(str(health["retry_at"]))
    assert 14 * 60 < (retry_at - datetime.now(UTC)).total_seconds() <= 15 * 60


def test_a_login_with_a_stored_token_is_followed_by_a_heartbeat_for_the_last_contact() -> None:
    written: list[dict[str, object]] = []
    client = _Client(refuse=False)

    async def scenario() -> None:
        session = PbxSession(
            client, write_health=lambda text: written.append(json.loads(text)), kind="p-series"
        )
        stop = asyncio.Event()
        running = asyncio.create_task(session.run(stop))
        await until(lambda: client.heartbeats == 1, 5)
        await asyncio.sleep(0.05)
        stop.set()
        await running

    asyncio.run(scenario())
    assert client.heartbeats == 1  # at once, not after the heartbeat interval
    assert written[0]["state"] == "ok" and written[0]["last_success_at"] is None
    assert written[-1]["state"] == "ok" and written[-1]["last_success_at"] is not None


def test_the_first_success_after_a_login_without_contact_is_written_at_once() -> None:
    written: list[dict[str, object]] = []
    client = _Client(refuse=False)
    session = PbxSession(client, write_health=lambda text: written.append(json.loads(text)))
    session._set_health("ok", None)  # logged in with a stored token: no contact yet
    client.last_success_at = time.time()  # a download succeeded
    session.report_success()
    assert len(written) == 2 and written[-1]["last_success_at"] is not None
    session.report_success()  # nothing new to say
    assert len(written) == 2


def test_a_refusal_met_elsewhere_pauses_for_what_is_left_of_the_pause() -> None:
    """`refused_elsewhere` (serve starting after `pbx test` was refused the same login):
    no login until serve's own pause, counted from that refusal, is over; a refusal older
    than the pause changes nothing."""
    written: list[dict[str, object]] = []
    client = _Client(refuse=False)
    session = PbxSession(client, write_health=lambda text: written.append(json.loads(text)))
    session.refused_elsewhere(datetime.now(UTC) - timedelta(minutes=16), "long ago")
    assert not session.paused and written == []

    refused_at = datetime.now(UTC) - timedelta(minutes=5)
    session.refused_elsewhere(refused_at, "the PBX refused this login to `callvault pbx test`")
    assert session.paused
    retry_at = datetime.fromisoformat(str(written[-1]["retry_at"]))
    assert retry_at == refused_at + timedelta(minutes=15)  # serve's first pause, from then
    assert written[-1]["reason"] == "login-refused"

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(session.run(stop))
        await asyncio.sleep(0.2)
        stop.set()
        await running

    asyncio.run(scenario())
    assert client.logins == 0  # the password was not sent again
