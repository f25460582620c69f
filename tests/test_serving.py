"""callvault.serving: how every callvault server listens, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from callvault import serving

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _hello(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    peer = (scope.get("client") or ("?", 0))[0].encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello " + peer})


@pytest.fixture
def running() -> Iterator[tuple[serving.Server, int]]:
    """A server with a half-second header timeout on a free port, in its own thread."""
    sock = serving.bind_socket("127.0.0.1", 0)
    server = serving.server_for(_hello, header_timeout_s=0.5, keep_alive_s=30)
    loop = asyncio.new_event_loop()
    done = threading.Event()

    def main() -> None:
        async def serve() -> None:
            await serving.ServerThread(server, sock, name="test-server").start()
            done.set()

        loop.run_until_complete(serve())

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        yield server, int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)
        loop.close()
        sock.close()


def _closed_by_server(conn: socket.socket) -> bool:
    """True once the server has closed `conn` (reads to EOF; 10 s without it: False)."""
    conn.settimeout(10)
    try:
        while conn.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_a_connection_that_sends_nothing_is_closed(running: tuple[serving.Server, int]) -> None:
    _server, port = running
    with socket.create_connection(("127.0.0.1", port)) as conn:
        assert _closed_by_server(conn)


def test_half_sent_headers_are_not_waited_for(running: tuple[serving.Server, int]) -> None:
    _server, port = running
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert _closed_by_server(conn)


def test_a_complete_request_is_answered_and_the_next_one_gets_the_same_limit(
    running: tuple[serving.Server, int],
) -> None:
    _server, port = running
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.settimeout(10)
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"hello" not in answer:
            answer += conn.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        assert b"server:" not in answer.lower()  # no Server header
        # Keep-alive is 30 s here: it is the header timeout that closes the idle connection.
        assert _closed_by_server(conn)


@pytest.mark.parametrize("how", ["serve_until", "ServerThread"])
def test_responses_are_sent_without_waiting_for_acks(how: str) -> None:
    """TCP_NODELAY on every accepted connection, whichever way the server runs (`web` serves
    on the command's asyncio loop, the events receiver on a uvloop thread). asyncio sets it
    only on sockets made with IPPROTO_TCP, which ours are not: with Nagle's algorithm on, a
    response written in pieces waited for the client's delayed ACK, about 40 ms per request
    of a kept-alive connection (measured on the API: 48 ms for /api/me, 3 ms without)."""
    sock = serving.bind_socket("127.0.0.1", 0)
    server = serving.server_for(_hello, keep_alive_s=30)
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        if how == "serve_until":
            await serving.serve_until(server, sock, stop)
        else:
            await serving.ServerThread(server, sock, name="test-server").start()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        with socket.create_connection(sock.getsockname()) as conn:
            conn.settimeout(10)
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while b"hello" not in answer:
                answer += conn.recv(4096)
            transports = [protocol.transport for protocol in server.server_state.connections]
            assert len(transports) == 1
            accepted = transports[0].get_extra_info("socket")
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.should_exit = True
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
        sock.close()


def test_forwarded_headers_are_believed_only_from_the_trusted_proxy() -> None:
    assert serving.proxy_options(None) == {"proxy_headers": False}
    assert serving.proxy_options("") == {"proxy_headers": False}
    assert serving.proxy_options("127.0.0.1") == {
        "proxy_headers": True,
        "forwarded_allow_ips": "127.0.0.1",
    }


def test_a_busy_port_is_one_line_naming_what_wanted_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(serving.ListenError) as caught:
            serving.listen("events", "127.0.0.1", port, hint="is another callvault serve running?")
    assert str(caught.value) == (
        f"cannot listen for events on 127.0.0.1:{port}: Address already in use "
        "(is another callvault serve running?)"
    )
    assert serving.address("::1", 8080) == "[::1]:8080"
