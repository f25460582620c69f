"""Fixtures shared by every test module.

Index fixtures run a test on both engines: `index` (an open, empty index), `db_url` (the URL
of an empty index database, for tests that open several `Index`es on it) and `empty_db_url`
(a database without any table, for migration tests), each parametrized as
``[sqlite]`` (a file in the test's tmp_path) and ``[postgresql]`` (the machine's PostgreSQL
server, see `support.databases`). The PostgreSQL ones FAIL, never skip, when psycopg is
missing or the server does not answer (``scripts/test`` starts the local server when down).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url
from sqlalchemy.exc import OperationalError

from callvault.index import Index, open_index
from support.databases import PgDatabases, pg_server_url

# Fixtures of the helper package tests/support (plain modules; no test module imports
# another): `connect` (a fake PBX over real HTTP), `sim` (the simulator over HTTPS) and
# `browser` (a headless Chromium for the web pages), `events_sim` (the simulator, re-sending
# unanswered reports quickly, for the archiver).
pytest_plugins = [
    "support.pbx_fakes",
    "support.pbx_sim",
    "support.browser",
    "support.archive",
    "support.s3",
]

# Settings of the test suite itself (CALLVAULT_TEST_PG_URL, CALLVAULT_TEST_SEED), not of
# callvault: these are read from the outer environment on purpose.
_TEST_SETTINGS_PREFIX = "CALLVAULT_TEST_"


@pytest.fixture(autouse=True)
def _no_callvault_settings_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CALLVAULT_* variable of the developer's shell (CALLVAULT_PBX, CALLVAULT_PASSWORD,
    CALLVAULT_EVENTS_LISTEN...) must not reach the commands under test: with it, `serve`
    could log in to a real PBX or listen on another address than 127.0.0.1. Every test
    starts without them; a test sets what it needs itself."""
    for name in list(os.environ):
        if name.upper().startswith("CALLVAULT_") and not name.upper().startswith(
            _TEST_SETTINGS_PREFIX
        ):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _unfreeze_the_collector() -> Iterator[None]:
    """A service run in-process (CliRunner) freezes what exists when it starts out of the
    garbage collector's passes, as it should in its own process: here that would be the
    whole test session, never collected again. Unfrozen after each test."""
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _restore_callvault_logging() -> Iterator[None]:
    """Commands run in-process (CliRunner) point the `callvault` logger at the stderr of
    their run; put it back so a later test does not log into a closed stream."""
    loggers = [logging.getLogger(name) for name in ("callvault", "callvault.pbx")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


ENGINES = [pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql")]


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    """The PostgreSQL server's throwaway databases; fails the test when it is unreachable."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("psycopg is not installed: pip install -e '.[dev]'", pytrace=False)
    url = pg_server_url()
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


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty SQLite index, copied for each test (faster than migrating again)."""
    path = tmp_path_factory.mktemp("template") / "callvault.db"
    open_index(f"sqlite:///{path}").close()
    return path


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty index database of the newest schema, on each engine."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        path = tmp_path / "callvault.db"
        shutil.copyfile(template, path)
        path.chmod(0o600)
        return f"sqlite:///{path}"
    databases: PgDatabases = request.getfixturevalue("pg_databases")
    return databases.empty_shared()


@pytest.fixture
def index(db_url: str) -> Iterator[Index]:
    """An open, empty index on each engine; closed after the test."""
    opened = open_index(db_url)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(params=ENGINES)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a database without any table (a new SQLite file, or a new PostgreSQL
    database dropped afterwards, pass or fail): for migration tests."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'archive' / 'callvault.db'}"
        return
    databases: PgDatabases = request.getfixturevalue("pg_databases")
    url = databases.create()
    try:
        yield url
    finally:
        name = make_url(url).database
        assert name is not None
        databases.drop(name)
