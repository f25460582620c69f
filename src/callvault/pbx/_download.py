"""The byte pumps of a recording download, and the temporary file they fill.

Both clients (`PbxClient` and `PSeriesClient`) check a download in one place
(`receive_recording`); what it reads from is a `ResponseBody`, of one of two kinds:

- `SocketBody`, used whenever no httpx transport was injected: the GET and the body run in
  worker threads on a plain blocking socket (`http.client` over a `BioTlsSocket` of the
  client's own SSL context, so a pin is checked inside the handshake as everywhere else,
  with the same timeout; TLS records are decrypted from memory, not read from the socket
  one by one). The body is read with ``readinto`` into reusable 1 MiB buffers while a
  second thread hashes the previous one and a third writes the one before, with no
  event-loop round trip per 16 KiB TLS record (the asyncio TLS stack costs about 110 us
  per record, 75 MB/s at best).
- `HttpxBody`, for an injected ``httpx`` transport (``httpx.MockTransport`` in callers'
  tests): the same checks over httpx's async stream.

Either way, a file larger than 4 MiB is also synced to disk as it grows, by a thread of its
own (`Flusher`), so that the fsync at the end has only the tail left to wait for.

Cancelling the awaiting task shuts the socket down (the worker's read returns at once),
waits for the worker to stop touching the temporary file, and lets the caller remove it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import http.client
import io
import mmap
import os
import queue
import secrets
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import httpx

from callvault.pbx._errors import (
    InvalidRecording,
    PbxError,
    PbxProtocolError,
    PbxTransportError,
    SessionWithdrawn,
)
from callvault.pbx._mapping import Phase, origin_of, transport_error
from callvault.pbx._tls import BioTlsSocket, TlsOptions
from callvault.pbx._types import DownloadResult, StreamTransform

T = TypeVar("T")

MAX_JSON_ERROR_BYTES = 64 * 1024
MIN_WAV_BYTES = 44  # a RIFF/WAVE header alone

AudioFormat = Literal["wav", "mp3"]
"""What a download body must be: RIFF/WAVE, or MP3 (an ID3 tag or an MPEG frame sync)."""

DownloadProgress = Callable[[int, int | None], None]
"""Called with (bytes received so far, Content-Length or None) while a download streams."""

ApiAnswer = Callable[[int, httpx.Headers, bytes, str], object]
"""How a client reads a JSON body that came instead of the file: it raises the mapped
error (or returns, when the body says success, which is then a protocol error)."""

READ_CHUNK = 1024 * 1024
"""The size of the socket pump's reusable buffers: 64 TLS records per read, hash and write."""

PIPELINE_DEPTH = 4
"""How many of those buffers are being read, hashed, written or waiting at a time."""

WRITE_BUFFER = 1024 * 1024
"""The write buffer of the httpx pump, which hands over one TLS record (<= 16 KiB) at a time."""

WRITEBACK_STEP = 4 * 1024 * 1024
"""Every this many bytes, what is written so far is made durable in the background (see
`Flusher`), so that the final fsync has only the tail left to wait for."""

DIRECT_STAGE = 1024 * 1024
"""With O_DIRECT, what is written goes to the disk in pieces of this size, from one
page-aligned buffer (see `TempFile`)."""

DIRECT_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs"})
"""The file systems a download is written to with O_DIRECT: those of local disks. On a
network file system (NFS, SMB: a directory shared between nodes) each direct write would
wait for the server's disk; on tmpfs or FUSE it gains nothing or is refused."""

_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_FADVISE = getattr(os, "posix_fadvise", None)
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", 0)
_DATASYNC: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


@functools.lru_cache(maxsize=64)
def file_system_type(device: int) -> str | None:
    """The type of the file system mounted from `device` (a `st_dev`), as
    /proc/self/mountinfo says it; None where that is not known."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split(" ", 3)
                if len(fields) > 2 and fields[2] == wanted and " - " in line:
                    found = line.split(" - ", 1)[1].split(" ", 1)[0]  # the last mount wins
    except OSError:
        return None
    return found


def _direct_flag(directory: Path) -> int:
    """O_DIRECT for a file in `directory` if its file system is a local disk's, else 0."""
    if not _O_DIRECT:
        return 0
    try:
        device = os.stat(directory).st_dev
    except OSError:
        return 0
    return _O_DIRECT if file_system_type(device) in DIRECT_FILE_SYSTEMS else 0


class Flusher:
    """Makes a file durable while it is still being written, in a thread of its own.

    Why: an fsync waits until the storage says the bytes are kept, which on a disk with a
    write cache (a virtual machine's disk, a RAID controller) means until the cache has
    written them all out, and that takes as long as the amount not yet flushed. Asking the
    kernel only to start writeback as a file grows (what this replaced) left the device's
    cache to flush at the end: on the development machine the final fsync of a 200 MB
    recording took 0.15 s even with nothing left dirty in the page cache. Syncing every
    `WRITEBACK_STEP` bytes in the background spreads that wait over the download, and the
    final fsync has only the last step to wait for (there, the end of a download took
    0.004 to 0.013 s instead of 0.22 to 0.38; docs/benchmarks.md).

    Once a range is on disk its pages are dropped from the page cache
    (POSIX_FADV_DONTNEED): a recording is written once and not read back soon, so it
    should not push other data out of the cache. (A file written with O_DIRECT, see
    `TempFile`, has no pages there but its tail; the syncs still flush the disk's cache.)

    The thread syncs its own duplicate of the file descriptor, which it closes when it
    ends, so the writer may close its own at any time. A failed sync is kept and raised by
    `finish`: the kernel reports a write error to one sync only, so the final fsync would
    not see it again.
    """

    def __init__(self, fd: int) -> None:
        self._fd = os.dup(fd)
        self._changed = threading.Condition()
        self._wanted = 0  # the size written (and flushed by the writer) to make durable
        self._synced = 0
        self._stopping = False
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="callvault-flush", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            os.close(self._fd)
            raise

    def request(self, size: int) -> None:
        """Make the first `size` bytes durable soon (the writer has written them)."""
        with self._changed:
            self._wanted = size
            self._changed.notify()

    def finish(self) -> None:
        """Stop once the syncs under way are done; raise the first that failed."""
        self.stop()
        self._thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Stop soon, without waiting (the file is being discarded)."""
        with self._changed:
            self._stopping = True
            self._changed.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._changed:
                    while not self._stopping and self._wanted <= self._synced:
                        self._changed.wait()
                    if self._stopping:
                        return
                    wanted = self._wanted
                try:
                    _DATASYNC(self._fd)
                except OSError as exc:
                    self.error = exc
                    return
                if _FADVISE is not None:
                    with contextlib.suppress(OSError):
                        _FADVISE(self._fd, self._synced, wanted - self._synced, _DONTNEED)
                self._synced = wanted
        finally:
            os.close(self._fd)


class TempFile:
    """A temporary file in the destination directory, renamed into place only when complete.

    Created with mode 0o666 less the umask, like any file the user saves, so the renamed
    recording has normal permissions. Hashes what is written (SHA-256). Not thread-safe:
    one writer at a time.

    On a local disk's file system (`DIRECT_FILE_SYSTEMS`), the bytes bypass the page cache
    (Linux's O_DIRECT): they are gathered in one page-aligned buffer of `DIRECT_STAGE`
    bytes and each full buffer goes straight to the disk. A recording is written once and
    not read back soon, so copying it into the page cache, then having the kernel write it
    out and drop it again, is work for nothing (docs/benchmarks.md, "Reading TLS from
    memory"). The last piece, not a whole number of disk blocks, is written through the
    cache before the fsync. Elsewhere, or where the file system refuses O_DIRECT after all
    (at open, or at the first write), the writes go through the cache.
    """

    def __init__(
        self,
        directory: Path,
        *,
        buffering: int = WRITE_BUFFER,
        transform: StreamTransform | None = None,
        hash_written: bool = True,
    ) -> None:
        self.directory = directory
        # What the bytes pass through on their way to the file (`size` and `sha256` stay
        # those of the bytes given): see `StreamTransform`. It runs in `write_hashed` (the
        # writing stage of a pipeline), which hashes its output (`written_sha256`) unless
        # `hash_written` is False, and hands the buffer back to it once written.
        self._transform = transform
        self._reuse: bytearray | None = None
        self._written = hashlib.sha256() if transform is not None and hash_written else None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        direct = _direct_flag(directory)
        for _ in range(100):
            path = directory / f".callvault-{secrets.token_hex(6)}.part"
            try:
                fd = os.open(path, flags | direct, 0o666)
            except FileExistsError:
                continue
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                # The file system cannot bypass its cache; Linux refuses only after it
                # has created the file.
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                direct = 0
                continue
            break
        else:  # pragma: no cover - 100 collisions of 48 random bits
            raise FileExistsError(f"no free temporary file name in {directory}")
        self.path = path
        # With O_DIRECT: the page-aligned buffer whole pieces are written from, and how
        # much of it is filled (None once the file is written through the cache).
        self._stage: memoryview | None = None
        self._staged = 0
        self._buffering = buffering  # for the writes through the cache, after the stage
        if direct:
            try:
                self._stage = memoryview(mmap.mmap(-1, DIRECT_STAGE))
            except BaseException:
                os.close(fd)
                path.unlink()
                raise
            buffering = 0
        self._file = os.fdopen(fd, "wb", buffering=buffering)
        self.size = 0
        self._hash = hashlib.sha256()
        self._flusher: Flusher | None = None  # started once the file passes a step
        self._writeback_due = WRITEBACK_STEP

    def write(self, data: bytes | memoryview) -> None:
        self.hash(data)
        self.write_hashed(data)

    def hash(self, data: bytes | memoryview) -> None:
        """Hash `data` (the bytes as given, before any transform)."""
        self._hash.update(data)

    def write_hashed(self, data: bytes | memoryview) -> None:
        """Write `data` already given to `hash` (the two may run in different threads),
        through the transform if there is one.

        Why the transform (encryption at rest) runs here, in the writing stage of a
        pipeline: the reading thread is the one the download waits for (TLS, and the
        kernel's copies), the writing thread the one with time to spare (its writes wait
        on the disk, not the CPU), and `cryptography` 50 gives the GIL up while it seals.
        Moved here from the reading thread, the encrypting worker took 0.357 s instead of
        0.374 s per 200 MB (15 runs each, interleaved; docs/benchmarks.md).
        """
        if self._transform is not None:
            out = self._transform.update(data, reuse=self._reuse)
            if self._written is not None:
                self._written.update(out)
            self._write(out)
            self._reuse = out if isinstance(out, bytearray) else None
        else:
            self._write(data)
        self.size += len(data)
        if self.size >= self._writeback_due:
            self._start_writeback()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._stage is not None:
            self._write_staged(data)
            return
        self._write_all(memoryview(data))

    def _write_all(self, view: memoryview) -> None:
        while view:
            written = self._file.write(view)
            if written is None:  # pragma: no cover - only non-blocking files answer None
                continue
            view = view[written:]

    def _write_staged(self, data: bytes | bytearray | memoryview) -> None:
        assert self._stage is not None
        view = memoryview(data).cast("B")
        while view:
            take = min(len(view), DIRECT_STAGE - self._staged)
            self._stage[self._staged : self._staged + take] = view[:take]
            self._staged += take
            view = view[take:]
            if self._staged == DIRECT_STAGE:
                self._write_stage()
                if self._stage is None:  # now through the cache
                    self._write_all(view)
                    return

    def _write_stage(self) -> None:
        """Write the staged bytes straight to the disk; if the file system refuses that after
        all, through the cache from now on."""
        assert self._stage is not None
        rest = self._stage[: self._staged]
        try:
            while rest:
                written = self._file.write(rest)
                if written is None:  # pragma: no cover - only non-blocking files answer None
                    continue
                rest = rest[written:]
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._through_the_cache(rest)
            return
        self._staged = 0

    def _through_the_cache(self, rest: memoryview) -> None:
        """Leave O_DIRECT: `rest` (what is staged and not yet written), and everything
        after, is written through the page cache."""
        fd = self._file.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self._stage, self._staged = None, 0
        if self._buffering > 0 and isinstance(self._file, io.FileIO):
            self._file = io.BufferedWriter(self._file, self._buffering)
        self._write_all(rest)

    def _start_writeback(self) -> None:
        """Have what is written so far made durable in the background (see `Flusher`)."""
        self._writeback_due = self.size + WRITEBACK_STEP
        self._file.flush()
        if self._flusher is None:
            try:
                self._flusher = Flusher(self._file.fileno())
            except (OSError, RuntimeError):  # no descriptor or thread to spare
                return  # the final fsync does it all, as it would anyway
        self._flusher.request(self.size)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def written_sha256(self) -> str | None:
        """The SHA-256 of the file as written, when a transform made it differ (after
        `commit`); None without one, or when it was not asked for (`hash_written`)."""
        return self._written.hexdigest() if self._written is not None else None

    def commit(self, target: Path) -> None:
        """fsync, rename to `target`, fsync the directory (blocking: run it in a thread)."""
        if self._transform is not None:
            tail = self._transform.finish()
            if self._written is not None:
                self._written.update(tail)
            self._write(tail)
        if self._stage is not None:
            # The last piece, not a whole number of blocks.
            self._through_the_cache(self._stage[: self._staged])
        self._file.flush()
        if self._flusher is not None:
            self._flusher.finish()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.path, target)
        with contextlib.suppress(OSError):  # not every file system can fsync a directory
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def discard(self) -> None:
        self._stage = None
        if self._flusher is not None:
            self._flusher.stop()  # it closes its own descriptor when its sync returns
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class BodyBroken(Exception):
    """The connection failed while the body was being read.

    `error` is what to raise when nothing of the body had arrived yet; `cause` names the
    low-level failure for the message about a partial body.
    """

    def __init__(self, error: PbxError, cause: BaseException) -> None:
        super().__init__(str(error))
        self.error = error
        self.cause = type(cause).__name__


class ResponseBody(Protocol):
    """A download response whose headers have arrived; what the checks read from."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> httpx.Headers: ...

    @property
    def write_buffering(self) -> int:
        """The `TempFile` buffer that suits the size of the pieces `pour` writes."""
        ...

    async def read(self) -> bytes:
        """The next piece of the body; b"" at its end. Raises `BodyBroken`."""
        ...

    async def pour(self, temp: TempFile, report: Callable[[], None] | None) -> None:
        """Everything left of the body into `temp`, calling `report` (on the event loop)
        as it grows. Raises `BodyBroken`; `OSError` from writing passes through."""
        ...

    async def aclose(self) -> None: ...


async def run_blocking(
    work: Callable[[], T], *, on_cancel: Callable[[], None], wait_on_cancel: bool
) -> T:
    """Run `work` in a thread of its own and await its result.

    A download holds its thread for as long as it lasts, so it does not borrow one of the
    event loop's shared executor threads. If the awaiting task is cancelled, `on_cancel` is
    called (it must make `work` stop soon, e.g. by shutting its socket down); with
    `wait_on_cancel`, the cancellation is held back until `work` has returned.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def thread_main() -> None:
        value: T | None = None
        error: BaseException | None = None
        try:
            value = work()
        except BaseException as exc:  # handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody waits
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=thread_main, name="callvault-download", daemon=True).start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        # Whatever the worker ends with is not reported: the cancellation is what the caller
        # sees (retrieving it keeps asyncio from logging "exception never retrieved").
        future.add_done_callback(_retrieve)
        on_cancel()
        if wait_on_cancel:
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({future})
        raise


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class HttpxBody:
    """The body of a response from the (injected) httpx transport."""

    def __init__(self, response: httpx.Response, describe: Callable[[Exception], PbxError]):
        self._response = response
        self._describe = describe
        # aiter_raw: no decoder layer (only identity is accepted); a MockTransport response
        # built from bytes is already read, and only aiter_bytes replays it.
        self._chunks: AsyncIterator[bytes] = (
            response.aiter_bytes() if response.is_stream_consumed else response.aiter_raw()
        )

    @property
    def status_code(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> httpx.Headers:
        return self._response.headers

    write_buffering = WRITE_BUFFER  # TLS hands over one record (<= 16 KiB) at a time

    async def read(self) -> bytes:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return b""
        except httpx.HTTPError as exc:
            raise BodyBroken(self._describe(exc), exc) from None

    async def pour(self, temp: TempFile, report: Callable[[], None] | None) -> None:
        try:
            async for chunk in self._chunks:
                temp.write(chunk)
                if report is not None:
                    report()
        except httpx.HTTPError as exc:
            raise BodyBroken(self._describe(exc), exc) from None

    async def aclose(self) -> None:
        await self._response.aclose()


def headers_from_wire(pairs: list[tuple[str, str]]) -> httpx.Headers:
    """Response headers as `http.client` parsed them, for the checks.

    `http.client` decodes header lines as Latin-1, as HTTP says (RFC 9110, 5.5), while
    httpx.Headers would encode str values as ASCII and fail on a PBX's
    ``Content-Disposition: attachment; filename="Müller-1001.wav"``. Handing over the
    original bytes lets httpx decode them: ASCII, or UTF-8 when they are valid UTF-8, else
    Latin-1; never an exception.
    """
    return httpx.Headers([(_wire_bytes(name), _wire_bytes(value)) for name, value in pairs])


def _wire_bytes(text: object) -> bytes:
    text = str(text)
    try:
        return text.encode("latin-1")  # exactly the bytes http.client read
    except UnicodeEncodeError:  # pragma: no cover - http.client decodes as Latin-1
        return text.encode("utf-8", "replace")


class _Aborted(Exception):
    """The awaiting task was cancelled; the worker stops."""


class SocketBody:
    """A download over a blocking socket driven from worker threads (see the module doc).

    The socket is used by one worker thread at a time. On cancellation the event loop only
    sets a flag and shuts the socket down, which wakes a blocked read; whoever finishes last
    (the worker, or the loop when no worker runs) closes it, so it is closed exactly once
    and never under a worker's feet.
    """

    def __init__(
        self,
        url: httpx.URL,
        ssl_context: ssl.SSLContext | None,
        tls: TlsOptions,
        timeout: float,
        context: str,
        local_address: str | None = None,
    ) -> None:
        self._url = url
        self._local_address = local_address
        self._ssl_context = ssl_context
        self._tls = tls
        self._timeout = timeout
        self._context = context
        self._guard = threading.Lock()
        self._aborted = False
        self._busy = False
        self._sock: socket.socket | None = None
        self._response: http.client.HTTPResponse | None = None
        self.status_code = 0
        self.headers = httpx.Headers()
        self.write_buffering = 0  # pour writes whole 1 MiB reads: no copy into a buffer

    @classmethod
    async def open(
        cls,
        url: httpx.URL,
        *,
        ssl_context: ssl.SSLContext | None,
        tls: TlsOptions,
        socket_timeout: float,
        headers: dict[str, str],
        context: str,
        local_address: str | None = None,
        guard: Callable[[], str | None] | None = None,
    ) -> SocketBody:
        """Connect (from `local_address`, if given), send the GET and return once the
        response headers have arrived. `guard` (the client's) is asked once more when the
        connection is up, just before the request is written: `SessionWithdrawn` if it
        withholds the PBX by then."""
        body = cls(url, ssl_context, tls, socket_timeout, context, local_address)

        def connect_and_send() -> None:
            try:
                body._connect_and_send(headers, guard)
            except BaseException:
                body._close()
                raise

        # Nothing is on disk yet, so a cancellation need not wait for a connect() that may
        # take until the timeout: the worker closes what it opened when it sees the flag.
        await run_blocking(
            body._worker(connect_and_send), on_cancel=body._abort, wait_on_cancel=False
        )
        return body

    # ------------------------------------------------------------ worker side

    def _worker(self, work: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            with self._guard:
                if self._aborted:
                    raise _Aborted
                self._busy = True
            try:
                return work()
            finally:
                with self._guard:
                    self._busy = False
                    aborted = self._aborted
                if aborted:
                    self._close()

        return run

    def _adopt(self, sock: socket.socket) -> None:
        with self._guard:
            self._sock = sock
            aborted = self._aborted
        if aborted:
            raise _Aborted

    def _error(self, exc: BaseException, phase: Phase) -> PbxError:
        return transport_error(
            exc, context=self._context, origin=origin_of(self._url), tls=self._tls, phase=phase
        )

    def _connect_and_send(
        self, headers: dict[str, str], guard: Callable[[], str | None] | None
    ) -> None:
        url = self._url
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            source = None if self._local_address is None else (self._local_address, 0)
            raw = socket.create_connection(
                (host, port), timeout=self._timeout, source_address=source
            )
        except OSError as exc:
            raise self._error(exc, "connect") from None
        self._adopt(raw)
        sock: socket.socket | BioTlsSocket = raw
        connection: http.client.HTTPConnection
        if self._ssl_context is not None:
            try:
                sock = BioTlsSocket(raw, self._ssl_context, server_hostname=host)
                sock.do_handshake()
            except OSError as exc:  # ssl.SSLError included
                raise self._error(exc, "handshake") from None
            connection = http.client.HTTPSConnection(
                host, port, timeout=self._timeout, context=self._ssl_context
            )
        else:
            connection = http.client.HTTPConnection(host, port, timeout=self._timeout)
        # Connected and verified above: http.client only speaks HTTP over it.
        connection.sock = sock
        try:
            connection.putrequest("GET", url.raw_path.decode("ascii"), skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            withheld = guard() if guard is not None else None
            if withheld is not None:
                raise SessionWithdrawn(f"{self._context}: not sent: {withheld}")
            connection.endheaders()
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise self._error(exc, "exchange") from None
        with self._guard:
            self._response = response
        self.status_code = response.status
        self.headers = headers_from_wire(response.getheaders())

    def _read_some(self) -> bytes:
        assert self._response is not None
        try:
            return self._response.read1(64 * 1024)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise BodyBroken(self._error(exc, "exchange"), exc) from None

    def _pour(self, temp: TempFile, notify: Callable[[], None] | None) -> None:
        """Read the body in this thread, hash it in a second and write it in a third.

        Reading (TLS decryption), hashing and writing each take about a third of the CPU
        time, and hashlib, file writes and socket reads all release the GIL, so the three
        stages overlap. They pass PIPELINE_DEPTH reusable buffers along (read, then hashed,
        then written, then free again): constant memory, and every buffer is hashed and
        written in the order it was read. A transform (encryption at rest) runs in the
        writing thread, before each write (`TempFile.write_hashed` says why).
        """
        assert self._response is not None
        response = self._response
        free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        for _ in range(PIPELINE_DEPTH):
            free.put(memoryview(bytearray(READ_CHUNK)))
        filled: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        hashed: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        failed: list[BaseException] = []
        stopping = threading.Event()

        def hash_loop() -> None:
            try:
                while (item := filled.get()) is not None:
                    if not stopping.is_set():
                        buffer, count = item
                        temp.hash(buffer[:count])
                    hashed.put(item)
            except BaseException as exc:  # re-raised by the reading thread
                failed.append(exc)
                stopping.set()
                free.put(None)  # wakes the reader
            finally:
                hashed.put(None)

        def write_loop() -> None:
            try:
                while (item := hashed.get()) is not None:
                    buffer, count = item
                    if not stopping.is_set():
                        temp.write_hashed(buffer[:count])
                        if notify is not None:
                            notify()
                    free.put(buffer)
            except BaseException as exc:  # re-raised by the reading thread
                failed.append(exc)
                stopping.set()
                free.put(None)  # wakes the reader
                while hashed.get() is not None:  # let the hashing thread finish
                    pass

        stages = [
            threading.Thread(target=hash_loop, name="callvault-hash", daemon=True),
            threading.Thread(target=write_loop, name="callvault-write", daemon=True),
        ]
        for stage in stages:
            stage.start()
        try:
            while (buffer := free.get()) is not None and not failed:
                try:
                    count = response.readinto(buffer)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    if self._aborted:
                        raise _Aborted from None
                    raise BodyBroken(self._error(exc, "exchange"), exc) from None
                if self._aborted:
                    raise _Aborted
                if not count:
                    break
                filled.put((buffer, count))
        except BaseException:
            stopping.set()  # the file will be discarded: do not hash or write the rest
            raise
        finally:
            filled.put(None)
            for stage in stages:
                stage.join()
        if failed:
            raise failed[0]

    def _close(self) -> None:
        with self._guard:
            sock, self._sock = self._sock, None
            response, self._response = self._response, None
        if response is not None:
            response.close()
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------- loop side

    def _abort(self) -> None:
        with self._guard:
            self._aborted = True
            busy, sock = self._busy, self._sock
        if not busy:
            self._close()
        elif sock is not None:
            # The TCP socket under any TLS: the worker's blocked read returns at once.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def read(self) -> bytes:
        return await run_blocking(
            self._worker(self._read_some), on_cancel=self._abort, wait_on_cancel=True
        )

    async def pour(self, temp: TempFile, report: Callable[[], None] | None) -> None:
        notify: Callable[[], None] | None = None
        if report is not None:
            loop = asyncio.get_running_loop()
            pending = threading.Event()

            def on_loop() -> None:
                pending.clear()
                report()

            def notify() -> None:
                # At most one report waits on the loop at a time; it reads the latest size.
                if not pending.is_set():
                    pending.set()
                    loop.call_soon_threadsafe(on_loop)

        await run_blocking(
            self._worker(lambda: self._pour(temp, notify)),
            on_cancel=self._abort,
            wait_on_cancel=True,
        )

    async def aclose(self) -> None:
        self._abort()  # no worker runs now: this closes the socket


# ------------------------------------------------------------- the checks


def content_length(headers: httpx.Headers) -> int | None:
    """The announced body size, or None when absent or not a number."""
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        return None
    return length if length >= 0 else None


def looks_like_html(headers: httpx.Headers, head: bytes) -> bool:
    """Whether a body is an HTML page (by its Content-Type or its first byte)."""
    content_type = headers.get("content-type", "").lower()
    return "html" in content_type or head[:1] == b"<"


def wants_riff(filename: str, head: bytes) -> bool:
    """Whether a body must be RIFF/WAVE: for .wav names, and whenever it claims to be RIFF."""
    return filename.lower().endswith(".wav") or head.startswith(b"RIFF")


def is_mp3(head: bytes) -> bool:
    """Whether a body starts like an MP3 file: an ID3v2 tag or an MPEG audio frame sync
    (11 set bits, a layer that is not "reserved")."""
    if head.startswith(b"ID3"):
        return True
    return len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06 != 0


def audio_format_of(name: str) -> AudioFormat | None:
    """The format a file name promises (by its extension), or None for any other name."""
    lowered = name.lower()
    if lowered.endswith(".wav"):
        return "wav"
    if lowered.endswith(".mp3"):
        return "mp3"
    return None


async def receive_recording(
    response: ResponseBody,
    name: str,
    target: Path,
    context: str,
    progress: DownloadProgress | None,
    transform: Callable[[], StreamTransform] | None = None,
    hash_stored: bool = True,
    *,
    api_answer: ApiAnswer,
    expect: AudioFormat | None = None,
) -> DownloadResult:
    """The checks of a download, whichever pump and whichever client reads it.

    A JSON body is handed to `api_answer` (which raises the API error it says); an HTML
    page, an HTTP error or an empty body is a `PbxTransportError`; a body that is not what
    `expect` says (by default: RIFF/WAVE for a .wav target name, anything else otherwise)
    is an `InvalidRecording`; fewer bytes than Content-Length (or than the RIFF header
    announces) is a `PbxTransportError`. The body streams into a `TempFile` beside
    `target` (through `transform`, if given), which is fsynced and renamed into place only
    when every check passed; nothing is left behind otherwise.
    """
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise PbxProtocolError(f"{context}: the PBX sent the recording {encoding}-encoded")
    expected = content_length(response.headers)
    head = b""
    ended = False
    try:
        while len(head) < 12:
            chunk = await response.read()
            if not chunk:
                ended = True
                break
            head += chunk
    except BodyBroken as exc:
        if not head:
            raise exc.error from None
        ended = True
    stripped = head.lstrip()
    if stripped.startswith(b"{"):
        rest = bytearray(head)
        if not ended:
            with contextlib.suppress(BodyBroken):
                while len(rest) <= MAX_JSON_ERROR_BYTES and (chunk := await response.read()):
                    rest += chunk
        api_answer(response.status_code, response.headers, bytes(rest), context)
        raise PbxProtocolError(f"{context}: the PBX answered success instead of the file")
    html = looks_like_html(response.headers, stripped)
    if response.status_code >= 400 or html:
        kind = "an HTML page" if html else "an error"
        raise PbxTransportError(
            f"{context}: the PBX answered HTTP {response.status_code} with {kind} "
            "instead of the recording"
        )
    if not head:
        # Neither audio nor a JSON error: a transport failure.
        raise PbxTransportError(f"{context}: the PBX sent an empty body instead of the file")
    is_riff = head.startswith(b"RIFF") and head[8:12] == b"WAVE"
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not is_riff and content_type.startswith("text/"):
        # The body decides (headers are undocumented), but text that is not a WAV is an
        # error page, for a .yswav or .mp3 name too.
        raise PbxTransportError(
            f"{context}: the PBX answered HTTP {response.status_code} with text "
            f"({content_type}) instead of the recording"
        )
    if expect == "mp3":
        if not is_mp3(head):
            if len(head) < 4 and ended:
                raise PbxTransportError(f"{context}: the download ended after {len(head)} bytes")
            raise InvalidRecording(
                f"{context}: the PBX sent something that is not an MP3 file "
                f"(starts with {head[:4]!r})"
            )
    elif not is_riff and (expect == "wav" or wants_riff(target.name, head)):
        if len(head) < 12 and ended:
            raise PbxTransportError(f"{context}: the download ended after {len(head)} bytes")
        raise InvalidRecording(
            f"{context}: the PBX sent something that is not a WAV file (starts with {head[:4]!r})"
        )

    temp = TempFile(
        target.parent,
        buffering=response.write_buffering,
        transform=transform() if transform is not None else None,
        hash_written=hash_stored,
    )
    report: Callable[[], None] | None = None
    if progress is not None:

        def report() -> None:
            progress(temp.size, expected)

    try:
        temp.write(head)
        if report is not None:
            report()
        if not ended:
            try:
                await response.pour(temp, report)
            except BodyBroken as exc:
                raise PbxTransportError(
                    f"{context}: the connection broke off after {temp.size} bytes"
                    + (f" of {expected}" if expected is not None else "")
                    + f" ({exc.cause})"
                ) from None
        if expected is not None and temp.size != expected:
            raise PbxTransportError(
                f"{context}: received {temp.size} bytes but the PBX announced {expected}"
            )
        if is_riff:
            riff_size = int.from_bytes(head[4:8], "little")
            if 0 < riff_size < 0xFFFFFFF0 and temp.size < riff_size + 8:
                raise PbxTransportError(
                    f"{context}: the download ended after {temp.size} of {riff_size + 8} bytes"
                )
        if temp.size < MIN_WAV_BYTES:
            # Shorter than a WAV header: whatever the name says, not a recording.
            kind = "a WAV file" if is_riff else "a recording"
            raise InvalidRecording(f"{context}: {temp.size} bytes is not {kind}")
        if not content_type or content_type == "application/octet-stream":
            if is_riff:
                content_type = "audio/x-wav"
            elif expect == "mp3":
                content_type = "audio/mpeg"
            else:
                content_type = "application/octet-stream"
        # fsync can take a while for a large file: not on the event loop. A cancellation
        # arriving meanwhile waits for it (the file is complete either way).
        await run_blocking(lambda: temp.commit(target), on_cancel=lambda: None, wait_on_cancel=True)
    except BaseException:
        temp.discard()
        raise
    return DownloadResult(
        name=name,
        path=target,
        size=temp.size,
        sha256=temp.sha256,
        content_type=content_type,
        stored_sha256=temp.written_sha256,
    )
