"""Retention policies, legal holds, deleting outside the policy and data-subject requests:
rules parsed and matched, a pass with the clock moved forward deletes exactly the expired
recordings no hold keeps (their objects gone from storage, their rows tombstones in the
audit chain), and the commands that drive it all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from callvault.index import SettingKey, audit
from callvault.index.retention import Keep, RetentionError, parse_rules
from callvault.ops import (
    Archive,
    delete_now,
    erase_subject,
    find_subject,
    place_hold,
    run_retention,
    set_policy,
    verify_archive,
    verify_audit,
)
from support.web import T0, WebArchive, build_archive, rows_by_from

ACTOR = "cli:test"
LATER = T0 + timedelta(days=100)

RULES = [
    {"name": "inbound", "direction": "inbound", "keep": "7y"},
    {"name": "sales", "numbers": ["2000-2099"], "keep": "30d"},
    {"name": "everything else", "keep": "90d"},
]


@pytest.fixture
def built(tmp_path: Path) -> Iterator[WebArchive]:
    root = tmp_path / "archive"
    root.mkdir()
    archive = build_archive(root)
    try:
        yield archive
    finally:
        archive.index.close()


def _archive(built: WebArchive) -> Archive:
    return Archive(built.index, built.storage)


def test_keep_periods_count_calendar_months_and_years() -> None:
    start = datetime(2024, 1, 31, 12, tzinfo=UTC)
    assert Keep.parse("90d", where="t").expiry(start) == start + timedelta(days=90)
    assert Keep.parse("1m", where="t").expiry(start) == datetime(2024, 2, 29, 12, tzinfo=UTC)
    leap = datetime(2024, 2, 29, tzinfo=UTC)
    assert Keep.parse("7y", where="t").expiry(leap) == datetime(2031, 2, 28, tzinfo=UTC)
    assert Keep.parse("forever", where="t").expiry(start) is None
    with pytest.raises(RetentionError, match="keep '7 years' is not a period"):
        Keep.parse("7 years", where="rule 1")


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"name": "a", "keep": "7y", "extension": "6*"}], "rule 1: unknown field 'extension'"),
        ([{"keep": "7y"}], "rule 1: give it a name"),
        ([{"name": "a"}], "say how long to keep"),
        ([{"name": "a", "keep": "1d"}, {"name": "a", "keep": "2d"}], "two rules are named 'a'"),
        ([{"name": "a", "keep": "1d", "numbers": ["9-1"]}], "numbers: bad scope range"),
        ({"name": "a"}, "a policy is a list of rules"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_rule(rules: object, message: str) -> None:
    with pytest.raises(RetentionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_rules(rules)


def test_rules_match_by_direction_status_numbers_and_pbx() -> None:
    rules = parse_rules(
        [
            {"name": "queue", "numbers": ["600-699", "+44*"], "status": "answered", "keep": "7y"},
            {"name": "paris", "pbx": ["paris"], "keep": "1y"},
            {"name": "rest", "keep": "90d"},
        ]
    )
    queue, paris, rest = rules
    call = {"call_from": "0612", "call_to": "601", "did": "", "direction": "Inbound"}
    assert queue.matches({**call, "status": "ANSWERED"}, "lyon")
    assert not queue.matches({**call, "status": "NO ANSWER"}, "lyon")
    assert queue.matches({"call_from": "+442071234567", "status": "Answered"}, "lyon")
    assert not queue.matches({"call_from": "0601", "status": "ANSWERED"}, "lyon")
    assert paris.matches({}, "paris") and not paris.matches({}, "lyon")
    assert rest.matches({}, "anything")


def test_a_pass_deletes_exactly_the_expired_recordings_no_hold_keeps(built: WebArchive) -> None:
    archive = _archive(built)
    index = built.index
    rows = rows_by_from(built)
    policy = set_policy(index, RULES, actor=ACTOR, note="first rules", now=T0)
    held = rows["1000"]  # outbound, "everything else": expired at LATER, but held
    hold = place_hold(
        archive, "Smith v Acme", "litigation", [held.id], selection="id", actor=ACTOR, now=T0
    )
    # Nothing has expired yet at T0 + 10 days.
    early = run_retention(archive, now=T0 + timedelta(days=10))
    assert (early.deleted, early.checked) == (0, 3)  # four archived, one held
    dry = run_retention(archive, now=LATER, dry_run=True)
    assert dry.deleted == 2 and dry.held == 1
    assert {item.id for item in dry.recordings} == {rows["1001"].id, rows["2001"].id}
    assert all(
        built.storage.stat(row.storage_key or "") for row in rows.values() if row.storage_key
    )
    report = run_retention(archive, now=LATER, actor=ACTOR)
    assert report.deleted == 2 and report.by_rule == {"sales": 1, "everything else": 1}
    assert report.policy_version == policy.version and report.purged == 0
    for caller, gone in (("1001", True), ("2001", True), ("1000", False), ("0612345678", False)):
        row = index.recordings.by_id(rows[caller].id)
        assert row is not None
        assert (row.state == "deleted") is gone, caller
        assert (built.storage.stat(rows[caller].storage_key or "") is None) is gone, caller
        if gone:  # a tombstone: hash and size kept, with when and why
            assert (row.sha256, row.size) == (rows[caller].sha256, rows[caller].size)
            assert row.deleted_at == LATER and row.purged_at == LATER
            why = json.loads(row.deletion or "{}")
            assert why["why"] == "retention" and why["policy_version"] == policy.version
    # The chain holds, with a delete entry for each, and `verify` does not miss them.
    chain = verify_audit(index, now=LATER)
    assert chain.ok, chain.problems
    deletes = [e for e in index.audit.chain() if e.action == audit.DELETE]
    assert sorted(e.target for e in deletes) == sorted([rows["1001"].name, rows["2001"].name])
    verified = verify_archive(archive, now=LATER)
    assert verified.problems == 0 and verified.checked == 2
    # Released, the held recording goes at the next pass; a second pass finds nothing.
    index.retention.release_hold(hold.id, reason="case closed", actor=ACTOR, now=LATER)
    assert run_retention(archive, now=LATER).deleted == 1
    assert run_retention(archive, now=LATER).deleted == 0


def test_an_object_that_could_not_be_removed_is_removed_by_the_next_pass(
    built: WebArchive,
) -> None:
    archive = _archive(built)
    row = rows_by_from(built)["1001"]
    set_policy(built.index, [{"name": "all", "keep": "1d"}], actor=ACTOR, note="", now=T0)
    key = row.storage_key or ""
    path = built.storage.local_path(key)
    # A directory where the file was: its unlink fails (even for root), as a disk error would.
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")
    first = run_retention(archive, now=LATER)
    assert first.deleted == 4 and first.purged == 0
    assert [f for f in first.purge_failures if f.startswith(f"recording {row.id}:")]
    tombstone = built.index.recordings.by_id(row.id)
    assert tombstone is not None and tombstone.state == "deleted" and tombstone.purged_at is None
    (path / "inside").unlink()
    path.rmdir()
    second = run_retention(archive, now=LATER + timedelta(days=1))
    assert (second.deleted, second.purged, second.purge_failures) == (0, 1, [])
    tombstone = built.index.recordings.by_id(row.id)
    assert tombstone is not None and tombstone.purged_at == LATER + timedelta(days=1)


def test_delete_now_needs_a_reason_and_never_deletes_a_held_recording(built: WebArchive) -> None:
    archive = _archive(built)
    rows = rows_by_from(built)
    place_hold(
        archive, "audit 2024", "regulator", [rows["2001"].id], selection="", actor=ACTOR, now=T0
    )
    with pytest.raises(RetentionError, match=r"needs a written reason$"):
        delete_now(archive, [rows["1001"].id], reason=" ", actor=ACTOR, now=T0)
    report = delete_now(
        archive, [rows["1001"].id, rows["2001"].id, 999], reason="wrong number", actor=ACTOR, now=T0
    )
    assert report.deleted == [rows["1001"].id]
    assert [(r.id, r.reason) for r in report.refused] == [
        (rows["2001"].id, "kept by hold 1 (audit 2024)"),
        (999, "no such recording"),
    ]
    [entry] = [e for e in built.index.audit.chain() if e.action == audit.DELETE]
    assert json.loads(entry.detail)["deletion"] == {
        "by": ACTOR,
        "reason": "wrong number",
        "why": "admin",
    }


def test_a_data_subject_is_found_and_erased_except_what_is_held(built: WebArchive) -> None:
    archive = _archive(built)
    rows = rows_by_from(built)
    found = find_subject(archive, "+33 6 12 34 56 78", actor=ACTOR, now=T0)
    assert [c.recording_id for c in found.calls] == [rows["0612345678"].id]
    extension = find_subject(archive, "1000", actor=ACTOR, now=T0)  # exact for extensions
    assert {c.recording_id for c in extension.calls} == {rows["0612345678"].id, rows["1000"].id}
    place_hold(archive, "case 7", "dispute", [rows["1000"].id], selection="", actor=ACTOR, now=T0)
    erasure = erase_subject(archive, extension, reason="request 42", actor=ACTOR, now=T0)
    assert erasure.deleted == [rows["0612345678"].id]
    assert [k.id for k in erasure.kept] == [rows["1000"].id]
    erased = built.index.recordings.by_id(rows["0612345678"].id)
    assert erased is not None and erased.state == "deleted"
    assert (erased.call_from, erased.call_to, erased.did) == ("", "", "")
    kept = built.index.recordings.by_id(rows["1000"].id)
    assert kept is not None and kept.state == "archived" and kept.call_from == "1000"
    requests = [e for e in built.index.audit.chain() if e.action == audit.SUBJECT_REQUEST]
    assert [e.target for e in requests] == ["…5678", "…", "…"]
    # The requests name the number by its last digits only. (Recording names, which the
    # PBX makes of the numbers, stay in the chain's archive, play and delete entries.)
    assert all("0612345678" not in e.detail + e.target for e in requests)
    assert verify_audit(built.index, now=T0).ok


def test_one_node_a_day_takes_the_retention_turn(built: WebArchive) -> None:
    settings, day = built.index.settings, timedelta(days=1)
    assert settings.claim_turn(SettingKey.RETENTION_PASS_AT, now=T0, every=day)
    assert not settings.claim_turn(
        SettingKey.RETENTION_PASS_AT, now=T0 + timedelta(hours=23), every=day
    )
    assert settings.claim_turn(SettingKey.RETENTION_PASS_AT, now=T0 + day, every=day)


def cli(root: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}
    env["CALLVAULT_ARCHIVE"] = str(root)
    return subprocess.run(
        [sys.executable, "-m", "callvault", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
    )


def test_the_commands(built: WebArchive) -> None:
    root = built.root
    rows = rows_by_from(built)
    built.index.close()
    bad = root / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\nkeep = "soon"\n')
    refused = cli(root, "retention", "set", str(bad))
    assert refused.returncode == 2 and "keep 'soon' is not a period" in refused.stderr
    good = root / "policy.toml"
    good.write_text(
        '[[rule]]\nname = "inbound"\ndirection = ["Inbound"]\nkeep = "7y"\n\n'
        '[[rule]]\nname = "rest"\nkeep = "1d"\n'
    )
    assert cli(root, "retention", "set", str(good), "--note", "v1").returncode == 0
    shown = cli(root, "retention", "show")
    assert "1. inbound: keep 7y  (direction inbound)" in shown.stdout
    assert "2. rest: keep 1d  (any call)" in shown.stdout
    held = cli(root, "hold", "add", "--case", "C-1", "--reason", "dispute", "--number", "1001")
    # (1001's call and 1002's to 1001, not archived yet: a hold keeps it too)
    assert held.returncode == 0 and "hold 1 (C-1) keeps 2 recordings" in held.stdout
    assert "C-1" in cli(root, "hold", "list").stdout
    dry = cli(root, "retention", "run", "--dry-run")
    assert dry.returncode == 0 and "would delete 2 of 3 recordings" in dry.stdout
    assert cli(root, "retention", "run").returncode == 0
    kept = cli(root, "delete", str(rows["1001"].id), "--reason", "tidy", "--yes")
    assert kept.returncode == 1 and "KEPT" in kept.stdout and "hold 1 (C-1)" in kept.stdout
    assert cli(root, "hold", "release", "1", "--reason", "settled").returncode == 0
    found = cli(root, "subject", "find", "0612345678")
    assert found.returncode == 0 and "1 call, 1 recording" in found.stdout
    erased = cli(root, "subject", "erase", "0612345678", "--reason", "req-9", "--yes")
    assert erased.returncode == 0 and "erased 1 recording" in erased.stdout
    noise = cli(root, "subject", "find", "hello")
    assert noise.returncode == 2 and "not a phone number" in noise.stderr
    history = cli(root, "retention", "history")
    assert history.stdout.startswith("v1 ")


def test_a_period_past_the_calendar_is_refused_at_once() -> None:
    with pytest.raises(RetentionError, match="longer than 1000 years: say forever"):
        parse_rules([{"name": "a", "keep": "99999y"}])
    [rule] = parse_rules([{"name": "a", "keep": "1000y"}])
    # A date past year 9999 cannot be written: such a recording is kept (no expiry).
    assert rule.keep.expiry(datetime(9500, 1, 1, tzinfo=UTC)) is None
    assert rule.keep.expiry(T0) == T0.replace(year=T0.year + 1000)
