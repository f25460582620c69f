"""A TCP load balancer for tests: connections to its address are passed, round robin, to
the backends, from its own address (as an L4 balancer that does not keep the client's
address does). It counts what each backend was given."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Sequence
from types import TracebackType


class Balancer:
    def __init__(self, host: str, backends: Sequence[tuple[str, int]]) -> None:
        self.host = host
        self.backends = list(backends)
        self.given = [0] * len(self.backends)  # connections passed to each backend
        self._listener = socket.create_server((host, 0))
        self.port = int(self._listener.getsockname()[1])
        self._next = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="balancer", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> Balancer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed.set()
        self._listener.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            for _ in range(len(self.backends)):  # the next backend that answers
                chosen = self._next % len(self.backends)
                self._next += 1
                try:
                    upstream = socket.create_connection(
                        self.backends[chosen], timeout=2, source_address=(self.host, 0)
                    )
                except OSError:
                    continue
                upstream.settimeout(None)
                self.given[chosen] += 1
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=_pipe, args=(a, b), daemon=True).start()
                break
            else:
                client.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (sink, source):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
