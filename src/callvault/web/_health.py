"""``/healthz``, ``/readyz`` and ``/metrics``: for load balancers, orchestrators and
Prometheus.

- ``GET /healthz``: 200 while the process answers; no login, nothing else.
- ``GET /readyz``: 200 when this process can do its work (the index answers, the storage
  can be written; in `serve`, the PBX session is up and every download worker alive),
  else 503. Anyone sees which checks passed; an admin also sees what each found.
- ``GET /metrics``: Prometheus's text format, for an admin (an API token as Bearer, as
  Prometheus's ``authorization`` setting sends it); see `callvault.ops.IndexCollector` and
  `callvault.archive.ArchiverMetrics` for what is in it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from callvault.ops import readiness
from callvault.web._context import authenticate, context

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Whether this process can do its work now (503 when not)",
    responses={503: {"description": "a check failed"}},
)
async def readyz(request: Request) -> JSONResponse:
    ctx = context(request)
    service = ctx.service
    result = await asyncio.to_thread(
        readiness,
        ctx.index,
        ctx.storage,
        session_state=service.session_state() if service is not None else None,
        workers=service.workers() if service is not None else None,
    )
    principal = await asyncio.to_thread(authenticate, request)
    body: dict[str, Any] = result.to_json()
    if principal is None or not principal.user.is_admin:
        body["checks"] = [{"name": c.name, "ok": c.ok} for c in result.checks]
    return JSONResponse(body, status_code=200 if result.ready else 503)


# HEAD, which some load balancers' health checks send: the status alone (left out of the
# OpenAPI document, where each operation is one method).
@router.head("/healthz", include_in_schema=False)
async def healthz_head() -> Response:
    return Response(status_code=200)


@router.head("/readyz", include_in_schema=False)
async def readyz_head(request: Request) -> Response:
    answer = await readyz(request)
    return Response(status_code=answer.status_code)


@router.get(
    "/metrics",
    summary="Prometheus metrics (admins: an API token as Bearer)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 401: {}, 403: {}},
)
async def metrics(request: Request) -> Response:
    principal = await asyncio.to_thread(authenticate, request)
    if principal is None:
        raise HTTPException(
            401,
            "send Authorization: Bearer <API token of an admin>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not principal.user.is_admin:
        raise HTTPException(403, "admins only")
    ctx = context(request)
    body, content_type = await asyncio.to_thread(ctx.metrics_exposition)
    return Response(body, media_type=content_type)
