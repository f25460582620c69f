"""`callvault serve` and `backfill` as commands: one clear line for every expected failure
at start, never a traceback; their settings (the PBX options shared with fetch, --node, a
TLS-terminating reverse proxy in front of the web app)."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from click.testing import CliRunner

from callvault.cli import _register, app
from callvault.index import open_index
from callvault.simulator import Simulator
from callvault.web._security import LOGIN_COOKIE
from support.archive import cli_env, free_port, outer_env, wait_until

CALLVAULT = str(Path(sys.executable).with_name("callvault"))


def _env(tmp_path: Path) -> dict[str, str | None]:
    """The environment overrides of a run. CliRunner only overrides keys: a key is unset
    by giving it None, never by leaving it out (the outer value would show through)."""
    return {
        "CALLVAULT_PBX": "https://127.0.0.1:1",  # nothing listens there
        "CALLVAULT_USERNAME": "api",
        "CALLVAULT_ARCHIVE": str(tmp_path / "archive"),
        "CALLVAULT_PASSWORD": "s3cret-value",
        # Should a run get as far as listening: loopback only, never the 0.0.0.0 default.
        "CALLVAULT_EVENTS_LISTEN": f"127.0.0.1:{free_port()}",
        "CALLVAULT_WEB_LISTEN": f"127.0.0.1:{free_port()}",
    }


def test_serve_without_password_or_pbx_says_so(tmp_path: Path) -> None:
    _register()
    runner = CliRunner()
    env = _env(tmp_path)
    env["CALLVAULT_PASSWORD"] = None
    env["NO_SUCH_VAR_X"] = None
    result = runner.invoke(app, ["serve", "--no-web", "--password-env", "NO_SUCH_VAR_X"], env=env)
    assert result.exit_code == 2
    assert "the API password is not set: put it in the environment variable NO_SUCH_VAR_X" in (
        result.output
    )
    env = _env(tmp_path)
    env["CALLVAULT_PBX"] = None
    result = runner.invoke(app, ["serve", "--no-web"], env=env)
    assert result.exit_code == 2 and "no PBX" in result.output
    result = runner.invoke(
        app, ["serve", "--no-web", "--events-listen", "nowhere"], env=_env(tmp_path)
    )
    assert result.exit_code == 2 and "events" in result.output and "HOST:PORT" in result.output
    result = runner.invoke(
        app, ["serve", "--no-web", "--events-allow", "not-an-ip"], env=_env(tmp_path)
    )
    assert result.exit_code == 2 and "not an IP address" in result.output
    assert "Traceback" not in result.output


def test_serve_with_its_port_taken_says_so(tmp_path: Path) -> None:
    _register()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            app,
            ["serve", "--no-web", "--events-listen", f"127.0.0.1:{port}"],
            env=_env(tmp_path),
        )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"callvault: error: cannot listen for events on 127.0.0.1:{port}: "
        "Address already in use (is another callvault serve running?)"
    ]
    assert "s3cret-value" not in result.output


def test_serve_and_fetch_share_the_pbx_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve reads the same PBX options as fetch: TLS minimum version, insecure warning."""
    from callvault.cli._serve import archiver_config
    from callvault.cli._settings import load_settings

    env = _env(tmp_path)
    for key, value in env.items():
        assert value is not None
        monkeypatch.setenv(key, value)
    settings = load_settings(None, tls_min_version="1.0", insecure=True)
    config = archiver_config(settings, web=False)
    assert config.tls is not None
    assert config.tls.minimum_version == "1.0" and config.tls.insecure

    _register()
    result = CliRunner().invoke(
        app, ["serve", "--no-web", "--tls-min-version", "0.9", "--insecure"], env=env
    )
    assert result.exit_code == 2 and "0.9" in result.output
    assert "Traceback" not in result.output


def test_serve_takes_its_node_name_from_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from callvault.cli._serve import archiver_config
    from callvault.cli._settings import load_settings

    env = _env(tmp_path)
    for key, value in env.items():
        assert value is not None
        monkeypatch.setenv(key, value)
    assert archiver_config(load_settings(), web=False).node is None  # the host name
    assert archiver_config(load_settings(node="site-1"), web=False).node == "site-1"
    monkeypatch.setenv("CALLVAULT_NODE", "site-2")
    assert archiver_config(load_settings(), web=False).node == "site-2"
    _register()
    result = CliRunner().invoke(app, ["serve", "--no-web", "--node", "a b"], env=env)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "callvault: error: bad value for node (given as --node): must be at most 64 letters, "
        "digits, dots, dashes or underscores"
    ]


# -- an unusable archive directory, a failing index database ---------------------------------


def _serve_env(tmp_path: Path) -> dict[str, str | None]:
    return {
        "CALLVAULT_PBX": "https://127.0.0.1:1",  # nothing listens there
        "CALLVAULT_USERNAME": "api",
        "CALLVAULT_PASSWORD": "s3cret-value",
        "CALLVAULT_EVENTS_LISTEN": f"127.0.0.1:{free_port()}",
        "CALLVAULT_WEB_LISTEN": f"127.0.0.1:{free_port()}",
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


def test_backfill_with_a_failing_index_database_is_one_line(
    events_sim: Simulator, tmp_path: Path
) -> None:
    """A database that refuses writes (here opened read-only; in the field: locked past the
    busy timeout, a full disk) stops backfill with one line, never a traceback."""
    sim = events_sim
    _register()
    sim.place_call(talk_seconds=1)
    archive = tmp_path / "archive"
    database = archive / "callvault.db"
    open_index(f"sqlite:///{database}").close()
    env = cli_env(sim, archive)
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


def _days_ago(sim: Simulator, days: int) -> str:
    return (datetime.now(ZoneInfo(sim.config.timezone)) - timedelta(days=days)).strftime("%Y-%m-%d")


# -- behind a TLS-terminating reverse proxy ----------------------------------------------------


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
    return outer_env()


def test_serve_secure_cookies_and_trusted_proxy(tmp_path: Path, plain_env: dict[str, str]) -> None:
    archive = tmp_path / "archive"
    web_port = free_port()
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
    port = free_port()
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
