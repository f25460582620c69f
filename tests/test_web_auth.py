"""Logging in and out, sessions and CSRF, over real sockets.

Cookies are safe (HttpOnly, SameSite, Secure when asked) and forms need their CSRF token;
the login is rate limited and a throttled login storm leaves one audit row per window; a
session is bound to its user and to a row in the index, so a logout holds in every app
over the index and the signing secret alone makes no session; pages and admin endpoints
need a login and the right role; odd bytes in cookies and tokens are refused, not a crash.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from callvault.index import SettingKey, audit, open_index
from callvault.web import create_app
from callvault.web._security import SessionSigner
from support.web import (
    ADMIN,
    LISTENER_2000,
    LiveWeb,
    audit_entries,
    csrf_of,
    live_web,
    login,
    rows_by_from,
    serve,
)


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive") as live:
        yield live


def _audit_actions(web: LiveWeb, actor: str) -> list[str]:
    index = web.archive.index
    return [e.action for e in index.audit.query(audit.AuditFilter(actor=actor))]


def test_login_sets_a_safe_session_cookie(web: LiveWeb) -> None:
    client = web.client()
    response = login(client, *ADMIN)
    assert response.status_code == 303 and response.headers["location"] == "/search"
    cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith("cv_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    assert ADMIN[1] not in cookie
    page = client.get("/search")
    assert page.status_code == 200 and "alice" in page.text
    assert _audit_actions(web, "alice") == [audit.LOGIN]


def test_secure_cookies_when_asked(tmp_path: Path) -> None:
    with live_web(tmp_path, secure_cookies=True) as web:
        client = web.client()
        page = client.get("/login")
        assert "Secure" in page.headers["set-cookie"]
        # httpx keeps Secure cookies off plain http: send the login cookie by hand.
        nonce = page.headers["set-cookie"].split(";")[0].split("=", 1)[1]
        response = client.post(
            "/login",
            data={"username": ADMIN[0], "password": ADMIN[1], "csrf": csrf_of(page.text)},
            headers={"Cookie": f"cv_login={nonce}"},
        )
        assert response.status_code == 303
        cookie = next(
            h for h in response.headers.get_list("set-cookie") if h.startswith("cv_session=")
        )
        assert "Secure" in cookie and "HttpOnly" in cookie


def test_wrong_password_is_refused_and_audited(web: LiveWeb) -> None:
    response = login(web.client(), ADMIN[0], "not-the-password")
    assert response.status_code == 401
    assert "Wrong user name or password" in response.text
    assert "cv_session" not in response.headers.get("set-cookie", "")
    assert login(web.client(), "nobody", "whatever-123").status_code == 401
    assert _audit_actions(web, "alice") == [audit.LOGIN_FAILED]
    assert _audit_actions(web, "nobody") == [audit.LOGIN_FAILED]


def test_login_is_rate_limited_per_address_and_user(web: LiveWeb) -> None:
    client = web.client()
    for _ in range(5):
        assert login(client, ADMIN[0], "guess-guess").status_code == 401
    throttled = login(client, *ADMIN)  # even the right password waits now
    assert throttled.status_code == 429
    assert int(throttled.headers["retry-after"]) > 0
    assert audit.LOGIN_THROTTLED in _audit_actions(web, "alice")
    # Another user from the same address is not locked out by alice's failures.
    assert login(web.client(), *LISTENER_2000).status_code == 303
    web.clock.advance(timedelta(minutes=16))
    assert login(client, *ADMIN).status_code == 303


def test_the_limit_and_plays_count_across_every_app_over_the_index(web: LiveWeb) -> None:
    """Two web apps over one index (two nodes): failures on one throttle the other, and a
    play started on one is not audited again when the player's next request lands on the
    other."""
    other_app = create_app(web.archive.index, web.archive.storage, clock=web.clock)
    with serve(other_app) as other_base:
        other = httpx.Client(base_url=other_base, timeout=10)
        for _ in range(3):
            assert login(web.client(), ADMIN[0], "guess-guess").status_code == 401
        for _ in range(2):
            assert login(other, ADMIN[0], "guess-guess").status_code == 401
        assert login(web.client(), *ADMIN).status_code == 429
        assert login(other, *ADMIN).status_code == 429
        assert len(audit_entries(web, action=audit.LOGIN_THROTTLED)) == 1  # once for both
        web.clock.advance(timedelta(minutes=16))
        assert login(other, *ADMIN).status_code == 303

        row = rows_by_from(web.archive)["2001"]
        url = f"/api/recordings/{row.id}/audio"
        here, _secret = web.bearer(LISTENER_2000[0])
        there = httpx.Client(base_url=other_base, timeout=10, headers=here.headers)
        assert here.get(url, headers={"Range": "bytes=0-"}).status_code == 206
        assert there.get(url, headers={"Range": "bytes=500-"}).status_code == 206
        assert len(audit_entries(web, action=audit.PLAY)) == 1
        web.clock.advance(timedelta(seconds=31))
        assert there.get(url, headers={"Range": "bytes=0-"}).status_code == 206
        assert len(audit_entries(web, action=audit.PLAY)) == 2


def test_throttled_logins_write_one_audit_row_per_address_and_window(web: LiveWeb) -> None:
    client = web.client()
    for _ in range(5):
        assert login(client, ADMIN[0], "guess-guess").status_code == 401
    for _ in range(30):  # a script that keeps trying while refused
        assert login(client, ADMIN[0], "guess-guess").status_code == 429
    # Other names from the same address fail until the address as a whole is throttled
    # (20 failures), and add no throttle row in the same window either.
    answers = [login(client, f"mallory{n}", "guess-guess").status_code for n in range(20)]
    assert answers == [401] * 15 + [429] * 5
    assert len(audit_entries(web, action=audit.LOGIN_THROTTLED)) == 1
    assert len(audit_entries(web, action=audit.LOGIN_FAILED)) == 20  # the limiter's own bound

    # The next window is throttled anew and audited once more.
    web.clock.advance(timedelta(minutes=16))
    for _ in range(5):
        assert login(client, ADMIN[0], "guess-guess").status_code == 401
    for _ in range(10):
        assert login(client, ADMIN[0], "guess-guess").status_code == 429
    assert len(audit_entries(web, action=audit.LOGIN_THROTTLED)) == 2


def test_login_form_needs_its_csrf_token(web: LiveWeb) -> None:
    client = web.client()
    client.get("/login")
    response = client.post(
        "/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf": "forged"}
    )
    assert response.status_code == 403
    assert "cv_session" not in response.headers.get("set-cookie", "")


def test_login_never_redirects_off_site(web: LiveWeb) -> None:
    client = web.client()
    page = client.get("/login")
    for target, expected in (
        ("//evil.example/x", "/search"),
        ("https://evil.example/", "/search"),
        ("/admin", "/admin"),
    ):
        client.cookies.clear()
        page = client.get("/login")
        response = client.post(
            "/login",
            data={
                "username": ADMIN[0],
                "password": ADMIN[1],
                "csrf": csrf_of(page.text),
                "next": target,
            },
        )
        assert response.headers["location"] == expected


def test_state_changing_forms_need_csrf(web: LiveWeb) -> None:
    admin = web.login(*ADMIN)
    refused = admin.post("/admin/users", data={"name": "zed", "role": "admin", "csrf": "x"})
    assert refused.status_code == 403
    assert web.archive.index.users.get("zed") is None
    csrf = csrf_of(admin.get("/admin").text)
    accepted = admin.post(
        "/admin/users", data={"name": "zed", "role": "listener", "scope": "5", "csrf": csrf}
    )
    assert accepted.status_code == 200 and 'id="new-password"' in accepted.text
    assert web.archive.index.users.get("zed") is not None
    # Cookie-authenticated API writes need the X-CSRF-Token header.
    assert admin.post("/api/tokens", json={"user": "zed"}).status_code == 403
    token = admin.get("/api/me").json()["csrf_token"]
    made = admin.post("/api/tokens", json={"user": "zed"}, headers={"X-CSRF-Token": token})
    assert made.status_code == 201
    row = rows_by_from(web.archive)["1001"]
    assert admin.post(f"/recordings/{row.id}/verify", data={"csrf": "nope"}).status_code == 403
    verified = admin.post(f"/recordings/{row.id}/verify", data={"csrf": csrf})
    assert verified.status_code == 200 and "Verified" in verified.text


def test_logout_needs_csrf_and_kills_the_session(web: LiveWeb) -> None:
    admin = web.login(*ADMIN)
    cookie = admin.cookies.get("cv_session")
    assert admin.post("/logout", data={"csrf": "wrong"}).status_code == 403
    csrf = csrf_of(admin.get("/search").text)
    assert admin.post("/logout", data={"csrf": csrf}).status_code == 303
    replay = web.client()
    replay.cookies.set("cv_session", str(cookie))
    assert replay.get("/api/me").status_code == 401  # the old cookie is dead
    assert audit.LOGOUT in _audit_actions(web, "alice")


def test_session_expires(web: LiveWeb) -> None:
    admin = web.login(*ADMIN)
    assert admin.get("/api/me").status_code == 200
    web.clock.advance(timedelta(hours=13))
    assert admin.get("/api/me").status_code == 401
    assert admin.get("/search").headers["location"].startswith("/login")


def test_tampered_cookie_is_refused(web: LiveWeb) -> None:
    admin = web.login(*ADMIN)
    value = str(admin.cookies.get("cv_session"))
    payload, mac = value.split(".")
    forged = web.client()
    forged.cookies.set(
        "cv_session", payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB")
    )
    assert forged.get("/api/me").status_code == 401


def test_pages_need_login_and_the_right_role(web: LiveWeb) -> None:
    anonymous = web.client()
    for path in ("/search", "/status", "/admin", "/admin/audit", "/recordings/1"):
        response = anonymous.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login")
    bob = web.login(*LISTENER_2000)
    for path in ("/status", "/admin", "/admin/audit"):
        assert bob.get(path).status_code == 403, path
    rows = rows_by_from(web.archive)
    assert bob.get(f"/recordings/{rows['1001'].id}").status_code == 404
    page = bob.get(f"/recordings/{rows['2001'].id}")
    assert page.status_code == 200 and rows["2001"].sha256 in page.text
    results = bob.get("/search").text
    assert "2001" in results and "0612345678" not in results
    admin = web.login(*ADMIN)
    for path in ("/search", "/status", "/admin", "/admin/audit"):
        assert admin.get(path).status_code == 200, path


def test_listener_cannot_use_admin_endpoints(web: LiveWeb) -> None:
    bob, _ = web.bearer(LISTENER_2000[0])
    for path in (
        "/api/users",
        "/api/tokens",
        "/api/audit",
        "/api/audit.csv",
        "/api/stats",
        "/api/status",
    ):
        assert bob.get(path).status_code == 403, path
    response = bob.post("/api/users", json={"name": "mallory", "role": "admin"})
    assert response.status_code == 403
    assert bob.post("/api/tokens", json={"user": "bob"}).status_code == 403


def test_anonymous_and_bad_tokens_are_401(web: LiveWeb) -> None:
    anonymous = web.client()
    assert anonymous.get("/api/recordings").status_code == 401
    assert (
        anonymous.get("/api/recordings", headers={"Authorization": "Bearer cvt_nope"}).status_code
        == 401
    )
    assert (
        anonymous.get("/api/recordings", headers={"Authorization": "Basic eDp5"}).status_code == 401
    )
    assert anonymous.get("/api/openapi.json").status_code == 200


def test_session_survives_a_restart_of_the_app(web: LiveWeb) -> None:
    client = web.login(*ADMIN)
    cookie = client.cookies.get("cv_session")
    assert cookie
    # A second app over the same index (a restarted `callvault web` or `serve`) reads the
    # session secret from the index, so the cookie is still good there.
    restarted = create_app(web.archive.index, web.archive.storage, clock=web.clock)
    with serve(restarted) as base:
        again = httpx.Client(base_url=base, timeout=10, cookies={"cv_session": cookie})
        page = again.get("/search")
        assert page.status_code == 200 and "alice" in page.text
        stranger = httpx.Client(base_url=base, timeout=10, cookies={"cv_session": cookie + "x"})
        assert stranger.get("/search", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("raw", ["a.\xe9".encode("latin-1"), "\xe9.\xe9".encode()])
def test_non_ascii_session_cookie_is_refused_not_a_crash(web: LiveWeb, raw: bytes) -> None:
    client = web.client()
    headers = {"Cookie": b"cv_session=" + raw}
    page = client.get("/search", headers=headers)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    assert client.get("/api/me", headers=headers).status_code == 401
    assert client.get("/login", headers=headers).status_code == 200


def test_non_ascii_csrf_tokens_are_refused_not_a_crash(web: LiveWeb) -> None:
    index = web.archive.index
    admin = web.login(*ADMIN)
    for value in ("\xe9".encode("latin-1"), "\xe9".encode()):
        refused = admin.post("/api/tokens", json={"user": "bob"}, headers={"X-CSRF-Token": value})
        assert refused.status_code == 403
    row = rows_by_from(web.archive)["1001"]
    form = {"content-type": "application/x-www-form-urlencoded"}
    for body in (b"csrf=%C3%A9", b"csrf=%E9", "csrf=\u00e9".encode()):
        assert (
            admin.post(f"/recordings/{row.id}/verify", content=body, headers=form).status_code
            == 403
        )
        assert admin.post("/logout", content=body, headers=form).status_code == 403
    assert index.tokens.list() == []
    assert admin.get("/api/me").status_code == 200  # still logged in: no logout happened
    # The login form: a non-ASCII token, and a non-ASCII pre-login cookie.
    client = web.client()
    page = client.get("/login")
    refused = client.post(
        "/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf": "\u00e9"}
    )
    assert refused.status_code == 403
    assert "cv_session" not in refused.headers.get("set-cookie", "")
    stranger = web.client()
    refused = stranger.post(
        "/login",
        content=f"username={ADMIN[0]}&password={ADMIN[1]}&csrf={csrf_of(page.text)}".encode(),
        headers={**form, "Cookie": "cv_login=\xe9".encode("latin-1")},
    )
    assert refused.status_code == 403


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
