"""`callvault pbx ...` and `callvault keys ...`: the registry of PBXs from the command line,
against the real simulator over HTTPS, and `serve` archiving a registered PBX.

The commands run as child processes (their output and exit codes are what a person sees);
the serve test runs the archiver in-process from the same settings `serve` reads.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from callvault.archive import Archiver
from callvault.cli._serve import archiver_config
from callvault.cli._settings import load_settings
from callvault.index import open_index
from callvault.simulator import PSeriesConfig, PSeriesSimulator, Simulator
from support.archive import states, wait_until
from support.index_data import NOW, register_pbx
from support.pbx_sim import SIM_PASSWORD, outcomes

WRONG = "not-the-Pa55word"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}
    return subprocess.run(
        [sys.executable, "-m", "callvault", *args],
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def registry(tmp_path: Path) -> dict[str, str]:
    """The environment of commands on a new archive with a master key file."""
    key = tmp_path / "master.key"
    made = cli("keys", "create", "--file", str(key))
    assert made.returncode == 0, made.stderr
    (tmp_path / "archive").mkdir()
    return {
        "CALLVAULT_ARCHIVE": str(tmp_path / "archive"),
        "CALLVAULT_MASTER_KEY_FILE": str(key),
    }


def add_sim(sim: Simulator, env: dict[str, str], password: str = SIM_PASSWORD) -> None:
    assert sim.cert_sha256 is not None
    added = cli(
        "pbx",
        "add",
        "paris",
        "--url",
        sim.url,
        "--username",
        sim.username,
        "--password-env",
        "PBX_PASSWORD",
        "--pin-sha256",
        sim.cert_sha256,
        "--api-version",
        "v2.0.0",
        "--timezone",
        sim.config.timezone,
        env={**env, "PBX_PASSWORD": password},
    )
    assert added.returncode == 0, added.stderr
    assert "added PBX paris" in added.stdout


def test_without_a_master_key_pbx_add_says_how_to_make_one(tmp_path: Path) -> None:
    done = cli(
        "pbx",
        "add",
        "paris",
        "--url",
        "https://127.0.0.1:8088",
        "--username",
        "api",
        "--password-env",
        "PBX_PASSWORD",
        env={"CALLVAULT_ARCHIVE": str(tmp_path), "PBX_PASSWORD": "x"},
    )
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert "no master key" in line and "callvault keys create --file" in line


def test_keys_create_and_show(tmp_path: Path) -> None:
    key = tmp_path / "master.key"
    made = cli("keys", "create", "--file", str(key))
    assert made.returncode == 0 and (key.stat().st_mode & 0o777) == 0o600
    secret = key.read_text().splitlines()[-1]
    assert secret not in made.stdout + made.stderr
    shown = cli("keys", "show", "--master-key-file", str(key))
    key_id = made.stdout.split("master key ")[1].split()[0]
    assert shown.returncode == 0 and f"{key_id} (seals new secrets)" in shown.stdout
    assert secret not in shown.stdout
    again = cli("keys", "create", "--file", str(key))
    assert again.returncode == 1 and "never replaced" in again.stderr
    assert key.read_text().splitlines()[-1] == secret


def test_a_pseries_pbx_is_added_and_tested_as_what_it_is(
    registry: dict[str, str], tmp_path: Path
) -> None:
    """`pbx add --kind p-series` with a Client ID and Secret; `pbx test` logs in with
    them (get_token), reads the day's calls with cdr/search and says what it found in the
    P-Series' terms: the OpenAPI, events over its WebSocket."""
    with PSeriesSimulator(PSeriesConfig(seed=3)) as psim:
        for _ in range(2):
            psim.place_call(talk_seconds=3)
        assert psim.cert_sha256 is not None
        env = {**registry, "PBX_SECRET": psim.client_secret}
        added = cli(
            "pbx", "add", "berlin", "--kind", "p-series", "--url", psim.url,
            "--client-id", psim.client_id, "--secret-env", "PBX_SECRET",
            "--pin-sha256", psim.cert_sha256, env=env,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert "p-series" in added.stdout and "OpenAPI" in added.stdout
        tested = cli("pbx", "test", "berlin", env=registry)
        assert tested.returncode == 0, tested.stderr
        assert "kind              p-series" in tested.stdout
        assert "API version       openapi" in tested.stdout
        assert "reports           WebSocket" in tested.stdout
        assert "calls, last 24 h  2" in tested.stdout
        paths = [path for path, _ in psim.request_log]
        assert any(path.endswith("get_token") for path in paths)
        assert any(path.endswith("cdr/search") for path in paths)
        assert psim.client_secret not in tested.stdout + tested.stderr
        [view] = json.loads(cli("pbx", "list", "--json", env=registry).stdout)
        assert view["kind"] == "p-series" and view["api_version"] == "openapi"
        assert view["last_test"]["report_transport"] == "WebSocket"
        shown = cli("pbx", "show", "berlin", env=registry).stdout
        assert "api version      openapi" in shown
        assert f"client id        {psim.client_id}" in shown and "username" not in shown
        assert "report url" not in shown and "tcp report port" not in shown
        env["PBX_SECRET"] = psim.client_secret + "-new"
        edited = cli("pbx", "edit", "berlin", "--secret-env", "PBX_SECRET", env=env)
        assert edited.stdout.strip() == "changed PBX berlin: client-secret", edited.stderr


def test_a_refused_pseries_secret_says_how_to_fix_it_in_pseries_terms(
    registry: dict[str, str],
) -> None:
    with PSeriesSimulator(PSeriesConfig(seed=4)) as psim:
        assert psim.cert_sha256 is not None
        env = {**registry, "PBX_SECRET": "not-the-secret"}
        added = cli(
            "pbx", "add", "berlin", "--kind", "p-series", "--url", psim.url,
            "--client-id", psim.client_id, "--secret-env", "PBX_SECRET",
            "--pin-sha256", psim.cert_sha256, env=env,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        fix = "`callvault pbx edit berlin --client-id ID --secret-env VAR`"
        first = cli("pbx", "test", "berlin", env=registry)
        assert first.returncode == 1 and len(first.stderr.strip().splitlines()) == 1
        assert "client ID or secret" in first.stderr and fix in first.stderr
        again = cli("pbx", "test", "berlin", env=registry)  # not sent again for 10 minutes
        assert again.returncode == 1 and "not trying it again" in again.stderr
        assert fix in again.stderr and "--password-env" not in again.stderr
        assert again.stderr.count(fix) == 1, again.stderr  # the fix said once
        assert "refused this Client Secret" in again.stderr
        # With --json, the same as JSON on stdout: not ok, and why.
        as_json = cli("pbx", "test", "berlin", "--json", env=registry)
        assert as_json.returncode == 1 and as_json.stderr == ""
        answer = json.loads(as_json.stdout)
        assert (answer["ok"], answer["error_kind"]) == (False, "refused-recently")
        assert "not trying it again" in answer["error"]
        assert len([p for p, _ in psim.request_log if p.endswith("get_token")]) == 1


def test_pseries_flags_are_refused_for_other_kinds(registry: dict[str, str]) -> None:
    env = {**registry, "PBX_SECRET": "s3cret"}
    for flags in (
        ["--client-id", "app", "--password-env", "PBX_SECRET"],
        ["--username", "api", "--secret-env", "PBX_SECRET"],
    ):
        refused = cli(
            "pbx", "add", "y", "--kind", "cloud", "--url", "https://pbx.example", *flags,
            env=env,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert "is for --kind p-series" in refused.stderr
        assert "--username and --password-env" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    listed = cli("pbx", "list", "--json", env=registry)
    assert json.loads(listed.stdout) == []


def test_a_registered_pbx_is_tested_and_its_password_never_shows(
    sim: Simulator, registry: dict[str, str], tmp_path: Path
) -> None:
    add_sim(sim, registry)
    tested = cli("pbx", "test", "paris", env=registry)
    assert tested.returncode == 0, tested.stderr
    assert f"logged in to {sim.url}" in tested.stdout
    assert "reports           HTTP" in tested.stdout  # v2's login says how it reports
    calls = len(sim.state.cdrs())
    assert f"calls, last 24 h  {calls}" in tested.stdout
    # One login, asking for no reports (a running serve keeps them), and a logout.
    assert outcomes(sim, "login") == ["Success"] and outcomes(sim, "logout") == ["Success"]

    listed = cli("pbx", "list", "--json", env=registry)
    assert "password" not in listed.stdout  # not even the name of one
    [view] = json.loads(listed.stdout)
    assert view["name"] == "paris" and view["tls"] == "pinned"
    assert view["last_test"]["ok"] is True and view["last_test"]["calls_last_day"] == calls
    shown = cli("pbx", "show", "paris", env=registry)
    assert "last test        ok at" in shown.stdout
    assert "given by flags   no\n" in shown.stdout  # in words, not a Python bool
    everything = listed.stdout + shown.stdout + tested.stdout + tested.stderr
    database = (tmp_path / "archive" / "callvault.db").read_bytes()
    for output in (everything, database.decode("latin-1")):
        assert SIM_PASSWORD not in output
        assert "password_sealed" not in everything


def test_a_refused_password_is_tried_once_and_not_again_for_ten_minutes(
    sim: Simulator, registry: dict[str, str]
) -> None:
    add_sim(sim, registry, password=WRONG)
    first = cli("pbx", "test", "paris", env=registry)
    assert first.returncode == 1
    # One line, the command's own (not the client's log line before it as well).
    assert first.stderr.startswith("callvault: error: PBX paris: login:"), first.stderr
    assert len(first.stderr.strip().splitlines()) == 1
    assert outcomes(sim, "login") == ["20003"]
    again = cli("pbx", "test", "paris", env=registry)
    assert again.returncode == 1 and "not trying it again before" in again.stderr
    assert outcomes(sim, "login") == ["20003"]  # no second attempt at the PBX
    fixed = cli(
        "pbx",
        "edit",
        "paris",
        "--password-env",
        "PBX_PASSWORD",
        env={**registry, "PBX_PASSWORD": SIM_PASSWORD},
    )
    assert fixed.returncode == 0 and "changed PBX paris: password" in fixed.stdout
    assert cli("pbx", "test", "paris", env=registry).returncode == 0
    assert outcomes(sim, "login") == ["20003", "Success"]


def test_a_password_serve_saw_refused_is_not_tested_again_for_ten_minutes(
    sim: Simulator, registry: dict[str, str], tmp_path: Path
) -> None:
    from support.archive import ServeProcess, free_port

    add_sim(sim, registry, password=WRONG)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")},
        **registry,
        "CALLVAULT_EVENTS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    serve = ServeProcess(env, tmp_path)
    try:
        serve.start()
        assert wait_until(lambda: outcomes(sim, "login") == ["20003"], 30), serve.log_text()
        db = f"sqlite:///{registry['CALLVAULT_ARCHIVE']}/callvault.db"

        def refusal_kept() -> bool:
            with open_index(db) as index:
                health = index.pbxs.require("paris").session or {}
            return health.get("reason") == "login-refused"

        assert wait_until(refusal_kept, 30), serve.log_text()
    finally:
        serve.stop()
    tested = cli("pbx", "test", "paris", env=registry)
    assert tested.returncode == 1
    assert "not trying it again before" in tested.stderr and "serve's login" in tested.stderr
    assert len(tested.stderr.strip().splitlines()) == 1
    assert outcomes(sim, "login") == ["20003"]  # the test sent nothing
    # A new password is the admin's answer: tested at once.
    fixed = cli(
        "pbx", "edit", "paris", "--password-env", "PBX_PASSWORD",
        env={**registry, "PBX_PASSWORD": SIM_PASSWORD},
    )  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    assert cli("pbx", "test", "paris", env=registry).returncode == 0
    assert outcomes(sim, "login") == ["20003", "Success"]


def test_a_certificate_not_trusted_is_fixed_with_pbx_edit(
    sim: Simulator, registry: dict[str, str]
) -> None:
    """`pbx test` of a PBX whose certificate nothing trusts says the `pbx edit` that pins
    it (`pbx test` itself has no --pin-sha256)."""
    added = cli(
        "pbx", "add", "paris", "--url", sim.url, "--username", sim.username,
        "--password-env", "PBX_PASSWORD", env={**registry, "PBX_PASSWORD": SIM_PASSWORD},
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    tested = cli("pbx", "test", "paris", env=registry)
    assert tested.returncode == 1 and len(tested.stderr.splitlines()) == 1
    assert "certificate not trusted" in tested.stderr
    assert "`callvault pbx edit paris --pin-sha256 HEX` (or --ca-file FILE)" in tested.stderr
    assert outcomes(sim, "login") == []  # nothing was sent


def test_serve_does_not_send_a_password_a_test_saw_refused(
    sim: Simulator, registry: dict[str, str], tmp_path: Path
) -> None:
    """The reverse of the test above: serve, started after `pbx test` was refused the
    registered password, pauses as if it had met the refusal itself instead of sending the
    same password again (five refusals lock the host out)."""
    from support.archive import ServeProcess, free_port

    add_sim(sim, registry, password=WRONG)
    assert cli("pbx", "test", "paris", env=registry).returncode == 1
    assert outcomes(sim, "login") == ["20003"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")},
        **registry,
        "CALLVAULT_EVENTS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    db = f"sqlite:///{registry['CALLVAULT_ARCHIVE']}/callvault.db"

    def health() -> dict[str, Any]:
        with open_index(db) as index:
            return index.pbxs.require("paris").session or {}

    serve = ServeProcess(env, tmp_path)
    try:
        serve.start()
        assert wait_until(lambda: health().get("reason") == "login-refused", 30), serve.log_text()
        log = serve.log_text()
    finally:
        serve.stop()
    assert outcomes(sim, "login") == ["20003"]  # serve sent nothing
    assert "the PBX refused this login to `callvault pbx test` at" in health()["error"]
    assert "retry_at" in health()
    [line] = [line for line in log.splitlines() if "login to `callvault pbx test`" in line]
    assert "next login attempt in" in line and "callvault pbx edit paris" in line
    assert SIM_PASSWORD not in log and WRONG not in log


def test_edits_and_removal_are_audited_without_secrets(
    sim: Simulator, registry: dict[str, str]
) -> None:
    add_sim(sim, registry)
    edited = cli("pbx", "edit", "paris", "--max-downloads", "3", "--insecure", env=registry)
    assert edited.returncode == 0
    assert edited.stdout.strip() == "changed PBX paris: pin-sha256, insecure, max-downloads"
    assert "--insecure: the PBX's certificate is not checked" in edited.stderr
    both = cli("pbx", "edit", "paris", "--insecure", "--pin-sha256", "ab" * 32, env=registry)
    assert both.returncode == 2 and "choose only one" in both.stderr
    # Reports to a balancer: shown as the PBX is given it; '' goes back to the default.
    balanced = cli("pbx", "edit", "paris", "--report-url", "http://LB.example:8260", env=registry)
    assert balanced.returncode == 0, balanced.stderr
    shown = cli("pbx", "show", "paris", env=registry).stdout
    assert "report url       lb.example:8260" in shown
    wrong = cli("pbx", "edit", "paris", "--report-url", "lb.example:8260/x", env=registry)
    assert wrong.returncode == 2 and "secret path is added" in wrong.stderr
    assert "Traceback" not in wrong.stderr and len(wrong.stderr.splitlines()) == 1
    assert cli("pbx", "edit", "paris", "--report-url", "", env=registry).returncode == 0
    shown = cli("pbx", "show", "paris", "--json", env=registry).stdout
    assert json.loads(shown)["report_url"] is None
    nothing = cli("pbx", "edit", "paris", env=registry)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    # A name not registered is a usage error (2) whichever command is given it, and the
    # line says which names there are; `pbx test` says it before asking for a master key.
    for command in ("show", "remove", "test"):
        missing = cli("pbx", command, "lyon", env={**registry, "CALLVAULT_MASTER_KEY_FILE": ""})
        assert missing.returncode == 2, (command, missing.stderr)
        assert missing.stderr == "callvault: error: no PBX named 'lyon' (paris)\n"
    # `edit` of such a name with nothing to change says first that the name is wrong.
    missing = cli("pbx", "edit", "lyon", env=registry)
    assert missing.returncode == 2
    assert missing.stderr == "callvault: error: no PBX named 'lyon' (paris)\n"
    removed = cli("pbx", "remove", "paris", env=registry)
    assert removed.returncode == 0 and "stay in the archive" in removed.stdout
    assert cli("pbx", "list", env=registry).stdout.startswith("no PBXs registered")
    with open_index(f"sqlite:///{registry['CALLVAULT_ARCHIVE']}/callvault.db") as index:
        logged = list(reversed(index.audit.query()))  # oldest first
    entries = [(e.action, e.target) for e in logged]
    details = " ".join(e.detail for e in logged)
    assert entries == [("pbx_add", "paris")] + [("pbx_edit", "paris")] * 3 + [
        ("pbx_remove", "paris")
    ]
    assert all(e.actor.startswith("cli") for e in logged)
    assert "max_downloads=3" in details and SIM_PASSWORD not in details


def test_serve_archives_the_registered_pbx_and_notes_its_serial(
    events_sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = events_sim
    key = tmp_path / "master.key"
    assert cli("keys", "create", "--file", str(key)).returncode == 0
    env = {"CALLVAULT_ARCHIVE": str(tmp_path / "archive"), "CALLVAULT_MASTER_KEY_FILE": str(key)}
    (tmp_path / "archive").mkdir()
    add_sim(sim, env, password=sim.password)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(events_listen="127.0.0.1:0", poll_interval_s=0.3)
    config = archiver_config(settings, web=False)
    assert (config.registry_name, config.pbx_url, config.workers) == ("paris", sim.url, 2)
    with Archiver(config) as archiver:
        cdr = sim.place_call(talk_seconds=2)
        index = archiver.index
        assert index is not None and cdr.recording is not None
        total = len([c for c in sim.state.cdrs() if c.recording])
        assert wait_until(lambda: states(index) == {"archived": total}), states(index)
        row = index.recordings.by_name(cdr.recording)
        assert row is not None and row.sha256 == sim.recording_sha256(cdr.recording)
        assert wait_until(lambda: index.pbxs.require("paris").serial == sim.serial)


def test_backfill_asks_which_pbx_when_several_are_registered(
    sim: Simulator, registry: dict[str, str]
) -> None:
    add_sim(sim, registry)
    again = cli(
        "pbx",
        "add",
        "lyon",
        "--url",
        sim.url,
        "--username",
        "api",
        "--password-env",
        "PBX_PASSWORD",
        env={**registry, "PBX_PASSWORD": "x"},
    )
    assert again.returncode == 0
    filled = cli("backfill", "--since", "2026-01-01", env=registry)
    assert filled.returncode == 2
    [line] = filled.stderr.splitlines()
    assert "2 PBXs are registered (lyon, paris): choose one with --only NAME" in line
    for unknown in (
        cli("backfill", "--only", "nice", "--since", "2026-01-01", env=registry),
        cli("serve", "--no-web", "--only", "nice", env=registry),
    ):
        assert unknown.returncode == 2 and "no PBX named 'nice'" in unknown.stderr


def test_serve_given_its_pbx_by_flags_records_it_in_the_registry_and_only_its_jobs(
    events_sim: Simulator, tmp_path: Path
) -> None:
    from callvault.pbx import CallDetail
    from support.archive import archiver_config as sim_config

    sim = events_sim
    archive = tmp_path / "archive"
    db_url = f"sqlite:///{archive / 'callvault.db'}"
    archive.mkdir()
    with open_index(db_url) as index:  # another PBX's recording waits in the same index
        other = CallDetail(callid="1.1", recording="20240501100000-1.1-100-200-Internal.wav")
        index.calls.record([other], source="event", tz=ZoneInfo("UTC"), now=NOW, pbx_id=999)
    with Archiver(sim_config(sim, archive)) as archiver:
        cdr = sim.place_call(talk_seconds=1)
        index = archiver.index
        assert index is not None and cdr.recording is not None
        assert wait_until(lambda: states(index) == {"archived": 1, "pending": 1}), states(index)
        [main] = index.pbxs.list()
        assert (main.name, main.config.url, main.given_by_flags) == ("main", sim.url, True)
        row = index.recordings.by_name(cdr.recording)
        assert row is not None and row.pbx_id == main.id
        waiting = index.recordings.by_name(other.recording or "")
        assert waiting is not None and (waiting.state, waiting.attempts) == ("pending", 0)
        assert wait_until(lambda: index.pbxs.require("main").serial == sim.serial)
    # Without the flags, serve says how this archive's PBX is given.
    served = cli("serve", "--no-web", env={"CALLVAULT_ARCHIVE": str(archive)})
    assert served.returncode == 2
    assert "PBX main is this archive's PBX of serve's flags" in served.stderr
    removed = cli("pbx", "remove", "main", env={"CALLVAULT_ARCHIVE": str(archive)})
    assert removed.returncode == 1 and "calls of it are archived" in removed.stderr


def test_two_pbxs_share_an_index_each_archived_by_its_own_serve(tmp_path: Path) -> None:
    from dataclasses import replace
    from datetime import UTC, datetime

    from callvault.index.pbxs import PbxConfig
    from callvault.keys import Keyring, MasterKey
    from callvault.ops import add_pbx
    from callvault.simulator import SimulatorConfig
    from support.archive import archiver_config as sim_config

    keyring = Keyring((MasterKey.generate(),), "test")
    archive = tmp_path / "archive"
    archive.mkdir()
    db_url = f"sqlite:///{archive / 'callvault.db'}"
    paris_sim = Simulator(SimulatorConfig(seed=1, event_retry_interval=0.2, serial="100000000001"))
    lyon_sim = Simulator(SimulatorConfig(seed=1, event_retry_interval=0.2, serial="100000000002"))
    with paris_sim, lyon_sim, open_index(db_url) as index:
        for name, sim in (("paris", paris_sim), ("lyon", lyon_sim)):
            config = PbxConfig(url=sim.url, username=sim.username, pin_sha256=sim.cert_sha256)
            add_pbx(
                index, keyring, name, config, sim.password,
                actor="test", remote_addr="local", now=datetime.now(UTC),
            )  # fmt: skip
        paris_config = replace(sim_config(paris_sim, archive), registry_name="paris", node="n1")
        lyon_config = replace(sim_config(lyon_sim, archive), registry_name="lyon", node="n2")
        with Archiver(paris_config) as paris, Archiver(lyon_config) as lyon:
            # Same seed: the two PBXs give their calls the same ids and names, if both
            # calls start in the same second of their clocks (a call's id is its start
            # second and a sequence): Lyon's clock is set to the second Paris's call began.
            first = paris_sim.place_call(talk_seconds=1, ring_seconds=2)
            began = int((first.callid or "0").split(".")[0])
            lyon_sim.clock.advance(began + 0.5 - (lyon_sim.clock.now() - 3))  # ring + talk
            ours = [first, lyon_sim.place_call(talk_seconds=1, ring_seconds=2)]
            assert ours[0].callid == ours[1].callid and ours[0].recording == ours[1].recording
            assert wait_until(lambda: states(index) == {"archived": 2}), states(index)
            assert paris.pbx is not None and lyon.pbx is not None
            for archiver, sim, cdr in ((paris, paris_sim, ours[0]), (lyon, lyon_sim, ours[1])):
                assert archiver.pbx is not None and cdr.recording is not None
                row = index.recordings.by_name(cdr.recording, pbx_id=archiver.pbx.id)
                assert row is not None and row.sha256 == sim.recording_sha256(cdr.recording)
                assert row.storage_key is not None and row.storage_key.startswith(sim.serial)
            # Each serve reports its own PBX's session; neither overwrites the other's.
            status = cli("status", "--json", env={"CALLVAULT_ARCHIVE": str(archive)})
            sessions = {p["name"]: p["session"]["state"] for p in json.loads(status.stdout)["pbxs"]}
            assert sessions == {"lyon": "ok", "paris": "ok"}, status.stdout
            text = cli("status", env={"CALLVAULT_ARCHIVE": str(archive)}).stdout
            assert "PBX sessions:" in text and "paris" in text and "lyon" in text


def test_list_shows_the_pbx_of_each_recording_and_filters_by_it(
    tmp_path: Path, registry: dict[str, str]
) -> None:
    from callvault.pbx import CallDetail

    archive = Path(registry["CALLVAULT_ARCHIVE"])
    with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
        for name in ("lyon", "paris"):
            pbx = register_pbx(index, name)
            call = CallDetail(
                callid="1.1",  # the same call id on both: each PBX's own
                timestart="2024-05-03 10:00:00",
                callfrom="2001",
                callto="2002",
                recording=f"20240503100000-1.1-2001-2002-{name}.wav",
            )
            index.calls.record(
                [call], source="event", tz=ZoneInfo("UTC"), now=NOW,
                pbx_id=pbx.id,
            )  # fmt: skip
    listed = cli("list", "--timezone", "UTC", env=registry)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[0] == "PBX" and len(lines) == 3
    assert {line.split()[0] for line in lines[1:]} == {"lyon", "paris"}
    only = cli("list", "--pbx", "paris", "--json", env=registry)
    [item] = json.loads(only.stdout)["items"]
    assert (item["pbx"], item["name"]) == ("paris", "20240503100000-1.1-2001-2002-paris.wav")
    unknown = cli("list", "--pbx", "nice", env=registry)
    assert unknown.returncode == 2 and "no PBX named 'nice' (lyon, paris)" in unknown.stderr


def test_backfill_takes_a_registered_pbx_and_flags_never_double_it(
    sim: Simulator, registry: dict[str, str]
) -> None:
    from datetime import date, timedelta

    add_sim(sim, registry)
    env = {**registry, "CALLVAULT_TIMEZONE": sim.config.timezone}
    since = (date.today() - timedelta(days=2)).isoformat()  # the simulator's calls are now
    done = cli("backfill", "--since", since, "--queue-only", env=env)
    assert done.returncode == 0, done.stderr
    recorded = len([c for c in sim.state.cdrs() if c.recording])
    assert f"{recorded} recordings queued" in done.stdout
    archive = Path(registry["CALLVAULT_ARCHIVE"])
    with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
        paris = index.pbxs.require("paris")
        assert index.recordings.counts_by_state(pbx_id=paris.id)["pending"] == recorded
        assert [p.name for p in index.pbxs.list()] == ["paris"]  # no entry of flags made
    # The same PBX given by flags would be recorded a second time, under another entry.
    assert sim.cert_sha256 is not None
    flags = {
        **env,
        "CALLVAULT_PBX": sim.url,
        "CALLVAULT_USERNAME": sim.username,
        "CALLVAULT_PIN_SHA256": sim.cert_sha256,
        "CALLVAULT_PASSWORD": SIM_PASSWORD,
    }
    again = cli("backfill", "--since", since, "--queue-only", env=flags)
    assert again.returncode == 2
    assert f"PBX paris is registered with the URL {sim.url}" in again.stderr
    assert "--only paris" in again.stderr


def add_one_download_pbx(name: str, sim: Simulator, env: dict[str, str]) -> None:
    """`pbx add NAME` for `sim`, one download at a time."""
    assert sim.cert_sha256 is not None
    added = cli(
        "pbx", "add", name, "--url", sim.url, "--username", sim.username,
        "--password-env", "PW", "--pin-sha256", sim.cert_sha256,
        "--timezone", sim.config.timezone, "--max-downloads", "1",
        env={**env, "PW": sim.password},
    )  # fmt: skip
    assert added.returncode == 0, added.stderr


def test_one_serve_archives_every_registered_pbx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two PBXs with the same call ids and recording names, one serve: each PBX's reports
    reach it at its own secret path, each recording comes from its own PBX, each PBX has
    its own session and download workers."""
    import httpx

    from callvault.simulator import SimulatorConfig

    key = tmp_path / "master.key"
    assert cli("keys", "create", "--file", str(key)).returncode == 0
    archive = tmp_path / "archive"
    archive.mkdir()
    env = {"CALLVAULT_ARCHIVE": str(archive), "CALLVAULT_MASTER_KEY_FILE": str(key)}
    sims = {
        name: Simulator(SimulatorConfig(seed=1, event_retry_interval=0.2, serial=serial))
        for name, serial in (("lyon", "100000000002"), ("paris", "100000000001"))
    }
    with sims["lyon"], sims["paris"]:
        for name, sim in sims.items():
            add_one_download_pbx(name, sim, env)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = load_settings(events_listen="127.0.0.1:0", poll_interval_s=0.3)
        config = archiver_config(settings, web=False)
        assert [config.registry_name, *(t.registry_name for t in config.more_pbxs)] == [
            "lyon",
            "paris",
        ]
        caplog.set_level(logging.INFO, logger="callvault.archive")
        with Archiver(config) as archiver:
            index = archiver.index
            assert index is not None and len(archiver.lanes) == 2
            calls = {name: sim.place_call(talk_seconds=1) for name, sim in sims.items()}
            assert calls["lyon"].recording == calls["paris"].recording  # same names
            assert wait_until(lambda: states(index) == {"archived": 2}), states(index)
            for lane in archiver.lanes:
                assert lane.pbx is not None
                sim, cdr = sims[lane.pbx.name], calls[lane.pbx.name]
                assert cdr.recording is not None
                row = index.recordings.by_name(cdr.recording, pbx_id=lane.pbx.id)
                assert row is not None and row.sha256 == sim.recording_sha256(cdr.recording)
                assert row.storage_key is not None and row.storage_key.startswith(sim.serial)
                assert lane.session_state() == "ok" and lane.workers() == (1, 1)
                # The log says which PBX each recording came from.
                said = f"archived {cdr.recording} (PBX {lane.pbx.name}) ("
                assert any(said in r.getMessage() for r in caplog.records), said
            # Each PBX's workers are a registered process of their own.
            live = sorted(
                p.node for p in index.processes.all() if p.stopped_at is None and p.kind == "serve"
            )
            assert [node.rsplit("/", 1)[1] for node in live] == ["lyon", "paris"]
            base = archiver.events_url.rsplit("/", 1)[0]
            assert httpx.post(f"{base}/not-a-secret", content=b"{}").status_code == 404
            text, _ = archiver.metrics.exposition()
            for name in ("lyon", "paris"):
                assert (
                    f'callvault_pbx_session_state{{pbx="{name}",state="ok"}} 1.0' in text.decode()
                )
                assert f'callvault_workers{{pbx="{name}",state="alive"}} 1.0' in text.decode()
            status = cli("status", "--json", env=env)
            sessions = {p["name"]: p["session"]["state"] for p in json.loads(status.stdout)["pbxs"]}
            assert sessions == {"lyon": "ok", "paris": "ok"}


def test_demo_runs_a_fleet_in_the_registry(tmp_path: Path) -> None:
    demo = subprocess.run(
        [sys.executable, "-m", "callvault", "demo", "--pbxs", "2", "--dir", str(tmp_path),
         "--web-port", "0", "--duration", "6", "--calls-per-minute", "0"],
        env={k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    assert "2 simulated PBXs" in demo.stdout
    assert demo.stdout.count("\narchived  ") == 2  # one call placed on each
    archive = {"CALLVAULT_ARCHIVE": str(tmp_path / "archive")}
    listed = cli("list", "--json", env=archive)
    assert sorted(item["pbx"] for item in json.loads(listed.stdout)["items"]) == [
        "sim-1",
        "sim-2",
    ]
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    # The banner names the key and how to use it with the registry's commands.
    assert f"master key      {tmp_path / 'master.key'}" in demo.stdout
    hint = f"pbx test sim-1 --archive {tmp_path / 'archive'} --master-key-file"
    assert hint in demo.stdout


def test_requeue_and_verify_take_one_pbx(registry: dict[str, str]) -> None:
    from datetime import timedelta

    from callvault.index import Worker
    from callvault.pbx import CallDetail

    archive = Path(registry["CALLVAULT_ARCHIVE"])
    worker = Worker(process_id=None, name="w")
    with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
        for name in ("lyon", "paris"):
            record = register_pbx(index, name)
            index.pbxs.learn_serial(name, f"SN-{name}", now=NOW)
            calls = [
                CallDetail(callid=f"1.{n}", sn=f"SN-{name}", recording=f"{name}-{n}.wav")
                for n in (1, 2)
            ]
            index.calls.record(calls, source="event", tz=ZoneInfo("UTC"), now=NOW, pbx_id=record.id)
            gone, kept = index.jobs.claim(
                worker, 2, now=NOW, lease=timedelta(minutes=5), pbx_id=record.id
            )
            index.jobs.mark_failed(gone.recording_id, worker=worker, reason="gone", now=NOW)
            index.jobs.mark_archived(
                kept.recording_id, worker=worker, size=4, sha256="0" * 64,
                storage_key=f"SN-{name}/2024/05/01/{name}-2.wav", content_type="audio/wav", now=NOW,
            )  # fmt: skip
    queued = cli("requeue", "--pbx", "paris", "--json", env=registry)
    assert queued.returncode == 0, queued.stderr
    assert json.loads(queued.stdout)["requeued"] == {"failed": 1, "missing": 0}
    listed = json.loads(cli("list", "--state", "failed", "--json", env=registry).stdout)
    assert [item["pbx"] for item in listed["items"]] == ["lyon"]  # Lyon's stays given up
    checked = cli("verify", "--pbx", "lyon", "--json", env=registry)
    report = json.loads(checked.stdout)
    assert checked.returncode == 1 and report["checked"] == 1
    assert [item["name"] for item in report["missing"]] == ["lyon-2.wav"]
    unknown = cli("requeue", "--pbx", "nice", env=registry)
    assert unknown.returncode == 2 and "--pbx: no PBX named 'nice'" in unknown.stderr
    # status of one PBX: its recordings, calls, failures and bytes only.
    whole = json.loads(cli("status", "--json", env=registry).stdout)
    lyon = json.loads(cli("status", "--pbx", "lyon", "--json", env=registry).stdout)
    assert whole["recordings"]["archived"] == 2 and whole["calls"] == 4
    assert lyon["recordings"]["archived"] == 1 and lyon["recordings"]["failed"] == 1
    assert lyon["calls"] == 2 and lyon["bytes_stored"] == 4
    assert [f["name"] for f in lyon["failures"]] == ["lyon-1.wav"]
    assert [p["name"] for p in lyon["pbxs"]] == ["lyon"]
    shown = cli("status", "--pbx", "lyon", env=registry).stdout
    assert "recordings: pending 0, downloading 0, archived 1" in shown, shown
    assert cli("status", "--pbx", "nice", env=registry).returncode == 2


def test_user_add_takes_the_pbxs_a_user_may_see(registry: dict[str, str]) -> None:
    env = {**registry, "PW": "carol-password-1"}
    with open_index(f"sqlite:///{registry['CALLVAULT_ARCHIVE']}/callvault.db") as index:
        for name in ("paris", "lyon"):
            register_pbx(index, name)
    added = cli(
        "user", "add", "carol", "--role", "listener", "--pbxs", "paris, lyon",
        "--password-env", "PW", env=env,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "added listener carol (all extensions of PBX lyon, paris)" in added.stdout
    [carol] = json.loads(cli("user", "list", "--json", env=registry).stdout)
    assert carol["pbxs"] == ["lyon", "paris"]
    bad = cli("user", "add", "dan", "--role", "listener", "--pbxs", "Paris!", env=env)
    assert bad.returncode == 2 and "bad PBX 'Paris!'" in bad.stderr
    # A name the registry has not (a typo) would make a user who sees nothing.
    typo = cli("user", "add", "dan", "--role", "listener", "--pbxs", "pariss", env=env)
    assert typo.returncode == 2 and "no PBX named 'pariss' (lyon, paris)" in typo.stderr
    edited = cli("user", "edit", "carol", "--pbxs", "paris,nice", env=registry)
    assert edited.returncode == 2 and "no PBX named 'nice' (lyon, paris)" in edited.stderr


def test_only_a_refused_login_pauses_testing_and_changing_it_ends_the_pause(
    sim: Simulator, registry: dict[str, str]
) -> None:
    add_sim(sim, registry)
    # Not a refused password: a certificate that does not match. Fixed, it tests at once.
    assert cli("pbx", "edit", "paris", "--pin-sha256", "00" * 32, env=registry).returncode == 0
    mistrusted = cli("pbx", "test", "paris", env=registry)
    assert mistrusted.returncode == 1 and "not trying it again" not in mistrusted.stderr
    assert sim.cert_sha256 is not None
    assert (
        cli("pbx", "edit", "paris", "--pin-sha256", sim.cert_sha256, env=registry).returncode == 0
    )
    assert cli("pbx", "test", "paris", env=registry).returncode == 0
    # A refused user name: set right, the pause ends.
    assert cli("pbx", "edit", "paris", "--username", "nobody", env=registry).returncode == 0
    assert cli("pbx", "test", "paris", env=registry).returncode == 1
    paused = cli("pbx", "test", "paris", env=registry)
    assert "not trying it again" in paused.stderr and "--username NAME" in paused.stderr
    assert cli("pbx", "edit", "paris", "--username", sim.username, env=registry).returncode == 0
    assert cli("pbx", "test", "paris", env=registry).returncode == 0


def test_a_running_serve_follows_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PBXs added, changed and removed while serve runs are archived, re-opened with
    their new settings and let go, without a restart; one whose password this node
    cannot open is said once and leaves the others alone."""
    from callvault.simulator import SimulatorConfig

    key = tmp_path / "master.key"
    other_key = tmp_path / "other.key"
    for path in (key, other_key):
        assert cli("keys", "create", "--file", str(path)).returncode == 0
    archive = tmp_path / "archive"
    archive.mkdir()
    env = {"CALLVAULT_ARCHIVE": str(archive), "CALLVAULT_MASTER_KEY_FILE": str(key)}
    sims = {
        name: Simulator(SimulatorConfig(seed=n, event_retry_interval=0.2, serial=f"20000000000{n}"))
        for n, name in enumerate(("paris", "lyon", "nice", "brest"), start=1)
    }

    def add(name: str, environment: dict[str, str] = env) -> None:
        add_one_download_pbx(name, sims[name], environment)

    for sim in sims.values():
        sim.start()
    try:
        add("paris")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = load_settings(
            events_listen="127.0.0.1:0", poll_interval_s=0.3, registry_poll_s=0.3
        )
        with Archiver(archiver_config(settings, web=False)) as archiver:
            index = archiver.index
            assert index is not None

            def lane(name: str) -> Any:
                return next((x for x in archiver.lanes if x.name == name), None)

            add("lyon")
            assert wait_until(lambda: lane("lyon") is not None and lane("lyon").working)
            cdr = sims["lyon"].place_call(talk_seconds=1)
            assert wait_until(lambda: states(index) == {"archived": 1}), states(index)
            assert cdr.recording is not None
            [lyon] = [p for p in index.pbxs.list() if p.name == "lyon"]
            assert index.recordings.by_name(cdr.recording, pbx_id=lyon.id) is not None

            # Changed: its lane opens again with the new settings.
            before = lane("lyon")
            assert cli("pbx", "edit", "lyon", "--max-downloads", "2", env=env).returncode == 0
            assert wait_until(lambda: lane("lyon") not in (None, before) and lane("lyon").working)
            # Its pool is there before its workers have started: wait for them.
            assert wait_until(lambda: (now := lane("lyon")) is not None and now.workers() == (2, 2))
            assert not before.working

            # Removed: handed over and let go, its lease released.
            add("nice")
            assert wait_until(lambda: lane("nice") is not None and lane("nice").working)
            assert cli("pbx", "remove", "nice", env=env).returncode == 0
            assert wait_until(lambda: lane("nice") is None)
            assert [lease.node for lease in index.leases.all() if lease.node is not None] == [
                archiver.ownership.node,  # type: ignore[union-attr]
            ] * 2  # paris and lyon

            # Sealed with another master key: said once, the others carry on.
            with caplog.at_level(logging.ERROR, logger="callvault.archive"):
                add("brest", {**env, "CALLVAULT_MASTER_KEY_FILE": str(other_key)})
                time.sleep(1.5)  # several rounds
                sims["paris"].place_call(talk_seconds=1)
                assert wait_until(lambda: states(index) == {"archived": 2}), states(index)
            told = [r.getMessage() for r in caplog.records if "brest" in r.getMessage()]
            assert len(told) == 1 and "cannot be archived" in told[0], told
            assert lane("brest") is None
    finally:
        for sim in sims.values():
            sim.stop()


def test_backfill_while_serve_runs_is_done_by_the_node_with_its_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PBX a running serve holds is never logged in to a second time: `backfill` asks
    the node, which reads the history with its own session; the command follows it and
    says what it queued; the node's workers download."""
    from callvault.simulator import SimulatorConfig

    key = tmp_path / "master.key"
    assert cli("keys", "create", "--file", str(key)).returncode == 0
    archive = tmp_path / "archive"
    archive.mkdir()
    env = {"CALLVAULT_ARCHIVE": str(archive), "CALLVAULT_MASTER_KEY_FILE": str(key)}
    with Simulator(SimulatorConfig(seed=5, event_retry_interval=0.2)) as sim:
        sim.clock.advance(-72 * 3600)  # three days ago: older than reconciliation looks
        try:
            old = [sim.place_call(talk_seconds=1) for _ in range(3)]
        finally:
            sim.clock.advance(72 * 3600)
        add_sim(sim, env, password=sim.password)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = load_settings(events_listen="127.0.0.1:0", poll_interval_s=0.3)
        with Archiver(archiver_config(settings, web=False)) as archiver:
            index = archiver.index
            assert index is not None
            assert wait_until(lambda: archiver.lanes[0].session_state() == "ok")
            assert states(index) == {}  # reconciliation looks back two days only
            since = (datetime.now(ZoneInfo(sim.config.timezone)) - timedelta(days=4)).date()
            done = cli(
                "backfill", "--since", since.isoformat(),
                env={**env, "CALLVAULT_TIMEZONE": sim.config.timezone},
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert "is archived by node" in done.stderr and "runs there" in done.stderr
            assert "3 recordings queued, downloaded by node" in done.stdout, done.stdout
            assert wait_until(lambda: states(index) == {"archived": 3}), states(index)
            for cdr in old:
                assert cdr.recording is not None
                row = index.recordings.by_name(cdr.recording, pbx_id=archiver.lanes[0].pbx_id)
                assert row is not None and row.sha256 == sim.recording_sha256(cdr.recording)
        logins = [s for s in sim.request_sources if s[1] == "login"]
        assert len(logins) == 1, logins  # the node's only


def test_status_gives_each_registered_pbx_its_own_time_zone(
    tmp_path: Path, registry: dict[str, str]
) -> None:
    env = {**registry, "PBX_PASSWORD": "not-a-real-one"}
    for name, zone in (("lyon", ["--timezone", "Europe/Paris"]), ("nyc", [])):
        added = cli(
            "pbx", "add", name, "--url", f"https://{name}.example:8088", "--username", "api",
            "--password-env", "PBX_PASSWORD", *zone, env=env,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
    text = cli("status", env=registry).stdout
    assert (
        "PBX time zones: lyon Europe/Paris, nyc not saved yet (serve or backfill saves it)" in text
    ), text
    shown = {
        p["name"]: p["timezone"]
        for p in json.loads(cli("status", "--json", env=registry).stdout)["pbxs"]
    }
    assert shown == {"lyon": "Europe/Paris", "nyc": None}
    one = cli("status", "--pbx", "lyon", env=registry).stdout
    assert "PBX time zone: Europe/Paris" in one, one
