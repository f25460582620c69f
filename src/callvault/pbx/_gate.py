"""A readers/writer gate for one API session, asyncio only.

Calls that use the session's token hold the gate SHARED for their critical section (a
download from ``get_random`` until its GET's response headers arrived, so that no new login
can come between a random and its use); any number of them at once. Changing the session
(login, re-login, logout) holds it EXCLUSIVE: it waits until the shared holders have left,
and from the moment it waits no new shared holder gets in, so a re-login is never starved by
a stream of downloads.

Waiters are served in arrival order: a run of shared waiters at the head of the queue is let
in together, an exclusive waiter alone once nobody holds the gate. Neither side starves.

A waiter that is cancelled leaves the queue (and hands the gate back if it had just been
granted it), so a cancellation never leaves the gate held nor a waiter behind it stuck.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import Literal

_Kind = Literal["shared", "exclusive"]


class SessionGate:
    """Shared/exclusive gate with first-come-first-served waiters; not thread-safe.

    ``async with gate.shared(): ...`` and ``async with gate.exclusive(): ...``. Not
    reentrant: a shared holder that needs the exclusive side must leave first.
    """

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiters: deque[tuple[_Kind, asyncio.Future[None]]] = deque()

    def __repr__(self) -> str:
        return (
            f"SessionGate(shared_holders={self._readers}, exclusive_held={self._writer}, "
            f"waiting={len(self._waiters)})"
        )

    @property
    def shared_holders(self) -> int:
        """How many callers hold the gate shared now."""
        return self._readers

    @property
    def exclusive_held(self) -> bool:
        return self._writer

    @property
    def waiting(self) -> int:
        """How many callers wait for the gate (either side)."""
        return len(self._waiters)

    def shared(self) -> _Hold:
        return _Hold(self, "shared")

    def exclusive(self) -> _Hold:
        return _Hold(self, "exclusive")

    # ------------------------------------------------------------------ inside

    def _free_for(self, kind: _Kind) -> bool:
        if kind == "shared":
            return not self._writer
        return not self._writer and self._readers == 0

    def _take(self, kind: _Kind) -> None:
        if kind == "shared":
            self._readers += 1
        else:
            self._writer = True

    async def _acquire(self, kind: _Kind) -> None:
        # Nobody queued (so nobody to overtake) and free: no suspension at all.
        if not self._waiters and self._free_for(kind):
            self._take(kind)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (kind, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted, then cancelled before this task ran again: give it back.
                self._release(kind)
            else:
                if entry in self._waiters:  # _wake may have dropped it already
                    self._waiters.remove(entry)
                # A queue head that left may have been all that kept others out.
                self._wake()
            raise

    def _release(self, kind: _Kind) -> None:
        if kind == "shared":
            if self._readers <= 0:
                raise RuntimeError("SessionGate: shared release without a holder")
            self._readers -= 1
        else:
            if not self._writer:
                raise RuntimeError("SessionGate: exclusive release without a holder")
            self._writer = False
        self._wake()

    def _wake(self) -> None:
        """Grant the gate to the head of the queue: a run of shared waiters, or one
        exclusive waiter once the gate is free."""
        while self._waiters:
            kind, future = self._waiters[0]
            if future.done():
                # Cancelled; its task has not run its clean-up yet. Skip it.
                self._waiters.popleft()
                continue
            if not self._free_for(kind):
                return
            self._waiters.popleft()
            self._take(kind)
            future.set_result(None)
            if kind == "exclusive":
                return


class _Hold:
    """One use of the gate, as an async context manager."""

    __slots__ = ("_gate", "_kind")

    def __init__(self, gate: SessionGate, kind: _Kind) -> None:
        self._gate = gate
        self._kind: _Kind = kind

    async def __aenter__(self) -> None:
        await self._gate._acquire(self._kind)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._gate._release(self._kind)
