"""Throwaway index databases for the tests: PostgreSQL databases made and dropped through the
server's maintenance database, and one shared migrated database emptied between tests.

The server is ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres`` (trust auth) unless
CALLVAULT_TEST_PG_URL names another SQLAlchemy URL of a maintenance database.
"""

from __future__ import annotations

import itertools
import os
import secrets

from sqlalchemy import URL, Connection, create_engine, make_url, text
from sqlalchemy.pool import NullPool

from callvault.index import open_index
from callvault.index.schema import metadata

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def pg_server_url() -> URL:
    return make_url(os.environ.get("CALLVAULT_TEST_PG_URL", DEFAULT_PG_URL))


class PgDatabases:
    """Creates and drops uniquely named databases through the server's maintenance database.

    Creating, migrating and dropping a database costs about 0.13 s; `shared()` is one
    migrated database that `empty_shared()` truncates (about 0.01 s) for the next test.
    """

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
        self._shared: str | None = None
        self.live: set[str] = set()

    def check(self) -> None:
        with self._admin.connect() as conn:
            conn.execute(text("SELECT 1"))

    def create(self) -> str:
        """The URL of a new, empty database (no tables)."""
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

    def shared(self) -> str:
        """The URL of the one database of this session that holds the newest schema."""
        if self._shared is None:
            url = self.create()
            open_index(url).close()
            self._shared = url
        return self._shared

    def empty_shared(self) -> str:
        """`shared()`, with every table emptied and every id sequence restarted."""
        url = self.shared()
        tables = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                # A test that left a transaction open would block TRUNCATE: fail instead.
                conn.execute(text("SET LOCAL lock_timeout = '10s'"))
                conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        finally:
            engine.dispose()
        return url

    def close(self) -> None:
        try:
            for name in sorted(self.live):
                self.drop(name)
        finally:
            self._admin.dispose()


def migrate(url: str, target: str, *, down: bool = False) -> None:
    """Run the index's migrations up or down to `target` on `url`, as `open_index` does (in
    one write transaction, with SQLite's foreign keys off until it commits)."""
    from alembic import command
    from alembic.config import Config

    from callvault.index import sqlite_path
    from callvault.index._db import Database, make_engine
    from callvault.index._index import MIGRATIONS, run_migrations

    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    db = Database(make_engine(url), url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))

    def run(conn: Connection) -> None:
        config.attributes["connection"] = conn
        if down:
            command.downgrade(config, target)
        else:
            command.upgrade(config, target)

    try:
        run_migrations(db, run)
    finally:
        db.engine.dispose()
