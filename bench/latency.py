"""Benchmark: event-to-archived latency on loopback, for a few hundred calls.

The simulator (HTTPS, 127.0.0.1) and the archiver run in this process. Calls are placed
at a steady pace; for each, the clock starts when the simulator has written the recording
and pushes NewCdr, and stops when the archiver has the file durably stored and the index
says `archived`. Recordings are small (1 s of audio).

With `--kind p-series` the PBX is the P-Series simulator (OpenAPI, HTTPS and WSS on
127.0.0.1) and the archiver takes its events from the PBX's WebSocket, as `serve` does for
a P-Series PBX: the clock starts when the simulator has written the recording and sends
event 30012 (NewCdr; the 30011 call-status events are switched off, as the progress reports
are for the S-Series), and stops as above. Calls are placed only once the WebSocket is
subscribed (the PBX does not keep events for an absent socket).

The last line is `p50_ms=<a> p99_ms=<b>` (target p50 < 250).

    python bench/latency.py [--calls 300] [--per-second 10] [--kind s-series|p-series]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from zoneinfo import ZoneInfo

from callvault.archive import Archived, Archiver, ArchiverConfig
from callvault.pbx import TlsOptions
from callvault.simulator import PSeriesConfig, PSeriesSimulator, Simulator, SimulatorConfig

# What the loop needs of a simulator: the archiver's settings for it, a call placer (the
# recording's name) and whether the PBX may send its events now.
SimulatedPbx = tuple[dict, Callable[[int], str], Callable[[], bool]]


@contextmanager
def simulated_pbx(kind: str) -> Iterator[SimulatedPbx]:
    if kind == "p-series":
        # 30012 only: the clock starts at its sending, which the 30011 events would precede.
        with PSeriesSimulator(PSeriesConfig(seed=1, call_status_events=False)) as psim:

            def place(n: int) -> str:
                call = psim.place_call(call_from=str(1000 + n % 50), call_to="1099", talk_seconds=1)
                assert call.file is not None
                return call.file

            settings = {
                "pbx_url": psim.url,
                "username": psim.client_id,
                "password": psim.client_secret,
                "kind": "p-series",
                "tls": TlsOptions(pin_sha256=psim.cert_sha256),
                "timezone": ZoneInfo(psim.config.timezone),
            }

            def subscribed() -> bool:
                # The socket is counted once open; its topic_list arrives just after, and an
                # event sent before it is dropped.
                return psim.ws_subscribers(30012) > 0

            yield settings, place, subscribed
        return
    # NewCdr only: the clock starts at its push, which progress reports would precede.
    with Simulator(SimulatorConfig(seed=1, call_progress_reports=False)) as sim:

        def place_s(n: int) -> str:
            cdr = sim.place_call(callfrom=str(1000 + n % 50), callto="1099", talk_seconds=1)
            assert cdr.recording is not None
            return cdr.recording

        settings = {
            "pbx_url": sim.url,
            "username": sim.username,
            "password": sim.password,
            "tls": TlsOptions(pin_sha256=sim.cert_sha256),
            "timezone": ZoneInfo(sim.config.timezone),
        }
        yield settings, place_s, lambda: True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--per-second", type=float, default=10.0)
    parser.add_argument("--kind", choices=("s-series", "p-series"), default="s-series")
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
        simulated_pbx(args.kind) as (settings, place, listening),
    ):
        config = ArchiverConfig(
            **settings,
            archive=Path(tmp) / "archive",
            events_host="127.0.0.1",
            events_port=0,
            reconcile_at_start=False,
        )
        with Archiver(config, on_archived=archived) as archiver:
            assert archiver.session is not None
            deadline = time.monotonic() + 10
            while (
                not (archiver.session.ready.is_set() and listening())
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            interval = 1.0 / args.per_second
            next_at = time.perf_counter()
            for n in range(args.calls):
                now = time.perf_counter()
                if now < next_at:
                    time.sleep(next_at - now)
                next_at += interval
                started = time.perf_counter()
                placed[place(n)] = started
            if not all_done.wait(120):
                raise SystemExit(f"only {len(done)} of {args.calls} archived in time")
    latencies = sorted((done[name] - placed[name]) * 1000 for name in placed)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(f"calls={len(latencies)} per_second={args.per_second} max_ms={latencies[-1]:.0f}")
    print(f"p50_ms={p50:.0f} p99_ms={p99:.0f}")


if __name__ == "__main__":
    main()
