"""Sessions, CSRF tokens and the login rate limit.

A session is a signed cookie holding the user's id and session epoch, a random nonce and
when it was issued; nothing secret is in it. A session is also a row in the index
(`index.sessions`, keyed by the nonce's SHA-256), made at login and deleted at logout: a
cookie is honoured only while its row exists, so every app over the index (`serve`, `web`,
after a restart) refuses a logged-out session, and the signing secret alone (say, from a
copy of the index) cannot make a session for a user who never logged in. The user is
re-read on every request, so a removed user or a changed scope takes effect at once, and
the epoch must still be the user's: a new password ends older sessions, and a user made
after a removal (who never gets the removed one's id nor epoch) never inherits their
cookies. The CSRF token of a session is an HMAC of its nonce, so it needs no storage and
changes with each login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from callvault.index import Index, audit
from callvault.index.users import User

SESSION_COOKIE = "cv_session"
LOGIN_COOKIE = "cv_login"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
SESSION_LIFETIME = timedelta(hours=12)

Clock = Callable[[], datetime]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _same(given: str | None, expected: str) -> bool:
    """Constant-time equality of a value from a request with one we made (always ASCII).

    `hmac.compare_digest` raises TypeError on non-ASCII text: such a value is simply wrong.
    """
    return bool(given) and str(given).isascii() and hmac.compare_digest(str(given), expected)


@dataclass(frozen=True, slots=True)
class Session:
    user_id: int
    nonce: str
    issued_at: datetime
    epoch: str  # the user's session epoch when it was issued

    def __repr__(self) -> str:
        return f"Session(user_id={self.user_id}, issued_at={self.issued_at.isoformat()})"


class SessionSigner:
    """Makes and checks session cookies and CSRF tokens with one secret key.

    Issuing, logging out and the liveness check need the index the users live in: give
    it as `index` or `attach` it later (the app's context does).
    """

    def __init__(self, secret: bytes, clock: Clock, index: Index | None = None) -> None:
        self._key = hashlib.sha256(b"callvault-web-session\0" + secret).digest()
        self._clock = clock
        self._attached = index

    def attach(self, index: Index) -> None:
        """Keep sessions in this index: the one holding the users and the secret."""
        self._attached = index

    @property
    def _index(self) -> Index:
        if self._attached is None:
            raise RuntimeError("SessionSigner has no index attached")
        return self._attached

    def __repr__(self) -> str:
        return "SessionSigner(<secret>)"

    def _mac(self, purpose: str, data: str) -> str:
        message = f"{purpose}\0{data}".encode()
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def issue(self, user_id: int) -> tuple[Session, str]:
        """A new session for the user (a row in the index) and its cookie value; ValueError
        (`NoSuchUser`) if there is no such user."""
        epoch = self._index.users.session_epoch(user_id)
        if epoch is None:
            raise ValueError(f"no user with id {user_id}")
        session = Session(user_id, secrets.token_urlsafe(16), self._clock(), epoch)
        self._index.sessions.create(
            user_id,
            session.nonce,
            now=session.issued_at,
            expires_at=session.issued_at + SESSION_LIFETIME,
        )
        payload = _b64(
            json.dumps(
                {
                    "u": user_id,
                    "e": epoch,
                    "n": session.nonce,
                    "i": int(session.issued_at.timestamp()),
                },
                separators=(",", ":"),
            ).encode()
        )
        return session, f"{payload}.{self._mac('session', payload)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie if it is authentic and unexpired (whether it is still
        live, its user's and not logged out, is `live_user`'s answer)."""
        if not cookie or len(cookie) > 512 or cookie.count(".") != 1:
            return None
        payload, mac = cookie.split(".")
        if not _same(mac, self._mac("session", payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            user_id, nonce, issued = int(data["u"]), str(data["n"]), int(data["i"])
            epoch = str(data["e"])
            now = self._clock()
            issued_at = datetime.fromtimestamp(issued, tz=now.tzinfo)
        except (ValueError, KeyError, TypeError, OverflowError, OSError):
            return None
        if not (issued_at - timedelta(minutes=5) <= now < issued_at + SESSION_LIFETIME):
            return None
        return Session(user_id, nonce, issued_at, epoch)

    def live_user(self, session: Session) -> User | None:
        """The session's user if its row is in the index (it was issued there and not
        logged out by any app over the index), the user is enabled and the session is of
        their current epoch; else None."""
        return self._index.sessions.user_of(
            session.user_id, session.epoch, session.nonce, now=self._clock()
        )

    def revoke(self, session: Session) -> None:
        """Log a session out for good: its row leaves the index."""
        self._index.sessions.end(session.nonce)

    def csrf_token(self, session: Session) -> str:
        return self._mac("csrf", session.nonce)

    def login_csrf_token(self, login_nonce: str) -> str:
        """The CSRF token of the login form, bound to the pre-login cookie."""
        return self._mac("login-csrf", login_nonce)

    def check_csrf(self, session: Session, token: str | None) -> bool:
        return _same(token, self.csrf_token(session))

    def check_login_csrf(self, login_nonce: str | None, token: str | None) -> bool:
        if not login_nonce or not login_nonce.isascii():
            return False
        return _same(token, self.login_csrf_token(login_nonce))


class LoginLimiter:
    """Refuses logins after too many failures, counted in the audit log, so that every
    process of the web app, on every node, counts the same ones.

    After `per_user` failures for one name from one address since its last success
    there, or `per_address` failures from one address in all, within `window`, further
    attempts from there are refused until the oldest of those failures leaves the
    window. The login page writes the entries it counts (`login_failed`, `login`).
    """

    def __init__(
        self,
        clock: Clock,
        *,
        per_user: int = 5,
        per_address: int = 20,
        window: timedelta = timedelta(minutes=15),
        index: Index | None = None,
    ) -> None:
        self._clock = clock
        self._per_user = per_user
        self._per_address = per_address
        self._window = window
        self._index_or_none = index

    def attach(self, index: Index) -> None:
        """Count in `index`'s audit log (the web app's, once it is made)."""
        self._index_or_none = index

    def _index(self) -> Index:
        if self._index_or_none is None:
            raise RuntimeError("LoginLimiter used before an index was attached")
        return self._index_or_none

    def retry_after(self, address: str, user: str) -> int | None:
        """Seconds until a login from `address` as `user` may be tried, or None if now."""
        now = self._clock()
        since = now - self._window
        log = self._index().audit
        blocked_until: list[datetime] = []
        success = log.recent(audit.LOGIN, since=since, remote_addr=address, target=user, limit=1)
        user_failures = log.recent(
            audit.LOGIN_FAILED,
            since=since,
            remote_addr=address,
            target=user,
            after_id=success[0].id if success else 0,
            limit=self._per_user,
        )
        if len(user_failures) >= self._per_user:
            blocked_until.append(user_failures[-1].at + self._window)
        address_failures = log.recent(
            audit.LOGIN_FAILED, since=since, remote_addr=address, limit=self._per_address
        )
        if len(address_failures) >= self._per_address:
            blocked_until.append(address_failures[-1].at + self._window)
        if not blocked_until:
            return None
        return max(1, int((max(blocked_until) - now).total_seconds()) + 1)

    def first_refusal(self, address: str) -> bool:
        """Whether no refusal from `address` was audited within the window: a script
        hammering the login form adds one `login_throttled` entry per window, not one per
        attempt."""
        since = self._clock() - self._window
        return not self._index().audit.recent(
            audit.LOGIN_THROTTLED, since=since, remote_addr=address, limit=1
        )
