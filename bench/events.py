"""Benchmark: NewCdr events per second the receiver commits durably, many senders at once.

Each run starts `callvault serve` in a subprocess (its own process, as in production; the
PBX URL points at a closed port on 127.0.0.1, so only the receiver works), then posts
EVENTS NewCdr reports from CONCURRENCY concurrent senders. Every report goes over a new TCP
connection with `Connection: close`, as the PBX sends them (no keep-alive). Each 200 means
the report was committed (SQLite WAL, synchronous=FULL) before the answer. At the end the
index is checked to hold every call.

The senders are asyncio tasks in this process (one process, so they cost the server no
GIL); on a 2-core machine they still take CPU the server could use, which a real PBX, on
its own box, would not. Each run reports the CPU seconds, over the timed span, of the
server process, of this process (the senders) and of everything else on the machine
(`other_cpu_s`: from /proc/stat; anything but ~0 means the figures are disturbed).

The last line is the median over RUNS runs (default 3):
`events_per_s=<n> serve_cpu_us_per_event=<n> other_cpu_s=<n>` (target events_per_s >= 1000
on a 2-core machine).

    python bench/events.py [--events 5000] [--concurrency 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from callvault.index import SettingKey, open_index


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def newcdr(n: int) -> bytes:
    callid = f"{1714550400 + n // 100}.{n}"
    body = {
        "action": "NewCdr",
        "callid": callid,
        "timestart": "2024-05-01 10:00:00",
        "callfrom": "1001",
        "callto": "+4915112345678",
        "callduraction": "20",
        "talkduraction": "15",
        "srctrunkname": "",
        "desttrunkname": "SIP1",
        "status": "ANSWERED",
        "type": "Outbound",
        "pincode": "",
        "recording": f"20240501100005-{callid}-1001-+4915112345678-Outbound.wav",
        "didnumber": "",
        "agentringtime": "0",
        "sn": "369351034049",
    }
    return json.dumps(body).encode()


async def post(port: int, path: str, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"POST /{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: WebAPI\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        + body
    )
    await writer.drain()
    status_line = await reader.readline()
    await reader.read()  # until the server closes
    writer.close()
    return int(status_line.split()[1])


async def send_all(port: int, path: str, events: int, concurrency: int) -> tuple[float, int]:
    bodies = [newcdr(n) for n in range(events)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    failures = 0

    async def sender() -> None:
        nonlocal failures
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if await post(port, path, body) != 200:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return time.perf_counter() - started, failures


def wait_for_secret(db: Path, port: int, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
            with open_index(f"sqlite:///{db}", create=False) as index:
                secret = index.settings.get(SettingKey.EVENTS_SECRET_PATH)
            if secret:
                return secret
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit("callvault serve did not start")


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_s() -> float:
    """CPU seconds every core of the machine has spent not idle (nor waiting for I/O)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / _TICK


def self_cpu_s() -> float:
    return time.process_time()


@dataclass
class Run:
    events_per_s: float
    serve_cpu_s: float
    bench_cpu_s: float
    other_cpu_s: float


def one_run(events: int, concurrency: int) -> Run:
    with tempfile.TemporaryDirectory(prefix="callvault-bench-events-") as tmp:
        archive = Path(tmp) / "archive"
        port = free_port()
        env = dict(os.environ)
        env.update(
            {
                "CALLVAULT_PASSWORD": "unused",
                "CALLVAULT_RECONCILE_INTERVAL_S": "3600",
            }
        )
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "callvault",
                "serve",
                "--no-web",
                "--pbx",
                "http://127.0.0.1:1",
                "--username",
                "api",
                "--archive",
                str(archive),
                "--events-listen",
                f"127.0.0.1:{port}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            secret = wait_for_secret(archive / "callvault.db", port)
            # Warm-up (imports, first transaction), not counted.
            asyncio.run(send_all(port, secret, 1, 1))
            with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
                before = sum(index.recordings.counts_by_state().values())
            cpu_before = (process_cpu_s(serve.pid), self_cpu_s(), machine_busy_s())
            elapsed, failures = asyncio.run(send_all(port, secret, events, concurrency))
            cpu_after = (process_cpu_s(serve.pid), self_cpu_s(), machine_busy_s())
            with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
                stored = sum(index.recordings.counts_by_state().values()) - before
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(60)
    # Event 0 was the warm-up: it is re-sent in the run and deduplicated.
    expected = events - 1
    if failures or stored != expected:
        raise SystemExit(f"lost events: {failures} non-200 answers, {stored}/{expected} stored")
    serve_cpu = cpu_after[0] - cpu_before[0]
    bench_cpu = cpu_after[1] - cpu_before[1]
    other_cpu = max(0.0, cpu_after[2] - cpu_before[2] - serve_cpu - bench_cpu)
    return Run(events / elapsed, serve_cpu, bench_cpu, other_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs: list[Run] = []
    for number in range(1, args.runs + 1):
        run = one_run(args.events, args.concurrency)
        runs.append(run)
        print(
            f"run={number} events={args.events} concurrency={args.concurrency} "
            f"events_per_s={run.events_per_s:.0f} serve_cpu_s={run.serve_cpu_s:.2f} "
            f"bench_cpu_s={run.bench_cpu_s:.2f} other_cpu_s={run.other_cpu_s:.2f}",
            flush=True,
        )
    median = statistics.median
    print(
        f"events_per_s={median(r.events_per_s for r in runs):.0f} "
        f"serve_cpu_us_per_event={median(r.serve_cpu_s for r in runs) / args.events * 1e6:.0f} "
        f"other_cpu_s={median(r.other_cpu_s for r in runs):.2f}"
    )


if __name__ == "__main__":
    main()
