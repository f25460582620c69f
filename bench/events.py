"""Benchmark: NewCdr events per second the receiver commits durably, many senders at once.

Starts `callvault serve` in a subprocess (its own process, as in production; the PBX URL
points at a closed port on 127.0.0.1, so only the receiver works), then posts EVENTS
NewCdr reports from CONCURRENCY concurrent senders, one TCP connection per report as the
PBX does. Each 200 means the report was committed (SQLite WAL, synchronous=FULL) before
the answer. At the end the index is checked to hold every call.

The last line is `events_per_s=<n>` (target >= 1000 on a 2-core machine).

    python bench/events.py [--events 5000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from callvault.archive import SECRET_SETTING
from callvault.index import open_index


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
                secret = index.get_setting(SECRET_SETTING)
            if secret:
                return secret
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit("callvault serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
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
                before = sum(index.counts_by_state().values())
            elapsed, failures = asyncio.run(send_all(port, secret, args.events, args.concurrency))
            with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
                stored = sum(index.counts_by_state().values()) - before
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(60)
    # Event 0 was the warm-up: it is re-sent in the run and deduplicated.
    expected = args.events - 1
    if failures or stored != expected:
        raise SystemExit(f"lost events: {failures} non-200 answers, {stored}/{expected} stored")
    rate = args.events / elapsed
    print(f"events={args.events} concurrency={args.concurrency} seconds={elapsed:.2f}")
    print(f"events_per_s={rate:.0f}")


if __name__ == "__main__":
    main()
