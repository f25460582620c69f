"""The PBX's state, apart from HTTP (moto style): sessions, randoms, recordings, CDRs, lockouts.

Every rule of the API that does not depend on HTTP lives here, so a test can drive it
directly and the handlers stay thin. Methods raise :class:`ApiFailure` with the errno the PBX
answers. All methods are thread-safe (one re-entrant lock); time comes from the injected
:class:`~callvault.simulator._clock.Clock`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import random
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from callvault.pbx import CallDetail, EventFormat
from callvault.simulator._clock import Clock
from callvault.simulator._faults import Faults

TOKEN_TTL_SECONDS = 1800.0
RANDOM_TTL_SECONDS = 30.0
LOCKOUT_AFTER_FAILURES = 5
LOCKOUT_SECONDS = 600.0
DEFAULT_EVENT_PORT = 8260
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_EXPIRED_TOKENS_KEPT = 10_000
LEGACY_ERRNO_VERSION = "v1.0.1"  # API path version whose errnos keep their 2017 meanings

# The report formats each API path version offers (spec section 3.1): the login `version`
# value -> format; None (no version) is the version's default. v1.0.1 has no `version`
# field; v1.1.0 knows "1.0.2"; v2.0.0 calls the default "1.0.0" and adds "2.0.0". Any other
# combination is undocumented: the version's default.
_REPORT_FORMATS: dict[str, dict[str | None, EventFormat]] = {
    "v1.0.1": {None: EventFormat.LEGACY},
    "v1.1.0": {None: EventFormat.LEGACY, "1.0.2": EventFormat.V1_0_2},
    "v2.0.0": {None: EventFormat.LEGACY, "1.0.0": EventFormat.LEGACY, "2.0.0": EventFormat.V2_0_0},
}


def event_format_for(api_version: str, version: str | None) -> EventFormat:
    """The report format a login (or v2 heartbeat) through path `api_version` gets when it
    sends `version` (None: the field was left out)."""
    offered = _REPORT_FORMATS.get(api_version, {None: EventFormat.LEGACY})
    key = version.strip() if version is not None and version.strip() else None
    return offered.get(key, offered[None])


class ApiFailure(Exception):
    """The API answers ``{"status":"Failed","errno": errno}`` (with HTTP 200)."""

    def __init__(self, errno: str) -> None:
        super().__init__(f"errno {errno}")
        self.errno = errno


@dataclass(frozen=True)
class EventTarget:
    """Where an app server wants its reports, and in which format."""

    url: str
    format: EventFormat


@dataclass
class Session:
    """One logged-in app server (one token)."""

    token: str = field(repr=False)
    username: str
    client_ip: str
    api_version: str
    event_ip: str
    port: int
    url: str
    urltag: bool
    format: EventFormat
    created: float
    last_activity: float
    # The Yeastar Cloud PBX (S-Series based) answers a refresh token at login; its tokens
    # then end 30 minutes after they were issued, unless refreshed (PbxState.refresh).
    refresh_token: str | None = field(default=None, repr=False)

    def target(self) -> EventTarget | None:
        """The report destination, or None when the app server asked for no reports (port 0)."""
        if self.urltag and self.url:
            absolute = self.url if "://" in self.url else f"http://{self.url}"
            return EventTarget(url=absolute, format=self.format)
        if self.port == 0:
            return None
        path = self.url.lstrip("/")
        host = f"[{self.event_ip}]" if ":" in self.event_ip else self.event_ip
        return EventTarget(url=f"http://{host}:{self.port}/{path}", format=self.format)


@dataclass
class RandomGrant:
    """A one-time download random: for what, for which token, from where, since when."""

    kind: Literal["recording", "cdr"]
    target: str
    token: str = field(repr=False)
    allowed_ips: frozenset[str]
    created: float


@dataclass
class Recording:
    """A recording file on the PBX's storage."""

    name: str
    path: Path
    size: int
    sha256: str
    created_at: float  # simulator time of its NewCdr
    deleted: bool = False


@dataclass(frozen=True)
class CdrQuery:
    """The filter of one CDR export."""

    extensions: str
    starttime: str
    endtime: str

    @property
    def key(self) -> str:
        return f"{self.extensions}|{self.starttime}|{self.endtime}"


def new_secret() -> str:
    """32 lowercase hex characters, as the PBX's tokens and randoms look."""
    return secrets.token_hex(16)


def parse_pbx_time(value: str) -> datetime:
    """Parse ``yyyy-mm-dd hh:mm:ss``; ApiFailure 20019 otherwise."""
    try:
        return datetime.strptime(value.strip(), TIME_FORMAT)
    except ValueError:
        raise ApiFailure("20019") from None


class PbxState:
    """Everything the simulated PBX remembers. Thread-safe."""

    def __init__(
        self,
        *,
        username: str,
        password: str,
        serial: str,
        clock: Clock,
        faults: Faults,
        recordings_dir: Path,
        seed: int | None = None,
        invalidate_previous_tokens_on_login: bool = False,
        refresh_tokens: bool = False,
        report_transport: str = "http",
    ) -> None:
        self.username = username
        # The PBX's Report Method for v2.0.0 logins: "http" or "tcp" (no POSTs to them).
        self.report_transport = report_transport
        # A Cloud PBX: logins answer a refresh token, tokens live 30 minutes from issue.
        self.refresh_tokens = refresh_tokens
        self.refresh_count = 0
        self._password = password
        self.serial = serial
        self.clock = clock
        self.faults = faults
        self.recordings_dir = recordings_dir
        self.invalidate_previous_tokens_on_login = invalidate_previous_tokens_on_login
        self.lock = threading.RLock()
        self.rng = random.Random(seed)
        self._sessions: dict[str, Session] = {}
        self._expired: OrderedDict[str, float] = OrderedDict()
        self._randoms: dict[str, RandomGrant] = {}
        self._failures: dict[str, int] = {}
        self._locked_until: dict[str, float] = {}
        self._recordings: dict[str, Recording] = {}
        self._cdrs: list[CallDetail] = []
        self._call_seq = 0
        self.login_count = 0
        self.tcp_login_count = 0  # logins on the TCP report port that succeeded
        self.events_delivered = 0
        self.events_queued = 0
        self._channel_seq = 0
        self.request_log: list[tuple[str, str]] = []
        self.request_sources: list[tuple[str, str, str]] = []  # (ip, endpoint, outcome)
        self.request_paths: list[str] = []

    def __repr__(self) -> str:
        with self.lock:
            return (
                f"PbxState(serial={self.serial!r}, sessions={len(self._sessions)}, "
                f"recordings={len(self._recordings)}, cdrs={len(self._cdrs)})"
            )

    # -- secrets ------------------------------------------------------------------------------

    def _password_md5(self) -> str:
        return hashlib.md5(self._password.encode()).hexdigest()

    # -- bookkeeping --------------------------------------------------------------------------

    def note_path(self, path: str) -> None:
        """Remember the URL path of one API request (never its query: it holds the token)."""
        with self.lock:
            self.request_paths.append(path)

    def log(self, endpoint: str, outcome: str, ip: str = "") -> None:
        """Remember one answered request: (endpoint, errno or "Success" or an HTTP fault),
        and who sent it (`request_sources`)."""
        with self.lock:
            self.request_log.append((endpoint, outcome))
            self.request_sources.append((ip, endpoint, outcome))

    def chance(self, rate: float) -> bool:
        """True with probability `rate`, from the seeded RNG."""
        if rate <= 0:
            return False
        with self.lock:
            return self.rng.random() < rate

    def take(self, counter: str) -> bool:
        """Consume one unit of a ``*_next`` fault counter; True if there was one."""
        with self.lock:
            left = int(getattr(self.faults, counter))
            if left <= 0:
                return False
            setattr(self.faults, counter, left - 1)
            return True

    # -- login and tokens ---------------------------------------------------------------------

    def failed_login_count(self, ip: str) -> int:
        """Consecutive failed logins from `ip` (0 after a success or the end of a lockout)."""
        with self.lock:
            self._expire_lockout(ip)
            return self._failures.get(ip, 0)

    def is_locked_out(self, ip: str) -> bool:
        with self.lock:
            self._expire_lockout(ip)
            return ip in self._locked_until

    def _expire_lockout(self, ip: str) -> None:
        until = self._locked_until.get(ip)
        if until is not None and self.clock.now() >= until:
            del self._locked_until[ip]
            self._failures.pop(ip, None)

    def login(
        self,
        *,
        ip: str,
        username: str,
        password_md5: str,
        api_version: str,
        port: int,
        url: str,
        urltag: bool,
        version: str | None,
    ) -> Session:
        """Check credentials and the lockout; create a session. 20002 locked, 20003 wrong."""
        with self.lock:
            self._expire_lockout(ip)
            if ip in self._locked_until:
                raise ApiFailure("20002")
            user_ok = hmac.compare_digest(username.encode(), self.username.encode())
            password_ok = hmac.compare_digest(password_md5.encode(), self._password_md5().encode())
            if not (user_ok and password_ok):
                failures = self._failures.get(ip, 0) + 1
                self._failures[ip] = failures
                if failures >= LOCKOUT_AFTER_FAILURES:
                    self._locked_until[ip] = self.clock.now() + LOCKOUT_SECONDS
                raise ApiFailure("20003")
            self._failures.pop(ip, None)
            if (
                self.invalidate_previous_tokens_on_login
                or self.faults.invalidate_previous_tokens_on_login
            ):
                for token in [t for t, s in self._sessions.items() if s.username == username]:
                    del self._sessions[token]
            now = self.clock.now()
            session = Session(
                token=new_secret(),
                username=username,
                client_ip=ip,
                api_version=api_version,
                event_ip=ip,
                port=port,
                url=url,
                urltag=urltag,
                format=event_format_for(api_version, version),
                created=now,
                last_activity=now,
                refresh_token=new_secret() if self.refresh_tokens else None,
            )
            self._sessions[session.token] = session
            self.login_count += 1
            return session

    def tcp_login(self, *, ip: str, username: str, secret: str) -> None:
        """A login block on the TCP report port: `secret` is the clear-text password (spec
        6.1). Failures count towards the same lockout of `ip` as HTTP logins (the documents
        name one lockout per source IP). 20002 locked out, 20003 wrong credentials."""
        with self.lock:
            self._expire_lockout(ip)
            if ip in self._locked_until:
                raise ApiFailure("20002")
            user_ok = hmac.compare_digest(username.encode(), self.username.encode())
            secret_ok = hmac.compare_digest(secret.encode(), self._password.encode())
            if not (user_ok and secret_ok):
                failures = self._failures.get(ip, 0) + 1
                self._failures[ip] = failures
                if failures >= LOCKOUT_AFTER_FAILURES:
                    self._locked_until[ip] = self.clock.now() + LOCKOUT_SECONDS
                raise ApiFailure("20003")
            self._failures.pop(ip, None)
            self.tcp_login_count += 1

    def refresh(self, refresh_token: str) -> Session:
        """token/refresh (Cloud PBX): a new token and refresh token for the live session the
        refresh token belongs to; the old token and the refresh token used are gone. 20004
        for a refresh token that is unknown, spent, or whose token has expired (the
        documents leave the refresh token's own lifetime open: here it dies with its
        token)."""
        with self.lock:
            now = self.clock.now()
            for token, session in list(self._sessions.items()):
                known = session.refresh_token
                if known is None or not hmac.compare_digest(known, refresh_token):
                    continue
                if self._dead(session, now):
                    self._expire(session)
                    break
                del self._sessions[token]
                renewed = dataclasses.replace(
                    session,
                    token=new_secret(),
                    refresh_token=new_secret(),
                    created=now,
                    last_activity=now,
                )
                self._sessions[renewed.token] = renewed
                self.refresh_count += 1
                return renewed
            raise ApiFailure("20004")

    def _dead(self, session: Session, now: float) -> bool:
        """Whether the token has expired: 30 minutes without interaction, or, on a Cloud
        PBX, 30 minutes after it was issued."""
        if now - session.last_activity > TOKEN_TTL_SECONDS:
            return True
        return session.refresh_token is not None and now - session.created > TOKEN_TTL_SECONDS

    def authenticate(self, token: str | None) -> Session:
        """The live session of `token`, refreshed; 20005 blank, 20004 unknown, 20006 expired."""
        if not token:
            raise ApiFailure("20005")
        with self.lock:
            session = self._sessions.get(token)
            if session is None:
                raise ApiFailure("20006" if token in self._expired else "20004")
            now = self.clock.now()
            if self._dead(session, now):
                self._expire(session)
                raise ApiFailure("20006")
            session.last_activity = now
            return session

    def _expire(self, session: Session) -> None:
        self._sessions.pop(session.token, None)
        self._expired[session.token] = self.clock.now()
        while len(self._expired) > _EXPIRED_TOKENS_KEPT:
            self._expired.popitem(last=False)

    def session_alive(self, token: str) -> bool:
        """True if `token` is still valid (without refreshing it)."""
        with self.lock:
            session = self._sessions.get(token)
            if session is None:
                return False
            if self._dead(session, self.clock.now()):
                self._expire(session)
                return False
            return True

    def touch(self, token: str) -> None:
        """A report was delivered: that counts as interaction and refreshes the token."""
        with self.lock:
            session = self._sessions.get(token)
            if session is not None:
                session.last_activity = self.clock.now()

    def heartbeat(
        self,
        session: Session,
        *,
        ipaddr: str,
        port: int | None,
        url: str | None,
        urltag: bool | None,
        version: str | None,
        api_version: str | None = None,
    ) -> None:
        """Update where this app server wants its reports (validity was refreshed already).

        `version` (None: not sent) picks the report format as a login through path
        `api_version` (default: the session's) would; only v2 documents it for the
        heartbeat, so the HTTP handler passes None for the others."""
        with self.lock:
            session.event_ip = ipaddr
            if port is not None:
                session.port = port
            if url is not None:
                session.url = url
            if urltag is not None:
                session.urltag = urltag
            if version is not None:
                session.format = event_format_for(api_version or session.api_version, version)

    def logout(self, session: Session) -> None:
        with self.lock:
            self._sessions.pop(session.token, None)

    def revoke_tokens(self) -> int:
        """Forget every token (they answer 20004 afterwards); return how many there were."""
        with self.lock:
            count = len(self._sessions)
            self._sessions.clear()
            self._randoms.clear()
            return count

    def reboot(self) -> list[EventTarget]:
        """All tokens and randoms are lost; return the report targets of live sessions."""
        with self.lock:
            targets = self.live_targets()
            self._sessions.clear()
            self._expired.clear()
            self._randoms.clear()
            return [target for _token, target in targets]

    def live_targets(self) -> list[tuple[str, EventTarget]]:
        """(token, target) of every live session that wants reports, one per distinct target."""
        with self.lock:
            seen: set[EventTarget] = set()
            result: list[tuple[str, EventTarget]] = []
            for token, session in list(self._sessions.items()):
                if not self.session_alive(token):
                    continue
                if self.report_transport == "tcp" and session.api_version == "v2.0.0":
                    continue  # Report Method TCP: its reports go to the TCP report port
                target = session.target()
                if target is None or target in seen:
                    continue
                seen.add(target)
                result.append((token, target))
            return result

    def session_count(self) -> int:
        with self.lock:
            return len(self._sessions)

    # -- randoms ------------------------------------------------------------------------------

    def _allowed_ips(self, session: Session, allowedip: str | None) -> frozenset[str]:
        # Spec 5.2 and gotcha 6: without allowedip only the API client may download: the IP
        # that logged in or the heartbeat's ipaddr. Not whoever asked for the random.
        allowed = {session.client_ip, session.event_ip}
        if allowedip is not None and allowedip.strip():
            try:
                allowed.add(str(ipaddress.ip_address(allowedip.strip())))
            except ValueError:
                raise ApiFailure("20015") from None
        return frozenset(allowed)

    def _grant(
        self,
        kind: Literal["recording", "cdr"],
        target: str,
        session: Session,
        allowed: frozenset[str],
    ) -> str:
        now = self.clock.now()
        for value in [v for v, g in self._randoms.items() if now - g.created > RANDOM_TTL_SECONDS]:
            del self._randoms[value]
        value = new_secret()
        self._randoms[value] = RandomGrant(
            kind=kind, target=target, token=session.token, allowed_ips=allowed, created=now
        )
        return value

    def _redeem(
        self,
        kind: Literal["recording", "cdr"],
        target: str,
        session: Session,
        ip: str,
        value: str,
        invalid_errno: str,
    ) -> None:
        grant = self._randoms.pop(value, None)  # any presentation uses the random up
        if (
            grant is None
            or grant.kind != kind
            or self.clock.now() - grant.created > RANDOM_TTL_SECONDS
            or not hmac.compare_digest(grant.token, session.token)
            or grant.target != target
        ):
            raise ApiFailure(invalid_errno)
        if ip not in grant.allowed_ips:
            raise ApiFailure("20015")

    # -- recordings ---------------------------------------------------------------------------

    def add_recording(self, recording: Recording) -> None:
        with self.lock:
            self._recordings[recording.name] = recording

    def recording(self, name: str) -> Recording | None:
        with self.lock:
            return self._recordings.get(name)

    def recording_names(self) -> list[str]:
        with self.lock:
            return [n for n, r in self._recordings.items() if not r.deleted]

    def delete_recording(self, name: str) -> None:
        """Delete the file (as auto-cleanup would): the name answers 20014 afterwards."""
        with self.lock:
            recording = self._recordings.get(name)
            if recording is None:
                raise KeyError(name)
            recording.deleted = True
            recording.path.unlink(missing_ok=True)

    def errnos_2017(self, api_version: str) -> bool:
        """Whether 20012 means "the recording file does not exist" (the 2017 documents, API
        v1.0.1, or the ``errno_2017`` fault) rather than "the random is invalid"."""
        return api_version == LEGACY_ERRNO_VERSION or self.faults.errno_2017

    def _available(self, name: str, api_version: str) -> Recording:
        # 2017 meanings: 20012 the file does not exist, 20014 it has been deleted. Later
        # firmware: 20014 the file does not exist, whatever the reason.
        absent = "20012" if self.errnos_2017(api_version) else "20014"
        recording = self._recordings.get(name)
        if recording is None:
            raise ApiFailure(absent)
        if recording.deleted or not recording.path.is_file():
            raise ApiFailure("20014")
        if self.clock.now() < recording.created_at + self.faults.not_ready_seconds:
            raise ApiFailure(absent)  # not written yet: it does not exist (yet)
        return recording

    def recording_random(
        self, session: Session, *, name: str, allowedip: str | None, api_version: str | None = None
    ) -> str:
        """recording/get_random: 20014 (or 20012, see errnos_2017) if there is no such ready
        file, 20015 for a bad allowedip. `api_version` is the request's path version
        (default: the session's)."""
        with self.lock:
            self._available(name, api_version or session.api_version)
            allowed = self._allowed_ips(session, allowedip)
            return self._grant("recording", name, session, allowed)

    def redeem_recording_random(
        self, session: Session, *, ip: str, name: str, value: str, api_version: str | None = None
    ) -> Recording:
        """recording/download: the random must be fresh, unused, this token's, for this name,
        and `ip` the API client's (or the allowedip)."""
        with self.lock:
            self._redeem("recording", name, session, ip, value, "20012")
            return self._available(name, api_version or session.api_version)

    # -- calls and CDRs -----------------------------------------------------------------------

    def next_callid(self, start_epoch: float) -> str:
        with self.lock:
            self._call_seq += 1
            return f"{int(start_epoch)}.{self._call_seq}"

    def next_channel(self) -> int:
        """A fresh channel number (the hex tail of ``PJSIP/1001-0000001e``)."""
        with self.lock:
            self._channel_seq += 1
            return self._channel_seq

    def add_cdr(self, cdr: CallDetail) -> None:
        with self.lock:
            self._cdrs.append(cdr)

    def cdrs(self) -> list[CallDetail]:
        with self.lock:
            return list(self._cdrs)

    def _select_cdrs(self, query: CdrQuery) -> list[CallDetail]:
        start = parse_pbx_time(query.starttime)
        end = parse_pbx_time(query.endtime)
        if start > end:
            raise ApiFailure("20019")
        wanted = {part.strip() for part in query.extensions.split(",") if part.strip()}
        every = not wanted or "all" in {w.lower() for w in wanted}
        rows = []
        for cdr in self._cdrs:
            when = datetime.strptime(cdr.timestart, TIME_FORMAT)
            if not start <= when <= end:
                continue
            if every or cdr.callfrom in wanted or cdr.callto in wanted:
                rows.append(cdr)
        if not rows:
            raise ApiFailure("20021")
        return rows

    def cdr_random(self, session: Session, *, query: CdrQuery, allowedip: str | None) -> str:
        """cdr/get_random: 20019 bad time format or order, 20021 nothing in the range."""
        with self.lock:
            self._select_cdrs(query)
            return self._grant("cdr", query.key, session, self._allowed_ips(session, allowedip))

    def redeem_cdr_random(
        self, session: Session, *, ip: str, query: CdrQuery, value: str
    ) -> list[CallDetail]:
        """cdr/download: 20020 for a bad random, then the matching rows (20019/20021)."""
        with self.lock:
            self._redeem("cdr", query.key, session, ip, value, "20020")
            return self._select_cdrs(query)
