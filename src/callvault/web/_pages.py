"""The HTML pages: login, search, call, status and admin. Plain forms, a little JS."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import pass_context
from jinja2.runtime import Context
from markupsafe import Markup
from pydantic import ValidationError

from callvault.index import audit, users
from callvault.index.schema import (
    ARCHIVED,
    DOWNLOADING,
    FAILED,
    MISSING,
    PENDING,
    RECORDING_STATES,
)
from callvault.ops import (
    MAX_OFFSET,
    REQUEUE_STATES,
    RecordingPage,
    archive_status,
    human_size,
    last_verification,
    readable_filename,
)
from callvault.times import ago
from callvault.web import _api
from callvault.web._context import (
    Principal,
    SearchParams,
    authenticate,
    check_csrf,
    context,
    home_of,
    parse_when,
    record_audit,
    remote_addr,
    require_auditor,
    require_listener,
    search_page_of,
    visible_recording,
)
from callvault.web._security import CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, SESSION_LIFETIME

PAGE_SIZE = 50
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))


class LoginRequired(Exception):
    """Raised by page dependencies; the app answers with a redirect to the login page."""

    def __init__(self, next_url: str) -> None:
        super().__init__("login required")
        self.next_url = next_url


def page_user(request: Request) -> Principal:
    principal = authenticate(request)
    if principal is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return principal


def page_admin(principal: Annotated[Principal, Depends(page_user)]) -> Principal:
    if not principal.user.is_admin:
        raise HTTPException(403, "this page is for admins")
    return principal


def page_auditor(principal: Annotated[Principal, Depends(page_user)]) -> Principal:
    require_auditor(principal.user)
    return principal


PageUser = Annotated[Principal, Depends(page_user)]
PageAdmin = Annotated[Principal, Depends(page_admin)]
PageAuditor = Annotated[Principal, Depends(page_auditor)]


def human_time(value: Any) -> str:
    if value is None:
        return ""
    return str(value.strftime("%Y-%m-%d %H:%M:%S UTC"))


def _now(ctx: Context) -> datetime:
    """The app's clock (tests set it), through the request every page is rendered for."""
    return context(ctx["request"]).clock()


@pass_context
def _when(
    ctx: Context, value: datetime | None, *, id: str | None = None, never: str = "never"
) -> Markup:
    """A moment for people: "3 min ago" (or "in 5 min"), the exact UTC time on hover and
    for machines; `never` when there is none."""
    if value is None:
        return Markup("{}").format(never)
    return Markup('<time{} datetime="{}" title="{}">{}</time>').format(
        Markup(' id="{}"').format(id) if id else "",
        value.isoformat(),
        human_time(value),
        ago(value, _now(ctx)),
    )


templates.env.filters["size"] = human_size
templates.env.filters["utc"] = human_time
templates.env.globals["when"] = _when


def render(
    request: Request,
    template: str,
    principal: Principal | None,
    status_code: int = 200,
    **values: Any,
) -> HTMLResponse:
    values.setdefault("error", None)
    values.setdefault("message", None)
    return templates.TemplateResponse(
        request,
        template,
        {
            "me": principal.user if principal else None,
            "home": home_of(principal.user) if principal else "/search",
            "csrf": principal.csrf if principal else "",
            "csrf_field": CSRF_FIELD,
            **values,
        },
        status_code=status_code,
    )


def _cookie_secure(request: Request) -> bool:
    return context(request).secure_cookies or request.url.scheme == "https"


def _safe_next(target: str | None) -> str:
    # Only a path on this site: never "//host" or "https://host" (open redirect).
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/search"
    return target


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {key: value for key, value in form.items() if isinstance(value, str)}


router = APIRouter(include_in_schema=False)


@router.get("/")
def home(request: Request) -> RedirectResponse:
    """The search, or the audit log for an auditor who is no listener."""
    principal = authenticate(request)
    return RedirectResponse(home_of(principal.user) if principal else "/search", status_code=303)


@router.get("/favicon.ico")
def favicon() -> RedirectResponse:
    """For browsers that ask for the icon without reading the page's link to it."""
    return RedirectResponse("/static/favicon.svg", status_code=301)


def _login_page(
    request: Request, *, error: str | None, status_code: int, next_url: str, name: str = ""
) -> HTMLResponse:
    nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(16)
    if len(nonce) > 64:
        nonce = secrets.token_urlsafe(16)
    response = render(
        request,
        "login.html",
        None,
        status_code=status_code,
        error=error,
        login_csrf=context(request).signer.login_csrf_token(nonce),
        next_url=_safe_next(next_url),
        name=name,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=3600,
        httponly=True,
        samesite="lax",
        secure=_cookie_secure(request),
    )
    return response


@router.get("/login", response_model=None)
def login_form(request: Request, next: str = "/search") -> Response:
    if authenticate(request) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _login_page(request, error=None, status_code=200, next_url=next)


@router.post("/login", response_model=None)
async def login(request: Request) -> Response:
    ctx = context(request)
    form = await _form(request)
    name = form.get("username", "").strip()[:64]
    password = form.get("password", "")
    next_url = form.get("next", "/search")
    if not ctx.signer.check_login_csrf(request.cookies.get(LOGIN_COOKIE), form.get(CSRF_FIELD)):
        return _login_page(
            request,
            error="The login form expired. Please try again.",
            status_code=403,
            next_url=next_url,
            name=name,
        )
    address = remote_addr(request)
    wait = ctx.limiter.retry_after(address, name)
    if wait is not None:
        if ctx.limiter.first_refusal(address):
            record_audit(request, name, audit.LOGIN_THROTTLED, name, f"retry after {wait} s")
        response = _login_page(
            request,
            error=f"Too many failed logins. Try again in {(wait + 59) // 60} minute(s).",
            status_code=429,
            next_url=next_url,
            name=name,
        )
        response.headers["Retry-After"] = str(wait)
        return response
    user = ctx.index.users.verify_password(name, password) if name and password else None
    if user is None:
        record_audit(request, name, audit.LOGIN_FAILED, name, "wrong name or password")
        return _login_page(
            request,
            error="Wrong user name or password.",
            status_code=401,
            next_url=next_url,
            name=name,
        )
    _session, cookie = ctx.signer.issue(user.id)
    record_audit(request, user.name, audit.LOGIN, user.name, "session")
    target = _safe_next(next_url)
    if target == "/search":  # the default: where this user starts
        target = home_of(user)
    redirect = RedirectResponse(target, status_code=303)
    redirect.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        httponly=True,
        samesite="lax",
        secure=_cookie_secure(request),
    )
    redirect.delete_cookie(LOGIN_COOKIE)
    return redirect


@router.post("/logout")
async def logout(request: Request, principal: PageUser) -> RedirectResponse:
    form = await _form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    if principal.session is not None:
        context(request).signer.revoke(principal.session)
    record_audit(request, principal.name, audit.LOGOUT, principal.name)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="lax")
    return response


def _is_number(text: str, max_digits: int) -> bool:
    """ASCII digits only: str.isdigit() also accepts "²" and the like, which int() refuses."""
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


def _page_number(text: str) -> int:
    """The page asked for; anything but a plain number of up to six digits is page 1."""
    return max(int(text), 1) if _is_number(text, 6) else 1


# The search form's fields as the page labels them: a refused value is named this way.
SEARCH_LABELS = {
    "number": "Number",
    "extension": "Extension",
    "since": "From",
    "until": "To",
    "direction": "Direction",
    "status": "Status",
    "min_talk_s": "Min. talk (s)",
    "state": "State",
    "pbx": "PBX",
}
# The date filters (From, To) of the search and audit pages: a start, and an end that
# counts through its day.
_DATE_FIELDS = (("since", False), ("until", True))
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)


def _is_day(text: str) -> bool:
    """A value a date picker can show (YYYY-MM-DD of a real day)."""
    if not _DAY.fullmatch(text):
        return False
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _date_problems(values: dict[str, str], labels: dict[str, str]) -> dict[str, str]:
    """Why each date filter that cannot be read was refused, naming it as labelled."""
    problems: dict[str, str] = {}
    for name, end in _DATE_FIELDS:
        try:
            parse_when(values.get(name), end=end, field_name=labels[name])
        except HTTPException as exc:
            problems[name] = str(exc.detail)
    return problems


@dataclass(frozen=True, slots=True)
class _FormValues:
    """What a filter form shows: each field's value as given (a refused one too, to be
    corrected), and the type of the date fields: a picker, or text for a value a picker
    cannot show (a time of day, a mistyped date), which it would silently drop."""

    values: dict[str, str]
    date_types: dict[str, str]

    @classmethod
    def of(cls, request: Request, names: Iterable[str]) -> _FormValues:
        query = request.query_params
        values = {name: _clean(query.get(name, ""), 64) for name in names}
        date_types = {
            name: "date" if not values.get(name) or _is_day(values[name]) else "text"
            for name, _end in _DATE_FIELDS
        }
        return cls(values, date_types)


def _clean(value: str, limit: int) -> str:
    """A query value as the filters read it: trimmed, cut to `limit`, printable only."""
    return "".join(ch for ch in value.strip()[:limit] if ch.isprintable())


def _search_params(request: Request) -> tuple[SearchParams, dict[str, str]]:
    """The filters of the search form, and why each refused field was refused (by name)."""
    query = request.query_params

    def text(name: str, limit: int = 64) -> str | None:
        return _clean(query.get(name, ""), limit) or None

    problems: dict[str, str] = {}
    min_talk: int | None = None
    raw_min = text("min_talk_s", 40) or ""
    if raw_min:
        if _is_number(raw_min, 8):
            min_talk = int(raw_min)
        else:
            problems["min_talk_s"] = (
                f"{SEARCH_LABELS['min_talk_s']}: {raw_min!r} is not a number of seconds: "
                "use digits, such as 30"
            )
    state = text("state", 16) or ""
    if state and state not in RECORDING_STATES:
        problems["state"] = (
            f"{SEARCH_LABELS['state']}: {state!r} is not an archive state: "
            f"use one of {', '.join(RECORDING_STATES)}"
        )
    since, until = text("since", 40), text("until", 40)
    problems.update(_date_problems({"since": since or "", "until": until or ""}, SEARCH_LABELS))
    params = SearchParams(
        since=since,
        until=until,
        number=text("number"),
        extension=text("extension"),
        direction=text("direction", 16),
        status=text("status", 16),
        min_talk_s=min_talk,
        state=state or None,
        pbx=text("pbx", 32),
    )
    return params, problems


@router.get("/search")
def search_page(request: Request, principal: PageUser) -> HTMLResponse:
    """The search form and its results. A query that cannot run (a date or a number that
    cannot be read) is refused with 422 and the reasons, each naming its field as labelled,
    and shows no results: never "0 recordings" for a search that did not happen. 403 for
    a user who may not search (an auditor who is no listener)."""
    require_listener(principal.user)
    ctx = context(request)
    params, problems = _search_params(request)
    page = _page_number(request.query_params.get("page", "1"))
    after = request.query_params.get("after") or None
    result: RecordingPage | None = None
    if not problems:
        try:
            filters = params.filters(principal.user, ctx.index)
            offset = 0 if after else (page - 1) * PAGE_SIZE
            if offset > MAX_OFFSET:
                raise HTTPException(
                    422,
                    f"page: pages after {MAX_OFFSET // PAGE_SIZE + 1} open from the one "
                    "before them (Older →), not by number",
                )
            result = search_page_of(ctx.index, filters, PAGE_SIZE, after, offset)
        except HTTPException as exc:  # a cursor or a page that is not one; never a 500
            problems["search"] = str(exc.detail)
    base_query = urlencode(params.query_items())
    older = None
    if result is not None and result.next:
        older = urlencode([*params.query_items(), ("after", result.next), ("page", page + 1)])
    return render(
        request,
        "search.html",
        principal,
        status_code=422 if problems else 200,
        form=_FormValues.of(request, SEARCH_LABELS),
        labels=SEARCH_LABELS,
        problems=problems,
        rows=result.items if result else [],
        total=result.total if result else 0,
        total_exact=result.total_exact if result else True,
        page=page,
        pages=max(1, (result.total + PAGE_SIZE - 1) // PAGE_SIZE) if result else 1,
        older_query=older,
        base_query=base_query,
        export_url="/api/export" + (f"?{base_query}" if base_query else ""),
        states=RECORDING_STATES,
        archived=ARCHIVED,
        filename=readable_filename,
        pbxs=sorted(record.name for record in ctx.index.pbxs.list()),
    )


def _call_page(
    request: Request, principal: Principal, recording_id: int, **extra: Any
) -> HTMLResponse:
    row = visible_recording(request, principal, recording_id)
    registry = context(request).index.pbxs.list()  # a handful of rows
    return render(
        request,
        "call.html",
        principal,
        row=row,
        pbx=next((record for record in registry if record.id == row.pbx_id), None),
        archived=row.state == ARCHIVED and row.storage_key is not None,
        filename=readable_filename(row),
        **extra,
    )


RecordingPathId = Annotated[int, PathParam(ge=1, le=_api.MAX_ID)]


@router.get("/recordings/{recording_id}")
def call_page(request: Request, principal: PageUser, recording_id: RecordingPathId) -> Response:
    return _call_page(request, principal, recording_id)


@router.post("/recordings/{recording_id}/verify")
async def verify_page(
    request: Request, principal: PageUser, recording_id: RecordingPathId
) -> Response:
    form = await _form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    row = visible_recording(request, principal, recording_id)
    outcome = _api.run_verify(request, principal, row)
    return _call_page(request, principal, recording_id, verify=outcome)


# What each archive state means, for the status page's readers.
STATE_MEANINGS = {
    PENDING: "waiting for a worker, or for its next attempt",
    DOWNLOADING: "a worker is downloading it now",
    ARCHIVED: "stored, with its size and SHA-256",
    FAILED: "given up after repeated faults; the reason is below",
    MISSING: "the PBX kept saying the file does not exist",
}


# Less free space than this share of the disk needs attention.
def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _requeued_message(raw: str | None, serve: str) -> str | None:
    """What "Queue these again" did (`raw`: how many, from the redirect after it)."""
    if raw is None or not _is_number(raw, 9):
        return None
    count = int(raw)
    if count == 0:
        return "Nothing was queued again: no recording was failed or missing."
    when = "now" if serve == "running" else "once it runs"
    return f"{_plural(count, 'recording')} queued again: serve downloads them {when}."


@router.get("/status")
def status_page(request: Request, principal: PageAdmin) -> HTMLResponse:
    ctx = context(request)
    status = archive_status(ctx.archive, now=ctx.clock())
    per_day = ctx.index.recordings.calls_per_day(days=14, today=ctx.clock().date())
    busiest = max((d.calls for d in per_day), default=0)
    serve = status.serve
    free = status.disk_free_share
    return render(
        request,
        "status.html",
        principal,
        status=status,
        serve=serve,
        attention=status.attention,
        given_up=sum(status.recordings.get(state, 0) for state in REQUEUE_STATES),
        done=_requeued_message(request.query_params.get("requeued"), serve),
        disk_free_percent=None if free is None else round(100 * free),
        meanings=STATE_MEANINGS,
        states=RECORDING_STATES,
        per_day=list(reversed(per_day)),
        busiest=max(busiest, 1),
    )


@router.post("/status/requeue")
async def requeue_page(request: Request, principal: PageAdmin) -> RedirectResponse:
    """The status page's "Queue these again": every failed and missing recording, audited
    as POST /api/requeue is; back to the page (a reload does not post again)."""
    form = await _form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    result = _api.run_requeue(request, principal, REQUEUE_STATES)
    return RedirectResponse(f"/status?requeued={sum(result.requeued.values())}", status_code=303)


def _admin_page(
    request: Request, principal: Principal, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    index = context(request).index
    return render(
        request,
        "admin.html",
        principal,
        status_code=status_code,
        users=index.users.list(),
        tokens=index.tokens.list(),
        roles=users.ROLE_CHOICES,  # the safer first
        **extra,
    )


@router.get("/admin")
def admin_page(request: Request, principal: PageAdmin) -> HTMLResponse:
    message = request.query_params.get("done")
    messages = {
        "user_removed": "User removed.",
        "user_unchanged": "Nothing to change.",
        "token_revoked": "Token revoked.",
    }
    return _admin_page(request, principal, message=messages.get(message or ""))


@router.post("/admin/users")
async def admin_add_user(request: Request, principal: PageAdmin) -> HTMLResponse:
    form = await _form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    try:
        body = _api.UserIn(
            name=form.get("name", "").strip(),
            role=form.get("role", ""),
            password=form.get("password") or None,
            scope=form.get("scope", ""),
            pbxs=form.get("pbxs", ""),
        )
        created = _api.add_user(request, principal, body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _admin_page(request, principal, 422, error=problems)
    except HTTPException as exc:
        return _admin_page(request, principal, exc.status_code, error=str(exc.detail))
    return _admin_page(
        request,
        principal,
        message=f"User {created.user.name} added.",
        new_password=created.password,
        new_password_user=created.user.name,
    )


@router.post("/admin/users/{name}/edit")
async def admin_edit_user(request: Request, principal: PageAdmin, name: str) -> Response:
    """A user's role, scope and PBXs as the admin page's form gives them (all three)."""
    form = await _form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    try:
        body = _api.UserEdit(
            role=form.get("role") or None,
            scope=form.get("scope", ""),
            pbxs=form.get("pbxs", ""),
        )
        after = _api.edit_user(request, principal, name[:64], body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _admin_page(request, principal, 422, error=problems)
    except HTTPException as exc:
        return _admin_page(request, principal, exc.status_code, error=str(exc.detail))
    return _admin_page(request, principal, message=f"User {after.name} saved.")


@router.post("/admin/users/{name}/remove")
async def admin_remove_user(request: Request, principal: PageAdmin, name: str) -> Response:
    form = await _form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    try:
        _api.remove_user(request, principal, name[:64])
    except HTTPException as exc:
        return _admin_page(request, principal, exc.status_code, error=str(exc.detail))
    return RedirectResponse("/admin?done=user_removed", status_code=303)


@router.post("/admin/tokens")
async def admin_new_token(request: Request, principal: PageAdmin) -> HTMLResponse:
    form = await _form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    try:
        body = _api.TokenIn(user=form.get("user", ""), label=form.get("label", ""))
        created = _api.create_token(request, principal, body)
    except ValidationError:
        return _admin_page(request, principal, 422, error="Choose a user for the token.")
    except HTTPException as exc:
        return _admin_page(request, principal, exc.status_code, error=str(exc.detail))
    return _admin_page(
        request,
        principal,
        message=f"Token {created.token.id} created for {created.token.user}.",
        new_token=created.secret,
    )


@router.post("/admin/tokens/{token_id}/revoke")
async def admin_revoke_token(
    request: Request,
    principal: PageAdmin,
    token_id: Annotated[int, PathParam(ge=1, le=_api.MAX_ID)],
) -> Response:
    form = await _form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    try:
        _api.revoke_token(request, principal, token_id)
    except HTTPException as exc:
        return _admin_page(request, principal, exc.status_code, error=str(exc.detail))
    return RedirectResponse("/admin?done=token_revoked", status_code=303)


AUDIT_PAGE_SIZE = 100
# The audit page's filters as labelled.
AUDIT_LABELS = {
    "actor": "Who",
    "action": "Action",
    "target": "Target contains",
    "since": "From",
    "until": "To",
}


@router.get("/admin/audit")
def audit_page(request: Request, principal: PageAuditor) -> HTMLResponse:
    """The audit log, filtered; a date that cannot be read refuses the query (422), as on
    the search page, instead of showing an empty log."""
    return _audit_page(request, principal)


@router.post("/admin/audit/verify")
async def audit_verify_page(request: Request, principal: PageAuditor) -> HTMLResponse:
    """The audit page's "Verify now": check the chain, audit the check, show what it found
    (with the log as it is now, unfiltered)."""
    form = await _form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    report = _api.run_audit_verification(request, principal)
    return _audit_page(request, principal, verification=report)


def _last_verified(request: Request) -> dict[str, Any] | None:
    """The last verification for the page: its time as a datetime, who, ok, summary."""
    last = last_verification(context(request).index)
    if last is None:
        return None
    try:
        at: datetime | None = datetime.fromisoformat(str(last.get("at")))
    except ValueError:
        at = None
    return {
        "at": at,
        "by": str(last.get("by") or "someone"),
        "ok": last.get("ok") is True,
        "summary": str(last.get("summary") or ""),
    }


def _audit_page(request: Request, principal: Principal, **extra: Any) -> HTMLResponse:
    form = _FormValues.of(request, AUDIT_LABELS)
    page = _page_number(request.query_params.get("page", "1"))
    problems = _date_problems(form.values, AUDIT_LABELS)
    show_own = request.query_params.get("own") == "1"
    entries: list[audit.AuditEntry] = []
    total = 0
    if not problems:
        try:
            where = _api.audit_filter(**{k: v or None for k, v in form.values.items()})
        except HTTPException as exc:  # prevented by the check above; still never a 500
            problems["filters"] = str(exc.detail)
        else:
            if not show_own and not where.actor and not where.action:
                # One `archive` entry per recording would bury what people did.
                where = replace(where, not_actor=audit.SYSTEM_ACTOR)
            index = context(request).index
            entries = index.audit.query(
                where, limit=AUDIT_PAGE_SIZE, offset=(page - 1) * AUDIT_PAGE_SIZE
            )
            total = index.audit.count(where)
    given = [(k, v) for k, v in form.values.items() if v]
    base_query = urlencode(given + ([("own", "1")] if show_own else []))
    return render(
        request,
        "audit.html",
        principal,
        show_own=show_own,
        status_code=422 if problems else 200,
        form=form,
        labels=AUDIT_LABELS,
        problems=problems,
        entries=entries,
        total=total,
        page=page,
        pages=max(1, (total + AUDIT_PAGE_SIZE - 1) // AUDIT_PAGE_SIZE),
        actions=audit.ACTIONS,
        base_query=base_query,
        csv_url="/api/audit.csv" + (f"?{base_query}" if base_query else ""),
        last_verified=_last_verified(request),
        signing_key=_api.active_key(context(request).index),
        **extra,
    )


def login_redirect(next_url: str) -> RedirectResponse:
    return RedirectResponse(f"/login?next={quote(next_url, safe='/')}", status_code=303)
