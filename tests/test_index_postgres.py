"""The index on PostgreSQL: migrations, upserts, SKIP LOCKED claims and scope search.

A throwaway server is started with initdb/pg_ctl on 127.0.0.1 (as the `postgres` user when
running as root); the tests are skipped where PostgreSQL or psycopg is not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from callvault.index import Index, SearchFilters, open_index
from callvault.index.schema import ARCHIVED, metadata
from callvault.pbx._types import CallDetail

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    pytest.importorskip("psycopg")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries not installed")
    prefix: list[str] = []
    # Not under pytest's tmp dir: the postgres user must be able to reach it.
    base = Path(tempfile.mkdtemp(prefix="callvault-pg-"))
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser")
        prefix = [runuser, "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        base.chmod(0o700)
    data = base / "data"
    port = _free_port()
    subprocess.run(
        [*prefix, initdb, "-D", str(data), "-U", "callvault", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off"
    subprocess.run(
        [*prefix, pg_ctl, "-D", str(data), "-o", options, "-w", "-l", str(base / "log"), "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://callvault@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: str, request: pytest.FixtureRequest) -> str:
    name = "t_" + request.node.name.lower().replace("[", "_").replace("]", "")[:50]
    index = open_index(f"{pg_server}/postgres")
    with index.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    index.close()
    return f"{pg_server}/{name}"


@pytest.fixture
def index(pg_url: str) -> Iterator[Index]:
    idx = open_index(pg_url)
    yield idx
    idx.close()


def queue(index: Index, count: int) -> list[int]:
    results = index.record_calls(
        [
            CallDetail(
                callid=f"1714564800.{i}",
                timestart="2024-05-01 14:00:00",
                callfrom=str(1000 + i),
                callto="2001",
                recording=f"rec-{i}.wav",
                sn="SN1",
            )
            for i in range(count)
        ],
        source="event",
        tz=ZoneInfo("Europe/Berlin"),
        now=NOW,
    )
    return [r.recording_id for r in results if r.recording_id is not None]


def test_migrations_match_metadata_on_postgresql(index: Index) -> None:
    with index.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), metadata
        )
    assert diff == []


def test_record_claim_archive_search_on_postgresql(index: Index) -> None:
    ids = queue(index, 3)
    again = index.record_calls(
        [CallDetail(callid="1714564800.0", recording="rec-0.wav", didnumber="555")],
        source="cdr",
        tz=UTC_ZONE,
        now=NOW,
    )
    assert again[0].recording_id == ids[0] and not again[0].new_recording
    row = index.recording_by_id(ids[0])
    assert row is not None
    assert (row.did, row.call_from, row.start_at) == ("555", "1000", NOW)
    jobs = index.claim_jobs("w1", 2, now=NOW, lease=LEASE)
    assert [j.recording_id for j in jobs] == ids[:2]
    assert index.mark_archived(
        ids[0],
        worker_id="w1",
        size=5,
        sha256="d" * 64,
        storage_key="k",
        content_type="audio/wav",
        now=NOW,
    )
    assert not index.mark_archived(
        ids[1],
        worker_id="other",
        size=5,
        sha256="d" * 64,
        storage_key="k",
        content_type="audio/wav",
        now=NOW,
    )
    assert index.counts_by_state()[ARCHIVED] == 1
    found = index.search(SearchFilters(scope=[(1001, 1002)]))
    assert sorted(r.call_from for r in found) == ["1001", "1002"]
    assert index.count(SearchFilters(number="55")) == 1
    index.set_setting("pbx_health", "{}", NOW)
    index.set_setting("pbx_health", '{"ok": true}', NOW)
    assert index.get_setting("pbx_health") == '{"ok": true}'


def test_concurrent_claims_skip_locked_never_share(pg_url: str) -> None:
    setup = open_index(pg_url)
    ids = set(queue(setup, 120))
    setup.close()
    indexes = [open_index(pg_url) for _ in range(3)]
    claimed: list[list[int]] = [[] for _ in indexes]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(indexes))

    def work(n: int) -> None:
        try:
            barrier.wait()
            while jobs := indexes[n].claim_jobs(f"w{n}", 4, now=NOW, lease=LEASE):
                claimed[n].extend(job.recording_id for job in jobs)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(indexes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for idx in indexes:
        idx.close()
    assert errors == []
    everything = [rid for part in claimed for rid in part]
    assert sorted(everything) == sorted(ids)
    assert len(set(everything)) == len(everything)


UTC_ZONE = ZoneInfo("UTC")
