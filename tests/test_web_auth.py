"""Logging in and out, cookies, CSRF, the login rate limit and page access, over real sockets."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from callvault.index import audit
from callvault.web import create_app
from web_fixtures import (
    ADMIN,
    LISTENER_2000,
    LiveWeb,
    csrf_of,
    live_web,
    login,
    rows_by_from,
    serve,
)


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path) as live:
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


def test_pages_send_protective_headers(web: LiveWeb) -> None:
    response = web.client().get("/login")
    assert response.headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


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
    assert {audit.TOKEN_CREATE, audit.TOKEN_REVOKE, audit.USER_REMOVE} <= set(
        _audit_actions(web, "alice")
    )


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
