"""The audit log: who did what, to what, when and from where: its actions and entries.

The store is `index.audit`; it is append-only from the app's side: it can add entries and
read them, and has no way to change or delete one. Every play, download, export, login
(success and failure), token and user change, and every CSV export of this log, is
recorded through ``index.audit.record``.

The log is a hash chain, so that a change made behind callvault's back (in the database
itself) shows. Entry ``seq`` (1, 2, 3... with no gaps) carries

    hash = SHA-256(previous entry's hash + "\n" + canonical(entry))

(`entry_hash`; the entry before the first is `GENESIS`), where the canonical form is the
JSON array ``[seq, at, actor, action, target, detail, remote_addr]`` with ``at`` in UTC as
``YYYY-MM-DDTHH:MM:SS.ffffffZ``, ASCII only, no spaces. Changing, removing, inserting or
moving an entry breaks the chain at that entry; rewriting the chain from there on is
caught by the next signed checkpoint (`checkpoint_message`, signed with the deployment's
Ed25519 key).

Each archived recording has an `ARCHIVE` entry whose detail (`attestation`) gives its
SHA-256, size and storage key, and the recording row points at it (``audit_seq``): a hash
or size altered in the index no longer matches the chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

LOGIN = "login"
LOGIN_FAILED = "login_failed"
LOGIN_THROTTLED = "login_throttled"
LOGOUT = "logout"
PLAY = "play"
DOWNLOAD = "download"
EXPORT = "export"
VERIFY = "verify"
USER_ADD = "user_add"
USER_REMOVE = "user_remove"
USER_EDIT = "user_edit"  # a user's role, scope or PBXs changed
USER_PASSWORD = "user_password"  # noqa: S105 - an action name, not a password
TOKEN_CREATE = "token_create"  # noqa: S105
TOKEN_REVOKE = "token_revoke"  # noqa: S105
AUDIT_EXPORT = "audit_export"  # someone took a copy of (part of) this log
REQUEUE = "requeue"  # recordings given up on were queued again
PBX_ADD = "pbx_add"
PBX_EDIT = "pbx_edit"
PBX_REMOVE = "pbx_remove"
STORAGE_MIGRATE = "storage_migrate"  # the recordings were copied to another storage
INDEX_COPY = "index_copy"  # the whole index was copied into another database
ARCHIVE = "archive"  # a recording was archived: its hash, size and key (`attestation`)
CHAIN_START = "audit_chain_start"  # the hash chain began (entries before it were chained then)
AUDIT_VERIFY = "audit_verify"  # someone checked the chain (and said what was found)
SIGNING_KEY_CREATE = "signing_key_create"
SIGNING_KEY_RETIRE = "signing_key_retire"
KEYS_ROTATE = "keys_rotate"  # sealed values re-sealed under the primary master key
RETENTION_SET = "retention_set"  # a new version of the retention policy (its rules)
RETENTION_RUN = "retention_run"  # a retention pass: how many deleted, by which rules
DELETE = "delete"  # a recording deleted: by the policy, an admin (with a reason), a request
HOLD_ADD = "hold_add"
HOLD_RELEASE = "hold_release"
SUBJECT_REQUEST = "subject_request"  # a data subject's find, export or erasure
ACTIONS = (
    LOGIN,
    LOGIN_FAILED,
    LOGIN_THROTTLED,
    LOGOUT,
    PLAY,
    DOWNLOAD,
    EXPORT,
    VERIFY,
    USER_ADD,
    USER_REMOVE,
    USER_EDIT,
    USER_PASSWORD,
    TOKEN_CREATE,
    TOKEN_REVOKE,
    AUDIT_EXPORT,
    REQUEUE,
    PBX_ADD,
    PBX_EDIT,
    PBX_REMOVE,
    STORAGE_MIGRATE,
    INDEX_COPY,
    ARCHIVE,
    CHAIN_START,
    AUDIT_VERIFY,
    SIGNING_KEY_CREATE,
    SIGNING_KEY_RETIRE,
    KEYS_ROTATE,
    RETENTION_SET,
    RETENTION_RUN,
    DELETE,
    HOLD_ADD,
    HOLD_RELEASE,
    SUBJECT_REQUEST,
)

GENESIS = "0" * 64  # the "previous hash" of the first entry
SYSTEM_ACTOR = "callvault"  # the actor of what callvault does by itself (archiving)

CSV_HEADER = ("id", "at", "actor", "action", "target", "detail", "remote_addr", "seq", "hash")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: str
    remote_addr: str
    seq: int | None = None
    hash: str | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: the chain up to entry `seq` has hash `hash`."""

    id: int
    seq: int
    hash: str
    at: datetime
    key_id: str
    signature: str  # Base64


def canonical_time(at: datetime) -> str:
    """`at` as the chain writes it: UTC, microseconds, a Z (a naive value is UTC)."""
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(
    previous: str,
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    detail: str,
    remote_addr: str,
) -> str:
    """The chain hash of an entry, given the hash of the one before it (see above)."""
    body = json.dumps(
        [seq, canonical_time(at), actor, action, target, detail, remote_addr],
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(f"{previous}\n{body}".encode("ascii")).hexdigest()


def checkpoint_message(seq: int, chain_hash: str, at: datetime) -> bytes:
    """The bytes a checkpoint's signature covers."""
    return f"callvault audit checkpoint v1\n{seq}\n{chain_hash}\n{canonical_time(at)}\n".encode(
        "ascii"
    )


def attestation(
    recording_id: int, pbx_id: int, name: str, storage_key: str, sha256: str, size: int
) -> str:
    """The detail of a recording's `ARCHIVE` entry: what the index must still say of it."""
    return json.dumps(
        {
            "recording": recording_id,
            "pbx": pbx_id,
            "name": name,
            "key": storage_key,
            "sha256": sha256,
            "size": size,
        },
        ensure_ascii=True,
        sort_keys=True,
        separators=(",", ":"),
    )


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which entries to read; every field is optional and they combine with AND."""

    actor: str | None = None
    not_actor: str | None = None  # leave out this actor's entries (e.g. SYSTEM_ACTOR's)
    action: str | None = None
    target: str | None = None  # substring
    since: datetime | None = None
    until: datetime | None = None


# A cell starting with one of these is run as a formula by spreadsheets (a tab or carriage
# return first is dropped by some of them, leaving what follows to be read as a formula).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(text: str) -> str:
    """The cell as text a spreadsheet will not run: a leading quote when it could be read
    as a formula (the actor of a failed login, say, is whatever was typed)."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def csv_safe_row(cells: Sequence[object]) -> list[object]:
    """A CSV row with every text cell passed through ``csv_safe`` (numbers as they are)."""
    return [csv_safe(cell) if isinstance(cell, str) else cell for cell in cells]
