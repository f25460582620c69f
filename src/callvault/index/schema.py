"""The index's tables, in SQLAlchemy Core.

The schema is meant to be read by a person who opens the SQLite file: one row in
``calls`` per call the PBX reported (by NewCdr event or CDR export), one row in
``recordings`` per recording file, plus the web app's ``users``, ``api_tokens``,
``revoked_sessions`` and the append-only ``audit_log``. ``settings`` holds small
key/value facts such as the receiver's secret path, the last event time and the PBX
session health.

Timestamps are stored as timezone-aware UTC (``DateTime(timezone=True)``); the PBX's
own local wall-clock text is kept beside it (``timestart_local``) so nothing is lost.
Any change here needs an Alembic migration in ``callvault/index/migrations``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

# Naming convention so Alembic migrations get stable constraint names on every engine.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Recording states, in the order a recording normally moves through them.
PENDING = "pending"
DOWNLOADING = "downloading"
ARCHIVED = "archived"
FAILED = "failed"  # gave up after transient errors; `last_error` says why; retried by reconcile
MISSING = "missing"  # the PBX said the file does not exist for long enough to believe it
RECORDING_STATES = (PENDING, DOWNLOADING, ARCHIVED, FAILED, MISSING)

calls = Table(
    "calls",
    metadata,
    Column("id", Integer, primary_key=True),
    # Asterisk-style unique id "epoch.seq", as the PBX sends it.
    Column("callid", String(64), nullable=False),
    Column("pbx_serial", String(64), nullable=False, default=""),
    # Call start: aware UTC, and the PBX's local wall-clock text it came from.
    Column("start_at", DateTime(timezone=True), nullable=True),
    Column("timestart_local", String(32), nullable=False, default=""),
    Column("call_from", String(128), nullable=False, default=""),
    Column("call_to", String(128), nullable=False, default=""),
    Column("duration_s", Integer, nullable=True),  # ring + talk, seconds
    Column("talk_s", Integer, nullable=True),  # talk time, seconds
    # Inbound / Outbound / Internal / Callback / Transfer, as the PBX spells it.
    Column("direction", String(16), nullable=False, default=""),
    # ANSWERED / NO ANSWER / BUSY / FAILED / VOICEMAIL, normalised spelling.
    Column("status", String(16), nullable=False, default=""),
    Column("src_trunk", String(128), nullable=False, default=""),
    Column("dst_trunk", String(128), nullable=False, default=""),
    Column("did", String(128), nullable=False, default=""),
    Column("pincode", String(64), nullable=False, default=""),
    Column("agent_ring_s", Integer, nullable=True),
    Column("source", String(16), nullable=False, default="event"),  # event | cdr
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    Column("raw", Text, nullable=False, default="{}"),  # the fields as received, JSON
    UniqueConstraint("callid", name="uq_calls_callid"),
)
Index("ix_calls_start_at", calls.c.start_at)
Index("ix_calls_call_from", calls.c.call_from)
Index("ix_calls_call_to", calls.c.call_to)

recordings = Table(
    "recordings",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(255), nullable=False),  # exactly as the PBX names it
    Column("call_id", Integer, ForeignKey("calls.id", ondelete="CASCADE"), nullable=False),
    Column("state", String(16), nullable=False, default=PENDING),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    # A worker's claim on a job: a crashed worker's lease runs out and the job is claimable again.
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    # When the PBX first said "does not exist" in the current run of such answers.
    Column("missing_since", DateTime(timezone=True), nullable=True),
    Column("size", BigInteger, nullable=True),
    Column("sha256", String(64), nullable=True),
    Column("storage_key", String(1024), nullable=True),
    Column("content_type", String(64), nullable=True),
    Column("archived_at", DateTime(timezone=True), nullable=True),
    Column("verified_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("name", name="uq_recordings_name"),
)
Index("ix_recordings_state_next", recordings.c.state, recordings.c.next_attempt_at)
Index("ix_recordings_call_id", recordings.c.call_id)

# AUTOINCREMENT on SQLite: a removed user's id is never handed to a new user (SQLite would
# otherwise reuse the highest id); PostgreSQL's serial sequence never reuses one anyway.
users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False),
    Column("password_hash", String(255), nullable=False),  # argon2
    Column("role", String(16), nullable=False),  # admin | listener
    # Extensions whose calls the user may see, e.g. "1000-1099,2001"; empty = all.
    Column("scope", Text, nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
    # Random, in every session cookie of the user; a new one (a new password, a new user)
    # ends all the sessions made before.
    Column("session_epoch", String(32), nullable=False),
    UniqueConstraint("name", name="uq_users_name"),
    sqlite_autoincrement=True,
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("label", String(128), nullable=False, default=""),
    Column("token_sha256", String(64), nullable=False),  # only the hash is kept
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(64), nullable=False, default=""),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("token_sha256", name="uq_api_tokens_token_sha256"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(64), nullable=False, default=""),  # user name, or "" if unknown
    Column("action", String(32), nullable=False),  # login, login_failed, play, download, ...
    Column("target", String(255), nullable=False, default=""),  # recording name, user name...
    Column("detail", Text, nullable=False, default=""),
    Column("remote_addr", String(64), nullable=False, default=""),
)
Index("ix_audit_log_at", audit_log.c.at)

# Web sessions that were logged out, until they would have expired anyway, so every app
# over this index (`serve`, `web`, a restart) refuses their cookies.
revoked_sessions = Table(
    "revoked_sessions",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)
Index("ix_revoked_sessions_expires_at", revoked_sessions.c.expires_at)

settings = Table(
    "settings",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
