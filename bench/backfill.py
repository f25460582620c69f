"""Benchmark: backfill of 2,000 recordings from a PBX that takes 50 ms per request.

The simulator (HTTPS, 127.0.0.1) gets RECORDINGS calls while nobody listens for events,
and `slow_seconds=0.05` delays every answer it gives by 50 ms. Then, timed:

- `callvault backfill --since ...` in a subprocess (CDR export in day windows, index,
  downloads by the worker pool, durable storage, index marked archived), and
- a plain sequential loop with httpx doing the same downloads: login, CDR export, then
  for each recording get_random + GET, written to a file.

Both results are checked: every recording present with the simulator's SHA-256.
The last line is `callvault_s=<a> sequential_s=<b> speedup=<b/a>`.

    python bench/backfill.py [--recordings 2000] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx

from callvault.index import open_index
from callvault.pbx import password_md5
from callvault.simulator import Faults, Simulator, SimulatorConfig


def sequential(sim: Simulator, since: str, until: str, out: Path) -> int:
    """What a script without callvault would do, one request after the other."""
    api = f"{sim.url}/api/v1.1.0"
    with httpx.Client(verify=str(sim.ca_file), timeout=60) as http:
        login = http.post(
            f"{api}/login",
            json={"username": sim.username, "password": password_md5(sim.password), "port": "0"},
        ).json()
        if "token" not in login:
            raise SystemExit(f"sequential: login failed: {login}")
        token = login["token"]
        query = {"extid": "all", "starttime": since, "endtime": until}
        random = http.post(f"{api}/cdr/get_random", params={"token": token}, json=query).json()
        text = http.get(
            f"{api}/cdr/download", params={**query, "token": token, "random": random["random"]}
        ).text
        names = [row["recording"] for row in csv.DictReader(io.StringIO(text)) if row["recording"]]
        for name in names:
            answer = http.post(
                f"{api}/recording/get_random", params={"token": token}, json={"recording": name}
            ).json()
            response = http.get(
                f"{api}/recording/download",
                params={"recording": name, "random": answer["random"], "token": token},
            )
            data = response.content
            if not data.startswith(b"RIFF"):
                raise SystemExit(f"sequential: {name}: not a WAV file")
            (out / name).write_bytes(data)
    return len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recordings", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="callvault-bench-backfill-") as tmp:
        config = SimulatorConfig(seed=2, faults=Faults())
        with Simulator(config) as sim:
            tz = ZoneInfo(sim.config.timezone)
            for n in range(args.recordings):
                sim.place_call(callfrom=str(1000 + n % 90), callto="1099", size_bytes=4096)
            names = set(sim.recording_names())
            sim.faults.slow_seconds = args.delay
            start = datetime.now(tz) - timedelta(hours=2)
            end = datetime.now(tz) + timedelta(minutes=1)
            since, until = (t.strftime("%Y-%m-%d %H:%M:%S") for t in (start, end))

            archive = Path(tmp) / "archive"
            env = dict(os.environ)
            env.update(
                {
                    "CALLVAULT_PASSWORD": sim.password,
                    "CALLVAULT_PIN_SHA256": sim.cert_sha256 or "",
                    "CALLVAULT_TIMEZONE": sim.config.timezone,
                }
            )
            argv = [
                sys.executable,
                "-m",
                "callvault",
                "backfill",
                "--since",
                since,
                "--until",
                until,
                "--pbx",
                sim.url,
                "--username",
                sim.username,
                "--archive",
                str(archive),
                "--workers",
                str(args.workers),
            ]
            began = time.perf_counter()
            result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            callvault_s = time.perf_counter() - began
            if result.returncode != 0:
                raise SystemExit(f"callvault backfill failed: {result.stderr[-2000:]}")
            with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
                for name in names:
                    row = index.recordings.by_name(name)
                    if row is None or row.state != "archived" or row.storage_key is None:
                        raise SystemExit(f"callvault: {name} not archived")
                    data = (archive / row.storage_key).read_bytes()
                    if hashlib.sha256(data).hexdigest() != sim.recording_sha256(name):
                        raise SystemExit(f"callvault: {name} differs")

            out = Path(tmp) / "sequential"
            out.mkdir()
            began = time.perf_counter()
            count = sequential(sim, since, until, out)
            sequential_s = time.perf_counter() - began
            if count != len(names) or any(
                hashlib.sha256((out / name).read_bytes()).hexdigest() != sim.recording_sha256(name)
                for name in names
            ):
                raise SystemExit("sequential: wrong result")
    print(f"recordings={len(names)} delay_ms={args.delay * 1000:.0f} workers={args.workers}")
    print(
        f"callvault_s={callvault_s:.1f} sequential_s={sequential_s:.1f} "
        f"speedup={sequential_s / callvault_s:.2f}"
    )


if __name__ == "__main__":
    main()
