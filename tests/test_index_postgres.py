"""The index on PostgreSQL: migrations, upserts, SKIP LOCKED claims and scope search.

The tests run against the machine's PostgreSQL server, by default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres`` (trust auth); set
CALLVAULT_TEST_PG_URL to another SQLAlchemy URL of a maintenance database to use another
server. Each test gets a fresh database ``callvault_test_<random>_<n>``, created through
that URL and dropped afterwards, pass or fail. The tests FAIL, never skip, when psycopg is
missing or the server does not answer (``scripts/test`` starts the local one when it is down).
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import URL, create_engine, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from callvault.index import Index, SearchFilters, open_index
from callvault.index.schema import ARCHIVED, metadata
from callvault.pbx._types import CallDetail

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


class PgDatabases:
    """Creates and drops uniquely named databases through the server's maintenance database."""

    def __init__(self, url: URL) -> None:
        self._url = url
        self._admin = create_engine(
            url,
            isolation_level="AUTOCOMMIT",
            poolclass=NullPool,
            connect_args={"connect_timeout": 10},
        )
        # Unique per session, so two runs on one server (a CI clone next to a working
        # tree) never touch each other's databases.
        self._prefix = f"callvault_test_{secrets.token_hex(4)}"
        self._numbers = itertools.count(1)
        self.live: set[str] = set()

    def check(self) -> None:
        with self._admin.connect() as conn:
            conn.execute(text("SELECT 1"))

    def create(self) -> str:
        name = f"{self._prefix}_{next(self._numbers)}"
        self.live.add(name)
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        return self._url.set(database=name).render_as_string(hide_password=False)

    def drop(self, name: str) -> None:
        with self._admin.connect() as conn:
            # FORCE: a test that failed half-way may have left a connection open.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.live.discard(name)

    def close(self) -> None:
        try:
            for name in sorted(self.live):
                self.drop(name)
        finally:
            self._admin.dispose()


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("psycopg is not installed: pip install -e '.[dev]'", pytrace=False)
    url = make_url(os.environ.get("CALLVAULT_TEST_PG_URL", DEFAULT_PG_URL))
    databases = PgDatabases(url)
    try:
        try:
            databases.check()
            problem = ""
        except OperationalError as exc:
            problem = str(exc.orig).replace("\n", " ")
        if problem:
            pytest.fail(
                f"PostgreSQL at {url.render_as_string(hide_password=True)} is not reachable "
                f"({problem}). Start it (pg_ctlcluster --skip-systemctl-redirect "
                "$(ls /etc/postgresql) main start; scripts/test does this) or point "
                "CALLVAULT_TEST_PG_URL at a server.",
                pytrace=False,
            )
        yield databases
    finally:
        databases.close()


@pytest.fixture
def pg_url(pg_databases: PgDatabases) -> Iterator[str]:
    """The URL of a fresh, empty database for this test alone, dropped after it."""
    url = pg_databases.create()
    try:
        yield url
    finally:
        name = make_url(url).database
        assert name is not None
        pg_databases.drop(name)


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
    # Every worker holds a first batch before any goes on, so they really interleave
    # (otherwise one thread can, by scheduling alone, claim all 120 before the others start
    # and "never share" would hold trivially).
    first_round = threading.Barrier(len(indexes))

    def work(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            rounds = 0
            while True:
                jobs = indexes[n].claim_jobs(f"w{n}", 4, now=NOW, lease=LEASE)
                claimed[n].extend(job.recording_id for job in jobs)
                rounds += 1
                if rounds == 1:
                    first_round.wait(timeout=30)
                if not jobs:
                    return
        except BaseException as exc:
            errors.append(exc)
            first_round.abort()  # the others fail at once instead of waiting out the timeout

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(indexes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for idx in indexes:
        idx.close()
    assert errors == []
    assert not any(thread.is_alive() for thread in threads)
    assert all(claimed), [len(part) for part in claimed]
    everything = [rid for part in claimed for rid in part]
    assert sorted(everything) == sorted(ids)
    assert len(set(everything)) == len(everything)


UTC_ZONE = ZoneInfo("UTC")
