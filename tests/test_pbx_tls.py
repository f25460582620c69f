"""TlsOptions: pin formats, one trust mode at a time, the contexts they build."""

from __future__ import annotations

import socket
import ssl
import threading
import warnings
from pathlib import Path

import pytest
import trustme

from callvault.pbx import (
    ErrorKind,
    PbxClient,
    PbxProtocolError,
    PbxTransportError,
    PinMismatchError,
    TlsOptions,
    build_ssl_context,
    normalise_pin,
)
from callvault.pbx._tls import describe_tls_failure
from callvault.simulator import Simulator, SimulatorConfig
from support.pbx_fakes import PASSWORD, Sleeps

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


async def test_http_to_a_tls_port_says_to_use_https() -> None:
    with Simulator(SimulatorConfig(password=PASSWORD, seed=7)) as sim:
        url = sim.url.replace("https://", "http://")
        async with PbxClient(url, sim.username, PASSWORD, sleep=Sleeps()) as client:
            with pytest.raises(PbxProtocolError) as info:
                await client.login()
        assert sim.request_log == []
    origin = url.removeprefix("http://")
    assert str(info.value) == f"login: the PBX answered with TLS: use https://{origin}"
    assert info.value.kind is ErrorKind.LOGIN_REFUSED


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
