"""S3 Object Lock: recordings archived into a bucket with Object Lock carry their retention
policy's date and callvault's legal holds, so that the bucket itself refuses an early
delete, whoever asks (against the S3 server process of the test suite, moto, which
enforces retention dates and legal holds); `verify` reports a lock that disagrees with
the policy or the holds, and `verify --relock` sets it right."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from callvault.archive import Archiver
from callvault.index import open_index
from callvault.ops import Archive, place_hold, release_hold, set_policy, verify_archive
from callvault.simulator import Simulator
from callvault.storage import S3Storage, StorageError
from support.archive import archiver_config, states, wait_until
from support.s3 import S3Server

ACTOR = "cli:test"


@pytest.fixture
def locked(
    events_sim: Simulator,
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Archive, str, list[int]]]:
    """Three recordings archived by `serve` into a bucket with Object Lock (GOVERNANCE),
    under a policy that keeps everything a year: (archive, bucket, recording ids)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.new_bucket(object_lock="GOVERNANCE")
    root = tmp_path / "archive"
    root.mkdir()
    url = f"s3://{bucket}/recordings"
    with open_index(f"sqlite:///{root / 'callvault.db'}") as index:
        set_policy(index, [{"name": "all", "keep": "1y"}], actor=ACTOR, note="", now=_now())
    with Archiver(archiver_config(events_sim, root, storage_url=url)) as archiver:
        index = archiver.index
        assert index is not None
        cdrs = [events_sim.place_call(talk_seconds=1) for _ in range(3)]
        assert wait_until(lambda: states(index) == {"archived": 3}), states(index)
        ids = [index.recordings.by_name(cdr.recording or "").id for cdr in cdrs]  # type: ignore[union-attr]
    storage = S3Storage(bucket, "recordings", work_dir=tmp_path / "work")
    opened = Archive(open_index(f"sqlite:///{root / 'callvault.db'}"), storage)
    try:
        yield opened, bucket, ids
    finally:
        opened.close()


def _now() -> datetime:
    return datetime.now(UTC)


def test_objects_carry_their_policy_date_and_the_bucket_refuses_an_early_delete(
    locked: tuple[Archive, str, list[int]], s3_server: S3Server
) -> None:
    archive, bucket, ids = locked
    client = s3_server.client()
    for recording_id in ids:
        row = archive.index.recordings.by_id(recording_id)
        assert row is not None and row.storage_key is not None and row.start_at is not None
        state = archive.storage.lock_state(row.storage_key)
        assert state is not None and state.mode == "GOVERNANCE" and not state.legal_hold
        assert state.retain_until is not None
        expected = row.start_at.replace(year=row.start_at.year + 1)
        assert abs(state.retain_until - expected) < timedelta(seconds=1)
    # A stolen credential without the governance bypass cannot delete a version early...
    key = f"recordings/{archive.index.recordings.by_id(ids[0]).storage_key}"  # type: ignore[union-attr]
    [version] = client.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]
    with pytest.raises(ClientError, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key=key, VersionId=version["VersionId"])
    # ...and neither can callvault: it names the lock, and the object stays.
    with pytest.raises(StorageError, match="Object Lock keeps it"):
        archive.storage.delete(key.removeprefix("recordings/"))
    assert client.head_object(Bucket=bucket, Key=key, VersionId=version["VersionId"])


def test_a_hold_becomes_the_buckets_legal_hold_and_is_lifted_on_release(
    locked: tuple[Archive, str, list[int]],
) -> None:
    archive, _, ids = locked
    hold = place_hold(archive, "C-7", "dispute", ids[:2], selection="", actor=ACTOR, now=_now())
    keys = [archive.index.recordings.by_id(i).storage_key or "" for i in ids]  # type: ignore[union-attr]
    assert [archive.storage.lock_state(k).legal_hold for k in keys] == [True, True, False]  # type: ignore[union-attr]
    release_hold(archive, hold.id, reason="settled", actor=ACTOR, now=_now())
    assert [archive.storage.lock_state(k).legal_hold for k in keys] == [False] * 3  # type: ignore[union-attr]


def test_verify_reports_a_lock_that_disagrees_and_relock_fixes_it(
    locked: tuple[Archive, str, list[int]], s3_server: S3Server
) -> None:
    archive, bucket, ids = locked
    assert verify_archive(archive, now=_now()).problems == 0
    # The policy now keeps recordings longer than their locks say; someone lifted a legal
    # hold in the bucket behind callvault's back.
    set_policy(archive.index, [{"name": "all", "keep": "3y"}], actor=ACTOR, note="", now=_now())
    place_hold(archive, "C-8", "audit", [ids[0]], selection="", actor=ACTOR, now=_now())
    key = archive.index.recordings.by_id(ids[0]).storage_key  # type: ignore[union-attr]
    s3_server.client().put_object_legal_hold(
        Bucket=bucket, Key=f"recordings/{key}", LegalHold={"Status": "OFF"}
    )
    report = verify_archive(archive, now=_now())
    problems = sorted((lock.id, lock.problem.split(",")[0][:30]) for lock in report.locks)
    assert (
        len([p for p in problems if "but its policy keeps it" in p[1] or "locked until" in p[1]])
        == 3
    )
    assert any("legal hold is off" in lock.problem for lock in report.locks)
    assert report.problems == 4
    fixed = verify_archive(archive, now=_now(), relock=True)
    assert all(lock.fixed for lock in fixed.locks) and fixed.problems == 0
    assert verify_archive(archive, now=_now()).locks == []


def test_in_compliance_mode_not_even_the_bypass_deletes_early(
    s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.new_bucket(object_lock="COMPLIANCE")
    (tmp_path / "work").mkdir()
    storage = S3Storage(bucket, "", work_dir=tmp_path / "work", client=s3_server.client())
    assert storage.locks
    source = tmp_path / "work" / "a.wav"
    source.write_bytes(b"RIFF" + b"\0" * 100)
    storage.put_file("SN/2024/05/01/a.wav", source, retain_until=_now() + timedelta(days=30))
    state = storage.lock_state("SN/2024/05/01/a.wav")
    assert state is not None and state.mode == "COMPLIANCE"
    client = s3_server.client()
    [version] = client.list_object_versions(Bucket=bucket)["Versions"]
    with pytest.raises(ClientError, match="AccessDenied"):
        client.delete_object(
            Bucket=bucket,
            Key="SN/2024/05/01/a.wav",
            VersionId=version["VersionId"],
            BypassGovernanceRetention=True,
        )
    # A bucket without Object Lock: nothing locks, callvault's rules alone apply.
    plain = S3Storage(
        s3_server.new_bucket(), "", work_dir=tmp_path / "work", client=s3_server.client()
    )
    assert not plain.locks and plain.lock_state("any/key.wav") is None
