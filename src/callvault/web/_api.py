"""The JSON API under /api: search, recordings and their audio, export, stats, admin."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from callvault.index import Index, RecordingRow, audit, users
from callvault.index.schema import ARCHIVED
from callvault.keys import MasterKeyError
from callvault.ops import (
    MAX_OFFSET,
    REQUEUE_STATES,
    ArchiveStatus,
    AuditVerification,
    JsonResult,
    PublicKeyView,
    RecordingPage,
    RecordingUnreadable,
    RecordingView,
    RequeueResult,
    VerifyResult,
    archive_status,
    last_verification,
    open_recording,
    pbx_id_of,
    public_keys,
    read_recording_range,
    readable_filename,
    record_verification,
    recording_size,
    requeue,
    signer,
    stream_export,
    verify_audit,
    verify_recording,
)
from callvault.times import FORMATS
from callvault.web import _media
from callvault.web._context import (
    Principal,
    SearchParams,
    authenticate,
    check_csrf,
    context,
    parse_when,
    record_audit,
    remote_addr,
    require_auditor,
    require_listener,
    search_page_of,
    visible_recording,
)

MAX_ID = 2**62
StateName = Literal["pending", "downloading", "archived", "failed", "missing"]

bearer = HTTPBearer(
    auto_error=False,
    description="An API token made by an admin (`callvault token create`, or the admin page).",
)


def api_user(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None,
) -> Principal:
    principal = authenticate(request)
    if principal is None:
        raise HTTPException(
            401,
            "log in, or send Authorization: Bearer <API token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


def api_admin(principal: Annotated[Principal, Depends(api_user)]) -> Principal:
    if not principal.user.is_admin:
        raise HTTPException(403, "admins only")
    return principal


def api_listener(principal: Annotated[Principal, Depends(api_user)]) -> Principal:
    """A user who may search and hear recordings (listener, admin); 403 otherwise."""
    require_listener(principal.user)
    return principal


def api_auditor(principal: Annotated[Principal, Depends(api_user)]) -> Principal:
    """A user who may read and verify the audit log (auditor, admin); 403 otherwise."""
    require_auditor(principal.user)
    return principal


def search_params(
    since: Annotated[
        str | None,
        Query(
            max_length=40,
            description=f"Calls that started from this time: {FORMATS} (UTC unless it names "
            "an offset, e.g. +01:00)",
        ),
    ] = None,
    until: Annotated[
        str | None,
        Query(
            max_length=40,
            description="...and before this time (a date: through that day), as `since`",
        ),
    ] = None,
    number: Annotated[
        str | None, Query(max_length=64, description="Part of the caller, callee or DID")
    ] = None,
    extension: Annotated[
        str | None, Query(max_length=64, description="Exactly the caller or the callee")
    ] = None,
    direction: Annotated[
        str | None, Query(max_length=16, description="Inbound, Outbound, Internal, ...")
    ] = None,
    status: Annotated[
        str | None, Query(max_length=16, description="ANSWERED, NO ANSWER, BUSY, ...")
    ] = None,
    min_talk_s: Annotated[
        int | None, Query(ge=0, le=10_000_000, description="Talk time at least (seconds)")
    ] = None,
    state: Annotated[StateName | None, Query(description="Archive state")] = None,
    pbx: Annotated[
        str | None, Query(max_length=32, description="The PBX, by its name in the registry")
    ] = None,
) -> SearchParams:
    params = SearchParams(
        since, until, number, extension, direction, status, min_talk_s, state, pbx
    )
    for name, value in params.query_items():
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise HTTPException(422, f"{name}: control characters are not allowed")
    return params


class DayCountOut(BaseModel):
    day: str
    calls: int


class StatsOut(BaseModel):
    counts_by_state: dict[str, int]
    recordings: int
    bytes_stored: int
    calls_per_day: list[DayCountOut]


class UserOut(BaseModel):
    id: int
    name: str
    role: str
    scope: str
    pbxs: list[str] = Field(
        default_factory=list, description="The PBXs whose calls they may see; empty: every PBX"
    )
    created_at: datetime


RoleName = Literal["listener", "auditor", "auditor,listener", "admin"]  # users.ROLE_CHOICES


class UserIn(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    role: RoleName = Field(
        description="listener: search, play, download and export; auditor: the audit log "
        "and its verification, no recording; auditor,listener: both; admin: everything"
    )
    password: str | None = Field(
        default=None,
        min_length=8,
        max_length=256,
        description="Generated when absent",
        repr=False,
    )
    scope: str = Field(default="", max_length=1000, description='e.g. "1000-1099,2001"')
    pbxs: str = Field(
        default="", max_length=1000, description='PBXs they may see, e.g. "paris,lyon" (all)'
    )


class UserEdit(BaseModel):
    """What to change of a user; a field left out stays as it is."""

    role: RoleName | None = None
    scope: str | None = Field(default=None, max_length=1000, description='"" for every call')
    pbxs: str | None = Field(default=None, max_length=1000, description='"" for every PBX')


class UserCreated(BaseModel):
    user: UserOut
    password: str | None = Field(description="The generated password, shown this once", repr=False)


class TokenOut(BaseModel):
    id: int
    user: str
    label: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None


class TokenIn(BaseModel):
    user: str = Field(min_length=1, max_length=64)
    label: str = Field(default="", max_length=128)


class TokenCreated(BaseModel):
    token: TokenOut
    secret: str = Field(description="The token itself, shown this once", repr=False)


class MeOut(BaseModel):
    name: str
    role: str
    scope: str
    csrf_token: str = Field(
        description="Send as X-CSRF-Token with cookie-authenticated writes", repr=False
    )


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: str
    remote_addr: str


class AuditPage(BaseModel):
    total: int
    items: list[AuditOut]


class AuditProblemOut(BaseModel):
    kind: str = Field(description="altered, missing, inserted, checkpoint or recording")
    message: str
    seq: int | None = Field(description="The audit entry where it was found")
    recording: int | None = Field(description="The recording it concerns")


class AuditVerificationOut(BaseModel):
    """What a verification of the audit chain checked and found (as `callvault audit
    verify --json` prints it, with `ok` and `summary`)."""

    ok: bool
    summary: str
    at: datetime
    entries: int
    head_seq: int
    checkpoints: int
    last_checkpoint_seq: int | None
    last_checkpoint_at: datetime | None
    recordings: int
    recordings_before_chain: int
    keys: list[str]
    problems: list[AuditProblemOut]
    more_problems: int


class LastVerificationOut(BaseModel):
    """The outcome of the last verification of the audit chain, by whoever ran it."""

    at: datetime
    by: str
    ok: bool
    entries: int | None = None
    summary: str


class PublicKeyOut(BaseModel):
    id: str
    fingerprint: str = Field(description="SHA-256 of the DER public key")
    pem: str
    created_at: datetime
    retired_at: datetime | None
    active: bool = Field(description="Whether it signs now (the others are retired)")


def user_out(user: users.User) -> UserOut:
    return UserOut(
        id=user.id,
        name=user.name,
        role=user.role,
        scope=user.scope,
        pbxs=list(user.pbxs),
        created_at=user.created_at,
    )


def token_out(token: users.ApiToken) -> TokenOut:
    return TokenOut(
        id=token.id,
        user=token.user_name,
        label=token.label,
        created_at=token.created_at,
        created_by=token.created_by,
        revoked_at=token.revoked_at,
        last_used_at=token.last_used_at,
    )


def describe_filters(params: SearchParams) -> str:
    return urlencode(params.query_items()) or "(all)"


log = logging.getLogger(__name__)

router = APIRouter(prefix="/api")
AnyUser = Annotated[Principal, Depends(api_user)]
Admin = Annotated[Principal, Depends(api_admin)]
Listener = Annotated[Principal, Depends(api_listener)]
Auditor = Annotated[Principal, Depends(api_auditor)]
RecordingId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get("/me", tags=["session"])
def me(principal: AnyUser) -> MeOut:
    """Who the caller is (and the CSRF token of a browser session)."""
    user = principal.user
    return MeOut(name=user.name, role=user.role, scope=user.scope, csrf_token=principal.csrf)


def _answer(result: JsonResult) -> JSONResponse:
    """An operation's result as JSON: the same shape `callvault ... --json` prints (the
    route's response_model documents it in the OpenAPI document)."""
    return JSONResponse(result.to_json())


@router.get("/recordings", tags=["recordings"], response_model=RecordingPage)
def search(
    request: Request,
    principal: Listener,
    params: Annotated[SearchParams, Depends(search_params)],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after: Annotated[
        str | None,
        Query(
            max_length=200,
            description="The `next` of the previous page: the page after it (as quick at "
            "any depth)",
        ),
    ] = None,
    offset: Annotated[
        int,
        Query(ge=0, description=f"Rows to skip, at most {MAX_OFFSET}: page on with `after`"),
    ] = 0,
    exact_total: Annotated[
        bool,
        Query(description="Count every match, however many (slow on a big archive)"),
    ] = False,
) -> Response:
    """Recordings with their calls matching the filters, newest first, within your scope
    (the same page as `callvault list --json`). `total` counts up to 1,000 matches unless
    `exact_total` asks for all: with `total_exact` false, more than `total` match. Page on
    with `after` set to the page's `next` (null on the last page)."""
    filters = params.filters(principal.user, context(request).index)
    page = search_page_of(context(request).index, filters, limit, after, offset, exact_total)
    return _answer(page)


@router.get(
    "/recordings/{recording_id}",
    tags=["recordings"],
    response_model=RecordingView,
    responses={404: {}},
)
def recording(request: Request, principal: Listener, recording_id: RecordingId) -> Response:
    """One recording's call fields, archive state and checksum."""
    row = visible_recording(request, principal, recording_id)
    registry = context(request).index.pbxs.list()
    names = {record.id: record.name for record in registry}
    kinds = {record.id: record.config.kind for record in registry}
    return _answer(RecordingView.of(row, names, kinds))


# What browsers send as Sec-Fetch-Site for a request made from this site's own pages, or
# typed into the address bar / opened from a bookmark.
_OWN_FETCH_SITES = frozenset({"same-origin", "none"})


def refuse_cross_site(request: Request, principal: Principal) -> None:
    """Refuse an audited GET (export, download, play) that another site made the browser send.

    SameSite=Lax cookies still go with a top-level navigation from any site, so a link or
    a script elsewhere could start an export in the victim's name. Browsers always send
    Sec-Fetch-Site; scripts with an API token have no cookie to abuse and are let through.
    """
    if principal.session is None:
        return
    site = request.headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in _OWN_FETCH_SITES:
        raise HTTPException(403, "open this from callvault's own pages (cross-site request)")


def audio_response(
    request: Request, principal: Principal, row: RecordingRow, *, download: bool
) -> Response:
    """The recording's bytes: the whole file, or one byte range (206) for seeking."""
    ctx = context(request)
    if row.state != ARCHIVED or row.storage_key is None:
        raise HTTPException(404, "this recording is not archived")
    try:
        # The plaintext's size: an encrypted recording is played as the PBX sent it.
        size = recording_size(ctx.storage, row)
    except RecordingUnreadable as exc:
        raise unreadable(exc) from None
    except (OSError, ValueError):  # absent, or a storage key that fails validation
        raise HTTPException(404, "the archived file is missing from storage") from None
    headers = {
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    if row.sha256:
        headers["ETag"] = f'"{row.sha256}"'
    filename = readable_filename(row)
    headers["Content-Disposition"] = _media.content_disposition(filename, inline=not download)
    try:
        byte_range = _media.parse_range(request.headers.get("range"), size)
    except _media.RangeNotSatisfiable:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}", **headers})
    if download:
        byte_range = None if byte_range is None or byte_range.length == size else byte_range
    try:
        content_type = _media.content_type_of(row, ctx.storage, ctx.keyring)
    except RecordingUnreadable as exc:
        raise unreadable(exc) from None
    except (OSError, ValueError):
        raise HTTPException(404, "the archived file is missing from storage") from None
    if download:
        record_audit(request, principal.name, audit.DOWNLOAD, row.name, f"id={row.id}")
    elif ctx.first_play(principal.name, row.id):
        # Whatever the range: `bytes=1-` is the whole recording but its first byte. The
        # player's later range requests (seeks) fall in the de-duplication window.
        record_audit(request, principal.name, audit.PLAY, row.name, f"id={row.id}")
    # An encrypted recording's data key and first segment are checked before the headers
    # go out: a wrong key or a damaged file is an error, never audio. (A segment further
    # on that fails ends the response short of its Content-Length.)
    try:
        if byte_range is None:
            chunks = open_recording(ctx.storage, row, ctx.keyring)
        else:
            chunks = read_recording_range(
                ctx.storage, row, ctx.keyring, byte_range.start, byte_range.length
            )
        chunks = _media.checked_first(chunks)
    except RecordingUnreadable as exc:
        raise unreadable(exc) from None
    except (OSError, ValueError):
        raise HTTPException(404, "the archived file is missing from storage") from None
    if byte_range is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(chunks, media_type=content_type, headers=headers)
    headers["Content-Length"] = str(byte_range.length)
    headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end}/{size}"
    return StreamingResponse(
        chunks,
        status_code=206,
        media_type=content_type,
        headers=headers,
    )


def unreadable(exc: RecordingUnreadable) -> HTTPException:
    """The answer for an encrypted recording that cannot be read: 503 when the master
    keys loaded cannot open it (configuration), 500 when its file is damaged; the detail
    is the one line saying which."""
    log.error("%s", exc)
    return HTTPException(503 if exc.reason == "key" else 500, str(exc))


_AUDIO_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"audio/wav": {}}, "description": "The whole file"},
    206: {"content": {"audio/wav": {}}, "description": "The requested byte range"},
    404: {"description": "No such recording, out of scope, or not archived"},
    416: {"description": "The Range names no byte of the file"},
    500: {"description": "An encrypted recording whose file is damaged (the detail says so)"},
    503: {"description": "An encrypted recording the master keys loaded cannot open"},
}


@router.get(
    "/recordings/{recording_id}/audio",
    tags=["recordings"],
    response_class=Response,
    responses=_AUDIO_RESPONSES,
)
def audio(request: Request, principal: Listener, recording_id: RecordingId) -> Response:
    """Stream the audio for a player; honours `Range: bytes=...` (one range)."""
    refuse_cross_site(request, principal)  # a play is audited in the user's name too
    row = visible_recording(request, principal, recording_id)
    return audio_response(request, principal, row, download=False)


@router.get(
    "/recordings/{recording_id}/download",
    tags=["recordings"],
    response_class=Response,
    responses=_AUDIO_RESPONSES,
)
def download(request: Request, principal: Listener, recording_id: RecordingId) -> Response:
    """The audio as an attachment named after the call's time, caller and callee."""
    refuse_cross_site(request, principal)
    row = visible_recording(request, principal, recording_id)
    return audio_response(request, principal, row, download=True)


def run_verify(request: Request, principal: Principal, row: RecordingRow) -> VerifyResult:
    """Re-hash the archived file (a match is noted in the index) and audit the check."""
    ctx = context(request)
    result = verify_recording(ctx.archive, row, now=ctx.clock())
    outcome = "ok" if result.ok else str(result.error)
    record_audit(request, principal.name, audit.VERIFY, row.name, outcome)
    return result


@router.post(
    "/recordings/{recording_id}/verify",
    tags=["recordings"],
    response_model=VerifyResult,
    responses={404: {}},
)
def verify(request: Request, principal: Listener, recording_id: RecordingId) -> Response:
    """Re-read the archived file now and compare it with its recorded SHA-256 and size."""
    check_csrf(request, principal)
    row = visible_recording(request, principal, recording_id)
    return _answer(run_verify(request, principal, row))


def export_response(
    request: Request, principal: Principal, params: SearchParams, max_files: int
) -> Response:
    ctx = context(request)
    filters = params.filters(principal.user, context(request).index)
    if filters.state is None or filters.state == ARCHIVED:
        rows = ctx.index.recordings.search(replace(filters, state=ARCHIVED), limit=max_files)
    else:
        rows = []
    return zip_response(request, principal, rows, describe_filters(params))


def zip_response(
    request: Request, principal: Principal, rows: Sequence[RecordingRow], what: str
) -> Response:
    """A signed export of `rows` (signed when the web app has the master key), streamed;
    audited as an export of `what` (the filters, or the request it answers)."""
    ctx = context(request)
    now = ctx.clock()
    key = None
    if ctx.keyring is not None:
        try:
            key = signer(ctx.index, ctx.keyring, now=now)
        except MasterKeyError as exc:
            log.error("the export is not signed: %s", exc)
    signed = f"signed by key {key.id}" if key is not None else "not signed (no master key)"
    record_audit(
        request,
        principal.name,
        audit.EXPORT,
        f"{len(rows)} recordings",
        f"{what}; {signed}",
    )
    stamp = now.strftime("%Y%m%d-%H%M%S")
    return StreamingResponse(
        stream_export(
            rows,
            ctx.storage,
            registry=ctx.index.pbxs.list(),
            key=key,
            now=now,
            keyring=ctx.keyring,
        ),
        media_type="application/zip",
        headers={
            "Content-Disposition": _media.content_disposition(f"callvault-export-{stamp}.zip"),
            "Cache-Control": "private, no-store",
        },
    )


@router.get(
    "/export",
    tags=["recordings"],
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}}},
)
def export(
    request: Request,
    principal: AnyUser,
    params: Annotated[SearchParams, Depends(search_params)],
    max_files: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    """A ZIP of the archived recordings matching the filters (newest first, at most
    `max_files`) with `manifest.csv` giving each file's SHA-256 and `SHA256SUMS`, both
    signed with the deployment's Ed25519 key (when the web app has the master key);
    streamed as it is made. `callvault verify-export` checks it offline."""
    refuse_cross_site(request, principal)
    return export_response(request, principal, params, max_files)


@router.get("/stats", tags=["archive"])
def stats(
    request: Request,
    _admin: Admin,
    days: Annotated[int, Query(ge=1, le=366)] = 30,
) -> StatsOut:
    """Recordings by state, bytes stored, and calls per day (UTC) over the last `days`."""
    ctx = context(request)
    counts = ctx.index.recordings.counts_by_state()
    per_day = ctx.index.recordings.calls_per_day(days=days, today=ctx.clock().date())
    return StatsOut(
        counts_by_state=counts,
        recordings=sum(counts.values()),
        bytes_stored=ctx.index.recordings.bytes_stored(),
        calls_per_day=[DayCountOut(day=d.day.isoformat(), calls=d.calls) for d in per_day],
    )


@router.get("/status", tags=["archive"], response_model=ArchiveStatus)
def status(request: Request, _admin: Admin) -> Response:
    """The archive at a glance (the same as `callvault status --json`): recordings by
    state, failures with reasons, the PBX session, serve's workers, the last event, disk
    use and the index's health."""
    ctx = context(request)
    return _answer(archive_status(ctx.archive, now=ctx.clock()))


class RequeueIn(BaseModel):
    states: list[Literal["failed", "missing"]] = Field(
        default=["failed", "missing"], min_length=1, description="Which give-ups to queue again"
    )
    since: str | None = Field(
        default=None,
        max_length=40,
        description="Only recordings first queued from this time (UTC unless it says)",
    )
    pbx: str | None = Field(
        default=None, max_length=32, description="Only this PBX's, by its name in the registry"
    )


def run_requeue(
    request: Request,
    principal: Principal,
    states: Sequence[str] = REQUEUE_STATES,
    since: datetime | None = None,
    pbx: str | None = None,
) -> RequeueResult:
    """Shared by the API and the status page: queue recordings given up on again (of the
    PBX named `pbx` only, if given: 422 if the registry has no such name), audit it."""
    ctx = context(request)
    pbx_id = None
    if pbx:
        from callvault.index.pbxs import NoSuchPbx

        try:
            pbx_id = pbx_id_of(ctx.index, pbx)
        except NoSuchPbx as exc:
            raise HTTPException(422, f"pbx: {exc}") from None
    result = requeue(ctx.archive, states, now=ctx.clock(), since=since, pbx_id=pbx_id)
    counts = ", ".join(f"{state}={count}" for state, count in result.requeued.items())
    if pbx:
        counts += f" pbx={pbx}"
    record_audit(request, principal.name, audit.REQUEUE, "recordings", counts)
    return result


@router.post("/requeue", tags=["archive"], response_model=RequeueResult)
def requeue_recordings(
    request: Request, principal: Admin, body: Annotated[RequeueIn | None, Body()] = None
) -> Response:
    """Queue recordings given up on again, each with a fresh run of attempts (the same as
    `callvault requeue`); a running serve downloads them at once. Without a body: both
    states, whenever first queued."""
    check_csrf(request, principal)
    body = body or RequeueIn()
    since = parse_when(body.since, end=False, field_name="since")
    return _answer(run_requeue(request, principal, body.states, since, body.pbx))


@router.get("/users", tags=["admin"])
def list_users(request: Request, _admin: Admin) -> list[UserOut]:
    return [user_out(u) for u in context(request).index.users.list()]


def add_user(request: Request, principal: Principal, body: UserIn) -> UserCreated:
    """Shared by the API and the admin page: add a user, audit it."""
    index = context(request).index
    generated = body.password is None
    password = body.password or users.generate_password()
    if index.users.get(body.name) is not None:
        raise HTTPException(409, f"user {body.name!r} already exists")
    try:
        user = index.users.add(body.name, body.role, password, body.scope, pbxs=body.pbxs)
    except users.UserError as exc:
        raise HTTPException(422, str(exc)) from None
    record_audit(
        request,
        principal.name,
        audit.USER_ADD,
        user.name,
        f"role={user.role} scope={user.scope or '(all)'} pbxs={','.join(user.pbxs) or '(all)'}",
    )
    return UserCreated(user=user_out(user), password=password if generated else None)


def edit_user(request: Request, principal: Principal, name: str, body: UserEdit) -> users.User:
    """Shared by the API and the admin page: change a user's role, scope or PBXs (the
    library refuses your own role and the last admin's), audit what changed."""
    try:
        before, after = context(request).index.users.edit(
            name, role=body.role, scope=body.scope, pbxs=body.pbxs, acting=principal.user
        )
    except users.NoSuchUser:
        raise HTTPException(404, "no such user") from None
    except (users.SelfRemovalError, users.LastAdminError) as exc:
        raise HTTPException(409, str(exc)) from None
    except users.UserError as exc:  # a bad scope, an unknown PBX
        raise HTTPException(422, str(exc)) from None
    change = users.describe_change(before, after)
    if change:
        record_audit(request, principal.name, audit.USER_EDIT, name, change)
    return after


def remove_user(request: Request, principal: Principal, name: str) -> None:
    """Shared by the API and the admin page: remove a user (the library refuses removing
    yourself or the last admin), audit it."""
    try:
        target = context(request).index.users.remove(name, acting=principal.user)
    except users.NoSuchUser:
        raise HTTPException(404, "no such user") from None
    except users.UserError as exc:  # yourself, the last admin
        raise HTTPException(409, str(exc)) from None
    record_audit(request, principal.name, audit.USER_REMOVE, name, f"role={target.role}")


def create_token(request: Request, principal: Principal, body: TokenIn) -> TokenCreated:
    ctx = context(request)
    try:
        token, secret = ctx.index.tokens.create(
            body.user, label=body.label, created_by=principal.name, now=ctx.clock()
        )
    except users.UserError as exc:
        raise HTTPException(404, str(exc)) from None
    record_audit(
        request,
        principal.name,
        audit.TOKEN_CREATE,
        token.user_name,
        f"token id={token.id} label={token.label!r}",
    )
    return TokenCreated(token=token_out(token), secret=secret)


def revoke_token(request: Request, principal: Principal, token_id: int) -> None:
    ctx = context(request)
    token = ctx.index.tokens.get(token_id)
    if token is None or not ctx.index.tokens.revoke(token_id, now=ctx.clock()):
        raise HTTPException(404, "no such live token")
    record_audit(
        request, principal.name, audit.TOKEN_REVOKE, token.user_name, f"token id={token_id}"
    )


@router.post("/users", tags=["admin"], status_code=201, responses={409: {}})
def create_user(request: Request, principal: Admin, body: UserIn) -> UserCreated:
    """Add a user; with no password one is generated and returned this once."""
    check_csrf(request, principal)
    return add_user(request, principal, body)


@router.patch("/users/{name}", tags=["admin"], responses={404: {}, 409: {}, 422: {}})
def change_user(
    request: Request,
    principal: Admin,
    name: Annotated[str, Path(max_length=64)],
    body: UserEdit,
) -> UserOut:
    """Change a user's role, scope or PBXs (what the body names); it holds at once, in
    every session. 409 for your own role, or the last admin's."""
    check_csrf(request, principal)
    return user_out(edit_user(request, principal, name, body))


@router.delete("/users/{name}", tags=["admin"], status_code=204, responses={404: {}, 409: {}})
def delete_user(
    request: Request, principal: Admin, name: Annotated[str, Path(max_length=64)]
) -> Response:
    """Remove a user and their API tokens."""
    check_csrf(request, principal)
    remove_user(request, principal, name)
    return Response(status_code=204)


@router.get("/tokens", tags=["admin"])
def list_tokens(request: Request, _admin: Admin) -> list[TokenOut]:
    return [token_out(t) for t in context(request).index.tokens.list()]


@router.post("/tokens", tags=["admin"], status_code=201, responses={404: {}})
def new_token(request: Request, principal: Admin, body: TokenIn) -> TokenCreated:
    """Make an API token for a user; the secret is in this answer only (stored hashed)."""
    check_csrf(request, principal)
    return create_token(request, principal, body)


@router.delete("/tokens/{token_id}", tags=["admin"], status_code=204, responses={404: {}})
def delete_token(
    request: Request, principal: Admin, token_id: Annotated[int, Path(ge=1, le=MAX_ID)]
) -> Response:
    """Revoke an API token."""
    check_csrf(request, principal)
    revoke_token(request, principal, token_id)
    return Response(status_code=204)


def audit_filter(
    actor: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=32)] = None,
    target: Annotated[str | None, Query(max_length=255)] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
) -> audit.AuditFilter:
    return audit.AuditFilter(
        actor=actor or None,
        action=action or None,
        target=target or None,
        since=parse_when(since, end=False, field_name="since"),
        until=parse_when(until, end=True, field_name="until"),
    )


AuditWhere = Annotated[audit.AuditFilter, Depends(audit_filter)]


@router.get("/audit", tags=["audit"])
def audit_log(
    request: Request,
    _auditor: Auditor,
    where: AuditWhere,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> AuditPage:
    """Audit entries, newest first, filtered by actor, action, target (part) and time."""
    index = context(request).index
    entries = index.audit.query(where, limit=limit, offset=offset)
    return AuditPage(
        total=index.audit.count(where),
        items=[AuditOut(**_asdict(e)) for e in entries],
    )


def _asdict(entry: audit.AuditEntry) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in audit.CSV_HEADER}


def describe_audit_filter(where: audit.AuditFilter) -> str:
    items = [
        (name, value.isoformat() if isinstance(value, datetime) else value)
        for name, value in (
            ("actor", where.actor),
            ("action", where.action),
            ("target", where.target),
            ("since", where.since),
            ("until", where.until),
        )
        if value
    ]
    return urlencode(items) or "(all)"


def audit_csv_response(
    request: Request, principal: Principal, where: audit.AuditFilter
) -> Response:
    refuse_cross_site(request, principal)
    record_audit(
        request, principal.name, audit.AUDIT_EXPORT, "audit.csv", describe_audit_filter(where)
    )
    stamp = context(request).clock().strftime("%Y%m%d-%H%M%S")
    return StreamingResponse(
        context(request).index.audit.iter_csv(where),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": _media.content_disposition(f"callvault-audit-{stamp}.csv")},
    )


@router.get(
    "/audit.csv",
    tags=["audit"],
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
)
def audit_csv(request: Request, auditor: Auditor, where: AuditWhere) -> Response:
    """The filtered audit log as CSV, oldest first (the export is itself audited)."""
    return audit_csv_response(request, auditor, where)


def run_audit_verification(request: Request, principal: Principal) -> AuditVerification:
    """Shared by the API and the audit page: check the audit chain now, audit the check
    (in the chain it checked) and keep its outcome as the last verification."""
    ctx = context(request)
    report = verify_audit(ctx.index, now=ctx.clock())
    record_verification(ctx.index, report, actor=principal.name, remote_addr=remote_addr(request))
    return report


def verification_json(report: AuditVerification) -> dict[str, Any]:
    """A verification as the API answers it: `to_json()` with `ok` and `summary`."""
    return {"ok": report.ok, "summary": report.summary(), **report.to_json()}


@router.post("/audit/verify", tags=["audit"], response_model=AuditVerificationOut)
def verify_audit_chain(request: Request, principal: Auditor) -> Response:
    """Check the audit chain now: every entry against the one before it, the signed
    checkpoints, and every archived recording against what its entry attests. `ok` is
    false when something was altered, removed or inserted; `problems` says where (the
    first is where the log was first changed). The check is itself audited."""
    check_csrf(request, principal)
    return JSONResponse(verification_json(run_audit_verification(request, principal)))


@router.get("/audit/verification", tags=["audit"], response_model=LastVerificationOut | None)
def last_audit_verification(request: Request, _auditor: Auditor) -> Response:
    """The last verification of the audit chain (from the web app, the API or `callvault
    audit verify`): when, by whom, its outcome; null if it was never checked."""
    return JSONResponse(last_verification(context(request).index))


@router.get("/keys", tags=["keys"])
def signing_keys(request: Request, _user: AnyUser) -> list[PublicKeyOut]:
    """The public keys that sign the audit log's checkpoints and exports, newest first;
    the active one signs now, the retired ones are kept to check what they signed."""
    return [
        PublicKeyOut(
            id=key.id,
            fingerprint=key.fingerprint,
            pem=key.pem,
            created_at=key.created_at,
            retired_at=key.retired_at,
            active=key.active,
        )
        for key in public_keys(context(request).index)
    ]


@router.get(
    "/keys/signing.pem",
    tags=["keys"],
    response_class=Response,
    responses={200: {"content": {"application/x-pem-file": {}}}, 404: {}},
)
def signing_key_pem(request: Request, _user: AnyUser) -> Response:
    """The active signing key's public key (PEM), to keep outside callvault: `callvault
    audit verify --public-key FILE` then checks the log against it."""
    key = active_key(context(request).index)
    if key is None:
        raise HTTPException(
            404,
            "there is no signing key yet: the first is made when the audit log is first "
            "signed (by a serve node with the master key, or `callvault audit verify "
            "--master-key-file FILE`)",
        )
    return Response(
        key.pem,
        media_type="application/x-pem-file",
        headers={
            "Content-Disposition": _media.content_disposition(
                f"callvault-signing-key-{key.id}.pem"
            ),
            "Cache-Control": "no-cache",
        },
    )


def active_key(index: Index) -> PublicKeyView | None:
    """The signing key that signs now, or None if there is none yet."""
    return next((key for key in public_keys(index) if key.active), None)
