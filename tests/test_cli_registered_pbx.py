"""`--pbx NAME`: the commands that talk to one PBX (`fetch`, `cdr`, `backfill`) reach a PBX
registered with `callvault pbx add` by its name, its URL, user, secret (sealed with the
master key), kind, certificate pin and time zone taken from the registry; flags that would
say otherwise are refused, and a name that is not registered is one line.

Everything real: the simulator of each kind over HTTPS on 127.0.0.1, `callvault` as a
child process, the registry in SQLite.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from callvault.cli._settings import PBX_NAME_PATTERN, load_settings
from callvault.index import open_index
from callvault.index.pbxs import NAME_PATTERN, PbxConfig
from callvault.simulator import Faults
from support.archive import ServeProcess, all_archived, registry_env, run_cli, wait_until
from support.kinds import PbxUnderTest, kind_params, start_pbx


@pytest.fixture(params=kind_params())
def pbx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PbxUnderTest]:
    with start_pbx(request.param, seed=5, faults=Faults(), workdir=tmp_path / "pbx") as running:
        yield running


def _registered(
    pbx: PbxUnderTest, tmp_path: Path, names: tuple[str, ...] = ("lyon",)
) -> dict[str, str]:
    """`pbx` registered under each of `names` (secret sealed with a new master key) on an
    archive in `tmp_path`; the environment of commands on that archive, without any PBX
    setting."""
    settings = pbx.cli_env(tmp_path / "archive")
    env = registry_env(tmp_path, PBX_SECRET=pbx.secret)
    (tmp_path / "archive").mkdir(exist_ok=True)
    created = run_cli(env, "keys", "create", "--file", str(tmp_path / "master.key"))
    assert created.returncode == 0, created.stderr
    user, secret = (
        ("--client-id", "--secret-env")
        if pbx.kind == "p-series"
        else ("--username", "--password-env")
    )
    for name in names:
        added = run_cli(
            env,
            "pbx",
            "add",
            name,
            "--kind",
            pbx.kind,
            "--url",
            settings["CALLVAULT_PBX"],
            user,
            settings["CALLVAULT_USERNAME"],
            secret,
            "PBX_SECRET",
            "--pin-sha256",
            settings["CALLVAULT_PIN_SHA256"],
            "--timezone",
            pbx.timezone,
        )
        assert added.returncode == 0, added.stderr
    del env["PBX_SECRET"]  # from now on the secret comes from the registry alone
    return env


def test_the_name_pattern_is_the_registry_s() -> None:
    assert NAME_PATTERN.pattern == PBX_NAME_PATTERN


@pytest.mark.parametrize("kind", kind_params())
def test_fetch_and_cdr_reach_a_registered_pbx_by_name(kind: str, tmp_path: Path) -> None:
    with start_pbx(kind, seed=5, faults=Faults(), workdir=tmp_path / "pbx") as pbx:
        name = pbx.place_call(call_from="1001", call_to="1002", talk_seconds=1)
        assert name is not None
        env = _registered(pbx, tmp_path)

        out = tmp_path / "out"
        fetched = run_cli(env, "fetch", "--pbx", "lyon", "--out", str(out), "--json", name)
        assert fetched.returncode == 0, fetched.stderr
        line = json.loads(fetched.stdout.strip().splitlines()[-1])
        assert line["name"] == name
        assert line["sha256"] == pbx.recording_sha256(name)
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == line["sha256"]

        # The PBX's zone is the registry's: from 5 minutes before the call, in that zone,
        # until now holds it. Read in the host's zone (the child runs with TZ 11 hours
        # behind UTC and no CALLVAULT_TIMEZONE), that start would be hours ahead.
        now = datetime.now(ZoneInfo(pbx.timezone))
        assert (now.utcoffset() or timedelta()) >= timedelta(hours=-5)
        since = (now - timedelta(minutes=5)).strftime("%Y-%m-%d %H:%M")
        rows = run_cli(
            {**env, "TZ": "Pacific/Pago_Pago"}, "cdr", "--pbx", "lyon", "--since", since, "--csv"
        )
        assert rows.returncode == 0, rows.stderr
        calls = list(csv.DictReader(io.StringIO(rows.stdout)))
        assert [c["recording"] for c in calls if c["recording"]] == [name]
        assert pbx.secret not in fetched.stdout + fetched.stderr + rows.stdout + rows.stderr


def test_backfill_takes_a_registered_pbx_by_name(pbx: PbxUnderTest, tmp_path: Path) -> None:
    names = [pbx.place_call(call_from=f"10{n:02d}", talk_seconds=1) for n in range(3)]
    env = _registered(pbx, tmp_path, ("lyon", "paris"))  # two: the name must choose
    env["CALLVAULT_WORKERS"] = "2"
    today = datetime.now(ZoneInfo(pbx.timezone)).strftime("%Y-%m-%d")
    done = run_cli(env, "backfill", "--pbx", "lyon", "--since", today)
    assert done.returncode == 0, done.stderr
    recorded = [n for n in names if n is not None]
    assert recorded
    assert all_archived(tmp_path / "archive" / "callvault.db", recorded)


def test_connection_flags_beside_a_registered_name_are_refused(tmp_path: Path) -> None:
    env = registry_env(tmp_path)
    refused = run_cli(env, "fetch", "--pbx", "lyon", "--username", "admin", "x.wav")
    assert refused.returncode == 2
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1
    assert message.startswith(
        "callvault: error: --pbx lyon is a registered PBX, whose settings come from the "
        "registry: leave out --username "
    )
    assert "callvault pbx edit lyon" in message
    # --kind too: a registered PBX has its own; and its time zone.
    refused = run_cli(env, "cdr", "--pbx", "lyon", "--kind", "p-series", "--since", "2026-01-01")
    assert refused.returncode == 2
    assert "--kind" in refused.stderr
    refused = run_cli(env, "cdr", "--pbx", "lyon", "--timezone", "UTC", "--since", "2026-01-01")
    assert refused.returncode == 2
    assert "leave out --timezone " in refused.stderr


def test_the_pbx_of_serves_flags_is_said_to_keep_no_password(tmp_path: Path) -> None:
    env = registry_env(tmp_path)
    (tmp_path / "archive").mkdir()
    with open_index(f"sqlite:///{tmp_path / 'archive' / 'callvault.db'}", create=True) as index:
        config = PbxConfig(url="https://127.0.0.1:9", username="api")
        index.pbxs.given_at_start(config, events_path="flags-path", now=datetime.now(UTC))
    # No master key at all: what is wrong is that the registry keeps no password for it.
    said = run_cli(env, "fetch", "--pbx", "main", "x.wav")
    assert said.returncode == 2
    assert "PBX main's password is not kept" in said.stderr
    assert "master key" not in said.stderr


def test_an_unregistered_name_or_no_archive_is_one_line(tmp_path: Path) -> None:
    env = registry_env(tmp_path)
    (tmp_path / "archive").mkdir()
    created = run_cli(env, "keys", "create", "--file", str(tmp_path / "master.key"))
    assert created.returncode == 0, created.stderr
    unknown = run_cli(env, "fetch", "--pbx", "paris", "x.wav")
    assert unknown.returncode == 2
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert "paris" in unknown.stderr and "Traceback" not in unknown.stderr

    del env["CALLVAULT_ARCHIVE"]
    nowhere = run_cli(env, "cdr", "--pbx", "paris", "--since", "2026-01-01")
    assert nowhere.returncode == 2
    assert nowhere.stderr.strip() == (
        "callvault: error: PBX paris is a registered name, read from the archive's index: "
        "no archive directory: give --archive DIR or set CALLVAULT_ARCHIVE"
    )


def test_a_host_without_scheme_says_url_or_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("or the name of a registered PBX")):
        load_settings(pbx="pbx.example.com")
    assert load_settings(pbx="lyon").pbx_name == "lyon"
    assert load_settings(pbx="https://pbx.example.com:8088").pbx_name is None


def test_serve_archives_the_registered_pbx_it_is_given_by_name(
    pbx: PbxUnderTest, tmp_path: Path
) -> None:
    env = _registered(pbx, tmp_path, ("lyon", "paris"))  # two: the name must choose
    serve = ServeProcess(env, tmp_path, "--pbx", "lyon")
    try:
        serve.start()
        assert wait_until(lambda: "callvault serve: archiving" in serve.log_text(), 30), (
            serve.log_text()
        )
        assert wait_until(lambda: pbx.pbx_logins >= 1, 30), serve.log_text()
        assert pbx.wait_events_ready()
        name = pbx.place_call(talk_seconds=1)
        assert name is not None
        db = tmp_path / "archive" / "callvault.db"
        assert wait_until(lambda: all_archived(db, [name]), 30), serve.log_text()
        log = serve.log_text()
        assert "2 PBXs" not in log and "paris" not in log
        assert pbx.secret not in log
    finally:
        serve.stop()
