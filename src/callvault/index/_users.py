"""`index.users`, `index.tokens` and `index.sessions`: web users, API tokens, sessions.

The rules without a database (names, roles, scopes) and the data classes are in
`callvault.index.users`.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, delete, func, insert, or_, select, update

from callvault.index._db import Database
from callvault.index.pbxs import unknown_pbx
from callvault.index.schema import api_tokens, column_length, users, web_sessions
from callvault.index.schema import pbxs as pbxs_table
from callvault.times import as_utc as from_db
from callvault.times import to_utc

if TYPE_CHECKING:
    from argon2 import PasswordHasher

from callvault.index.users import (
    ADMIN,
    TOKEN_PREFIX,
    ApiToken,
    LastAdminError,
    NoSuchUser,
    SelfRemovalError,
    UnknownPbx,
    User,
    UserError,
    format_scope,
    parse_pbxs,
    parse_scope,
    validate_name,
    validate_password,
    validate_role,
)

_LABEL_MAX = column_length(api_tokens.c.label)
_CREATED_BY_MAX = column_length(api_tokens.c.created_by)
# Longer than any token this index makes: not worth hashing.
_TOKEN_MAX = 200
# An API token's `last_used_at` is written at most this often.
LAST_USED_EVERY = timedelta(minutes=1)

_USER_COLUMNS = (
    users.c.id,
    users.c.name,
    users.c.role,
    users.c.scope,
    users.c.pbxs,
    users.c.created_at,
    users.c.disabled_at,
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


def _now() -> datetime:
    return datetime.now(UTC)


@functools.cache
def _hasher() -> PasswordHasher:
    """argon2, loaded when a password is first hashed or checked: commands that never
    touch a password (`callvault list`) do not pay for it."""
    from argon2 import PasswordHasher

    return PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so a wrong name costs as long as a
    wrong password and timing does not tell which names exist."""
    return _hasher().hash(secrets.token_urlsafe(16))


def _hash_password(password: str) -> str:
    return _hasher().hash(password)


def _new_session_epoch() -> str:
    return secrets.token_urlsafe(12)


def _digest(secret: str) -> str:
    """The SHA-256 kept in place of a token or session nonce."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _user_from_row(row: Any) -> User:
    scope = str(getattr(row, "scope", "") or "")
    return User(
        id=int(row.id),
        name=str(row.name),
        role=str(row.role),
        scope=scope,
        created_at=from_db(row.created_at) or _now(),
        disabled_at=from_db(row.disabled_at),
        scope_ranges=parse_scope(scope),
        pbxs=parse_pbxs(str(getattr(row, "pbxs", "") or "")),
    )


def _token_from_row(row: Any) -> ApiToken:
    return ApiToken(
        id=int(row.id),
        user_id=int(row.user_id),
        user_name=str(row.user_name),
        label=str(row.label),
        created_at=from_db(row.created_at) or _now(),
        created_by=str(row.created_by),
        revoked_at=from_db(row.revoked_at),
        last_used_at=from_db(row.last_used_at),
    )


def _user_where(conn: Connection, *where: Any) -> User | None:
    row = conn.execute(select(*_USER_COLUMNS).where(*where)).first()
    return None if row is None else _user_from_row(row)


def _end_sessions_of(conn: Connection, user_id: int) -> int:
    """Delete every session row of a user (inside the caller's write transaction)."""
    return int(conn.execute(delete(web_sessions).where(web_sessions.c.user_id == user_id)).rowcount)


class UserStore:
    """The web users."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(
        self,
        name: str,
        role: str,
        password: str,
        scope: str = "",
        *,
        now: datetime | None = None,
        pbxs: str = "",
    ) -> User:
        """Create a user; the scope text is checked and stored in canonical form, as are
        the names of the PBXs they may see (`pbxs`, "" for every PBX).

        Raises `UserError` on a bad name, role, password, scope or PBX name, or an
        existing name.
        """
        validate_name(name)
        role = validate_role(role)
        validate_password(password)
        canonical = format_scope(parse_scope(scope))
        pbx_names = ",".join(parse_pbxs(pbxs))
        password_hash = _hash_password(password)
        with self._db.write() as conn:
            if _user_where(conn, users.c.name == name) is not None:
                raise UserError(f"user {name!r} already exists")
            if pbx_names:
                _check_registered(conn, pbx_names.split(","))
            conn.execute(
                insert(users).values(
                    name=name,
                    password_hash=password_hash,
                    role=role,
                    scope=canonical,
                    pbxs=pbx_names,
                    created_at=to_utc(now or _now()),
                    session_epoch=_new_session_epoch(),
                )
            )
            user = _user_where(conn, users.c.name == name)
        assert user is not None
        return user

    def get(self, name: str) -> User | None:
        with self._db.read() as conn:
            return _user_where(conn, users.c.name == name)

    def get_by_id(self, user_id: int) -> User | None:
        with self._db.read() as conn:
            return _user_where(conn, users.c.id == user_id)

    def list(self) -> builtins.list[User]:
        """Every user, by name."""
        with self._db.read() as conn:
            rows = conn.execute(select(*_USER_COLUMNS).order_by(users.c.name)).all()
        return [_user_from_row(row) for row in rows]

    def count_admins(self) -> int:
        """How many enabled admins there are."""
        with self._db.read() as conn:
            return int(conn.execute(select(func.count()).where(*_ENABLED_ADMIN)).scalar_one())

    def remove(self, name: str, *, acting: User | None = None) -> User:
        """Remove a user, their API tokens and sessions, in one transaction; the user removed.

        Refused with `SelfRemovalError` when `acting` (the user asking, if a user asks) is
        that user, and with `LastAdminError` when it is the last enabled admin; `NoSuchUser`
        when there is no such user. The check and the removal are one transaction, so two
        admins removing each other at once cannot leave none.
        """
        with self._db.write() as conn:
            target = _user_where(conn, users.c.name == name)
            if target is None:
                raise NoSuchUser(f"no user named {name!r}")
            if acting is not None and acting.id == target.id:
                raise SelfRemovalError("you cannot remove yourself")
            if target.is_admin and target.disabled_at is None:
                # FOR UPDATE (PostgreSQL): a concurrent removal of another admin waits for
                # this one and then counts again. SQLite's write lock does that already.
                admins = conn.execute(
                    select(users.c.id).where(*_ENABLED_ADMIN).with_for_update()
                ).all()
                if len(admins) <= 1:
                    raise LastAdminError(
                        f"{name!r} is the last admin: add another admin before removing it"
                    )
            # Explicit, because SQLite enforces ON DELETE CASCADE only with a pragma.
            conn.execute(delete(api_tokens).where(api_tokens.c.user_id == target.id))
            _end_sessions_of(conn, target.id)
            conn.execute(delete(users).where(users.c.id == target.id))
        return target

    def edit(
        self,
        name: str,
        *,
        role: str | None = None,
        scope: str | None = None,
        pbxs: str | None = None,
        acting: User | None = None,
    ) -> tuple[User, User]:
        """Change a user's role, scope or PBXs (None: leave it); the user before and after.

        Checked and made canonical as `add` does. Refused with `SelfRemovalError` when
        `acting` (the user asking, if a user asks) would change their own role, and with
        `LastAdminError` when the last enabled admin would stop being one; `NoSuchUser`
        when there is no such user. Every request re-reads its user: the change holds at
        once, in every session.
        """
        role = None if role is None else validate_role(role)
        canonical = None if scope is None else format_scope(parse_scope(scope))
        pbx_names = None if pbxs is None else ",".join(parse_pbxs(pbxs))
        with self._db.write() as conn:
            before = _user_where(conn, users.c.name == name)
            if before is None:
                raise NoSuchUser(f"no user named {name!r}")
            values: dict[str, str] = {}
            if role is not None and role != before.role:
                if acting is not None and acting.id == before.id:
                    raise SelfRemovalError("you cannot change your own role: ask another admin")
                if before.is_admin and before.disabled_at is None:
                    # As in `remove`: a concurrent demotion waits for this one, then counts.
                    admins = conn.execute(
                        select(users.c.id).where(*_ENABLED_ADMIN).with_for_update()
                    ).all()
                    if len(admins) <= 1:
                        raise LastAdminError(
                            f"{name!r} is the last admin: make another admin first"
                        )
                values["role"] = role
            if canonical is not None:
                values["scope"] = canonical
            if pbx_names is not None:
                if pbx_names:
                    _check_registered(conn, pbx_names.split(","))
                values["pbxs"] = pbx_names
            if values:
                conn.execute(update(users).where(users.c.id == before.id).values(**values))
            after = _user_where(conn, users.c.id == before.id)
        assert after is not None
        return before, after

    def set_password(self, name: str, password: str) -> bool:
        """Set a user's password and end all their web sessions; False if there is no such
        user. Raises `UserError` on a password too short."""
        validate_password(password)
        password_hash = _hash_password(password)
        with self._db.write() as conn:
            user = _user_where(conn, users.c.name == name)
            if user is None:
                return False
            conn.execute(
                update(users)
                .where(users.c.id == user.id)
                .values(password_hash=password_hash, session_epoch=_new_session_epoch())
            )
            _end_sessions_of(conn, user.id)
        return True

    def end_sessions(self, name: str) -> bool:
        """End every web session of a user (API tokens stay); False if there is no such user."""
        with self._db.write() as conn:
            user = _user_where(conn, users.c.name == name)
            if user is None:
                return False
            conn.execute(
                update(users)
                .where(users.c.id == user.id)
                .values(session_epoch=_new_session_epoch())
            )
            _end_sessions_of(conn, user.id)
        return True

    def session_epoch(self, user_id: int) -> str | None:
        """The user's current session epoch (what a new session cookie carries), or None."""
        with self._db.read() as conn:
            value = conn.execute(
                select(users.c.session_epoch).where(users.c.id == user_id)
            ).scalar_one_or_none()
        return None if value is None else str(value)

    def verify_password(self, name: str, password: str) -> User | None:
        """The user if the name exists, is enabled and the password matches; else None."""
        with self._db.read() as conn:
            row = conn.execute(
                select(*_USER_COLUMNS, users.c.password_hash).where(users.c.name == name)
            ).first()
        from argon2.exceptions import InvalidHashError, VerificationError

        stored = _dummy_hash() if row is None else str(row.password_hash)
        try:
            _hasher().verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None or row.disabled_at is not None:
            return None
        if _hasher().check_needs_rehash(stored):
            password_hash = _hash_password(password)
            with self._db.write() as conn:
                conn.execute(
                    update(users).where(users.c.id == row.id).values(password_hash=password_hash)
                )
        return _user_from_row(row)


_ENABLED_ADMIN = (users.c.role == ADMIN, users.c.disabled_at.is_(None))


class TokenStore:
    """API tokens: only their SHA-256 is kept; the secret is returned once, by `create`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(
        self,
        user_name: str,
        *,
        label: str = "",
        created_by: str = "",
        now: datetime | None = None,
    ) -> tuple[ApiToken, str]:
        """Make an API token for a user: returns its record and the secret (shown once).
        Raises `NoSuchUser` when there is no such user."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._db.write() as conn:
            user = _user_where(conn, users.c.name == user_name)
            if user is None:
                raise NoSuchUser(f"no user named {user_name!r}")
            result = conn.execute(
                insert(api_tokens).values(
                    user_id=user.id,
                    label=label[:_LABEL_MAX],
                    token_sha256=_digest(secret),
                    created_at=to_utc(now or _now()),
                    created_by=created_by[:_CREATED_BY_MAX],
                )
            )
            token_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
        assert token_id is not None
        token = self.get(int(token_id))
        assert token is not None
        return token, secret

    def get(self, token_id: int) -> ApiToken | None:
        with self._db.read() as conn:
            row = conn.execute(
                select(*_TOKEN_COLUMNS)
                .join_from(api_tokens, users, api_tokens.c.user_id == users.c.id)
                .where(api_tokens.c.id == token_id)
            ).first()
        return None if row is None else _token_from_row(row)

    def list(self, *, include_revoked: bool = True) -> builtins.list[ApiToken]:
        """Every token (or every live one), oldest first."""
        query = select(*_TOKEN_COLUMNS).join_from(
            api_tokens, users, api_tokens.c.user_id == users.c.id
        )
        if not include_revoked:
            query = query.where(api_tokens.c.revoked_at.is_(None))
        with self._db.read() as conn:
            rows = conn.execute(query.order_by(api_tokens.c.id)).all()
        return [_token_from_row(row) for row in rows]

    def revoke(self, token_id: int, *, now: datetime | None = None) -> bool:
        """Revoke a token; False if there is no such token or it was already revoked."""
        with self._db.write() as conn:
            result = conn.execute(
                update(api_tokens)
                .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=to_utc(now or _now()))
            )
        return result.rowcount > 0

    def user_for(self, secret: str, *, now: datetime | None = None) -> User | None:
        """The enabled user owning this live token, else None. When the token was last used
        is noted at most once a minute (`LAST_USED_EVERY`): a write and a commit on every
        request cost more than many searches."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > _TOKEN_MAX:
            return None
        query = (
            select(
                api_tokens.c.id.label("token_id"),
                api_tokens.c.last_used_at.label("token_last_used_at"),
                *_USER_COLUMNS,
            )
            .join_from(api_tokens, users, api_tokens.c.user_id == users.c.id)
            .where(api_tokens.c.token_sha256 == _digest(secret))
            .where(api_tokens.c.revoked_at.is_(None))
        )
        with self._db.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        now = to_utc(now or _now())
        last_used = from_db(row.token_last_used_at)
        if last_used is None or not now - LAST_USED_EVERY < last_used <= now:
            # Conditional, so that of several requests at once only one writes.
            stale = or_(
                api_tokens.c.last_used_at.is_(None),
                api_tokens.c.last_used_at <= now - LAST_USED_EVERY,
                api_tokens.c.last_used_at > now,
            )
            with self._db.write() as conn:
                conn.execute(
                    update(api_tokens)
                    .where(api_tokens.c.id == row.token_id, stale)
                    .values(last_used_at=now)
                )
        user = _user_from_row(row)
        return None if user.disabled_at is not None else user


class SessionStore:
    """Web sessions as rows: a session cookie is honoured only while its row exists.

    Only the SHA-256 of the cookie's random nonce is stored, so the index (or a copy of it)
    holds nothing a cookie could be made from; together with the signing secret kept in
    the settings, it still cannot make a session for a user who never logged in.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, user_id: int, nonce: str, *, now: datetime, expires_at: datetime) -> None:
        """Make the session of a login; rows of sessions expired by `now` go on the way.
        Raises `NoSuchUser` when there is no such user."""
        now = to_utc(now)
        with self._db.write() as conn:
            conn.execute(delete(web_sessions).where(web_sessions.c.expires_at <= now))
            if _user_where(conn, users.c.id == user_id) is None:
                raise NoSuchUser(f"no user with id {user_id}")
            conn.execute(
                insert(web_sessions).values(
                    nonce_sha256=_digest(nonce),
                    user_id=user_id,
                    created_at=now,
                    expires_at=to_utc(expires_at),
                )
            )

    def user_of(self, user_id: int, epoch: str, nonce: str, *, now: datetime) -> User | None:
        """The user of a live session: its row exists and is unexpired at `now`, and its
        user (`user_id`) is enabled and still of session epoch `epoch`; else None."""
        query = (
            select(*_USER_COLUMNS)
            .join_from(web_sessions, users, web_sessions.c.user_id == users.c.id)
            .where(
                web_sessions.c.nonce_sha256 == _digest(nonce),
                web_sessions.c.user_id == user_id,
                web_sessions.c.expires_at > to_utc(now),
                users.c.session_epoch == epoch,
                users.c.disabled_at.is_(None),
            )
        )
        with self._db.read() as conn:
            row = conn.execute(query).first()
        return None if row is None else _user_from_row(row)

    def end(self, nonce: str) -> bool:
        """Log a session out, for every app over this index; False if it was not live."""
        with self._db.write() as conn:
            result = conn.execute(
                delete(web_sessions).where(web_sessions.c.nonce_sha256 == _digest(nonce))
            )
        return result.rowcount > 0

    def end_all(self, user_id: int) -> int:
        """End every session of a user; how many there were."""
        with self._db.write() as conn:
            return _end_sessions_of(conn, user_id)


def _check_registered(conn: Connection, names: list[str]) -> None:
    """UnknownPbx naming the first of `names` the registry of PBXs has not (a typo would
    make a user who sees nothing)."""
    known = {str(name) for name in conn.execute(select(pbxs_table.c.name)).scalars()}
    for name in names:
        if name not in known:
            raise UnknownPbx(unknown_pbx(name, known))
