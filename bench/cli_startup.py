"""Benchmark: how long the command line takes to start, against a bare interpreter.

Three commands, each run RUNS times (default 15) as a fresh process, interleaved so that a
busy moment hurts all three alike; the figure is the median wall time:

* ``python -c pass``: the bare interpreter, the yardstick;
* ``callvault --version``: the cheapest command;
* ``callvault list`` on an archive of 1,000 calls (SQLite index, made once before timing;
  with ``--db``, that index: a PostgreSQL database is created if missing).

The last line is `version_ms=<n> list_ms=<n> python_ms=<n> version_x=<n> list_x=<n>` where
`*_x` is the ratio to the bare interpreter (targets: version_x <= 8, list_x <= 25).

    python bench/cli_startup.py [--runs 15] [--calls 1000] [--db URL]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from callvault.index import open_index
from callvault.pbx import CallDetail


def make_archive(directory: Path, calls: int, url: str | None = None) -> None:
    """An archive whose index (`url`, or a SQLite file in it) holds `calls` calls, each with
    a pending recording."""
    directory.mkdir(parents=True, exist_ok=True)
    start = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    details = []
    for n in range(calls):
        when = start + timedelta(minutes=7 * n)
        details.append(
            CallDetail(
                callid=f"{int(when.timestamp())}.{n}",
                timestart=when.strftime("%Y-%m-%d %H:%M:%S"),
                callfrom=str(1000 + n % 50),
                callto=f"0301234{n:04d}",
                callduration=60 + n % 120,
                talkduration=50 + n % 100,
                status="ANSWERED",
                type="Outbound",
                recording=f"{when:%Y%m%d%H%M%S}-{int(when.timestamp())}.{n}-{1000 + n % 50}"
                f"-0301234{n:04d}-Outbound.wav",
                sn="369451090405",
            )
        )
    with open_index(url or f"sqlite:///{directory / 'callvault.db'}") as index:
        index.calls.record(details, source="cdr", tz=ZoneInfo("UTC"), now=datetime.now(UTC))


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database of `url` if it does not exist."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return
    import psycopg

    admin = parsed.set(database="postgres").render_as_string(hide_password=False)
    admin = admin.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [parsed.database])
        if found.fetchone() is None:
            conn.execute(f'CREATE DATABASE "{parsed.database}"')


def command_env() -> dict[str, str]:
    """The environment the timed commands run in: no CALLVAULT_* settings, UTC, and .pyc
    files written. An installed callvault has its bytecode compiled at install; a shell with
    PYTHONDONTWRITEBYTECODE set (this machine's has) would otherwise time the compiling of
    every callvault module on every run of an editable install."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["TZ"] = "UTC"
    return env


def timed(command: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.decode()[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--db", help="the index's URL (default: a SQLite file)")
    args = parser.parse_args()
    callvault = shutil.which("callvault", path=str(Path(sys.executable).parent))
    if callvault is None:
        raise SystemExit("callvault is not installed beside this Python (pip install -e .)")
    env = command_env()
    with tempfile.TemporaryDirectory(prefix="callvault-bench-") as tmp:
        archive = Path(tmp) / "archive"
        if args.db:
            ensure_database(args.db)
        make_archive(archive, args.calls, args.db)
        commands = {
            "python": [sys.executable, "-c", "pass"],
            "version": [callvault, "--version"],
            "list": [callvault, "list", "--archive", str(archive), "--limit", "50"]
            + (["--db", args.db] if args.db else []),
        }
        for command in commands.values():  # warm the page cache and .pyc files
            timed(command, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, command in commands.items():
                times[name].append(timed(command, env))
    median = {name: statistics.median(values) * 1000 for name, values in times.items()}
    for name, values in times.items():
        print(
            f"{name:8} median {median[name]:7.1f} ms  "
            f"min {min(values) * 1000:7.1f}  max {max(values) * 1000:7.1f}"
        )
    base = median["python"]
    print(
        f"version_ms={median['version']:.0f} list_ms={median['list']:.0f} "
        f"python_ms={base:.1f} version_x={median['version'] / base:.1f} "
        f"list_x={median['list'] / base:.1f}"
    )


if __name__ == "__main__":
    main()
