"""`serve` archiving into an S3 bucket (a real S3 API server process, see support.s3),
then `callvault verify` reading it: by the checksum recorded at upload (nothing is
downloaded), or with --deep by reading every object back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from callvault.archive import Archiver
from callvault.cli import _register, app
from callvault.simulator import Simulator
from support.archive import archiver_config, states, wait_until
from support.s3 import S3Server

_register()


def test_serve_archives_into_a_bucket_and_verify_reads_it(
    events_sim: Simulator,
    s3_server: S3Server,
    tmp_path: Path,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = events_sim
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)  # the standard AWS ways, read by boto3 itself
    bucket = s3_server.new_bucket()
    archive = tmp_path / "archive"  # local: the staging area (and the SQLite index)
    url = f"s3://{bucket}/recordings"
    with Archiver(archiver_config(sim, archive, db_url=db_url, storage_url=url)) as archiver:
        index = archiver.index
        assert index is not None
        cdrs = [sim.place_call(talk_seconds=2) for _ in range(3)]
        assert wait_until(lambda: states(index) == {"archived": 3}), states(index)
        rows = [index.recordings.by_name(cdr.recording or "") for cdr in cdrs]
    client = s3_server.client()
    for cdr, row in zip(cdrs, rows, strict=True):
        assert row is not None and cdr.recording is not None and row.storage_key is not None
        assert row.storage_key.startswith(f"{sim.serial}/")
        body = client.get_object(Bucket=bucket, Key=f"recordings/{row.storage_key}")["Body"]
        data = body.read()
        assert hashlib.sha256(data).hexdigest() == row.sha256 == sim.recording_sha256(cdr.recording)
    # Nothing of the recordings stays on local disk.
    assert [p for p in archive.rglob("*.wav")] == []

    runner = CliRunner()
    common = ["--json", "--archive", str(archive), "--db", db_url, "--storage", url]
    report = json.loads(runner.invoke(app, ["verify", *common]).stdout)
    assert (report["checked"], report["ok"], report["unindexed"]) == (3, 3, [])

    # Someone replaces an object's bytes (same size) and keeps its metadata: only --deep,
    # which downloads and hashes, can tell; a removed object is missing either way.
    first, second = rows[0], rows[1]
    assert first is not None and second is not None
    assert first.storage_key is not None and second.storage_key is not None
    key = f"recordings/{first.storage_key}"
    head = client.head_object(Bucket=bucket, Key=key)
    forged = b"RIFF" + bytes(head["ContentLength"] - 4)
    client.put_object(Bucket=bucket, Key=key, Body=forged, Metadata=head["Metadata"])
    client.delete_object(Bucket=bucket, Key=f"recordings/{second.storage_key}")
    shallow = runner.invoke(app, ["verify", *common])
    assert shallow.exit_code == 1
    report = json.loads(shallow.stdout)
    assert [m["name"] for m in report["missing"]] == [second.name]
    assert report["mismatched"] == []
    deep = runner.invoke(app, ["verify", "--deep", *common])
    assert deep.exit_code == 1
    report = json.loads(deep.stdout)
    assert [m["name"] for m in report["mismatched"]] == [first.name]
    assert [m["name"] for m in report["missing"]] == [second.name]


def test_a_bad_storage_url_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["status", "--archive", str(tmp_path), "--storage", "ftp://nowhere"]
    )
    assert result.exit_code == 2
    assert "is not a storage URL: give file:///DIRECTORY or s3://BUCKET/PREFIX" in result.stderr
    assert "Traceback" not in result.stderr
