"""Run in child processes by test_index_files: open new indexes all at once, round after
round. Kept light to import: the processes are forked from a server that loaded it once."""

from __future__ import annotations

import traceback
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from callvault.index import open_index

# What the fork server loads once, so that each child starts at once.
PRELOAD = ["support.first_open", "alembic.command", "alembic.config", "sqlalchemy.dialects.sqlite"]


def open_every_round(directory: str, rounds: int, start: Barrier, results: Queue[str]) -> None:
    """Each round, wait for the other processes, then open (and so create and migrate) that
    round's new index ``DIRECTORY/round-N/callvault.db``; "ok" or the traceback in
    `results`."""
    try:
        for number in range(rounds):
            start.wait(timeout=120)
            open_index(f"sqlite:///{directory}/round-{number}/callvault.db").close()
    except BaseException:
        start.abort()  # the others stop waiting for this one
        results.put(traceback.format_exc())
        raise
    results.put("ok")
