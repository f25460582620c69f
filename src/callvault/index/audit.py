"""The audit log: who did what, to what, when and from where: its actions and entries.

The store is `index.audit`; it is append-only from the app's side: it can add entries and
read them, and has no way to change or delete one. Every play, download, export, login
(success and failure), token and user change, and every CSV export of this log, is
recorded through ``index.audit.record``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

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
)

CSV_HEADER = ("id", "at", "actor", "action", "target", "detail", "remote_addr")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: str
    remote_addr: str


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which entries to read; every field is optional and they combine with AND."""

    actor: str | None = None
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
