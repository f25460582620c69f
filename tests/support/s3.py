"""A real S3 API server process on 127.0.0.1 for the tests: moto's server mode.

moto is the S3 implementation on PyPI that runs here as a server of its own (MinIO and
Ceph are not on PyPI or Debian's packages); it speaks the S3 REST API over HTTP, with
multipart uploads, ranged GETs, metadata and checksums. It does NOT check the checksum a
client sends (a wrong ``x-amz-checksum-sha256`` is stored as if right), which AWS S3,
MinIO and Ceph do: the tests can show that callvault sends it, and that callvault's own
check after the upload catches an object that is not what was sent, but not the server's
refusal. The fixture `s3_server` starts one server per test session (a free port), and
`s3_storage` gives each test a bucket of its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from callvault.storage import S3Storage

ACCESS_KEY = "callvault-test"
SECRET_KEY = "callvault-test-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client (boto3, callvault) at it."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def new_bucket(self, *, object_lock: str | None = None) -> str:
        """A new bucket; with `object_lock` ("GOVERNANCE" or "COMPLIANCE"), made with
        Object Lock enabled and that default retention mode."""
        name = f"callvault-{uuid.uuid4().hex[:12]}"
        client = self.client()
        if object_lock is None:
            client.create_bucket(Bucket=name)
            return name
        client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
        client.put_object_lock_configuration(
            Bucket=name,
            ObjectLockConfiguration={
                "ObjectLockEnabled": "Enabled",
                "Rule": {"DefaultRetention": {"Mode": object_lock, "Days": 1}},
            },
        )
        return name


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server as a separate process on 127.0.0.1, for the whole session."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("s3") / "moto.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    log.close()
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the S3 server (moto) exited at start: {process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the S3 server (moto) did not start in 30 s") from None
                time.sleep(0.1)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_storage(s3_server: S3Server, tmp_path: Path) -> S3Storage:
    """An S3Storage on a new, empty bucket of the test's own (key prefix ``archive``)."""
    work = tmp_path / "work"
    work.mkdir()
    return S3Storage(s3_server.new_bucket(), "archive", work_dir=work, client=s3_server.client())
