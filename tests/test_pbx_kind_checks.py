"""A PBX registered as the wrong kind, and a PBX's kind-specific fields over the JSON API.

* `pbx test` (`ops.test_pbx`) of a Yeastar Cloud PBX registered as s-series, or of an
  S-Series PBX registered as cloud, is not ok: one line says which kind the PBX answers
  like (the Cloud PBX's login gives a refresh token, the S-Series PBX's does not) and the
  `pbx edit` that fixes it, which then makes the test pass. Against the real simulator
  over HTTPS (``kind="cloud"`` or not) and the real registry on SQLite; and once through
  the command line as a person runs it.
* `GET /api/pbxs/{name}`, a field changed, `PATCH` of the whole object: accepted with the
  fields as GET shows them (`api_version` "openapi" of a P-Series PBX, `webhook_secret`
  true or false, an insecure PBX's null pin), changing only the field changed; "openapi"
  of another kind, or an S-Series API version of a P-Series PBX, refused with a 422 of
  one line. Over the real web app (uvicorn on 127.0.0.1, SQLite).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from callvault.index import Index, open_index
from callvault.index.audit import AuditFilter
from callvault.index.pbxs import PbxConfig
from callvault.keys import Keyring, MasterKey
from callvault.ops import add_pbx, edit_pbx, pbx_view
from callvault.ops import test_pbx as login_test  # not a test of this module
from callvault.simulator import Simulator, SimulatorConfig
from support.pbx_sim import outcomes
from support.web import ADMIN, LiveWeb, audit_entries, csrf_of, live_web, text_of

KEYRING = Keyring((MasterKey.generate(),), "tests")
PASSWORD = "kinds-Pa55word"
WEBHOOK_SECRET = "Wh00kS3cretFromThePbx0123456789a"
NOW = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)


# -- pbx test: the kind the PBX answers like ------------------------------------------------


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    """The registry on SQLite, in a new archive."""
    opened = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
    try:
        yield opened
    finally:
        opened.close()


def simulator(kind: str) -> Simulator:
    """The S-Series simulator, as an S-Series PBX or (``cloud``) as the Yeastar Cloud PBX,
    whose login also answers a refresh token."""
    return Simulator(SimulatorConfig(kind=kind, password=PASSWORD, seed=11))


def register(index: Index, name: str, sim: Simulator, kind: str) -> None:
    assert sim.cert_sha256 is not None
    config = PbxConfig(
        url=sim.url,
        username=sim.username,
        api_version="v2.0.0",
        pin_sha256=sim.cert_sha256,
        timezone=sim.config.timezone,
        kind=kind,
    )
    add_pbx(index, KEYRING, name, config, PASSWORD, actor="test", remote_addr="local", now=NOW)


@pytest.mark.parametrize(
    ("actual", "registered", "like"),
    [
        pytest.param("cloud", "s-series", "a Yeastar Cloud PBX", id="cloud-as-s-series"),
        pytest.param("s-series", "cloud", "an S-Series PBX", id="s-series-as-cloud"),
    ],
)
async def test_a_pbx_registered_as_the_other_kind_fails_its_test_with_the_fix(
    index: Index, actual: str, registered: str, like: str
) -> None:
    with simulator(actual) as sim:
        register(index, "hq", sim, registered)
        result = await login_test(index, index.pbxs.require("hq"), KEYRING, now=NOW)
        assert result.ok is False and result.error_kind == "wrong-kind"
        assert result.error is not None and "\n" not in result.error
        assert f"answers like {like}" in result.error
        assert result.error.endswith(f"`callvault pbx edit hq --kind {actual}`"), result.error
        assert PASSWORD not in result.error
        # The login itself worked: what it found is said as for any PBX.
        assert result.report_transport == "HTTP"
        assert result.calls_last_day == len(sim.state.cdrs())
        # Kept as the last test, as `pbx list` and `pbx show` say it.
        last = pbx_view(index.pbxs.require("hq")).last_test
        assert (last["ok"], last["error"]) == (False, result.error)

        edit_pbx(index, "hq", {"kind": actual}, actor="test", remote_addr="local", now=NOW)
        fixed = await login_test(index, index.pbxs.require("hq"), KEYRING, now=NOW)
        assert (fixed.ok, fixed.error, fixed.error_kind) == (True, None, None)
        assert pbx_view(index.pbxs.require("hq")).last_test["ok"] is True
        # One login per test (never a retry), each logged out.
        assert outcomes(sim, "login") == ["Success", "Success"]
        assert outcomes(sim, "logout") == ["Success", "Success"]


@pytest.mark.parametrize("kind", ["s-series", "cloud"])
async def test_a_pbx_registered_as_its_own_kind_passes(index: Index, kind: str) -> None:
    with simulator(kind) as sim:
        register(index, "hq", sim, kind)
        result = await login_test(index, index.pbxs.require("hq"), KEYRING, now=NOW)
        assert (result.ok, result.error, result.kind) == (True, None, kind)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`callvault ARGS` as a child process, without this process's CALLVAULT_* settings."""
    outer = {k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")}
    return subprocess.run(
        [sys.executable, "-m", "callvault", *args],
        env={**outer, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pbx_test_tells_an_admin_to_register_a_cloud_pbx_as_cloud(tmp_path: Path) -> None:
    key = tmp_path / "master.key"
    env = {"CALLVAULT_ARCHIVE": str(tmp_path / "archive"), "CALLVAULT_MASTER_KEY_FILE": str(key)}
    (tmp_path / "archive").mkdir()
    assert cli("keys", "create", "--file", str(key), env=env).returncode == 0
    with simulator("cloud") as sim:
        assert sim.cert_sha256 is not None
        added = cli(
            "pbx", "add", "hq", "--url", sim.url, "--username", sim.username,
            "--password-env", "PBX_PASSWORD", "--pin-sha256", sim.cert_sha256,
            "--api-version", "v2.0.0", "--timezone", sim.config.timezone,
            env={**env, "PBX_PASSWORD": PASSWORD},
        )  # fmt: skip
        assert added.returncode == 0, added.stderr  # as s-series, the default

        tested = cli("pbx", "test", "hq", env=env)
        assert tested.returncode == 1
        # One line (as docs/pbx-kinds.md shows it), with the command to run.
        assert tested.stderr.strip().splitlines() == [
            "callvault: error: PBX hq: logged in, but the PBX answers like a Yeastar Cloud "
            "PBX (its login gave a refresh token), not like an S-Series PBX as registered: "
            "register it as cloud with `callvault pbx edit hq --kind cloud`"
        ]
        shown = cli("pbx", "show", "hq", env=env)
        assert "last test        FAILED at" in shown.stdout and "--kind cloud" in shown.stdout

        # The command it gives is the fix.
        edited = cli("pbx", "edit", "hq", "--kind", "cloud", env=env)
        assert edited.returncode == 0 and "changed PBX hq: kind" in edited.stdout
        again = cli("pbx", "test", "hq", env=env)
        assert again.returncode == 0, again.stderr
        assert "  kind              cloud" in again.stdout
        output = added.stdout + added.stderr + tested.stdout + tested.stderr + again.stdout
        assert PASSWORD not in output


# -- the JSON API: a PBX as GET shows it, sent back ---------------------------------------


@pytest.fixture
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive", keyring=KEYRING) as live:
        yield live


@pytest.fixture
def admin(web: LiveWeb) -> httpx.Client:
    client, _ = web.bearer(ADMIN[0])
    for body in (
        {
            "name": "lyon",
            "kind": "p-series",
            "url": "https://lyon.example:8088",
            "username": "0fK3xRHcAppId",
            "password": "client-Secret-1",
            "webhook_secret": WEBHOOK_SECRET,
        },
        {
            "name": "paris",
            "url": "https://paris.example:8088",
            "username": "api",
            "password": PASSWORD,
            "api_version": "v2.0.0",
            "insecure": True,
        },
    ):
        made = client.post("/api/pbxs", json=body)
        assert made.status_code == 201, made.text
    return client


def test_a_pbx_as_get_shows_it_is_patched_back_with_one_field_changed(
    web: LiveWeb, admin: httpx.Client
) -> None:
    index = web.archive.index
    stored = {name: index.pbxs.require(name).config for name in ("lyon", "paris")}
    shown = {view["name"]: view for view in admin.get("/api/pbxs").json()}
    assert shown["lyon"]["api_version"] == "openapi" and shown["lyon"]["webhook_secret"] is True
    assert (shown["paris"]["tls"], shown["paris"]["webhook_secret"]) == ("insecure", False)

    for name in ("lyon", "paris"):
        view = admin.get(f"/api/pbxs/{name}").json()
        answer = admin.patch(f"/api/pbxs/{name}", json={**view, "max_downloads": 3})
        assert answer.status_code == 200, answer.text
        after = answer.json()
        # Only the field changed changed, as the PBX's GET and its registry entry say.
        assert after == {
            **view,
            "max_downloads": 3,
            "updated_at": after["updated_at"],
        }
        assert admin.get(f"/api/pbxs/{name}").json() == after
        config = index.pbxs.require(name).config
        assert config.max_downloads == 3
        assert (config.api_version, config.insecure) == (
            stored[name].api_version,
            stored[name].insecure,
        )
    assert index.pbxs.require("lyon").has_webhook_secret
    details = [e.detail for e in audit_entries(web, action="pbx_edit")]
    assert len(details) == 2
    assert all(d.startswith("changed max_downloads; now ") for d in details), details


@pytest.mark.parametrize(
    ("name", "body", "reason"),
    [
        pytest.param(
            "paris",
            {"api_version": "openapi"},
            "api_version: 'openapi' is the P-Series API; this PBX (s-series) speaks the S-Series",
            id="openapi-of-s-series",
        ),
        pytest.param(
            "lyon",
            {"api_version": "v2.0.0"},
            "api_version: a P-Series PBX speaks the OpenAPI, not an S-Series API version",
            id="s-series-version-of-p-series",
        ),
        pytest.param(
            "lyon",
            {"kind": "cloud", "api_version": "openapi"},
            "api_version: 'openapi' is the P-Series API; this PBX (cloud) speaks the S-Series",
            id="openapi-kept-while-leaving-p-series",
        ),
        pytest.param(
            "paris",
            {"webhook_secret": True},
            "webhook_secret: true or false only as GET shows it",
            id="webhook-secret-true-without-one",
        ),
    ],
)
def test_a_field_that_means_nothing_for_the_pbx_is_refused_in_one_line(
    web: LiveWeb, admin: httpx.Client, name: str, body: dict[str, object], reason: str
) -> None:
    before = admin.get(f"/api/pbxs/{name}").json()
    answer = admin.patch(f"/api/pbxs/{name}", json={**before, **body, "max_downloads": 3})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    assert detail.startswith(reason), detail
    assert admin.get(f"/api/pbxs/{name}").json() == before  # nothing changed
    assert audit_entries(web, action="pbx_edit") == []


def test_openapi_is_taken_of_a_pbx_becoming_p_series(web: LiveWeb, admin: httpx.Client) -> None:
    view = admin.get("/api/pbxs/paris").json()
    # Without the P-Series credentials: the S-Series user and password cannot be right.
    refused = admin.patch(
        "/api/pbxs/paris", json={**view, "kind": "p-series", "api_version": "openapi"}
    )
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "kind p-series: a p-series PBX logs in with its API application's Client ID and "
        "Secret, not the s-series PBX's: give username and password with it"
    )
    answer = admin.patch(
        "/api/pbxs/paris",
        json={
            **view,
            "kind": "p-series",
            "api_version": "openapi",
            "username": "0fK3xRHcNewApp",
            "password": "client-Secret-2",
        },
    )
    assert answer.status_code == 200, answer.text
    assert (answer.json()["kind"], answer.json()["api_version"]) == ("p-series", "openapi")
    assert web.archive.index.pbxs.require("paris").config.api_version == "v2.0.0"


def test_the_version_a_p_series_pbx_keeps_unseen_is_taken_as_unchanged(
    web: LiveWeb, admin: httpx.Client
) -> None:
    """What the registry keeps in a P-Series PBX's version field (GET shows "openapi"
    instead), as the page's form may send it: nothing changes."""
    kept = web.archive.index.pbxs.require("lyon").config.api_version
    answer = admin.patch("/api/pbxs/lyon", json={"api_version": kept})
    assert answer.status_code == 200 and answer.json()["api_version"] == "openapi"
    [edit] = audit_entries(web, action="pbx_edit")
    assert edit.detail.startswith("changed nothing; now ")


def test_the_pbx_page_gives_the_kind_fix_without_calling_it_a_failed_login(web: LiveWeb) -> None:
    with simulator("cloud") as sim:
        register(web.archive.index, "hq", sim, "s-series")
        browser = web.login(*ADMIN)
        token = csrf_of(browser.get("/admin/pbxs").text)
        tested = browser.post("/admin/pbxs/hq/test", data={"csrf": token})
        assert tested.status_code == 200
        said = text_of(tested.text, "test-result")
        assert said.startswith("PBX hq: logged in, but the PBX answers like a Yeastar Cloud PBX"), (
            said
        )
        assert said.endswith("`callvault pbx edit hq --kind cloud`"), said
        assert PASSWORD not in tested.text


def test_a_pseries_pbx_as_get_shows_it_registers_another(web: LiveWeb, admin: httpx.Client) -> None:
    view = admin.get("/api/pbxs/lyon").json()
    assert view["api_version"] == "openapi"
    body = {key: view[key] for key in ("kind", "url", "username", "api_version", "timezone")}
    made = admin.post("/api/pbxs", json={**body, "name": "lyon2", "password": "client-Secret-2"})
    assert made.status_code == 201, made.text
    assert made.json()["api_version"] == "openapi"
    assert web.archive.index.pbxs.require("lyon2").config.kind == "p-series"
    refused = admin.post(
        "/api/pbxs",
        json={**body, "name": "nice", "kind": "s-series", "password": PASSWORD},
    )
    assert refused.status_code == 422
    assert "'openapi' is the P-Series API; this PBX (s-series)" in refused.json()["detail"]
    assert web.archive.index.pbxs.get("nice") is None


def test_api_errors_name_fields_and_unknown_fields_are_refused(
    web: LiveWeb, admin: httpx.Client
) -> None:
    before = web.archive.index.pbxs.require("paris")
    cases = [
        ({"url": "127.0.0.1:1"}, "url: PBX URL '127.0.0.1:1' has no scheme"),
        ({"timezone": "Mars/Olympus"}, "timezone: unknown time zone"),
        ({"pin_sha256": "zz"}, "pin_sha256: "),
        ({"bogus": 1}, "unknown field bogus: the fields are "),
        ({"name": "other"}, "name: a PBX keeps its name (paris); it cannot be renamed"),
    ]
    for body, start in cases:
        answer = admin.patch("/api/pbxs/paris", json=body)
        assert answer.status_code == 422, (body, answer.text)
        detail = answer.json()["detail"]
        assert detail.startswith(start), (body, detail)
        assert "--" not in detail, detail
    both = admin.post(
        "/api/pbxs",
        json={
            "name": "nice",
            "url": "https://nice.example:8088",
            "username": "api",
            "password": PASSWORD,
            "pin_sha256": "ab" * 32,
            "insecure": True,
        },
    )
    assert both.status_code == 422
    assert both.json()["detail"].startswith("choose only one of ca_file, pin_sha256 and insecure")
    typo = admin.post(
        "/api/pbxs",
        json={"name": "nice", "url": "https://nice.example:8088", "username": "api",
              "password": PASSWORD, "max_download": 3},
    )  # fmt: skip
    assert typo.status_code == 422 and "unknown field max_download" in typo.json()["detail"]
    # Nothing changed or made, and a command quoted in a message keeps its flags.
    assert web.archive.index.pbxs.require("paris") == before
    assert web.archive.index.pbxs.get("nice") is None


def test_api_words_keep_quoted_commands() -> None:
    from callvault.web._pbxs import api_words

    assert api_words("--tcp-report-port: give --api-version v2.0.0") == (
        "tcp_report_port: give api_version v2.0.0"
    )
    assert api_words("--secret-env: run `callvault pbx edit x --kind cloud`") == (
        "password: run `callvault pbx edit x --kind cloud`"
    )


def test_the_cli_keeps_each_kind_to_its_own_settings(tmp_path: Path) -> None:
    key = tmp_path / "master.key"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CALLVAULT_")},
        "CALLVAULT_ARCHIVE": str(tmp_path / "archive"),
        "CALLVAULT_MASTER_KEY_FILE": str(key),
        "PBX_PASSWORD": PASSWORD,
    }
    (tmp_path / "archive").mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "callvault", *args], env=env, capture_output=True, text=True
        )

    assert cli("keys", "create", "--file", str(key)).returncode == 0
    url = ["--url", "https://pbx.example:8088"]
    refusals = [
        (
            ["pbx", "add", "p1", "--kind", "p-series", *url, "--client-id", "cid",
             "--secret-env", "PBX_PASSWORD", "--api-version", "v2.0.0"],
            "--api-version: a P-Series PBX speaks the OpenAPI",
        ),
        (
            ["pbx", "add", "p2", "--kind", "p-series", *url, "--username", "api",
             "--secret-env", "PBX_PASSWORD"],
            "--username is for an API user of the S-Series API",
        ),
        (
            ["pbx", "add", "c1", "--kind", "cloud", *url, "--username", "api",
             "--password-env", "PBX_PASSWORD", "--api-version", "v2.0.0",
             "--tcp-report-port", "5000"],
            "--tcp-report-port: only an S-Series PBX reports over TCP; a cloud PBX does not",
        ),
    ]  # fmt: skip
    for args, said in refusals:
        done = cli(*args)
        assert done.returncode == 2 and said in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1
    added = cli("pbx", "add", "s1", *url, "--username", "api", "--password-env", "PBX_PASSWORD")
    assert added.returncode == 0, added.stderr
    to_pseries = cli("pbx", "edit", "s1", "--kind", "p-series")
    assert to_pseries.returncode == 2
    assert "give --client-id and --secret-env with it" in to_pseries.stderr
    moved = cli(
        "pbx", "edit", "s1", "--kind", "p-series", "--client-id", "cid",
        "--secret-env", "PBX_PASSWORD",
    )  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    version = cli("pbx", "edit", "s1", "--api-version", "v2.0.0")
    assert version.returncode == 2 and "has no S-Series API version" in version.stderr
    with open_index(f"sqlite:///{tmp_path / 'archive' / 'callvault.db'}") as index:
        entries = [e.detail for e in index.audit.query(AuditFilter(action="pbx_edit"))]
    assert any("kind=p-series" in entry and "api=openapi" in entry for entry in entries), entries


def test_a_web_app_without_the_master_key_says_a_test_needs_it_to_open(tmp_path: Path) -> None:
    with live_web(tmp_path / "archive") as web, simulator("s-series") as sim:
        register(web.archive.index, "hq", sim, "s-series")
        admin, _ = web.bearer(ADMIN[0])
        answer = admin.post("/api/pbxs/hq/test")
        assert answer.status_code == 409
        detail = answer.json()["detail"]
        assert detail.startswith("this web app has no master key to open the PBX's password with")
        assert "CALLVAULT_MASTER_KEY_FILE" in detail
        assert outcomes(sim, "login") == []
