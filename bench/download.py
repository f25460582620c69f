"""Benchmark: download one large recording with `callvault fetch` and with curl.

Starts the simulator in this process (HTTPS on 127.0.0.1, self-signed certificate), places
one call whose recording is SIZE_MB MiB (default 200), then RUNS times (default 5),
alternating which goes first, downloads it with both tools and checks the SHA-256 of what
each saved.

What is timed, per run:

- curl: its own ``-w '%{time_total}'``: connect, TLS handshake, GET, body written to disk
  (no fsync). The download URL's random is asked for by this script just before, outside
  curl's time.
- callvault: the ``seconds`` that ``callvault fetch --json`` prints for the recording:
  recording/get_random (its own connection and TLS handshake), a second connection and
  handshake for the GET, the checks (JSON error, RIFF/WAVE, Content-Length), SHA-256,
  fsync and the atomic rename. The login is done before, outside that time. So within the
  timed span callvault does more than curl: one more request and handshake, a hash and an
  fsync.

Both processes' whole wall times and CPU times (start to exit: interpreter start-up, login,
logout) are reported too, for information; they are not part of the ratio.

``throughput_ratio_vs_curl`` = callvault throughput / curl throughput, each taken from the
median of its runs (= median curl seconds / median callvault seconds).

``peak_rss_mb`` = the largest peak RSS (``ru_maxrss`` from ``wait4``) of the
``callvault fetch`` process over the runs. Every child is started by a tiny launcher that
forks and execs it: a child spawned straight from this process (Python spawns with vfork +
exec) would inherit this process's RSS high-water mark, which includes the in-process
simulator serving the recording and grows with its size.

The last line printed is ``throughput_ratio_vs_curl=<r> peak_rss_mb=<m>``.
Targets: r >= 0.90, m < 64 whatever the size.

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
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx

from callvault.simulator import Simulator, SimulatorConfig

# Runs argv[2:] as its child (fork + exec), waits for it, writes a JSON report to argv[1].
# It is started with -I -S so that the high-water mark the child starts from is this small
# interpreter's, not the benchmark's.
LAUNCHER = """
import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(sys.argv[1], "w") as report:
    json.dump({"exit": os.waitstatus_to_exitcode(status), "wall_s": wall,
               "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss}, report)
"""


@dataclass
class Run:
    stdout: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float


def run_launched(argv: list[str], env: dict[str, str], report: Path) -> Run:
    """Run a command through the launcher; fail loudly on a non-zero exit."""
    launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *argv]
    done = subprocess.run(launcher, env=env, capture_output=True, text=True, check=False)
    result = json.loads(report.read_text())
    report.unlink()
    if done.returncode != 0 or result["exit"] != 0:
        raise SystemExit(f"{Path(argv[0]).name} failed: {done.stderr.strip()}")
    return Run(done.stdout, result["wall_s"], result["cpu_s"], result["maxrss_kb"] / 1024)


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
        login = {"username": sim.username, "password": md5, "port": "0"}
        token_value = http.post(f"{api}/login", json=login).json()["token"]
        answer = http.post(
            f"{api}/recording/get_random", params={"token": token_value}, json={"recording": name}
        ).json()
    query = urllib.parse.urlencode(
        {"recording": name, "random": answer["random"], "token": token_value}
    )
    return f"{api}/recording/download?{query}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl is not installed: apt-get install curl")
    callvault = str(Path(sys.executable).with_name("callvault"))
    size = args.size_mb * 1024 * 1024

    callvault_s: list[float] = []
    callvault_wall: list[float] = []
    callvault_cpu: list[float] = []
    callvault_rss: list[float] = []
    curl_s: list[float] = []
    curl_wall: list[float] = []
    curl_cpu: list[float] = []
    curl_rss: list[float] = []
    with tempfile.TemporaryDirectory(prefix="callvault-bench-") as tmp:
        work = Path(tmp)
        report = work / "launcher.json"
        config = SimulatorConfig(password="bench-secret", data_dir=work / "pbx")
        with Simulator(config) as sim:
            cdr = sim.place_call(talk_seconds=1, size_bytes=size)
            name = cdr.recording
            assert name is not None
            expected = sim.recording_sha256(name)
            env = dict(os.environ, BENCH_PBX_PASSWORD=sim.password)
            fetch = [
                callvault, "fetch", "--json", "--pbx", sim.url, "--username", sim.username,
                "--password-env", "BENCH_PBX_PASSWORD", "--pin-sha256", str(sim.cert_sha256),
            ]  # fmt: skip

            def run_callvault(run: int) -> None:
                out = work / f"callvault-{run}"
                result = run_launched([*fetch, "--out", str(out), name], env, report)
                line = json.loads(result.stdout.strip().splitlines()[-1])
                saved = sha256_of(out / name)
                if line["size"] != size or line["sha256"] != expected or saved != expected:
                    raise SystemExit("callvault saved different bytes")
                callvault_s.append(float(line["seconds"]))
                callvault_wall.append(result.wall_s)
                callvault_cpu.append(result.cpu_s)
                callvault_rss.append(result.peak_rss_mb)
                shutil.rmtree(out)

            def run_curl(run: int) -> None:
                target = work / f"curl-{run}.wav"
                argv = [
                    curl, "-sS", "--fail", "--cacert", str(sim.ca_file), "-o", str(target),
                    "-w", "%{time_total}", curl_url(sim, name),
                ]  # fmt: skip
                result = run_launched(argv, env, report)
                if sha256_of(target) != expected:
                    raise SystemExit("curl saved different bytes")
                curl_s.append(float(result.stdout.strip()))
                curl_wall.append(result.wall_s)
                curl_cpu.append(result.cpu_s)
                curl_rss.append(result.peak_rss_mb)
                target.unlink()

            for run in range(args.runs):
                order = (run_callvault, run_curl) if run % 2 == 0 else (run_curl, run_callvault)
                for step in order:
                    step(run)

    mib = size / 2**20
    summary = {
        "size_mb": args.size_mb,
        "runs": args.runs,
        "callvault_median_s": round(median(callvault_s), 3),
        "curl_median_s": round(median(curl_s), 3),
        "callvault_mib_per_s": round(mib / median(callvault_s), 1),
        "curl_mib_per_s": round(mib / median(curl_s), 1),
        "callvault_runs_s": [round(s, 3) for s in callvault_s],
        "curl_runs_s": [round(s, 3) for s in curl_s],
        "callvault_process_wall_median_s": round(median(callvault_wall), 3),
        "curl_process_wall_median_s": round(median(curl_wall), 3),
        "callvault_process_cpu_median_s": round(median(callvault_cpu), 3),
        "curl_process_cpu_median_s": round(median(curl_cpu), 3),
        "callvault_peak_rss_runs_mb": [round(m, 1) for m in callvault_rss],
        "curl_peak_rss_max_mb": round(max(curl_rss), 1),
    }
    print(json.dumps(summary))
    ratio = median(curl_s) / median(callvault_s)
    print(f"throughput_ratio_vs_curl={ratio:.3f} peak_rss_mb={max(callvault_rss):.1f}")


if __name__ == "__main__":
    main()
