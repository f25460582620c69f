"""The app factory: one FastAPI app serving the JSON API under /api and the pages."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from callvault.archive import ServiceProbe
from callvault.index import Index, SettingKey
from callvault.keys import Keyring
from callvault.storage import Storage
from callvault.web import _api, _compliance, _health, _pages, _pbxs
from callvault.web._context import Clock, WebContext, authenticate
from callvault.web._security import LoginLimiter, SessionSigner

_STATIC = Path(__file__).resolve().parent / "static"

# Pages load only their own script and style; audio comes from this origin too.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _error_page(request: Request, status: int, detail: str) -> Response:
    principal = authenticate(request)
    if status == 404 and principal is None:
        # Anonymous visitors learn nothing about what exists: log in first.
        return _pages.login_redirect(request.url.path)
    return _pages.render(
        request, "error.html", principal, status_code=status, status=status, detail=detail
    )


def _stored_session_secret(index: Index, now: datetime) -> bytes:
    # Set once, atomically: processes starting together all use the one that was stored.
    stored = index.settings.setdefault(SettingKey.WEB_SESSION_SECRET, secrets.token_hex(32), now)
    return bytes.fromhex(stored)


def create_app(
    index: Index,
    storage: Storage,
    *,
    secure_cookies: bool = False,
    session_secret: bytes | None = None,
    clock: Clock | None = None,
    limiter: LoginLimiter | None = None,
    service: ServiceProbe | None = None,
    keyring: Keyring | None = None,
) -> FastAPI:
    """Build the web app over an open index and a storage backend.

    `secure_cookies` marks cookies Secure (set it when TLS is terminated in front of the
    app; requests seen as https get it anyway). Without `session_secret` the one kept in the
    index is used (made on first start), so sessions survive a restart and `callvault web`
    and `callvault serve` over the same archive accept each other's cookies. `clock` and
    `limiter` are for tests. `service` is what `serve` tells about its own work, for
    ``/readyz`` and ``/metrics``. `keyring` seals the passwords of PBXs added through
    the API (without it, setting a PBX password there is refused).
    """
    now = clock or _utc_now
    if session_secret is None:
        session_secret = _stored_session_secret(index, now())
    app = FastAPI(
        title="callvault",
        summary="Find, play and export archived call recordings",
        version="1",
        openapi_url="/api/openapi.json",
        docs_url=None,  # Swagger UI would load from a CDN: blank on an offline network
        redoc_url=None,
    )
    app.state.callvault = WebContext(
        index=index,
        storage=storage,
        signer=SessionSigner(session_secret, now),
        limiter=limiter or LoginLimiter(now),
        clock=now,
        secure_cookies=secure_cookies,
        service=service,
        keyring=keyring,
    )
    app.include_router(_health.router)
    app.include_router(_api.router)
    app.include_router(_pbxs.router)
    app.include_router(_compliance.router)
    app.include_router(_pages.router)
    app.include_router(_compliance.pages)
    app.include_router(_pbxs.pages)
    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Content-Security-Policy", _CSP)
        if not request.url.path.startswith("/static/"):
            # Pages and API answers are per user and may carry a one-time secret (a new
            # user's password, a new token) or a CSRF token: never kept in any cache.
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(_pages.LoginRequired)
    async def login_required(request: Request, exc: _pages.LoginRequired) -> Response:
        return _pages.login_redirect(exc.next_url)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/api/") or request.url.path.startswith("/static/"):
            return JSONResponse(
                {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
            )
        return _error_page(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path.startswith("/api/"):
            errors = [
                {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()
            ]
            return JSONResponse({"detail": errors}, status_code=422)
        return _error_page(request, 404, "no such page")

    return app
