"""Users and API tokens: the CLI's commands, the API and the admin page (the library
itself: test_index_users.py). Tokens are stored hashed and revocable; answers that carry a
one-time secret are never cached, and no repr shows a secret.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
from click.testing import CliRunner

from callvault.cli import _web, app
from callvault.index import audit, open_index
from support.index_data import register_pbx
from support.web import (
    ADMIN,
    LISTENER_2000,
    T0,
    LiveWeb,
    audit_entries,
    csrf_of,
    elements,
    live_web,
    login,
)

runner = CliRunner()


def _cli(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    assert _web.user_app is not None  # imported: the commands are registered
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_cli_user_and_token_commands(tmp_path: Path) -> None:
    archive = str(tmp_path)
    code, out, _ = _cli("user", "add", "alice", "--role", "admin", "--archive", archive)
    assert code == 0
    password = out.strip().splitlines()[-1].rsplit(" ", 1)[1]
    code, out, _ = _cli(
        "user", "add", "bob", "--role", "listener", "--scope", "2000-2099",
        "--password-env", "BOB_PW", "--archive", archive,
        env={"BOB_PW": "bob-password-1"},
    )  # fmt: skip
    assert code == 0 and "bob-password-1" not in out and "password" not in out
    code, out, _ = _cli("user", "list", "--json", "--archive", archive)
    listed = json.loads(out)
    assert [(u["name"], u["role"], u["scope"]) for u in listed] == [
        ("alice", "admin", ""),
        ("bob", "listener", "2000-2099"),
    ]
    index = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
    try:
        assert index.users.verify_password("alice", password) is not None
        assert index.users.verify_password("bob", "bob-password-1") is not None
        code, out, _ = _cli("token", "create", "--user", "bob", "--archive", archive)
        assert code == 0
        secret = out.strip().rsplit(" ", 1)[1]
        assert index.tokens.user_for(secret) is not None
        code, out, _ = _cli("token", "list", "--json", "--archive", archive)
        assert secret not in out and json.loads(out)[0]["user"] == "bob"
        assert _cli("token", "revoke", "1", "--archive", archive)[0] == 0
        assert index.tokens.user_for(secret) is None
        code, _, err = _cli("token", "revoke", "1", "--archive", archive)
        assert code == 1 and err.startswith("callvault: error: no live token")
        code, _, err = _cli("user", "add", "alice", "--role", "admin", "--archive", archive)
        assert code == 1 and "already exists" in err and "Traceback" not in err
        code, _, err = _cli("user", "add", "x", "--role", "boss", "--archive", archive)
        assert code == 2 and "bad role" in err
        assert _cli("user", "remove", "bob", "--archive", archive)[0] == 0
        assert [u.name for u in index.users.list()] == ["alice"]
        actions = [e.action for e in index.audit.query()]
        assert actions.count(audit.USER_ADD) == 2 and audit.USER_REMOVE in actions
        assert audit.TOKEN_CREATE in actions and audit.TOKEN_REVOKE in actions
        assert all(e.actor.startswith("cli") for e in index.audit.query())
    finally:
        index.close()
    code, _, err = _cli("user", "list", "--archive", str(tmp_path / "nope"))
    assert code == 1 and "does not exist" in err


def test_cli_user_passwd_ends_the_users_sessions_and_the_new_password_logs_in(
    tmp_path: Path,
) -> None:
    """`callvault user passwd` against a real app over sockets sharing the index."""
    with live_web(tmp_path) as web:
        bob = web.login(*LISTENER_2000)
        alice = web.login(*ADMIN)
        assert bob.get("/api/me").json()["name"] == "bob"
        code, out, err = _cli("user", "passwd", "bob", "--archive", str(tmp_path))
        assert code == 0, err
        said, shown = out.strip().splitlines()
        assert said == "new password set for bob; their web sessions have ended"
        assert shown.startswith("password for bob (shown once): ")
        password = shown.rsplit(" ", 1)[1]
        assert bob.get("/api/me").status_code == 401  # the session from before
        assert alice.get("/api/me").status_code == 200  # another user's is untouched
        assert login(web.client(), *LISTENER_2000).status_code != 303  # old password refused
        assert web.login("bob", password).get("/api/me").json()["name"] == "bob"
        # From an environment variable: nothing printed but the one line.
        code, out, err = _cli(
            "user", "passwd", "bob", "--password-env", "BOB_PW", "--archive", str(tmp_path),
            env={"BOB_PW": "bob-password-3"},
        )  # fmt: skip
        assert code == 0, err
        assert out == "new password set for bob; their web sessions have ended\n"
        assert web.login("bob", "bob-password-3").get("/api/me").status_code == 200
        passwd = web.archive.index.audit.query(audit.AuditFilter(target="bob"))
        assert [e.action for e in passwd][:2] == [audit.USER_PASSWORD] * 2
        assert passwd[0].actor.startswith("cli")
        # Mistakes are one line, and change nothing.
        code, _, err = _cli("user", "passwd", "nobody", "--archive", str(tmp_path))
        assert (code, err) == (1, "callvault: error: no user named 'nobody'\n")
        code, _, err = _cli(
            "user", "passwd", "bob", "--password-env", "BOB_PW", "--archive", str(tmp_path),
            env={"BOB_PW": "short"},
        )  # fmt: skip
        assert code == 2 and err.startswith("callvault: error: the password is too short")
        code, _, err = _cli(
            "user", "passwd", "bob", "--password-env", "NO_SUCH_PW", "--archive", str(tmp_path),
            env={"NO_SUCH_PW": None},
        )  # fmt: skip
        assert code == 2 and "NO_SUCH_PW is empty or not set" in err
        assert web.login("bob", "bob-password-3").get("/api/me").status_code == 200


def test_cli_user_remove_never_removes_the_last_admin(tmp_path: Path) -> None:
    archive = str(tmp_path)
    assert _cli("user", "add", "alice", "--role", "admin", "--archive", archive)[0] == 0
    assert _cli("user", "add", "bob", "--role", "listener", "--archive", archive)[0] == 0
    code, out, err = _cli("user", "remove", "alice", "--archive", archive)
    assert (code, out) == (1, "")
    assert err == (
        "callvault: error: 'alice' is the last admin: add another admin before removing it\n"
    )
    code, _, err = _cli("user", "remove", "nobody", "--archive", archive)
    assert (code, err) == (1, "callvault: error: no user named 'nobody'\n")
    assert _cli("user", "add", "carol", "--role", "admin", "--archive", archive)[0] == 0
    assert _cli("user", "remove", "alice", "--archive", archive)[:2] == (0, "removed alice\n")
    code, out, _ = _cli("user", "list", "--json", "--archive", archive)
    assert [u["name"] for u in json.loads(out)] == ["bob", "carol"]


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive") as live:
        yield live


def test_user_admin_over_api(web: LiveWeb) -> None:
    admin, _ = web.bearer(ADMIN[0])
    made = admin.post(
        "/api/users", json={"name": "dave", "role": "listener", "scope": "3000-3009, 3100"}
    )
    assert made.status_code == 201
    password = made.json()["password"]
    assert password and len(password) >= 12
    assert made.json()["user"]["scope"] == "3000-3009,3100"
    dave = web.login("dave", password)
    assert dave.get("/api/me").json()["scope"] == "3000-3009,3100"
    assert admin.post("/api/users", json={"name": "dave", "role": "listener"}).status_code == 409
    assert (
        admin.post(
            "/api/users", json={"name": "eve", "role": "listener", "scope": "9-1"}
        ).status_code
        == 422
    )
    assert admin.delete("/api/users/alice").status_code == 409  # not yourself
    assert admin.delete("/api/users/dave").status_code == 204
    assert dave.get("/api/me").status_code == 401  # the session dies with the user
    assert admin.delete("/api/users/dave").status_code == 404


def test_tokens_are_stored_hashed_and_revocable(web: LiveWeb) -> None:
    admin, _ = web.bearer(ADMIN[0])
    created = admin.post("/api/tokens", json={"user": "carol", "label": "nightly export"})
    assert created.status_code == 201
    secret = created.json()["secret"]
    token_id = created.json()["token"]["id"]
    # The database and its write-ahead log: every byte the index holds on disk.
    db_bytes = b"".join(p.read_bytes() for p in Path(web.archive.root).glob("callvault.db*"))
    assert secret.encode() not in db_bytes
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in db_bytes
    carol = web.client()
    carol.headers["Authorization"] = f"Bearer {secret}"
    assert carol.get("/api/me").json()["name"] == "carol"
    listed = {t["id"]: t for t in admin.get("/api/tokens").json()}
    assert listed[token_id]["last_used_at"] is not None
    assert "secret" not in listed[token_id]
    assert admin.delete(f"/api/tokens/{token_id}").status_code == 204
    assert carol.get("/api/me").status_code == 401
    assert admin.delete(f"/api/tokens/{token_id}").status_code == 404
    actions = [e.action for e in web.archive.index.audit.query(audit.AuditFilter(target="carol"))]
    assert audit.TOKEN_CREATE in actions and audit.TOKEN_REVOKE in actions


def test_admin_page_creates_and_revokes_tokens(web: LiveWeb) -> None:
    admin = web.login(*ADMIN)
    csrf = csrf_of(admin.get("/admin").text)
    made = admin.post("/admin/tokens", data={"user": "bob", "label": "report", "csrf": csrf})
    assert made.status_code == 200
    secret = made.text.split('id="new-token">', 1)[1].split("<", 1)[0]
    index = web.archive.index
    found = index.tokens.user_for(secret)
    assert found is not None and found.name == "bob"
    token_id = index.tokens.list()[0].id
    # The secret is shown once: the admin page never shows it again.
    assert secret not in admin.get("/admin").text
    revoked = admin.post(f"/admin/tokens/{token_id}/revoke", data={"csrf": csrf})
    assert revoked.status_code == 303
    assert index.tokens.user_for(secret) is None
    removed = admin.post("/admin/users/bob/remove", data={"csrf": csrf})
    assert removed.status_code == 303 and index.users.get("bob") is None
    itself = admin.post("/admin/users/alice/remove", data={"csrf": csrf})
    assert itself.status_code == 409 and index.users.get("alice") is not None
    actions = {e.action for e in audit_entries(web, actor="alice")}
    assert {audit.TOKEN_CREATE, audit.TOKEN_REVOKE, audit.USER_REMOVE} <= actions


def test_answers_with_secrets_are_not_cached_and_reprs_hide_them(web: LiveWeb) -> None:
    from callvault.web._api import MeOut, TokenCreated, UserCreated, UserIn

    admin, _ = web.bearer(ADMIN[0])
    created = admin.post("/api/tokens", json={"user": ADMIN[0], "label": "cache test"})
    assert created.status_code in (200, 201), created.text
    assert created.headers["cache-control"] == "no-store"
    bob = web.login(*LISTENER_2000)
    me = bob.get("/api/me")
    assert me.headers["cache-control"] == "no-store"
    static = web.client().get("/static/app.css")
    assert static.status_code == 200
    assert static.headers.get("cache-control") != "no-store"  # shared assets may be cached

    secret = created.json()["secret"]
    assert secret not in repr(TokenCreated.model_validate(created.json()))
    csrf = me.json()["csrf_token"]
    assert csrf not in repr(MeOut.model_validate(me.json()))
    assert "S3cret-Pw-123" not in repr(UserIn(name="x", role="admin", password="S3cret-Pw-123"))
    user = {"id": 1, "name": "x", "role": "admin", "scope": "", "created_at": T0}
    made = UserCreated.model_validate({"user": user, "password": "Gen-Pw-4567"})
    assert "Gen-Pw-4567" not in repr(made)


def test_admin_page_limits_a_new_user_to_some_pbxs(web: LiveWeb) -> None:
    index = web.archive.index
    register_pbx(index, "paris")
    register_pbx(index, "lyon")
    admin = web.login(*ADMIN)
    csrf = csrf_of(admin.get("/admin").text)
    form = {"name": "carl", "role": "listener", "pbxs": "paris", "csrf": csrf}
    made = admin.post("/admin/users", data=form)
    assert made.status_code == 200, made.text
    user = index.users.get("carl")
    assert user is not None and user.pbxs == ("paris",)
    assert '<td data-label="PBXs">paris</td>' in admin.get("/admin").text
    unknown = admin.post("/admin/users", data={**form, "name": "dora", "pbxs": "nice"})
    assert unknown.status_code == 422 and "nice" in unknown.text
    assert index.users.get("dora") is None


def test_cli_adds_changes_and_lists_auditors(tmp_path: Path) -> None:
    archive = str(tmp_path)
    assert _cli("user", "add", "alice", "--role", "admin", "--archive", archive)[0] == 0
    code, out, err = _cli("user", "add", "dora", "--role", "auditor", "--archive", archive)
    assert code == 0, err
    assert out.splitlines()[0] == "added auditor dora (all extensions)"
    code, out, err = _cli(
        "user", "add", "eric", "--role", "listener,auditor", "--scope", "2000-2099",
        "--archive", archive,
    )  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[0] == "added auditor,listener eric (2000-2099)"
    assert _cli("user", "add", "bob", "--role", "listener", "--archive", archive)[0] == 0
    code, out, _ = _cli("user", "list", "--json", "--archive", archive)
    assert [(u["name"], u["role"]) for u in json.loads(out)] == [
        ("alice", "admin"),
        ("bob", "listener"),
        ("dora", "auditor"),
        ("eric", "auditor,listener"),
    ]
    code, out, _ = _cli("user", "list", "--archive", archive)
    assert "eric                     auditor,listener 2000-2099" in out.splitlines()

    code, out, err = _cli(
        "user", "edit", "bob", "--role", "auditor,listener", "--scope", "3000-3099",
        "--archive", archive,
    )  # fmt: skip
    assert (code, out) == (
        0,
        "changed bob: role=listener->auditor,listener scope=(all)->3000-3099\n",
    )
    assert _cli("user", "edit", "bob", "--scope", "3000-3099", "--archive", archive)[1] == (
        "bob unchanged\n"
    )
    code, _, err = _cli("user", "edit", "alice", "--role", "auditor", "--archive", archive)
    assert (code, err) == (
        1,
        "callvault: error: 'alice' is the last admin: make another admin first\n",
    )
    code, _, err = _cli("user", "edit", "bob", "--archive", archive)
    assert code == 2 and "say what to change" in err
    code, _, err = _cli("user", "edit", "bob", "--role", "boss", "--archive", archive)
    assert code == 2 and "bad role 'boss'" in err and "auditor,listener" in err
    code, _, err = _cli("user", "edit", "nobody", "--role", "auditor", "--archive", archive)
    assert (code, err) == (1, "callvault: error: no user named 'nobody'\n")
    code, out, _ = _cli("user", "add", "--help")
    assert "auditor,listener" in " ".join(out.split())

    index = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
    try:
        bob = index.users.get("bob")
        assert bob is not None and bob.can_listen and bob.can_audit and not bob.is_admin
        [edit] = index.audit.query(audit.AuditFilter(action=audit.USER_EDIT))
        assert edit.actor.startswith("cli") and edit.target == "bob"
        assert edit.detail == "role=listener->auditor,listener scope=(all)->3000-3099"
        added = index.audit.query(audit.AuditFilter(action=audit.USER_ADD, target="eric"))
        assert added[0].detail == "role=auditor,listener scope=2000-2099 pbxs=(all)"
    finally:
        index.close()


def test_the_api_offers_every_role_the_index_keeps() -> None:
    from callvault.index import users
    from callvault.web._api import RoleName

    assert get_args(RoleName) == users.ROLE_CHOICES


def test_admins_change_roles_over_the_api_and_the_admin_page(web: LiveWeb) -> None:
    bob = web.login(*LISTENER_2000)
    admin, _ = web.bearer(ADMIN[0])
    changed = admin.patch("/api/users/bob", json={"role": "auditor,listener"})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["role"], changed.json()["scope"]) == ("auditor,listener", "2000-2099")
    assert bob.get("/api/me").json()["role"] == "auditor,listener"  # at once
    assert bob.get("/api/audit").status_code == 200
    assert admin.patch("/api/users/bob", json={"role": "auditor"}).status_code == 200
    assert bob.get("/api/recordings").status_code == 403
    own = admin.patch("/api/users/alice", json={"role": "listener"})
    assert own.status_code == 409 and "your own role" in own.json()["detail"]
    assert admin.patch("/api/users/nobody", json={"role": "listener"}).status_code == 404
    assert admin.patch("/api/users/bob", json={"scope": "9-1"}).status_code == 422
    assert admin.patch("/api/users/bob", json={"role": "boss"}).status_code == 422
    assert bob.patch("/api/users/carol", json={"role": "admin"}).status_code == 403
    made = admin.post("/api/users", json={"name": "dora", "role": "auditor"})
    assert made.status_code == 201 and made.json()["user"]["role"] == "auditor"

    page = web.login(*ADMIN)
    admin_page = page.get("/admin").text
    csrf = csrf_of(admin_page)
    options = [text for _attrs, text in elements(admin_page, "option")]
    assert options[:4] == ["listener", "auditor", "auditor,listener", "admin"]
    saved = page.post(
        "/admin/users/carol/edit",
        data={"role": "auditor", "scope": "", "pbxs": "", "csrf": csrf},
    )
    assert saved.status_code == 200, saved.text
    assert "User carol saved." in saved.text
    carol = web.archive.index.users.get("carol")
    assert carol is not None and (carol.role, carol.scope) == ("auditor", "")
    # An admin's own role cannot be chosen on the page; the rest of the row can be saved.
    [(own_role, _)] = [
        found for found in elements(saved.text, "select", name="role") if "disabled" in found[0]
    ]
    assert own_role["title"] == "Another admin can change your role"
    kept = page.post("/admin/users/alice/edit", data={"scope": "", "pbxs": "", "csrf": csrf})
    assert kept.status_code == 200 and "User alice saved." in kept.text
    refused = page.post(
        "/admin/users/alice/edit", data={"role": "listener", "scope": "", "csrf": csrf}
    )
    assert refused.status_code == 409 and "your own role" in refused.text
    assert (
        page.post("/admin/users/carol/edit", data={"role": "auditor", "csrf": "wrong"}).status_code
        == 403
    )
    edits = audit_entries(web, action=audit.USER_EDIT)
    assert [(e.actor, e.target, e.detail) for e in reversed(edits)] == [
        ("alice", "bob", "role=listener->auditor,listener"),
        ("alice", "bob", "role=auditor,listener->auditor"),
        ("alice", "carol", "role=listener->auditor scope=1000-1099->(all)"),
    ]
