"""TLS towards the PBX: verification on by default, a CA file, a pinned fingerprint, or insecure.

A pin is checked inside the handshake itself: the SSL object and socket classes of the context
are replaced by subclasses whose ``do_handshake`` compares the SHA-256 of the server's DER
certificate with the pin and raises :class:`ssl.SSLCertVerificationError` on a mismatch, so not
one byte of the request (token, password hash) is written to a server that is not the PBX.
With a pin, the CA and host name checks are replaced by the pin: the PBX's built-in
certificate is self-signed and rarely names the address it is reached by.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import socket
import ssl
import string
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from callvault.pbx._errors import PinMismatchError

T = TypeVar("T")

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


RECEIVE_SIZE = 1024 * 1024
"""How much `BioTlsSocket` takes from the kernel at most per read (256 KiB made the
encrypting worker about 10 % slower: 0.376 against 0.340 s, 11 runs each)."""


class BioTlsSocket:
    """TLS over a connected blocking socket through memory BIOs, for a large download.

    Why not `ssl.SSLSocket`: when OpenSSL reads the socket itself, it asks the kernel for
    every TLS record in two reads (its 5-byte header, then the rest): about 25,600 system
    calls, each with its wake-up, for a 200 MB recording. Here one ``recv_into`` takes
    whatever has arrived (up to `RECEIVE_SIZE`) and OpenSSL decrypts the records from
    memory. The thread reading a 200 MB body used a fifth less CPU (0.110 against 0.139
    s; docs/benchmarks.md, "Reading TLS from memory").

    It offers what `http.client` uses of a socket (``sendall``, ``makefile("rb")``,
    ``close``). The handshake is the context's own (`do_handshake`), a pin included:
    the context's `sslobject_class` checks it before any request byte is written. A
    connection that ends without TLS's close (a "ragged EOF") reads as the end of the
    stream, as for an `ssl.SSLSocket` with ``suppress_ragged_eofs``: the HTTP layer then
    finds the body short of its Content-Length. Timeouts are the socket's own.

    One thread at a time; another may shut the socket (`raw`) down to wake a blocked
    read.
    """

    def __init__(
        self, raw: socket.socket, context: ssl.SSLContext, server_hostname: str | None
    ) -> None:
        self.raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        self._received = memoryview(bytearray(RECEIVE_SIZE))
        self._readers = 0
        self._closing = False

    def do_handshake(self) -> None:
        """Complete the TLS handshake (blocking; pin and certificate checked)."""
        try:
            while not _handshake_done(self._tls):
                self._send_pending()
                self._receive()
        except PinMismatchError:
            raise  # not one more byte to a server that is not the PBX
        except ssl.SSLError:
            with contextlib.suppress(OSError):
                self._send_pending()  # the alert that says why, if OpenSSL wrote one
            raise
        self._send_pending()

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = _done(self._tls.write, view)
            if written is None:  # a renegotiation wants the server's answer
                self._send_pending()
                self._receive()
                continue
            view = view[written:]
            self._send_pending()

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Decrypt into `buffer` what has arrived, waiting only when nothing has; 0 at the
        end of the stream."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            try:
                # With a buffer, read answers the count (typeshed says bytes).
                count = cast(int | None, _done(self._tls.read, len(view) - filled, view[filled:]))
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # closed, cleanly or not
                break
            if count is None:
                if filled or self._incoming.eof:
                    break
                self._send_pending()  # what reading made OpenSSL say (a key update)
                self._receive()
                continue
            if not count:
                break
            filled += count
        return filled

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"BioTlsSocket reads only ('rb'), not {mode!r}")
        self._readers += 1
        return io.BufferedReader(_BioTlsReader(self))

    def close(self) -> None:
        """Close the socket, once no stream from `makefile` is open any more (as a
        socket does: http.client closes the connection as soon as the response has
        arrived, and reads the body after)."""
        self._closing = True
        if self._readers <= 0:
            self.raw.close()

    def _reader_closed(self) -> None:
        self._readers -= 1
        if self._closing and self._readers <= 0:
            self.raw.close()

    def _receive(self) -> None:
        count = self.raw.recv_into(self._received)
        if count:
            self._incoming.write(self._received[:count])
        else:
            self._incoming.write_eof()

    def _send_pending(self) -> None:
        if self._outgoing.pending:
            self.raw.sendall(self._outgoing.read())


def _handshake_done(tls: ssl.SSLObject) -> bool:
    """One step of the handshake: False while it needs more bytes from the server (for
    why this is a function of its own, see `_done`)."""
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def _done(step: Callable[..., T], *args: Any) -> T | None:
    """What `step(*args)` (a method of the SSL object) answers, or None when it needs more
    bytes from the server. Why not call it in a try block and receive in its except clause: an
    error of the socket raised there (a timeout, a reset) would carry the SSLWantReadError
    as its context, and the error mapping (`find_ssl_error`) would take it for a TLS
    refusal."""
    try:
        return step(*args)
    except ssl.SSLWantReadError:
        return None


class _BioTlsReader(io.RawIOBase):
    """The readable stream `BioTlsSocket.makefile` wraps in a buffered reader."""

    def __init__(self, connection: BioTlsSocket) -> None:
        super().__init__()
        self._connection = connection

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._connection.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._connection._reader_closed()
