"""Health for load balancers and monitoring: readiness checks and the index's metrics.

`readiness(...)` is what ``GET /readyz`` answers (200 when every check passes, else 503):
the index answers, the storage can be written, and, in a process that archives, the PBX
session is up and every download worker alive. ``GET /healthz`` only says the process
answers. `IndexCollector` gives Prometheus the figures only the index knows, the same in
`serve` and in `callvault web`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from callvault.archive import NODE_KIND
from callvault.index import Index, SettingKey
from callvault.ops._json import JsonResult
from callvault.storage import Storage

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# A node row's heartbeat within this is live; older (not stopped) and within a day, gone.
_NODE_LIVE = timedelta(seconds=30)
_NODE_HISTORY = timedelta(days=1)
# The PBX session states in which the archiver is doing its work (degraded: logged in,
# with errors it is retrying).
WORKING_SESSION_STATES = ("ok", "degraded")


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness check: its name, whether it passed, and what was found, in words."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Readiness(JsonResult):
    ready: bool
    checks: list[Check]


def readiness(
    index: Index,
    storage: Storage,
    *,
    session_state: str | None = None,
    workers: tuple[int, int] | None = None,
) -> Readiness:
    """Whether this process can do its work now. `session_state` and `workers`
    (configured, alive) are given by a process that archives; a web app alone has none."""
    checks = [_index_check(index), _storage_check(storage)]
    if session_state is not None:
        ok = session_state in WORKING_SESSION_STATES
        checks.append(Check("pbx_session", ok, session_state))
    if workers is not None:
        configured, alive = workers
        checks.append(Check("workers", alive >= configured, f"{alive} of {configured} alive"))
    return Readiness(all(check.ok for check in checks), checks)


def _index_check(index: Index) -> Check:
    started = time.monotonic()
    try:
        index.settings.get(SettingKey.LAST_EVENT_AT)
    except Exception as exc:
        return Check("index", False, " ".join(str(exc).split())[:200] or type(exc).__name__)
    return Check("index", True, f"answered in {(time.monotonic() - started) * 1000:.0f} ms")


def _storage_check(storage: Storage) -> Check:
    try:
        problem = storage.check()
    except Exception as exc:
        problem = " ".join(str(exc).split())[:200] or type(exc).__name__
    return Check("storage", problem is None, problem or storage.describe())


class IndexCollector:
    """Prometheus figures read from the index when scraped (a custom collector):
    recordings waiting in each state but archived, in all and per PBX (counted from the
    state index, without reading the archived millions), how far downloads lag, when the
    last report was committed, the live and gone nodes, and whether the index answered."""

    def __init__(self, index: Index) -> None:
        self._index = index

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from callvault.index.schema import WAITING_STATES

        up = GaugeMetricFamily("callvault_index_up", "1 when the index answered this scrape.")
        try:
            waiting = self._index.recordings.counts_by_state(list(WAITING_STATES))
            last_event = self._index.settings.get(SettingKey.LAST_EVENT_AT)
        except Exception:  # a scrape answers even when the index does not
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        recordings = GaugeMetricFamily(
            "callvault_recordings_waiting",
            "Recordings not archived, by state (pending, downloading, failed, missing).",
            labels=["state"],
        )
        for state, count in waiting.items():
            recordings.add_metric([state], count)
        yield recordings
        last = GaugeMetricFamily(
            "callvault_last_report_timestamp_seconds",
            "When the last report of a call was committed to the index (Unix time; 0 for never).",
        )
        last.add_metric([], _timestamp(last_event) or 0.0)
        yield last
        yield from self._fleet()

    def _fleet(self) -> Iterator[Any]:
        """Per PBX and per node: recordings waiting, how far downloads lag, live nodes."""
        from prometheus_client.core import GaugeMetricFamily

        index = self._index
        now = datetime.now(UTC)
        names = {record.id: record.name for record in index.pbxs.list()}
        by_pbx = GaugeMetricFamily(
            "callvault_recordings_waiting_by_pbx",
            "Recordings not archived, by PBX and state.",
            labels=["pbx", "state"],
        )
        for (pbx_id, state), count in sorted(index.recordings.waiting_by_pbx().items()):
            by_pbx.add_metric([names.get(pbx_id, str(pbx_id)), state], count)
        yield by_pbx
        lag = GaugeMetricFamily(
            "callvault_queue_lag_seconds",
            "How long the oldest recording due for a download now has waited (0: none).",
        )
        oldest = index.recordings.oldest_due(now)
        lag.add_metric([], max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
        yield lag
        nodes = GaugeMetricFamily(
            "callvault_nodes",
            "serve nodes: live (a heartbeat within 30 s), and gone (silent without having "
            "stopped, within a day).",
            labels=["state"],
        )
        live = gone = 0
        for info in index.processes.not_stopped(kind=NODE_KIND):
            silent = now - info.heartbeat_at
            if silent <= _NODE_LIVE:
                live += 1
            elif silent <= _NODE_HISTORY:
                gone += 1
        nodes.add_metric(["live"], live)
        nodes.add_metric(["gone"], gone)
        yield nodes


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def metrics_registry(index: Index, *more: CollectorRegistry) -> CollectorRegistry:
    """A registry of the index's figures and of the `more` registries (an archiver's)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    registry.register(IndexCollector(index))
    for other in more:
        registry.register(other)
    return registry
