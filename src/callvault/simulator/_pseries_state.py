"""What the simulated P-Series PBX knows: API tokens, lockouts, recordings, CDRs, download URLs.

Plain thread-safe state, no HTTP: the handlers in :mod:`._pseries_app` and the
:class:`~callvault.simulator._pseries.PSeriesSimulator` both work on it. Every time is the
simulator's :class:`~callvault.simulator._clock.Clock`.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import secrets
import string
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from callvault.simulator._clock import Clock
from callvault.simulator._pseries_types import PSeriesConfig, PSeriesFaults

ERRMSG: dict[int, str] = {
    -2: "INTERNAL SERVER ERROR",
    -1: "FAILURE",
    0: "SUCCESS",
    1: "PARTIAL SUCCESS",
    2: "PROCESSING",
    10001: "INTERFACE NOT EXISTED",
    10002: "API VERSION OUT OF MAINTENANCE",
    10003: "API VERSION UNSUPPORTED",
    10004: "TOKEN EXPIRED",
    10005: "ACCESS DENIED",
    40001: "PARAMETER SYNTAX ERROR",
    40002: "PARAMETER ERROR",
    40003: "DUPLICATE KEY VALUE",
    60001: "DATA NOT FOUND",
    60002: "MAX LIMITATION EXCEEDED",
    70004: "ACCOUNT IP BLOCKED",
    70082: "OVERLOAD_TASK_RUNNING",
    70087: "IP FORBIDDEN",
}
MAX_LIVE_TOKENS = 8  # reference 2.5: per third-party application
MAX_AUTH_FAILURES = 5  # reference 2.6: consecutive failed authentications per IP
FIRMWARE = {"software": "83.20.0.21", "appliance": "37.20.0.53", "cloud": "84.20.0.21"}
_ALNUM = string.ascii_letters + string.digits


class PApiError(Exception):
    """An API answer with a non-zero errcode (HTTP 200, JSON envelope)."""

    def __init__(self, errcode: int, **extra: Any) -> None:
        super().__init__(errcode)
        self.errcode = errcode
        self.extra = extra

    def payload(self) -> dict[str, Any]:
        errmsg = "FAILURE" if self.errcode == -1 else ERRMSG.get(self.errcode, "FAILURE")
        return {"errcode": self.errcode, "errmsg": errmsg, **self.extra}


def invalid_param(name: str, value: str = "error") -> PApiError:
    return PApiError(40002, invalid_param_list=[{"field": name, "value": value}])


def new_token() -> str:
    """32 characters [A-Za-z0-9], as the documents' example tokens (reference 2.1)."""
    return "".join(secrets.choice(_ALNUM) for _ in range(32))


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(_ALNUM) for _ in range(length))


# -- the PBX's Date and Time Display Format ----------------------------------------------------

_FORMAT_TOKENS = re.compile(r"YYYY|MM|DD|HH|hh|mm|ss|A")
_STRFTIME = {
    "YYYY": "%Y",
    "MM": "%m",
    "DD": "%d",
    "HH": "%H",
    "hh": "%I",
    "mm": "%M",
    "ss": "%S",
    "A": "%p",
}


def strftime_pattern(display_format: str) -> str:
    """``MM/DD/YYYY HH:mm:ss`` (the PBX's notation) as a :func:`time.strftime` pattern."""
    pattern = _FORMAT_TOKENS.sub(lambda m: _STRFTIME[m.group(0)], display_format)
    if pattern == display_format:
        raise ValueError(f"not a display format: {display_format!r}")
    return pattern


# -- records ------------------------------------------------------------------------------------


@dataclass
class AccessToken:
    app: str
    expires: float


@dataclass
class RefreshToken:
    app: str
    expires: float
    access: str  # the access token issued with it


@dataclass
class Recording:
    id: int
    cdr_id: int
    call_id: str
    uid: str
    file: str
    path: Path
    size: int
    sha256: str
    start: float  # epoch of the call start
    duration: int
    call_from: str
    call_to: str
    from_name: str
    to_name: str
    call_type: str
    emitted_at: float  # simulator clock when its 30012 was emitted
    deleted: bool = False


@dataclass
class Cdr:
    id: int
    call_id: str
    uid: str
    start: float
    call_from: str
    call_to: str
    from_name: str
    to_name: str
    duration: int
    ring_duration: int
    talk_duration: int
    disposition: str
    call_type: str
    src_trunk: str
    dst_trunk: str
    did_number: str
    record_file: str


@dataclass
class DownloadUrl:
    recording_id: int
    expires: float
    uses: int = 0


@dataclass
class AuthFailures:
    count: int = 0
    blocked_until: float | None = None  # math.inf: until unblocked by hand


@dataclass
class PSeriesState:
    """Everything the PBX remembers; all methods are thread-safe."""

    config: PSeriesConfig
    client_secret: str = field(repr=False)
    clock: Clock
    recordings_dir: Path
    lock: threading.RLock = field(default_factory=threading.RLock)
    access: dict[str, AccessToken] = field(default_factory=dict, repr=False)
    refresh: dict[str, RefreshToken] = field(default_factory=dict, repr=False)
    failures: dict[str, AuthFailures] = field(default_factory=dict)
    recordings: dict[int, Recording] = field(default_factory=dict)
    cdrs: list[Cdr] = field(default_factory=list)
    urls: dict[str, DownloadUrl] = field(default_factory=dict, repr=False)
    request_log: list[tuple[str, str]] = field(default_factory=list)
    get_token_count: int = 0
    mp3_busy: int = 0
    rng: random.Random = field(default_factory=random.Random)
    _next_recording: int = 1
    _next_cdr: int = 1
    _next_url: int = 1
    _call_seq: int = 0

    def __post_init__(self) -> None:
        if self.config.seed is not None:
            self.rng.seed(self.config.seed)
        self.tz = ZoneInfo(self.config.timezone)
        self.firmware = FIRMWARE[self.config.edition]

    @property
    def faults(self) -> PSeriesFaults:
        return self.config.faults

    # -- faults ---------------------------------------------------------------------------------

    def take(self, counter: str) -> bool:
        """Consume one of the fault counter `counter`; True when there was one."""
        with self.lock:
            value = int(getattr(self.faults, counter))
            if value <= 0:
                return False
            setattr(self.faults, counter, value - 1)
            return True

    def chance(self, rate: float) -> bool:
        if rate <= 0:
            return False
        with self.lock:
            return self.rng.random() < rate

    def log(self, path: str, outcome: str) -> None:
        with self.lock:
            self.request_log.append((path, outcome))

    # -- lockout and IP rules (reference 2.6) ---------------------------------------------------

    def check_ip(self, ip: str) -> None:
        """70004 for a blocked IP; 70087 for one outside the allow-list."""
        now = self.clock.now()
        with self.lock:
            entry = self.failures.get(ip)
            if entry is not None and entry.blocked_until is not None:
                if now < entry.blocked_until:
                    raise PApiError(70004)
                entry.blocked_until = None
                entry.count = 0
        allow = self.config.ip_allow
        if allow and ip not in allow:
            raise PApiError(70087)

    def unblock(self, ip: str) -> None:
        with self.lock:
            self.failures.pop(ip, None)

    def _auth_failed(self, ip: str) -> None:
        with self.lock:
            entry = self.failures.setdefault(ip, AuthFailures())
            entry.count += 1
            if entry.count >= MAX_AUTH_FAILURES:
                lockout = self.config.lockout_s
                entry.blocked_until = math.inf if lockout is None else self.clock.now() + lockout

    # -- tokens (reference 2) -------------------------------------------------------------------

    def _purge(self, now: float) -> None:
        for key in [k for k, t in self.access.items() if t.expires <= now]:
            del self.access[key]
        for key in [k for k, t in self.refresh.items() if t.expires <= now]:
            del self.refresh[key]

    def live_tokens(self, app: str | None = None) -> int:
        now = self.clock.now()
        with self.lock:
            self._purge(now)
            return sum(1 for t in self.access.values() if app is None or t.app == app)

    def _issue(self, app: str, now: float) -> dict[str, Any]:
        access = new_token()
        refresh = new_token()
        cfg = self.config
        self.access[access] = AccessToken(app=app, expires=now + cfg.access_ttl_s)
        self.refresh[refresh] = RefreshToken(
            app=app, expires=now + cfg.refresh_ttl_s, access=access
        )
        return {
            "errcode": 0,
            "errmsg": "SUCCESS",
            "access_token_expire_time": int(cfg.access_ttl_s),
            "access_token": access,
            "refresh_token_expire_time": int(cfg.refresh_ttl_s),
            "refresh_token": refresh,
        }

    def get_token(self, ip: str, username: str, password: str) -> dict[str, Any]:
        cfg = self.config
        if not secrets.compare_digest(
            username.encode(), cfg.client_id.encode()
        ) or not secrets.compare_digest(password.encode(), self.client_secret.encode()):
            self._auth_failed(ip)
            raise PApiError(
                -1, invalid_param_list=[{"field": "username or password", "value": "error"}]
            )
        now = self.clock.now()
        with self.lock:
            self.failures.pop(ip, None)
            self._purge(now)
            app = cfg.client_id
            if cfg.token_policy == "invalidate_previous":  # noqa: S105 (not a password)
                for key in [k for k, t in self.access.items() if t.app == app]:
                    del self.access[key]
                for key in [k for k, t in self.refresh.items() if t.app == app]:
                    del self.refresh[key]
            elif sum(1 for t in self.access.values() if t.app == app) >= MAX_LIVE_TOKENS:
                raise PApiError(60002)
            self.get_token_count += 1
            return self._issue(app, now)

    def refresh_token(self, token: str) -> dict[str, Any]:
        """Both tokens rotate; the used refresh token dies (reference 2.3: "latest value")."""
        now = self.clock.now()
        with self.lock:
            self._purge(now)
            entry = self.refresh.pop(token, None) if token else None
            if entry is None:
                raise PApiError(10004)
            if self.config.refresh_invalidates_old_access:
                self.access.pop(entry.access, None)
            return self._issue(entry.app, now)

    def authenticate(self, token: str | None) -> str:
        """The app of a live access token; 10004 for a missing, unknown or expired one."""
        if not token:
            raise PApiError(10004)
        now = self.clock.now()
        with self.lock:
            entry = self.access.get(token)
            if entry is None or entry.expires <= now:
                self.access.pop(token, None)
                raise PApiError(10004)
            return entry.app

    def token_alive(self, token: str) -> bool:
        try:
            self.authenticate(token)
        except PApiError:
            return False
        return True

    def del_token(self, token: str) -> None:
        with self.lock:
            self.access.pop(token, None)
            for key in [k for k, t in self.refresh.items() if t.access == token]:
                del self.refresh[key]

    def restart(self) -> None:
        """A PBX restart: tokens and download URLs are gone (the blocklist stays)."""
        with self.lock:
            self.access.clear()
            self.refresh.clear()
            self.urls.clear()
            self.mp3_busy = 0

    # -- calls ----------------------------------------------------------------------------------

    def local(self, epoch: float) -> datetime:
        return datetime.fromtimestamp(epoch, self.tz)

    def display_time(self, epoch: float) -> str:
        return self.local(epoch).strftime(strftime_pattern(self.config.display_format))

    def next_call_id(self, start: float) -> str:
        with self.lock:
            self._call_seq += 1
            return f"{int(start)}.{self._call_seq}"

    def next_uid(self, start: float) -> str:
        with self.lock:
            tail = self.rng.randrange(100_000)
        return f"{self.local(start).strftime('%Y%m%d%H%M%S')}{tail:05d}"

    def add_cdr(self, **fields: Any) -> Cdr:
        with self.lock:
            cdr = Cdr(id=self._next_cdr, **fields)
            self._next_cdr += 1
            self.cdrs.append(cdr)
            return cdr

    def new_recording_id(self) -> int:
        with self.lock:
            value = self._next_recording
            self._next_recording += 1
            return value

    def add_recording(self, recording: Recording) -> None:
        with self.lock:
            self.recordings[recording.id] = recording

    def visible(self, recording: Recording, now: float) -> bool:
        """Present, and past the recording_list_delay_s fault's window."""
        if recording.deleted:
            return False
        return now >= recording.emitted_at + self.faults.recording_list_delay_s

    def visible_recordings(self) -> list[Recording]:
        now = self.clock.now()
        with self.lock:
            return [r for r in self.recordings.values() if self.visible(r, now)]

    def find_recording(self, *, rec_id: int | None, file: str | None) -> Recording:
        now = self.clock.now()
        with self.lock:
            found: Recording | None = None
            if rec_id is not None:
                found = self.recordings.get(rec_id)
            else:
                found = next((r for r in self.recordings.values() if r.file == file), None)
            if found is None or not self.visible(found, now):
                raise PApiError(60001)
            return found

    def by_file(self, file: str) -> Recording:
        with self.lock:
            for recording in self.recordings.values():
                if recording.file == file and not recording.deleted:
                    return recording
        raise KeyError(file)

    def delete_recording(self, file: str) -> None:
        recording = self.by_file(file)
        with self.lock:
            recording.deleted = True
        recording.path.unlink(missing_ok=True)

    # -- download URLs (reference 3.3, 3.4) -----------------------------------------------------

    def issue_url(self, recording: Recording, *, attachment: bool) -> str:
        now = self.clock.now()
        ext = Path(recording.file).suffix or ".wav"
        with self.lock:
            number = self._next_url
            self._next_url += 1
            tail = random_text(self.rng, 16)
            stamp = self.local(now).strftime("%Y%m%d%H%M%S")
            prefix = "/api/downloadattachment/" if attachment else "/api/download/"
            name = f"Recording-{self.firmware}-{number}-download-{stamp}-{tail}{ext}"
            path = prefix + name
            self.urls[path] = DownloadUrl(recording_id=recording.id, expires=now + 1800.0)
            return path

    def redeem_url(self, path: str) -> Recording | None:
        """The recording behind a download URL; None when unknown, expired, used up or the
        file is gone."""
        now = self.clock.now()
        with self.lock:
            entry = self.urls.get(path)
            if entry is None:
                return None
            if entry.expires <= now or self.faults.expire_urls:
                del self.urls[path]
                return None
            if self.config.single_use_urls and entry.uses >= 1:
                return None
            recording = self.recordings.get(entry.recording_id)
            if recording is None or recording.deleted or not recording.path.exists():
                return None
            entry.uses += 1
            return recording


# -- MP3 files ----------------------------------------------------------------------------------

# MPEG-1 Layer III, 32 kbit/s, 32 kHz, mono, no CRC: 144 bytes per frame of 1152 samples.
_MP3_HEADER = bytes([0xFF, 0xFB, 0x18, 0xC4])
_MP3_FRAME = 144
_MP3_FRAMES_PER_SECOND = 32000 / 1152


def _id3_tag(marker: bytes) -> bytes:
    text = b"\x00callvault\x00" + marker.hex().encode()
    frame = b"TXXX" + len(text).to_bytes(4, "big") + b"\x00\x00" + text
    size = len(frame)
    syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x03\x00\x00" + syncsafe + frame


def write_mp3(
    path: Path, *, seconds: float = 0.0, total_size: int | None = None, marker: bytes = b""
) -> tuple[int, str]:
    """Write an MP3-looking file (ID3v2 tag, then silent MPEG frames) atomically, in constant
    memory; return (size, SHA-256 hex). `total_size` bytes in all when given."""
    tag = _id3_tag(marker)
    frame = _MP3_HEADER + bytes(_MP3_FRAME - len(_MP3_HEADER))
    if total_size is not None:
        body = max(total_size - len(tag), 0)
    else:
        body = math.ceil(max(seconds, 0.0) * _MP3_FRAMES_PER_SECOND) * _MP3_FRAME
    block = frame * 4096
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as out:
        out.write(tag)
        digest.update(tag)
        remaining = body
        while remaining > 0:
            piece = block[: min(remaining, len(block))]
            out.write(piece)
            digest.update(piece)
            remaining -= len(piece)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return len(tag) + body, digest.hexdigest()
