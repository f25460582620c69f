"""Sessions, CSRF tokens and the login rate limit.

A session is a signed cookie holding the user's id, a random nonce and when it was issued;
nothing secret is in it, and the user is re-read on every request, so a removed user or a
changed scope takes effect at once. Logging out revokes the nonce. The CSRF token of a
session is an HMAC of its nonce, so it needs no storage and changes with each login.
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


@dataclass(frozen=True, slots=True)
class Session:
    user_id: int
    nonce: str
    issued_at: datetime

    def __repr__(self) -> str:
        return f"Session(user_id={self.user_id}, issued_at={self.issued_at.isoformat()})"


class SessionSigner:
    """Makes and checks session cookies and CSRF tokens with one secret key."""

    def __init__(self, secret: bytes, clock: Clock) -> None:
        self._key = hashlib.sha256(b"callvault-web-session\0" + secret).digest()
        self._clock = clock
        self._revoked: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "SessionSigner(<secret>)"

    def _mac(self, purpose: str, data: str) -> str:
        message = f"{purpose}\0{data}".encode()
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def issue(self, user_id: int) -> tuple[Session, str]:
        """A new session for the user and its cookie value."""
        session = Session(user_id, secrets.token_urlsafe(16), self._clock())
        payload = _b64(
            json.dumps(
                {"u": user_id, "n": session.nonce, "i": int(session.issued_at.timestamp())},
                separators=(",", ":"),
            ).encode()
        )
        return session, f"{payload}.{self._mac('session', payload)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie if it is authentic, unexpired and not logged out."""
        if not cookie or len(cookie) > 512 or cookie.count(".") != 1:
            return None
        payload, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac("session", payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            user_id, nonce, issued = int(data["u"]), str(data["n"]), int(data["i"])
        except (ValueError, KeyError, TypeError):
            return None
        now = self._clock()
        issued_at = datetime.fromtimestamp(issued, tz=now.tzinfo)
        if not (issued_at - timedelta(minutes=5) <= now < issued_at + SESSION_LIFETIME):
            return None
        with self._lock:
            if nonce in self._revoked:
                return None
        return Session(user_id, nonce, issued_at)

    def revoke(self, session: Session) -> None:
        """Log a session out for good (kept until it would have expired anyway)."""
        now = self._clock()
        with self._lock:
            self._revoked = {n: t for n, t in self._revoked.items() if t > now}
            self._revoked[session.nonce] = session.issued_at + SESSION_LIFETIME

    def csrf_token(self, session: Session) -> str:
        return self._mac("csrf", session.nonce)

    def login_csrf_token(self, login_nonce: str) -> str:
        """The CSRF token of the login form, bound to the pre-login cookie."""
        return self._mac("login-csrf", login_nonce)

    def check_csrf(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(session))

    def check_login_csrf(self, login_nonce: str | None, token: str | None) -> bool:
        if not login_nonce or not token:
            return False
        return hmac.compare_digest(str(token), self.login_csrf_token(login_nonce))


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
