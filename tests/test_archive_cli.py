"""`callvault serve`: one clear line for every expected failure at start, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from callvault.cli import _register, app


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _env(tmp_path: Path) -> dict[str, str | None]:
    """The environment overrides of a run. CliRunner only overrides keys: a key is unset
    by giving it None, never by leaving it out (the outer value would show through)."""
    return {
        "CALLVAULT_PBX": "https://127.0.0.1:1",  # nothing listens there
        "CALLVAULT_USERNAME": "api",
        "CALLVAULT_ARCHIVE": str(tmp_path / "archive"),
        "CALLVAULT_PASSWORD": "s3cret-value",
        # Should a run get as far as listening: loopback only, never the 0.0.0.0 default.
        "CALLVAULT_EVENTS_LISTEN": f"127.0.0.1:{_free_port()}",
        "CALLVAULT_WEB_LISTEN": f"127.0.0.1:{_free_port()}",
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
