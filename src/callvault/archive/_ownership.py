"""Which PBXs this node works on, when several nodes share one index.

A PBX sends its reports to the address that logged in, and takes a random only from the
address that asked for it: its API session must be one node's at a time. `Ownership`
runs on every `serve` node and decides, with the leases of `index.leases`, which of the
node's PBXs (its lanes) it works on: logs in to, downloads from, reconciles. Reports are
received and committed by every node for every PBX, whoever owns it.

Every `renew_s` seconds (`tick`):

1. a lane whose lease ran out by this process's own monotonic clock stops at once: the
   process was paused (SIGSTOP, a frozen VM) or could not reach the index for a whole
   lease, and another node may hold the PBX by now. The PBX client's guard refuses every
   request meanwhile (`may_talk`), so nothing is sent to the PBX even before the stop;
2. the node's own row in the process registry gets its heartbeat (kind "node": the live
   nodes are what the PBXs are spread over). A heartbeat refused means a newer start of
   this node took over: everything stops (`fenced`);
3. every lease held is renewed; one that cannot be (another node holds it now: fencing
   by token) stops its lane at once. A PBX taken off the registry took its lease row
   with it: its lane stops too, and the node forgets it (never taken again);
4. the share is ceil(PBXs / live nodes): a node over it gives the surplus up (a clean
   stop, then a release, for another node to take at once); a node under it takes free or
   expired leases, trying PBXs in an order of its own (a hash of node and PBX) so that
   nodes starting together mostly try different ones. The leases of a round (up to
   `MAX_TAKEN_PER_ROUND`) are won in one statement; work on the PBXs won starts in the
   background (it takes time, and the next renewal must not wait for it), `MAX_STARTING`
   at once. A round that fails here (the index refused a statement) has renewed the
   leases already, and the next round tries again.

A node that dies holds its PBXs until their leases expire (`ttl_s`, 15 s): the others take
them within `ttl_s + renew_s` seconds; at once if the registry already knows it is gone
(a start on its host found its pid gone). A node that stops cleanly releases them at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from callvault.archive._process import NODE_KIND, ProcessRegistration
from callvault.index import Index, Lease

log = logging.getLogger("callvault.archive")
T = TypeVar("T")

DEFAULT_LEASE_TTL_S = 15.0
DEFAULT_LEASE_RENEW_S = 5.0
# The most PBXs one round takes (their leases in one statement), and the most whose work
# starts at once (the others wait their turn, their leases held and renewed).
MAX_TAKEN_PER_ROUND = 64
MAX_STARTING = 16


def _utcnow() -> datetime:
    return datetime.now(UTC)


class OwnedLane(Protocol):
    """What `Ownership` needs of a lane (a PBX of this node)."""

    @property
    def pbx_id(self) -> int: ...

    @property
    def name(self) -> str: ...

    lease: Lease | None
    lease_deadline: float  # monotonic seconds: past it, the lane may not talk to its PBX

    async def start_work(self) -> None: ...

    async def stop_work(self, *, reason: str, graceful: bool) -> None: ...

    def work_fenced(self) -> str | None: ...


class Ownership:
    """Wins, keeps and gives up this node's PBXs (see the module docstring)."""

    def __init__(
        self,
        index: Index,
        lanes: Sequence[OwnedLane],
        *,
        node: str,
        ttl_s: float = DEFAULT_LEASE_TTL_S,
        renew_s: float = DEFAULT_LEASE_RENEW_S,
        clock: Callable[[], datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < renew_s < ttl_s:
            raise ValueError("the lease must be renewed more often than it lasts")
        self._index = index
        self._lanes = list(lanes)
        self.node = node
        self._ttl = timedelta(seconds=ttl_s)
        self._ttl_s = ttl_s
        self.renew_s = renew_s
        self._clock = clock
        self._monotonic = monotonic
        self.registration: ProcessRegistration | None = None
        self.fenced = asyncio.Event()
        self.fenced_reason: str | None = None
        self.live_nodes = 1
        # Lanes being handed over: their downloads finish in the background (up to the
        # shutdown grace) while the lease is still renewed; then it is released.
        self._handing_over: dict[int, asyncio.Task[None]] = {}
        # Lanes whose work is starting, in the background: a round never waits for it.
        self._starting: dict[int, asyncio.Task[None]] = {}
        self._start_slots = asyncio.Semaphore(MAX_STARTING)
        # Lanes on their way out (taken off the registry): never taken again.
        self._retiring: set[int] = set()
        # Its index calls run on a thread of its own: in the loop's shared pool they could
        # queue behind downloads reading a stalled PBX for their whole timeout, and the
        # leases would run out meanwhile.
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="callvault-leases"
        )

    async def _blocking(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a blocking call on this ownership's own thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, functools.partial(function, *args, **kwargs)
        )

    def add_lane(self, lane: OwnedLane) -> None:
        """A PBX added to the registry: the next rounds count it and spread it."""
        self._lanes.append(lane)

    async def remove_lane(self, lane: OwnedLane, reason: str) -> None:
        """A PBX taken off the registry (or changed): handed over if held (its downloads
        finish, its lease is renewed meanwhile, then released), then forgotten."""
        self._retiring.add(lane.pbx_id)
        try:
            await self._give_up(lane, reason, said=True)  # the caller's log line said why
            handing = self._handing_over.get(lane.pbx_id)
            if handing is not None:
                await asyncio.gather(handing, return_exceptions=True)
        finally:
            self._retiring.discard(lane.pbx_id)
            if lane in self._lanes:
                self._lanes.remove(lane)

    def held(self) -> list[OwnedLane]:
        """The lanes this node works on (those being handed over excluded)."""
        return [
            lane
            for lane in self._lanes
            if lane.lease is not None and lane.pbx_id not in self._handing_over
        ]

    def _leased(self) -> list[OwnedLane]:
        """Every lane whose lease this node holds, those being handed over included."""
        return [lane for lane in self._lanes if lane.lease is not None]

    def may_talk(self, lane: OwnedLane) -> str | None:
        """None if `lane` may talk to its PBX now; else why not (the client's guard)."""
        if lane.lease is None:
            return f"this node ({self.node}) does not hold PBX {lane.name}"
        if self._monotonic() >= lane.lease_deadline:
            return f"this node's lease of PBX {lane.name} ran out before it was renewed"
        return None

    async def register(self) -> None:
        """Register this node's row (a newer start of the same node supersedes the old)."""
        self.registration = await self._blocking(
            ProcessRegistration.register,
            self._index,
            node=self.node,
            kind=NODE_KIND,
            workers=0,
            clock=self._clock,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every `renew_s` seconds until `stop` is set or the node is fenced."""
        while not stop.is_set() and not self.fenced.is_set():
            started = self._monotonic()
            await self.tick()
            wait = max(0.05, self.renew_s - (self._monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)

    async def tick(self) -> None:
        """One round: stop what ran out, heartbeat, renew, then give up or take PBXs.
        Nothing in it waits for downloads: a lease must be renewed in time whatever the
        lanes are doing (hand-overs finish in the background)."""
        for lane in self._leased():
            why = self.may_talk(lane) or lane.work_fenced()
            if why is not None:
                await self._lose(lane, why)
        registration = self.registration
        assert registration is not None, "register() first"
        alive = await self._blocking(
            registration.heartbeat,
            workers_alive=0,  # a node row has no workers: its lanes' rows do
            detail={"pbxs": sorted(lane.name for lane in self.held())},
        )
        if not alive:
            registration.stopped = True
            self.fenced_reason = registration.fenced_reason()
            log.error("%s", self.fenced_reason)
            self.fenced.set()
            for lane in self._leased():
                await self._lose(lane, "this node was superseded")
            return
        await self._renew_all()
        try:
            await self._rebalance()
        except Exception as exc:  # the leases held were renewed: the next round tries again
            log.warning("node %s could not take or give up PBXs this round: %s", self.node, exc)

    async def _renew_all(self) -> None:
        """Renew every lease held, in one statement."""
        leased = self._leased()
        tokens = {lane.pbx_id: lane.lease.token for lane in leased if lane.lease is not None}
        if not tokens:
            return
        started = self._monotonic()
        try:
            renewed = await self._blocking(
                self._index.leases.renew_many,
                tokens,
                node=self.node,
                now=self._clock(),
                ttl=self._ttl,
            )
        except Exception as exc:  # the index is away: the local deadlines decide
            log.warning("cannot renew this node's leases: %s", exc)
            return
        for lane in leased:
            if lane.pbx_id in renewed:
                lane.lease_deadline = started + self._ttl_s
        not_renewed = [lane for lane in leased if lane.pbx_id not in renewed]
        try:
            removed = await self._drop_removed(not_renewed)
        except Exception:  # cannot tell: stopped as lost (a removed one goes next round)
            removed = set()
        for lane in not_renewed:
            if lane.pbx_id not in removed:
                await self._lose(lane, f"another node holds PBX {lane.name} now")

    async def _rebalance(self) -> None:
        now = self._clock()
        live = await self._blocking(self._index.processes.live, now=now, stale_after=self._ttl)
        nodes = {info.node for info in live if info.kind == NODE_KIND} | {self.node}
        self.live_nodes = len(nodes)
        share = math.ceil(len(self._lanes) / len(nodes))
        held = self.held()
        if len(held) > share:
            # The most recently won go first: the longest held keep their sessions.
            surplus = sorted(held, key=lambda lane: _acquired(lane), reverse=True)
            for lane in surplus[: len(held) - share]:
                await self._give_up(lane, f"{len(nodes)} nodes share the PBXs now")
            return
        if len(held) == share:
            return
        leases = {lease.pbx_id: lease for lease in await self._blocking(self._index.leases.all)}
        wanted = share - len(held)
        # Taking a PBX starts its work (a client, a process row, workers), which takes time
        # on a loaded machine: it runs in the background, never in the round (whose next
        # renewal must not wait for it), MAX_STARTING at once. The leases are won first,
        # in one statement: a dead node's PBXs have a new home at once, and the PBXs wait
        # for their turn to start there.
        room = min(wanted, MAX_TAKEN_PER_ROUND)
        candidates: list[OwnedLane] = []
        dead: set[str] = set()
        for lane in sorted(self._lanes, key=lambda lane: self._preference(lane.pbx_id)):
            if len(candidates) >= room:
                break
            if lane.lease is not None or lane.pbx_id in self._retiring:
                continue
            known = leases.get(lane.pbx_id)
            if known is not None and known.held(now) and known.node != self.node:
                if known.node in nodes:
                    continue  # a live node's
                # Held by a node that is not live (killed, or found gone by a start on its
                # host): no need to wait for its lease to run out.
                dead.add(str(known.node))
            candidates.append(lane)
        for lane in await self._acquire(candidates, dead):
            self._starting[lane.pbx_id] = asyncio.create_task(self._start(lane))
        await self._drop_removed([lane for lane in candidates if lane.lease is None])

    def _preference(self, pbx_id: int) -> bytes:
        return hashlib.sha256(f"{self.node}/{pbx_id}".encode()).digest()

    async def _acquire(self, lanes: list[OwnedLane], dead: set[str]) -> list[OwnedLane]:
        """Win the leases of `lanes` that can be won, in one statement; the lanes won
        (their work is not started yet: `_start`)."""
        if not lanes:
            return []
        started = self._monotonic()
        acquiring = asyncio.ensure_future(
            self._blocking(
                self._index.leases.acquire_many,
                [lane.pbx_id for lane in lanes],
                node=self.node,
                now=self._clock(),
                ttl=self._ttl,
                dead=sorted(dead),
            )
        )
        try:
            leases = await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            # Stopped mid-round (shutdown): the statement runs to its end on its thread
            # regardless. The leases it won are given back, not left held until they expire.
            with contextlib.suppress(Exception):
                for won in await acquiring:
                    await self._blocking(
                        self._index.leases.release, won.pbx_id, node=self.node, token=won.token
                    )
            raise
        by_id = {lane.pbx_id: lane for lane in lanes}
        taken = []
        for lease in leases:
            lane = by_id[lease.pbx_id]
            lane.lease = lease
            lane.lease_deadline = started + self._ttl_s
            log.info("node %s took PBX %s (lease %d)", self.node, lane.name, lease.token)
            taken.append(lane)
        return taken

    async def _start(self, lane: OwnedLane) -> None:
        """Start working on a PBX whose lease was won (a background task of its own);
        hand it over if that fails."""
        try:
            async with self._start_slots:
                await lane.start_work()
        except Exception as exc:
            log.error("PBX %s could not be started on this node: %s", lane.name, exc)
            await self._give_up(lane, "it could not be started here")
        finally:
            self._starting.pop(lane.pbx_id, None)

    async def _started(self, lane: OwnedLane) -> None:
        """Wait for the start of the lane's work, if it is starting."""
        starting = self._starting.get(lane.pbx_id)
        if starting is not None:
            await asyncio.gather(starting, return_exceptions=True)

    async def _drop_removed(self, lanes: Sequence[OwnedLane]) -> set[int]:
        """Of `lanes` (leases not renewed, or not won), stop and forget those whose PBX was
        taken off the registry: it is nobody's now (its lease row went with its entry),
        and is never counted or taken again. The registry's refresh closes their lanes;
        one it is closing already was said in the log. The PBX ids dropped."""
        if not lanes:
            return set()
        removed = await self._blocking(self._index.leases.removed, [lane.pbx_id for lane in lanes])
        for lane in lanes:
            if lane.pbx_id not in removed:
                continue
            if lane in self._lanes:
                self._lanes.remove(lane)
                if lane.pbx_id not in self._retiring:
                    log.info(
                        "PBX %s was taken off the registry: node %s stops working on it",
                        lane.name,
                        self.node,
                    )
            await self._stop_at_once(lane, "it was taken off the registry")
        return removed

    def knows(self, lane: OwnedLane) -> bool:
        """Whether `lane` is still one of this node's (False once found taken off the
        registry: its lane stopped, and the log said so)."""
        return lane in self._lanes

    async def _lose(self, lane: OwnedLane, reason: str) -> None:
        """Stop work on a PBX at once: it is (or may be) another node's now."""
        log.warning("node %s stops working on PBX %s: %s", self.node, lane.name, reason)
        await self._stop_at_once(lane, reason)

    async def _stop_at_once(self, lane: OwnedLane, reason: str) -> None:
        lane.lease = None
        starting = self._starting.pop(lane.pbx_id, None)
        if starting is not None:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
        handing = self._handing_over.pop(lane.pbx_id, None)
        if handing is not None:
            handing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await handing
        await lane.stop_work(reason=reason, graceful=False)

    async def _give_up(self, lane: OwnedLane, reason: str, *, said: bool = False) -> None:
        """Hand a PBX over: its work stops cleanly in the background (downloads in flight
        finish), the lease still renewed meanwhile; then it is released for another node
        to take at once. Logged, unless the caller `said` so already."""
        if lane.lease is None or lane.pbx_id in self._handing_over:
            return
        if not said:
            log.info("node %s hands PBX %s over: %s", self.node, lane.name, reason)
        self._handing_over[lane.pbx_id] = asyncio.create_task(self._hand_over(lane, reason))

    async def _hand_over(self, lane: OwnedLane, reason: str) -> None:
        try:
            await self._started(lane)
            await lane.stop_work(reason=reason, graceful=True)
        finally:
            lease = lane.lease
            lane.lease = None
            self._handing_over.pop(lane.pbx_id, None)
            if lease is not None:
                try:
                    await self._blocking(
                        self._index.leases.release,
                        lane.pbx_id,
                        node=self.node,
                        token=lease.token,
                    )
                except Exception as exc:  # it expires on its own
                    log.warning("cannot release the lease of PBX %s: %s", lane.name, exc)

    async def settle(self) -> None:
        """Wait for the starts and hand-overs in progress to end."""
        while self._starting or self._handing_over:
            await asyncio.gather(
                *self._starting.values(), *self._handing_over.values(), return_exceptions=True
            )

    async def close(self) -> None:
        """At shutdown: hand every PBX over (together: each lets its downloads finish),
        then mark the node stopped."""
        for lane in self.held():
            await self._give_up(lane, "this node is shutting down")
        await self.settle()
        if self.registration is not None and not self.registration.stopped:
            try:
                await self._blocking(self.registration.stop)
            except Exception as exc:
                log.warning("could not mark this node stopped in the index: %s", exc)
        self._thread.shutdown(wait=False)


def _acquired(lane: OwnedLane) -> datetime:
    lease = lane.lease
    if lease is None or lease.acquired_at is None:
        return datetime.min.replace(tzinfo=UTC)
    return lease.acquired_at
