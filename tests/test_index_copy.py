"""`callvault index copy`: a whole SQLite index into an empty PostgreSQL database (the
way from one machine to several), and back, with every row, time and id kept, the
number search working on the copy, new ids after the copied ones, and each refusal one
line: a target that is not empty, a serve that still runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from callvault.index import SearchFilters, audit, open_index
from callvault.ops import verify_audit
from support.databases import PgDatabases
from support.web import build_archive


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}
    return subprocess.run(
        [sys.executable, "-m", "callvault", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_sqlite_index_is_copied_into_postgresql_whole(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    built = build_archive(root)
    source_url = f"sqlite:///{root / 'callvault.db'}"
    built.index.close()
    target_url = pg_databases.create()  # a new database, no tables yet

    copied = cli("index", "copy", "--archive", str(root), "--to", target_url, "--json")
    assert copied.returncode == 0, copied.stderr
    report = json.loads(copied.stdout)
    assert report["rows"]["calls"] == 6 and report["rows"]["users"] == 3
    with open_index(source_url) as source, open_index(target_url) as target:
        # Every row of every table (the copy's own audit entry aside)...
        counts = source.row_counts()
        assert target.row_counts() == counts
        assert report["rows"] == {
            name: rows - (name == "audit_log") for name, rows in counts.items()
        }
        # ...as it was: times, states, hashes, users' scopes and passwords.
        mine = source.recordings.search(SearchFilters(), limit=50)
        theirs = target.recordings.search(SearchFilters(), limit=50)
        assert theirs == mine and len(mine) == 6
        assert target.users.verify_password("alice", "alice-password-1") is not None
        assert target.users.get("bob") == source.users.get("bob")
        # The audit chain holds on the copy: same entries, hashes and attestations.
        copied_chain = verify_audit(target, now=datetime.now(UTC))
        assert copied_chain.ok, copied_chain.problems
        assert copied_chain.recordings == verify_audit(source, now=datetime.now(UTC)).recordings
        # The number search works on the copy (PostgreSQL's trigram index).
        found = target.recordings.search(SearchFilters(number="1234567"), limit=50)
        assert [r.call_from for r in found] == ["0612345678"]
        # New rows get ids after the copied ones.
        before = max(e.id for e in target.audit.query(limit=1000))
        target.audit.record("test", audit.LOGIN, "x", at=datetime.now(UTC))
        assert target.audit.query(limit=1)[0].id == before + 1
        [entry] = [e for e in target.audit.query(limit=1000) if e.action == audit.INDEX_COPY]
        assert entry.target == "index" and "rows into" in entry.detail

    # Into a database that holds rows already: refused, nothing changed.
    again = cli("index", "copy", "--archive", str(root), "--to", target_url)
    assert again.returncode == 1
    assert again.stderr.startswith("callvault: error: the target index is not empty")
    assert len(again.stderr.strip().splitlines()) == 1

    # And back, from PostgreSQL into a new SQLite file, by the library.
    back_url = f"sqlite:///{tmp_path / 'back.db'}"
    with open_index(target_url) as source, open_index(back_url) as back:
        source.copy_into(back)
        assert back.row_counts() == source.row_counts()
        found = back.recordings.search(SearchFilters(number="1234567"), limit=50)
        assert [r.call_from for r in found] == ["0612345678"]  # SQLite's trigram table


def test_copy_is_refused_while_serve_runs_and_into_the_index_itself(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    built = build_archive(root)
    now = datetime.now(UTC)
    built.index.processes.register(node="n1", kind="node", hostname="h", pid=1, workers=0, now=now)
    built.index.close()
    target_url = pg_databases.create()
    refused = cli("index", "copy", "--archive", str(root), "--to", target_url)
    assert refused.returncode == 1
    assert "serve is running (node n1): stop it on every node first" in refused.stderr
    with open_index(target_url) as target:
        assert sum(target.row_counts().values()) == 0
    itself = cli(
        "index", "copy", "--archive", str(root), "--to", f"sqlite:///{root / 'callvault.db'}"
    )
    assert itself.returncode == 2 and "names the index being copied" in itself.stderr
