"""Traps found in an audit of the receiver, backfill, reconciliation and the archive CLI,
each pinned by a test.

A CDR the index refuses must not block the receiver (503 on every re-send), nor stop a
reconciliation or a backfill; an unusable archive directory or a failing index database is
one line, never a traceback; backfill resumes without --until and cleans up on SIGTERM;
`serve` and `web` can sit behind a TLS-terminating reverse proxy (Secure cookies, the
client's address from X-Forwarded-For of that proxy only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn
from click.testing import CliRunner

from callvault.archive import Archiver
from callvault.archive._backfill import backfill
from callvault.archive._receiver import SourceAllowList, create_receiver_app
from callvault.cli import _register, app
from callvault.index import InvalidCallDetail, RecordResult, SettingKey, open_index
from callvault.pbx import PbxClient, TlsOptions
from callvault.pbx._types import CallDetail
from callvault.simulator import Simulator, SimulatorConfig
from callvault.web._security import LOGIN_COOKIE
from test_archive_backfill import _cli_env
from test_archive_flow import archiver_config, states, wait_until

CALLVAULT = str(Path(sys.executable).with_name("callvault"))
# A caller this long makes a recording name over 255 characters: the index refuses the row
# (the name identifies the file and is never shortened). The '#' keeps the simulator from
# using the name as its own file name (too long for the file system).
REFUSED_CALLER = "#" + "9" * 250


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(seed=5, event_retry_interval=0.2)) as running:
        yield running


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _days_ago(sim: Simulator, days: int) -> str:
    return (datetime.now(ZoneInfo(sim.config.timezone)) - timedelta(days=days)).strftime("%Y-%m-%d")


def _place_calls_across_windows(sim: Simulator) -> tuple[CallDetail, CallDetail, CallDetail]:
    """30 hours ago: a good call and one the index refuses; now: another good call. The
    refused row sits in an earlier one-day window than the last good call."""
    sim.clock.advance(-30 * 3600)
    try:
        early = sim.place_call(callfrom="1001", talk_seconds=1)
        refused = sim.place_call(callfrom=REFUSED_CALLER, talk_seconds=1)
    finally:
        sim.clock.advance(30 * 3600)
    late = sim.place_call(callfrom="1002", talk_seconds=1)
    assert refused.recording is not None and len(refused.recording) > 255
    return early, refused, late


# -- 1. a report or CDR row the index refuses ------------------------------------------------


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
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver validates what the index refuses today before committing; should the
    index refuse a report anyway (`InvalidCallDetail`), re-sending it
    cannot help: 400 and one log line, not a 503 that the PBX would re-send for ever.
    A failing database is still a 503."""
    secret = "callvault-events-test-secret-path"
    index = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
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
    try:
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
    finally:
        index.close()


def test_reconcile_skips_a_refused_row_and_goes_on_with_later_windows(
    sim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    early, refused, late = _place_calls_across_windows(sim)
    caplog.set_level(logging.INFO, logger="callvault.archive")
    config = archiver_config(sim, tmp_path / "archive", reconcile_at_start=True)
    with Archiver(config) as archiver:
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 2}), states(index)
        for good in (early, late):
            assert good.recording is not None
            row = index.recordings.by_name(good.recording)
            assert row is not None and row.sha256 == sim.recording_sha256(good.recording)
        assert refused.recording is not None
        assert index.recordings.by_name(refused.recording[:255]) is None
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert any(refused.callid in r.getMessage() for r in skipped), skipped
    assert not any("reconcile failed" in r.getMessage() for r in caplog.records)


def test_backfill_skips_a_refused_row_and_archives_the_rest(sim: Simulator, tmp_path: Path) -> None:
    _register()
    early, _refused, late = _place_calls_across_windows(sim)
    archive = tmp_path / "archive"
    result = CliRunner().invoke(
        app, ["backfill", "--since", _days_ago(sim, 2)], env=_cli_env(sim, archive)
    )
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "1 invalid CDR row skipped" in result.output
    assert "2 archived" in result.output
    with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
        assert states(index) == {"archived": 2}
        assert index.recordings.by_name(early.recording or "") is not None
        assert index.recordings.by_name(late.recording or "") is not None


# -- 2. an unusable archive directory, a failing index database -----------------------------


def _serve_env(tmp_path: Path) -> dict[str, str | None]:
    return {
        "CALLVAULT_PBX": "https://127.0.0.1:1",  # nothing listens there
        "CALLVAULT_USERNAME": "api",
        "CALLVAULT_PASSWORD": "s3cret-value",
        "CALLVAULT_EVENTS_LISTEN": f"127.0.0.1:{_free_port()}",
        "CALLVAULT_WEB_LISTEN": f"127.0.0.1:{_free_port()}",
    }


@pytest.mark.parametrize("command", ["serve", "backfill"])
def test_an_unusable_archive_directory_is_one_line(tmp_path: Path, command: str) -> None:
    _register()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    args = ["serve", "--no-web"] if command == "serve" else ["backfill", "--since", "2024-05-01"]
    for archive, reason in ((a_file, "File exists"), (a_file / "sub", "Not a directory")):
        argv = [*args, "--archive", str(archive)]
        result = CliRunner().invoke(app, argv, env=_serve_env(tmp_path))
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines() == [
            f"callvault: error: cannot use the archive directory {archive}: {reason}"
        ]


def test_backfill_with_a_failing_index_database_is_one_line(sim: Simulator, tmp_path: Path) -> None:
    """A database that refuses writes (here opened read-only; in the field: locked past the
    busy timeout, a full disk) stops backfill with one line, never a traceback."""
    _register()
    sim.place_call(talk_seconds=1)
    archive = tmp_path / "archive"
    database = archive / "callvault.db"
    open_index(f"sqlite:///{database}").close()
    env = _cli_env(sim, archive)
    env["CALLVAULT_DB"] = f"sqlite:///file:{database}?mode=ro&uri=true"
    result = CliRunner().invoke(
        app, ["backfill", "--since", _days_ago(sim, 1), "--queue-only"], env=env
    )
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "callvault: error: backfill stopped: the index database failed: "
        "attempt to write a readonly database (run it again to resume)"
    )
    assert "Traceback" not in result.output


# -- 3. resuming without --until -------------------------------------------------------------


def _cdr_exports(sim: Simulator) -> int:
    return sum(1 for endpoint, _ in sim.request_log if endpoint == "cdr/get_random")


def test_backfill_without_until_resumes_where_the_last_run_stopped(
    sim: Simulator, tmp_path: Path
) -> None:
    _register()
    sim.place_call(talk_seconds=1)
    env = _cli_env(sim, tmp_path / "archive")
    args = ["backfill", "--since", _days_ago(sim, 3), "--queue-only"]
    first = CliRunner().invoke(app, args, env=env)
    assert first.exit_code == 0, first.output
    assert "1 recordings queued" in first.output
    exports = _cdr_exports(sim)
    assert exports >= 4  # three whole days and today
    again = CliRunner().invoke(app, args, env=env)
    assert again.exit_code == 0, again.output
    # Only the stretch since the first run is asked for: one short window.
    assert _cdr_exports(sim) == exports + 1
    match = re.search(r"(\d+) calls in (\d+) windows \((\d+) already done\)", again.output)
    assert match is not None, again.output
    assert (int(match.group(2)), int(match.group(3))) == (1, exports)
    # --restart ignores the progress: every window again.
    fresh = CliRunner().invoke(app, [*args, "--restart"], env=env)
    assert fresh.exit_code == 0, fresh.output
    assert _cdr_exports(sim) == 2 * exports + 1


def test_backfill_progress_is_kept_per_pbx_and_since(sim: Simulator, tmp_path: Path) -> None:
    tz = ZoneInfo(sim.config.timezone)
    since = datetime.now(tz).replace(microsecond=0) - timedelta(days=2)

    async def run(pbx: str, start: datetime) -> tuple[int, int]:
        client = PbxClient(
            sim.url, sim.username, sim.password, tls=TlsOptions(pin_sha256=sim.cert_sha256)
        )
        async with client:
            await client.login()
            stats = await backfill(
                client, index, since=start, until=datetime.now(tz), tz=tz, pbx=pbx
            )
        return stats.windows, stats.windows_skipped

    with open_index(f"sqlite:///{tmp_path / 'callvault.db'}") as index:
        done, skipped = asyncio.run(run("https://pbx-a.example", since))
        assert skipped == 0 and done >= 3
        assert asyncio.run(run("https://pbx-a.example", since)) == (1, done)
        assert asyncio.run(run("https://pbx-b.example", since)) == (done, 0)
        assert '"pbx": "https://pbx-b.example"' in (
            index.settings.get(SettingKey.BACKFILL_PROGRESS) or ""
        )
        later = since + timedelta(hours=1)
        assert asyncio.run(run("https://pbx-b.example", later))[1] == 0


# -- 4. SIGTERM during backfill ---------------------------------------------------------------


def _downloading(database: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=5)) as conn:
            row = conn.execute(
                "SELECT count(*) FROM recordings WHERE state = 'downloading'"
            ).fetchone()
    except sqlite3.Error:  # not made yet
        return 0
    return int(row[0])


def test_backfill_sigterm_releases_the_jobs_and_logs_out(sim: Simulator, tmp_path: Path) -> None:
    for _ in range(3):
        sim.place_call(talk_seconds=1)
    archive = tmp_path / "archive"
    database = archive / "callvault.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}
    env.update(_cli_env(sim, archive))
    sim.state.faults.slow_seconds = 0.5  # every answer of the PBX takes a while
    argv = [CALLVAULT, "backfill", "--since", _days_ago(sim, 1)]
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while _downloading(database) == 0:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no download ever started"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "callvault: backfill terminated: no download left claimed, logged out; "
        "run it again to resume"
    )
    with contextlib.closing(sqlite3.connect(database)) as conn:
        claimed = conn.execute(
            "SELECT state, count(*) FROM recordings WHERE state = 'downloading' "
            "OR claimed_by IS NOT NULL GROUP BY state"
        ).fetchall()
    assert claimed == []
    staging = archive / ".callvault-incoming"
    assert not staging.exists() or list(staging.iterdir()) == []
    assert ("logout", "Success") in sim.request_log
    assert sim.state.session_count() == 0


# -- 5. behind a TLS-terminating reverse proxy -------------------------------------------------


def _start(argv: list[str], env: dict[str, str], base: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def up() -> bool:
        if process.poll() is not None:
            return True
        try:
            httpx.get(f"{base}/login", timeout=2)
        except httpx.TransportError:
            return False
        return True

    assert wait_until(up, timeout=60)
    assert process.poll() is None, process.communicate()
    return process


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def _failed_login_from(base: str, headers: dict[str, str]) -> httpx.Response:
    """GET the login form and post a wrong password, sending the login cookie by hand
    (a Secure cookie would not go back over plain http otherwise). Returns the form's
    answer; the POST is audited with the address the app believed."""
    page = httpx.get(f"{base}/login", headers=headers)
    assert page.status_code == 200
    nonce = page.cookies.get(LOGIN_COOKIE)
    assert nonce is not None
    csrf = re.search(r'name="csrf" value="([^"]*)"', page.text)
    assert csrf is not None
    answer = httpx.post(
        f"{base}/login",
        headers={**headers, "Cookie": f"{LOGIN_COOKIE}={nonce}"},
        data={"username": "nobody", "password": "wrong", "csrf": csrf.group(1)},
    )
    assert answer.status_code == 401, answer.text
    return page


def _audited_addresses(database: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        rows = conn.execute("SELECT remote_addr FROM audit_log WHERE action = 'login_failed'")
        return [str(row[0]) for row in rows]


def _secure(response: httpx.Response) -> bool:
    cookies = response.headers.get_list("set-cookie")
    assert cookies, "no cookie set"
    return all(re.search(r";\s*secure(;|$)", c, re.IGNORECASE) for c in cookies)


_FORWARDED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}


@pytest.fixture
def plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}


def test_serve_secure_cookies_and_trusted_proxy(tmp_path: Path, plain_env: dict[str, str]) -> None:
    archive = tmp_path / "archive"
    web_port = _free_port()
    base = f"http://127.0.0.1:{web_port}"
    env = {**plain_env, **{k: v for k, v in _serve_env(tmp_path).items() if v is not None}}
    env["CALLVAULT_WEB_LISTEN"] = f"127.0.0.1:{web_port}"
    argv = [CALLVAULT, "serve", "--archive", str(archive), "--secure-cookies"]
    process = _start([*argv, "--trusted-proxy", "127.0.0.1"], env, base)
    try:
        page = _failed_login_from(base, {"X-Forwarded-For": "203.0.113.7"})
        assert _secure(page)  # asked for, over plain http
    finally:
        _stop(process)
    assert _audited_addresses(archive / "callvault.db") == ["203.0.113.7"]


def test_web_believes_forwarded_headers_from_the_trusted_proxy_only(
    tmp_path: Path, plain_env: dict[str, str]
) -> None:
    archive = tmp_path / "archive"
    database = archive / "callvault.db"
    open_index(f"sqlite:///{database}").close()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [CALLVAULT, "web", "--archive", str(archive), "--listen", f"127.0.0.1:{port}"]
    # Trusted from the environment: the proxy is us (127.0.0.1).
    process = _start(argv, {**plain_env, "CALLVAULT_TRUSTED_PROXY": "127.0.0.1"}, base)
    try:
        assert not _secure(httpx.get(f"{base}/login"))
        page = _failed_login_from(base, _FORWARDED)
        assert _secure(page)  # X-Forwarded-Proto: https, from the trusted proxy
    finally:
        _stop(process)
    assert _audited_addresses(database) == ["203.0.113.7"]
    # Another address is trusted (the flag wins over the environment): headers ignored.
    env = {**plain_env, "CALLVAULT_TRUSTED_PROXY": "127.0.0.1"}
    process = _start([*argv, "--trusted-proxy", "192.0.2.10"], env, base)
    try:
        page = _failed_login_from(base, _FORWARDED)
        assert not _secure(page)
    finally:
        _stop(process)
    assert _audited_addresses(database) == ["203.0.113.7", "127.0.0.1"]


def test_proxy_settings_flags_over_environment_over_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from callvault.cli._serve import archiver_config
    from callvault.cli._settings import SettingsError, load_settings

    assert (load_settings().secure_cookies, load_settings().trusted_proxy) == (False, None)
    config = tmp_path / "c.toml"
    config.write_text('secure-cookies = true\ntrusted_proxy = "127.0.0.9"\n', encoding="utf-8")
    assert (load_settings(config).secure_cookies, load_settings(config).trusted_proxy) == (
        True,
        "127.0.0.9",
    )
    monkeypatch.setenv("CALLVAULT_SECURE_COOKIES", "false")
    monkeypatch.setenv("CALLVAULT_TRUSTED_PROXY", "127.0.0.1")
    settings = load_settings(config)
    assert (settings.secure_cookies, settings.trusted_proxy) == (False, "127.0.0.1")
    settings = load_settings(config, secure_cookies=True, trusted_proxy="::1")
    assert (settings.secure_cookies, settings.trusted_proxy) == (True, "::1")
    for key, value in _serve_env(tmp_path).items():
        assert value is not None
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CALLVAULT_ARCHIVE", str(tmp_path / "archive"))
    assert archiver_config(load_settings(), web=True).web_trusted_proxy == "127.0.0.1"
    with pytest.raises(SettingsError, match="not an IP address") as info:
        load_settings(trusted_proxy="proxy.example")
    assert "\n" not in str(info.value)
