"""Web users, their roles and scopes, and API tokens: the data and the rules without a
database. The stores are `index.users`, `index.tokens` and `index.sessions`.

A user's role is ``admin`` (everything), ``listener`` (search, play, download and export
within their scope), ``auditor`` (the audit log, its verification and the signing key; no
recording), or both of the last two, written ``auditor,listener`` (`validate_role` gives
the canonical text of any order; admin stands alone, as it includes every other). The
`User` properties `is_admin`, `can_listen` and `can_audit` say what a role allows.

A scope is a list of extensions and ranges, written ``"1000-1099,2001"``; empty text means
every call. Passwords are kept only as argon2 hashes and API tokens only as the SHA-256 of
the token: the secret itself is shown once, when it is made, and never again.

Web sessions: a session is a row of ``web_sessions`` (made at login, deleted at logout)
and each user has a random ``session_epoch`` that every session cookie of theirs carries; a
new password gives a new one and deletes the user's sessions, and a new user never gets the
id (AUTOINCREMENT) nor the epoch of a removed one.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from callvault.index._models import Scope
from callvault.index.schema import column_length
from callvault.index.schema import users as _users_table

ADMIN = "admin"
LISTENER = "listener"
AUDITOR = "auditor"
ROLES = (ADMIN, LISTENER, AUDITOR)  # each role alone; listener and auditor also together
AUDITOR_LISTENER = f"{AUDITOR},{LISTENER}"
# Every role text `users.role` may hold (canonical), the safer first.
ROLE_CHOICES = (LISTENER, AUDITOR, AUDITOR_LISTENER, ADMIN)

NAME_MAX = column_length(_users_table.c.name)
# A name appears in URLs, the audit log and CLI output: keep it plain.
_NAME_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._@-]{{0,{NAME_MAX - 1}}}$")
_SCOPE_PART_RE = re.compile(r"^(\d{1,12})(?:\s*-\s*(\d{1,12}))?$")
# Prefix makes a leaked token recognisable to secret scanners and to people.
TOKEN_PREFIX = "cvt_"  # noqa: S105 (a public prefix, not a secret)
MIN_PASSWORD_LENGTH = 8


class UserError(ValueError):
    """A user or token change was refused; the message says why and holds no secret."""


class NoSuchUser(UserError):
    """There is no user of that name (or id)."""


class UnknownPbx(UserError):
    """A user was to be kept to a PBX the registry has not (a typo would make a user who
    sees nothing)."""


class LastAdminError(UserError):
    """The change would leave the archive without an enabled admin."""


class SelfRemovalError(UserError):
    """A user tried to remove themselves, or to change their own role."""


@dataclass(frozen=True, slots=True)
class User:
    """A web user as the app sees it (the password hash stays in the database).

    `scope_ranges` is the parsed `scope`: None (scope text empty) for every call.
    """

    id: int
    name: str
    role: str
    scope: str
    created_at: datetime
    disabled_at: datetime | None = None
    scope_ranges: Scope = None
    pbxs: tuple[str, ...] = ()  # the PBXs whose calls they may see; () = every PBX

    @property
    def roles(self) -> frozenset[str]:
        """The roles of `role` (``"auditor,listener"`` -> both)."""
        return frozenset(part.strip() for part in self.role.split(","))

    @property
    def is_admin(self) -> bool:
        """Users, tokens, PBXs, the status page; and everything the other roles may."""
        return ADMIN in self.roles

    @property
    def can_listen(self) -> bool:
        """Search, play, download, verify and export recordings (within the scope)."""
        return self.is_admin or LISTENER in self.roles

    @property
    def can_audit(self) -> bool:
        """Read and export the audit log, and verify its chain."""
        return self.is_admin or AUDITOR in self.roles

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


def parse_scope(text: str) -> Scope:
    """Parse ``"1000-1099, 2001"`` into ``[(1000, 1099), (2001, 2001)]``; text without any
    part (``""``) is None: every call.

    Raises ``UserError`` on anything else, including a range whose end is below its start.
    """
    ranges: list[tuple[int, int]] = []
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
    return ranges or None


def parse_pbxs(text: str) -> tuple[str, ...]:
    """The PBX names of a user's PBX scope, ``"paris, lyon"`` -> ``("lyon", "paris")``;
    empty for every PBX. UserError for a part that is not a PBX name."""
    from callvault.index.pbxs import PbxRegistryError, validate_name

    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        try:
            validate_name(name)
        except PbxRegistryError:
            raise UserError(f"bad PBX {name!r:.40}: give PBX names, e.g. paris,lyon") from None
    return tuple(sorted(set(names)))


def format_scope(ranges: Sequence[tuple[int, int]] | None) -> str:
    """The canonical text of a scope: ``[(1000, 1099), (7, 7)]`` -> ``"1000-1099,7"``;
    None (every call) -> ``""``."""
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges or ())


def in_scope(ranges: Sequence[tuple[int, int]] | None, *numbers: str) -> bool:
    """Whether any of the numbers is within the scope: always for None (every call), never
    for an empty list; else a number must be all digits, without a leading zero ("0"
    itself excepted), and inside a range. The same meaning as the SQL search."""
    if ranges is None:
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
            f"bad user name: use up to {NAME_MAX} letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_role(role: str) -> str:
    """The canonical text of a role: one of `ROLE_CHOICES` (``"listener, auditor"`` ->
    ``"auditor,listener"``); UserError for anything else."""
    parts = {part.strip() for part in role.split(",")}
    if not parts <= set(ROLES):
        raise UserError(f"bad role {role!r:.40}: use one of {', '.join(ROLE_CHOICES)}")
    if ADMIN in parts and len(parts) > 1:
        raise UserError("admin includes every other role: give it alone")
    return ",".join(name for name in (ADMIN, AUDITOR, LISTENER) if name in parts)


def describe_change(before: User, after: User) -> str:
    """What an edit changed, for the audit log: ``role=listener->auditor,listener``, with
    ``scope=`` and ``pbxs=`` alike (``(all)`` for empty); "" if nothing changed."""
    parts = []
    for field, was, now in (
        ("role", before.role, after.role),
        ("scope", before.scope, after.scope),
        ("pbxs", ",".join(before.pbxs), ",".join(after.pbxs)),
    ):
        if was != now:
            parts.append(f"{field}={was or '(all)'}->{now or '(all)'}")
    return " ".join(parts)


def validate_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters")
    return password


def generate_password() -> str:
    """A random password for a user who was given none (printed once by the CLI)."""
    return secrets.token_urlsafe(15)
