"""This process in the index's process registry: register, heartbeat, stop, and fencing.

Every process whose workers claim download jobs (`serve`, and `backfill` while it
downloads) registers a row in `index.processes` at start and keeps it alive with a
heartbeat every few seconds, carrying how many of its workers are alive. Its claims name
that row, so when it dies, however it dies, the jobs it held are claimable again within
seconds (see `callvault.index`'s `JobStore.claim`):

* a restart of the same node (the same ``--node``, by default the host name) and kind
  supersedes the rows of its earlier incarnations as it registers;
* a start on the same host first marks stopped the rows of this host whose process is gone
  (`reap_dead_local`): no such pid, or, on Linux, a pid now held by a process that started
  after the row was registered (the pid was reused; a container's ``serve`` is often pid 1);
* any other claim is released once its process's heartbeat is older than `stale_after`.

Fencing: a heartbeat the index answers False means this row was stopped by someone else (a
newer incarnation of this node took over, or another process took this one for dead): its
claims may already be another worker's, so the caller must stop downloading at once.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from callvault.index import Index, ProcessInfo, Worker
from callvault.index.schema import column_length, processes

log = logging.getLogger("callvault.archive")

# The kind of a serve's own row, as a node of the deployment (see `_ownership`); its
# download workers register as kind "serve".
NODE_KIND = "node"
# How often a registered process sends its heartbeat, and when others stop waiting for it.
DEFAULT_HEARTBEAT_S = 5.0
DEFAULT_STALE_AFTER_S = 30.0
# Stopped rows older than this are deleted when a process registers.
PRUNE_AFTER = timedelta(days=7)
# A pid whose process started more than this after a row of that pid was registered is a
# reused pid (the row's process is gone). Generous: the start time from /proc is whole
# seconds, and a wrong verdict would stop a live process's row (see fencing).
_START_SLACK = timedelta(seconds=30)


class Fenced(Exception):
    """This process's registration was ended by another process (a newer start of the same
    node, or one that took it for dead): it stopped downloading at once. One line."""


def host_name() -> str:
    """This machine's name, as the process registry records it."""
    return socket.gethostname() or "localhost"


def default_node() -> str:
    """The node name when none is configured: the host name."""
    return host_name()


def backfill_node(node: str | None = None) -> str:
    """A node name of this backfill run alone (``NODE/backfill-PID``): two backfills, or a
    backfill beside `serve`, never supersede each other."""
    return f"{node or default_node()}/backfill-{os.getpid()}"


def process_started_at(pid: int) -> datetime | None:
    """When process `pid` started (Linux: from /proc), or None when that cannot be told."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        boot = Path("/proc/stat").read_text(encoding="ascii", errors="replace")
        ticks_per_second = os.sysconf("SC_CLK_TCK")
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses; starttime is
        # field 22, the 20th after the closing parenthesis.
        start_ticks = int(stat[stat.rindex(")") + 1 :].split()[19])
        btime = next(int(line.split()[1]) for line in boot.splitlines() if line.startswith("btime"))
        return datetime.fromtimestamp(btime + start_ticks / ticks_per_second, UTC)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def process_alive(pid: int, *, registered_at: datetime | None = None) -> bool:
    """Whether `pid` is a running process, and (with `registered_at`, where its start time
    can be read) one that started before a row of that pid was registered at that time."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return True  # cannot tell: believe it alive (its heartbeat will tell)
    if registered_at is None:
        return True
    started = process_started_at(pid)
    return started is None or started <= registered_at + _START_SLACK


def reap_dead_local(index: Index, *, hostname: str, now: datetime) -> int:
    """Mark stopped the live rows of `hostname` whose process is gone; how many."""
    registered: dict[int, list[datetime]] = {}
    stored_hostname = hostname[: column_length(processes.c.hostname)]
    for info in index.processes.not_stopped():
        if info.hostname == stored_hostname:
            registered.setdefault(info.pid, []).append(info.started_at)

    def is_alive(pid: int) -> bool:
        starts = registered.get(pid)
        if not starts:  # registered since the listing: judged by its pid alone
            return process_alive(pid)
        # Two rows with one pid (a reused pid): alive if either may be the running process.
        return any(process_alive(pid, registered_at=start) for start in starts)

    return index.processes.mark_dead_local(hostname=hostname, is_alive=is_alive, now=now)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ProcessRegistration:
    """This process's row in `index.processes` (see the module docstring).

    `register` is blocking (call it in a thread from a loop), as are `heartbeat` and `stop`.
    """

    def __init__(
        self, index: Index, info: ProcessInfo, *, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self._index = index
        self.info = info
        self._clock = clock
        self.stopped = False

    @classmethod
    def register(
        cls,
        index: Index,
        *,
        node: str,
        kind: str,
        workers: int,
        clock: Callable[[], datetime] = _utcnow,
    ) -> ProcessRegistration:
        """Register this process (after marking dead local processes stopped; an earlier
        incarnation of `node` and `kind` is superseded) and prune old stopped rows."""
        now = clock()
        hostname = host_name()
        dead = reap_dead_local(index, hostname=hostname, now=now)
        if dead:
            log.info("%d earlier process(es) of this host are gone: their downloads resume", dead)
        info = index.processes.register(
            node=node, kind=kind, hostname=hostname, pid=os.getpid(), workers=workers, now=now
        )
        index.processes.prune(before=now - PRUNE_AFTER)
        log.info("registered as process %d (node %s, %s)", info.id, info.node, info.kind)
        return cls(index, info, clock=clock)

    @property
    def process_id(self) -> int:
        return self.info.id

    def worker(self, number: int) -> Worker:
        """The identity worker `number` of this process claims jobs as."""
        return Worker(process_id=self.info.id, name=f"p{self.info.id}:w{number}")

    def heartbeat(self, *, workers_alive: int, detail: Mapping[str, Any] | None = None) -> bool:
        """Note that this process is alive; False if its row was stopped by another (fenced)."""
        return self._index.processes.heartbeat(
            self.info.id, now=self._clock(), workers_alive=workers_alive, detail=detail
        )

    def stop(self) -> None:
        """Mark the row stopped (a clean shutdown); its remaining claims are released."""
        if not self.stopped:
            self._index.processes.stop(self.info.id, now=self._clock())
            self.stopped = True

    def fenced_reason(self) -> str:
        """Why this process must stop downloading, in one line for the log."""
        info = self.info
        what = "serve" if info.kind == NODE_KIND else info.kind  # a serve's own node row
        return (
            f"process {info.id} (node {info.node}, {info.kind}, pid {info.pid}) was marked "
            f"stopped in the index by another process: another {what} of node "
            f"{info.node} started, or this one was taken for dead; its downloads stop at once "
            f"(run one {what} per node: give each its own --node)"
        )
