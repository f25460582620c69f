"""Signed exports: the web app's ZIP signed with the deployment's key, checked offline by
`callvault verify-export` and by standard tools (sha256sum, openssl), and every kind of
change to it caught: a file altered, removed or added, a manifest line changed, another
key's signature."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from callvault.index import audit
from callvault.keys import Keyring, MasterKey, SigningKey
from callvault.ops import public_keys, verify_export
from support.web import ADMIN, LiveWeb, audit_entries, live_web

KEYRING = Keyring((MasterKey.generate(),), "test")


@pytest.fixture
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive", keyring=KEYRING) as live:
        yield live


@pytest.fixture
def export(web: LiveWeb, tmp_path: Path) -> Path:
    client, _ = web.bearer(ADMIN[0])
    answer = client.get("/api/export")
    assert answer.status_code == 200
    path = tmp_path / "export.zip"
    path.write_bytes(answer.content)
    return path


@pytest.fixture
def key_pem(web: LiveWeb, export: Path, tmp_path: Path) -> Path:
    [key] = public_keys(web.archive.index)
    path = tmp_path / "deployment.pem"
    path.write_text(key.pem)
    return path


def openssl_verify(key: Path, name: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """``openssl pkeyutl -verify`` of `name` against `name`.sig with the public key `key`."""
    command = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(key), "-rawin"]
    return subprocess.run(
        [*command, "-in", name, "-sigfile", f"{name}.sig"],
        cwd=folder,
        capture_output=True,
        text=True,
    )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}
    return subprocess.run(
        [sys.executable, "-m", "callvault", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def rewrite(source: Path, target: Path, change: Callable[[str, bytes], bytes | None]) -> Path:
    """A copy of the ZIP `source` whose members went through `change` (None: left out)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info.filename))
            if data is not None:
                new.writestr(info, data)
    return target


def test_an_export_is_signed_and_verifies_offline(
    web: LiveWeb, export: Path, key_pem: Path
) -> None:
    with zipfile.ZipFile(export) as bundle:
        names = bundle.namelist()
        manifest = list(csv.DictReader(io.StringIO(bundle.read("manifest.csv").decode())))
        sums = bundle.read("SHA256SUMS").decode()
    assert {"manifest.csv.sig", "SHA256SUMS.sig", "signing-key.pem", "README.txt"} <= set(names)
    assert manifest and all(row["pbx"] for row in manifest)
    kinds = {record.name: record.config.kind for record in web.archive.index.pbxs.list()}
    assert all(row["pbx_kind"] == kinds.get(row["pbx"], "") for row in manifest)
    assert sums.count("\n") == len(manifest) + 1  # every recording and the manifest
    report = verify_export(export)
    assert report.ok and report.signed and not report.key_trusted
    assert report.recordings == len(manifest) and report.files_checked == len(manifest) + 1
    good = cli("verify-export", str(export), "--public-key", str(key_pem))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "intact" in good.stdout and "signed by the key you gave" in good.stdout
    [entry] = audit_entries(web, action=audit.EXPORT)
    assert "signed by key" in entry.detail


def test_standard_tools_check_an_export(export: Path, key_pem: Path, tmp_path: Path) -> None:
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(export) as bundle:
        bundle.extractall(folder)
    sums = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True
    )
    assert sums.returncode == 0, sums.stdout + sums.stderr
    for name in ("SHA256SUMS", "manifest.csv"):
        signed = openssl_verify(key_pem, name, folder)
        assert signed.returncode == 0 and "Signature Verified Successfully" in signed.stdout
    (folder / "manifest.csv").write_text("altered\n")
    refused = openssl_verify(key_pem, "manifest.csv", folder)
    assert refused.returncode != 0
    readme = (folder / "README.txt").read_text()
    assert "sha256sum -c SHA256SUMS" in readme and "openssl pkeyutl -verify" in readme


def _first_recording(names: list[str]) -> str:
    return next(name for name in names if name.startswith("recordings/"))


def test_every_change_to_an_export_is_named(export: Path, key_pem: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(export) as bundle:
        audio = _first_recording(bundle.namelist())

    def flip(name: str, data: bytes) -> bytes | None:
        return data[:100] + bytes([data[100] ^ 1]) + data[101:] if name == audio else data

    def drop(name: str, data: bytes) -> bytes | None:
        return None if name == audio else data

    def manifest_line(name: str, data: bytes) -> bytes | None:
        return data.replace(b"Internal", b"Inbound", 1) if name == "manifest.csv" else data

    def sums_too(name: str, data: bytes) -> bytes | None:
        # the file and its line in SHA256SUMS both changed: the signature still catches it
        if name == audio:
            return data + b"x"
        if name == "SHA256SUMS":
            return b"0" * 64 + data[64:]
        return data

    cases: dict[str, tuple[Callable[[str, bytes], bytes | None], str]] = {
        "flipped": (flip, f"{audio} was changed"),
        "dropped": (drop, f"{audio} is listed in SHA256SUMS but missing"),
        "manifest": (manifest_line, "manifest.csv was changed"),
        "sums": (sums_too, "SHA256SUMS does not match its signature"),
    }
    for label, (change, expected) in cases.items():
        altered = rewrite(export, tmp_path / f"{label}.zip", change)
        report = verify_export(altered)
        assert not report.ok, label
        assert any(expected in problem for problem in report.problems), (label, report.problems)
        run = cli("verify-export", str(altered), "--public-key", str(key_pem))
        assert run.returncode == 1 and "NOT intact" in run.stdout, label
        assert "Traceback" not in run.stderr
    added = rewrite(export, tmp_path / "added.zip", lambda name, data: data)
    with zipfile.ZipFile(added, "a") as bundle:
        bundle.writestr("recordings/extra.wav", b"RIFF")
    assert "recordings/extra.wav was added: no checksum lists it" in verify_export(added).problems


def test_a_signature_of_another_key_is_refused(export: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_text(SigningKey.generate().public.pem())
    run = cli("verify-export", str(export), "--public-key", str(other))
    assert run.returncode == 1
    assert "does not match its signature by the key you gave" in run.stdout
    # an export re-signed by someone else with their key inside it passes only its own
    # check, and names that key's fingerprint for comparison
    forger = SigningKey.generate()

    def resign(name: str, data: bytes) -> bytes | None:
        if name == "signing-key.pem":
            return forger.public.pem().encode()
        return data

    forged = rewrite(export, tmp_path / "forged.zip", resign)
    with zipfile.ZipFile(export) as bundle:
        manifest, sums = bundle.read("manifest.csv"), bundle.read("SHA256SUMS")
    with zipfile.ZipFile(forged) as old, zipfile.ZipFile(tmp_path / "forged2.zip", "w") as new:
        for info in old.infolist():
            data = old.read(info.filename)
            if info.filename == "manifest.csv.sig":
                data = forger.sign(manifest)
            elif info.filename == "SHA256SUMS.sig":
                data = forger.sign(sums)
            new.writestr(info, data)
    report = verify_export(tmp_path / "forged2.zip")
    assert report.ok and report.key_fingerprint == forger.public.fingerprint


def test_an_unsigned_export_is_reported_so(tmp_path: Path) -> None:
    with live_web(tmp_path / "archive") as live:  # no master key: nothing to sign with
        client, _ = live.bearer(ADMIN[0])
        path = tmp_path / "unsigned.zip"
        path.write_bytes(client.get("/api/export").content)
        [entry] = audit_entries(live, action=audit.EXPORT)
        assert "not signed" in entry.detail
    run = cli("verify-export", str(path))
    assert run.returncode == 1 and "not signed" in run.stdout
    assert "files match SHA256SUMS" in run.stdout


def test_what_is_not_an_export_gets_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_text("hello")
    run = cli("verify-export", str(tmp_path / "x.zip"))
    assert run.returncode == 1 and run.stderr.startswith("callvault: error: ")
    assert "not a ZIP file" in run.stderr and "Traceback" not in run.stderr
    run = cli("verify-export", str(tmp_path / "missing.zip"))
    assert run.returncode == 1 and "does not exist" in run.stderr
