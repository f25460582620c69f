"""ArchiveSettings: flags > environment > TOML > defaults, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from callvault.cli._settings import SettingsError, load_settings
from callvault.pbx._types import ApiVersion


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CALLVAULT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TZ", "America/New_York")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(archive=tmp_path)
    assert settings.db_url() == f"sqlite:///{tmp_path.absolute() / 'callvault.db'}"
    assert settings.workers == 2
    assert settings.events_listen == "0.0.0.0:8260"
    assert settings.web_listen == "127.0.0.1:8080"
    assert settings.events_address() == ("0.0.0.0", 8260)
    assert (settings.reconcile_hours, settings.reconcile_interval_s) == (48, 3600)
    assert settings.password_env == "CALLVAULT_PASSWORD"
    assert settings.api_version is None and settings.api is ApiVersion.V1_1_0
    assert settings.timezone == "America/New_York"
    assert settings.insecure is False


def test_precedence_flags_env_toml_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "c.toml",
        'workers = 3\nreconcile-hours = 12\narchive = "/from/toml"\n'
        'events_listen = "127.0.0.1:9000"\npbx = "https://127.0.0.1:8088"\n',
    )
    settings = load_settings(config)
    assert (settings.workers, settings.reconcile_hours, settings.archive) == (
        3,
        12,
        Path("/from/toml"),
    )
    monkeypatch.setenv("CALLVAULT_WORKERS", "5")
    monkeypatch.setenv("CALLVAULT_ARCHIVE", "/from/env")
    settings = load_settings(config)
    assert (settings.workers, settings.archive, settings.reconcile_hours) == (
        5,
        Path("/from/env"),
        12,
    )
    settings = load_settings(config, workers=7, archive=None)
    assert (settings.workers, settings.archive) == (7, Path("/from/env"))
    assert settings.events_address() == ("127.0.0.1", 9000)
    # Without events_allow, the PBX's own address is the one allowed to post events.
    assert settings.allowed_event_sources() == ["127.0.0.1"]


def test_events_allow_from_env_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLVAULT_EVENTS_ALLOW", "127.0.0.1, 198.51.100.0/24")
    assert load_settings().allowed_event_sources() == ["127.0.0.1", "198.51.100.0/24"]
    monkeypatch.setenv("CALLVAULT_EVENTS_ALLOW", '["::1"]')
    assert load_settings().events_allow == ["::1"]


def test_db_as_plain_path_or_url(tmp_path: Path) -> None:
    assert load_settings(db=str(tmp_path / "x.db")).db_url() == f"sqlite:///{tmp_path / 'x.db'}"
    url = "postgresql://cv@127.0.0.1/cv"
    assert load_settings(db=url).db_url() == url


def test_database_password_stays_out_of_repr() -> None:
    settings = load_settings(db="postgresql://cv:pg-s3cret@127.0.0.1/cv")
    assert "pg-s3cret" not in repr(settings) and "pg-s3cret" not in str(settings)


def test_pin_is_normalised() -> None:
    pin = ":".join(["AB"] * 32)
    assert load_settings(pin_sha256=pin).pin_sha256 == "ab" * 32


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"workers": 0}, "bad value for workers"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"pbx": "ftp://127.0.0.1"}, "PBX URL scheme 'ftp' is not http"),
        ({"pbx": "https://admin:hunter2@127.0.0.1"}, "must not contain a user name or password"),
        ({"insecure": True, "pin_sha256": "a" * 64}, "choose only one"),
        ({"events_listen": "8260"}, "HOST:PORT"),
        ({"events_allow": ["not-an-ip"]}, "not an IP address"),
        ({"pin_sha256": "123"}, "64 hex digits"),
        ({"password_env": "A B"}, "environment variable"),
    ],
)
def test_bad_values_give_one_line(overrides: dict[str, object], expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(**overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert "hunter2" not in message


def test_bad_config_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write(tmp_path / "a.toml", "workers = \n"))
    with pytest.raises(SettingsError, match="unknown option 'wrkers'"):
        load_settings(write(tmp_path / "b.toml", "wrkers = 2\n"))
    with pytest.raises(SettingsError, match="environment variable"):
        load_settings(write(tmp_path / "c.toml", 'password = "x"\n'))
    config = write(tmp_path / "d.toml", 'workers = "many"\n')
    with pytest.raises(SettingsError, match=r"bad value for workers \(in .*d\.toml\)"):
        load_settings(config)
    monkeypatch.setenv("CALLVAULT_WORKERS", "lots")
    with pytest.raises(SettingsError, match=r"bad value for workers \(from CALLVAULT_WORKERS\)"):
        load_settings()
    with pytest.raises(SettingsError, match=r"bad value for workers \(given as --workers\)"):
        load_settings(workers="x")


def test_archive_required_when_used() -> None:
    with pytest.raises(SettingsError, match="no archive directory"):
        load_settings().db_url()


def test_the_kind_option_offers_every_kind_of_pbx() -> None:
    from click.testing import CliRunner

    from callvault.cli import _register, app
    from callvault.pbx import PBX_KINDS

    _register()
    shown = CliRunner().invoke(app, ["cdr", "--help"], terminal_width=200)
    assert f"[{'|'.join(PBX_KINDS)}]" in shown.output
