"""Benchmark: a fleet of PBXs archived by several `serve` nodes, and a node's loss.

Starts, all on this machine:

- ``callvault simulate --pbxs N`` (default 200) as one process: N simulated PBXs, each
  answering every request 50 ms late (``--latency-ms``), each placing calls at random so
  that the whole fleet ends about ``--rate`` calls a second (default 20);
- a PostgreSQL index (a new database on 127.0.0.1, dropped at the end unless ``--keep``)
  with the N PBXs registered, their passwords sealed with a new master key;
- ``--nodes`` (default 3) ``callvault serve`` processes, node ``n1`` on 127.0.0.1, ``n2``
  on 127.0.0.2 and so on (``--bind``), recordings in one directory they share.

It waits until the nodes have spread the PBXs between them, lets calls run for
``--seconds`` (default 60), then SIGKILLs node n1 and times how long until every PBX is
held by a live node again (``failover_s``), lets calls run for another ``--seconds``, and
waits for every recording to be archived.

Event-to-archived is taken from the index: from a recording's report being committed
(`created_at`) to its being archived (`archived_at`), for the recordings queued in the
first period but its last 10 s (the steady state; the killed node's recordings wait for
its leases to expire, which `failover_s` measures). Every recording of both periods must
end archived, once: as many files stored as recordings archived.

The last line printed is ``pbxs= nodes= calls_per_s= p99_ms= failover_s=``.
Targets: p99_ms < 2000 and failover_s < 30.

    python bench/fleet.py [--pbxs 200] [--nodes 3] [--rate 20] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cli_startup import command_env, ensure_database

from callvault.index import open_index
from callvault.index.pbxs import PbxConfig
from callvault.keys import create_key_file, load_keyring
from callvault.ops import add_pbx

# Recordings queued this close to the kill are left out of the steady state.
_MARGIN_S = 10.0


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _wait(predicate: object, timeout: float, what: str) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - began
        time.sleep(0.2)
    raise SystemExit(f"bench/fleet.py: {what} did not happen within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pbxs", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20.0, help="calls a second, in all")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    parser.add_argument("--keep", action="store_true", help="keep the database and logs")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="callvault-fleet-"))
    db_name = f"callvault_fleet_{uuid.uuid4().hex[:8]}"
    db_url = f"{args.pg}/{db_name}"
    ensure_database(db_url)
    env = command_env()
    per_minute = args.rate * 60 / args.pbxs
    sim_log = (work / "simulate.log").open("wb")
    simulate = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "callvault",
            "simulate",
            "--pbxs",
            str(args.pbxs),
            "--port",
            "0",
            "--json",
            "--initial-calls",
            "0",
            "--calls-per-minute",
            f"{per_minute:g}",
            "--fault",
            f"slow_seconds={args.latency_ms / 1000:g}",
            "--data-dir",
            str(work / "pbxs"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=sim_log,
    )
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        assert simulate.stdout is not None
        pbxs = json.loads(simulate.stdout.readline())
        # Then a line per call: read them all, or the pipe fills and every PBX stalls.
        threading.Thread(target=simulate.stdout.read, daemon=True).start()
        key_file = work / "master.key"
        create_key_file(key_file)
        keyring = load_keyring(key_file, environ={})
        assert keyring is not None
        with open_index(db_url) as index:
            for pbx in pbxs:
                add_pbx(
                    index,
                    keyring,
                    pbx["name"],
                    PbxConfig(
                        url=pbx["url"],
                        username=pbx["username"],
                        pin_sha256=pbx["cert_sha256"],
                        timezone=pbx["timezone"],
                    ),
                    pbx["password"],
                    actor="bench",
                    remote_addr="127.0.0.1",
                    now=datetime.now(UTC),
                )
        node_env = {
            **env,
            "CALLVAULT_ARCHIVE": str(work / "archive"),
            "CALLVAULT_DB": db_url,
            "CALLVAULT_MASTER_KEY_FILE": str(key_file),
        }
        (work / "archive").mkdir()
        for number in range(1, args.nodes + 1):
            address = f"127.0.0.{number}"
            log = (work / f"n{number}.log").open("wb")
            nodes[f"n{number}"] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "callvault",
                    "serve",
                    "--no-web",
                    "--node",
                    f"n{number}",
                    "--bind",
                    address,
                    "--events-listen",
                    f"{address}:{_free_port(address)}",
                ],
                env=node_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()

        def holders() -> dict[int, str | None]:
            now = datetime.now(UTC)
            with open_index(db_url) as index:
                return {
                    lease.pbx_id: lease.node if lease.held(now) else None
                    for lease in index.leases.all()
                }

        def spread_over(names: set[str]) -> bool:
            held = holders()
            return (
                len(held) == len(pbxs)
                and set(held.values()) <= names
                and None not in set(held.values())
            )

        _wait(lambda: spread_over(set(nodes)), 180, "spreading the PBXs over the nodes")
        print(f"{len(pbxs)} PBXs spread over {len(nodes)} nodes", file=sys.stderr)
        steady_from = datetime.now(UTC)
        time.sleep(args.seconds)
        killed_at_wall = datetime.now(UTC)
        os.kill(nodes["n1"].pid, signal.SIGKILL)
        nodes["n1"].wait()
        failover_s = _wait(
            lambda: spread_over(set(nodes) - {"n1"}), 120, "taking over the killed node's PBXs"
        )
        print(f"failover: {failover_s:.1f} s", file=sys.stderr)
        time.sleep(args.seconds)
        ended = datetime.now(UTC)

        def archived_until_end() -> bool:
            from sqlalchemy import text

            with open_index(db_url) as index, index.engine.connect() as conn:
                waiting = conn.execute(
                    text(
                        "SELECT count(*) FROM recordings WHERE state <> 'archived' "
                        "AND created_at < :end"
                    ),
                    {"end": ended},
                ).scalar_one()
            return int(waiting) == 0

        _wait(archived_until_end, 300, "archiving every recording of both periods")
        simulate.kill()  # no more calls
        simulate.wait(60)
        for process in nodes.values():
            if process.poll() is None:
                process.terminate()
        for process in nodes.values():
            process.wait(120)
        with open_index(db_url) as index:
            engine = index.engine
            from sqlalchemy import text

            with engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT created_at, archived_at FROM recordings "
                        "WHERE created_at >= :a AND created_at < :b"
                    ),
                    # Those queued in the last seconds before the kill may be a killed
                    # node's downloads in flight: failover_s measures those.
                    {"a": steady_from, "b": killed_at_wall - timedelta(seconds=_MARGIN_S)},
                ).all()
                total = conn.execute(
                    text("SELECT count(*) FROM recordings WHERE state = 'archived'")
                ).scalar_one()
                per_name = conn.execute(
                    text(
                        "SELECT count(*) FROM (SELECT pbx_id, name FROM recordings "
                        "GROUP BY pbx_id, name HAVING count(*) > 1) AS twice"
                    )
                ).scalar_one()
        waits = sorted((b - a).total_seconds() * 1000 for a, b in rows)
        files = sum(1 for _ in (work / "archive").rglob("*.wav"))
        if files != total or per_name:
            raise SystemExit(f"bench/fleet.py: {total} recordings archived, {files} files")
        p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))] if waits else float("nan")
        rate = len(rows) / (args.seconds - _MARGIN_S)
        print(
            f"steady state: {len(rows)} recordings in {args.seconds:.0f} s, "
            f"median {statistics.median(waits):.0f} ms; {total} archived in all",
            file=sys.stderr,
        )
        print(
            f"pbxs={len(pbxs)} nodes={len(nodes)} calls_per_s={rate:.1f} p99_ms={p99:.0f} "
            f"failover_s={failover_s:.1f}"
        )
    finally:
        for process in [*nodes.values(), simulate]:
            if process.poll() is None:
                process.terminate()
        for process in [*nodes.values(), simulate]:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        sim_log.close()
        if not args.keep:
            import psycopg

            admin = args.pg.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        print(f"logs in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
