"""What the two API clients share (`PbxClient` for the S-Series and the Cloud PBX,
`PSeriesClient` for the P-Series): the HTTP client they talk through, being an async
context manager, and retrying a call's passing failures with backoff.

Each client keeps its own session rules (how it logs in, what a rejected token means):
they are what differs between the APIs.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from callvault.pbx._errors import PbxError, SessionWithdrawn, retried_at_once
from callvault.pbx._tls import TlsOptions, build_ssl_context

T = TypeVar("T")

log = logging.getLogger("callvault.pbx")


def http_client(
    base: httpx.URL,
    tls: TlsOptions,
    *,
    transport: httpx.AsyncBaseTransport | None,
    timeout: float,
    local_address: str | None,
    user_agent: str,
) -> tuple[ssl.SSLContext | None, httpx.AsyncClient]:
    """The SSL context for an https PBX (None for http) and the HTTP client of one API
    client: a new connection per request, as the PBX closes each after its answer; no
    redirects, no proxy settings from the environment; leaving from `local_address`."""
    verify: Any = True
    context = None
    if base.scheme == "https":
        verify = context = build_ssl_context(tls)
    if transport is None and local_address is not None:
        transport = httpx.AsyncHTTPTransport(verify=verify, local_address=local_address)
    client = httpx.AsyncClient(
        transport=transport,
        verify=verify,
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"Connection": "close", "User-Agent": user_agent},
        follow_redirects=False,
        trust_env=False,
    )
    return context, client


class ApiClient:
    """The base of both API clients. A subclass sets `_base_str`, `max_attempts`,
    `backoff_base`, `backoff_max` and `_sleep`, and defines `aclose` and `_authed` (run an
    operation, renewing a rejected session once)."""

    _base_str: str
    max_attempts: int
    backoff_base: float
    backoff_max: float
    _sleep: Callable[[float], Awaitable[None]]
    # The last refused authentication (when, and what was raised), and how long no other
    # is sent after one: five refusals in a row lock this host out of the PBX.
    _auth_failure: tuple[float, PbxError] | None
    login_failure_pause: float
    # Why the client may not talk to the PBX now (None: it may); see `_check_guard`.
    guard: Callable[[], str | None] | None

    @property
    def base_url(self) -> str:
        return self._base_str

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        raise NotImplementedError

    async def _authed(self, operation: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError

    def _refuse_while_paused(self, now: float, wait: str, why: str) -> None:
        """Raise the last refusal again, at once, while `login_failure_pause` has not run
        out since it: "(`wait` N s: `why`)" added to its message, the refusal itself as its
        `__cause__` (a caller with a pause of its own, the archiver's session, says that
        one instead)."""
        if self._auth_failure is None:
            return
        failed_at, failure = self._auth_failure
        if now - failed_at < self.login_failure_pause:
            remaining = int(self.login_failure_pause - (now - failed_at)) + 1
            again = type(failure)(
                f"{failure.message} ({wait} {remaining} s: {why})", errno=failure.errno
            )
            again.kind = failure.kind
            raise again from failure

    def _check_guard(self, context: str) -> None:
        """Raise `SessionWithdrawn` if the guard withholds the PBX now."""
        if self.guard is not None:
            withheld = self.guard()
            if withheld is not None:
                raise SessionWithdrawn(f"{context}: not sent: {withheld}")

    def _guarded(self, context: str) -> dict[str, Any]:
        """httpx request extensions that ask the guard again at the last moment: when the
        request's first byte is about to be written, after any connect and TLS handshake.

        The guard is also asked before the request (so that nothing is connected for a
        request that may not go); this second check closes the window between the two,
        where a node paused (SIGSTOP, a VM frozen) after the first check would send its
        request on waking, after its lease ran out. What is left is the microseconds
        between this check and the write.
        """
        if self.guard is None:
            return {}

        async def trace(event: str, info: dict[str, Any]) -> None:
            if event.endswith(".send_request_headers.started"):
                self._check_guard(context)

        return {"trace": trace}

    def _backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt` + 1: doubling, capped, jittered."""
        delay = min(self.backoff_max, self.backoff_base * 2.0 ** (attempt - 1))
        return delay * random.uniform(0.5, 1.0)

    async def _retrying(self, operation: Callable[[], Awaitable[T]], context: str) -> T:
        """Run an authenticated operation, retrying passing failures with backoff, up to
        `max_attempts` in all."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._authed(operation)
            except PbxError as exc:
                if not retried_at_once(exc) or attempt >= self.max_attempts:
                    if attempt > 1 and retried_at_once(exc):
                        exc.message = f"{exc.message} (gave up after {attempt} attempts)"
                    raise
                delay = self._backoff(attempt)
                log.warning(
                    "%s: attempt %d of %d failed (%s); retrying in %.1f s",
                    context,
                    attempt,
                    self.max_attempts,
                    exc,
                    delay,
                )
                await self._sleep(delay)
