"""TLS towards the PBX: TlsOptions and the contexts they build, pins checked inside the
handshake (of the API calls and of the download's own connection), handshakes cut off,
and the hint when an http:// URL names a TLS port.

Which path each test exercises: no transport is injected anywhere here; the API calls go
through httpx and the downloads through the socket pump, over real sockets to the
simulator (`sim`, HTTPS) or to small servers on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from callvault.pbx import (
    ErrorKind,
    PbxClient,
    PbxProtocolError,
    PbxTlsError,
    PbxTransportError,
    PinMismatchError,
    SyncPbxClient,
    TlsOptions,
    build_ssl_context,
    normalise_pin,
)
from callvault.pbx._tls import describe_tls_failure, is_broken_connection
from callvault.simulator import Simulator, SimulatorConfig
from support.pbx_fakes import PASSWORD, Sleeps
from support.pbx_sim import SIM_PASSWORD, outcomes, sim_client

HEX = "a1" * 32


@pytest.mark.parametrize(
    "form",
    [
        HEX,
        HEX.upper(),
        ":".join([HEX[i : i + 2] for i in range(0, 64, 2)]),
        f"sha256:{HEX}",
        f" {HEX} ",
    ],
)
def test_pin_forms(form: str) -> None:
    assert normalise_pin(form) == HEX
    assert TlsOptions(pin_sha256=form).pin_sha256 == HEX


@pytest.mark.parametrize("bad", ["", "abc", "zz" * 32, HEX + "00"])
def test_bad_pins_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        normalise_pin(bad)


def test_one_trust_mode_at_a_time(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one"):
        TlsOptions(ca_file=tmp_path / "ca.pem", insecure=True)
    with pytest.raises(ValueError, match="choose one"):
        TlsOptions(pin_sha256=HEX, insecure=True)
    with pytest.raises(ValueError, match="TLS version"):
        TlsOptions(minimum_version="1.4")


def test_contexts() -> None:
    default = build_ssl_context(TlsOptions())
    assert default.verify_mode is ssl.CERT_REQUIRED and default.check_hostname
    assert default.minimum_version is ssl.TLSVersion.TLSv1_2
    pinned = build_ssl_context(TlsOptions(pin_sha256=HEX))
    assert pinned.verify_mode is ssl.CERT_NONE  # the pin replaces CA and host name checks
    assert pinned.sslobject_class is not ssl.SSLObject
    assert pinned.sslsocket_class is not ssl.SSLSocket
    insecure = build_ssl_context(TlsOptions(insecure=True))
    assert insecure.verify_mode is ssl.CERT_NONE
    assert insecure.sslobject_class is ssl.SSLObject


def test_old_firmware_minimum_is_set_without_a_deprecation_warning() -> None:
    # The user asked for TLS 1.0 by name: Python's DeprecationWarning would only be noise
    # in their output (and an error under -W error).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = build_ssl_context(TlsOptions(insecure=True, minimum_version="1.0"))
    assert old.minimum_version is ssl.TLSVersion.TLSv1


def test_ca_file_context_trusts_that_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = build_ssl_context(TlsOptions(ca_file=ca_file))
    assert len(context.get_ca_certs()) == 1


def test_failure_descriptions_say_what_to_do(tmp_path: Path) -> None:
    assert "--pin-sha256" in describe_tls_failure(PinMismatchError("x"), TlsOptions(pin_sha256=HEX))
    untrusted = ssl.SSLCertVerificationError("certificate verify failed")
    assert "--ca-file or --pin-sha256" in describe_tls_failure(untrusted, TlsOptions())
    with_ca = describe_tls_failure(untrusted, TlsOptions(ca_file=tmp_path / "ca.pem"))
    assert "ca.pem" in with_ca


async def test_http_to_a_tls_port_says_to_use_https(sim: Simulator) -> None:
    url = sim.url.replace("https://", "http://")
    async with PbxClient(url, sim.username, SIM_PASSWORD, sleep=Sleeps()) as client:
        with pytest.raises(PbxProtocolError) as info:
            await client.login()
    assert sim.request_log == []
    origin = url.removeprefix("http://")
    assert str(info.value) == f"login: the PBX answered with TLS: use https://{origin}"
    assert info.value.kind is ErrorKind.LOGIN_REFUSED


async def test_https_to_a_plain_http_port_says_the_port_may_not_speak_tls(
    tmp_path: Path,
) -> None:
    """OpenSSL calls a plain HTTP answer to its ClientHello WRONG_VERSION_NUMBER: the
    error says what that most often means."""
    config = SimulatorConfig(password=SIM_PASSWORD, tls=False, data_dir=tmp_path)
    with Simulator(config) as plain:
        url = plain.url.replace("http://", "https://")
        async with PbxClient(url, plain.username, SIM_PASSWORD, max_attempts=1) as client:
            with pytest.raises(PbxTlsError) as info:
                await client.login()
    assert "WRONG_VERSION_NUMBER" in str(info.value)
    assert "the port may not speak TLS" in str(info.value)
    assert plain.request_log == []


async def test_a_plain_server_that_hangs_up_is_not_taken_for_tls() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[bytes] = []

    def serve() -> None:
        for _ in range(2):  # the login, then the probe's handshake
            conn, _ = listener.accept()
            with conn:
                accepted.append(conn.recv(5))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{listener.getsockname()[1]}"
        async with PbxClient(base, "api", PASSWORD, max_attempts=1) as client:
            with pytest.raises(PbxTransportError, match="broke off") as info:
                await client.login()
        thread.join(10)
    finally:
        listener.close()
    assert not isinstance(info.value, PbxProtocolError)
    assert accepted[0].startswith(b"POST") and accepted[1][:1] == b"\x16"  # a ClientHello


# ------------------------------------------------------------ pins, in the handshake


async def test_wrong_pin_is_refused_before_any_request(sim: Simulator, tmp_path: Path) -> None:
    call = sim.place_call()
    assert call.recording
    wrong = TlsOptions(pin_sha256=hashlib.sha256(b"another certificate").hexdigest())
    async with sim_client(sim, tls=wrong) as pbx:
        with pytest.raises(PbxTlsError) as info:
            await pbx.download_recording(call.recording, tmp_path)
    assert "--pin-sha256" in str(info.value)
    assert sim.request_log == []  # not even the login reached the PBX
    assert os.listdir(tmp_path) == []


async def test_download_connection_checks_the_pin_too(sim: Simulator, tmp_path: Path) -> None:
    """The GET has its own connection (the socket pump): a wrong pin stops it before a
    byte of the request (token, random) is written."""
    call = sim.place_call()
    assert call.recording
    async with sim_client(sim) as pbx:
        await pbx.login()
        wrong = TlsOptions(pin_sha256=hashlib.sha256(b"another certificate").hexdigest())
        pbx._ssl_context = wrong.ssl_context()  # as if the PBX changed after the login
        with pytest.raises(PbxTlsError) as info:
            await pbx.download_recording(call.recording, tmp_path)
    assert "--pin-sha256" in str(info.value)
    assert outcomes(sim, "recording/get_random") == ["Success"]
    assert outcomes(sim, "recording/download") == []  # the GET never reached the PBX
    assert os.listdir(tmp_path) == []


async def test_unverified_self_signed_certificate_is_refused(sim: Simulator) -> None:
    async with sim_client(sim, tls=TlsOptions()) as pbx:
        with pytest.raises(PbxTlsError) as info:
            await pbx.login()
    assert "--ca-file or --pin-sha256" in str(info.value)
    assert sim.request_log == []


async def test_ca_file_and_pin_with_colons_are_accepted(sim: Simulator) -> None:
    assert sim.ca_file is not None and sim.cert_sha256 is not None
    async with sim_client(sim, tls=TlsOptions(ca_file=sim.ca_file)) as pbx:
        await pbx.login()
    colons = ":".join(sim.cert_sha256[i : i + 2] for i in range(0, 64, 2)).upper()
    async with sim_client(sim, tls=TlsOptions(pin_sha256=colons)) as pbx:
        await pbx.login()
    assert outcomes(sim, "login") == ["Success", "Success"]


def test_sync_client_pin_mismatch_also_refused_on_blocking_sockets(sim: Simulator) -> None:
    wrong = TlsOptions(pin_sha256="ab" * 32)
    with (
        SyncPbxClient(sim.url, sim.username, SIM_PASSWORD, tls=wrong) as pbx,
        pytest.raises(PbxTlsError),
    ):
        pbx.login()
    assert sim.request_log == []


# ------------------------------------------------------------ handshakes cut off


@pytest.fixture
def closes_at_once() -> Iterator[tuple[str, list[int]]]:
    """A TCP server on 127.0.0.1 that accepts each connection and closes it at once: the
    TLS handshake meets an EOF (a PBX restarting, a proxy dropping the connection)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(5)
        listener.close()


async def test_a_connection_cut_during_the_handshake_is_retried_not_a_certificate_error(
    tmp_path: Path, closes_at_once: tuple[str, list[int]]
) -> None:
    base, accepted = closes_at_once
    tls = TlsOptions(pin_sha256="ab" * 32)
    async with PbxClient(base, "api", PASSWORD, tls=tls, max_attempts=3, sleep=Sleeps()) as c:
        with pytest.raises(PbxTransportError, match="during the TLS handshake") as info:
            await c.download_recording("a.wav", tmp_path)
    assert not isinstance(info.value, PbxTlsError)
    assert "gave up after 3 attempts" in str(info.value)
    assert len(accepted) == 3


def test_which_tls_errors_are_a_broken_connection() -> None:
    assert is_broken_connection(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))
    assert is_broken_connection(ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"))
    assert not is_broken_connection(ssl.SSLCertVerificationError(1, "certificate verify failed"))
    assert not is_broken_connection(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER]"))


async def test_a_tls_port_that_answers_plain_http_with_400_gets_the_hint_too() -> None:
    """As nginx does: a plain request to its TLS port gets "400 The plain HTTP request was
    sent to HTTPS port"; a ClientHello gets a TLS handshake."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    listener = socket.create_server(("127.0.0.1", 0))
    page = b"<html><body>The plain HTTP request was sent to HTTPS port</body></html>"

    def serve() -> None:
        for _ in range(2):  # the login, then the probe's handshake
            conn, _ = listener.accept()
            with conn:
                if conn.recv(1, socket.MSG_PEEK) == b"\x16":
                    with server_context.wrap_socket(conn, server_side=True):
                        pass
                    continue
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\n"
                    + f"Content-Length: {len(page)}\r\nConnection: close\r\n\r\n".encode()
                    + page
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        origin = f"127.0.0.1:{listener.getsockname()[1]}"
        async with PbxClient(f"http://{origin}", "api", PASSWORD, max_attempts=1) as client:
            with pytest.raises(PbxProtocolError) as info:
                await client.login()
        thread.join(10)
    finally:
        listener.close()
    assert str(info.value) == f"login: the PBX answered with TLS: use https://{origin}"
