"""The HTTP and WebSocket face of the simulated P-Series PBX (Starlette, served by uvicorn).

API answers are HTTP 200 with a JSON envelope and an integer ``errcode``, errors included
(reference 1.3); only the injected faults answer HTML. Every response says
``Connection: close`` (reference 1.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
from anyio import AsyncFile
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from callvault.simulator._pseries_events import EventHub, WsSession, event_body
from callvault.simulator._pseries_state import (
    Cdr,
    PApiError,
    PSeriesState,
    Recording,
    invalid_param,
    strftime_pattern,
)

API_VERSIONS = ("v1.0", "v2.0")
BASE_HEADERS = {"Connection": "close"}
CHUNK_SIZE = 1 << 20
MAX_PAGE_SIZE = 10_000  # reference 4.1 (CDR); assumed for recordings too
CDR_PAGE_SIZE = 10_000  # reference 4.1: the default
SUBSCRIBE_PATH = "/openapi/v1.0/subscribe"
_ALL_METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"]
_RECORDING_SORTS = ("id", "time")
_CDR_SORTS = (
    "id",
    "uid",
    "time",
    "duration",
    "ring_duration",
    "talk_duration",
    "disposition",
    "src_trunk",
    "dst_trunk",
    "call_type",
    "did_number",
    "dod_number",
    "src_addr",
)

Handler = Callable[[Request], Awaitable[Response]]


def json_response(payload: Mapping[str, Any]) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(body, headers={**BASE_HEADERS, "Content-Type": "application/json"})


def html_page(status: int, title: str, text: str) -> Response:
    page = (
        f"<html><head><title>{status} {title}</title></head>\n"
        f"<body><h1>{status} {title}</h1>\n<p>{text}</p>\n</body></html>\n"
    )
    return Response(
        page.encode(),
        status_code=status,
        headers={**BASE_HEADERS, "Content-Type": "text/html; charset=utf-8"},
    )


def not_found_page(path: str) -> Response:
    # Only the path: the query string holds the access token.
    return html_page(404, "Not Found", f"The requested URL {html.escape(path)} was not found.")


def client_ip(connection: HTTPConnection) -> str:
    return connection.client.host if connection.client is not None else ""


def party(name: str, number: str) -> str:
    """``Name<number>`` as the lists show a party, or the bare number without a name."""
    return f"{name}<{number}>" if name else number


class FileStream(Response):
    """Streams a recording from disk in chunks; optionally drops the connection mid-body.

    `on_close` runs once the body was sent, dropped or abandoned (the mp3 download slot).
    """

    def __init__(
        self,
        file: AsyncFile[bytes],
        *,
        name: str,
        length: int,
        media_type: str,
        drop_after: int | None,
        on_close: Callable[[], None],
    ) -> None:
        # Header values must be Latin-1: other letters become "?", quotes and breaks go.
        safe = "".join(c for c in name if c not in '"\r\n')
        safe = safe.encode("latin-1", "replace").decode("latin-1")
        headers = {
            **BASE_HEADERS,
            "Content-Type": media_type,
            "Content-Length": str(length),
            "Content-Disposition": f'attachment; filename="{safe}"',
        }
        super().__init__(None, headers=headers)
        self._file = file
        self._length = length
        self._drop_after = drop_after
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            remaining, sent = self._length, 0
            while remaining > 0:
                chunk = await self._file.read(min(CHUNK_SIZE, remaining))
                if not chunk:
                    break
                if self._drop_after is not None and sent + len(chunk) >= self._drop_after:
                    part = chunk[: self._drop_after - sent]
                    if part:
                        await send({"type": "http.response.body", "body": part, "more_body": True})
                    return  # an unfinished body: the server closes the connection
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
                remaining -= len(chunk)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._on_close()
            await self._file.aclose()


def _int_param(
    query: Mapping[str, str], name: str, default: int, *, low: int = 1, high: int | None = None
) -> int:
    raw = query.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise invalid_param(name, raw) from None
    if value < low or (high is not None and value > high):
        raise invalid_param(name, raw)
    return value


def _choice(query: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = (query.get(name) or "").strip()
    if not raw:
        return default
    if raw not in allowed:
        raise invalid_param(name, raw)
    return raw


@dataclass
class Page:
    number: int
    size: int
    sort_by: str
    descending: bool


def _page(query: Mapping[str, str], sorts: tuple[str, ...], default_size: int) -> Page:
    return Page(
        number=_int_param(query, "page", 1),
        size=_int_param(query, "page_size", default_size, high=MAX_PAGE_SIZE),
        sort_by=_choice(query, "sort_by", sorts, "id"),
        descending=_choice(query, "order_by", ("asc", "desc"), "asc") == "desc",
    )


def _paged(rows: list[Any], page: Page, key: Callable[[Any], Any]) -> list[Any]:
    rows = sorted(rows, key=key, reverse=page.descending)
    first = (page.number - 1) * page.size
    return rows[first : first + page.size]


class PSeriesHttp:
    """The request handlers, bound to one PBX state and its event hub."""

    def __init__(self, state: PSeriesState, hub: Callable[[], EventHub | None]) -> None:
        self.state = state
        self._hub = hub
        self.endpoints: dict[str, tuple[str, Handler, str | None]] = {
            # endpoint: (method, handler, permission; None: no access token needed)
            "get_token": ("POST", self.get_token, None),
            "refresh_token": ("POST", self.refresh_token, None),
            "del_token": ("GET", self.del_token, ""),
            "recording/list": ("GET", self.recording_list, "recording"),
            "recording/search": ("GET", self.recording_search, "recording"),
            "recording/download": ("GET", self.recording_download, "recording"),
            "cdr/list": ("GET", self.cdr_list, "cdr"),
            "cdr/search": ("GET", self.cdr_search, "cdr"),
        }

    # -- dispatch -------------------------------------------------------------------------------

    def _injected_5xx(self) -> bool:
        faults = self.state.faults
        return self.state.take("error_5xx_next") or self.state.chance(faults.error_5xx_rate)

    async def api(self, request: Request) -> Response:
        path = request.url.path
        if self.state.faults.slow_seconds > 0:
            await asyncio.sleep(self.state.faults.slow_seconds)
        if self._injected_5xx():
            self.state.log(path, "HTTP 502")
            return html_page(502, "Bad Gateway", "The server failed to answer.")
        try:
            response = await self._api(request)
        except PApiError as failure:
            self.state.log(path, str(failure.errcode))
            return json_response(failure.payload())
        self.state.log(path, "0")
        return response

    async def _api(self, request: Request) -> Response:
        self.state.check_ip(client_ip(request))
        user_agent = request.headers.get("user-agent", "").strip()
        if self.state.config.require_user_agent and not user_agent:
            raise PApiError(40002)
        version = request.path_params["version"]
        if version not in API_VERSIONS:
            raise PApiError(10003)
        entry = self.endpoints.get(request.path_params["endpoint"]) if version == "v1.0" else None
        if entry is None or request.method != entry[0]:
            raise PApiError(10001)
        _method, handler, permission = entry
        if permission is not None:
            # Only the query parameter counts: an Authorization header is ignored (1.2).
            self.state.authenticate(request.query_params.get("access_token"))
            if permission and permission not in self.state.config.permissions:
                raise PApiError(10005)
        return await handler(request)

    async def elsewhere(self, request: Request) -> Response:
        return not_found_page(request.url.path)

    # -- tokens ---------------------------------------------------------------------------------

    async def _json(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise PApiError(40001) from None
        if not isinstance(data, dict):
            raise PApiError(40001)
        return data

    async def get_token(self, request: Request) -> Response:
        data = await self._json(request)
        username, password = data.get("username"), data.get("password")
        if not isinstance(username, str) or not username:
            raise invalid_param("username", "")
        if not isinstance(password, str) or not password:
            raise invalid_param("password", "")
        return json_response(self.state.get_token(client_ip(request), username, password))

    async def refresh_token(self, request: Request) -> Response:
        data = await self._json(request)
        token = data.get("refresh_token")
        if not isinstance(token, str) or not token:
            raise invalid_param("refresh_token", "")
        return json_response(self.state.refresh_token(token))

    async def del_token(self, request: Request) -> Response:
        token = request.query_params.get("access_token", "")
        self.state.del_token(token)
        hub = self._hub()
        if hub is not None and self.state.config.close_ws_on_token_expiry:
            hub.close_sessions(lambda s: s.token == token)
        return json_response({"errcode": 0, "errmsg": "SUCCESS"})

    # -- recordings -----------------------------------------------------------------------------

    def _recording_row(self, rec: Recording) -> dict[str, Any]:
        return {
            "id": rec.id,
            "time": self.state.display_time(rec.start),
            "uid": rec.uid,
            "call_from": party(rec.from_name, rec.call_from),
            "call_to": party(rec.to_name, rec.call_to),
            "duration": rec.duration,
            "size": rec.size,
            "call_type": rec.call_type,
            "file": rec.file,
            "call_from_number": rec.call_from,
            "call_from_name": rec.from_name,
            "call_to_number": rec.call_to,
            "call_to_name": rec.to_name,
        }

    def _recording_page(self, rows: list[Recording], page: Page) -> Response:
        key: Callable[[Recording], Any] = (
            (lambda r: (r.start, r.id)) if page.sort_by == "time" else (lambda r: r.id)
        )
        data = [self._recording_row(r) for r in _paged(rows, page, key)]
        return json_response(
            {"errcode": 0, "errmsg": "SUCCESS", "total_number": len(rows), "data": data}
        )

    async def recording_list(self, request: Request) -> Response:
        default = self.state.config.recording_page_size
        page = _page(request.query_params, _RECORDING_SORTS, default)
        return self._recording_page(self.state.visible_recordings(), page)

    async def recording_search(self, request: Request) -> Response:
        query = request.query_params
        page = _page(query, _RECORDING_SORTS, self.state.config.recording_page_size)
        low = _unix(query, "start_time")
        high = _unix(query, "end_time")
        caller = (query.get("caller") or "").strip()
        callee = (query.get("callee") or "").strip()
        ids: set[int] | None = None
        raw_ids = (query.get("ids") or "").strip()
        if raw_ids:
            try:
                ids = {int(part) for part in raw_ids.split(",") if part.strip()}
            except ValueError:
                raise invalid_param("ids", raw_ids) from None
        rows = [
            r
            for r in self.state.visible_recordings()
            if (low is None or int(r.start) >= low)
            and (high is None or int(r.start) <= high)
            and (not caller or caller in (r.call_from, r.from_name))
            and (not callee or callee in (r.call_to, r.to_name))
            and (ids is None or r.id in ids)
        ]
        return self._recording_page(rows, page)

    async def recording_download(self, request: Request) -> Response:
        query = request.query_params
        raw_id = (query.get("id") or "").strip()
        file = (query.get("file") or "").strip()
        if not raw_id and not file:
            raise PApiError(
                40002,
                invalid_param_list=[{"field": "id", "value": ""}, {"field": "file", "value": ""}],
            )
        rec_id: int | None = None
        if raw_id:
            try:
                rec_id = int(raw_id)
            except ValueError:
                raise invalid_param("id", raw_id) from None
        state = self.state
        if state.config.download_format == "mp3":
            with state.lock:
                if state.mp3_busy:
                    raise PApiError(70082)
        recording = state.find_recording(rec_id=rec_id, file=file if rec_id is None else None)
        if state.config.async_downloads:
            hub = self._hub()
            if hub is not None:
                asyncio.get_running_loop().call_later(
                    state.config.async_delay_s, self._complete_async, hub, recording
                )
            return json_response({"errcode": 2, "errmsg": "PROCESSING", "file": recording.file})
        url = state.issue_url(recording, attachment=False)
        if state.take("delete_after_url_next"):
            state.delete_recording(recording.file)
        return json_response(
            {
                "errcode": 0,
                "errmsg": "SUCCESS",
                "file": recording.file,
                "download_resource_url": url,
            }
        )

    def _complete_async(self, hub: EventHub, recording: Recording) -> None:
        """30033 Recording Download Completed, `msg` an object (reference 3.5)."""
        msg: dict[str, Any]
        if recording.deleted:
            msg = {
                "key": "recording_download",
                "result": "failure",
                "file": recording.file,
                "download_resource_url": "",
                "error": "DATA NOT FOUND",
            }
        else:
            msg = {
                "key": "recording_download",
                "result": "success",
                "file": recording.file,
                "download_resource_url": self.state.issue_url(recording, attachment=True),
                "error": "",
            }
        hub.emit(30033, event_body(30033, self.state.config.serial, msg, as_object=True))

    # -- file GET (reference 3.4) ---------------------------------------------------------------

    def _url_gone(self, path: str) -> Response:
        if self.state.config.expired_url_answer == "json10004":
            return json_response(PApiError(10004).payload())
        return not_found_page(path)

    async def file_get(self, request: Request) -> Response:
        path = request.url.path
        state = self.state
        if state.faults.slow_seconds > 0:
            await asyncio.sleep(state.faults.slow_seconds)
        if state.take("html_error_next"):
            state.log(path, "HTTP 404")
            return not_found_page(path)
        try:
            state.check_ip(client_ip(request))
            state.authenticate(request.query_params.get("access_token"))
            if "recording" not in state.config.permissions:
                raise PApiError(10005)
        except PApiError as failure:
            state.log(path, str(failure.errcode))
            return json_response(failure.payload())
        mp3 = state.config.download_format == "mp3"
        with state.lock:
            if mp3 and state.mp3_busy:
                state.request_log.append((path, "70082"))
                return json_response(PApiError(70082).payload())
            recording = state.redeem_url(path)
            if recording is None:
                state.request_log.append((path, "gone"))
                return self._url_gone(path)
            if mp3:
                state.mp3_busy += 1
        released = False

        def release() -> None:
            nonlocal released
            if mp3 and not released:
                released = True
                with state.lock:
                    state.mp3_busy = max(state.mp3_busy - 1, 0)

        try:
            file = await anyio.open_file(recording.path, "rb")
        except FileNotFoundError:
            release()
            state.log(path, "gone")
            return self._url_gone(path)
        drop = state.take("drop_next_downloads") or state.chance(state.faults.drop_rate)
        state.log(path, "dropped" if drop else "0")
        return FileStream(
            file,
            name=recording.file,
            length=recording.size,
            media_type="audio/mpeg" if recording.file.endswith(".mp3") else "audio/wav",
            drop_after=max(recording.size // 2, 1) if drop else None,
            on_close=release,
        )

    # -- CDR (reference 4) ----------------------------------------------------------------------

    def _cdr_row(self, cdr: Cdr) -> dict[str, Any]:
        return {
            "id": cdr.id,
            "time": self.state.display_time(cdr.start),
            "call_from": party(cdr.from_name, cdr.call_from),
            "call_to": party(cdr.to_name, cdr.call_to),
            "timestamp": int(cdr.start),
            "uid": cdr.uid,
            "src_addr": "",
            "src_trunk": cdr.src_trunk,
            "dst_trunk": cdr.dst_trunk,
            "duration": cdr.duration,
            "ring_duration": cdr.ring_duration,
            "talk_duration": cdr.talk_duration,
            "disposition": cdr.disposition,
            "call_type": cdr.call_type,
            "did_number": cdr.did_number,
            "dod_number": "",
            "record_file": cdr.record_file,
        }

    def _cdr_page(self, rows: list[Cdr], page: Page) -> Response:
        def key(cdr: Cdr) -> Any:
            if page.sort_by == "time":
                return (cdr.start, cdr.id)
            if page.sort_by in ("src_addr", "dod_number"):
                return cdr.id
            return (getattr(cdr, page.sort_by), cdr.id)

        data = [self._cdr_row(c) for c in _paged(rows, page, key)]
        return json_response(
            {"errcode": 0, "errmsg": "SUCCESS", "total_number": len(rows), "data": data}
        )

    def _cdrs(self) -> list[Cdr]:
        with self.state.lock:
            return list(self.state.cdrs)

    async def cdr_list(self, request: Request) -> Response:
        return self._cdr_page(self._cdrs(), _page(request.query_params, _CDR_SORTS, CDR_PAGE_SIZE))

    def _cdr_time(self, value: str | None) -> tuple[bool, float | None]:
        """(understood, epoch) of a CDR time filter: the display format, or Unix seconds on
        newer firmware. A value in another format is not understood: no row matches."""
        if value is None or not value.strip():
            return True, None
        text = value.strip()
        if self.state.config.unix_time_filters and text.isdigit():
            return True, float(text)
        try:
            naive = datetime.strptime(text, strftime_pattern(self.state.config.display_format))
        except ValueError:
            return False, None
        return True, naive.replace(tzinfo=self.state.tz).timestamp()

    async def cdr_search(self, request: Request) -> Response:
        query = request.query_params
        page = _page(query, _CDR_SORTS, CDR_PAGE_SIZE)
        ok_low, low = self._cdr_time(query.get("start_time"))
        ok_high, high = self._cdr_time(query.get("end_time"))
        if not (ok_low and ok_high):
            return self._cdr_page([], page)
        fuzzy = (query.get("enable_fuzzy_search") or "").strip() == "1"
        call_from = (query.get("call_from") or "").strip()
        call_to = (query.get("call_to") or "").strip()
        status = (query.get("status") or "").strip()

        def matches(wanted: str, number: str, name: str) -> bool:
            if not wanted:
                return True
            if fuzzy:
                return wanted in number or (bool(name) and wanted in name)
            return wanted in (number, name)

        rows = [
            c
            for c in self._cdrs()
            if (low is None or int(c.start) >= low)
            and (high is None or int(c.start) <= high)
            and matches(call_from, c.call_from, c.from_name)
            and matches(call_to, c.call_to, c.to_name)
            and (not status or c.disposition == status)
        ]
        return self._cdr_page(rows, page)

    # -- WebSocket (reference 5.2) --------------------------------------------------------------

    async def subscribe(self, websocket: WebSocket) -> None:
        state = self.state
        token = websocket.query_params.get("access_token", "")
        try:
            state.check_ip(client_ip(websocket))
            state.authenticate(token)
        except PApiError as failure:
            state.log(SUBSCRIBE_PATH, str(failure.errcode))
            await websocket.close(code=1008)  # before accept: the handshake answers 403
            return
        hub = self._hub()
        if hub is None:
            await websocket.close(code=1011)
            return
        await websocket.accept()
        state.log(SUBSCRIBE_PATH, "101")
        session = WsSession(token=token)
        hub.register(session)
        closed = asyncio.Event()
        sender = asyncio.create_task(self._ws_sender(websocket, session, closed))
        try:
            await self._ws_receiver(websocket, session, closed)
        finally:
            hub.unregister(session)
            session.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender, 2)
            sender.cancel()

    async def _ws_sender(
        self, websocket: WebSocket, session: WsSession, closed: asyncio.Event
    ) -> None:
        """Sends the session's queue in order; None closes the socket."""
        try:
            while True:
                text = await session.queue.get()
                if text is None:
                    with contextlib.suppress(Exception):
                        await websocket.close(code=1000)
                    return
                await websocket.send_text(text)
        except Exception:  # the peer went away: the receiver notices too
            return
        finally:
            closed.set()

    async def _ws_receiver(
        self, websocket: WebSocket, session: WsSession, closed: asyncio.Event
    ) -> None:
        cfg = self.state.config
        loop = asyncio.get_running_loop()
        last = loop.time()
        closed_wait = asyncio.ensure_future(closed.wait())
        receive: asyncio.Future[Any] | None = None
        try:
            while True:
                if cfg.close_ws_on_token_expiry and not self.state.token_alive(session.token):
                    session.close()
                    return
                remaining = cfg.ws_idle_timeout_s - (loop.time() - last)
                if remaining <= 0:
                    session.close()  # client silence: the PBX closes the socket
                    return
                if receive is None:
                    receive = asyncio.ensure_future(websocket.receive())
                done, _pending = await asyncio.wait(
                    {receive, closed_wait},
                    timeout=min(remaining, 0.25),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if closed_wait in done:
                    return
                if receive not in done:
                    continue
                message = receive.result()
                receive = None
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None and message.get("bytes") is not None:
                    text = message["bytes"].decode("utf-8", "replace")
                last = loop.time()
                self._ws_message(session, (text or "").strip())
        except WebSocketDisconnect:
            return
        finally:
            closed_wait.cancel()
            if receive is not None:
                receive.cancel()

    def _ws_message(self, session: WsSession, text: str) -> None:
        if text == "heartbeat":
            session.queue.put_nowait("heartbeat response")
            return
        try:
            data = json.loads(text)
            topics = data["topic_list"]
            if not isinstance(topics, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in topics
            ):
                raise ValueError(topics)
        except (ValueError, KeyError, TypeError):
            payload = invalid_param("topic_list", text[:100]).payload()
            session.queue.put_nowait(json.dumps(payload, separators=(",", ":")))
            return
        # A new topic_list replaces the old one (whether it adds instead is [?], 5.2).
        session.topics = frozenset(topics)
        session.queue.put_nowait('{"errcode":0,"errmsg":"SUCCESS"}')
        if self.state.take("ws_drop_next"):
            session.close()


def build_app(http: PSeriesHttp) -> Starlette:
    """The PBX's web server: the API, the file downloads, the event socket; 404 elsewhere."""
    return Starlette(
        routes=[
            WebSocketRoute(SUBSCRIBE_PATH, http.subscribe),
            Route("/openapi/{version}/{endpoint:path}", http.api, methods=_ALL_METHODS),
            Route("/api/download/{name}", http.file_get, methods=["GET"]),
            Route("/api/downloadattachment/{name}", http.file_get, methods=["GET"]),
            Route("/{path:path}", http.elsewhere, methods=_ALL_METHODS),
        ]
    )


def _unix(query: Mapping[str, str], name: str) -> int | None:
    """A Unix-seconds filter of recording/search (a string of digits); 40002 otherwise."""
    raw = (query.get(name) or "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise invalid_param(name, raw)
    return int(raw)
