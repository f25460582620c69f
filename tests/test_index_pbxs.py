"""The registry of PBXs in the index (`index.pbxs`), on SQLite and PostgreSQL: rows as
given, in canonical form, one clear line for each bad setting, edits checked as a whole."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from callvault.index import Index
from callvault.index.pbxs import NoSuchPbx, PbxConfig, PbxRegistryError, check_config

NOW = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
PIN = "AB:" * 31 + "AB"
CONFIG = PbxConfig(url="https://127.0.0.1:8088/api/v2.0.0", username="api")


def add(index: Index, name: str, config: PbxConfig = CONFIG, path: str = "") -> None:
    index.pbxs.add(
        name, config, password_sealed="v1.x.y", events_path=path or f"path-{name}", now=NOW
    )


def test_a_pbx_is_kept_in_canonical_form(index: Index) -> None:
    config = replace(
        CONFIG,
        api_version="v2.0.0",
        pin_sha256=PIN,
        timezone="Europe/Paris",
        max_downloads=3,
        events_allow=("127.0.0.0/8", " 127.0.0.7 "),
        report_url=" http://Balancer.example:8260/ ",
    )
    record = index.pbxs.add(
        "paris", config, password_sealed="v1.sealed", events_path="secret-1", now=NOW
    )
    assert record.config == PbxConfig(
        url="https://127.0.0.1:8088",  # the /api/... copied from the documents is cut
        username="api",
        api_version="v2.0.0",
        pin_sha256="ab" * 32,
        timezone="Europe/Paris",
        max_downloads=3,
        events_allow=("127.0.0.0/8", "127.0.0.7"),
        report_url="balancer.example:8260",  # as the PBX is given it, its path added
    )
    assert (record.serial, record.detail, record.created_at) == ("", {}, NOW)
    assert index.pbxs.get("paris") == record
    assert index.pbxs.get("lyon") is None
    assert "v1.sealed" not in repr(record) and "secret-1" not in repr(record)


def test_names_are_short_slugs_and_unique(index: Index) -> None:
    add(index, "branch-2")
    for bad in ("Paris", "-x", "x-", "a b", "", "a" * 33, "pâris", "../x"):
        with pytest.raises(PbxRegistryError, match="not a PBX name"):
            add(index, bad)
    with pytest.raises(PbxRegistryError, match="registered already"):
        add(index, "branch-2", path="other")
    assert [r.name for r in index.pbxs.list()] == ["branch-2"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"url": "ftp://pbx"}, "--url"),
        ({"url": "https://api:pw@pbx:8088"}, "--url"),
        ({"username": " "}, "--username"),
        ({"api_version": "v3"}, "unknown API version"),
        ({"pin_sha256": "12ab"}, "--pin-sha256"),
        ({"pin_sha256": PIN, "insecure": True}, "choose only one"),
        ({"ca_file": "/ca.pem", "pin_sha256": PIN}, "choose only one"),
        ({"tls_min_version": "0.9"}, "--tls-min-version"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"max_downloads": 0}, "--max-downloads"),
        ({"max_downloads": 17}, "--max-downloads"),
        ({"events_allow": ("pbx.example",)}, "--events-allow"),
        ({"report_url": "https://lb:8260"}, "plain HTTP"),
        ({"report_url": "lb"}, "names no host and port"),
        ({"report_url": "lb:port"}, "is not an address"),
        ({"report_url": "lb:8260/report"}, "secret path is added"),
        ({"report_url": "lb:8260", "api_version": "v1.0.1"}, "v1.0.1 only takes a path"),
    ],
)
def test_each_bad_setting_is_one_line_naming_it(change: dict[str, object], words: str) -> None:
    with pytest.raises(PbxRegistryError) as caught:
        check_config(replace(CONFIG, **change))  # type: ignore[arg-type]
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert "pw@" not in str(caught.value)  # a password typed into the URL is never echoed


def test_an_edit_changes_what_is_given_and_is_checked_whole(index: Index) -> None:
    add(index, "paris", replace(CONFIG, pin_sha256=PIN))
    later = NOW + timedelta(minutes=5)
    edited = index.pbxs.update("paris", {"max_downloads": 4, "timezone": "Europe/Paris"}, now=later)
    assert edited.config.max_downloads == 4 and edited.config.pin_sha256 == "ab" * 32
    assert (edited.updated_at, edited.created_at) == (later, NOW)
    assert edited.password_sealed == "v1.x.y"
    with pytest.raises(PbxRegistryError, match="choose only one"):
        index.pbxs.update("paris", {"insecure": True}, now=later)
    switched = index.pbxs.update(
        "paris", {"insecure": True, "pin_sha256": None}, password_sealed="v1.new", now=later
    )
    assert switched.config.insecure and switched.password_sealed == "v1.new"
    with pytest.raises(NoSuchPbx):
        index.pbxs.update("lyon", {"max_downloads": 1}, now=later)
    with pytest.raises(TypeError):
        index.pbxs.update("paris", {"password": "x"}, now=later)


def test_serial_test_results_and_removal(index: Index) -> None:
    add(index, "paris")
    add(index, "lyon")
    revision = index.pbxs.require("paris").revision
    index.pbxs.learn_serial("paris", " 369351034049 ", now=NOW)
    index.pbxs.record_test("paris", {"ok": True, "calls_last_day": 3}, now=NOW)
    paris = index.pbxs.require("paris")
    # Neither is a change of its settings, for a running serve.
    assert paris.revision == revision
    edited = index.pbxs.update("paris", {"max_downloads": 3}, now=NOW)
    assert edited.revision != revision
    resealed = index.pbxs.update("paris", {}, password_sealed="v1.other", now=NOW)
    assert resealed.revision not in (revision, edited.revision)
    assert paris.serial == "369351034049" and paris.detail == {"ok": True, "calls_last_day": 3}
    with pytest.raises(NoSuchPbx, match=r"no PBX named 'nice' \(lyon, paris\)"):
        index.pbxs.require("nice")
    assert index.pbxs.remove("paris").name == "paris"
    assert [r.name for r in index.pbxs.list()] == ["lyon"]
    with pytest.raises(NoSuchPbx):
        index.pbxs.remove("paris")


def test_the_pbx_given_by_flags_is_the_entry_with_id_0(index: Index) -> None:
    add(index, "main", replace(CONFIG, url="https://127.0.0.2:8088"))  # took the name
    first = index.pbxs.given_at_start(CONFIG, events_path="path-of-the-archive", now=NOW)
    assert (first.id, first.name, first.given_by_flags, first.config.url) == (
        0,
        "main-2",
        True,
        "https://127.0.0.1:8088",
    )
    assert first.events_path == "path-of-the-archive"
    # Started again with other flags (the PBX moved): the same entry, brought up to date.
    moved = replace(CONFIG, url="https://127.0.0.9:8088", max_downloads=4)
    again = index.pbxs.given_at_start(moved, events_path="path-of-the-archive", now=NOW)
    assert (again.id, again.config.url, again.config.max_downloads) == (
        first.id,
        "https://127.0.0.9:8088",
        4,
    )
    assert [r.name for r in index.pbxs.list()] == ["main", "main-2"]
    assert not index.pbxs.require("main").given_by_flags
    # Flags naming a registered PBX's URL would archive its calls a second time.
    taken = replace(CONFIG, url="https://127.0.0.2:8088")
    with pytest.raises(PbxRegistryError, match="PBX main is registered with the URL"):
        index.pbxs.given_at_start(taken, events_path="path-of-the-archive", now=NOW)


def test_a_pbx_whose_calls_are_archived_stays_in_the_registry(index: Index) -> None:
    from callvault.index.pbxs import PbxInUse
    from support.index_data import queue

    add(index, "paris")
    paris = index.pbxs.require("paris")
    queue(index, 1, pbx_id=paris.id)
    with pytest.raises(PbxInUse, match="calls of it are archived"):
        index.pbxs.remove("paris")
    assert index.pbxs.get("paris") is not None
