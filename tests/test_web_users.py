"""The CLI commands for users and tokens (the library itself: test_index_users.py)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from callvault.cli import _web, app
from callvault.index import audit, open_index
from web_fixtures import ADMIN, LISTENER_2000, live_web, login

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
