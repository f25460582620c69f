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

The encrypted run (encryption at rest, ``serve --encrypt``) times, in a child process of
its own, what an archiver's worker does for the same recording with encryption on: the
worker pool of `callvault.archive` with a real client, a directory storage and a SQLite
index, its ``Archived.seconds``: reserving the storage key, sealing and reserving the data
key, get_random, the GET with the body encrypted as it arrives (AES-256-GCM segments; the
checks and SHA-256 on the plaintext, a second SHA-256 on the ciphertext), fsync, storing it
and marking it archived (with its audit entry). The login is done before. What it stored
is then decrypted (outside the time) and its SHA-256 checked. ``encrypted_ratio_vs_curl``
= median curl seconds / median encrypted-worker seconds.

The last lines printed are ``throughput_ratio_vs_curl=<r> peak_rss_mb=<m>`` and
``encrypted_ratio_vs_curl=<e>``.
Targets: r >= 0.90, m < 64 whatever the size; e >= 0.85.

With ``--kind p-series`` the same is measured against the P-Series simulator (OpenAPI,
HTTPS on 127.0.0.1): ``callvault fetch --kind p-series`` (the Client ID as ``--username``,
the Client Secret in the password variable) and the encrypted worker with a
``PSeriesClient``. callvault's timed span then holds ``recording/download?file=`` (its own
connection and TLS handshake) instead of get_random, then the file GET on a second
connection; the access token is had before (``get_token``), outside the time. For curl
this script asks ``get_token`` and ``recording/download`` itself (``User-Agent:
OpenAPI``), outside curl's time, hands curl the file URL with the token, and revokes the
token (``del_token``) after the run: the simulator allows 8 live tokens per app. The
summary then also says ``"kind": "p-series"``; the last lines are the same.

    python bench/download.py [--size-mb 200] [--runs 5] [--kind s-series|p-series]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from callvault.simulator import PSeriesConfig, PSeriesSimulator, Simulator, SimulatorConfig

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


# The encrypted run: argv = recording name, PBX URL, user, certificate pin, work directory
# and, optionally, the kind (s-series, the default, or p-series: the user is the Client ID,
# the password the Client Secret); the password in BENCH_PBX_PASSWORD, the master key in
# CALLVAULT_MASTER_KEY. Prints JSON.
ENCRYPTED_RUN = """
import asyncio, hashlib, json, os, sys
from datetime import UTC, datetime
from pathlib import Path
from callvault import cipher
from callvault.archive import WorkerPool
from callvault.index import open_index
from callvault.keys import load_keyring, recording_context
from callvault.pbx import CallDetail, PbxClient, PSeriesClient, TlsOptions
from callvault.storage import LocalStorage

name, url, user, pin, work = sys.argv[1:6]
kind = sys.argv[6] if len(sys.argv) > 6 else "s-series"
keyring = load_keyring(None)
index = open_index(f"sqlite:///{work}/callvault.db", create=True)
storage = LocalStorage(Path(work))
cdr = CallDetail(callid="bench", timestart="2026-01-01 10:00:00", callfrom="1001",
                 callto="1002", callduration=10, talkduration=5, status="ANSWERED",
                 type="Internal", recording=name, sn="bench")
index.calls.record([cdr], source="event", tz=UTC, now=datetime.now(UTC))
done = []

async def main():
    make = PSeriesClient if kind == "p-series" else PbxClient
    client = make(url, user, os.environ["BENCH_PBX_PASSWORD"], tls=TlsOptions(pin_sha256=pin))
    async with client:
        await client.login()
        stop = asyncio.Event()
        def archived(item):
            done.append(item)
            stop.set()
        pool = WorkerPool(index=index, storage=storage, client=client, session=None, tz=UTC,
                          workers=1, poll_interval_s=0.05, on_archived=archived,
                          keyring=keyring, encrypt=True)
        await pool.run(stop, grace_s=30)

asyncio.run(main())
row = index.recordings.by_name(name)
data_key = keyring.open(row.data_key, recording_context(row.id))
digest = hashlib.sha256()
path = storage.local_path(row.storage_key)
with path.open("rb") as handle:
    for chunk in cipher.decrypt_file(data_key, handle, path.stat().st_size,
                                     cipher.recording_associated_data(row.id)):
        digest.update(chunk)
print(json.dumps({"seconds": done[0].seconds, "size": row.size, "sha256": row.sha256,
                  "decrypted_sha256": digest.hexdigest(),
                  "stored_size": path.stat().st_size}))
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


PSERIES_API = "/openapi/v1.0"
PSERIES_HEADERS = {"User-Agent": "OpenAPI"}  # the OpenAPI refuses a request without one


def pseries_answer(response: httpx.Response) -> dict:
    document = response.json()
    if document.get("errcode") != 0:
        raise SystemExit(f"the P-Series simulator answered errcode {document.get('errcode')}")
    return document


@contextmanager
def pseries_curl_url(sim: PSeriesSimulator, name: str) -> Iterator[str]:
    """Get a token and the recording's file URL with plain HTTP calls, as any script would;
    revoke the token when done (8 live tokens per app on the simulator)."""
    api = f"{sim.url}{PSERIES_API}"
    with httpx.Client(verify=str(sim.ca_file), timeout=30, headers=PSERIES_HEADERS) as http:
        secret = {"username": sim.client_id, "password": sim.client_secret}
        token_value = pseries_answer(http.post(f"{api}/get_token", json=secret))["access_token"]
        try:
            answer = pseries_answer(
                http.get(
                    f"{api}/recording/download",
                    params={"file": name, "access_token": token_value},
                )
            )
            query = urllib.parse.urlencode({"access_token": token_value})
            yield f"{sim.url}{answer['download_resource_url']}?{query}"
        finally:
            http.get(f"{api}/del_token", params={"access_token": token_value})


@dataclass
class Pbx:
    """The simulated PBX of one kind, with what the runs need of it."""

    kind: str
    url: str
    user: str
    password: str
    ca_file: Path
    pin: str
    name: str
    expected: str
    curl_url: Callable[[], contextlib.AbstractContextManager[str]]


@contextmanager
def simulated_pbx(kind: str, work: Path, size: int) -> Iterator[Pbx]:
    """The simulator of `kind` in this process, holding one recording of `size` bytes."""
    if kind == "p-series":
        with PSeriesSimulator(PSeriesConfig(data_dir=work / "pbx")) as psim:
            call = psim.place_call(talk_seconds=1, size_bytes=size)
            assert call.file is not None and psim.ca_file is not None
            pname = call.file
            yield Pbx(
                kind, psim.url, psim.client_id, psim.client_secret, psim.ca_file,
                str(psim.cert_sha256), pname, psim.recording_sha256(pname),
                lambda: pseries_curl_url(psim, pname),
            )  # fmt: skip
        return
    config = SimulatorConfig(password="bench-secret", data_dir=work / "pbx")
    with Simulator(config) as sim:
        cdr = sim.place_call(talk_seconds=1, size_bytes=size)
        name = cdr.recording
        assert name is not None
        yield Pbx(
            kind, sim.url, sim.username, sim.password, sim.ca_file, str(sim.cert_sha256),
            name, sim.recording_sha256(name),
            lambda: contextlib.nullcontext(curl_url(sim, name)),
        )  # fmt: skip


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kind", choices=("s-series", "p-series"), default="s-series")
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
    encrypted_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="callvault-bench-") as tmp:
        work = Path(tmp)
        report = work / "launcher.json"
        with simulated_pbx(args.kind, work, size) as pbx:
            name = pbx.name
            expected = pbx.expected
            env = dict(os.environ, BENCH_PBX_PASSWORD=pbx.password)
            fetch = [
                callvault, "fetch", "--json", "--pbx", pbx.url, "--username", pbx.user,
                "--password-env", "BENCH_PBX_PASSWORD", "--pin-sha256", pbx.pin,
            ]  # fmt: skip
            if args.kind != "s-series":
                fetch[2:2] = ["--kind", args.kind]

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
                with pbx.curl_url() as url:
                    argv = [
                        curl, "-sS", "--fail", "--cacert", str(pbx.ca_file), "-o", str(target),
                        "-w", "%{time_total}", url,
                    ]  # fmt: skip
                    result = run_launched(argv, env, report)
                if sha256_of(target) != expected:
                    raise SystemExit("curl saved different bytes")
                curl_s.append(float(result.stdout.strip()))
                curl_wall.append(result.wall_s)
                curl_cpu.append(result.cpu_s)
                curl_rss.append(result.peak_rss_mb)
                target.unlink()

            from callvault.keys import MasterKey

            encrypted_env = dict(env, CALLVAULT_MASTER_KEY=MasterKey.generate().encoded())

            def run_encrypted(run: int) -> None:
                out = work / f"encrypted-{run}"
                out.mkdir()
                argv = [
                    sys.executable, "-c", ENCRYPTED_RUN, name, pbx.url, pbx.user, pbx.pin,
                    str(out),
                ]  # fmt: skip
                if args.kind != "s-series":
                    argv.append(args.kind)
                result = run_launched(argv, encrypted_env, report)
                line = json.loads(result.stdout.strip().splitlines()[-1])
                if (
                    line["size"] != size
                    or line["sha256"] != expected
                    or line["decrypted_sha256"] != expected
                    or line["stored_size"] == size
                ):
                    raise SystemExit("the encrypted run stored different bytes")
                encrypted_s.append(float(line["seconds"]))
                shutil.rmtree(out)

            for run in range(args.runs):
                order = (run_callvault, run_curl) if run % 2 == 0 else (run_curl, run_callvault)
                for step in (*order, run_encrypted):
                    step(run)

    mib = size / 2**20
    summary = {
        **({"kind": args.kind} if args.kind != "s-series" else {}),
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
        "encrypted_median_s": round(median(encrypted_s), 3),
        "encrypted_mib_per_s": round(mib / median(encrypted_s), 1),
        "encrypted_runs_s": [round(s, 3) for s in encrypted_s],
    }
    print(json.dumps(summary))
    ratio = median(curl_s) / median(callvault_s)
    print(f"throughput_ratio_vs_curl={ratio:.3f} peak_rss_mb={max(callvault_rss):.1f}")
    print(f"encrypted_ratio_vs_curl={median(curl_s) / median(encrypted_s):.3f}")


if __name__ == "__main__":
    main()
