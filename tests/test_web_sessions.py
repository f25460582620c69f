"""Session cookies stay bound to the user they were issued to and to a session row in the
index: a logout holds in every app over the same index, and the signing secret alone makes
no session. Real SQLite, real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from callvault.index import SettingKey, open_index
from callvault.web import create_app
from callvault.web._security import SessionSigner
from web_fixtures import ADMIN, LISTENER_2000, LiveWeb, csrf_of, live_web, serve


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path) as live:
        yield live


def _with_cookie(base: str, cookie: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=10, follow_redirects=False)
    client.cookies.set("cv_session", cookie)
    return client


def _session_cookie(client: httpx.Client) -> str:
    cookie = client.cookies.get("cv_session")
    assert cookie
    return str(cookie)


def _add_user_over_api(admin: httpx.Client, name: str, role: str, password: str) -> int:
    csrf = admin.get("/api/me").json()["csrf_token"]
    body = {"name": name, "role": role, "password": password}
    if role == "listener":
        body["scope"] = "2000-2099"
    made = admin.post("/api/users", json=body, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 201, made.text
    return int(made.json()["user"]["id"])


def _remove_user_over_api(admin: httpx.Client, name: str) -> None:
    csrf = admin.get("/api/me").json()["csrf_token"]
    assert admin.delete(f"/api/users/{name}", headers={"X-CSRF-Token": csrf}).status_code == 204


def _refused(web: LiveWeb, cookie: str) -> None:
    """The cookie opens nothing: the API says 401, a page sends to the login form."""
    stale = _with_cookie(web.base, cookie)
    assert stale.get("/api/me").status_code == 401
    assert stale.get("/api/users").status_code == 401
    page = stale.get("/admin")
    assert page.status_code == 303 and page.headers["location"].startswith("/login")


def test_a_removed_users_cookie_is_not_the_next_new_admins_session(web: LiveWeb) -> None:
    alice = web.login(*ADMIN)
    dave_id = _add_user_over_api(alice, "dave", "listener", "dave-password-1")
    dave = web.login("dave", "dave-password-1")
    cookie = _session_cookie(dave)
    assert dave.get("/api/me").json()["name"] == "dave"
    _remove_user_over_api(alice, "dave")
    # dave had the highest id; SQLite without AUTOINCREMENT would give it to erin.
    erin_id = _add_user_over_api(alice, "erin", "admin", "erin-password-1")
    assert erin_id > dave_id
    _refused(web, cookie)
    assert web.login("erin", "erin-password-1").get("/api/me").json()["name"] == "erin"


def test_a_cookie_is_refused_even_if_its_user_id_comes_back(web: LiveWeb) -> None:
    # The second safeguard on its own: a new user given the removed one's id (an index
    # whose ids were reused before the upgrade, or restored rows) still has another epoch.
    index = web.archive.index
    alice = web.login(*ADMIN)
    dave_id = _add_user_over_api(alice, "dave", "listener", "dave-password-1")
    cookie = _session_cookie(web.login("dave", "dave-password-1"))
    assert _with_cookie(web.base, cookie).get("/api/me").status_code == 200
    _remove_user_over_api(alice, "dave")
    index.users.add("erin", "admin", "erin-password-1")
    with index.engine.begin() as conn:
        conn.execute(text("UPDATE users SET id = :id WHERE name = 'erin'"), {"id": dave_id})
    erin = index.users.get_by_id(dave_id)
    assert erin is not None and erin.name == "erin" and erin.is_admin
    _refused(web, cookie)


def test_a_new_password_ends_the_users_sessions(web: LiveWeb) -> None:
    index = web.archive.index
    bob = web.login(*LISTENER_2000)
    cookie = _session_cookie(bob)
    alice = web.login(*ADMIN)  # another user's session is not touched
    assert index.users.set_password("bob", "bob-password-2")
    assert _with_cookie(web.base, cookie).get("/api/me").status_code == 401
    assert alice.get("/api/me").status_code == 200
    again = web.login("bob", "bob-password-2")
    assert again.get("/api/me").json()["name"] == "bob"
    assert index.users.end_sessions("bob")
    assert again.get("/api/me").status_code == 401
    assert not index.users.end_sessions("nobody")


def test_logout_holds_in_another_app_and_after_a_restart(web: LiveWeb) -> None:
    # A second app over the same index through its own engine, as `web` beside `serve`.
    second_index = open_index(f"sqlite:///{web.archive.root / 'callvault.db'}")
    try:
        second_app = create_app(second_index, web.archive.storage, clock=web.clock)
        with serve(second_app) as second_base:
            bob = web.login(*LISTENER_2000)
            cookie = _session_cookie(bob)
            other_bob = web.login(*LISTENER_2000)  # a second session, on another device
            other_cookie = _session_cookie(other_bob)
            assert _with_cookie(second_base, cookie).get("/api/me").status_code == 200
            csrf = csrf_of(bob.get("/search").text)
            assert bob.post("/logout", data={"csrf": csrf}).status_code == 303
            assert _with_cookie(web.base, cookie).get("/api/me").status_code == 401
            assert _with_cookie(second_base, cookie).get("/api/me").status_code == 401
            # Only that session ended: bob's other one still works in both apps.
            assert _with_cookie(second_base, other_cookie).get("/api/me").status_code == 200
            assert _with_cookie(web.base, other_cookie).get("/api/me").status_code == 200
        # A restart (a new app, a new engine) still refuses the logged-out cookie.
        restarted = create_app(second_index, web.archive.storage, clock=web.clock)
        with serve(restarted) as restarted_base:
            assert _with_cookie(restarted_base, cookie).get("/api/me").status_code == 401
            assert _with_cookie(restarted_base, other_cookie).get("/api/me").status_code == 200
    finally:
        second_index.close()


def _session_rows(web: LiveWeb) -> int:
    with web.archive.index.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM web_sessions")).scalar_one())


def test_session_rows_go_at_logout_and_once_expired(web: LiveWeb) -> None:
    first = web.login(*LISTENER_2000)
    assert _session_rows(web) == 1
    logout = first.post("/logout", data={"csrf": csrf_of(first.get("/search").text)})
    assert logout.status_code == 303
    assert _session_rows(web) == 0
    second = web.login(*LISTENER_2000)
    cookie = _session_cookie(second)
    web.clock.advance(timedelta(hours=13))  # past the second session's lifetime
    web.login(*LISTENER_2000)
    assert _session_rows(web) == 1  # the second one's row was purged, the third kept
    assert _with_cookie(web.base, cookie).get("/api/me").status_code == 401


def test_the_signing_secret_alone_cannot_make_a_session(web: LiveWeb, tmp_path: Path) -> None:
    # A local user copies the index file (the signing secret and every user's epoch are
    # in it) and makes a cookie for the admin, who never logged in, with their own copy.
    copy = tmp_path / "stolen.db"
    with (
        closing(sqlite3.connect(web.archive.root / "callvault.db")) as source,
        closing(sqlite3.connect(copy)) as target,
    ):
        source.backup(target)  # a consistent copy, WAL included
    with open_index(f"sqlite:///{copy}") as stolen:
        secret = stolen.settings.get(SettingKey.WEB_SESSION_SECRET)
        admin = stolen.users.get(ADMIN[0])
        assert secret is not None and admin is not None
        forger = SessionSigner(bytes.fromhex(secret), web.clock, stolen)
        _session, cookie = forger.issue(admin.id)
    forged = _with_cookie(web.base, cookie)
    assert forged.get("/api/users").status_code == 401
    _refused(web, cookie)
    # The same cookie, had it been issued by the app itself, would have opened it: only the
    # missing row refuses it.
    web.archive.index.sessions.create(
        admin.id, _session.nonce, now=web.clock(), expires_at=web.clock() + timedelta(hours=1)
    )
    assert forged.get("/api/users").status_code == 200
