"""Users, scopes, API tokens and the audit log as library functions, and their CLI commands."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from callvault.cli import _web, app
from callvault.index import Index, audit, open_index, users
from web_fixtures import ADMIN, LISTENER_2000, live_web, login


@pytest.fixture()
def index(tmp_path: Path) -> Iterator[Index]:
    idx = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
    try:
        yield idx
    finally:
        idx.close()


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("", []),
        ("1000-1099", [(1000, 1099)]),
        ("1000-1099, 2001 ,", [(1000, 1099), (2001, 2001)]),
        (" 7 - 9 ", [(7, 9)]),
    ],
)
def test_parse_scope(text: str, ranges: list[tuple[int, int]]) -> None:
    assert users.parse_scope(text) == ranges


@pytest.mark.parametrize("text", ["abc", "10-", "-5", "9-1", "1000;1001", "1e3"])
def test_parse_scope_refuses_garbage(text: str) -> None:
    with pytest.raises(users.UserError):
        users.parse_scope(text)


def test_in_scope() -> None:
    ranges = users.parse_scope("1000-1099,2001")
    assert users.in_scope(ranges, "1050")
    assert users.in_scope(ranges, "0612345678", "2001")
    assert not users.in_scope(ranges, "1100", "01050", "anonymous", "")
    assert users.in_scope([], "anything")


def test_add_verify_remove_user(index: Index) -> None:
    engine = index.engine
    user = users.add_user(engine, "alice", "admin", "correct horse", "1000-1099 ,2001")
    assert user.scope == "1000-1099,2001" and user.is_admin
    assert "correct horse" not in repr(user)
    assert users.verify_password(engine, "alice", "correct horse") == user
    assert users.verify_password(engine, "alice", "wrong horse") is None
    assert users.verify_password(engine, "nobody", "correct horse") is None
    with index.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT password_hash FROM users").scalar_one()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    with pytest.raises(users.UserError, match="already exists"):
        users.add_user(engine, "alice", "admin", "another-one")
    with pytest.raises(users.UserError, match="bad role"):
        users.add_user(engine, "bob", "root", "password-1")
    with pytest.raises(users.UserError, match="too short"):
        users.add_user(engine, "bob", "listener", "short")
    with pytest.raises(users.UserError, match="bad user name"):
        users.add_user(engine, "../bob", "listener", "password-1")
    assert [u.name for u in users.list_users(engine)] == ["alice"]
    assert users.remove_user(engine, "alice") is True
    assert users.remove_user(engine, "alice") is False
    assert users.verify_password(engine, "alice", "correct horse") is None


def test_tokens_live_until_revoked(index: Index) -> None:
    engine = index.engine
    users.add_user(engine, "bob", "listener", "password-1", "2000")
    token, secret = users.create_token(engine, "bob", label="cron", created_by="alice")
    assert secret.startswith(users.TOKEN_PREFIX) and secret not in repr(token)
    found = users.user_for_token(engine, secret)
    assert found is not None and found.name == "bob"
    assert users.user_for_token(engine, secret + "x") is None
    assert users.list_tokens(engine)[0].last_used_at is not None
    assert users.revoke_token(engine, token.id) is True
    assert users.user_for_token(engine, secret) is None
    assert users.revoke_token(engine, token.id) is False
    # Removing a user removes their tokens.
    _token2, secret2 = users.create_token(engine, "bob")
    users.remove_user(engine, "bob")
    assert users.user_for_token(engine, secret2) is None
    assert users.list_tokens(engine) == []


def test_audit_record_query_and_csv(index: Index) -> None:
    engine = index.engine
    t0 = datetime(2024, 5, 1, tzinfo=UTC)
    audit.record(engine, "alice", audit.LOGIN, "alice", "", "127.0.0.1", at=t0)
    audit.record(engine, "bob", audit.PLAY, "rec-1.wav", "id=1", "127.0.0.2", at=t0 + timedelta(1))
    audit.record(engine, "bob", audit.DOWNLOAD, "=cmd|x", "id=2", "127.0.0.2", at=t0 + timedelta(2))
    newest = audit.query(engine)
    assert [e.action for e in newest] == [audit.DOWNLOAD, audit.PLAY, audit.LOGIN]
    assert audit.count(engine, audit.AuditFilter(actor="bob")) == 2
    only_play = audit.query(engine, audit.AuditFilter(action=audit.PLAY))
    assert [e.target for e in only_play] == ["rec-1.wav"]
    assert [e.action for e in audit.query(engine, audit.AuditFilter(target="rec-"))] == ["play"]
    window = audit.AuditFilter(since=t0 + timedelta(hours=12), until=t0 + timedelta(days=2))
    assert [e.action for e in audit.query(engine, window)] == [audit.PLAY]
    lines = list(csv.reader(io.StringIO("".join(audit.iter_csv(engine)))))
    assert lines[0] == list(audit.CSV_HEADER)
    assert [line[3] for line in lines[1:]] == ["login", "play", "download"]
    assert lines[3][4] == "'=cmd|x"  # a formula is kept as text for spreadsheets
    assert not hasattr(audit, "delete") and not hasattr(audit, "update")


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
        assert users.verify_password(index.engine, "alice", password) is not None
        assert users.verify_password(index.engine, "bob", "bob-password-1") is not None
        code, out, _ = _cli("token", "create", "--user", "bob", "--archive", archive)
        assert code == 0
        secret = out.strip().rsplit(" ", 1)[1]
        assert users.user_for_token(index.engine, secret) is not None
        code, out, _ = _cli("token", "list", "--json", "--archive", archive)
        assert secret not in out and json.loads(out)[0]["user"] == "bob"
        assert _cli("token", "revoke", "1", "--archive", archive)[0] == 0
        assert users.user_for_token(index.engine, secret) is None
        code, _, err = _cli("token", "revoke", "1", "--archive", archive)
        assert code == 1 and err.startswith("callvault: error: no live token")
        code, _, err = _cli("user", "add", "alice", "--role", "admin", "--archive", archive)
        assert code == 1 and "already exists" in err and "Traceback" not in err
        code, _, err = _cli("user", "add", "x", "--role", "boss", "--archive", archive)
        assert code == 2 and "bad role" in err
        assert _cli("user", "remove", "bob", "--archive", archive)[0] == 0
        assert [u.name for u in users.list_users(index.engine)] == ["alice"]
        actions = [e.action for e in audit.query(index.engine)]
        assert actions.count(audit.USER_ADD) == 2 and audit.USER_REMOVE in actions
        assert audit.TOKEN_CREATE in actions and audit.TOKEN_REVOKE in actions
        assert all(e.actor.startswith("cli") for e in audit.query(index.engine))
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
        passwd = audit.query(web.archive.index.engine, audit.AuditFilter(target="bob"))
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
