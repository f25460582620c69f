"""Encryption at rest (issue 10), through callvault's real paths.

* `serve` with `encrypt` against the simulator stores each recording encrypted under its
  own data key (no RIFF header in storage; a sealed data key in its row; the plaintext's
  SHA-256 and size in the index), on SQLite and PostgreSQL, in a directory and in an S3
  bucket; the web app, over HTTP, plays it back byte for byte, whole and by Range (a
  property test), beside recordings archived in clear.
* A flipped byte, a truncated file, swapped segments, a file moved onto another recording,
  a wrong or missing master key: the web app answers one clear line and no audio,
  `verify` reports the recording, an export lists it as not matching.
* `callvault keys rotate` re-seals data keys, PBX passwords and signing keys under a new
  primary master key, resumes after an interruption, and the old key can then go.
* A crash between storing the ciphertext and indexing it does not lose its data key.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callvault import cipher
from callvault.archive import Archiver, IndexTokenStore, WorkerPool
from callvault.cli import _register, app
from callvault.index import Index, audit, open_index
from callvault.index.pbxs import PbxConfig, webhook_secret_context
from callvault.keys import Keyring, MasterKey
from callvault.ops import Archive, add_pbx, open_password, signer, verify_archive
from callvault.pbx import CallDetail, DownloadResult, StreamTransform, TokenSet
from callvault.simulator import Simulator
from callvault.storage import LocalStorage, Storage
from callvault.web import create_app
from support.archive import FAST_POLICY, archiver_config, states, wait_until
from support.web import ADMIN, make_wav, serve

_register()

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SEGMENT = cipher.SEGMENT_SIZE


def keyring_of(*keys: MasterKey) -> Keyring:
    return Keyring(tuple(keys), "test")


def write_key_file(path: Path, *keys: MasterKey) -> Path:
    path.write_text("".join(key.encoded() + "\n" for key in keys))
    path.chmod(0o600)
    return path


@dataclass
class Played:
    """The web app over an archive, for one admin with an API token."""

    client: httpx.Client
    base: str

    def audio(self, recording_id: int, range_: str | None = None) -> httpx.Response:
        headers = {"Range": range_} if range_ else {}
        return self.client.get(f"/api/recordings/{recording_id}/audio", headers=headers)


def admin_token(index: Index) -> str:
    if index.users.get(ADMIN[0]) is None:
        index.users.add(ADMIN[0], "admin", ADMIN[1])
    _token, secret = index.tokens.create(ADMIN[0], label="tests")
    return secret


@contextmanager
def played(index: Index, storage: Storage, keyring: Keyring | None) -> Iterator[Played]:
    token = admin_token(index)
    web_app = create_app(index, storage, keyring=keyring)
    with (
        serve(web_app) as base,
        httpx.Client(
            base_url=base, timeout=20, headers={"Authorization": f"Bearer {token}"}
        ) as client,
    ):
        yield Played(client, base)


def stored_bytes(storage: Storage, key: str | None) -> bytes:
    assert key is not None
    with storage.open(key) as stream:
        return stream.read()


# -- serve --encrypt against the simulator, played back by the web app -------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_serve_encrypts_and_the_web_app_plays_it_back(
    events_sim: Simulator,
    tmp_path: Path,
    db_url: str,
    where: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = events_sim
    keyring = keyring_of(MasterKey.generate())
    archive = tmp_path / "archive"
    overrides: dict[str, Any] = {"db_url": db_url}
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        for name, value in s3.env().items():
            monkeypatch.setenv(name, value)
        overrides["storage_url"] = f"s3://{s3.new_bucket()}/recordings"
    config = archiver_config(sim, archive, encrypt=True, keyring=keyring, **overrides)
    with Archiver(config) as archiver:
        index = archiver.index
        assert index is not None
        sealed = [sim.place_call(talk_seconds=12) for _ in range(2)]
        assert wait_until(lambda: states(index) == {"archived": 2}), states(index)
    # Encryption off again (the keys still loaded): the next recording is stored in clear.
    with Archiver(replace_config(config, encrypt=False)) as archiver:
        index = archiver.index
        assert index is not None
        clear = sim.place_call(talk_seconds=3)
        assert wait_until(lambda: states(index) == {"archived": 3}), states(index)

    index = open_index(db_url)
    try:
        opened = Archive(index, storage_of(archive, overrides), keyring=keyring)
        rows = {}
        for cdr in [*sealed, clear]:
            assert cdr.recording is not None
            row = index.recordings.by_name(cdr.recording)
            assert row is not None
            rows[cdr.recording] = row
            plain = sim.recording_path(cdr.recording).read_bytes()
            assert (
                row.sha256
                == hashlib.sha256(plain).hexdigest()
                == sim.recording_sha256(cdr.recording)
            )
            assert row.size == len(plain)
            stored = stored_bytes(opened.storage, row.storage_key)
            if cdr is clear:
                assert row.data_key is None and stored == plain
            else:
                assert row.data_key is not None and row.data_key.startswith("v1.")
                assert stored[:4] != b"RIFF" and plain not in stored
                assert len(stored) == cipher.ciphertext_size(len(plain)) > 2 * SEGMENT
                assert "data_key" not in repr(row)
        # The audit chain attests the plaintext's hash and size, as before.
        attested = index.audit.query(audit.AuditFilter(action=audit.ARCHIVE), limit=10)
        assert {row.sha256 for row in rows.values()} <= {
            json.loads(entry.detail)["sha256"] for entry in attested
        }
        report = verify_archive(opened, now=datetime.now(UTC))
        assert (report.checked, report.ok, report.problems) == (3, 3, 0)

        with played(index, opened.storage, keyring) as web:
            for name, row in rows.items():
                plain = sim.recording_path(name).read_bytes()
                whole = web.audio(row.id)
                assert whole.status_code == 200
                assert whole.headers["content-length"] == str(len(plain))
                assert whole.content == plain
            encrypted = rows[sealed[0].recording or ""]
            plain = sim.recording_path(encrypted.name).read_bytes()
            size = len(plain)

            @settings(
                max_examples=25,
                deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture],
            )
            @given(start=st.integers(0, size - 1), length=st.integers(1, 3 * SEGMENT))
            def ranges_match(start: int, length: int) -> None:
                end = min(start + length, size) - 1
                part = web.audio(encrypted.id, f"bytes={start}-{end}")
                assert part.status_code == 206
                assert part.headers["content-range"] == f"bytes {start}-{end}/{size}"
                assert part.content == plain[start : end + 1]

            ranges_match()
            # Suffix ranges and a range across a segment boundary, explicitly.
            assert web.audio(encrypted.id, "bytes=-100").content == plain[-100:]
            edge = SEGMENT - cipher.HEADER_SIZE - cipher.TAG_BYTES
            across = web.audio(encrypted.id, f"bytes={edge - 5}-{edge + 5}")
            assert across.content == plain[edge - 5 : edge + 6]
    finally:
        index.close()


def replace_config(config: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(config, **changes)


def storage_of(archive: Path, overrides: dict[str, Any]) -> Storage:
    from callvault.storage import open_storage_url

    return open_storage_url(overrides.get("storage_url"), archive)


def test_serve_refuses_encrypt_without_a_master_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["serve", "--encrypt", "--archive", str(tmp_path), "--pbx", "https://127.0.0.1:1"],
        env={"CALLVAULT_USERNAME": "api", "CALLVAULT_PASSWORD": "x"},
    )
    assert result.exit_code == 2
    assert "encryption at rest (encrypt) needs a master key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- the real worker path, for tampering and keys ----------------------------------------


class Recordings:
    """Downloads of WAVs of a given length (per name), for a worker pool."""

    def __init__(self) -> None:
        self.audio: dict[str, bytes] = {}

    async def download_recording(
        self,
        name: str,
        dest_dir: Path,
        *,
        filename: str | None = None,
        transform: Callable[[], StreamTransform] | None = None,
        hash_stored: bool = True,
    ) -> DownloadResult:
        data = self.audio[name]
        path = dest_dir / (filename or name)
        written = None
        if transform is None:
            path.write_bytes(data)
        else:  # as the client does: the body through the transform, a piece at a time
            sealer = transform()
            pieces = [sealer.update(data[at : at + 50_000]) for at in range(0, len(data), 50_000)]
            path.write_bytes(b"".join(pieces) + sealer.finish())
            if hash_stored:
                written = hashlib.sha256(path.read_bytes()).hexdigest()
        digest = hashlib.sha256(data).hexdigest()
        return DownloadResult(name, path, len(data), digest, "audio/wav", stored_sha256=written)


def queue(index: Index, recordings: Recordings, number: int, seconds: float) -> int:
    start = T0 + timedelta(minutes=number)
    name = f"{start:%Y%m%d%H%M%S}-{number}-100{number}-2000-Internal.wav"
    cdr = CallDetail(
        callid=f"c{number}",
        timestart=start.strftime("%Y-%m-%d %H:%M:%S"),
        callfrom=f"100{number}",
        callto="2000",
        callduration=20,
        talkduration=15,
        status="ANSWERED",
        type="Internal",
        recording=name,
        sn="369451090405",
    )
    result = index.calls.record([cdr], source="event", tz=UTC, now=start)[0]
    assert result.recording_id is not None
    recordings.audio[name] = make_wav(seconds, 300.0 + 50 * number)
    return result.recording_id


def archive_all(
    index: Index, storage: Storage, recordings: Recordings, keyring: Keyring | None, **kw: Any
) -> None:
    pool = WorkerPool(
        index=index,
        storage=storage,
        client=recordings,
        session=None,
        tz=UTC,
        policy=FAST_POLICY,
        workers=1,
        poll_interval_s=0.05,
        keyring=keyring,
        encrypt=keyring is not None,
        **kw,
    )

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(pool.run(stop, grace_s=5))
        deadline = asyncio.get_running_loop().time() + 30
        while states(index).get("archived", 0) < len(recordings.audio):
            assert asyncio.get_running_loop().time() < deadline, states(index)
            await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(run())


def manifest_of(body: bytes) -> dict[str, dict[str, str]]:
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        text = archive.read("manifest.csv").decode()
    return {line["recording_id"]: line for line in csv.DictReader(io.StringIO(text))}


def test_tampering_and_wrong_keys_are_caught(index: Index, tmp_path: Path) -> None:
    keyring = keyring_of(MasterKey.generate())
    storage = LocalStorage(tmp_path / "archive")
    recordings = Recordings()
    ids = {
        what: queue(index, recordings, number, seconds)
        for number, (what, seconds) in enumerate(
            [
                ("intact", 13.0),
                ("flipped", 13.0),
                ("flipped_later", 13.0),
                ("truncated", 13.0),
                ("swapped", 13.0),
                ("moved", 13.0),
            ],
            start=1,
        )
    }
    archive_all(index, storage, recordings, keyring)
    clear_id = queue(index, recordings, 9, 2.0)  # encryption off: stored in clear
    archive_all(index, storage, recordings, None)

    def path_of(recording_id: int) -> Path:
        row = index.recordings.by_id(recording_id)
        assert row is not None and row.storage_key is not None
        return storage.local_path(row.storage_key)

    def plain_of(recording_id: int) -> bytes:
        row = index.recordings.by_id(recording_id)
        assert row is not None
        return recordings.audio[row.name]

    for recording_id in ids.values():
        row = index.recordings.by_id(recording_id)
        assert row is not None and row.data_key is not None
        assert len(path_of(recording_id).read_bytes()) > 3 * SEGMENT
    clear_audio = plain_of(clear_id)
    clear_row = index.recordings.by_id(clear_id)
    assert clear_row is not None and clear_row.data_key is None

    # The damage: a byte of the first segment, a byte of the third, a cut at a segment
    # boundary, segments 2 and 3 swapped, another recording's file copied over one.
    flipped = bytearray(path_of(ids["flipped"]).read_bytes())
    flipped[1000] ^= 0x01
    path_of(ids["flipped"]).write_bytes(bytes(flipped))
    later = bytearray(path_of(ids["flipped_later"]).read_bytes())
    later[2 * SEGMENT + 10] ^= 0x80
    path_of(ids["flipped_later"]).write_bytes(bytes(later))
    path_of(ids["truncated"]).write_bytes(path_of(ids["truncated"]).read_bytes()[: 2 * SEGMENT])
    data = path_of(ids["swapped"]).read_bytes()
    swapped = data[:SEGMENT] + data[2 * SEGMENT : 3 * SEGMENT] + data[SEGMENT : 2 * SEGMENT]
    path_of(ids["swapped"]).write_bytes(swapped + data[3 * SEGMENT :])
    path_of(ids["moved"]).write_bytes(path_of(ids["intact"]).read_bytes())

    with played(index, storage, keyring) as web:
        # Intact ones play, encrypted or not.
        assert web.audio(ids["intact"]).content == plain_of(ids["intact"])
        assert web.audio(clear_id).content == clear_audio
        # Damage met before the first byte goes out: one clear line, no audio.
        for what in ("flipped", "truncated", "moved"):
            answer = web.audio(ids[what])
            assert answer.status_code == 500, what
            assert answer.headers["content-type"] == "application/json"
            assert "does not authenticate" in answer.json()["detail"], what
        for what, start in (("flipped_later", 2 * SEGMENT), ("swapped", SEGMENT)):
            answer = web.audio(ids[what], f"bytes={start}-{start + 100}")
            assert answer.status_code == 500, what
            assert "does not authenticate" in answer.json()["detail"]
            # Ranges elsewhere in the file still play.
            assert web.audio(ids[what], "bytes=0-99").content == plain_of(ids[what])[:100]
            # The whole file: its first segment goes out, then the response breaks off,
            # short of its Content-Length: never a body that looks complete.
            with pytest.raises(httpx.HTTPError):
                web.audio(ids[what])
        # An export lists every damaged recording as not matching the index.
        export = web.client.get("/api/export")
        assert export.status_code == 200
        manifest = manifest_of(export.content)
        assert manifest[str(ids["intact"])]["matches_index"] == "yes"
        assert manifest[str(clear_id)]["matches_index"] == "yes"
        for what in ("flipped", "truncated", "moved", "flipped_later", "swapped"):
            line = manifest[str(ids[what])]
            assert line["matches_index"] == "no", what
        for what in ("flipped", "truncated", "moved"):  # unreadable: no file at all
            assert manifest[str(ids[what])]["file"] == "", what

    report = verify_archive(Archive(index, storage, keyring=keyring), now=datetime.now(UTC))
    bad = {item.id: item for item in report.mismatched}
    assert set(bad) == {
        ids[w] for w in ("flipped", "flipped_later", "truncated", "swapped", "moved")
    }
    assert all(
        item.unreadable and "cannot decrypt it" in (item.error or "") for item in bad.values()
    )
    assert report.ok == 2 and report.missing == []

    # A wrong master key, and none: 503 with the one line, no audio; verify says why.
    other = keyring_of(MasterKey.generate())
    for keys, says in ((other, "not among the keys loaded"), (None, "no master key is loaded")):
        with played(index, storage, keys) as web:
            answer = web.audio(ids["intact"])
            assert answer.status_code == 503
            assert says in answer.json()["detail"]
            assert web.audio(ids["intact"], "bytes=0-10").status_code == 503
            assert web.audio(clear_id).content == clear_audio
        report = verify_archive(Archive(index, storage, keyring=keys), now=datetime.now(UTC))
        item = next(i for i in report.mismatched if i.id == ids["intact"])
        assert item.unreadable and says in (item.error or "")
        assert "cvmk1" not in (item.error or "")


def test_a_crash_after_storing_keeps_the_data_key(index: Index, tmp_path: Path) -> None:
    """The data key is fixed in the index before the ciphertext is stored: an attempt that
    stored the file but could not index it leaves the key, and the next attempt archives
    the stored copy (decrypted and hashed) instead of losing it."""
    keyring = keyring_of(MasterKey.generate())
    storage = LocalStorage(tmp_path / "archive")
    recordings = Recordings()
    recording_id = queue(index, recordings, 1, 5.0)
    real = index.jobs.mark_archived
    failures: list[int] = []

    def failing_once(*args: Any, **kwargs: Any) -> bool:
        if not failures:
            failures.append(1)
            raise OSError("the index went away")
        return real(*args, **kwargs)

    index.jobs.mark_archived = failing_once  # type: ignore[method-assign]
    try:
        archive_all(index, storage, recordings, keyring)
    finally:
        index.jobs.mark_archived = real  # type: ignore[method-assign]
    assert failures == [1]
    row = index.recordings.by_id(recording_id)
    assert row is not None and row.data_key is not None and row.attempts == 2
    plain = recordings.audio[row.name]
    assert row.sha256 == hashlib.sha256(plain).hexdigest() and row.size == len(plain)
    report = verify_archive(Archive(index, storage, keyring=keyring), now=datetime.now(UTC))
    assert report.ok == 1


# -- keys rotate ---------------------------------------------------------------------------


def test_keys_rotate_reseals_everything_and_resumes(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    index = open_index(db_url, create=True)
    storage = LocalStorage(archive_dir)
    recordings = Recordings()
    ids = [queue(index, recordings, number, 1.0) for number in range(1, 6)]
    archive_all(index, storage, recordings, keyring_of(old))
    now = datetime.now(UTC)
    add_pbx(
        index,
        keyring_of(old),
        "main",
        PbxConfig(url="https://192.0.2.10:8088", username="api"),
        "pbx-Secret-1",
        actor="test",
        remote_addr="local",
        now=now,
    )
    # A P-Series PBX: its Client Secret, its webhook secret and the tokens kept for the
    # next run are sealed too.
    lyon = add_pbx(
        index,
        keyring_of(old),
        "lyon",
        PbxConfig(url="https://192.0.2.11:8088", username="client-id", kind="p-series"),
        "client-Secret-1",
        webhook_secret="w" * 32,
        actor="test",
        remote_addr="local",
        now=now,
    )
    tokens = TokenSet("a" * 32, "r" * 32, now.timestamp() + 1800, now.timestamp() + 86400)
    IndexTokenStore(index, lyon.id, "lyon", keyring_of(old)).save(tokens)
    signer(index, keyring_of(old), now=now)
    index.close()

    both = write_key_file(tmp_path / "both.key", new, old)
    common = ["--master-key-file", str(both), "--archive", str(archive_dir), "--db", db_url]
    # An interruption after the first batch (here: a batch is one recording).
    from callvault.ops import _keys

    monkeypatch.setattr(_keys, "BATCH", 2)
    calls: list[int] = []

    def interrupted(done: int, total: int) -> None:
        calls.append(done)
        raise KeyboardInterrupt

    index = open_index(db_url)
    try:
        with pytest.raises(KeyboardInterrupt):
            _keys.rotate_master_keys(
                index, keyring_of(new, old), now=now, actor="test", progress=interrupted, batch=2
            )
        assert _keys.pending_rotation(index, keyring_of(new, old)) == 3 + 2 + 1 + 1 + 1
    finally:
        index.close()

    runner = CliRunner()
    first = runner.invoke(app, ["keys", "rotate", *common])
    assert first.exit_code == 0, first.output
    assert (
        "3 data keys of recordings, 2 PBX passwords, 1 webhook secret, 1 P-Series token set, "
        "1 signing key" in first.stdout
    )
    assert "the old keys can be removed" in first.stdout
    again = runner.invoke(app, ["keys", "rotate", *common])
    assert again.exit_code == 0, again.output
    assert (
        "0 data keys of recordings, 0 PBX passwords, 0 webhook secrets, 0 P-Series token "
        "sets, 0 signing keys" in again.stdout
    )

    # Without the old key now: everything opens with the new one alone.
    only_new = keyring_of(new)
    index = open_index(db_url)
    try:
        for recording_id in ids:
            row = index.recordings.by_id(recording_id)
            assert row is not None and row.data_key is not None
            assert row.data_key.startswith(f"v1.{new.id}.")
        record = index.pbxs.get("main")
        assert record is not None and open_password(record, only_new) == "pbx-Secret-1"
        record = index.pbxs.require("lyon")
        assert open_password(record, only_new) == "client-Secret-1"
        assert record.webhook_secret_sealed is not None
        opened = only_new.open(record.webhook_secret_sealed, webhook_secret_context("lyon"))
        assert opened == b"w" * 32
        assert IndexTokenStore(index, record.id, "lyon", only_new).load() == tokens
        signer(index, only_new, now=now)
        entries = index.audit.query(audit.AuditFilter(action=audit.KEYS_ROTATE), limit=10)
        assert len(entries) == 2 and all(entry.target == new.id for entry in entries)
        report = verify_archive(Archive(index, storage, keyring=only_new), now=now)
        assert report.ok == 5
        with played(index, storage, only_new) as web:
            row = index.recordings.by_id(ids[0])
            assert row is not None
            assert web.audio(ids[0]).content == recordings.audio[row.name]
    finally:
        index.close()

    # A key missing for a value: one line each, exit 1, nothing lost.
    alone = write_key_file(tmp_path / "other.key", MasterKey.generate())
    common[1] = str(alone)
    refused = runner.invoke(app, ["keys", "rotate", *common])
    assert refused.exit_code == 1
    assert "keep the old keys" in refused.stderr
    assert "cvmk1" not in refused.output


def test_storage_migrate_copies_encrypted_files_as_they_are(index: Index, tmp_path: Path) -> None:
    """`storage migrate` checks an encrypted file's copy against the source's ciphertext
    (the index holds the plaintext's hash), and the copy still decrypts."""
    from callvault.ops import migrate_storage, open_recording

    keyring = keyring_of(MasterKey.generate())
    source = LocalStorage(tmp_path / "archive")
    recordings = Recordings()
    ids = [queue(index, recordings, number, 5.0) for number in (1, 2)]
    archive_all(index, source, recordings, keyring)
    target_dir = tmp_path / "elsewhere"
    target_dir.mkdir()
    target = LocalStorage(target_dir)
    report = migrate_storage(
        Archive(index, source, keyring=keyring),
        target,
        f"file://{target_dir}",
        actor="test",
        now=lambda: datetime.now(UTC),
    )
    assert (report.copied, report.failed, report.switched) == (2, [], True)
    for recording_id in ids:
        row = index.recordings.by_id(recording_id)
        assert row is not None
        assert b"".join(open_recording(target, row, keyring)) == recordings.audio[row.name]


def test_a_deleted_recording_loses_its_data_key(index: Index, tmp_path: Path) -> None:
    """Deleting an encrypted recording forgets its sealed data key with it, so a copy of
    its object kept elsewhere (a backup, an old bucket version) stays unreadable."""
    from callvault.ops import delete_now

    keyring = keyring_of(MasterKey.generate())
    storage = LocalStorage(tmp_path / "archive")
    recordings = Recordings()
    recording_id = queue(index, recordings, 1, 2.0)
    archive_all(index, storage, recordings, keyring)
    row = index.recordings.by_id(recording_id)
    assert row is not None and row.data_key is not None and row.storage_key is not None
    kept = storage.local_path(row.storage_key).read_bytes()  # a backup's copy
    now = datetime.now(UTC)
    report = delete_now(Archive(index, storage), [recording_id], reason="t", actor="t", now=now)
    assert report.deleted == [recording_id]
    tombstone = index.recordings.by_id(recording_id)
    assert tombstone is not None and tombstone.state == "deleted" and tombstone.data_key is None
    assert tombstone.sha256 == row.sha256 and kept[:4] != b"RIFF"
