"""index.users, index.tokens, index.sessions and the rules of callvault.index.users: names,
roles, scopes, passwords, the last-admin and not-yourself rules, API tokens and web sessions
as rows; on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import event, func, select

from callvault.index import Index, open_index, users
from callvault.index.schema import api_tokens, column_length, web_sessions
from callvault.index.schema import users as users_table
from support.index_data import NOW, register_pbx

HOUR = timedelta(hours=1)


# -- rules without a database -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("", None),
        (" , ", None),
        ("1000-1099", [(1000, 1099)]),
        ("1000-1099, 2001 ,", [(1000, 1099), (2001, 2001)]),
        (" 7 - 9 ", [(7, 9)]),
    ],
)
def test_parse_scope(text: str, ranges: list[tuple[int, int]] | None) -> None:
    assert users.parse_scope(text) == ranges
    assert users.parse_scope(users.format_scope(ranges)) == ranges


@pytest.mark.parametrize("text", ["abc", "10-", "-5", "9-1", "1000;1001", "1e3"])
def test_parse_scope_refuses_garbage(text: str) -> None:
    with pytest.raises(users.UserError):
        users.parse_scope(text)


def test_in_scope_none_is_everything_and_an_empty_list_nothing() -> None:
    ranges = users.parse_scope("1000-1099,2001")
    assert users.in_scope(ranges, "1050")
    assert users.in_scope(ranges, "0612345678", "2001")
    assert not users.in_scope(ranges, "1100", "01050", "anonymous", "")
    assert users.in_scope(None, "anything")
    assert not users.in_scope([], "1050", "anything")


# -- users ---------------------------------------------------------------------------------


def test_add_verify_list_remove(index: Index) -> None:
    user = index.users.add("alice", "admin", "correct horse", "1000-1099 ,2001", now=NOW)
    assert user.scope == "1000-1099,2001" and user.is_admin and user.created_at == NOW
    assert user.scope_ranges == [(1000, 1099), (2001, 2001)]
    assert "correct horse" not in repr(user)
    assert index.users.verify_password("alice", "correct horse") == user
    assert index.users.verify_password("alice", "wrong horse") is None
    assert index.users.verify_password("nobody", "correct horse") is None
    with index.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT password_hash FROM users").scalar_one()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    with pytest.raises(users.UserError, match="already exists"):
        index.users.add("alice", "admin", "another-one")
    with pytest.raises(users.UserError, match="bad role"):
        index.users.add("bob", "root", "password-1")
    with pytest.raises(users.UserError, match="too short"):
        index.users.add("bob", "listener", "short")
    with pytest.raises(users.UserError, match="bad user name"):
        index.users.add("../bob", "listener", "password-1")
    with pytest.raises(users.UserError, match="up to 64"):
        index.users.add("b" * 65, "listener", "password-1")
    with pytest.raises(users.UserError, match="bad scope"):
        index.users.add("bob", "listener", "password-1", "10-")
    bob = index.users.add("bob", "listener", "password-1", "")
    assert bob.scope == "" and bob.scope_ranges is None and bob.may_see("anything")
    assert [u.name for u in index.users.list()] == ["alice", "bob"]
    assert index.users.get("bob") == bob == index.users.get_by_id(bob.id)
    assert index.users.get("carol") is None and index.users.get_by_id(bob.id + 100) is None
    assert index.users.remove("bob") == bob
    with pytest.raises(users.NoSuchUser):
        index.users.remove("bob")
    assert index.users.verify_password("bob", "password-1") is None


def test_set_password_and_end_sessions_change_the_epoch(index: Index) -> None:
    bob = index.users.add("bob", "listener", "password-1")
    epoch = index.users.session_epoch(bob.id)
    assert epoch is not None and len(epoch) >= 16
    assert index.users.set_password("bob", "password-2")
    assert index.users.verify_password("bob", "password-1") is None
    assert index.users.verify_password("bob", "password-2") is not None
    second = index.users.session_epoch(bob.id)
    assert second not in (None, epoch)
    assert index.users.end_sessions("bob")
    assert index.users.session_epoch(bob.id) not in (None, epoch, second)
    assert not index.users.set_password("nobody", "password-3")
    assert not index.users.end_sessions("nobody")
    assert index.users.session_epoch(bob.id + 100) is None
    with pytest.raises(users.UserError, match="too short"):
        index.users.set_password("bob", "short")


def test_the_last_admin_and_oneself_cannot_be_removed(index: Index) -> None:
    alice = index.users.add("alice", "admin", "alice-password")
    bob = index.users.add("bob", "listener", "bob-password")
    with pytest.raises(users.LastAdminError, match="last admin"):
        index.users.remove("alice")  # by no user (the CLI)
    with pytest.raises(users.SelfRemovalError, match="yourself"):
        index.users.remove("alice", acting=alice)
    with pytest.raises(users.SelfRemovalError):
        index.users.remove("bob", acting=bob)
    assert index.users.count_admins() == 1
    carol = index.users.add("carol", "admin", "carol-password")
    assert index.users.count_admins() == 2
    assert index.users.remove("alice", acting=carol) == alice
    with pytest.raises(users.LastAdminError):
        index.users.remove("carol", acting=None)
    # A disabled admin does not count, and may go.
    dave = index.users.add("dave", "admin", "dave-password")
    with index.engine.begin() as conn:
        conn.execute(
            users_table.update().where(users_table.c.name == "dave").values(disabled_at=NOW)
        )
    assert index.users.count_admins() == 1
    assert index.users.remove("dave").id == dave.id
    assert [u.name for u in index.users.list()] == ["bob", "carol"]
    assert isinstance(users.LastAdminError("x"), users.UserError)


@pytest.mark.parametrize(
    ("given", "stored", "admin", "listen", "may_audit"),
    [
        ("admin", "admin", True, True, True),
        ("listener", "listener", False, True, False),
        ("auditor", "auditor", False, False, True),
        ("auditor,listener", "auditor,listener", False, True, True),
        (" listener , auditor", "auditor,listener", False, True, True),
        ("auditor,auditor", "auditor", False, False, True),
    ],
)
def test_roles_and_what_they_allow(
    given: str, stored: str, admin: bool, listen: bool, may_audit: bool
) -> None:
    assert users.validate_role(given) == stored
    user = users.User(1, "u", users.validate_role(given), "", NOW)
    assert (user.is_admin, user.can_listen, user.can_audit) == (admin, listen, may_audit)
    assert stored in users.ROLE_CHOICES


@pytest.mark.parametrize("role", ["", "root", "Admin", "auditor,", "listener+auditor"])
def test_a_role_that_is_not_one_is_refused(role: str) -> None:
    with pytest.raises(users.UserError, match="bad role"):
        users.validate_role(role)


def test_admin_stands_alone() -> None:
    with pytest.raises(users.UserError, match="admin includes every other role"):
        users.validate_role("admin,listener")


def test_every_role_fits_its_column_and_reads_back(index: Index) -> None:
    assert max(len(role) for role in users.ROLE_CHOICES) <= column_length(users_table.c.role)
    for n, role in enumerate(users.ROLE_CHOICES):
        index.users.add(f"user{n}", role, "password-1")
    dora = index.users.add("dora", "listener,auditor", "password-1")
    assert dora.role == "auditor,listener" and dora.can_listen and dora.can_audit
    assert index.users.get("dora") == dora
    stored = {u.name: u.role for u in index.users.list()}
    assert stored == {"dora": "auditor,listener"} | {
        f"user{n}": role for n, role in enumerate(users.ROLE_CHOICES)
    }
    assert index.users.count_admins() == 1


def test_edit_changes_role_scope_and_pbxs_but_never_the_last_admin_nor_ones_own_role(
    index: Index,
) -> None:
    register_pbx(index, "paris")
    alice = index.users.add("alice", "admin", "alice-password")
    index.users.add("bob", "listener", "bob-password", "2000-2099")
    before, after = index.users.edit("bob", role="listener,auditor", acting=alice)
    assert (before.role, after.role, after.scope) == ("listener", "auditor,listener", "2000-2099")
    assert users.describe_change(before, after) == "role=listener->auditor,listener"
    before, after = index.users.edit("bob", scope=" 7, 1000-1099", pbxs="paris")
    assert (after.scope, after.pbxs, after.role) == ("7,1000-1099", ("paris",), "auditor,listener")
    assert users.describe_change(before, after) == (
        "scope=2000-2099->7,1000-1099 pbxs=(all)->paris"
    )
    before, after = index.users.edit("bob", scope="", pbxs="")
    assert users.describe_change(before, after) == "scope=7,1000-1099->(all) pbxs=paris->(all)"
    assert index.users.edit("bob", role="auditor,listener") == (after, after)
    assert users.describe_change(after, after) == ""
    with pytest.raises(users.LastAdminError, match="last admin"):
        index.users.edit("alice", role="auditor")
    with pytest.raises(users.SelfRemovalError, match="your own role"):
        index.users.edit("alice", role="listener", acting=alice)
    with pytest.raises(users.NoSuchUser):
        index.users.edit("nobody", role="listener")
    with pytest.raises(users.UserError, match="bad role"):
        index.users.edit("bob", role="boss")
    with pytest.raises(users.UserError, match="bad scope"):
        index.users.edit("bob", scope="9-1")
    with pytest.raises(users.UserError, match="no PBX named 'lyon'"):
        index.users.edit("bob", pbxs="lyon")
    assert index.users.get("alice") == alice
    # With a second admin, the first may become an auditor: one enabled admin is left.
    carol = index.users.add("carol", "admin", "carol-password")
    _before, demoted = index.users.edit("alice", role="auditor", acting=carol)
    assert not demoted.is_admin and demoted.can_audit and not demoted.can_listen
    assert index.users.count_admins() == 1
    with pytest.raises(users.LastAdminError):
        index.users.edit("carol", role="listener", acting=demoted)


def _removals_at_once(db_url: str) -> list[str]:
    """alice and bob, the only admins, remove each other at the same moment, each through
    an index of their own: what each got."""
    with open_index(db_url) as setup:
        with setup.engine.begin() as conn:
            conn.execute(users_table.delete())
        alice = setup.users.add("alice", "admin", "alice-password")
        bob = setup.users.add("bob", "admin", "bob-password")
    indexes = [open_index(db_url), open_index(db_url)]
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def remove(n: int, target: str, acting: users.User) -> None:
        start.wait(timeout=30)
        try:
            indexes[n].users.remove(target, acting=acting)
            outcomes.append("removed")
        except users.LastAdminError:
            outcomes.append("refused")

    threads = [
        threading.Thread(target=remove, args=(0, "bob", alice)),
        threading.Thread(target=remove, args=(1, "alice", bob)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for index in indexes:
        index.close()
    return sorted(outcomes)


def test_two_admins_removing_each_other_at_once_leave_one(db_url: str) -> None:
    for _ in range(3):
        assert _removals_at_once(db_url) == ["refused", "removed"]
        with open_index(db_url) as check:
            assert check.users.count_admins() == 1


# -- tokens --------------------------------------------------------------------------------


def test_tokens_live_until_revoked(index: Index) -> None:
    index.users.add("bob", "listener", "password-1", "2000")
    token, secret = index.tokens.create("bob", label="cron", created_by="alice", now=NOW)
    assert secret.startswith(users.TOKEN_PREFIX) and secret not in repr(token)
    assert (token.user_name, token.label, token.created_by, token.created_at) == (
        "bob",
        "cron",
        "alice",
        NOW,
    )
    assert index.tokens.get(token.id) == token
    found = index.tokens.user_for(secret, now=NOW + HOUR)
    assert found is not None and found.name == "bob" and found.scope_ranges == [(2000, 2000)]
    assert index.tokens.user_for(secret + "x") is None
    assert index.tokens.user_for("not-a-token") is None
    assert index.tokens.list()[0].last_used_at == NOW + HOUR
    assert index.tokens.revoke(token.id, now=NOW + HOUR) is True
    assert index.tokens.user_for(secret) is None
    assert index.tokens.revoke(token.id) is False
    assert index.tokens.list(include_revoked=False) == []
    assert index.tokens.list()[0].revoked_at == NOW + HOUR
    with pytest.raises(users.NoSuchUser):
        index.tokens.create("nobody")
    # A label is cut to its column's length; removing a user removes their tokens.
    long, secret2 = index.tokens.create("bob", label="x" * 500)
    assert long.label == "x" * 128
    index.users.remove("bob")
    assert index.tokens.user_for(secret2) is None
    assert index.tokens.list() == []


def test_a_tokens_last_use_is_written_at_most_once_a_minute(index: Index) -> None:
    """Every request authenticates: a write and a commit each time cost more than a search.
    The time of last use is exact to the minute."""
    index.users.add("bob", "listener", "password-1")
    _, secret = index.tokens.create("bob", now=NOW)
    writes: list[str] = []

    def count_writes(_c: object, _cur: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            writes.append(statement)

    event.listen(index.engine, "before_cursor_execute", count_writes)
    try:
        for seconds in (0, 1, 30, 59):
            assert index.tokens.user_for(secret, now=NOW + timedelta(seconds=seconds))
        assert len(writes) == 1
        assert index.tokens.list()[0].last_used_at == NOW
        assert index.tokens.user_for(secret, now=NOW + timedelta(seconds=61))
        assert len(writes) == 2
        assert index.tokens.list()[0].last_used_at == NOW + timedelta(seconds=61)
        # A clock set back (a last use "in the future") is corrected at once.
        assert index.tokens.user_for(secret, now=NOW)
        assert index.tokens.list()[0].last_used_at == NOW
    finally:
        event.remove(index.engine, "before_cursor_execute", count_writes)


def test_a_disabled_users_token_gives_no_user(index: Index) -> None:
    index.users.add("bob", "listener", "password-1")
    _token, secret = index.tokens.create("bob")
    with index.engine.begin() as conn:
        conn.execute(users_table.update().values(disabled_at=NOW))
    assert index.tokens.user_for(secret) is None
    assert index.users.verify_password("bob", "password-1") is None


# -- sessions ------------------------------------------------------------------------------


def _session_rows(index: Index) -> int:
    with index.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(web_sessions)).scalar_one())


def test_a_session_is_live_only_while_its_row_is(index: Index) -> None:
    bob = index.users.add("bob", "listener", "password-1")
    epoch = index.users.session_epoch(bob.id)
    assert epoch is not None
    # Never made: the epoch and a nonce alone are not a session.
    assert index.sessions.user_of(bob.id, epoch, "nonce-1", now=NOW) is None
    index.sessions.create(bob.id, "nonce-1", now=NOW, expires_at=NOW + HOUR)
    assert index.sessions.user_of(bob.id, epoch, "nonce-1", now=NOW) == bob
    assert index.sessions.user_of(bob.id, epoch, "nonce-2", now=NOW) is None
    assert index.sessions.user_of(bob.id + 1, epoch, "nonce-1", now=NOW) is None
    assert index.sessions.user_of(bob.id, "other-epoch", "nonce-1", now=NOW) is None
    assert index.sessions.user_of(bob.id, epoch, "nonce-1", now=NOW + HOUR) is None  # expired
    # Only the nonce's SHA-256 is stored.
    with index.engine.connect() as conn:
        stored = conn.execute(select(web_sessions.c.nonce_sha256)).scalar_one()
    assert "nonce-1" not in stored and len(stored) == 64
    assert index.sessions.end("nonce-1") is True
    assert index.sessions.end("nonce-1") is False
    assert index.sessions.user_of(bob.id, epoch, "nonce-1", now=NOW) is None
    with pytest.raises(users.NoSuchUser):
        index.sessions.create(bob.id + 100, "nonce-3", now=NOW, expires_at=NOW + HOUR)


def test_sessions_end_with_a_new_password_end_sessions_and_removal(index: Index) -> None:
    index.users.add("alice", "admin", "alice-password")
    bob = index.users.add("bob", "listener", "password-1")
    alice = index.users.get("alice")
    assert alice is not None
    for n in range(2):
        index.sessions.create(bob.id, f"bob-{n}", now=NOW, expires_at=NOW + HOUR)
    index.sessions.create(alice.id, "alice-0", now=NOW, expires_at=NOW + HOUR)
    assert index.users.set_password("bob", "password-2")
    assert _session_rows(index) == 1
    index.sessions.create(bob.id, "bob-2", now=NOW, expires_at=NOW + HOUR)
    assert index.users.end_sessions("bob")
    assert _session_rows(index) == 1
    index.sessions.create(bob.id, "bob-3", now=NOW, expires_at=NOW + HOUR)
    assert index.sessions.end_all(bob.id) == 1
    index.sessions.create(bob.id, "bob-4", now=NOW, expires_at=NOW + HOUR)
    index.users.remove("bob")
    assert _session_rows(index) == 1
    epoch = index.users.session_epoch(alice.id)
    assert epoch is not None
    assert index.sessions.user_of(alice.id, epoch, "alice-0", now=NOW) == alice


def test_expired_session_rows_are_purged_on_the_next_login(index: Index) -> None:
    bob = index.users.add("bob", "listener", "password-1")
    index.sessions.create(bob.id, "old", now=NOW, expires_at=NOW + HOUR)
    index.sessions.create(bob.id, "new", now=NOW + 2 * HOUR, expires_at=NOW + 3 * HOUR)
    assert _session_rows(index) == 1
    with index.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(api_tokens)).scalar_one() == 0
