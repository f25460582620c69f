"""Session cookies stay bound to the user they were issued to, and a logout holds in every
app over the same index: real SQLite, real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from callvault.index import open_index, users
from callvault.web import create_app
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
    engine = web.archive.index.engine
    alice = web.login(*ADMIN)
    dave_id = _add_user_over_api(alice, "dave", "listener", "dave-password-1")
    cookie = _session_cookie(web.login("dave", "dave-password-1"))
    assert _with_cookie(web.base, cookie).get("/api/me").status_code == 200
    _remove_user_over_api(alice, "dave")
    users.add_user(engine, "erin", "admin", "erin-password-1")
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET id = :id WHERE name = 'erin'"), {"id": dave_id})
    erin = users.get_user_by_id(engine, dave_id)
    assert erin is not None and erin.name == "erin" and erin.is_admin
    _refused(web, cookie)


def test_a_new_password_ends_the_users_sessions(web: LiveWeb) -> None:
    engine = web.archive.index.engine
    bob = web.login(*LISTENER_2000)
    cookie = _session_cookie(bob)
    alice = web.login(*ADMIN)  # another user's session is not touched
    assert users.set_password(engine, "bob", "bob-password-2")
    assert _with_cookie(web.base, cookie).get("/api/me").status_code == 401
    assert alice.get("/api/me").status_code == 200
    again = web.login("bob", "bob-password-2")
    assert again.get("/api/me").json()["name"] == "bob"
    assert users.end_sessions(engine, "bob")
    assert again.get("/api/me").status_code == 401
    assert not users.end_sessions(engine, "nobody")


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


def _revoked_nonces(web: LiveWeb) -> int:
    with web.archive.index.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM revoked_sessions")).scalar_one())


def test_logged_out_sessions_are_forgotten_once_expired(web: LiveWeb) -> None:
    first = web.login(*LISTENER_2000)
    logout = first.post("/logout", data={"csrf": csrf_of(first.get("/search").text)})
    assert logout.status_code == 303
    assert _revoked_nonces(web) == 1
    web.clock.advance(timedelta(hours=13))  # past the first session's lifetime
    second = web.login(*LISTENER_2000)
    cookie = _session_cookie(second)
    logout = second.post("/logout", data={"csrf": csrf_of(second.get("/search").text)})
    assert logout.status_code == 303
    assert _revoked_nonces(web) == 1  # the first one's record was purged, the second kept
    assert _with_cookie(web.base, cookie).get("/api/me").status_code == 401
