"""`callvault storage migrate`: a local archive copied into a bucket of the S3 server
(support.s3), checked, resumable, then the index switched over: every command finds the
recordings there without --storage, and refuses a --storage that names another place."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from callvault.cli import _register, app
from callvault.index import SettingKey, audit, open_index
from support.s3 import S3Server
from support.web import build_archive

_register()


@pytest.fixture
def local_archive(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """The standard web-test archive (SQLite, recordings in the directory): key -> bytes
    of every archived recording."""
    root = tmp_path / "archive"
    root.mkdir()
    archive = build_archive(root)
    try:
        files = {}
        for row in archive.index.recordings.archived():
            assert row.storage_key is not None
            files[row.storage_key] = archive.audio[row.id]
    finally:
        archive.index.close()
    assert len(files) >= 3
    return root, files


def test_an_archive_moves_into_a_bucket_verified_and_resumable(
    local_archive: tuple[Path, dict[str, bytes]],
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, files = local_archive
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/calls"
    runner = CliRunner()
    base = ["--archive", str(root)]

    # One file has gone missing from the directory: the rest is copied, nothing switched.
    lost_key = sorted(files)[0]
    lost = root / lost_key
    saved = lost.read_bytes()
    lost.unlink()
    first = runner.invoke(app, ["storage", "migrate", "--to", url, "--json", *base])
    assert first.exit_code == 1, first.output
    report = json.loads(first.stdout)
    assert report["copied"] == len(files) - 1 and not report["switched"]
    assert [f["storage_key"] for f in report["failed"]] == [lost_key]
    assert report["failed"][0]["error"] == "missing from the archive's storage"
    with open_index(f"sqlite:///{root / 'callvault.db'}") as index:
        assert index.settings.get(SettingKey.STORAGE_URL) is None

    # Put back, run again: only that one is copied, and the index switches over.
    lost.write_bytes(saved)
    second = runner.invoke(app, ["storage", "migrate", "--to", url, *base])
    assert second.exit_code == 0, second.output
    assert f"{len(files)} recordings: 1 copied, {len(files) - 1} already in {url}" in second.stdout
    assert "switched" in second.stdout
    client = s3_server.client()
    for key, data in files.items():
        body = client.get_object(Bucket=bucket, Key=f"calls/{key}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()
    with open_index(f"sqlite:///{root / 'callvault.db'}") as index:
        assert index.settings.get(SettingKey.STORAGE_URL) == url
        entries = index.audit.query(audit.AuditFilter(action=audit.STORAGE_MIGRATE), limit=5)
        assert [e.detail.rsplit("; ", 1)[1] for e in entries] == ["switched", "not switched"]
        assert {e.target for e in entries} == {url}

    # From now on the bucket is where commands look, with no --storage: even with the
    # local files gone.
    for key in files:
        (root / key).unlink()
    verified = runner.invoke(app, ["verify", "--json", *base])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["ok"] == len(files)
    status = json.loads(runner.invoke(app, ["status", "--json", *base]).stdout)
    assert status["archive"] == url
    other = runner.invoke(app, ["status", *base, "--storage", f"file://{root}"])
    assert other.exit_code == 1
    assert f"the recordings of this archive are in {url}" in other.stderr
    again = runner.invoke(app, ["storage", "migrate", "--to", url, *base])
    assert again.exit_code == 2 and "already" in again.stderr


def test_migrating_while_serve_runs_is_refused(
    local_archive: tuple[Path, dict[str, bytes]], s3_server: S3Server
) -> None:
    root, _files = local_archive
    with open_index(f"sqlite:///{root / 'callvault.db'}") as index:
        index.processes.register(
            node="site-1", kind="serve", hostname="h", pid=1, workers=2, now=datetime.now(UTC)
        )
    url = f"s3://{s3_server.new_bucket()}"
    result = CliRunner(env=s3_server.env()).invoke(
        app, ["storage", "migrate", "--to", url, "--archive", str(root)]
    )
    assert result.exit_code == 1
    assert "serve is running (node site-1): stop it on every node first" in result.stderr
    assert s3_server.client().list_objects_v2(Bucket=url[5:]).get("KeyCount") == 0
