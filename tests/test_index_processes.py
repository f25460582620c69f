"""index.processes: the registry of claiming processes, and claims that end with their
process (stopped, superseded by a restart, gone, or silent); on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from callvault.index import DEFAULT_STALE_AFTER, Index, Worker
from callvault.index.schema import DOWNLOADING
from support.index_data import NOW, queue
from support.index_data import archive as archive_job

LEASE = timedelta(minutes=5)


def register(index: Index, node: str = "node-a", kind: str = "serve", pid: int = 100) -> int:
    info = index.processes.register(
        node=node, kind=kind, hostname="host-a", pid=pid, workers=2, now=NOW
    )
    return info.id


def test_register_heartbeat_stop_and_listing(index: Index) -> None:
    info = index.processes.register(
        node="node-a", kind="serve", hostname="host-a", pid=4321, workers=2, now=NOW
    )
    assert (info.node, info.kind, info.hostname, info.pid) == ("node-a", "serve", "host-a", 4321)
    assert (info.started_at, info.heartbeat_at, info.stopped_at) == (NOW, NOW, None)
    assert (info.workers_configured, info.workers_alive, info.detail) == (2, 0, {})
    later = NOW + timedelta(seconds=5)
    assert index.processes.heartbeat(info.id, now=later, workers_alive=2, detail={"downloading": 1})
    [live] = index.processes.live(now=later, stale_after=DEFAULT_STALE_AFTER)
    assert (live.id, live.heartbeat_at, live.workers_alive) == (info.id, later, 2)
    assert live.detail == {"downloading": 1}
    # Silent for longer than stale_after: not live, though not stopped either.
    assert (
        index.processes.live(now=later + timedelta(seconds=31), stale_after=timedelta(days=1)) != []
    )
    assert (
        index.processes.live(now=later + timedelta(seconds=31), stale_after=timedelta(seconds=30))
        == []
    )
    index.processes.stop(info.id, now=later)
    assert index.processes.live(now=later, stale_after=DEFAULT_STALE_AFTER) == []
    assert not index.processes.heartbeat(info.id, now=later, workers_alive=2)
    [stopped] = index.processes.all()
    assert (stopped.stopped_at, stopped.workers_alive) == (later, 0)


def test_not_stopped_lists_every_unstopped_row_however_many_came_after(index: Index) -> None:
    node = register(index, node="node-a", kind="node")
    serves = [register(index, node=f"node-{n}", pid=200 + n) for n in range(60)]
    index.processes.stop(serves[0], now=NOW)
    # `all` shows the latest rows only; the node row is older than 50 of them.
    assert node not in {info.id for info in index.processes.all()}
    assert [info.id for info in index.processes.not_stopped(kind="node")] == [node]
    unstopped = [info.id for info in index.processes.not_stopped()]
    assert unstopped == [node, *serves[1:]]


def test_a_new_start_of_a_node_supersedes_its_earlier_incarnation(index: Index) -> None:
    old = register(index, "node-a", "serve")
    other_kind = register(index, "node-a", "backfill")
    other_node = register(index, "node-b", "serve")
    new = register(index, "node-a", "serve")
    assert new > old  # ids are never reused
    assert not index.processes.heartbeat(old, now=NOW, workers_alive=2)
    for process_id in (other_kind, other_node, new):
        assert index.processes.heartbeat(process_id, now=NOW, workers_alive=2)
    assert [p.id for p in index.processes.all()] == [new, other_node, other_kind, old]
    assert [p.id for p in index.processes.all(limit=2)] == [new, other_node]


def test_mark_dead_local_stops_rows_of_this_host_whose_pid_is_gone(index: Index) -> None:
    alive = register(index, "n1", pid=10)
    dead = register(index, "n2", pid=11)
    index.processes.register(node="n3", kind="serve", hostname="host-b", pid=11, workers=1, now=NOW)
    asked: list[int] = []

    def is_alive(pid: int) -> bool:
        asked.append(pid)
        return pid == 10

    assert index.processes.mark_dead_local(hostname="host-a", is_alive=is_alive, now=NOW) == 1
    assert sorted(asked) == [10, 11]
    live = {p.id for p in index.processes.live(now=NOW, stale_after=DEFAULT_STALE_AFTER)}
    assert alive in live and dead not in live and len(live) == 2


def test_prune_deletes_only_stopped_rows_older_than_the_cutoff(index: Index) -> None:
    first = register(index, "n1")
    second = register(index, "n2")
    running = register(index, "n3")
    index.processes.stop(first, now=NOW)
    index.processes.stop(second, now=NOW + timedelta(days=2))
    assert index.processes.prune(before=NOW + timedelta(days=1)) == 1
    assert [p.id for p in index.processes.all()] == [running, second]


def test_claims_of_a_stopped_process_are_released_at_once(index: Index) -> None:
    [rid] = queue(index, 1)
    process = register(index)
    crashed = Worker(process_id=process, name=f"p{process}:w0")
    [job] = index.jobs.claim(crashed, 1, now=NOW, lease=LEASE)
    row = index.recordings.by_id(rid)
    assert row is not None and (row.claim_process_id, row.claimed_by) == (process, crashed.name)
    rescuer = Worker(process_id=register(index, "node-b"), name="rescuer")
    # Its process is alive: the claim holds (well within the lease).
    assert index.jobs.claim(rescuer, 1, now=NOW + timedelta(seconds=5), lease=LEASE) == []
    # A restart of the same node supersedes the crashed incarnation: claimable at once.
    restarted = register(index)
    again = Worker(process_id=restarted, name=f"p{restarted}:w0")
    [job2] = index.jobs.claim(again, 1, now=NOW + timedelta(seconds=6), lease=LEASE)
    assert job2.recording_id == job.recording_id and job2.attempts == 2
    # The old worker lost it: it cannot finish nor renew it.
    assert not archive_job(index, rid, crashed)
    assert not index.jobs.renew(rid, worker=crashed, now=NOW, lease=LEASE)
    assert archive_job(index, rid, again)


def test_claims_of_a_silent_or_vanished_process_are_released(index: Index) -> None:
    silent_job, gone_job, fine_job = queue(index, 3)
    silent = register(index, "silent")
    gone = register(index, "gone")
    fine = register(index, "fine")
    for process_id, recording_id in ((silent, silent_job), (gone, gone_job), (fine, fine_job)):
        worker = Worker(process_id=process_id, name=f"p{process_id}:w0")
        [job] = index.jobs.claim(worker, 1, now=NOW, lease=LEASE)
        assert job.recording_id == recording_id
    later = NOW + DEFAULT_STALE_AFTER + timedelta(seconds=1)
    assert index.processes.heartbeat(fine, now=later, workers_alive=1)
    index.processes.stop(gone, now=NOW)
    assert index.processes.prune(before=later) == 1  # its row is gone altogether
    rescuer = Worker(process_id=None, name="rescuer")
    taken = index.jobs.claim(rescuer, 5, now=later, lease=LEASE)
    assert sorted(j.recording_id for j in taken) == sorted([silent_job, gone_job])
    row = index.recordings.by_id(fine_job)
    assert row is not None and row.state == DOWNLOADING and row.claimed_by == f"p{fine}:w0"
    # stale_after is the caller's to choose.
    assert index.jobs.claim(rescuer, 5, now=later, lease=LEASE, stale_after=timedelta(0)) != []
