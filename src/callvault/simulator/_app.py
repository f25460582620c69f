"""The HTTP face of the simulated PBX: thin Starlette handlers over :class:`PbxState`.

Every API answer is HTTP 200 with JSON, errors included; every response carries Boa's
``Server`` header, ``Connection: close`` and the CORS headers of firmware 30.11.0.7+.
"""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from anyio import AsyncFile
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from callvault.simulator._events import csv_columns, csv_row
from callvault.simulator._state import (
    DEFAULT_EVENT_PORT,
    ApiFailure,
    CdrQuery,
    PbxState,
    Recording,
    Session,
)

API_VERSIONS = ("v1.0.1", "v1.1.0", "v2.0.0")
# Path spellings taken as another version. The V1 and Cloud login pages print the endpoint
# as `/api/v1.10/login` (spec section 1), and real clients copied it, one of them logging
# in only that way: the PBX is assumed to accept it as v1.1.0 (that it does is [?]).
API_VERSION_ALIASES = {"v1.10": "v1.1.0"}
V1_0_1 = "v1.0.1"  # the 2017 API: no urltag, no report `version`, no CDR export
V2 = "v2.0.0"
SERVER = "Boa/0.94.14rc21"
BASE_HEADERS: dict[str, str] = {
    "Server": SERVER,
    "Connection": "close",
    "Access-control-allow-origin": "*",
    "Access-control-allow-methods": "GET, POST, OPTIONS, PUT, DELETE",
}
CHUNK_SIZE = 1 << 20
_ALL_METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"]
_5XX_TITLES = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

Outcome = tuple[Response, str]
Handler = Callable[[Request, str], Awaitable[Outcome]]


def json_response(payload: Mapping[str, str]) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(
        body, headers={**BASE_HEADERS, "Accept-Ranges": "bytes", "Content-Type": "application/json"}
    )


def failed(errno: str) -> Response:
    return json_response({"status": "Failed", "errno": errno})


def boa_html(status: int, title: str, text: str) -> Response:
    page = (
        f"<HTML><HEAD><TITLE>{status} {title}</TITLE></HEAD>\n"
        f"<BODY><H1>{status} {title}</H1>\n{text}\n</BODY></HTML>\n"
    )
    return Response(
        page.encode(), status_code=status, headers={**BASE_HEADERS, "Content-Type": "text/html"}
    )


def not_found_page(path: str) -> Response:
    # Only the path: the query string holds the token and the random.
    return boa_html(
        404, "Not Found", f"The requested URL {html.escape(path)} was not found on this server."
    )


class FileDownload(Response):
    """Streams an open file from disk in chunks; optionally drops the connection mid-body."""

    def __init__(
        self,
        file: AsyncFile[bytes],
        *,
        name: str,
        start: int,
        length: int,
        total: int,
        status_code: int,
        drop_after: int | None,
        advertise_ranges: bool,
        latin1_disposition: bool = False,
    ) -> None:
        headers = {
            **BASE_HEADERS,
            "Content-Type": "audio/x-wav",
            "Content-Length": str(length),
        }
        if advertise_ranges:
            headers["Accept-Ranges"] = "bytes"
        if status_code == 206:
            headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{total}"
        super().__init__(None, status_code=status_code, headers=headers)
        # The file name's own bytes, as a PBX would copy them (UTF-8, or Latin-1 with the
        # disposition_latin1 fault), not RFC 6266's filename*: non-ASCII names arrive as
        # raw bytes, which clients must decode without crashing.
        quoted = name.replace('"', "").replace("\r", "").replace("\n", "")
        encoded = quoted.encode("latin-1", "replace") if latin1_disposition else quoted.encode()
        self.raw_headers.append(
            (b"content-disposition", b'attachment; filename="' + encoded + b'"')
        )
        self._file = file
        self._start = start
        self._length = length
        self._drop_after = drop_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            await self._file.seek(self._start)
            remaining = self._length
            sent = 0
            while remaining > 0:
                chunk = await self._file.read(min(CHUNK_SIZE, remaining))
                if not chunk:
                    break
                if self._drop_after is not None and sent + len(chunk) >= self._drop_after:
                    part = chunk[: self._drop_after - sent]
                    if part:
                        await send({"type": "http.response.body", "body": part, "more_body": True})
                    # Returning without finishing the body makes the server close the socket.
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
                remaining -= len(chunk)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._file.aclose()


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise ApiFailure("20007")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiFailure("20000") from None
    if not isinstance(data, dict):
        raise ApiFailure("20000")
    return data


def _param(data: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    """A parameter as text (numbers accepted); 10004 when a required one is missing or blank."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        value = None
    text = None if value is None else str(value)
    if required and (text is None or not text.strip()):
        raise ApiFailure("10004")
    return text


def _port(value: str | None, *, default: int | None) -> int | None:
    if value is None or not value.strip():
        return default
    try:
        port = int(value.strip())
    except ValueError:
        raise ApiFailure("20008") from None
    if not 0 <= port <= 65535:
        raise ApiFailure("20008")
    return port


def _flag(value: str | None) -> bool | None:
    if value is None or not value.strip():
        return None
    return value.strip() == "1"


def _client_ip(request: Request) -> str:
    return request.client.host if request.client is not None else ""


@dataclass
class PbxHttp:
    """The request handlers, bound to one PBX state."""

    state: PbxState

    def _require_post(self, request: Request) -> None:
        if request.method != "POST":
            raise ApiFailure("20001")

    def _session(self, request: Request) -> Session:
        return self.state.authenticate(request.query_params.get("token"))

    async def login(self, request: Request, version: str) -> Outcome:
        self._require_post(request)
        data = await _json_body(request)
        username = _param(data, "username") or ""
        password = _param(data, "password") or ""
        v2 = version == V2
        port = _port(_param(data, "port", required=not v2), default=DEFAULT_EVENT_PORT)
        # v1.0.1 knows neither urltag nor version (spec 3.1): its `url` is always a path
        # and its reports always legacy; the PBX ignores fields it does not know.
        urltag = version != V1_0_1 and bool(_flag(_param(data, "urltag", required=False)))
        session = self.state.login(
            ip=_client_ip(request),
            username=username,
            password_md5=password,
            api_version=version,
            port=port if port is not None else DEFAULT_EVENT_PORT,
            url=_param(data, "url", required=False) or "",
            urltag=urltag,
            version=None if version == V1_0_1 else _param(data, "version", required=False),
        )
        payload = {"status": "Success", "token": session.token}
        if session.refresh_token is not None:
            payload["refreshtoken"] = session.refresh_token
        if v2:
            payload["transport"] = "TCP" if self.state.report_transport == "tcp" else "HTTP"
        return json_response(payload), "Success"

    async def token_refresh(self, request: Request, version: str) -> Outcome:
        """Cloud PBX: a new token and refresh token for the refresh token given (body
        ``{"refreshtoken": ...}``, no token in the query)."""
        self._require_post(request)
        data = await _json_body(request)
        session = self.state.refresh(_param(data, "refreshtoken") or "")
        payload = {"status": "Success", "token": session.token}
        payload["refreshtoken"] = session.refresh_token or ""
        return json_response(payload), "Success"

    async def heartbeat(self, request: Request, version: str) -> Outcome:
        self._require_post(request)
        session = self._session(request)
        data = await _json_body(request)
        ipaddr = (_param(data, "ipaddr") or "").strip()
        port = _port(_param(data, "port", required=version != V2), default=None)
        # The URL-type flag: none in v1.0.1, `urlflag` in the v1.1.0 page, `urltag` in v2
        # and at login; both spellings accepted where a flag exists (spec 3.3).
        urltag = None
        if version != V1_0_1:
            urltag = _flag(_param(data, "urltag", required=False))
            if urltag is None:
                urltag = _flag(_param(data, "urlflag", required=False))
        # Only v2 documents `version` in the heartbeat.
        report_version = _param(data, "version", required=False) if version == V2 else None
        self.state.heartbeat(
            session,
            ipaddr=ipaddr,
            port=port,
            url=_param(data, "url", required=False),
            urltag=urltag,
            version=report_version,
            api_version=version,
        )
        return json_response({"status": "Success"}), "Success"

    async def logout(self, request: Request, version: str) -> Outcome:
        self._require_post(request)
        self.state.logout(self._session(request))
        return json_response({"status": "Success"}), "Success"

    async def recording_get_random(self, request: Request, version: str) -> Outcome:
        self._require_post(request)
        session = self._session(request)
        data = await _json_body(request)
        name = _param(data, "recording") or ""
        value = self.state.recording_random(
            session,
            name=name,
            api_version=version,
            allowedip=_param(data, "allowedip", required=False),
        )
        return json_response({"status": "Success", "recording": name, "random": value}), "Success"

    async def recording_download(self, request: Request, version: str) -> Outcome:
        if request.method not in {"GET", "POST"}:
            raise ApiFailure("20001")
        session = self._session(request)
        query = request.query_params
        name = _param(query, "recording") or ""
        value = _param(query, "random") or ""
        recording = self.state.redeem_recording_random(
            session, ip=_client_ip(request), name=name, value=value, api_version=version
        )
        return await self._stream(request, recording)

    async def _stream(self, request: Request, recording: Recording) -> Outcome:
        faults = self.state.faults
        try:
            file = await anyio.open_file(recording.path, "rb")
        except FileNotFoundError:
            raise ApiFailure("20014") from None
        total = recording.size
        start, length, status = 0, total, 200
        wanted = request.headers.get("range", "")
        match = _RANGE.match(wanted.strip()) if faults.honour_range else None
        if match is not None and (match.group(1) or match.group(2)):
            first, last = match.group(1), match.group(2)
            if first:
                start = int(first)
                end = min(int(last), total - 1) if last else total - 1
            else:
                start = max(total - int(last), 0)
                end = total - 1
            if start <= end:
                length, status = end - start + 1, 206
            else:
                start = 0
        drop = self.state.take("drop_next_downloads") or self.state.chance(faults.drop_rate)
        response = FileDownload(
            file,
            name=recording.name,
            start=start,
            length=length,
            total=total,
            status_code=status,
            drop_after=max(length // 2, 1) if drop else None,
            advertise_ranges=faults.honour_range,
            latin1_disposition=faults.disposition_latin1,
        )
        return response, "dropped" if drop else "Success"

    def _cdr_query(self, data: Mapping[str, Any], version: str) -> CdrQuery:
        field = "number" if version == V2 else "extid"
        return CdrQuery(
            extensions=(_param(data, field) or "").strip(),
            starttime=(_param(data, "starttime") or "").strip(),
            endtime=(_param(data, "endtime") or "").strip(),
        )

    async def cdr_get_random(self, request: Request, version: str) -> Outcome:
        self._require_post(request)
        session = self._session(request)
        data = await _json_body(request)
        query = self._cdr_query(data, version)
        value = self.state.cdr_random(
            session, query=query, allowedip=_param(data, "allowedip", required=False)
        )
        field = "number" if version == V2 else "extid"
        return json_response(
            {
                "status": "Success",
                field: query.extensions,
                "starttime": query.starttime,
                "endtime": query.endtime,
                "random": value,
            }
        ), "Success"

    async def cdr_download(self, request: Request, version: str) -> Outcome:
        if request.method not in {"GET", "POST"}:
            raise ApiFailure("20001")
        session = self._session(request)
        query_params = request.query_params
        query = self._cdr_query(query_params, version)
        value = _param(query_params, "random") or ""
        rows = self.state.redeem_cdr_random(
            session, ip=_client_ip(request), query=query, value=value
        )
        v2 = version == V2
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=csv_columns(v2))
        writer.writeheader()
        for cdr in rows:
            writer.writerow(csv_row(cdr, v2))
        body = out.getvalue().encode()
        return Response(
            body,
            headers={
                **BASE_HEADERS,
                "Content-Type": "text/csv",
                "Content-Disposition": 'attachment; filename="cdr.csv"',
            },
        ), "Success"

    def handlers(self, version: str) -> dict[str, Handler]:
        """The endpoints of API path `version` (none for an unknown one)."""
        if version not in API_VERSIONS:
            return {}
        endpoints: dict[str, Handler] = {
            "login": self.login,
            "heartbeat": self.heartbeat,
            "logout": self.logout,
            "recording/get_random": self.recording_get_random,
            "recording/download": self.recording_download,
        }
        if version != V1_0_1:  # the CDR export came with v1.1.0 (spec section 1)
            endpoints["cdr/get_random"] = self.cdr_get_random
            endpoints["cdr/download"] = self.cdr_download
            if self.state.refresh_tokens:  # the Cloud PBX (from its v1.1.0 API on)
                endpoints["token/refresh"] = self.token_refresh
        return endpoints

    def _injected_failure(self, path: str) -> Outcome | None:
        state, faults = self.state, self.state.faults
        if state.take("error_5xx_next") or state.chance(faults.error_5xx_rate):
            with state.lock:
                status = state.rng.choice([500, 502, 503])
            title = _5XX_TITLES[status]
            return boa_html(status, title, "The server failed to answer."), f"HTTP {status}"
        if state.take("html_error_next") or state.chance(faults.html_error_rate):
            return not_found_page(path), "HTTP 404"
        return None

    async def api(self, request: Request) -> Response:
        given = request.path_params["version"]
        version = API_VERSION_ALIASES.get(given, given)
        endpoint = request.path_params["endpoint"]
        ip = _client_ip(request)
        self.state.note_path(request.url.path)
        if self.state.faults.slow_seconds > 0:
            await asyncio.sleep(self.state.faults.slow_seconds)
        # A failing web server in front of the API fails every request, preflights included.
        injected = self._injected_failure(request.url.path)
        if injected is not None:
            self.state.log(endpoint, injected[1], ip)
            return injected[0]
        # Spec 3.1: the lockout blocks the source IP, not only its logins; checked before
        # anything of the request is read.
        if self.state.is_locked_out(ip):
            self.state.log(endpoint, "20002", ip)
            return failed("20002")
        if request.method == "OPTIONS":  # CORS preflight
            return Response(b"", headers=BASE_HEADERS)
        if not endpoint.strip("/"):  # /api/v1.1.0/: no request id at all
            self.state.log(endpoint, "20009", ip)
            return failed("20009")
        handler = self.handlers(version).get(endpoint)
        if handler is None:
            self.state.log(endpoint, "10003", ip)
            return failed("10003")
        try:
            response, outcome = await handler(request, version)
        except ApiFailure as failure:
            self.state.log(endpoint, failure.errno, ip)
            return failed(failure.errno)
        except ClientDisconnect:  # gone before its body arrived (e.g. killed): nobody to answer
            self.state.log(endpoint, "disconnected", ip)
            return Response(b"", status_code=400)
        self.state.log(endpoint, outcome, ip)
        return response

    async def elsewhere(self, request: Request) -> Response:
        if self.state.faults.slow_seconds > 0:
            await asyncio.sleep(self.state.faults.slow_seconds)
        return not_found_page(request.url.path)


def build_app(state: PbxState) -> Starlette:
    """The PBX's web server: the API under /api/{version}/, Boa's 404 page elsewhere."""
    http = PbxHttp(state)
    return Starlette(
        routes=[
            Route("/api/{version}/{endpoint:path}", http.api, methods=_ALL_METHODS),
            Route("/{path:path}", http.elsewhere, methods=_ALL_METHODS),
        ]
    )
