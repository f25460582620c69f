"""index.backfills: backfills asked of the node holding a PBX, on SQLite and PostgreSQL:
taken one at a time, oldest first, per PBX; given back at a hand-over; taken over from a
node that lost the PBX; finished with what they did."""

from __future__ import annotations

from datetime import timedelta

from callvault.index import Index
from support.index_data import NOW, register_pbx


def test_requests_are_claimed_oldest_first_per_pbx_and_taken_over(index: Index) -> None:
    paris, lyon = register_pbx(index, "paris").id, register_pbx(index, "lyon").id
    since, until = NOW - timedelta(days=30), NOW
    first = index.backfills.submit(paris, since=since, until=until, by="cli:ann", now=NOW)
    second = index.backfills.submit(paris, since=since, until=until, by="cli:bob", now=NOW)
    assert (first.state, first.node, first.requested_by) == ("waiting", None, "cli:ann")
    assert (first.since, first.until) == (since, until)
    assert index.backfills.claim(lyon, node="n1", now=NOW) is None  # none of lyon's
    claimed = index.backfills.claim(paris, node="n1", now=NOW)
    assert claimed is not None and (claimed.id, claimed.state, claimed.node) == (
        first.id,
        "running",
        "n1",
    )
    # n1 runs it: n1 takes the next one only (a node runs its PBX's requests in turn).
    next_one = index.backfills.claim(paris, node="n1", now=NOW)
    assert next_one is not None and next_one.id == second.id
    # n1 died with both running: n2, the PBX's next holder, takes the oldest over.
    taken = index.backfills.claim(paris, node="n2", now=NOW)
    assert taken is not None and (taken.id, taken.node) == (first.id, "n2")
    index.backfills.progress(first.id, {"windows_done": 3, "windows": 30})
    index.backfills.release(first.id, error="the PBX did not answer")
    again = index.backfills.get(first.id)
    assert again is not None and again.state == "waiting"
    assert again.progress == {"windows_done": 3, "windows": 30}
    assert again.error == "the PBX did not answer" and not again.finished
    index.backfills.finish(
        first.id, ok=True, progress={"windows_done": 30, "windows": 30, "queued": 7}, now=NOW
    )
    index.backfills.progress(first.id, {"windows_done": 29, "windows": 30})  # a late note
    done = index.backfills.get(first.id)
    assert done is not None and done.finished and done.state == "done"
    assert done.progress["queued"] == 7 and done.finished_at == NOW
    index.backfills.finish(second.id, ok=False, progress={}, error="refused", now=NOW)
    failed = index.backfills.get(second.id)
    assert failed is not None and (failed.state, failed.error) == ("failed", "refused")
    assert index.backfills.claim(paris, node="n2", now=NOW) is None  # all finished
    assert index.backfills.get(999) is None
