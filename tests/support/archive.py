"""Helpers of the archiver's tests (test_archive_*, and the simulator and CLI tests that
run an archiver): configurations against the simulator, waiting, a clock and a downloader
the test holds, and `callvault serve` as a child process.

The fixture `events_sim` (a simulator that re-sends unanswered reports quickly) is
registered in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from callvault.archive import ArchiverConfig, RetryPolicy
from callvault.index import Index, open_index
from callvault.pbx import DownloadResult, TlsOptions
from callvault.simulator import Simulator, SimulatorConfig

# Retry decisions shrunk to fractions of a second, so outcomes arrive within a test.
FAST_POLICY = RetryPolicy(
    not_found_schedule_s=(0.2, 0.3, 0.5),
    missing_after_s=2.0,
    missing_min_attempts=4,
    old_call_min_attempts=3,
    transient_base_s=0.1,
    transient_max_s=0.5,
    transient_max_attempts=20,
    jitter=0.1,
)


@pytest.fixture
def events_sim() -> Iterator[Simulator]:
    """A running simulator (HTTPS on 127.0.0.1) that re-sends an unanswered report after
    0.2 s instead of the PBX's long interval."""
    with Simulator(SimulatorConfig(seed=7, event_retry_interval=0.2)) as running:
        yield running


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait, without blocking the loop, until `predicate()` holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.02)


def archiver_config(sim: Simulator, archive: Path, **overrides: object) -> ArchiverConfig:
    """An archiver for `sim` in `archive` (index: `db_url` if given, else the SQLite file
    in `archive`), its events on a free port of 127.0.0.1, every delay shrunk."""
    config = ArchiverConfig(
        pbx_url=sim.url,
        username=sim.username,
        password=sim.password,
        archive=archive,
        tls=TlsOptions(pin_sha256=sim.cert_sha256),
        events_host="127.0.0.1",
        events_port=0,
        timezone=ZoneInfo(sim.config.timezone),
        policy=FAST_POLICY,
        poll_interval_s=0.2,
        job_lease_s=30.0,
        reconcile_at_start=False,
        client_backoff_base=0.05,
        client_backoff_max=0.2,
        shutdown_grace_s=5.0,
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


def states(index: Index) -> dict[str, int]:
    """Recordings per state, states without any left out."""
    return {k: v for k, v in index.recordings.counts_by_state().items() if v}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`callvault ARGS` as a child process with exactly `env`: its output and exit code."""
    return subprocess.run(
        [sys.executable, "-m", "callvault", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def all_archived(db: Path, names: list[str]) -> bool:
    """Whether every recording of `names` is archived in the SQLite index file `db`."""
    with open_index(f"sqlite:///{db}") as index:
        rows = [index.recordings.by_name(name) for name in names]
    return all(row is not None and row.state == "archived" for row in rows)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cli_env(sim: Simulator, archive: Path, db_url: str | None = None) -> dict[str, str]:
    """CALLVAULT_* settings for `backfill`/`serve` against `sim`, delays shrunk."""
    return login_env(
        url=sim.url,
        username=sim.username,
        password=sim.password,
        pin=sim.cert_sha256,
        timezone=sim.config.timezone,
        archive=archive,
        db_url=db_url,
    )


def login_env(
    *,
    url: str,
    username: str,
    password: str,
    pin: str | None,
    timezone: str,
    archive: Path,
    db_url: str | None,
) -> dict[str, str]:
    """CALLVAULT_* settings for a command against the PBX at `url` (any kind: the caller
    adds CALLVAULT_KIND), its retries and backoffs shrunk."""
    env = {
        "CALLVAULT_PASSWORD": password,
        "CALLVAULT_PBX": url,
        "CALLVAULT_USERNAME": username,
        "CALLVAULT_PIN_SHA256": pin or "",
        "CALLVAULT_ARCHIVE": str(archive),
        "CALLVAULT_TIMEZONE": timezone,
        "CALLVAULT_RETRY_SCHEDULE_S": "[0.2, 0.5]",
        "CALLVAULT_TRANSIENT_BACKOFF_S": "0.1",
        "CALLVAULT_TRANSIENT_BACKOFF_MAX_S": "0.5",
    }
    if db_url is not None:
        env["CALLVAULT_DB"] = db_url
    return env


def registry_env(tmp_path: Path, **more: str) -> dict[str, str]:
    """The environment of `callvault` children on an archive in `tmp_path / "archive"`
    whose PBXs are registered (master key `tmp_path / "master.key"`): this process's own
    without CALLVAULT_*, an events port of its own, polls, heartbeats and retries shrunk;
    `more` added."""
    return {
        **outer_env(),
        "CALLVAULT_ARCHIVE": str(tmp_path / "archive"),
        "CALLVAULT_MASTER_KEY_FILE": str(tmp_path / "master.key"),
        "CALLVAULT_EVENTS_LISTEN": f"127.0.0.1:{free_port()}",
        "CALLVAULT_POLL_INTERVAL_S": "0.3",
        "CALLVAULT_HEARTBEAT_INTERVAL_S": "1",
        "CALLVAULT_RETRY_SCHEDULE_S": "[0.3, 0.5, 1.0]",
        "CALLVAULT_RECONCILE_HOURS": "1",
        **more,
    }


def outer_env() -> dict[str, str]:
    """This process's environment without any CALLVAULT_* setting (for child processes)."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("CALLVAULT_")}


# -- a downloader and a clock the test holds ----------------------------------------------

WAV = (
    b"RIFF"
    + struct.pack("<I", 36 + 800)
    + b"WAVEfmt "
    + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16)
    + b"data"
    + struct.pack("<I", 800)
    + bytes(range(200)) * 4
)
WAV_SHA256 = hashlib.sha256(WAV).hexdigest()


class Clock:
    """A pool's and the index's notion of now, moved only by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Downloader:
    """Writes `WAV` as the downloaded file; with `hold`, each download waits for `release`;
    with `error`, each download raises it instead."""

    def __init__(self, *, hold: bool = False, error: Exception | None = None) -> None:
        self.calls = 0
        self.finished = 0
        self.names: list[str] = []
        self.error = error
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def download_recording(
        self, name: str, dest_dir: Path, *, filename: str | None = None
    ) -> DownloadResult:
        self.calls += 1
        self.names.append(name)
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        path = dest_dir / (filename or name)
        path.write_bytes(WAV)
        self.finished += 1
        return DownloadResult(name, path, len(WAV), WAV_SHA256, "audio/x-wav")


# -- `callvault serve` as a child process -------------------------------------------------


def serve_env(
    sim: Simulator, archive: Path, events_port: int, db_url: str | None = None
) -> dict[str, str]:
    """The environment of a `callvault serve` child against `sim`, delays shrunk."""
    env = outer_env()
    env.update(cli_env(sim, archive, db_url))
    env.update(
        {
            "CALLVAULT_EVENTS_LISTEN": f"127.0.0.1:{events_port}",
            "CALLVAULT_POLL_INTERVAL_S": "0.3",
            "CALLVAULT_HEARTBEAT_INTERVAL_S": "1",
            "CALLVAULT_RETRY_SCHEDULE_S": "[0.3, 0.5, 1.0]",
            "CALLVAULT_MISSING_AFTER_S": "600",
            "CALLVAULT_TRANSIENT_BACKOFF_S": "0.2",
            "CALLVAULT_TRANSIENT_BACKOFF_MAX_S": "1",
            "CALLVAULT_TRANSIENT_MAX_ATTEMPTS": "100",
            "CALLVAULT_RECONCILE_HOURS": "1",
            "CALLVAULT_RECONCILE_INTERVAL_S": "10",
        }
    )
    return env


class ServeProcess:
    """`callvault serve --no-web` as a child process, with its log kept per run."""

    def __init__(self, env: dict[str, str], logs: Path, *args: str) -> None:
        self.env = env
        self.logs = logs
        self.args = args
        self.runs = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        self.runs += 1
        log = (self.logs / f"serve-{self.runs}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "callvault", "serve", "--no-web", *self.args, *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def stop(self) -> None:
        """Kill the current run if it still runs, and reap it (cleanup, safe to repeat)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def log_text(self, run: int | None = None) -> str:
        paths = sorted(self.logs.glob("serve-*.log"))
        if run is not None:
            paths = [self.logs / f"serve-{run}.log"]
        return "\n".join(p.read_text(errors="replace") for p in paths)
