"""What a running archiver measures, for Prometheus (`GET /metrics` of its web app).

Kept with prometheus-client in a registry of the archiver's own (several archivers in one
process, as in tests, do not add up). Two kinds of figures:

- counted as they happen, in this process since it started: reports received by outcome,
  recordings archived, failed download attempts by kind, how long a download took and how
  long a recording waited from its report (or call-history row) to being archived;
- read when scraped: which PBXs this node works on (holds the lease of), and of those the
  API session's state and the download workers alive.

What the index says (recordings waiting, the last report) is added by the web app's
`/metrics` from `callvault.ops` (`IndexCollector`), in `serve` and `callvault web` alike.

Names follow Prometheus's conventions: ``callvault_`` first, ``_total`` for counters,
``_seconds`` for durations. `docs/operating.md` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector

# The states the PBX session reports (see PbxSession); one gauge per state, 1 for the
# current one, as Prometheus's "enum" pattern has it.
SESSION_STATES = ("connecting", "ok", "degraded", "error", "stopped")
_WORST_FIRST = ("error", "degraded", "stopped", "connecting", "ok")


@dataclass(frozen=True, slots=True)
class PbxFigures:
    """What a scrape reads of one PBX the archiver archives."""

    pbx: str
    session_state: str
    workers_configured: int
    workers_alive: int
    owned: bool = True  # whether this node works on it (holds its lease)
    kind: str = "s-series"  # which API it speaks: s-series, cloud or p-series


# Seconds: a download of a long recording over a slow link is minutes; the wait from
# report to archived is a second when all is well, hours when the PBX was away.
_DOWNLOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_WAIT_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0)


class ArchiverMetrics:
    """The archiver's counters and histograms, and a collector of the index's figures."""

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Histogram,
            disable_created_metrics,
        )

        # The "_created" series (when each counter began) say nothing a scrape's
        # process_start would not; left out, a scrape is half as long.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "callvault_events",
            "Reports received from the PBX, by outcome (stored, refused, failed, other).",
            ["outcome"],
            registry=self.registry,
        )
        self.archived = Counter(
            "callvault_recordings_archived",
            "Recordings archived by this process.",
            registry=self.registry,
        )
        self.download_failures = Counter(
            "callvault_download_failures",
            "Failed download attempts, by kind (transient, not-found, login-refused, permanent).",
            ["kind"],
            registry=self.registry,
        )
        self.download_seconds = Histogram(
            "callvault_download_seconds",
            "Time of one successful attempt: one-time key, download, checks, storing.",
            buckets=_DOWNLOAD_BUCKETS,
            registry=self.registry,
        )
        self.wait_seconds = Histogram(
            "callvault_report_to_archived_seconds",
            "From the index learning of a recording (its report, or a call-history row) to "
            "its being archived.",
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.storage_errors = Counter(
            "callvault_storage_errors",
            "Downloads whose recording could not be stored (the disk or bucket failed).",
            registry=self.registry,
        )
        for outcome in ("stored", "refused", "failed", "other"):
            self.events.labels(outcome)
        self._pbxs: Callable[[], list[PbxFigures]] = list
        self.registry.register(_Live(self))

    def watch(self, pbxs: Callable[[], list[PbxFigures]]) -> None:
        """Read these when scraped: each PBX's session state and workers. Called once the
        archiver has them."""
        self._pbxs = pbxs

    def event(self, status: int) -> None:
        """Count a report answered with HTTP `status`."""
        outcome = (
            "stored"
            if status == 200
            else "failed"
            if status >= 500
            else "refused"
            if status >= 400
            else "other"
        )
        self.events.labels(outcome).inc()

    def archived_one(self, seconds: float, queued_at: datetime | None, now: datetime) -> None:
        self.archived.inc()
        self.download_seconds.observe(seconds)
        if queued_at is not None:
            self.wait_seconds.observe(max(0.0, (now - queued_at).total_seconds()))

    def failed_attempt(self, kind: str, step: str = "download") -> None:
        """Count a failed attempt of `kind`; one whose `step` was storing it also counts as
        a storage error."""
        self.download_failures.labels(kind).inc()
        if step == "store":
            self.storage_errors.inc()

    def session_state(self) -> str:
        """The worst session state among the PBXs this node works on ("connecting" before
        there are any)."""
        states = [figures.session_state for figures in self._pbxs() if figures.owned]
        known = [state for state in states if state in _WORST_FIRST]
        return min(known, key=_WORST_FIRST.index) if known else "connecting"

    def workers(self) -> tuple[int, int]:
        """Download workers of every PBX this node works on: (configured, alive)."""
        figures = [f for f in self._pbxs() if f.owned]
        return sum(f.workers_configured for f in figures), sum(f.workers_alive for f in figures)

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Live:
    """The figures read when scraped (a prometheus-client custom collector)."""

    def __init__(self, metrics: ArchiverMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        pbxs = self._metrics._pbxs()
        session = GaugeMetricFamily(
            "callvault_pbx_session_state",
            "Each PBX's API session in this process: 1 for the state it is in.",
            labels=["pbx", "state"],
        )
        workers = GaugeMetricFamily(
            "callvault_workers",
            "Each PBX's download workers, configured and alive.",
            labels=["pbx", "state"],
        )
        owned = GaugeMetricFamily(
            "callvault_pbx_owned",
            "1 for each PBX this node works on (holds the lease of), 0 for the others'.",
            labels=["pbx"],
        )
        info = GaugeMetricFamily(
            "callvault_pbx_info",
            "1 for each PBX of this archiver, labelled with which API it speaks (kind).",
            labels=["pbx", "kind"],
        )
        for figures in pbxs:
            info.add_metric([figures.pbx, figures.kind], 1.0)
            owned.add_metric([figures.pbx], 1.0 if figures.owned else 0.0)
            if not figures.owned:
                continue
            for name in SESSION_STATES:
                value = 1.0 if name == figures.session_state else 0.0
                session.add_metric([figures.pbx, name], value)
            workers.add_metric([figures.pbx, "configured"], figures.workers_configured)
            workers.add_metric([figures.pbx, "alive"], figures.workers_alive)
        yield info
        yield owned
        yield session
        yield workers


if TYPE_CHECKING:
    _check: type[Collector] = _Live  # _Live is a Collector


@dataclass(frozen=True, slots=True)
class ServiceProbe:
    """What a running archiver tells its web app about its own work: the PBX session's
    state, its download workers (configured, alive), and its metrics' registry."""

    session_state: Callable[[], str]
    workers: Callable[[], tuple[int, int]]
    registry: CollectorRegistry = field(repr=False)
