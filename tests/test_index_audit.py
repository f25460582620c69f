"""index.audit: append, filter, count, CSV export safe for spreadsheets, limits of the
schema; on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

from sqlalchemy import insert

from callvault.index import Index, audit
from callvault.index.schema import audit_log, column_length

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def test_record_query_count_and_csv(index: Index) -> None:
    index.audit.record("alice", audit.LOGIN, "alice", "", "127.0.0.1", at=T0)
    index.audit.record("bob", audit.PLAY, "rec-1.wav", "id=1", "127.0.0.2", at=T0 + timedelta(1))
    index.audit.record("bob", audit.DOWNLOAD, "=cmd|x", "id=2", "127.0.0.2", at=T0 + timedelta(2))
    newest = index.audit.query()
    assert [e.action for e in newest] == [audit.DOWNLOAD, audit.PLAY, audit.LOGIN]
    assert newest[-1] == audit.AuditEntry(
        id=newest[-1].id,
        at=T0,
        actor="alice",
        action=audit.LOGIN,
        target="alice",
        detail="",
        remote_addr="127.0.0.1",
        seq=1,
        hash=audit.entry_hash(audit.GENESIS, 1, T0, "alice", audit.LOGIN, "alice", "", "127.0.0.1"),
    )
    assert [e.seq for e in newest] == [3, 2, 1]
    assert index.audit.head() == (3, newest[0].hash)
    assert index.audit.count() == 3
    assert index.audit.count(audit.AuditFilter(actor="bob")) == 2
    only_play = index.audit.query(audit.AuditFilter(action=audit.PLAY))
    assert [e.target for e in only_play] == ["rec-1.wav"]
    assert [e.action for e in index.audit.query(audit.AuditFilter(target="rec-"))] == ["play"]
    assert index.audit.query(audit.AuditFilter(target="%")) == []  # a wildcard is a character
    window = audit.AuditFilter(since=T0 + timedelta(hours=12), until=T0 + timedelta(days=2))
    assert [e.action for e in index.audit.query(window)] == [audit.PLAY]
    assert [e.action for e in index.audit.query(limit=1, offset=1)] == [audit.PLAY]
    lines = list(csv.reader(io.StringIO("".join(index.audit.iter_csv()))))
    assert lines[0] == list(audit.CSV_HEADER)
    assert [line[3] for line in lines[1:]] == ["login", "play", "download"]
    assert lines[3][4] == "'=cmd|x"  # a formula is kept as text for spreadsheets
    assert not hasattr(index.audit, "delete") and not hasattr(index.audit, "update")


def test_csv_of_many_entries_comes_in_chunks(index: Index) -> None:
    rows = [
        {
            "at": T0 + timedelta(seconds=n),
            "actor": "alice",
            "action": audit.PLAY,
            "target": f"rec-{n}.wav",
            "detail": "",
            "remote_addr": "",
        }
        for n in range(1203)
    ]
    with index.engine.begin() as conn:  # as 1203 calls of record() would, in one go
        conn.execute(insert(audit_log), rows)
    chunks = list(index.audit.iter_csv(audit.AuditFilter(actor="alice")))
    assert len(chunks) >= 3
    rows = list(csv.reader(io.StringIO("".join(chunks))))
    assert len(rows) == 1204 and rows[-1][4] == "rec-1202.wav"


def test_over_long_values_are_cut_to_their_columns(index: Index) -> None:
    index.audit.record("a" * 500, "b" * 500, "c" * 500, "d" * 5000, "e" * 500, at=T0)
    [entry] = index.audit.query()
    for name in ("actor", "action", "target", "remote_addr"):
        assert len(getattr(entry, name)) == column_length(audit_log.c[name]), name
    assert entry.detail == "d" * 5000
