"""Requeue: give recordings that were given up on (`failed`, `missing`) another run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from callvault.index.schema import FAILED, MISSING
from callvault.ops._archive import Archive
from callvault.ops._json import JsonResult

REQUEUE_STATES = (FAILED, MISSING)


@dataclass(frozen=True, slots=True)
class RequeueResult(JsonResult):
    """How many recordings of each state were queued again (a running serve downloads
    them at once), and the `since` bound if one was given."""

    requeued: dict[str, int]
    since: datetime | None


def requeue(
    archive: Archive,
    states: Sequence[str] = REQUEUE_STATES,
    *,
    now: datetime,
    since: datetime | None = None,
    pbx_id: int | None = None,
) -> RequeueResult:
    """Make the recordings in `states` pending again, each with a fresh run of attempts;
    with `since`, only those the index learned of at or after it; with `pbx_id`, only that
    PBX's. ValueError for a state that cannot be queued again."""
    wanted = list(dict.fromkeys(states))
    unknown = [state for state in wanted if state not in REQUEUE_STATES]
    if unknown:
        raise ValueError(f"{unknown[0]!r}: only failed and missing can be queued again")
    jobs = archive.index.jobs
    counts = {state: jobs.requeue([state], now=now, since=since, pbx_id=pbx_id) for state in wanted}
    return RequeueResult(requeued=counts, since=since)
