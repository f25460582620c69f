"""The tamper-evident audit log: the hash chain, signed checkpoints, attested recordings,
and `callvault audit verify` / `keys show`; every change is made behind callvault's back,
in the database itself, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import DBAPIError

from callvault.index import ArchivedCopy, Index, SearchFilters, Worker, audit, open_index
from callvault.index.schema import audit_checkpoints, audit_head, audit_log, recordings
from callvault.keys import Keyring, MasterKey, SigningKey
from callvault.ops import (
    ChainBrokenError,
    public_keys,
    rotate_signing_key,
    signer,
    verify_audit,
    write_checkpoint,
)
from callvault.simulator import Simulator
from support.databases import PgDatabases
from support.index_data import NOW, queue
from support.index_data import archive as archive_job

KEYRING = Keyring((MasterKey.generate(),), "test")
W = Worker(process_id=None, name="w")


def _entries(index: Index, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        index.audit.record(f"user{n}", audit.PLAY, f"rec-{n}.wav", f"id={n}", "127.0.0.1", at=NOW)


def _sql(index: Index, statement: object) -> None:
    with index.engine.begin() as conn:
        conn.execute(statement)  # type: ignore[call-overload]


def _first(index: Index) -> tuple[str, int | None]:
    report = verify_audit(index, now=NOW)
    assert not report.ok
    return report.problems[0].kind, report.problems[0].seq


def test_an_untouched_chain_verifies_with_its_checkpoints_and_recordings(index: Index) -> None:
    key = signer(index, KEYRING, now=NOW)  # made and audited: entry 1
    _entries(index, 5)
    ids = queue(index, 3)
    for _ in ids:
        [job] = index.jobs.claim(W, 1, now=NOW, lease=timedelta(minutes=5))
        assert archive_job(index, job.recording_id, W)
    assert write_checkpoint(index, key, now=NOW) == 9
    assert write_checkpoint(index, key, now=NOW) is None  # nothing new to sign
    _entries(index, 2, start=5)
    assert write_checkpoint(index, key, now=NOW + timedelta(minutes=5)) == 11
    report = verify_audit(index, now=NOW)
    assert report.ok, report.problems
    assert (report.entries, report.head_seq, report.checkpoints) == (11, 11, 2)
    assert report.recordings == 3 and report.recordings_before_chain == 0
    assert report.keys == [key.id]
    # each archived recording points at its ARCHIVE entry, which attests what the index says
    row = index.recordings.by_id(ids[0])
    assert row is not None and row.audit_seq is not None
    entry = index.audit.get(row.audit_seq)
    assert entry is not None and entry.action == audit.ARCHIVE
    assert entry.detail == audit.attestation(
        row.id, row.pbx_id, row.name, row.storage_key or "", row.sha256 or "", row.size or 0
    )


def test_an_altered_entry_is_named(index: Index) -> None:
    _entries(index, 6)
    _sql(index, update(audit_log).where(audit_log.c.seq == 4).values(actor="mallory"))
    report = verify_audit(index, now=NOW)
    assert [(p.kind, p.seq) for p in report.problems] == [("altered", 4)]
    assert "entry 4 (play by mallory" in report.summary()


def test_a_removed_entry_is_named(index: Index) -> None:
    _entries(index, 6)
    _sql(index, delete(audit_log).where(audit_log.c.seq == 3))
    assert _first(index) == ("missing", 3)


def test_entries_removed_from_the_end_are_found_by_the_head(index: Index) -> None:
    _entries(index, 6)
    _sql(index, delete(audit_log).where(audit_log.c.seq >= 5))
    report = verify_audit(index, now=NOW)
    assert [(p.kind, p.seq) for p in report.problems] == [("missing", 5)]
    assert "entries 5 to 6" in report.problems[0].message


def test_two_entries_swapped_are_found_at_the_first(index: Index) -> None:
    _entries(index, 6)
    with index.engine.begin() as conn:
        conn.execute(update(audit_log).where(audit_log.c.seq == 2).values(seq=-2))
        conn.execute(update(audit_log).where(audit_log.c.seq == 5).values(seq=2))
        conn.execute(update(audit_log).where(audit_log.c.seq == -2).values(seq=5))
    assert _first(index) == ("altered", 2)


def test_a_row_written_into_the_table_by_hand_is_found(index: Index) -> None:
    _entries(index, 3)
    _sql(index, insert(audit_log).values(at=NOW, actor="mallory", action="play", target="x"))
    report = verify_audit(index, now=NOW)
    assert [p.kind for p in report.problems] == ["inserted"]
    assert "mallory" in report.problems[0].message


def test_a_chain_rewritten_with_its_hashes_is_caught_by_the_signed_checkpoint(
    index: Index,
) -> None:
    key = signer(index, KEYRING, now=NOW)
    _entries(index, 6)
    assert write_checkpoint(index, key, now=NOW) == 7
    # Alter entry 3 and recompute every hash after it, and the head: the chain alone
    # looks intact.
    with index.engine.begin() as conn:
        conn.execute(update(audit_log).where(audit_log.c.seq == 3).values(actor="mallory"))
        rows = conn.execute(select(audit_log).order_by(audit_log.c.seq)).all()
        previous = audit.GENESIS
        for row in rows:
            previous = audit.entry_hash(
                previous,
                row.seq,
                row.at,
                row.actor,
                row.action,
                row.target,
                row.detail,
                row.remote_addr,
            )
            conn.execute(update(audit_log).where(audit_log.c.id == row.id).values(hash=previous))
        conn.execute(update(audit_head).values(hash=previous))
    report = verify_audit(index, now=NOW)
    assert [(p.kind, p.seq) for p in report.problems] == [("checkpoint", 7)]
    assert "recomputed" in report.problems[0].message
    # ... and such a chain is never signed again
    _entries(index, 1, start=9)
    with pytest.raises(ChainBrokenError):
        write_checkpoint(index, key, now=NOW)


def test_a_checkpoint_is_checked_against_the_key_given(index: Index) -> None:
    key = signer(index, KEYRING, now=NOW)
    _entries(index, 2)
    write_checkpoint(index, key, now=NOW)
    assert verify_audit(index, now=NOW, trusted=[key.public]).ok
    stranger = SigningKey.generate().public
    report = verify_audit(index, now=NOW, trusted=[stranger])
    assert [p.kind for p in report.problems] == ["checkpoint"]
    assert "not the key you gave" in report.problems[0].message
    # a signature altered in the table
    _sql(index, update(audit_checkpoints).values(signature="AAAA"))
    assert "valid signature" in verify_audit(index, now=NOW).problems[0].message


def test_a_recording_whose_hash_or_size_was_altered_or_deleted_is_found(index: Index) -> None:
    ids = queue(index, 3)
    for _ in ids:
        [job] = index.jobs.claim(W, 1, now=NOW, lease=timedelta(minutes=5))
        archive_job(index, job.recording_id, W)
    assert verify_audit(index, now=NOW).ok
    _sql(index, update(recordings).where(recordings.c.id == ids[0]).values(sha256="c" * 64))
    _sql(index, update(recordings).where(recordings.c.id == ids[1]).values(size=1))
    _sql(index, delete(recordings).where(recordings.c.id == ids[2]))
    report = verify_audit(index, now=NOW)
    messages = [p.message for p in report.problems]
    assert [p.kind for p in report.problems] == ["recording"] * 3
    assert f"recording {ids[0]}" in messages[0] and "its SHA-256 changed" in messages[0]
    assert f"recording {ids[1]}" in messages[1] and "its size changed" in messages[1]
    assert "no longer holds" in messages[2]


def test_recordings_archived_in_bulk_are_attested(index: Index) -> None:
    ids = queue(index, 4)
    copies = [
        ArchivedCopy(rid, 100 + rid, f"{rid:064x}", f"k/{rid}.wav", "audio/wav") for rid in ids
    ]
    assert index.jobs.mark_archived_many(copies, now=NOW) == 4
    assert index.jobs.mark_archived_many(copies, now=NOW) == 0  # already archived
    report = verify_audit(index, now=NOW)
    assert report.ok and report.recordings == 4
    # the chain began with them (the index held recordings already: it says which)
    actions = [e.action for e in index.audit.chain()]
    assert actions == [audit.CHAIN_START] + [audit.ARCHIVE] * 4


def test_the_chain_starts_over_an_archive_from_before_it(index: Index) -> None:
    # An index as migration 0014 leaves an older one: entries without a place in the chain,
    # recordings archived without an attestation, no head.
    ids = queue(index, 2)
    with index.engine.begin() as conn:
        conn.execute(
            update(recordings)
            .where(recordings.c.id.in_(ids))
            .values(state="archived", size=5, sha256="d" * 64, storage_key="k", archived_at=NOW)
        )
        for n in range(3):
            conn.execute(insert(audit_log).values(at=NOW, actor=f"old{n}", action="play"))
    _entries(index, 1)
    entries = list(index.audit.chain())
    assert [e.actor for e in entries] == ["old0", "old1", "old2", "callvault", "user0"]
    assert entries[3].action == audit.CHAIN_START
    report = verify_audit(index, now=NOW)
    assert report.ok, report.problems
    assert report.recordings_before_chain == 2
    # a recording archived after the chain began whose link is removed is found
    [new] = queue(index, 1, start=5)
    [job] = index.jobs.claim(W, 1, now=NOW, lease=timedelta(minutes=5))
    archive_job(index, job.recording_id, W)
    _sql(index, update(recordings).where(recordings.c.id == new).values(audit_seq=None))
    report = verify_audit(index, now=NOW)
    assert report.problems[0].recording == new  # (and its entry now attests nothing)
    assert [p.kind for p in report.problems] == ["recording", "recording"]


def test_writers_on_many_connections_keep_one_chain(index: Index) -> None:
    def write(worker: int) -> None:
        for n in range(40):
            index.audit.record(f"w{worker}", audit.PLAY, f"{n}", "", "", at=NOW)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = verify_audit(index, now=NOW)
    assert report.ok and report.entries == 160 and index.audit.head()[0] == 160


def test_rotating_the_signing_key_keeps_old_checkpoints_checkable(index: Index) -> None:
    first = signer(index, KEYRING, now=NOW)
    write_checkpoint(index, first, now=NOW)
    second = rotate_signing_key(index, KEYRING, now=NOW + timedelta(days=1), actor="admin")
    assert signer(index, KEYRING, now=NOW).id == second.id != first.id
    write_checkpoint(index, second, now=NOW + timedelta(days=1))
    report = verify_audit(index, now=NOW)
    assert (
        report.ok
        and report.checkpoints == 2
        and sorted(report.keys) == sorted([first.id, second.id])
    )
    views = public_keys(index)
    assert [(v.id, v.active) for v in views] == [(second.id, True), (first.id, False)]
    actions = [e.action for e in index.audit.chain()]
    assert actions.count(audit.SIGNING_KEY_CREATE) == 2
    assert audit.SIGNING_KEY_RETIRE in actions


def test_cli_verify_names_the_altered_entry_and_keys_show_prints_an_openssl_key(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}
    archive = tmp_path / "archive"
    archive.mkdir()
    env["CALLVAULT_ARCHIVE"] = str(archive)
    key_file = tmp_path / "master.key"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "callvault", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert run("keys", "create", "--file", str(key_file)).returncode == 0
    env["CALLVAULT_MASTER_KEY_FILE"] = str(key_file)
    shown = run("keys", "show")
    assert shown.returncode == 0 and "signing key" in shown.stdout and "sha256:" in shown.stdout
    pem = run("keys", "show", "--pem").stdout
    (tmp_path / "key.pem").write_text(pem)
    fingerprint = subprocess.run(
        f"openssl pkey -pubin -in {tmp_path / 'key.pem'} -outform DER | sha256sum",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    assert f"sha256:{fingerprint}" in shown.stdout
    good = run("audit", "verify", "--public-key", str(tmp_path / "key.pem"))
    assert good.returncode == 0, good.stderr
    assert "the audit chain is intact" in good.stdout
    with sqlite3.connect(archive / "callvault.db") as conn:
        conn.execute("UPDATE audit_log SET detail = 'x' WHERE seq = 1")
    bad = run("audit", "verify", "--json")
    assert bad.returncode == 1
    assert '"kind": "altered"' in bad.stdout and '"seq": 1' in bad.stdout
    text_run = run("audit", "verify")
    assert text_run.returncode == 1 and text_run.stdout.startswith("ALTERED    entry 1 ")
    assert "Traceback" not in text_run.stderr
    wrong = tmp_path / "wrong.pem"
    wrong.write_text("not a key")
    refused = run("audit", "verify", "--public-key", str(wrong))
    assert refused.returncode == 2 and "not a PEM public key" in refused.stderr


def test_serve_signs_checkpoints_and_runs_the_retention_pass(
    events_sim: Simulator, tmp_path: Path
) -> None:
    """The archiver's own tasks, as `serve` wires them: the chain's head signed every
    interval, and the retention pass run when it is this node's turn."""
    from callvault.archive import Archiver
    from callvault.cli._serve import _retention_pass
    from callvault.ops import set_policy
    from support.archive import archiver_config, states, wait_until

    root = tmp_path / "archive"
    root.mkdir()

    def sign(index: Index, now: datetime) -> None:
        write_checkpoint(index, signer(index, KEYRING, now=now), now=now)

    config = archiver_config(
        events_sim,
        root,
        checkpoint=sign,
        checkpoint_interval_s=0.2,
        retention=_retention_pass,
        retention_every_s=0.5,
    )
    with Archiver(config) as archiver:
        index = archiver.index
        assert index is not None
        events_sim.place_call(talk_seconds=1)
        assert wait_until(lambda: states(index) == {"archived": 1}), states(index)
        assert wait_until(lambda: index.audit.last_checkpoint_seq() == index.audit.head()[0])
        # A policy under which the recording expired a while ago: the next turn deletes it.
        set_policy(index, [{"name": "all", "keep": "0d"}], actor="t", note="", now=NOW)
        assert wait_until(lambda: states(index) == {"deleted": 1}, timeout=30), states(index)
        # The tombstone is committed first, then the object removed and `purged_at` set.
        assert wait_until(
            lambda: index.recordings.search(SearchFilters(), limit=5)[0].purged_at is not None
        )
        # The deletion is in the chain, and signed in its turn.
        assert wait_until(lambda: index.audit.last_checkpoint_seq() == index.audit.head()[0])
        assert verify_audit(index, now=datetime.now(UTC)).ok


def test_a_writer_frozen_while_holding_the_chain_does_not_stop_the_others(
    pg_databases: PgDatabases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a process frozen (SIGSTOP, a paused VM) inside an append holds the
    head's lock: the server ends its transaction after HEAD_LOCK_IDLE_S, and the other
    writers go on; the frozen one's commit then fails."""
    import callvault.index._audit as chain

    monkeypatch.setattr(chain, "HEAD_LOCK_IDLE_S", 1.0)
    url = pg_databases.create()
    with open_index(url) as index:
        index.audit.record("first", audit.LOGIN, at=NOW)
        frozen = index.engine.connect()
        transaction = frozen.begin()
        chain.append(frozen, [chain.NewEntry(NOW, "frozen", audit.PLAY)])  # lock held, idle
        started = time.monotonic()
        index.audit.record("other", audit.LOGIN, at=NOW)  # waits for the server to end it
        assert time.monotonic() - started < 10
        with pytest.raises(DBAPIError):
            transaction.commit()
        frozen.close()
        assert [e.actor for e in index.audit.chain()] == ["first", "other"]
        assert verify_audit(index, now=NOW).ok
