"""Benchmark: the S3 client libraries callvault could use for `--storage s3://`.

Starts moto's S3 server (the one the tests use) as a process on 127.0.0.1, makes a file
of SIZE_MB MiB (default 256), then for each library, RUNS times (default 3), in a child
process of its own:

- uploads the file in 16 MiB parts, with an SHA-256 checksum per request (boto3:
  ``ChecksumAlgorithm``, seen in the request headers; obstore: ``checksum_algorithm``,
  configured, but its requests cannot be watched from Python);
- reads 100 ranges of 64 KiB at random offsets (a player seeking);

and reports the median upload time, the median ranged read, the child's peak RSS (what
"constant memory" means: it must not grow with the file) and whether the checksum header
went out.

Libraries: boto3 (sync, with s3transfer's threads for the parts) and obstore (Rust,
async), if installed (``pip install obstore``; it is not a callvault dependency). The
server is moto, which is Python: the times say how much each client adds on top of a slow
server, not what AWS S3 would do. The decision in docs/operating.md rests on memory,
checksums and API fit as much as on these times.

    python bench/s3_clients.py [--size-mb 256] [--runs 3]

The last line printed is ``boto3_upload_s= boto3_range_ms= boto3_peak_rss_mb= ...`` with
the same three for obstore when it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PART = 16 * 1024 * 1024
ACCESS, SECRET = "bench", "bench-secret"

_CHILD = r"""
import base64, hashlib, json, os, random, resource, sys, time
library, endpoint, bucket, path, part = sys.argv[1:6]
part = int(part)
size = os.path.getsize(path)
key = f"bench/{library}-{time.time_ns()}.wav"
sent_checksum = False
if library == "boto3":
    import boto3
    from boto3.s3.transfer import TransferConfig
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
        aws_secret_access_key="bench-secret", region_name="us-east-1")
    def note(request, **_):
        global sent_checksum
        if "x-amz-checksum-sha256" in {k.lower() for k in request.headers}:
            sent_checksum = True
    client.meta.events.register("before-send.s3.*", note)
    started = time.perf_counter()
    transfer = TransferConfig(
        multipart_threshold=part, multipart_chunksize=part, max_concurrency=4)
    client.upload_file(path, bucket, key, ExtraArgs={"ChecksumAlgorithm": "SHA256"},
        Config=transfer)
    upload = time.perf_counter() - started
    def read(start, length):
        answer = client.get_object(
            Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
        return answer["Body"].read()
else:
    import obstore
    from obstore.store import S3Store
    store = S3Store(bucket, endpoint=endpoint, access_key_id="bench",
        secret_access_key="bench-secret", region="us-east-1", checksum_algorithm="SHA256",
        client_options={"allow_http": True})
    sent_checksum = None  # configured; its requests cannot be watched from Python
    started = time.perf_counter()
    with open(path, "rb") as handle:
        obstore.put(store, key, handle, chunk_size=part, max_concurrency=4)
    upload = time.perf_counter() - started
    def read(start, length):
        return bytes(obstore.get_range(store, key, start=start, length=length))
rng = random.Random(7)
times = []
for _ in range(100):
    start = rng.randrange(0, size - 65536)
    t = time.perf_counter()
    data = read(start, 65536)
    times.append(time.perf_counter() - t)
    assert len(data) == 65536
times.sort()
print(json.dumps({"upload_s": upload, "range_ms": times[50] * 1000,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "checksum_sent": sent_checksum}))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _available(library: str) -> bool:
    try:
        __import__(library)
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import boto3

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=ACCESS,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        ).create_bucket(Bucket="callvault-bench")
        with tempfile.TemporaryDirectory() as work:
            path = Path(work) / "big.wav"
            with path.open("wb") as out:
                for _ in range(args.size_mb):
                    out.write(os.urandom(1024 * 1024))
            results: dict[str, dict[str, float]] = {}
            for library in ("boto3", "obstore"):
                if not _available(library):
                    print(f"{library}: not installed, skipped", file=sys.stderr)
                    continue
                runs = []
                for _ in range(args.runs):
                    child = subprocess.run(
                        [
                            sys.executable,
                            "-c",
                            _CHILD,
                            library,
                            endpoint,
                            "callvault-bench",
                            str(path),
                            str(PART),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                        env=env,
                    )
                    runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
                results[library] = {
                    "upload_s": statistics.median(r["upload_s"] for r in runs),
                    "range_ms": statistics.median(r["range_ms"] for r in runs),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                    "checksum_sent": float(all(r["checksum_sent"] is not False for r in runs)),
                }
                print(f"{library}: {results[library]}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(10)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"size_mb={args.size_mb} runs={args.runs} (this script's own peak RSS {own:.0f} MB)")
    print(
        " ".join(
            f"{library}_{name}={value:.3g}"
            for library, figures in results.items()
            for name, value in figures.items()
            if name != "checksum_sent"
        )
    )


if __name__ == "__main__":
    main()
