"""Benchmark: event-to-archived latency on loopback, for a few hundred calls.

The simulator (HTTPS, 127.0.0.1) and the archiver run in this process. Calls are placed
at a steady pace; for each, the clock starts when the simulator has written the recording
and pushes NewCdr, and stops when the archiver has the file durably stored and the index
says `archived`. Recordings are small (1 s of audio).

The last line is `p50_ms=<a> p99_ms=<b>` (target p50 < 250).

    python bench/latency.py [--calls 300] [--per-second 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from zoneinfo import ZoneInfo

from callvault.archive import Archived, Archiver, ArchiverConfig
from callvault.pbx import TlsOptions
from callvault.simulator import Simulator, SimulatorConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--per-second", type=float, default=10.0)
    args = parser.parse_args()
    placed: dict[str, float] = {}
    done: dict[str, float] = {}
    all_done = threading.Event()

    def archived(item: Archived) -> None:
        done[item.name] = time.perf_counter()
        if len(done) >= args.calls:
            all_done.set()

    with (
        tempfile.TemporaryDirectory(prefix="callvault-bench-latency-") as tmp,
        # NewCdr only: the clock starts at its push, which progress reports would precede.
        Simulator(SimulatorConfig(seed=1, call_progress_reports=False)) as sim,
    ):
        config = ArchiverConfig(
            pbx_url=sim.url,
            username=sim.username,
            password=sim.password,
            archive=Path(tmp) / "archive",
            tls=TlsOptions(pin_sha256=sim.cert_sha256),
            events_host="127.0.0.1",
            events_port=0,
            timezone=ZoneInfo(sim.config.timezone),
            reconcile_at_start=False,
        )
        with Archiver(config, on_archived=archived) as archiver:
            assert archiver.session is not None
            deadline = time.monotonic() + 10
            while not archiver.session.ready.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            interval = 1.0 / args.per_second
            next_at = time.perf_counter()
            for n in range(args.calls):
                now = time.perf_counter()
                if now < next_at:
                    time.sleep(next_at - now)
                next_at += interval
                started = time.perf_counter()
                cdr = sim.place_call(callfrom=str(1000 + n % 50), callto="1099", talk_seconds=1)
                assert cdr.recording is not None
                placed[cdr.recording] = started
            if not all_done.wait(120):
                raise SystemExit(f"only {len(done)} of {args.calls} archived in time")
    latencies = sorted((done[name] - placed[name]) * 1000 for name in placed)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(f"calls={len(latencies)} per_second={args.per_second} max_ms={latencies[-1]:.0f}")
    print(f"p50_ms={p50:.0f} p99_ms={p99:.0f}")


if __name__ == "__main__":
    main()
