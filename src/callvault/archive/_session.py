"""The PBX session: login, heartbeats, re-login, and the health everyone can read.

One `PbxSession` supervises one `PbxClient`:

* logs in (the client sends the events port, secret url and report version);
* heartbeats well inside the 30-minute sliding token;
* logs in again when the PBX restarted (BootUp) or a token error survives the client's
  own single re-login;
* on a refused login (a wrong password or P-Series Client Secret, a lockout: any error
  of kind `ErrorKind.LOGIN_REFUSED`, whoever met it) it PAUSES: `ready` is cleared so
  workers and the event stream stop, ONE line is logged at ERROR, the health says why,
  when the next login is and how to fix it, and the next login is tried only after a long
  pause. Logins never loop (five failures lock this host out of the PBX);
* writes its health (`ok`/`error`, the error in words, last success time; for a refused
  login also `reason` "login-refused", `retry_at` and `fix`) to the index as JSON, for
  `callvault status` and the web status page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from callvault.pbx import (
    ErrorKind,
    LoginFailed,
    LoginLockedOut,
    PbxError,
    TokenError,
)

if TYPE_CHECKING:
    from callvault.index import Index

log = logging.getLogger("callvault.archive")


class SessionClient(Protocol):
    """The part of `PbxClient` the session drives."""

    async def login(self) -> None: ...
    async def heartbeat(self) -> None: ...
    async def logout(self) -> None: ...

    @property
    def last_success_at(self) -> float | None: ...


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def refused_login(exc: BaseException) -> bool:
    """Whether `exc` is a refused login (a wrong password or secret, a lockout, a login
    refused for another reason): what pauses the session rather than being tried again."""
    return isinstance(exc, LoginFailed | LoginLockedOut) or (
        isinstance(exc, PbxError) and exc.kind is ErrorKind.LOGIN_REFUSED
    )


def _first_refusal(exc: Exception) -> Exception:
    """The refusal the PBX answered: a client that remembers a refusal raises it again,
    without asking, with its own pause in the message (`ApiClient._refuse_while_paused`:
    the original is its cause); the session says its own pause instead."""
    cause = exc.__cause__
    if isinstance(cause, PbxError) and type(cause) is type(exc):
        return cause
    return exc


# What the PBX refused, by the API kind (`callvault.index.pbxs.KINDS`), and how its answer
# is numbered.
_CREDENTIALS = {"p-series": ("API Client ID or Client Secret", "errcode")}
_DEFAULT_CREDENTIALS = ("API username or password", "errno")


class PbxSession:
    """Keeps the client logged in and says whether the PBX can be used right now."""

    def __init__(
        self,
        client: SessionClient,
        *,
        write_health: Callable[[str], None] | None = None,
        heartbeat_interval_s: float = 600.0,
        lockout_pause_s: float = 630.0,
        login_failed_pause_s: float = 900.0,
        login_failed_pause_max_s: float = 6 * 3600.0,
        transport_retry_s: tuple[float, ...] = (2.0, 5.0, 15.0, 30.0, 60.0),
        label: str = "the PBX",
        kind: str = "s-series",
        fix: str | None = None,
    ) -> None:
        self._client = client
        self._label = label  # which PBX, in log lines ("PBX paris" when there are several)
        self._credentials = _CREDENTIALS.get(kind, _DEFAULT_CREDENTIALS)
        self._fix = fix  # what an operator does about a refused login, in words
        self._write_health = write_health
        self._heartbeat_interval_s = heartbeat_interval_s
        self._lockout_pause_s = lockout_pause_s
        self._login_failed_pause_s = login_failed_pause_s
        self._login_failed_pause_max_s = login_failed_pause_max_s
        self._transport_retry_s = transport_retry_s
        self.ready = asyncio.Event()  # logged in and not paused: workers may talk to the PBX
        self._poke = asyncio.Event()  # something happened: re-login, auth failure
        self._need_login = True
        self._paused_until = 0.0  # time.monotonic()
        self._paused_until_wall: datetime | None = None
        self._login_failures = 0
        self._transport_failures = 0
        self.logins = 0
        self.health: dict[str, object] = {"state": "connecting", "error": None}
        self._last_health_write = 0.0

    # -- called by the receiver and the workers -------------------------------------

    def request_relogin(self) -> None:
        """The PBX restarted (BootUp) or a token went bad: log in again soon."""
        self._need_login = True
        self._poke.set()

    def report_auth_failure(self, exc: Exception) -> None:
        """A call (a worker's, the event stream's) ended in a refused login
        (`ErrorKind.LOGIN_REFUSED`: a wrong password or secret, a lockout): pause
        everything. While a pause runs, another report of it (the refusal the client
        remembers, raised again to each caller) changes nothing: it is logged once, and the
        pause is not lengthened."""
        self.ready.clear()
        self._need_login = True
        if time.monotonic() < self._paused_until:
            log.debug("%s: refused login seen again while paused: %s", self._label, exc)
            return
        self._pause_for(exc)
        self._poke.set()

    @property
    def paused(self) -> bool:
        """Whether logins are paused now (after a refused login)."""
        return time.monotonic() < self._paused_until

    def report_success(self) -> None:
        """A worker (or the event stream) talked to the PBX successfully. The health is
        written at once when it did not say ok or had no contact yet (a login that reused a
        stored token talks to nobody), else at most every 30 s."""
        if (
            self.health.get("state") != "ok"
            or time.monotonic() - self._last_health_write > 30
            or (
                self.health.get("last_success_at") is None
                and self._client.last_success_at is not None
            )
        ):
            self._set_health("ok", None)

    def report_error(self, text: str) -> None:
        """A worker could not reach the PBX (transient): shown, not acted upon. Permanent
        errors (an unsafe name, a rejected request) are the job's trouble, not the
        session's, and are not reported here."""
        if self.health.get("error") != text:
            self._set_health("degraded", text)

    # -- the supervisor --------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Log in, heartbeat, re-login, pause on auth failures, until `stop` is set."""
        next_heartbeat = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now < self._paused_until:
                await self._wait(stop, self._paused_until - now)
                continue
            if self._need_login:
                contact = self._client.last_success_at
                delay = await self._try_login()
                if delay:
                    await self._wait(stop, delay)
                elif self._client.last_success_at == contact:
                    # Logged in without a word to the PBX (a P-Series client reusing a
                    # stored token): a heartbeat at once tells whether the PBX takes it,
                    # and the health gets its last contact.
                    next_heartbeat = time.monotonic()
                else:
                    next_heartbeat = time.monotonic() + self._heartbeat_interval_s
                continue
            if now < next_heartbeat:
                await self._wait(stop, next_heartbeat - now)
                continue
            next_heartbeat = time.monotonic() + await self._heartbeat()

    async def close(self) -> None:
        """Log out (best effort) at shutdown."""
        self.ready.clear()
        try:
            await asyncio.wait_for(self._client.logout(), timeout=10)
        except (PbxError, OSError, TimeoutError) as exc:
            log.info("logout failed (ignored at shutdown): %s", exc)
        self._set_health("stopped", None)

    async def _try_login(self) -> float:
        """One login attempt; returns 0 on success or how long to wait before the next."""
        self.ready.clear()
        try:
            await self._client.login()
        except PbxError as exc:
            if refused_login(exc):
                self._pause_for(exc)
                return max(0.0, self._paused_until - time.monotonic())
            delay = self._transport_retry_s[
                min(self._transport_failures, len(self._transport_retry_s) - 1)
            ]
            self._transport_failures += 1
            log.warning("login to %s failed: %s; next attempt in %.0f s", self._label, exc, delay)
            self._set_health("error", f"cannot log in to the PBX: {exc}")
            return delay
        self.logins += 1
        self._need_login = False
        self._login_failures = 0
        self._transport_failures = 0
        self._paused_until_wall = None
        self._poke.clear()
        log.info("logged in to %s", self._label)
        self._set_health("ok", None)
        self.ready.set()
        return 0.0

    async def _heartbeat(self) -> float:
        """One heartbeat; returns the delay until the next."""
        try:
            await self._client.heartbeat()
        except TokenError:
            self.request_relogin()
            return 0.0
        except PbxError as exc:
            if refused_login(exc):
                self.report_auth_failure(exc)
                return 0.0
            log.warning("heartbeat to %s failed: %s", self._label, exc)
            self._set_health("error", f"heartbeat failed: {exc}")
            return min(30.0, self._heartbeat_interval_s)
        self._set_health("ok", None)
        return self._heartbeat_interval_s

    def _pause_for(self, exc: Exception) -> None:
        """Pause logins after a refusal: one line at ERROR, and the health says why, when
        the next login is and what to do (the one retry time is the session's: the
        client's own, shorter, memory of the refusal is not shown)."""
        first = _first_refusal(exc)
        credentials, numbered = self._credentials
        code = getattr(first, "errno", None)
        if isinstance(first, LoginLockedOut):
            pause = self._lockout_pause_s
            what = "the PBX has locked this host out after failed logins"
            what += f" ({numbered} {code})" if code else ""
        else:
            pause = min(
                self._login_failed_pause_max_s,
                self._login_failed_pause_s * (2 ** min(self._login_failures, 10)),
            )
            self._login_failures += 1
            if isinstance(first, LoginFailed):
                what = f"the PBX refused the {credentials}"
                what += f" ({numbered} {code})" if code else ""
            else:
                what = f"the PBX refused the login: {first}"
        until = time.monotonic() + pause
        if until > self._paused_until:
            self._paused_until = until
            self._paused_until_wall = datetime.now(UTC) + timedelta(seconds=pause)
            wait = pause
        else:
            wait = self._paused_until - time.monotonic()
        self._announce_pause(what, wait, fix=not isinstance(first, LoginLockedOut))

    def refused_elsewhere(self, at: datetime, what: str) -> None:
        """This same login was refused at `at` to someone else (`callvault pbx test`):
        pause as if this session had met the refusal then, rather than send the password
        once more (five refusals lock this host out of the PBX). Call before `run`."""
        pause = self._login_failed_pause_s
        wait = pause - (datetime.now(UTC) - at).total_seconds()
        if wait <= 0:
            return
        self._login_failures += 1
        self._paused_until = time.monotonic() + wait
        self._paused_until_wall = at + timedelta(seconds=pause)
        self._announce_pause(what, wait, fix=True)

    def _announce_pause(self, what: str, wait: float, *, fix: bool) -> None:
        """One line at ERROR, and the health: what was refused, when the next login is,
        and (`fix`) what to do about it."""
        text = f"{what}; downloads paused"
        how = f"; to fix it: {self._fix}" if self._fix and fix else ""
        # "the PBX refused ...", not "the PBX: the PBX refused ..." when there is one.
        who = "" if self._label == "the PBX" else f"{self._label}: "
        log.error("%s%s, next login attempt in %s%s", who, text, _minutes(wait), how)
        self._set_health("error", text, refused=True)

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        stop_wait = asyncio.ensure_future(stop.wait())
        poke_wait = asyncio.ensure_future(self._poke.wait())
        try:
            await asyncio.wait(
                {stop_wait, poke_wait},
                timeout=max(0.0, seconds),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for task in (stop_wait, poke_wait):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._poke.clear()

    def _set_health(self, state: str, error: str | None, *, refused: bool = False) -> None:
        self.health = {
            "state": state,
            "ok": state == "ok",
            "error": error,
            "last_success_at": _iso(self._client.last_success_at),
            "updated_at": datetime.now(UTC).isoformat(),
        }
        if refused:
            self.health["reason"] = ErrorKind.LOGIN_REFUSED.value
            if self._paused_until_wall is not None:
                self.health["retry_at"] = self._paused_until_wall.isoformat()
            if self._fix:
                self.health["fix"] = self._fix
        self._last_health_write = time.monotonic()
        if self._write_health is not None:
            try:
                self._write_health(json.dumps(self.health))
            except Exception as exc:
                log.warning("could not record the PBX health: %s", exc)


# The `reason` of the health of a PBX a node leaves out: the master keys it loaded cannot
# open the PBX's password (`callvault.ops.archive_status` words it for `status`).
PASSWORD_UNOPENED = "password-unopened"  # noqa: S105 - a health reason, not a password


def note_left_out(index: Index, name: str, problem: str, node: str) -> None:
    """Keep, as the health of the registered PBX `name`, that node `node` leaves it out and
    why (`problem`), for `status`, the status page and the alerts; unless a node holds its
    lease (that node's session says how it goes) or its health says so already. A failure
    to write is logged, never raised: the other PBXs are archived all the same."""
    try:
        record = index.pbxs.get(name)
        if record is None:
            return
        health = record.session or {}
        if health.get("reason") == PASSWORD_UNOPENED and health.get("error") == problem:
            return
        now = datetime.now(UTC)
        lease = index.leases.get(record.id)
        if lease is not None and lease.held(now):
            return
        said = {
            "state": "error",
            "ok": False,
            "error": problem,
            "reason": PASSWORD_UNOPENED,
            "node": node,
            "last_success_at": health.get("last_success_at"),
            "updated_at": now.isoformat(),
        }
        index.pbxs.report_session(record.id, json.dumps(said))
    except Exception as exc:
        log.warning("could not record why PBX %s is left out: %s", name, exc)


def _minutes(seconds: float) -> str:
    """A pause in words: "15 min", "45 s"."""
    if seconds < 90:
        return f"{max(0, round(seconds))} s"
    return f"{round(seconds / 60)} min"
