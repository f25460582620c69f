"""Benchmark: the web API's searches on a big index, SQLite or PostgreSQL.

Fills an index through the library's own bulk paths (`index.calls.record` in batches of
5,000, then `index.jobs.mark_archived_many`) with CALLS calls of a call centre: 500
extensions (1000-1499), two years of start times, inbound calls from 11-digit numbers to
20 DIDs, outbound calls, internal calls; every answered call (about 88%) has a recording,
archived but for the newest 200. An index that already holds at least CALLS calls
(`--db` of an earlier run) is used as it is.

Then it starts `callvault web` on 127.0.0.1 and times each search REPEAT times over HTTP
with an API token, after one untimed warm-up request: the newest page; a number substring
(3705); an exact extension; one week; one week and a direction; a listener scoped to five
extensions, newest page and number search; a page deep in the archive (after the cursor of
the row half-way down); and `callvault list --limit 50` as a fresh process, against its
start-up budget (25 times a bare `python -c pass`, plus 50 ms).

The last line is `rows=<calls> p95_ms=<worst p95 over the API searches> list_ms=<n>
list_budget_ms=<n>`. Targets: p95 < 100 ms at 10,000,000 calls on PostgreSQL and at
1,000,000 on SQLite; list_ms <= list_budget_ms.

    python bench/search.py [--calls 1000000] [--db URL] [--repeat 20]

`--db` takes a SQLAlchemy URL (postgresql+psycopg://127.0.0.1/callvault_bench: the
database is created if missing) or a SQLite file; without it a SQLite file in a
temporary directory, removed afterwards.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
from cli_startup import command_env, ensure_database

from callvault.index import ArchivedCopy, Index, SearchFilters, open_index
from callvault.pbx import CallDetail

BATCH = 5_000
FIRST_EXTENSION, EXTENSIONS = 1000, 500
DIDS = [f"0301234{n:04d}" for n in range(500, 520)]
END = datetime(2026, 12, 1, tzinfo=UTC)
SPAN = timedelta(days=730)
PENDING_TAIL = 200
SCOPE = "1100,1200,1300,1400,1450"
PASSWORD = "bench-password-not-secret"


def calls_of(count: int, seed: int = 7) -> Iterator[CallDetail]:
    """`count` calls in start-time order, the same for the same seed."""
    rng = random.Random(seed)
    externals = [f"0{rng.randrange(10**9, 10**10)}" for _ in range(200_000)]
    step = SPAN / count
    start = END - SPAN
    for n in range(count):
        when = start + step * n + timedelta(seconds=rng.random() * step.total_seconds())
        extension = str(FIRST_EXTENSION + rng.randrange(EXTENSIONS))
        kind = rng.random()
        did = ""
        if kind < 0.45:
            direction, call_from, call_to = "Inbound", rng.choice(externals), extension
            did = rng.choice(DIDS)
        elif kind < 0.85:
            direction, call_from, call_to = "Outbound", extension, rng.choice(externals)
        else:
            other = str(FIRST_EXTENSION + rng.randrange(EXTENSIONS))
            direction, call_from, call_to = "Internal", extension, other
        answered = rng.random() < 0.88
        talk = int(rng.expovariate(1 / 180)) if answered else 0
        ring = rng.randrange(2, 30)
        epoch = int(when.timestamp())
        callid = f"{epoch}.{n}"
        yield CallDetail(
            callid=callid,
            timestart=when.strftime("%Y-%m-%d %H:%M:%S"),
            callfrom=call_from,
            callto=call_to,
            callduration=ring + talk,
            talkduration=talk,
            srctrunkname="SIP-Trunk" if direction == "Inbound" else "",
            dsttrunkname="SIP-Trunk" if direction == "Outbound" else "",
            status="ANSWERED" if answered else rng.choice(["NO ANSWER", "BUSY", "FAILED"]),
            type=direction,
            didnumber=did,
            recording=(
                f"{when:%Y%m%d%H%M%S}-{callid}-{call_from}-{call_to}-{direction}.wav"
                if answered
                else ""
            ),
            sn="369451090405",
        )


def fill(index: Index, count: int) -> None:
    """Store `count` calls through the library's bulk paths, printing the rate."""
    began = time.perf_counter()
    utc = ZoneInfo("UTC")
    batch: list[CallDetail] = []
    done = 0

    def flush() -> None:
        nonlocal done
        now = datetime.now(UTC)
        results = index.calls.record(batch, source="cdr", tz=utc, now=now)
        copies = [
            ArchivedCopy(
                recording_id=result.recording_id,
                size=480_000,
                sha256="0" * 64,
                storage_key=f"bench/{result.recording_id}.wav",
                content_type="audio/wav",
            )
            for result in results
            if result.recording_id is not None and done + len(batch) <= count - PENDING_TAIL
        ]
        index.jobs.mark_archived_many(copies, now=now)
        done += len(batch)
        batch.clear()
        if done % 100_000 == 0 or done == count:
            rate = done / (time.perf_counter() - began)
            print(f"  filled {done:,} calls ({rate:,.0f} calls/s)", flush=True)

    for cdr in calls_of(count):
        batch.append(cdr)
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()


@dataclass
class Timing:
    name: str
    matches: str
    p50: float
    p95: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def median_ms(command: list[str], runs: int, env: dict[str, str]) -> float:
    """The median wall time of `runs` runs, after one untimed run (page cache, .pyc)."""
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--db", help="index URL or SQLite file (default: a temporary file)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    callvault = shutil.which("callvault", path=str(Path(sys.executable).parent))
    if callvault is None:
        raise SystemExit("callvault is not installed beside this Python (pip install -e .)")
    with tempfile.TemporaryDirectory(prefix="callvault-bench-search-") as tmp:
        url = args.db or f"sqlite:///{tmp}/callvault.db"
        if "://" not in url:
            url = f"sqlite:///{Path(url).resolve()}"
        ensure_database(url)
        with open_index(url) as index:
            have, _ = index.recordings.call_totals()
            if have < args.calls:
                if have:
                    raise SystemExit(f"{url} holds {have:,} calls, fewer than --calls: empty it")
                print(f"filling {args.calls:,} calls into {index!r}", flush=True)
                fill(index, args.calls)
            else:
                print(f"using the {have:,} calls already in {index!r}", flush=True)
            for name, role, scope in (
                ("bench-admin", "admin", ""),
                ("bench-agent", "listener", SCOPE),
            ):
                if index.users.get(name) is None:
                    index.users.add(name, role, PASSWORD, scope)
            _, admin_token = index.tokens.create("bench-admin", label="bench")
            _, agent_token = index.tokens.create("bench-agent", label="bench")
            half = index.recordings.search(SearchFilters(), limit=1, offset=args.calls // 2)
            deep_cursor = half[0].position.token() if half else ""
        env = command_env()
        port = free_port()
        (Path(tmp) / "archive").mkdir(mode=0o700)  # `web` serves audio from it: none here
        web = subprocess.Popen(
            [
                callvault,
                "web",
                "--archive",
                f"{tmp}/archive",
                "--db",
                url,
                "--listen",
                f"127.0.0.1:{port}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            timings = time_searches(
                f"http://127.0.0.1:{port}", admin_token, agent_token, deep_cursor, args.repeat, web
            )
        finally:
            web.terminate()
            web.wait(10)
        python_ms = median_ms([sys.executable, "-c", "pass"], 15, env)
        list_command = [callvault, "list", "--archive", f"{tmp}/archive", "--db", url]
        list_ms = median_ms([*list_command, "--limit", "50"], 15, env)
    width = max(len(t.name) for t in timings)
    print(f"{'query'.ljust(width)}  matches        p50 ms   p95 ms")
    for t in timings:
        print(f"{t.name.ljust(width)}  {t.matches:<13} {t.p50:7.1f}  {t.p95:7.1f}")
    budget = 25 * python_ms + 50
    print(f"callvault list --limit 50: {list_ms:.0f} ms (python -c pass {python_ms:.0f} ms)")
    worst = max(t.p95 for t in timings)
    print(f"rows={args.calls} p95_ms={worst:.1f} list_ms={list_ms:.0f} list_budget_ms={budget:.0f}")


def time_searches(
    base: str,
    admin_token: str,
    agent_token: str,
    deep_cursor: str,
    repeat: int,
    web: subprocess.Popen[bytes],
) -> list[Timing]:
    week = {"since": "2026-03-02", "until": "2026-03-08"}
    queries: list[tuple[str, str, dict[str, str]]] = [
        ("newest page", admin_token, {}),
        ("number 3705", admin_token, {"number": "3705"}),
        ("extension 1234", admin_token, {"extension": "1234"}),
        ("one week", admin_token, week),
        ("one week, inbound", admin_token, {**week, "direction": "Inbound"}),
        ("listener (5 ext), newest", agent_token, {}),
        ("listener (5 ext), number 3705", agent_token, {"number": "3705"}),
        ("deep page (half-way)", admin_token, {"after": deep_cursor}),
    ]
    timings = []
    with httpx.Client(base_url=base, timeout=120) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.get("/login")
                break
            except httpx.TransportError:
                if web.poll() is not None:
                    assert web.stderr is not None
                    raise SystemExit(
                        f"callvault web failed: {web.stderr.read().decode()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise SystemExit("callvault web did not start within 60 s") from None
                time.sleep(0.2)
        for name, token, params in queries:
            headers = {"Authorization": f"Bearer {token}"}
            first = client.get("/api/recordings", params=params, headers=headers)
            if first.status_code != 200:
                raise SystemExit(f"{name}: HTTP {first.status_code}: {first.text[:300]}")
            body = first.json()
            matches = f"{body['total']:,}" + ("" if body["total_exact"] else "+")
            samples = []
            for _ in range(repeat):
                began = time.perf_counter()
                response = client.get("/api/recordings", params=params, headers=headers)
                samples.append((time.perf_counter() - began) * 1000)
                response.raise_for_status()
            samples.sort()
            p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
            timings.append(Timing(name, matches, statistics.median(samples), p95))
    return timings


if __name__ == "__main__":
    main()
