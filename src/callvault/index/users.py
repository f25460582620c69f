"""Web users, their roles and scopes, and the API tokens scripts use.

A user is an ``admin`` (everything) or a ``listener`` (search, play, download and export
within their scope). A scope is a list of extensions and ranges, written ``"1000-1099,2001"``;
empty means every call. Passwords are kept only as argon2 hashes and API tokens only as the
SHA-256 of the token: the secret itself is shown once, when it is made, and never again.

Web sessions: each user has a random ``session_epoch`` that every session cookie of theirs
carries; a new password gives a new one, which ends the sessions made before, and a new
user never gets the id (AUTOINCREMENT) nor the epoch of a removed one. Logged-out sessions
are kept in ``revoked_sessions`` until they would have expired anyway.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, delete, insert, select, update

from callvault.index._index import write_transaction
from callvault.index.schema import api_tokens, revoked_sessions, users

ADMIN = "admin"
LISTENER = "listener"
ROLES = (ADMIN, LISTENER)

# A name appears in URLs, the audit log and CLI output: keep it plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SCOPE_PART_RE = re.compile(r"^(\d{1,12})(?:\s*-\s*(\d{1,12}))?$")
# Prefix makes a leaked token recognisable to secret scanners and to people.
TOKEN_PREFIX = "cvt_"  # noqa: S105 (a public prefix, not a secret)

_hasher = PasswordHasher()
# Verified against when the user does not exist, so a wrong name costs as long as a wrong
# password and timing does not tell which names exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))

ScopeRanges = list[tuple[int, int]]


class UserError(ValueError):
    """A user or token change was refused; the message says why and holds no secret."""


@dataclass(frozen=True, slots=True)
class User:
    """A web user as the app sees it (the password hash stays in the database)."""

    id: int
    name: str
    role: str
    scope: str
    created_at: datetime
    disabled_at: datetime | None = None
    scope_ranges: ScopeRanges = field(default_factory=list)

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def may_see(self, *numbers: str) -> bool:
        """Whether a call between these numbers is within this user's scope."""
        return in_scope(self.scope_ranges, *numbers)


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An API token's record: never the token itself, which exists only when created."""

    id: int
    user_id: int
    user_name: str
    label: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None

    def __repr__(self) -> str:
        return f"ApiToken(id={self.id}, user={self.user_name!r}, label={self.label!r})"


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything in the index is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def parse_scope(text: str) -> ScopeRanges:
    """Parse ``"1000-1099, 2001"`` into ``[(1000, 1099), (2001, 2001)]``; ``""`` -> ``[]``.

    Raises ``UserError`` on anything else, including a range whose end is below its start.
    """
    ranges: ScopeRanges = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        match = _SCOPE_PART_RE.match(part)
        if match is None:
            raise UserError(f"bad scope part {part!r}: use extensions or ranges like 1000-1099")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise UserError(f"bad scope range {part!r}: the end is below the start")
        ranges.append((low, high))
    return ranges


def format_scope(ranges: Sequence[tuple[int, int]]) -> str:
    """The canonical text of a scope: ``[(1000, 1099), (7, 7)]`` -> ``"1000-1099,7"``."""
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def in_scope(ranges: Sequence[tuple[int, int]], *numbers: str) -> bool:
    """True when the scope is empty (everything) or any number is a digit string in a range."""
    if not ranges:
        return True
    for number in numbers:
        if number.isascii() and number.isdigit() and not (len(number) > 1 and number[0] == "0"):
            value = int(number)
            if any(low <= value <= high for low, high in ranges):
                return True
    return False


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UserError(
            "bad user name: use up to 64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"bad role {role!r}: use one of {', '.join(ROLES)}")
    return role


def generate_password() -> str:
    """A random password for a user who was given none (printed once by the CLI)."""
    return secrets.token_urlsafe(15)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def new_session_epoch() -> str:
    return secrets.token_urlsafe(12)


def _user_from_row(row: Any) -> User:
    scope = str(getattr(row, "scope", "") or "")
    return User(
        id=int(row.id),
        name=str(row.name),
        role=str(row.role),
        scope=scope,
        created_at=_aware(row.created_at) or _now(),
        disabled_at=_aware(row.disabled_at),
        scope_ranges=parse_scope(scope),
    )


_USER_COLUMNS = (
    users.c.id,
    users.c.name,
    users.c.role,
    users.c.scope,
    users.c.created_at,
    users.c.disabled_at,
)


def add_user(
    engine: Engine,
    name: str,
    role: str,
    password: str,
    scope: str = "",
    *,
    now: datetime | None = None,
) -> User:
    """Create a user; the scope text is checked and stored in canonical form."""
    validate_name(name)
    validate_role(role)
    if len(password) < 8:
        raise UserError("the password is too short: use at least 8 characters")
    canonical = format_scope(parse_scope(scope))
    with write_transaction(engine) as conn:
        exists = conn.execute(select(users.c.id).where(users.c.name == name)).first()
        if exists is not None:
            raise UserError(f"user {name!r} already exists")
        conn.execute(
            insert(users).values(
                name=name,
                password_hash=hash_password(password),
                role=role,
                scope=canonical,
                created_at=now or _now(),
                session_epoch=new_session_epoch(),
            )
        )
    user = get_user(engine, name)
    assert user is not None
    return user


def get_user(engine: Engine, name: str) -> User | None:
    with engine.connect() as conn:
        row = conn.execute(select(*_USER_COLUMNS).where(users.c.name == name)).first()
    return None if row is None else _user_from_row(row)


def get_user_by_id(engine: Engine, user_id: int) -> User | None:
    with engine.connect() as conn:
        row = conn.execute(select(*_USER_COLUMNS).where(users.c.id == user_id)).first()
    return None if row is None else _user_from_row(row)


def list_users(engine: Engine) -> list[User]:
    with engine.connect() as conn:
        rows = conn.execute(select(*_USER_COLUMNS).order_by(users.c.name)).all()
    return [_user_from_row(row) for row in rows]


def remove_user(engine: Engine, name: str) -> bool:
    """Delete a user and their API tokens; False if there was no such user."""
    with write_transaction(engine) as conn:
        row = conn.execute(select(users.c.id).where(users.c.name == name)).first()
        if row is None:
            return False
        # Explicit, because SQLite enforces ON DELETE CASCADE only with a pragma.
        conn.execute(delete(api_tokens).where(api_tokens.c.user_id == row.id))
        conn.execute(delete(users).where(users.c.id == row.id))
    return True


def count_admins(engine: Engine) -> int:
    with engine.connect() as conn:
        rows = conn.execute(
            select(users.c.id).where(users.c.role == ADMIN, users.c.disabled_at.is_(None))
        ).all()
    return len(rows)


def set_password(engine: Engine, name: str, password: str) -> bool:
    """Set a user's password and end all their web sessions; False if there is no such user."""
    if len(password) < 8:
        raise UserError("the password is too short: use at least 8 characters")
    with write_transaction(engine) as conn:
        result = conn.execute(
            update(users)
            .where(users.c.name == name)
            .values(password_hash=hash_password(password), session_epoch=new_session_epoch())
        )
    return result.rowcount > 0


def end_sessions(engine: Engine, name: str) -> bool:
    """End every web session of a user (API tokens stay); False if there is no such user."""
    with write_transaction(engine) as conn:
        result = conn.execute(
            update(users).where(users.c.name == name).values(session_epoch=new_session_epoch())
        )
    return result.rowcount > 0


def session_epoch(engine: Engine, user_id: int) -> str | None:
    """The user's current session epoch (what a new session cookie carries), or None."""
    with engine.connect() as conn:
        value = conn.execute(
            select(users.c.session_epoch).where(users.c.id == user_id)
        ).scalar_one_or_none()
    return None if value is None else str(value)


def session_user(engine: Engine, user_id: int, epoch: str, nonce: str) -> User | None:
    """The enabled user of a session, if the session is of this user's current epoch and
    was not logged out; else None (a removed, re-created or re-passworded user, a logout)."""
    logged_out = select(revoked_sessions.c.nonce).where(revoked_sessions.c.nonce == nonce)
    with engine.connect() as conn:
        row = conn.execute(
            select(*_USER_COLUMNS).where(
                users.c.id == user_id,
                users.c.session_epoch == epoch,
                users.c.disabled_at.is_(None),
                ~logged_out.exists(),
            )
        ).first()
    return None if row is None else _user_from_row(row)


def revoke_session(engine: Engine, nonce: str, expires_at: datetime, *, now: datetime) -> None:
    """Log a session out for every app over this index, until `expires_at` (when its cookie
    expires anyway); sessions whose time is over are forgotten on the way."""
    now, expires_at = now.astimezone(UTC), expires_at.astimezone(UTC)
    with write_transaction(engine) as conn:
        conn.execute(delete(revoked_sessions).where(revoked_sessions.c.expires_at <= now))
        known = conn.execute(
            select(revoked_sessions.c.nonce).where(revoked_sessions.c.nonce == nonce)
        ).first()
        if known is None and expires_at > now:
            conn.execute(insert(revoked_sessions).values(nonce=nonce, expires_at=expires_at))


def verify_password(engine: Engine, name: str, password: str) -> User | None:
    """The user if the name exists, is enabled and the password matches; else None."""
    with engine.connect() as conn:
        row = conn.execute(
            select(*_USER_COLUMNS, users.c.password_hash).where(users.c.name == name)
        ).first()
    stored = _DUMMY_HASH if row is None else str(row.password_hash)
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None or row.disabled_at is not None:
        return None
    if _hasher.check_needs_rehash(stored):
        with write_transaction(engine) as conn:
            conn.execute(
                update(users)
                .where(users.c.id == row.id)
                .values(password_hash=hash_password(password))
            )
    return _user_from_row(row)


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _token_from_row(row: Any) -> ApiToken:
    return ApiToken(
        id=int(row.id),
        user_id=int(row.user_id),
        user_name=str(row.user_name),
        label=str(row.label),
        created_at=_aware(row.created_at) or _now(),
        created_by=str(row.created_by),
        revoked_at=_aware(row.revoked_at),
        last_used_at=_aware(row.last_used_at),
    )


_TOKEN_COLUMNS = (
    api_tokens.c.id,
    api_tokens.c.user_id,
    users.c.name.label("user_name"),
    api_tokens.c.label,
    api_tokens.c.created_at,
    api_tokens.c.created_by,
    api_tokens.c.revoked_at,
    api_tokens.c.last_used_at,
)


def create_token(
    engine: Engine,
    user_name: str,
    *,
    label: str = "",
    created_by: str = "",
    now: datetime | None = None,
) -> tuple[ApiToken, str]:
    """Make an API token for a user: returns its record and the secret (shown once)."""
    user = get_user(engine, user_name)
    if user is None:
        raise UserError(f"no user named {user_name!r}")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with write_transaction(engine) as conn:
        result = conn.execute(
            insert(api_tokens).values(
                user_id=user.id,
                label=label[:128],
                token_sha256=token_digest(secret),
                created_at=now or _now(),
                created_by=created_by,
            )
        )
        token_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
    assert token_id is not None
    token = get_token(engine, int(token_id))
    assert token is not None
    return token, secret


def get_token(engine: Engine, token_id: int) -> ApiToken | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(*_TOKEN_COLUMNS)
            .join_from(api_tokens, users, api_tokens.c.user_id == users.c.id)
            .where(api_tokens.c.id == token_id)
        ).first()
    return None if row is None else _token_from_row(row)


def list_tokens(engine: Engine, *, include_revoked: bool = True) -> list[ApiToken]:
    query = select(*_TOKEN_COLUMNS).join_from(api_tokens, users, api_tokens.c.user_id == users.c.id)
    if not include_revoked:
        query = query.where(api_tokens.c.revoked_at.is_(None))
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(api_tokens.c.id)).all()
    return [_token_from_row(row) for row in rows]


def revoke_token(engine: Engine, token_id: int, *, now: datetime | None = None) -> bool:
    """Revoke a token; False if there is no such token or it was already revoked."""
    with write_transaction(engine) as conn:
        result = conn.execute(
            update(api_tokens)
            .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now or _now())
        )
    return result.rowcount > 0


def user_for_token(engine: Engine, secret: str, *, now: datetime | None = None) -> User | None:
    """The enabled user owning this live token, noting when it was last used; else None."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    digest = token_digest(secret)
    with write_transaction(engine) as conn:
        row = conn.execute(
            select(api_tokens.c.id, api_tokens.c.user_id).where(
                api_tokens.c.token_sha256 == digest, api_tokens.c.revoked_at.is_(None)
            )
        ).first()
        if row is None:
            return None
        conn.execute(
            update(api_tokens).where(api_tokens.c.id == row.id).values(last_used_at=now or _now())
        )
    user = get_user_by_id(engine, int(row.user_id))
    if user is None or user.disabled_at is not None:
        return None
    return user
