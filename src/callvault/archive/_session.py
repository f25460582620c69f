"""The PBX session: login, heartbeats, re-login, and the health everyone can read.

One `PbxSession` supervises one `PbxClient`:

* logs in (the client sends the events port, secret url and report version);
* heartbeats well inside the 30-minute sliding token;
* logs in again when the PBX restarted (BootUp) or a token error survives the client's
  own single re-login;
* on a wrong password or a lockout it PAUSES: `ready` is cleared so workers stop, the
  health says why, and the next login is tried only after a long pause. Logins never
  loop (five failures lock this host out of the PBX for ten minutes);
* writes its health (`ok`/`error`, the error in words, last success time) to the index
  setting `pbx_health` as JSON, for `callvault status` and the web status page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from callvault.pbx import (
    LoginFailed,
    LoginLockedOut,
    PbxError,
    TokenError,
)

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
    ) -> None:
        self._client = client
        self._label = label  # which PBX, in log lines ("PBX paris" when there are several)
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
        """A worker's call ended in a refused login (`ErrorKind.LOGIN_REFUSED`: a wrong
        password, a lockout): pause everything."""
        self.ready.clear()
        self._need_login = True
        self._pause_for(exc)
        self._poke.set()

    def report_success(self) -> None:
        """A worker talked to the PBX successfully."""
        if self.health.get("state") != "ok" or time.monotonic() - self._last_health_write > 30:
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
                delay = await self._try_login()
                if delay:
                    await self._wait(stop, delay)
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
        except (LoginFailed, LoginLockedOut) as exc:
            self._pause_for(exc)
            return max(0.0, self._paused_until - time.monotonic())
        except PbxError as exc:
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
        except (LoginFailed, LoginLockedOut) as exc:
            self.report_auth_failure(exc)
            return 0.0
        except PbxError as exc:
            log.warning("heartbeat to %s failed: %s", self._label, exc)
            self._set_health("error", f"heartbeat failed: {exc}")
            return min(30.0, self._heartbeat_interval_s)
        self._set_health("ok", None)
        return self._heartbeat_interval_s

    def _pause_for(self, exc: Exception) -> None:
        if isinstance(exc, LoginLockedOut):
            pause = self._lockout_pause_s
            what = "the PBX has locked this host out after failed logins"
        else:
            pause = min(
                self._login_failed_pause_max_s,
                self._login_failed_pause_s * (2 ** min(self._login_failures, 10)),
            )
            self._login_failures += 1
            what = "the PBX refused the API username or password"
        self._paused_until = max(self._paused_until, time.monotonic() + pause)
        text = f"{what} ({exc}); downloads paused, next login attempt in {pause / 60:.0f} min"
        log.error("%s: %s", self._label, text)
        self._set_health("error", text)

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

    def _set_health(self, state: str, error: str | None) -> None:
        self.health = {
            "state": state,
            "ok": state == "ok",
            "error": error,
            "last_success_at": _iso(self._client.last_success_at),
            "updated_at": datetime.now(UTC).isoformat(),
        }
        self._last_health_write = time.monotonic()
        if self._write_health is not None:
            try:
                self._write_health(json.dumps(self.health))
            except Exception as exc:
                log.warning("could not record the PBX health: %s", exc)
