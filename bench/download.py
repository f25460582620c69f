"""Benchmark: download one large recording with `callvault fetch` and with curl.

Starts the simulator in this process (HTTPS on 127.0.0.1), places one call whose
recording is SIZE_MB (default 200) megabytes, then alternates RUNS times:

- `callvault fetch` in a subprocess (login, get_random, GET, checks, fsync, rename), and
- `curl` fetching the same download URL with a random this script asked for just before,

each timed from process start to exit, each child's peak RSS read from wait4(). Both sides
trust the simulator's certificate (callvault by pinning it, curl with --cacert).

The last line is `throughput_ratio_vs_curl=<median curl s / median callvault s>
peak_rss_mb=<max callvault peak RSS>`. Targets: ratio >= 0.90, peak RSS < 64 MB.

    python bench/download.py [--size-mb 200] [--runs 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx

from callvault.simulator import Simulator, SimulatorConfig


def run_timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run a command; return (seconds, peak RSS in MB). Fails loudly on a non-zero exit."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[0]} failed: {stderr.strip()}")
    return elapsed, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def curl_url(sim: Simulator, name: str) -> str:
    """Log in and get a fresh random with plain HTTP calls, as any script would."""
    api = f"{sim.url}/api/v1.1.0"
    with httpx.Client(verify=str(sim.ca_file), timeout=30) as http:
        md5 = hashlib.md5(sim.password.encode()).hexdigest()
        login = {"username": sim.username, "password": md5, "port": "8260"}
        token_value = http.post(f"{api}/login", json=login).json()["token"]
        answer = http.post(
            f"{api}/recording/get_random", params={"token": token_value}, json={"recording": name}
        ).json()
    query = urllib.parse.urlencode(
        {"recording": name, "random": answer["random"], "token": token_value}
    )
    return f"{api}/recording/download?{query}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl is not installed: apt-get install curl")
    callvault = str(Path(sys.executable).with_name("callvault"))

    with tempfile.TemporaryDirectory(prefix="callvault-bench-") as tmp:
        work = Path(tmp)
        config = SimulatorConfig(password="bench-secret", data_dir=work / "pbx")
        with Simulator(config) as sim:
            cdr = sim.place_call(talk_seconds=1, size_bytes=args.size_mb * 1024 * 1024)
            name = cdr.recording
            assert name is not None
            expected = sim.recording_sha256(name)
            env = dict(os.environ, BENCH_PBX_PASSWORD=sim.password)
            fetch = [
                callvault, "fetch", "--pbx", sim.url, "--username", sim.username,
                "--password-env", "BENCH_PBX_PASSWORD", "--pin-sha256", str(sim.cert_sha256),
            ]
            callvault_s: list[float] = []
            curl_s: list[float] = []
            peak_rss: list[float] = []
            for run in range(args.runs):
                out = work / f"callvault-{run}"
                seconds, rss = run_timed([*fetch, "--out", str(out), name], env)
                if sha256_of(out / name) != expected:
                    raise SystemExit("callvault saved different bytes")
                callvault_s.append(seconds)
                peak_rss.append(rss)
                shutil.rmtree(out)

                target = work / f"curl-{run}.wav"
                url = curl_url(sim, name)
                seconds, _ = run_timed(
                    [curl, "-sS", "--fail", "--cacert", str(sim.ca_file), "-o", str(target), url],
                    env,
                )
                if sha256_of(target) != expected:
                    raise SystemExit("curl saved different bytes")
                curl_s.append(seconds)
                target.unlink()

    size = args.size_mb
    report = {
        "size_mb": size,
        "runs": args.runs,
        "callvault_median_s": round(statistics.median(callvault_s), 3),
        "curl_median_s": round(statistics.median(curl_s), 3),
        "callvault_mb_per_s": round(size / statistics.median(callvault_s), 1),
        "curl_mb_per_s": round(size / statistics.median(curl_s), 1),
        "callvault_runs_s": [round(s, 3) for s in callvault_s],
        "curl_runs_s": [round(s, 3) for s in curl_s],
    }
    print(json.dumps(report))
    ratio = statistics.median(curl_s) / statistics.median(callvault_s)
    print(f"throughput_ratio_vs_curl={ratio:.3f} peak_rss_mb={max(peak_rss):.1f}")


if __name__ == "__main__":
    main()
