"""Several `serve` nodes on one PostgreSQL index, as child processes: their settings, and
what the index says of them (who holds which PBX, what is archived)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from callvault.index import open_index
from support.archive import outer_env

# Each node binds its own loopback address: the PBXs see several clients.
ADDRESSES = {"n1": "127.0.0.1", "n2": "127.0.0.2", "n3": "127.0.0.3"}


def node_env(db_url: str, key_file: Path, archive: Path, **settings: str) -> dict[str, str]:
    env = outer_env()
    env.update(
        {
            "CALLVAULT_ARCHIVE": str(archive),
            "CALLVAULT_DB": db_url,
            "CALLVAULT_MASTER_KEY_FILE": str(key_file),
            "CALLVAULT_POLL_INTERVAL_S": "0.3",
            "CALLVAULT_HEARTBEAT_INTERVAL_S": "1",
            "CALLVAULT_RETRY_SCHEDULE_S": "[0.3, 0.5, 1.0]",
            "CALLVAULT_TRANSIENT_BACKOFF_S": "0.2",
            "CALLVAULT_TRANSIENT_BACKOFF_MAX_S": "1",
            "CALLVAULT_TRANSIENT_MAX_ATTEMPTS": "100",
            "CALLVAULT_RECONCILE_HOURS": "1",
            "CALLVAULT_RECONCILE_INTERVAL_S": "10",
            **settings,
        }
    )
    return env


def lease_holders(db_url: str) -> dict[int, str | None]:
    now = datetime.now(UTC)
    with open_index(db_url) as index:
        return {
            lease.pbx_id: lease.node if lease.held(now) else None for lease in index.leases.all()
        }


def spread_over(db_url: str, pbxs: int, nodes: set[str]) -> bool:
    """Every PBX held, by exactly `nodes`, evenly."""
    holders = lease_holders(db_url)
    if len(holders) != pbxs or set(holders.values()) != nodes:
        return False
    counts = [list(holders.values()).count(node) for node in nodes]
    return max(counts) - min(counts) <= 1


def logged_in(db_url: str) -> bool:
    with open_index(db_url) as index:
        return all(pbx.session.get("state") == "ok" for pbx in index.pbxs.list())


def archived(db_url: str, count: int) -> Callable[[], bool]:
    def check() -> bool:
        with open_index(db_url) as index:
            states = index.recordings.counts_by_state()
        return states.get("archived", 0) == count and sum(states.values()) == count

    return check
