"""The storage contract, run against each backend: `LocalStorage` on a directory and
`S3Storage` on a bucket of a real S3 API server process (moto, see support.s3). Then what
only S3 has: multipart uploads, the checksum sent with every upload, one-line errors."""

from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest

from callvault.storage import (
    ConflictError,
    LocalStorage,
    S3Storage,
    Storage,
    StorageError,
    UnsafeNameError,
    open_storage_url,
    parse_storage_url,
)
from support.s3 import S3Server

KEY = "SN1/2024/05/01/20240501120000-1714564800.1-1001-1002-Internal.wav"
AUDIO = b"RIFF" + bytes(range(256)) * 40


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "archive")
    s3: S3Storage = request.getfixturevalue("s3_storage")
    return s3


def staged(storage: Any, data: bytes, name: str = "dl.part") -> Path:
    area = storage.open_staging("test")
    path = Path(area.path) / name
    path.write_bytes(data)
    return path


def test_each_backend_is_a_storage(storage: Storage) -> None:
    assert isinstance(storage, Storage)


def test_a_put_file_is_stored_whole_and_read_back(storage: Storage) -> None:
    src = staged(storage, AUDIO)
    stored = storage.put_file(KEY, src)
    assert (stored.key, stored.size) == (KEY, len(AUDIO))
    # Without the caller's hash, a storage that keeps one computes it; a directory does not.
    digest = hashlib.sha256(AUDIO).hexdigest()
    assert stored.sha256 == (digest if storage.keeps_sha256 else None)
    assert not src.exists()  # consumed
    with storage.open(KEY) as handle:
        assert handle.read() == AUDIO
    stat = storage.stat(KEY)
    assert stat is not None and stat.size == len(AUDIO) and stat.sha256 is None
    again = storage.checksum(KEY)
    assert (again.size, again.sha256) == (len(AUDIO), digest)


def test_same_bytes_again_change_nothing_and_other_bytes_conflict(storage: Storage) -> None:
    storage.put_file(KEY, staged(storage, AUDIO))
    same = staged(storage, AUDIO, "again.part")
    assert storage.put_file(KEY, same).sha256 == hashlib.sha256(AUDIO).hexdigest()
    assert not same.exists()
    other = staged(storage, AUDIO + b"x", "other.part")
    with pytest.raises(ConflictError, match="different bytes"):
        storage.put_file(KEY, other)
    assert other.exists()  # left alone
    with storage.open(KEY) as handle:
        assert handle.read() == AUDIO


@pytest.mark.parametrize(("start", "length"), [(0, 4), (100, 1000), (len(AUDIO) - 10, 10), (7, 0)])
def test_a_range_reads_exactly_those_bytes(storage: Storage, start: int, length: int) -> None:
    storage.put(KEY, io.BytesIO(AUDIO))
    with storage.open_range(KEY, start, length) as handle:
        assert handle.read() == AUDIO[start : start + length]


def test_missing_objects_are_file_not_found(storage: Storage) -> None:
    assert storage.stat(KEY) is None
    for read in (storage.open, storage.checksum, storage.recorded_checksum):
        with pytest.raises(FileNotFoundError):
            read(KEY)
    with pytest.raises(FileNotFoundError):
        storage.open_range(KEY, 0, 10)
    assert storage.delete(KEY) is False


def test_list_and_delete(storage: Storage) -> None:
    keys = [f"SN{n}/2024/05/0{n}/rec-{n}.wav" for n in (2, 1, 3)]
    for key in keys:
        storage.put(key, io.BytesIO(AUDIO))
    assert list(storage.list()) == sorted(keys)
    assert list(storage.list("SN1/")) == ["SN1/2024/05/01/rec-1.wav"]
    assert storage.delete(keys[0]) is True
    assert storage.stat(keys[0]) is None
    assert list(storage.list()) == sorted(keys[1:])


def test_unsafe_keys_are_refused(storage: Storage) -> None:
    for bad in ("../x.wav", "a/../../b.wav", "", "/abs.wav"):
        with pytest.raises(UnsafeNameError):
            storage.put(bad, io.BytesIO(AUDIO))


def test_where_it_is_and_that_it_can_be_used(storage: Storage) -> None:
    storage.put(KEY, io.BytesIO(AUDIO))
    assert storage.check() is None
    assert KEY in storage.locate(KEY)
    assert storage.describe() in storage.locate(KEY)


def test_the_checksum_recorded_at_upload_is_read_without_the_bytes(storage: Storage) -> None:
    storage.put(KEY, io.BytesIO(AUDIO))
    recorded = storage.recorded_checksum(KEY)
    if isinstance(storage, LocalStorage):
        assert recorded is None  # a file keeps none: verify reads it
    else:
        assert recorded is not None
        assert (recorded.size, recorded.sha256) == (len(AUDIO), hashlib.sha256(AUDIO).hexdigest())


# -- S3 only ----------------------------------------------------------------------------


def test_a_large_recording_goes_up_in_parts_and_comes_back_whole(
    s3_server: S3Server, tmp_path: Path
) -> None:
    part = 5 * 1024 * 1024  # S3's smallest part
    storage = S3Storage(
        s3_server.new_bucket(), "", work_dir=tmp_path, client=s3_server.client(), part_size=part
    )
    data = os.urandom(2 * part + 12345)
    stored = storage.put_file(KEY, staged(storage, data))
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    head = s3_server.client().head_object(Bucket=storage.bucket, Key=KEY)
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert storage.checksum(KEY).sha256 == stored.sha256
    with storage.open_range(KEY, part - 5, 10) as handle:
        assert handle.read() == data[part - 5 : part + 5]


def test_every_upload_carries_a_sha256_checksum_for_the_server(
    s3_storage: S3Storage, tmp_path: Path
) -> None:
    sent: list[dict[str, str]] = []

    def note(request: Any, **_kwargs: Any) -> None:
        if request.method == "PUT":
            sent.append({k.lower(): str(v) for k, v in request.headers.items()})

    client = s3_storage.client
    client.meta.events.register("before-send.s3.*", note)
    s3_storage.put(KEY, io.BytesIO(AUDIO))
    [put] = sent
    expected = base64.b64encode(hashlib.sha256(AUDIO).digest()).decode()
    if "x-amz-checksum-sha256" in put:  # in the headers
        assert expected in put["x-amz-checksum-sha256"], put
    else:  # or announced as a trailer of the streamed body
        assert "x-amz-checksum-sha256" in put.get("x-amz-trailer", ""), put


def test_an_upload_the_bucket_does_not_hold_as_sent_is_an_error(
    s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """callvault's own check after the upload: the object's size and recorded SHA-256
    must be what was sent (here the upload is made to store other bytes)."""
    client = s3_storage.client
    real_upload = client.upload_file

    def corrupting(filename: str, bucket: str, key: str, **kwargs: Any) -> None:
        Path(filename).write_bytes(AUDIO[:-1])
        real_upload(filename, bucket, key, **{**kwargs, "ExtraArgs": {}})

    monkeypatch.setattr(client, "upload_file", corrupting)
    src = staged(s3_storage, AUDIO)
    with pytest.raises(StorageError, match="does not hold what was sent"):
        s3_storage.put_file(KEY, src, sha256=hashlib.sha256(AUDIO).hexdigest())
    assert src.exists()  # kept for the next attempt


def test_a_bucket_that_cannot_be_used_is_one_line(s3_server: S3Server, tmp_path: Path) -> None:
    missing = S3Storage("no-such-bucket-here", work_dir=tmp_path, client=s3_server.client())
    assert missing.check() == "the bucket no-such-bucket-here does not exist"
    import boto3
    from botocore.config import Config

    away = S3Storage(
        "x-bucket",
        work_dir=tmp_path,
        client=boto3.client(
            "s3",
            endpoint_url="http://127.0.0.1:9",
            aws_access_key_id="a",
            aws_secret_access_key="b",
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2),
        ),
    )
    problem = away.check()
    assert problem is not None and "\n" not in problem and "s3://x-bucket" in problem
    with pytest.raises(StorageError) as info:
        away.put(KEY, io.BytesIO(AUDIO))
    assert "\n" not in str(info.value)


def test_storage_urls(tmp_path: Path) -> None:
    assert parse_storage_url("s3://bucket/some/prefix/") == ("s3", "bucket", "some/prefix")
    assert parse_storage_url("file:///srv/callvault") == ("file", "/srv/callvault", "")
    for bad in ("s3:///x", "ftp://x", "/srv/callvault", "file://host/x", "s3://b/../x"):
        with pytest.raises(ValueError):
            parse_storage_url(bad)
    assert isinstance(open_storage_url(None, tmp_path), LocalStorage)
    elsewhere = open_storage_url(f"file://{tmp_path / 'elsewhere'}", tmp_path)
    assert isinstance(elsewhere, LocalStorage) and elsewhere.root == tmp_path / "elsewhere"
    bucket = open_storage_url("s3://recordings/site-a", tmp_path)
    assert isinstance(bucket, S3Storage) and bucket.describe() == "s3://recordings/site-a"


def test_a_failed_multipart_upload_is_one_line_and_keeps_the_file(
    s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    from boto3.exceptions import S3UploadFailedError

    def fails(*_args: Any, **_kwargs: Any) -> None:
        raise S3UploadFailedError("Failed to upload x: An error occurred (SlowDown)\nretry")

    monkeypatch.setattr(s3_storage.client, "upload_file", fails)
    src = staged(s3_storage, AUDIO)
    with pytest.raises(StorageError) as info:
        s3_storage.put_file(KEY, src)
    assert "SlowDown" in str(info.value) and "\n" not in str(info.value)
    assert src.exists()  # for the next attempt
