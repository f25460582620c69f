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
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from callvault.index import Index
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
    """Counts failed logins per (address, user name) and per address in a sliding window.

    After `per_user` failures for one name from one address, or `per_address` failures
    from one address in all, further attempts from there are refused until the oldest
    failure leaves the window. A success clears the failures of that name and address.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        per_user: int = 5,
        per_address: int = 20,
        window: timedelta = timedelta(minutes=15),
    ) -> None:
        self._clock = clock
        self._per_user = per_user
        self._per_address = per_address
        self._window = window
        self._failures: dict[tuple[str, str], deque[datetime]] = {}
        self._lock = threading.Lock()

    def _prune(self, now: datetime) -> None:
        cutoff = now - self._window
        for key in list(self._failures):
            times = self._failures[key]
            while times and times[0] <= cutoff:
                times.popleft()
            if not times:
                del self._failures[key]

    def retry_after(self, address: str, user: str) -> int | None:
        """Seconds until a login from `address` as `user` may be tried, or None if now."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            blocked_until: list[datetime] = []
            user_times = self._failures.get((address, "u:" + user.lower()), deque())
            if len(user_times) >= self._per_user:
                blocked_until.append(user_times[-self._per_user] + self._window)
            address_times = self._failures.get((address, "*"), deque())
            if len(address_times) >= self._per_address:
                blocked_until.append(address_times[-self._per_address] + self._window)
        if not blocked_until:
            return None
        return max(1, int((max(blocked_until) - now).total_seconds()) + 1)

    def failed(self, address: str, user: str) -> None:
        now = self._clock()
        with self._lock:
            self._failures.setdefault((address, "u:" + user.lower()), deque()).append(now)
            self._failures.setdefault((address, "*"), deque()).append(now)

    def succeeded(self, address: str, user: str) -> None:
        with self._lock:
            self._failures.pop((address, "u:" + user.lower()), None)
