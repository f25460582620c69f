"""index.settings: the keys of SettingKey, set, get and set-once; on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import callvault
from callvault.index import Index, SettingKey
from support.index_data import NOW


def test_settings_round_trip_and_setdefault(index: Index) -> None:
    assert index.settings.get(SettingKey.LAST_EVENT_AT) is None
    index.settings.set(SettingKey.LAST_EVENT_AT, "2024-05-01T12:00:00+00:00", NOW)
    index.settings.set(SettingKey.LAST_EVENT_AT, "2024-05-01T12:00:05+00:00", NOW)
    assert index.settings.get(SettingKey.LAST_EVENT_AT) == "2024-05-01T12:00:05+00:00"
    assert index.settings.setdefault(SettingKey.EVENTS_SECRET_PATH, "abc", NOW) == "abc"
    assert index.settings.setdefault(SettingKey.EVENTS_SECRET_PATH, "other", NOW) == "abc"
    assert index.settings.get(SettingKey.EVENTS_SECRET_PATH) == "abc"
    assert index.settings.get(SettingKey.PBX_HEALTH) is None


def test_keys_are_those_existing_archives_hold(index: Index) -> None:
    # The stored spelling must never change: archives made before SettingKey hold these.
    assert {key.name: key.value for key in SettingKey} == {
        "EVENTS_SECRET_PATH": "events_secret_path",
        "PBX_HEALTH": "pbx_health",
        "PBX_TIMEZONE": "pbx_timezone",
        "LAST_EVENT_AT": "last_event_at",
        "WEB_SESSION_SECRET": "web_session_secret",
        "BACKFILL_PROGRESS": "backfill_progress",
        "STATISTICS_CALLS": "statistics_calls",
        "STORAGE_URL": "storage_url",
        "AUDIT_VERIFIED": "audit_verified",
        "RETENTION_PASS_AT": "retention_pass_at",
    }
    with index.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO settings (key, value, updated_at) "
            "VALUES ('pbx_timezone', 'Europe/Paris', '2024-05-01 12:00:00')"
        )
    assert index.settings.get(SettingKey.PBX_TIMEZONE) == "Europe/Paris"


def test_an_unknown_key_is_refused(index: Index) -> None:
    with pytest.raises(ValueError):
        index.settings.set("pbx_heatlh", "{}", NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        index.settings.get("nope")  # type: ignore[arg-type]


def test_no_settings_key_is_spelled_outside_the_index() -> None:
    # A key's text on a line about settings (a constant, a get/set call) outside
    # callvault.index: it must be a SettingKey member instead. (The same words as JSON keys
    # of `status --json` are not settings.)
    package = Path(callvault.__file__).parent
    spelled = re.compile("[\"'](" + "|".join(re.escape(k.value) for k in SettingKey) + ")[\"']")
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.relative_to(package).parts[0] != "index"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if spelled.search(line) and "setting" in line.lower()
    ]
    assert found == []
