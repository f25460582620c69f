"""The index's tables, in SQLAlchemy Core.

The schema is meant to be read by a person who opens the SQLite file: one row in
``calls`` per call the PBX reported (by NewCdr event or CDR export), one row in
``recordings`` per recording file, one row in ``processes`` per callvault process that
claims download jobs (with its heartbeat), the registry of PBXs ``pbxs``, plus the web
app's ``users``, ``api_tokens``, ``web_sessions`` and the append-only ``audit_log``.
``settings`` holds small key/value
facts such as the receiver's secret path, the last event time and the PBX session health
(the keys are `callvault.index.SettingKey`).

Column lengths here are the only copy of the field limits: the index truncates and checks
values against these ``String(n)`` lengths (SQLite would not enforce them itself).

Timestamps are stored as timezone-aware UTC (``DateTime(timezone=True)``); the PBX's
own local wall-clock text is kept beside it (``timestart_local``) so nothing is lost.
Any change here needs an Alembic migration in ``callvault/index/migrations``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
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
    text,
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
# Deleted by the retention policy, an admin or a data-subject request: the row stays as a
# tombstone (hash, size, key, when and why: `deleted_at`, `deletion`); `purged_at` says
# when the stored object was removed.
DELETED = "deleted"
RECORDING_STATES = (PENDING, DOWNLOADING, ARCHIVED, FAILED, MISSING, DELETED)
# Those still waiting for (or given up on) a durable copy.
WAITING_STATES = (PENDING, DOWNLOADING, FAILED, MISSING)

calls = Table(
    "calls",
    metadata,
    Column("id", Integer, primary_key=True),
    # The PBX of the registry (`pbxs.id`) that reported the call; no foreign key: a PBX
    # taken off the registry leaves its calls archived.
    Column("pbx_id", Integer, nullable=False),
    # Asterisk-style unique id "epoch.seq", as the PBX sends it: unique per PBX only.
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
    UniqueConstraint("pbx_id", "callid", name="uq_calls_pbx_id_callid"),
)
Index("ix_calls_start_at", calls.c.start_at)
Index("ix_calls_call_from", calls.c.call_from)
Index("ix_calls_call_to", calls.c.call_to)

# Search structures beside the tables above, engine-specific, made by migration 0004 and
# kept out of the metadata: a number search matches part of a number, which only a
# trigram index can serve. On SQLite an FTS5 table (trigram tokenizer, external content:
# rowid = calls.id) kept in step with `calls` by triggers; on PostgreSQL GIN indexes of
# pg_trgm (absent if the server would not create the extension: searches then scan), whose
# lists of pending entries migration 0005 keeps short.
NUMBER_SEARCH_TABLE = "calls_numbers"
NUMBER_SEARCH_COLUMNS = ("call_from", "call_to", "did")
TRIGRAM_INDEXES = tuple(f"ix_calls_{name}_trgm" for name in NUMBER_SEARCH_COLUMNS)

recordings = Table(
    "recordings",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(255), nullable=False),  # exactly as the PBX names it
    Column("call_id", Integer, ForeignKey("calls.id", ondelete="CASCADE"), nullable=False),
    Column("pbx_id", Integer, nullable=False),  # its call's PBX: a name is unique per PBX
    Column("state", String(16), nullable=False, default=PENDING),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    # A worker's claim on a job: the worker's name and the process it belongs to (a row of
    # `processes`, deliberately no foreign key: the claim outlives a pruned process row).
    # The claim ends when that process is stopped or its heartbeat is stale; the lease
    # (`claimed_until`) is the last resort, e.g. for claims of no registered process.
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    Column("claim_process_id", Integer, nullable=True),
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
    # The audit chain's `archive` entry that attests this recording's hash, size and key
    # (its `seq`); None until archived, and for recordings archived before the chain began.
    Column("audit_seq", BigInteger, nullable=True),
    Column("deleted_at", DateTime(timezone=True), nullable=True),
    Column("purged_at", DateTime(timezone=True), nullable=True),
    Column("deletion", Text, nullable=True),  # why it was deleted, JSON
    # Encryption at rest: the recording's data key sealed with the master keyring
    # (context ``recording:<id>``); NULL when the stored file is the plaintext.
    Column("data_key", Text, nullable=True),
    UniqueConstraint("pbx_id", "name", name="uq_recordings_pbx_id_name"),
)
Index("ix_recordings_state_next", recordings.c.state, recordings.c.next_attempt_at)
Index("ix_recordings_call_id", recordings.c.call_id)
Index("ix_recordings_claim_process_id", recordings.c.claim_process_id)
Index("ix_recordings_audit_seq", recordings.c.audit_seq)

# Every process that claims jobs (`serve`, `backfill`...), one row per start; ids are never
# reused (AUTOINCREMENT on SQLite). A new start of the same node and kind marks the earlier
# rows stopped, so their claims are released at once.
processes = Table(
    "processes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("node", String(128), nullable=False),  # the node's name, by default the host name
    Column("kind", String(16), nullable=False),  # serve | backfill | ...
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("stopped_at", DateTime(timezone=True), nullable=True),
    Column("workers_configured", Integer, nullable=False, default=0),
    Column("workers_alive", Integer, nullable=False, default=0),
    Column("detail", Text, nullable=False, default="{}"),  # JSON
    sqlite_autoincrement=True,
)

# AUTOINCREMENT on SQLite: a removed user's id is never handed to a new user (SQLite would
# otherwise reuse the highest id); PostgreSQL's serial sequence never reuses one anyway.
users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False),
    Column("password_hash", String(255), nullable=False),  # argon2
    Column("role", String(16), nullable=False),  # admin, listener, auditor, auditor,listener
    # Extensions whose calls the user may see, e.g. "1000-1099,2001"; empty = every call.
    Column("scope", Text, nullable=False, default=""),
    # PBXs of the registry whose calls the user may see, by name, e.g. "paris,lyon";
    # empty = every PBX. `scope` applies within them.
    Column("pbxs", Text, nullable=False, default=""),
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
    # The hash chain (see `index.audit`): the entry's place, 1, 2, 3... with no gaps, and
    # SHA-256(previous entry's hash, this entry's fields). None only for entries written
    # by hand outside callvault, which `audit verify` reports.
    Column("seq", BigInteger, nullable=True),
    Column("hash", String(64), nullable=True),
)
Index("ix_audit_log_at", audit_log.c.at)
Index("ix_audit_log_seq", audit_log.c.seq, unique=True)

# The head of the audit chain: one row (id 1), the last entry's seq and hash. Appending
# updates it first, which queues concurrent writers (on every node) on its row lock.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
)

# Signed checkpoints of the audit chain: "the chain up to entry `seq` has hash `hash`",
# signed by the deployment's signing key `key_id` (Ed25519, Base64 `signature`).
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("key_id", String(16), nullable=False),
    Column("signature", Text, nullable=False),
    sqlite_autoincrement=True,
)
Index("ix_audit_checkpoints_seq", audit_checkpoints.c.seq)

# The deployment's signing keys (Ed25519; see `callvault.keys`): the public half as
# Base64, the private half sealed with the master key. The newest key not retired signs.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("id", String(16), primary_key=True),  # the first 16 hex digits of the fingerprint
    Column("public_key", Text, nullable=False),
    Column("private_sealed", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("retired_at", DateTime(timezone=True), nullable=True),
)

# Live web sessions: a session cookie is honoured only while its row is here (and unexpired),
# so the signing secret alone cannot make a session for a user who never logged in. Only the
# SHA-256 of the cookie's random nonce is kept. Logging out deletes the row.
web_sessions = Table(
    "web_sessions",
    metadata,
    Column("nonce_sha256", String(64), primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)
Index("ix_web_sessions_user_id", web_sessions.c.user_id)
Index("ix_web_sessions_expires_at", web_sessions.c.expires_at)


def column_length(column: Column[Any]) -> int:
    """The length ``n`` of a ``String(n)`` column: the one copy of each field limit."""
    column_type = column.type
    if not isinstance(column_type, String) or column_type.length is None:
        raise TypeError(f"{column} has no length")
    return int(column_type.length)


settings = Table(
    "settings",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


# The registry of PBXs (`callvault pbx add ...`): how to reach and trust each one. Its API
# password is sealed with the deployment's master key (`callvault.keys`), never kept in
# clear. `serial` is what the PBX's reports name it (the `sn` field), learned from them.
pbxs = Table(
    "pbxs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(32), nullable=False),  # a short slug: lowercase, digits, dashes
    # Which API it speaks: s-series, cloud (S-Series based, refresh tokens) or p-series.
    Column("kind", String(16), nullable=False, server_default="s-series"),
    Column("url", String(255), nullable=False),
    Column("username", String(64), nullable=False),
    Column("password_sealed", Text, nullable=False),
    Column("api_version", String(16), nullable=False),
    # How its certificate is trusted: a CA file, a SHA-256 pin, or not at all (insecure).
    Column("ca_file", String(1024), nullable=True),
    Column("pin_sha256", String(64), nullable=True),
    Column("insecure", Boolean(create_constraint=False), nullable=False, default=False),
    Column("tls_min_version", String(8), nullable=False, default="1.2"),
    Column("timezone", String(64), nullable=True),  # None: the deployment's (--timezone)
    Column("max_downloads", Integer, nullable=False, default=2),
    # The secret path its reports are posted to, and who may post them ("" = the PBX's
    # own address; otherwise addresses or networks, comma-separated).
    Column("events_path", String(64), nullable=False),
    Column("events_allow", Text, nullable=False, default=""),
    # HOST:PORT it is told to post its reports to (e.g. a load balancer before the nodes);
    # NULL: the node that logged in.
    Column("report_url", String(255), nullable=True),
    # A P-Series PBX's live tokens, sealed (pbx:<name>:tokens): reused across restarts and
    # nodes, so the application's eight tokens are not spent. NULL: none.
    Column("tokens_sealed", Text, nullable=True),
    # An S-Series v2 PBX set to report over TCP: the port on it serve connects to for its
    # reports. NULL: it posts them over HTTP.
    Column("tcp_report_port", Integer, nullable=True),
    # A P-Series PBX's webhook Secret (it signs each event it pushes), sealed
    # (pbx:<name>:webhook): its webhooks are taken at `events_path`. NULL: none.
    Column("webhook_secret_sealed", Text, nullable=True),
    Column("serial", String(64), nullable=False, default=""),
    Column("detail", Text, nullable=False, default="{}"),  # what `pbx test` found last, JSON
    # Its API session's health as the serve archiving it last reported it, JSON.
    Column("session", Text, nullable=False, default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("name", name="uq_pbxs_name"),
    UniqueConstraint("events_path", name="uq_pbxs_events_path"),
    sqlite_autoincrement=True,
)

# Which node owns each PBX's API session (see `index.leases`): made on first acquisition.
pbx_leases = Table(
    "pbx_leases",
    metadata,
    Column(
        "pbx_id",
        Integer,
        ForeignKey("pbxs.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    Column("node", String(128), nullable=True),  # None: released
    # Acquisitions so far: the fencing token of the current holder.
    Column("token", BigInteger, nullable=False, server_default=text("0")),
    Column("acquired_at", DateTime(timezone=True), nullable=True),
    Column("expires_at", DateTime(timezone=True), nullable=True),
)

# Alerts (see `index.alerts`): a condition, when it was first seen, told and cleared.
# History to archive, asked of the node that works on a PBX (`callvault backfill` while
# `serve` runs): that node reads it with its own API session, so the PBX never sees a
# second login. One row per request; `progress` is JSON (windows done and in all, calls,
# queued).
BACKFILL_STATES = ("waiting", "running", "done", "failed")
backfill_requests = Table(
    "backfill_requests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("pbx_id", Integer, ForeignKey("pbxs.id", ondelete="CASCADE"), nullable=False),
    Column("since", DateTime(timezone=True), nullable=False),
    Column("until", DateTime(timezone=True), nullable=False),
    Column("requested_by", String(64), nullable=False, server_default=text("''")),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("state", String(16), nullable=False),  # one of BACKFILL_STATES
    Column("node", String(128), nullable=True),  # the node working on it (or that did)
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("progress", Text, nullable=False, server_default=text("'{}'")),
    Column("error", Text, nullable=False, server_default=text("''")),
    sqlite_autoincrement=True,
)
Index("ix_backfill_requests_pbx_state", backfill_requests.c.pbx_id, backfill_requests.c.state)

alerts = Table(
    "alerts",
    metadata,
    Column("key", String(160), primary_key=True),  # e.g. pbx:paris:down, node:site-2:gone
    Column("summary", Text, nullable=False, server_default=text("''")),
    Column("detail", Text, nullable=False, server_default=text("''")),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    Column("fired_at", DateTime(timezone=True), nullable=True),  # told (None: not yet)
    Column("resolved_at", DateTime(timezone=True), nullable=True),  # cleared
)

# The retention policy's versions: each change of the rules is a new row (id = version);
# the newest is in force. `rules` is JSON (see `callvault.index.retention`).
retention_policies = Table(
    "retention_policies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("rules", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(64), nullable=False, server_default=text("''")),
    Column("note", Text, nullable=False, server_default=text("''")),
    sqlite_autoincrement=True,
)

# Legal holds and the recordings each holds; a held recording is never deleted.
holds = Table(
    "holds",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("case_name", String(128), nullable=False),
    Column("reason", Text, nullable=False),
    Column("selection", Text, nullable=False, server_default=text("''")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(64), nullable=False, server_default=text("''")),
    Column("released_at", DateTime(timezone=True), nullable=True),
    Column("released_by", String(64), nullable=True),
    Column("release_reason", Text, nullable=True),
    sqlite_autoincrement=True,
)
hold_recordings = Table(
    "hold_recordings",
    metadata,
    Column("hold_id", Integer, ForeignKey("holds.id", ondelete="CASCADE"), primary_key=True),
    Column(
        "recording_id",
        Integer,
        ForeignKey("recordings.id", ondelete="CASCADE"),
        primary_key=True,
    ),
)
Index("ix_hold_recordings_recording_id", hold_recordings.c.recording_id)
