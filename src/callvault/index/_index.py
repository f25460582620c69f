"""`open_index` and the `Index`: every call and recording the archiver knows about.

The `Index` owns the engine and exposes one store per subject (`calls`, `jobs`,
`recordings`, `settings`, `users`, `tokens`, `sessions`, `audit`, `processes`, `pbxs`,
`leases`, `notices`, `alerts`, `backfills`, `signing_keys`, `retention`). Every
store method is synchronous SQLAlchemy Core in one short transaction, safe to call from
several threads (one connection per call from the engine's pool) and from several
processes on the same database; see `callvault.index._db` for how writes queue.

Datetimes given to the index must be timezone-aware; they are stored as UTC and come back
as aware UTC datetimes on every engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError

from callvault.index._db import (
    SUPPORTED_DIALECTS,
    Database,
    make_engine,
    prepare_sqlite_file,
    redact,
    sqlite_path,
)
from callvault.index._errors import IndexMissingError, IndexOpenError
from callvault.index._recordings import RecordingStore
from callvault.index._settings import SettingsStore
from callvault.index._statistics import Statistics

if TYPE_CHECKING:
    from callvault.index._alerts import AlertStore
    from callvault.index._audit import AuditStore
    from callvault.index._backfills import BackfillStore
    from callvault.index._calls import CallStore
    from callvault.index._jobs import JobStore
    from callvault.index._leases import LeaseStore
    from callvault.index._notices import JobNotices
    from callvault.index._pbxs import PbxStore
    from callvault.index._processes import ProcessStore
    from callvault.index._retention import RetentionStore
    from callvault.index._signing import SigningKeyStore
    from callvault.index._users import SessionStore, TokenStore, UserStore

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The newest migration: an index already at it opens without loading Alembic (about a
# third of a second), so commands such as `callvault list` start quickly. A test checks
# that this is the head of the migrations.
SCHEMA_REVISION = "0017"


def open_index(url: str, *, create: bool = True) -> Index:
    """Open the index at `url`, creating it and migrating it to the newest schema.

    `url` is an SQLAlchemy URL such as ``sqlite:////srv/archive/callvault.db``. With
    `create` False a missing SQLite file raises `IndexMissingError` instead of being made
    (for read-only commands such as ``callvault list``). Raises `IndexOpenError` when the
    database cannot be opened and `IndexCorruptError` when it is damaged; both are
    `IndexFailure`s with a one-line message. Close the result with `close()`.
    """
    try:
        path = sqlite_path(url)
    except ArgumentError as exc:
        raise IndexOpenError(f"not a database URL: {redact(url)}") from exc
    if path is not None:
        if not create and not path.exists():
            raise IndexMissingError(f"no index database at {path}")
        prepare_sqlite_file(path)
    backend = make_url(url).get_backend_name()
    if backend not in SUPPORTED_DIALECTS:
        raise IndexOpenError(f"the index needs SQLite or PostgreSQL, not {backend}: {redact(url)}")
    try:
        engine = make_engine(url)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise IndexOpenError(f"unsupported database URL: {redact(url)}") from exc
    except ImportError as exc:
        raise IndexOpenError(
            f"the database driver for {redact(url)} is not installed ({exc.name}); "
            "for PostgreSQL: pip install 'callvault[postgres]' and a postgresql+psycopg:// URL"
        ) from exc
    index = Index(engine, url)
    try:
        index.migrate()
        index.statistics.at_open()
    except IndexOpenError:
        engine.dispose()
        raise
    except SQLAlchemyError as exc:
        engine.dispose()
        detail = str(exc.orig) if isinstance(exc, OperationalError) else type(exc).__name__
        reason = " ".join(detail.split())  # one line, whatever the driver says
        raise IndexOpenError(f"cannot open the index at {redact(url)}: {reason}") from exc
    except BaseException:
        engine.dispose()
        raise
    return index


class Index:
    """The archive's database. Build it with `open_index`; see the module docstring."""

    def __init__(self, engine: Engine, url: str) -> None:
        self._db = Database(engine, url)
        self.settings = SettingsStore(self._db)
        self.statistics = Statistics(self._db, self.settings)
        self.recordings = RecordingStore(self._db, self.statistics)

    # The other stores are built, and their modules imported, on first use: a command that
    # only reads recordings (`callvault list`) does not pay for users, audit or call parsing.

    @functools.cached_property
    def calls(self) -> CallStore:
        from callvault.index._calls import CallStore

        return CallStore(self._db, self.statistics)

    @functools.cached_property
    def jobs(self) -> JobStore:
        from callvault.index._jobs import JobStore

        return JobStore(self._db)

    @functools.cached_property
    def users(self) -> UserStore:
        from callvault.index._users import UserStore

        return UserStore(self._db)

    @functools.cached_property
    def tokens(self) -> TokenStore:
        from callvault.index._users import TokenStore

        return TokenStore(self._db)

    @functools.cached_property
    def sessions(self) -> SessionStore:
        from callvault.index._users import SessionStore

        return SessionStore(self._db)

    @functools.cached_property
    def alerts(self) -> AlertStore:
        from callvault.index._alerts import AlertStore

        return AlertStore(self._db)

    @functools.cached_property
    def audit(self) -> AuditStore:
        from callvault.index._audit import AuditStore

        return AuditStore(self._db)

    @functools.cached_property
    def pbxs(self) -> PbxStore:
        from callvault.index._pbxs import PbxStore

        return PbxStore(self._db)

    @functools.cached_property
    def backfills(self) -> BackfillStore:
        from callvault.index._backfills import BackfillStore

        return BackfillStore(self._db)

    @functools.cached_property
    def leases(self) -> LeaseStore:
        from callvault.index._leases import LeaseStore

        return LeaseStore(self._db)

    @functools.cached_property
    def notices(self) -> JobNotices:
        from callvault.index._notices import JobNotices

        return JobNotices(self._db)

    @functools.cached_property
    def retention(self) -> RetentionStore:
        from callvault.index._retention import RetentionStore

        return RetentionStore(self._db)

    @functools.cached_property
    def signing_keys(self) -> SigningKeyStore:
        from callvault.index._signing import SigningKeyStore

        return SigningKeyStore(self._db)

    @functools.cached_property
    def processes(self) -> ProcessStore:
        from callvault.index._processes import ProcessStore

        return ProcessStore(self._db)

    def __repr__(self) -> str:
        return f"Index({redact(self._db.url)})"

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine: an escape hatch for tests and migrations only; everything
        else goes through the stores."""
        return self._db.engine

    @property
    def dialect(self) -> Literal["sqlite", "postgresql"]:
        """The database engine: "sqlite" or "postgresql"."""
        return cast(Literal["sqlite", "postgresql"], self._db.dialect)

    @property
    def redacted_url(self) -> str:
        """Where the index is, as it may be shown (without a password)."""
        return redact(self._db.url)

    def copy_into(
        self, target: Index, *, progress: Callable[[str, int, int], None] | None = None
    ) -> dict[str, int]:
        """Copy every row of this index into `target`, an empty index (see
        `callvault.index._copy`); the rows copied per table. IndexCopyError (one line) if
        `target` holds rows already. `progress(table, done, total)` after each batch."""
        from callvault.index._copy import copy_rows

        return copy_rows(self._db, target._db, progress=progress)

    def row_counts(self) -> dict[str, int]:
        """How many rows each table holds."""
        from callvault.index._copy import row_counts

        return row_counts(self._db)

    def check(self, *, quick: bool = True) -> list[str]:
        """Problems the database finds in itself; [] when it is fine.

        SQLite runs ``PRAGMA quick_check`` (seconds on a large file), or with `quick` False
        the thorough ``PRAGMA integrity_check``; PostgreSQL, whose server guards its own
        pages, a trivial query. A damaged database gives the driver's words, not an error.
        """
        return self._db.check(quick=quick)

    def close(self) -> None:
        """Release every pooled connection, once a gathering of statistics has ended."""
        self.statistics.wait(timeout=60)
        self._db.engine.dispose()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def schema_revision(self) -> str | None:
        """The migration the database is at (None for an empty database)."""
        with self._db.read() as conn:
            if not self._db.engine.dialect.has_table(conn, "alembic_version"):
                return None
            value = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return None if value is None else str(value)

    def migrate(self) -> None:
        """Bring the schema to the newest migration (done by `open_index`); IndexOpenError
        if the database is at a migration this callvault does not know (a newer one's)."""
        if self.schema_revision() == SCHEMA_REVISION:
            return
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))

        def upgrade(conn: Connection) -> None:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

        try:
            run_migrations(self._db, upgrade)
        except CommandError as exc:
            raise IndexOpenError(
                f"the index at {redact(self._db.url)} has a schema this callvault does not "
                f"know (made by a newer version?): {exc}"
            ) from None


def run_migrations(db: Database, migrate: Callable[[Connection], None]) -> None:
    """Run `migrate` (Alembic on the connection it is given) in one write transaction,
    holding the write lock so that two processes do not race on it.

    On SQLite foreign keys are off meanwhile, as SQLite's own procedure for changing a
    table has it: a migration that copies a table into a new one (SQLite can change little
    in place) drops the old one, and with foreign keys on that drop would delete every row
    referring to it (ON DELETE CASCADE). They can only be switched outside a transaction,
    and are checked before the migration commits.
    """
    if db.dialect != "sqlite":
        with db.write() as conn:
            migrate(conn)
        return
    with db.engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.execute("PRAGMA foreign_keys = OFF")
        try:
            conn.execution_options(callvault_begin="immediate")
            with conn.begin():
                migrate(conn)
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise IndexOpenError(
                        f"migrating the index at {redact(db.url)} would leave {len(broken)} "
                        "rows pointing at rows that do not exist; nothing was changed"
                    )
        finally:
            raw.execute("PRAGMA foreign_keys = ON")
