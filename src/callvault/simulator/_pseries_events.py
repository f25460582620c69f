"""Event delivery of the simulated P-Series PBX: WebSocket subscribers and webhooks.

Events are sent to the WebSockets open at the moment they happen (nothing is queued for a
socket that connects later: a real PBX does not replay), and to every configured webhook
whose event list matches, re-sent on failure from tasks on the server's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from callvault.simulator._pseries_state import PSeriesState
from callvault.simulator._pseries_types import Webhook

logger = logging.getLogger(__name__)

WEBHOOK_USER_AGENT = "OpenAPI"
WEBHOOK_TIMEOUT_S = 5.0


def event_body(event_type: int, serial: str, msg: dict[str, Any], *, as_object: bool) -> bytes:
    """The envelope ``{"type","sn","msg"}``; `msg` JSON-encoded as a string unless `as_object`."""
    payload = {
        "type": event_type,
        "sn": serial,
        "msg": msg if as_object else json.dumps(msg, separators=(",", ":")),
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def signature(secret: str, body: bytes) -> str:
    """``X-Signature``: base64 of HMAC-SHA256(secret, raw body) (reference 5.3)."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


@dataclass(eq=False)
class WsSession:
    """One open WebSocket: its outgoing queue (None closes it) and subscribed topics."""

    token: str = field(repr=False)
    queue: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    topics: frozenset[int] = frozenset()

    def close(self) -> None:
        self.queue.put_nowait(None)


class EventHub:
    """Fans events out to WebSocket sessions and webhooks, on the server's event loop.

    :meth:`emit` may be called from any thread. Webhook deliveries are counted as pending
    from the call of :meth:`emit` until their last attempt, so :meth:`wait_idle` right after
    ``place_call`` waits for them.
    """

    def __init__(self, state: PSeriesState, loop: asyncio.AbstractEventLoop) -> None:
        self._state = state
        self._loop = loop
        self.sessions: set[WsSession] = set()  # touched on the loop only
        self._pending = 0
        self._idle = threading.Condition()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self.deliveries: list[tuple[str, int, int]] = []  # guarded by state.lock

    # -- sessions (on the loop) -----------------------------------------------------------------

    def register(self, session: WsSession) -> None:
        self.sessions.add(session)

    def unregister(self, session: WsSession) -> None:
        self.sessions.discard(session)

    def close_sessions(self, predicate: Callable[[WsSession], bool] | None = None) -> None:
        for session in list(self.sessions):
            if predicate is None or predicate(session):
                session.close()

    def close_all_threadsafe(self) -> None:
        """Close every WebSocket (a PBX restart); from any thread, returns once done."""
        done = threading.Event()

        def close() -> None:
            self.close_sessions()
            done.set()

        try:
            self._loop.call_soon_threadsafe(close)
        except RuntimeError:  # loop closed: nothing is open
            return
        done.wait(5)

    # -- emitting -------------------------------------------------------------------------------

    def emit(self, event_type: int, body: bytes) -> None:
        """Send `body` (an event envelope) to subscribers of `event_type` and to webhooks."""
        hooks = [
            hook
            for hook in self._state.config.webhooks
            if hook.events is None or event_type in hook.events
        ]
        with self._idle:
            if self._closed:
                return
            self._pending += len(hooks)
        try:
            self._loop.call_soon_threadsafe(self._dispatch, event_type, body, hooks)
        except RuntimeError:  # loop closed: the simulator is stopping
            self._done(len(hooks))

    def _dispatch(self, event_type: int, body: bytes, hooks: list[Webhook]) -> None:
        text = body.decode()
        for session in list(self.sessions):
            if event_type in session.topics:
                session.queue.put_nowait(text)
        if self._closed:
            self._done(len(hooks))
            return
        for hook in hooks:
            task = self._loop.create_task(self._deliver(hook, event_type, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _done(self, count: int = 1) -> None:
        with self._idle:
            self._pending = max(self._pending - count, 0)
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    # -- webhooks -------------------------------------------------------------------------------

    async def _deliver(self, hook: Webhook, event_type: int, body: bytes) -> None:
        cfg = self._state.config
        try:
            for attempt in range(max(cfg.webhook_retries, 0) + 1):
                status = await self._send(hook, body)
                with self._state.lock:
                    self.deliveries.append((hook.url, event_type, status))
                if 200 <= status < 300:
                    return
                if attempt < cfg.webhook_retries:
                    await asyncio.sleep(cfg.webhook_retry_interval_s)
        except asyncio.CancelledError:
            raise
        except Exception:  # a delivery must never take the hub down silently
            logger.exception("webhook delivery to %s failed", hook.url)
        finally:
            self._done()

    async def _send(self, hook: Webhook, body: bytes) -> int:
        """One attempt; the HTTP status, or 0 when there was no answer."""
        if self._client is None:
            # Whether the PBX checks a webhook's certificate is unknown: it does not here,
            # so test receivers may use self-signed ones. Never through a proxy.
            self._client = httpx.AsyncClient(
                timeout=WEBHOOK_TIMEOUT_S,
                trust_env=False,
                verify=False,  # noqa: S501
            )
        secret = hook.secret
        if self._state.take("bad_signature_next"):
            secret = secret + "-wrong"
        headers = {
            "User-Agent": WEBHOOK_USER_AGENT,
            "Content-Type": "application/json",
            "X-Signature": signature(secret, body),
        }
        method = hook.method.upper()
        try:
            if method == "GET" and self._state.config.webhook_get_payload == "query":
                response = await self._client.request(
                    "GET", hook.url, params={"body": body.decode()}, headers=headers
                )
            else:
                response = await self._client.request(
                    method, hook.url, content=body, headers=headers
                )
        except httpx.HTTPError:
            return 0
        return response.status_code

    async def aclose(self) -> None:
        with self._idle:
            self._closed = True
        self.close_sessions()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
        with self._idle:
            self._pending = 0
            self._idle.notify_all()
