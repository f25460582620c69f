"""Simulator: login, tokens, lockout, request errors, headers and TLS, over real HTTPS."""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
from collections.abc import Iterator

import httpx
import pytest

from callvault.simulator import Simulator
from support.sim_helpers import PASSWORD, Pbx, make_config, md5, running_pbx, trusting_context


@pytest.fixture
def pbx() -> Iterator[Pbx]:
    yield from running_pbx()


def test_login_answers_a_token_with_the_pbx_headers(pbx: Pbx) -> None:
    response = pbx.call("login", body={"username": "api", "password": md5(PASSWORD), "port": "0"})
    assert response.status_code == 200
    assert re.fullmatch(rb'\{"status":"Success","token":"[0-9a-f]{32}"\}', response.content)
    assert response.headers["server"] == "Boa/0.94.14rc21"
    assert response.headers["connection"] == "close"
    assert response.headers["content-type"] == "application/json"
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["access-control-allow-methods"] == "GET, POST, OPTIONS, PUT, DELETE"
    assert pbx.sim.login_count == 1


def test_v2_login_also_says_the_report_transport(pbx: Pbx) -> None:
    data = pbx.ok("login", version="v2.0.0", body={"username": "api", "password": md5(PASSWORD)})
    assert data["transport"] == "HTTP"


@pytest.mark.parametrize("password", [PASSWORD, md5(PASSWORD).upper(), md5("wrong")])
def test_login_wants_the_lowercase_md5_of_the_password(pbx: Pbx, password: str) -> None:
    body = {"username": "api", "password": password, "port": "0"}
    assert pbx.errno("login", body=body) == "20003"
    assert pbx.sim.failed_login_count("127.0.0.1") == 1


def test_wrong_username_is_refused(pbx: Pbx) -> None:
    body = {"username": "admin", "password": md5(PASSWORD), "port": "0"}
    assert pbx.errno("login", body=body) == "20003"


def test_five_failed_logins_lock_the_ip_out_for_ten_minutes(pbx: Pbx) -> None:
    bad = {"username": "api", "password": md5("nope"), "port": "0"}
    good = {"username": "api", "password": md5(PASSWORD), "port": "0"}
    assert [pbx.errno("login", body=bad) for _ in range(5)] == ["20003"] * 5
    assert pbx.sim.failed_login_count("127.0.0.1") == 5
    assert pbx.errno("login", body=good) == "20002"  # even the right password
    pbx.sim.clock.advance(599)
    assert pbx.errno("login", body=good) == "20002"
    pbx.sim.clock.advance(2)
    assert pbx.ok("login", body=good)["token"]
    assert pbx.sim.failed_login_count("127.0.0.1") == 0


def test_a_successful_login_resets_the_failure_count(pbx: Pbx) -> None:
    bad = {"username": "api", "password": md5("nope"), "port": "0"}
    for _ in range(4):
        assert pbx.errno("login", body=bad) == "20003"
    pbx.login()
    assert pbx.sim.failed_login_count("127.0.0.1") == 0
    for _ in range(4):
        assert pbx.errno("login", body=bad) == "20003"
    assert pbx.login()


def test_token_validity_slides_with_each_request(pbx: Pbx) -> None:
    token = pbx.login()
    heartbeat = {"ipaddr": "127.0.0.1", "port": "0"}
    pbx.sim.clock.advance(1700)
    pbx.ok("heartbeat", token=token, body=heartbeat)
    pbx.sim.clock.advance(1700)  # 3400 s after login, 1700 s after the last request
    pbx.ok("heartbeat", token=token, body=heartbeat)
    pbx.sim.clock.advance(1801)
    assert pbx.errno("heartbeat", token=token, body=heartbeat) == "20006"
    assert pbx.errno("heartbeat", token=token, body=heartbeat) == "20006"


def test_token_errors(pbx: Pbx) -> None:
    body = {"ipaddr": "127.0.0.1", "port": "0"}
    assert pbx.errno("heartbeat", body=body) == "20005"
    assert pbx.errno("heartbeat", token="", body=body) == "20005"
    assert pbx.errno("heartbeat", token="0" * 32, body=body) == "20004"
    token = pbx.login()
    assert pbx.ok("logout", token=token) == {"status": "Success"}
    assert pbx.errno("heartbeat", token=token, body=body) == "20004"


def test_api_errors_are_json_with_http_200(pbx: Pbx) -> None:
    login = {"username": "api", "password": md5(PASSWORD), "port": "0"}
    assert pbx.errno("login", content=b"username=api") == "20000"
    assert pbx.errno("login", content=b"[1, 2]") == "20000"
    assert pbx.errno("login", method="GET") == "20001"
    assert pbx.errno("login", content=b"") == "20007"
    assert pbx.errno("login", body={"username": "api", "port": "0"}) == "10004"
    assert pbx.errno("login", body={**login, "username": "  "}) == "10004"
    assert pbx.errno("dial_extension", body=login) == "10003"
    assert pbx.errno("login", version="v1.1", body=login) == "10003"  # v1.10 is v1.1.0
    token = pbx.login()
    assert pbx.errno("heartbeat", token=token, body={"port": "0"}) == "10004"
    assert pbx.errno("recording/get_random", token=token, body={"allowedip": ""}) == "10004"
    assert pbx.errno("recording/get_random", token=token, method="GET") == "20001"


def test_paths_outside_the_api_get_boa_html(pbx: Pbx) -> None:
    response = pbx.client.get(f"{pbx.sim.url}/index.html?token=abcdef")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "404 Not Found" in response.text
    assert "/index.html" in response.text and "abcdef" not in response.text


def test_login_port_rules(pbx: Pbx) -> None:
    creds = {"username": "api", "password": md5(PASSWORD)}
    assert pbx.errno("login", version="v1.1.0", body=creds) == "10004"  # v1: port required
    assert pbx.ok("login", version="v2.0.0", body=creds)  # v2: optional, default 8260
    assert pbx.ok("login", body={**creds, "port": 8260})  # integer accepted
    assert pbx.errno("login", body={**creds, "port": "http"}) == "20008"
    assert pbx.errno("login", body={**creds, "port": "70000"}) == "20008"


@pytest.mark.parametrize("invalidate", [False, True])
def test_second_login_keeps_or_invalidates_the_first_token(invalidate: bool) -> None:
    config = make_config(invalidate_previous_tokens_on_login=invalidate)
    with Simulator(config) as sim, httpx.Client(verify=trusting_context(sim)) as client:
        pbx = Pbx(sim, client)
        first = pbx.login()
        second = pbx.login()
        assert first != second
        body = {"ipaddr": "127.0.0.1", "port": "0"}
        if invalidate:
            assert pbx.errno("heartbeat", token=first, body=body) == "20004"
        else:
            pbx.ok("heartbeat", token=first, body=body)
        pbx.ok("heartbeat", token=second, body=body)


def test_the_fault_switch_also_invalidates_previous_tokens(pbx: Pbx) -> None:
    pbx.sim.faults.invalidate_previous_tokens_on_login = True
    first = pbx.login()
    pbx.login()
    assert pbx.errno("logout", token=first) == "20004"


def test_revoke_and_reboot_forget_tokens(pbx: Pbx) -> None:
    token = pbx.login()
    pbx.sim.revoke_tokens()
    assert pbx.errno("logout", token=token) == "20004"
    token = pbx.login()
    pbx.sim.reboot()
    assert pbx.errno("logout", token=token) == "20004"


def test_cors_preflight(pbx: Pbx) -> None:
    response = pbx.call("login", method="OPTIONS")
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"


def test_tls_is_1_2_only_and_the_fingerprint_matches(pbx: Pbx) -> None:
    context = trusting_context(pbx.sim)
    with (
        socket.create_connection(("127.0.0.1", pbx.sim.port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.2"
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        assert hashlib.sha256(der).hexdigest() == pbx.sim.cert_sha256
    only13 = trusting_context(pbx.sim)
    only13.minimum_version = ssl.TLSVersion.TLSv1_3
    with socket.create_connection(("127.0.0.1", pbx.sim.port)) as raw, pytest.raises(ssl.SSLError):
        only13.wrap_socket(raw, server_hostname="127.0.0.1")


def test_untrusted_clients_are_refused_by_certificate_check(pbx: Pbx) -> None:
    with httpx.Client() as client, pytest.raises(httpx.ConnectError):
        client.post(f"{pbx.sim.url}/api/v1.1.0/login", json={})


def test_the_server_closes_the_connection_after_each_response(pbx: Pbx) -> None:
    context = trusting_context(pbx.sim)
    request = (
        b"POST /api/v1.1.0/logout HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Connection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    )
    with (
        socket.create_connection(("127.0.0.1", pbx.sim.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(request)
        data = b""
        while chunk := tls.recv(65536):  # ends only because the server closes
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert data.endswith(b'{"status":"Failed","errno":"20005"}')


def test_plain_http_option() -> None:
    with Simulator(make_config(tls=False)) as sim, httpx.Client() as client:
        assert sim.url.startswith("http://127.0.0.1:")
        assert sim.cert_sha256 is None and sim.ca_file is None
        pbx = Pbx(sim, client)
        assert len(pbx.login()) == 32


def test_secrets_stay_out_of_reprs() -> None:
    config = make_config()
    with Simulator(config) as sim, httpx.Client(verify=trusting_context(sim)) as client:
        token = Pbx(sim, client).login()
        for text in (repr(config), repr(sim), repr(sim.state)):
            assert PASSWORD not in text and token not in text
