"""A registered PBX whose password `serve` cannot open (sealed with a master key it was not
given) is said once and left out at start, as a running serve does with one added later;
the others are archived, and `status` says why that PBX is not. Only when no PBX can be
opened, or that PBX was named (`--only`, `--pbx`), does serve refuse to start, in one line.

Everything real: the simulator over HTTPS on 127.0.0.1, `callvault` as a child process,
the registry in SQLite.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from callvault.simulator import Simulator, SimulatorConfig
from support.archive import ServeProcess, all_archived, registry_env, run_cli, wait_until


@pytest.fixture
def sims() -> Iterator[dict[str, Simulator]]:
    """Three simulated PBXs: alpha and gamma sealed with serve's key, beta with another."""
    running = {
        name: Simulator(SimulatorConfig(seed=n, event_retry_interval=0.2, serial=f"30000000000{n}"))
        for n, name in enumerate(("alpha", "beta", "gamma"), start=1)
    }
    for sim in running.values():
        sim.start()
    try:
        yield running
    finally:
        for sim in running.values():
            sim.stop()


def _keys(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """serve's key file (master.key) and another one (other.key), made; their ids."""
    ids = {}
    for name in ("master.key", "other.key"):
        made = run_cli(env, "keys", "create", "--file", str(tmp_path / name))
        assert made.returncode == 0, made.stderr
        ids[name] = made.stdout.split("master key ")[1].split()[0].rstrip(":")
    (tmp_path / "archive").mkdir()
    return ids


def _add(env: dict[str, str], name: str, sim: Simulator, key_file: Path | None = None) -> None:
    """`pbx add NAME` for `sim`, its password sealed with `key_file` (default serve's)."""
    assert sim.cert_sha256 is not None
    environment = {**env, "PW": sim.password}
    if key_file is not None:
        environment["CALLVAULT_MASTER_KEY_FILE"] = str(key_file)
    added = run_cli(
        environment,
        "pbx", "add", name, "--url", sim.url, "--username", sim.username,
        "--password-env", "PW", "--pin-sha256", sim.cert_sha256,
        "--timezone", sim.config.timezone, "--max-downloads", "1",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr


def _secrets(tmp_path: Path, sims: dict[str, Simulator]) -> list[str]:
    """What must never be shown: the PBX passwords and the master keys."""
    keys = [
        line.strip()
        for name in ("master.key", "other.key")
        for line in (tmp_path / name).read_text().splitlines()
        if line.startswith("cvmk1.")
    ]
    assert len(keys) == 2
    return [sim.password for sim in sims.values()] + keys


def test_serve_leaves_out_a_pbx_it_cannot_open_and_archives_the_others(
    sims: dict[str, Simulator], tmp_path: Path
) -> None:
    env = registry_env(tmp_path, CALLVAULT_REGISTRY_POLL_S="0.3")
    ids = _keys(tmp_path, env)
    _add(env, "alpha", sims["alpha"])
    _add(env, "beta", sims["beta"], tmp_path / "other.key")
    serve = ServeProcess(env, tmp_path)
    try:
        serve.start()
        started = "callvault serve: archiving"
        assert wait_until(lambda: started in serve.log_text() or not serve.running(), 15)
        assert serve.running(), serve.log_text()
        assert wait_until(lambda: sims["alpha"].login_count >= 1, 15), serve.log_text()
        cdr = sims["alpha"].place_call(talk_seconds=1)
        assert cdr.recording is not None
        db = tmp_path / "archive" / "callvault.db"
        assert wait_until(lambda: all_archived(db, [cdr.recording]), 15), serve.log_text()

        # A PBX added now is taken up by the registry's next look: beta has been looked
        # at again since the start, and is still said only once.
        _add(env, "gamma", sims["gamma"])
        assert wait_until(lambda: "PBX gamma" in serve.log_text(), 15), serve.log_text()
        assert wait_until(lambda: sims["gamma"].login_count >= 1, 15), serve.log_text()

        status = run_cli(env, "status", "--json")
        text = run_cli(env, "status")
        log = serve.log_text()
    finally:
        serve.stop()

    about_beta = [line for line in log.splitlines() if "beta" in line]
    assert len(about_beta) == 1, log
    [line] = about_beta
    assert " ERROR " in line and "PBX beta cannot be archived" in line, line
    assert f"sealed with master key {ids['other.key']}" in line, line
    assert ids["master.key"] in line and "master.key" in line, line  # what was loaded
    assert "Traceback" not in log
    assert sims["beta"].login_count == 0
    for secret in _secrets(tmp_path, sims):
        assert secret not in log

    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    sessions = {pbx["name"]: pbx["session"] for pbx in report["pbxs"]}
    assert sessions["alpha"]["state"] == "ok", sessions
    beta = sessions["beta"]
    assert beta["state"] == "error", beta
    assert ids["other.key"] in beta["summary"] and "password" in beta["summary"], beta
    said = [note for note in report["attention"] if "beta" in note]
    assert len(said) == 1, report["attention"]
    assert ids["other.key"] in said[0] and "start one for it" not in said[0], said
    assert ids["other.key"] in text.stdout and "start one for it" not in text.stdout
    for secret in _secrets(tmp_path, sims):
        assert secret not in status.stdout + text.stdout


@pytest.mark.parametrize(
    ("registered", "args"),
    [
        (("beta",), ()),  # no PBX can be opened
        (("alpha", "beta"), ("--only", "beta")),  # named
        (("alpha", "beta"), ("--pbx", "beta")),  # named
        (("alpha", "beta"), ("--only", "alpha", "--only", "beta")),  # named among others
    ],
    ids=["only-it", "only", "pbx", "only-both"],
)
def test_serve_refuses_in_one_line_when_no_pbx_or_the_named_one_cannot_be_opened(
    registered: tuple[str, ...], args: tuple[str, ...], tmp_path: Path
) -> None:
    env = registry_env(tmp_path)
    ids = _keys(tmp_path, env)
    # Refused before anything connects: the simulators only give the PBXs URLs and pins.
    with (
        Simulator(SimulatorConfig(seed=1, serial="300000000001")) as alpha,
        Simulator(SimulatorConfig(seed=2, serial="300000000002")) as beta,
    ):
        sims = {"alpha": alpha, "beta": beta}
        for name in registered:
            key = tmp_path / "other.key" if name == "beta" else None
            _add(env, name, sims[name], key)
        done = run_cli(env, "serve", "--no-web", *args)
        assert alpha.login_count == 0 and beta.login_count == 0
        secrets = _secrets(tmp_path, sims)

    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("callvault: error: pbx:beta:password: "), line
    assert f"sealed with master key {ids['other.key']}, which is not among" in line, line
    # How to add the key, in the docs' terms; never the key itself.
    key_file = str(tmp_path / "master.key")
    assert re.search(rf"add that key to {re.escape(key_file)} .*line", line), line
    assert "Traceback" not in done.stderr and done.stdout == ""
    for secret in secrets:
        assert secret not in line


def test_with_the_keys_in_the_environment_the_line_says_how_to_add_one_there(
    tmp_path: Path,
) -> None:
    env = registry_env(tmp_path)
    ids = _keys(tmp_path, env)
    with Simulator(SimulatorConfig(seed=2, serial="300000000002")) as beta:
        _add(env, "beta", beta, tmp_path / "other.key")
        [key] = _secrets(tmp_path, {})[:1]  # serve's key, given as the variable's value
        del env["CALLVAULT_MASTER_KEY_FILE"]
        done = run_cli({**env, "CALLVAULT_MASTER_KEY": key}, "serve", "--no-web")
        secrets = _secrets(tmp_path, {"beta": beta})

    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert f"sealed with master key {ids['other.key']}" in line, line
    assert f"loaded from CALLVAULT_MASTER_KEY ({ids['master.key']})" in line, line
    assert "add that key to CALLVAULT_MASTER_KEY after the first one, separated by a comma" in (
        line
    )
    for secret in secrets:
        assert secret not in line
