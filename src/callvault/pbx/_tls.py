"""TLS towards the PBX: verification on by default, a CA file, a pinned fingerprint, or insecure.

A pin is checked inside the handshake itself: the SSL object and socket classes of the context
are replaced by subclasses whose ``do_handshake`` compares the SHA-256 of the server's DER
certificate with the pin and raises :class:`ssl.SSLCertVerificationError` on a mismatch, so not
one byte of the request (token, password hash) is written to a server that is not the PBX.
With a pin, the CA and host name checks are replaced by the pin: the PBX's built-in
certificate is self-signed and rarely names the address it is reached by.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
import string
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callvault.pbx._errors import PinMismatchError

_TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def normalise_pin(pin: str) -> str:
    """Return a SHA-256 fingerprint as 64 lowercase hex digits.

    Accepts the forms people copy from tools: with or without colons or spaces, any case,
    optionally prefixed with ``sha256:``.
    """
    text = pin.strip().lower()
    if text.startswith("sha256:") or text.startswith("sha256="):
        text = text[7:]
    digits = "".join(ch for ch in text if ch not in ": ")
    if len(digits) != 64 or any(ch not in string.hexdigits for ch in digits):
        raise ValueError(
            "a certificate pin must be the SHA-256 fingerprint of the PBX's certificate: "
            "64 hex digits, colons allowed"
        )
    return digits


def certificate_sha256(der: bytes) -> str:
    """The fingerprint a pin is compared with: SHA-256 of the DER certificate, lowercase hex."""
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """How to trust the PBX's certificate.

    Default: the system's CA store and host name check. ``ca_file``: trust that CA bundle
    instead. ``pin_sha256``: trust exactly the certificate with that fingerprint (checked
    during the handshake). ``insecure``: trust anything (an eavesdropper can then read the
    token and every recording). ``minimum_version``: "1.2" unless the PBX is old firmware.
    """

    ca_file: Path | None = None
    pin_sha256: str | None = None
    insecure: bool = False
    minimum_version: str = "1.2"

    def __post_init__(self) -> None:
        chosen = sum((self.ca_file is not None, self.pin_sha256 is not None, self.insecure))
        if chosen > 1:
            raise ValueError("choose one of ca_file, pin_sha256 and insecure")
        if self.pin_sha256 is not None:
            object.__setattr__(self, "pin_sha256", normalise_pin(self.pin_sha256))
        if self.minimum_version not in _TLS_VERSIONS:
            raise ValueError(
                f"unknown TLS version {self.minimum_version!r}: use one of "
                + ", ".join(_TLS_VERSIONS)
            )

    def ssl_context(self) -> ssl.SSLContext:
        """Build the client SSL context these options describe."""
        return build_ssl_context(self)


def _check_pin(der: bytes | None, pin: str) -> None:
    if der is None:
        raise PinMismatchError("the PBX sent no certificate")
    if not hmac.compare_digest(certificate_sha256(der), pin):
        raise PinMismatchError("certificate SHA-256 fingerprint does not match the pin")


def _pinned_classes(pin: str) -> tuple[type[ssl.SSLObject], type[ssl.SSLSocket]]:
    class PinnedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            _check_pin(self.getpeercert(binary_form=True), pin)

    class PinnedSSLSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            _check_pin(self.getpeercert(binary_form=True), pin)

    return PinnedSSLObject, PinnedSSLSocket


def build_ssl_context(options: TlsOptions) -> ssl.SSLContext:
    """An SSL context for talking to the PBX, per ``options``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    minimum = _TLS_VERSIONS[options.minimum_version]
    if minimum < ssl.TLSVersion.TLSv1_2:
        # Old firmware speaks only TLS 1.0/1.1; OpenSSL refuses those at its default level.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        # Python deprecates TLS 1.0/1.1; the user asked for them by name (--tls-min-version)
        # because the PBX's firmware speaks nothing newer, so the warning tells them nothing.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = minimum
    if options.pin_sha256 is not None:
        # The pin replaces CA and host name checks (a PBX's certificate is self-signed and
        # names no host): PinnedSSLObject/PinnedSSLSocket compare the certificate's SHA-256
        # at the end of the handshake and abort it, before any request byte is sent.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        obj_class, sock_class = _pinned_classes(options.pin_sha256)
        context.sslobject_class = obj_class
        context.sslsocket_class = sock_class
    elif options.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif options.ca_file is not None:
        context.load_verify_locations(cafile=str(options.ca_file))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


def find_ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error somewhere in an exception's cause/context chain, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        current = current.__cause__ or current.__context__
    return None


def is_broken_connection(error: ssl.SSLError) -> bool:
    """Whether a TLS error is the connection ending mid-handshake (retryable), not a
    refusal: a PBX restarting or a network drop, which a certificate or version change
    would not explain."""
    if isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
        return True
    return getattr(error, "reason", None) == "UNEXPECTED_EOF_WHILE_READING"


def describe_tls_failure(error: ssl.SSLError, options: TlsOptions) -> str:
    """Say in words why the handshake failed and what to do about it."""
    if isinstance(error, PinMismatchError):
        return (
            "TLS: the PBX's certificate does not match --pin-sha256; check the fingerprint "
            "(shown by `callvault simulate`, or in the PBX's certificate) or that this is the "
            "right PBX"
        )
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = _verify_reason(error)
        if options.ca_file is not None:
            return (
                f"TLS: certificate not trusted by --ca-file {options.ca_file} ({reason}); "
                "pass the CA that signed the PBX's certificate, or pin it with --pin-sha256"
            )
        return (
            f"TLS: certificate not trusted ({reason}): pass --ca-file or --pin-sha256 "
            "(the SHA-256 fingerprint of the PBX's certificate; `callvault simulate` prints "
            "its own)"
        )
    reason = getattr(error, "reason", None) or type(error).__name__
    version_hint = ""
    if str(reason).upper() == "WRONG_VERSION_NUMBER":
        # What OpenSSL says when the answer is not TLS at all: most often plain HTTP.
        version_hint = (
            "; the port may not speak TLS: if the PBX's web page there is http://, use "
            "an http:// URL (or its HTTPS port); an old PBX firmware may also need a "
            "lower minimum TLS version"
        )
    elif options.minimum_version == "1.2" and "VERSION" in str(reason).upper():
        version_hint = "; an old PBX firmware may need a lower minimum TLS version"
    return f"TLS handshake with the PBX failed ({reason}){version_hint}"


def _verify_reason(error: ssl.SSLCertVerificationError) -> str:
    message: Any = getattr(error, "verify_message", None)
    if isinstance(message, str) and message:
        return message
    return "verification failed"


def speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether the server at `host`:`port` answers a TLS handshake (blocking).

    For a hint when a ``http://`` URL names an HTTPS port: the server then drops the plain
    request or answers it with an error page. Only a handshake is made (any certificate,
    any version, no SNI) and the connection closed; no request is sent. A TLS alert counts
    as TLS too (the server spoke it, only not with this handshake).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw),
        ):
            return True
    except ssl.SSLError as exc:
        return "ALERT" in str(getattr(exc, "reason", None) or "").upper()
    except OSError:
        return False
