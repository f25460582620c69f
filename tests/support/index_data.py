"""Call records and queued recordings for index tests."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from callvault.index import Index, Worker
from callvault.index.pbxs import PbxConfig, PbxRecord
from callvault.pbx._types import CallDetail

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
UTC_ZONE = ZoneInfo("UTC")
WORKER = Worker(process_id=None, name="w1")


def queue(
    index: Index, count: int, *, now: datetime = NOW, start: int = 0, pbx_id: int = 0
) -> list[int]:
    """Record `count` calls of the PBX `pbx_id` with a recording each (callids
    ``17000.<n>``); their ids."""
    results = index.calls.record(
        [
            CallDetail(
                callid=f"17000.{i}",
                timestart="2024-05-01 11:59:00",
                callfrom=str(1000 + i),
                callto="2001",
                recording=f"20240501115900-17000.{i}-{1000 + i}-2001-Internal.wav",
                sn="SN9",
            )
            for i in range(start, start + count)
        ],
        source="event",
        tz=UTC_ZONE,
        now=now,
        pbx_id=pbx_id,
    )
    return [r.recording_id for r in results if r.recording_id is not None]


def archive(index: Index, recording_id: int, worker: Worker, now: datetime = NOW) -> bool:
    """`mark_archived` with made-up file facts; whether `worker` still held the claim."""
    return index.jobs.mark_archived(
        recording_id,
        worker=worker,
        size=1234,
        sha256="b" * 64,
        storage_key=f"SN9/2024/05/01/{recording_id}.wav",
        content_type="audio/wav",
        now=now,
    )


def register_pbx(index: Index, name: str, now: datetime = NOW) -> PbxRecord:
    """A PBX `name` in the registry, at https://NAME.example:8088 (never reached), with a
    made-up sealed password: for tests of what is kept per PBX."""
    return index.pbxs.add(
        name,
        PbxConfig(url=f"https://{name}.example:8088", username="api"),
        password_sealed="v1.x.y",
        events_path=f"path-{name}",
        now=now,
    )
