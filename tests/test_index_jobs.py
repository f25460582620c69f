"""index.jobs: claims, leases, finishing only by the claimant, retries, give-ups, requeue,
concurrent claimers; on SQLite and PostgreSQL. (Claims of registered processes:
test_index_processes.py.)"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from callvault.index import Index, Worker, open_index
from callvault.index.schema import ARCHIVED, DOWNLOADING, FAILED, MISSING, PENDING
from support.index_data import NOW, queue
from support.index_data import archive as archive_job

LEASE = timedelta(minutes=5)
W1 = Worker(process_id=None, name="w1")
W2 = Worker(process_id=None, name="w2")


def test_claim_takes_due_jobs_oldest_first_and_once(index: Index) -> None:
    first = queue(index, 2, now=NOW)
    later = queue(index, 1, now=NOW + timedelta(minutes=1), start=10)
    jobs = index.jobs.claim(W1, 10, now=NOW, lease=LEASE)
    assert [j.recording_id for j in jobs] == first
    job = jobs[0]
    assert job.attempts == 1 and job.callid == "17000.0" and job.pbx_serial == "SN9"
    assert job.start_at == datetime(2024, 5, 1, 11, 59, tzinfo=UTC)
    assert job.name == "20240501115900-17000.0-1000-2001-Internal.wav"
    assert index.jobs.claim(W2, 10, now=NOW, lease=LEASE) == []
    jobs = index.jobs.claim(W2, 10, now=NOW + timedelta(minutes=1), lease=LEASE)
    assert [j.recording_id for j in jobs] == later
    row = index.recordings.by_id(first[0])
    assert row is not None
    assert (row.state, row.claimed_by, row.claimed_until) == (DOWNLOADING, "w1", NOW + LEASE)
    assert row.claim_process_id is None


def test_limit_is_respected(index: Index) -> None:
    queue(index, 5)
    assert len(index.jobs.claim(W1, 2, now=NOW, lease=LEASE)) == 2
    assert len(index.jobs.claim(W1, 0, now=NOW, lease=LEASE)) == 0
    assert len(index.jobs.claim(W2, 10, now=NOW, lease=LEASE)) == 3


def test_expired_lease_makes_job_claimable_and_old_worker_loses_it(index: Index) -> None:
    [rid] = queue(index, 1)
    crashed = Worker(process_id=None, name="crashed")
    [job] = index.jobs.claim(crashed, 1, now=NOW, lease=LEASE)
    assert index.jobs.claim(W2, 1, now=NOW + LEASE - timedelta(seconds=1), lease=LEASE) == []
    [again] = index.jobs.claim(W2, 1, now=NOW + LEASE, lease=LEASE)
    assert again.recording_id == rid == job.recording_id and again.attempts == 2
    assert not archive_job(index, rid, crashed)
    assert archive_job(index, rid, W2, NOW + LEASE)
    row = index.recordings.by_id(rid)
    assert row is not None
    assert (row.state, row.claimed_by, row.size, row.sha256) == (ARCHIVED, None, 1234, "b" * 64)
    assert row.archived_at == NOW + LEASE
    assert index.jobs.claim(Worker(None, "w3"), 1, now=NOW + timedelta(days=1), lease=LEASE) == []


def test_renew_extends_only_the_claimants_lease(index: Index) -> None:
    [rid] = queue(index, 1)
    index.jobs.claim(W1, 1, now=NOW, lease=LEASE)
    later = NOW + timedelta(minutes=4)
    assert not index.jobs.renew(rid, worker=W2, now=later, lease=LEASE)
    # Same name, other process: not the claimant either.
    assert not index.jobs.renew(rid, worker=Worker(7, "w1"), now=later, lease=LEASE)
    assert index.jobs.renew(rid, worker=W1, now=later, lease=LEASE)
    assert index.jobs.claim(W2, 1, now=NOW + LEASE, lease=LEASE) == []
    assert [j.recording_id for j in index.jobs.claim(W2, 1, now=later + LEASE, lease=LEASE)] == [
        rid
    ]


def test_the_first_reserved_storage_key_wins(index: Index) -> None:
    [rid] = queue(index, 1)
    assert index.jobs.reserve_storage_key(rid, "unknown/2024/05/01/a.wav") == (
        "unknown/2024/05/01/a.wav"
    )
    assert index.jobs.reserve_storage_key(rid, "SN1/2024/04/30/a.wav") == (
        "unknown/2024/05/01/a.wav"
    )
    assert index.jobs.reserve_storage_key(rid + 99, "x/a.wav") is None


def test_archiving_without_the_claim_never_overwrites_an_archived_copy(index: Index) -> None:
    first, second = queue(index, 2)
    index.jobs.claim(W1, 2, now=NOW, lease=LEASE)
    stored = {"size": 10, "storage_key": "SN1/a.wav", "content_type": "audio/x-wav"}
    assert index.jobs.mark_archived(first, worker=W1, sha256="a" * 64, now=NOW, **stored)
    assert not index.jobs.mark_archived_unclaimed(first, sha256="c" * 64, now=NOW, **stored)
    assert index.recordings.by_id(first).sha256 == "a" * 64  # type: ignore[union-attr]
    # A worker that lost its claim still archives a recording no one archived yet.
    assert index.jobs.mark_archived_unclaimed(second, sha256="d" * 64, now=NOW, **stored)
    row = index.recordings.by_id(second)
    assert row is not None and (row.state, row.sha256, row.claimed_by) == (ARCHIVED, "d" * 64, None)
    assert not index.jobs.mark_archived(second, worker=W1, sha256="e" * 64, now=NOW, **stored)


def test_retry_backs_off_and_tracks_missing_since(index: Index) -> None:
    [rid] = queue(index, 1)
    index.jobs.claim(W1, 1, now=NOW, lease=LEASE)
    retry_at = NOW + timedelta(seconds=20)
    assert index.jobs.mark_retry(
        rid, worker=W1, error="20014 not found", next_attempt_at=retry_at, now=NOW, not_found=True
    )
    row = index.recordings.by_id(rid)
    assert row is not None
    assert (row.state, row.missing_since, row.last_error) == (PENDING, NOW, "20014 not found")
    assert index.jobs.claim(W1, 1, now=retry_at - timedelta(seconds=1), lease=LEASE) == []
    [job] = index.jobs.claim(W1, 1, now=retry_at, lease=LEASE)
    assert job.missing_since == NOW and job.attempts == 2
    index.jobs.mark_retry(
        rid, worker=W1, error="again", next_attempt_at=retry_at, now=retry_at, not_found=True
    )
    assert index.recordings.by_id(rid).missing_since == NOW  # type: ignore[union-attr]
    index.jobs.claim(W1, 1, now=retry_at, lease=LEASE)
    index.jobs.mark_retry(
        rid, worker=W1, error="timeout", next_attempt_at=retry_at, now=retry_at, not_found=False
    )
    assert index.recordings.by_id(rid).missing_since is None  # type: ignore[union-attr]
    assert index.jobs.next_due() == retry_at
    assert [r.id for r in index.recordings.retrying()] == [rid]


def test_give_up_and_requeue(index: Index) -> None:
    gone, broken = queue(index, 2)
    index.jobs.claim(W1, 2, now=NOW, lease=LEASE)
    assert not index.jobs.mark_missing(gone, worker=W2, reason="x", now=NOW)
    assert index.jobs.mark_missing(gone, worker=W1, reason="not on the PBX for 2h", now=NOW)
    assert index.jobs.mark_failed(broken, worker=W1, reason="5 timeouts", now=NOW)
    assert index.recordings.counts_by_state() == {
        PENDING: 0,
        DOWNLOADING: 0,
        ARCHIVED: 0,
        FAILED: 1,
        MISSING: 1,
        "deleted": 0,
    }
    failures = index.recordings.recent_failures(10)
    assert {(f.name.split("-")[1], f.state, f.last_error) for f in failures} == {
        ("17000.0", MISSING, "not on the PBX for 2h"),
        ("17000.1", FAILED, "5 timeouts"),
    }
    with pytest.raises(ValueError):
        index.jobs.requeue([ARCHIVED], now=NOW)
    assert index.jobs.requeue([], now=NOW) == 0
    later = NOW + timedelta(hours=1)
    assert index.jobs.requeue([FAILED], now=later) == 1
    [job] = index.jobs.claim(W2, 5, now=later, lease=LEASE)
    assert job.recording_id == broken and job.attempts == 1
    assert index.jobs.requeue([MISSING], now=later, reset_attempts=False) == 1
    [job] = index.jobs.claim(W2, 5, now=later, lease=LEASE)
    assert job.recording_id == gone and job.attempts == 2


def test_requeue_since_counts_from_when_the_index_learned_of_the_recording(
    index: Index,
) -> None:
    old = queue(index, 1, now=NOW)
    recent = queue(index, 1, now=NOW + timedelta(hours=2), start=5)
    later = NOW + timedelta(hours=3)
    index.jobs.claim(W1, 2, now=later, lease=LEASE)
    for recording_id in old + recent:
        assert index.jobs.mark_missing(recording_id, worker=W1, reason="gone", now=later)
    assert index.jobs.requeue([MISSING], since=NOW + timedelta(hours=1), now=later) == 1
    [job] = index.jobs.claim(W1, 5, now=later, lease=LEASE)
    assert [job.recording_id] == recent


def test_two_indexes_in_two_threads_never_share_a_job(db_url: str) -> None:
    with open_index(db_url) as setup:
        ids = set(queue(setup, 200))
    indexes = [open_index(db_url) for _ in range(3)]
    workers = [Worker(process_id=None, name=f"w{n}") for n in range(len(indexes))]
    claimed: list[list[int]] = [[] for _ in indexes]
    barrier = threading.Barrier(len(indexes))
    errors: list[BaseException] = []
    # Every thread holds a first batch before any goes on, so they really interleave
    # (otherwise one thread can, by scheduling alone, claim all before the others start).
    first_round = threading.Barrier(len(indexes))

    def work(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            rounds = 0
            while True:
                jobs = indexes[n].jobs.claim(workers[n], 3, now=NOW, lease=LEASE)
                rounds += 1
                if rounds == 1:
                    first_round.wait(timeout=30)
                if not jobs:
                    return
                for job in jobs:
                    claimed[n].append(job.recording_id)
                    assert archive_job(indexes[n], job.recording_id, workers[n])
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            first_round.abort()  # the others fail at once instead of waiting out the timeout

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(indexes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for idx in indexes:
        idx.close()
    assert errors == []
    assert not any(thread.is_alive() for thread in threads)
    everything = [rid for part in claimed for rid in part]
    assert sorted(everything) == sorted(ids)
    assert len(set(everything)) == len(everything)
    assert all(claimed), [len(part) for part in claimed]
    with open_index(db_url) as check:
        assert check.recordings.counts_by_state()[ARCHIVED] == 200


def test_the_workers_of_one_pbx_take_only_its_jobs(index: Index) -> None:
    # Two PBXs of one index, with the same call ids and recording names (unique per PBX).
    paris = queue(index, 2, pbx_id=1)
    lyon = queue(index, 2, pbx_id=2, now=NOW - timedelta(minutes=1))  # due first
    assert not set(paris) & set(lyon)
    assert index.jobs.next_due(1) == NOW and index.jobs.next_due() == NOW - timedelta(minutes=1)
    jobs = index.jobs.claim(W1, 10, now=NOW, lease=LEASE, pbx_id=1)
    assert sorted(j.recording_id for j in jobs) == sorted(paris)
    assert index.jobs.claim(W1, 10, now=NOW, lease=LEASE, pbx_id=1) == []
    assert index.jobs.next_due(1) is None
    assert index.recordings.counts_by_state([PENDING], pbx_id=2) == {PENDING: 2}
    assert index.recordings.counts_by_state([PENDING, DOWNLOADING], pbx_id=1) == {
        PENDING: 0,
        DOWNLOADING: 2,
    }
    for job in jobs:
        index.jobs.mark_failed(job.recording_id, worker=W1, reason="gone", now=NOW)
    [lyon_job, _] = index.jobs.claim(W2, 10, now=NOW, lease=LEASE, pbx_id=2)
    index.jobs.mark_failed(lyon_job.recording_id, worker=W2, reason="gone", now=NOW)
    assert index.jobs.requeue([FAILED], now=NOW, pbx_id=2) == 1  # Paris's stay failed
    assert index.recordings.counts_by_state([FAILED]) == {FAILED: 2}
