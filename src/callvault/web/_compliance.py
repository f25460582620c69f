"""Retention, legal holds, deleting and data-subject requests in the web app: the JSON API
under /api and the pages under /admin.

The same operations as `callvault retention`, `hold`, `delete` and `subject`
(`callvault.ops`), each audited in the acting user's name. Admins change; auditors read
the policy and the holds; subject requests are for admins only (they name people's
numbers).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field, ValidationError

from callvault.index.retention import (
    Hold,
    RetentionError,
    RetentionPolicy,
    RetentionRule,
)
from callvault.index.users import User
from callvault.ops import (
    DeleteReport,
    RetentionReport,
    SubjectErasure,
    SubjectFindings,
    delete_now,
    draft_policy,
    erase_subject,
    find_subject,
    parse_policy_text,
    place_hold,
    release_hold,
    run_retention,
    set_policy,
)
from callvault.web import _api, _pages
from callvault.web._context import (
    Principal,
    SearchParams,
    check_csrf,
    context,
    remote_addr,
)
from callvault.web._security import CSRF_FIELD

MAX_IDS = 10_000  # recordings named in one request
CASE_MAX = 128  # holds.case_name
TEXT_MAX = 2000  # a reason, a note

HoldId = Annotated[int, PathParam(ge=1, le=_api.MAX_ID)]
RecordingIdItem = Annotated[int, Field(ge=1, le=_api.MAX_ID)]


# -- who may do what ----------------------------------------------------------------------


def require_reader(user: User) -> None:
    """403 unless the user may see the retention policy and the holds (auditor, admin)."""
    if not user.can_audit:
        raise HTTPException(403, "retention policies and holds are for auditors and admins")


def api_reader(principal: Annotated[Principal, Depends(_api.api_user)]) -> Principal:
    require_reader(principal.user)
    return principal


def page_reader(principal: Annotated[Principal, Depends(_pages.page_user)]) -> Principal:
    require_reader(principal.user)
    return principal


Reader = Annotated[Principal, Depends(api_reader)]
Admin = _api.Admin
PageReader = Annotated[Principal, Depends(page_reader)]
PageAdmin = _pages.PageAdmin


def _one_line(value: str, name: str) -> str:
    """`value` trimmed; 422 naming `name` if it holds control characters."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise HTTPException(422, f"{name}: control characters are not allowed")
    return value.strip()


# -- the shapes ---------------------------------------------------------------------------


class RuleOut(BaseModel):
    name: str
    keep: str = Field(description="e.g. 90d, 18m, 7y or forever")
    pbx: list[str] = Field(default_factory=list)
    direction: list[str] = Field(default_factory=list)
    status: list[str] = Field(default_factory=list)
    numbers: list[str] = Field(default_factory=list)


class PolicyOut(BaseModel):
    """A version of the retention policy (as `callvault retention show --json`)."""

    version: int
    created_at: datetime
    created_by: str
    note: str
    rules: list[RuleOut]


class PolicyIn(BaseModel):
    rules: list[dict[str, Any]] = Field(
        max_length=500,
        description='The rules, first match wins: {"name", "keep", "pbx", "direction", '
        '"status", "numbers"} (as the [[rule]] tables of a policy file)',
    )
    note: str = Field(default="", max_length=TEXT_MAX, description="Why the rules change")


class HoldOut(BaseModel):
    """A legal hold (as `callvault hold list --json`)."""

    id: int
    case: str
    reason: str
    selection: str = Field(description="How its recordings were chosen, in words")
    recordings: int
    created_at: datetime
    created_by: str
    released_at: datetime | None
    released_by: str | None
    release_reason: str | None


class HeldRecordingOut(BaseModel):
    id: int
    name: str
    state: str
    start_at: datetime | None
    call_from: str
    call_to: str


class HoldDetailOut(HoldOut):
    recording_ids: list[int]
    items: list[HeldRecordingOut]


class HoldIn(BaseModel):
    """A hold to place: on these recordings, or on every recording a search matches now
    (both: the two together)."""

    case: str = Field(min_length=1, max_length=CASE_MAX)
    reason: str = Field(min_length=1, max_length=TEXT_MAX)
    recording_ids: list[RecordingIdItem] = Field(default_factory=list, max_length=MAX_IDS)
    number: str | None = Field(default=None, max_length=64, description="Part of a number")
    since: str | None = Field(default=None, max_length=40, description="Calls from this time")
    until: str | None = Field(default=None, max_length=40, description="...and before this")
    pbx: str | None = Field(default=None, max_length=32, description="The PBX, by name")


class ReasonIn(BaseModel):
    reason: str = Field(min_length=1, max_length=TEXT_MAX)


class DeleteIn(BaseModel):
    ids: list[RecordingIdItem] = Field(min_length=1, max_length=MAX_IDS)
    reason: str = Field(min_length=1, max_length=TEXT_MAX)


class SubjectIn(BaseModel):
    number: str = Field(min_length=1, max_length=64, description="The data subject's number")


class EraseIn(SubjectIn):
    reason: str = Field(min_length=1, max_length=TEXT_MAX, description="The request")


# -- what the API and the pages share -----------------------------------------------------


def save_policy(
    request: Request, principal: Principal, rules: list[object], note: str
) -> RetentionPolicy:
    """Make `rules` the policy in force (audited); 422 with the one-line reason if not."""
    ctx = context(request)
    try:
        note = _one_line(note, "note")
        return set_policy(
            ctx.index,
            rules,
            actor=principal.name,
            note=note,
            now=ctx.clock(),
            remote_addr=remote_addr(request),
        )
    except RetentionError as exc:
        raise HTTPException(422, str(exc)) from None


def preview_policy(request: Request, rules: list[object]) -> RetentionReport:
    """A dry run of draft rules (those in force are left alone); 422 for a bad rule."""
    ctx = context(request)
    try:
        draft = draft_policy(ctx.index, rules, now=ctx.clock())
    except RetentionError as exc:
        raise HTTPException(422, str(exc)) from None
    return run_retention(ctx.archive, now=ctx.clock(), dry_run=True, policy=draft)


def hold_selection(request: Request, principal: Principal, body: HoldIn) -> tuple[list[int], str]:
    """The recordings a hold is to keep (its ids, and every recording the search matches
    now) and how they were chosen, in words (as `callvault hold add` says it)."""
    index = context(request).index
    search = {
        name: _one_line(value, name) or None
        for name, value in (
            ("number", body.number or ""),
            ("since", body.since or ""),
            ("until", body.until or ""),
            ("pbx", body.pbx or ""),
        )
    }
    searched = any(value is not None for value in search.values())
    if not body.recording_ids and not searched:
        raise HTTPException(
            422, "choose what to hold: recording_ids, or a search (number, since, until, pbx)"
        )
    chosen = list(body.recording_ids)
    words = [f"ids {', '.join(map(str, body.recording_ids))}"] if body.recording_ids else []
    if searched:
        params = SearchParams(
            since=search["since"], until=search["until"], number=search["number"], pbx=search["pbx"]
        )
        filters = params.filters(principal.user, index)
        chosen += [row.id for row in index.recordings.search(filters, limit=2**62)]
        words += [f"{name} {value}" for name, value in search.items() if value is not None]
    return chosen, "; ".join(words)


def place(request: Request, principal: Principal, body: HoldIn) -> Hold:
    """Place a hold (audited); 422 for no case, no reason, or nothing to hold."""
    ctx = context(request)
    ids, selection = hold_selection(request, principal, body)
    try:
        case = _one_line(body.case, "case")
        reason = _one_line(body.reason, "reason")
        return place_hold(
            ctx.archive,
            case,
            reason,
            ids,
            selection=selection,
            actor=principal.name,
            now=ctx.clock(),
            remote_addr=remote_addr(request),
        )
    except RetentionError as exc:
        raise HTTPException(422, str(exc)) from None


def release(request: Request, principal: Principal, hold_id: int, reason: str) -> Hold:
    """Release a hold in force (audited): 404 if there is none such, 409 if released."""
    ctx = context(request)
    hold = ctx.index.retention.hold(hold_id)
    if hold is None:
        raise HTTPException(404, "no such hold")
    if not hold.active:
        raise HTTPException(409, f"hold {hold_id} ({hold.case}) is released already")
    try:
        return release_hold(
            ctx.archive,
            hold_id,
            reason=_one_line(reason, "reason"),
            actor=principal.name,
            now=ctx.clock(),
            remote_addr=remote_addr(request),
        )
    except RetentionError as exc:
        raise HTTPException(422, str(exc)) from None


def held_items(request: Request, hold_id: int) -> list[HeldRecordingOut]:
    index = context(request).index
    return [
        HeldRecordingOut(
            id=row.id,
            name=row.name,
            state=row.state,
            start_at=row.start_at,
            call_from=row.call_from,
            call_to=row.call_to,
        )
        for row in index.recordings.by_ids(index.retention.held_recordings(hold_id))
    ]


def find(request: Request, principal: Principal, number: str) -> SubjectFindings:
    """Every call and recording of the number (audited with its last digits only)."""
    ctx = context(request)
    try:
        return find_subject(
            ctx.archive,
            _one_line(number, "number"),
            actor=principal.name,
            now=ctx.clock(),
            remote_addr=remote_addr(request),
        )
    except RetentionError as exc:
        raise HTTPException(422, str(exc)) from None


def erase(request: Request, principal: Principal, number: str, reason: str) -> SubjectErasure:
    """Delete the number's recordings but the held ones, blank it in its calls (audited)."""
    ctx = context(request)
    findings = find(request, principal, number)
    if not findings.calls:
        return SubjectErasure(findings.number, [], [], 0)
    try:
        return erase_subject(
            ctx.archive,
            findings,
            reason=_one_line(reason, "reason"),
            actor=principal.name,
            now=ctx.clock(),
            remote_addr=remote_addr(request),
        )
    except RetentionError as exc:
        raise HTTPException(422, str(exc)) from None


def subject_export(request: Request, principal: Principal, number: str) -> Response:
    """A signed ZIP of the number's archived recordings, as the search's export makes it."""
    findings = find(request, principal, number)
    rows = context(request).index.recordings.by_ids(findings.archived_ids)
    return _api.zip_response(request, principal, rows, "subject export")


# -- the JSON API -------------------------------------------------------------------------

router = APIRouter(prefix="/api")


@router.get("/retention", tags=["retention"], response_model=PolicyOut | None)
def retention_policy(request: Request, _reader: Reader) -> Response:
    """The retention policy in force: its version, rules (first match wins), when, by whom
    and why it was set; null if none was ever set (every recording is kept)."""
    policy = context(request).index.retention.current()
    return JSONResponse(None if policy is None else policy.to_json())


@router.get("/retention/history", tags=["retention"], response_model=list[PolicyOut])
def retention_history(request: Request, _reader: Reader) -> Response:
    """Every version of the policy, newest first."""
    return JSONResponse([p.to_json() for p in context(request).index.retention.history()])


@router.put("/retention", tags=["retention"], response_model=PolicyOut, responses={422: {}})
def retention_set(request: Request, principal: Admin, body: PolicyIn) -> Response:
    """Make these rules the policy in force: a new version, audited with its rules (as
    `callvault retention set`). 422 with one line naming the first bad rule."""
    check_csrf(request, principal)
    return JSONResponse(save_policy(request, principal, list(body.rules), body.note).to_json())


@router.post("/retention/run", tags=["retention"], response_model=RetentionReport)
def retention_run(
    request: Request,
    principal: Admin,
    dry_run: Annotated[
        bool, Query(description="List what would be deleted; delete nothing")
    ] = True,
) -> Response:
    """A retention pass with the policy in force, as `callvault retention run --json`:
    with `dry_run` (the default) what it would delete; without, it deletes (audited)."""
    check_csrf(request, principal)
    ctx = context(request)
    report = run_retention(
        ctx.archive,
        now=ctx.clock(),
        actor=principal.name,
        dry_run=dry_run,
        remote_addr=remote_addr(request),
    )
    return JSONResponse({**report.to_json(), "summary": report.summary()})


@router.get("/holds", tags=["holds"], response_model=list[HoldOut])
def holds(
    request: Request,
    _reader: Reader,
    all: Annotated[bool, Query(description="Released holds too")] = False,
) -> Response:
    """The holds in force (and released ones, with `all`), newest first."""
    found = context(request).index.retention.holds(active_only=not all)
    return JSONResponse([hold.to_json() for hold in found])


@router.get("/holds/{hold_id}", tags=["holds"], response_model=HoldDetailOut, responses={404: {}})
def hold(request: Request, _reader: Reader, hold_id: HoldId) -> Response:
    """A hold and the recordings it keeps."""
    found = context(request).index.retention.hold(hold_id)
    if found is None:
        raise HTTPException(404, "no such hold")
    items = held_items(request, hold_id)
    return JSONResponse(
        {
            **found.to_json(),
            "recording_ids": [item.id for item in items],
            "items": [item.model_dump(mode="json") for item in items],
        }
    )


@router.post("/holds", tags=["holds"], status_code=201, response_model=HoldOut)
def new_hold(request: Request, principal: Admin, body: HoldIn) -> Response:
    """Hold recordings for a case: those of `recording_ids` and every one the search
    (`number`, `since`, `until`, `pbx`, as in the search's filters) matches now; audited."""
    check_csrf(request, principal)
    return JSONResponse(place(request, principal, body).to_json(), status_code=201)


@router.post(
    "/holds/{hold_id}/release",
    tags=["holds"],
    response_model=HoldOut,
    responses={404: {}, 409: {}},
)
def release_a_hold(request: Request, principal: Admin, hold_id: HoldId, body: ReasonIn) -> Response:
    """Release a hold, with a reason: its recordings fall under the policy again."""
    check_csrf(request, principal)
    return JSONResponse(release(request, principal, hold_id, body.reason).to_json())


@router.post("/recordings/delete", tags=["retention"], response_model=DeleteReport)
def delete_recordings(request: Request, principal: Admin, body: DeleteIn) -> Response:
    """Delete archived recordings now, outside the policy, with a written reason (as
    `callvault delete`): `deleted`, and `refused` with why (held ones name their holds)."""
    check_csrf(request, principal)
    ctx = context(request)
    try:
        report = delete_now(
            ctx.archive,
            body.ids,
            reason=_one_line(body.reason, "reason"),
            actor=principal.name,
            now=ctx.clock(),
            remote_addr=remote_addr(request),
        )
    except RetentionError as exc:
        raise HTTPException(422, str(exc)) from None
    return JSONResponse(report.to_json())


@router.post("/subjects/find", tags=["subjects"], response_model=SubjectFindings)
def subject_find(request: Request, principal: Admin, body: SubjectIn) -> Response:
    """Every call and recording of a number, with the holds that keep them (audited
    with the number's last four digits)."""
    check_csrf(request, principal)
    return JSONResponse(find(request, principal, body.number).to_json())


@router.post("/subjects/erase", tags=["subjects"], response_model=SubjectErasure)
def subject_erase(request: Request, principal: Admin, body: EraseIn) -> Response:
    """Delete every recording of a number and blank it in its calls, except what a hold
    keeps (`kept`, naming the hold); audited."""
    check_csrf(request, principal)
    return JSONResponse(erase(request, principal, body.number, body.reason).to_json())


@router.post(
    "/subjects/export",
    tags=["subjects"],
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}}},
)
def subject_export_zip(request: Request, principal: Admin, body: SubjectIn) -> Response:
    """A ZIP of a number's archived recordings, signed like `GET /api/export`'s."""
    check_csrf(request, principal)
    return subject_export(request, principal, body.number)


# -- the pages ----------------------------------------------------------------------------

pages = APIRouter(include_in_schema=False)


def rules_toml(policy: RetentionPolicy | None) -> str:
    """The rules as a policy file's [[rule]] tables (JSON strings are TOML strings)."""
    if policy is None:
        return '[[rule]]\nname = "everything"\nkeep = "2y"\n'
    tables = []
    for rule in policy.rules:
        lines = ["[[rule]]"]
        for name, value in rule.to_json().items():
            lines.append(f"{name} = {json.dumps(value, ensure_ascii=False)}")
        tables.append("\n".join(lines) + "\n")
    return "\n".join(tables)


def conditions(rule: RetentionRule) -> str:
    """A rule's conditions in words, as `callvault retention show` prints them."""
    words = [
        f"{name} {', '.join(getattr(rule, name))}"
        for name in ("pbx", "direction", "status", "numbers")
        if getattr(rule, name)
    ]
    return "; ".join(words) or "any call"


def _retention_page(
    request: Request, principal: Principal, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    index = context(request).index
    current = index.retention.current()
    extra.setdefault("rules_text", rules_toml(current))
    extra.setdefault("note", "")
    return _pages.render(
        request,
        "retention.html",
        principal,
        status_code=status_code,
        policy=current,
        history=index.retention.history(),
        conditions=conditions,
        **extra,
    )


@pages.get("/admin/retention")
def retention_page(request: Request, principal: PageReader) -> HTMLResponse:
    saved = request.query_params.get("saved", "")
    message = f"Version {saved} of the policy is in force." if saved.isdigit() else None
    return _retention_page(request, principal, message=message)


@pages.post("/admin/retention")
async def retention_form(request: Request, principal: PageAdmin) -> Response:
    """The editor: "Preview" (a dry run of the rules as written) or "Save as new version"."""
    form = await _pages._form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    text, note = form.get("rules", ""), form.get("note", "")
    kept: dict[str, Any] = {"rules_text": text, "note": note}
    try:
        rules = parse_policy_text(text, where="the rules")
    except RetentionError as exc:
        return _retention_page(request, principal, 422, error=str(exc), **kept)
    try:
        if form.get("action") == "save":
            policy = save_policy(request, principal, rules, note)
            return RedirectResponse(f"/admin/retention?saved={policy.version}", status_code=303)
        preview = preview_policy(request, rules)
    except HTTPException as exc:
        return _retention_page(request, principal, exc.status_code, error=str(exc.detail), **kept)
    return _retention_page(request, principal, preview=preview, **kept)


def _holds_page(
    request: Request, principal: Principal, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    show_all = request.query_params.get("all") in ("1", "true")
    index = context(request).index
    extra.setdefault("values", {})
    return _pages.render(
        request,
        "holds.html",
        principal,
        status_code=status_code,
        holds=index.retention.holds(active_only=not show_all),
        show_all=show_all,
        pbxs=sorted(record.name for record in index.pbxs.list()),
        **extra,
    )


@pages.get("/admin/holds")
def holds_page(request: Request, principal: PageReader) -> HTMLResponse:
    return _holds_page(request, principal)


def _ids(text: str) -> list[int]:
    """Recording ids as typed: numbers separated by spaces or commas; 422 otherwise."""
    words = text.replace(",", " ").split()
    if not all(word.isascii() and word.isdigit() and len(word) <= 18 for word in words):
        raise HTTPException(422, "Recording ids: give numbers, separated by spaces or commas")
    return [int(word) for word in words if int(word) > 0]


@pages.post("/admin/holds")
async def holds_form(request: Request, principal: PageAdmin) -> Response:
    """Place a hold by ids or by the search fields; then its page."""
    form = await _pages._form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    names = ("case", "reason", "ids", "number", "since", "until", "pbx")
    values = {name: form.get(name, "") for name in names}
    try:
        body = HoldIn(
            case=values["case"].strip(),
            reason=values["reason"].strip(),
            recording_ids=_ids(values["ids"])[:MAX_IDS],
            **{name: values[name].strip() or None for name in ("number", "since", "until", "pbx")},
        )
        placed = place(request, principal, body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _holds_page(request, principal, 422, error=problems, values=values)
    except HTTPException as exc:
        return _holds_page(
            request, principal, exc.status_code, error=str(exc.detail), values=values
        )
    return RedirectResponse(f"/admin/holds/{placed.id}?placed=1", status_code=303)


def _hold_page(
    request: Request, principal: Principal, hold_id: int, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    found = context(request).index.retention.hold(hold_id)
    if found is None:
        raise HTTPException(404, "no such hold")
    return _pages.render(
        request,
        "hold.html",
        principal,
        status_code=status_code,
        hold=found,
        items=held_items(request, hold_id),
        **extra,
    )


@pages.get("/admin/holds/{hold_id}")
def hold_page(request: Request, principal: PageReader, hold_id: HoldId) -> HTMLResponse:
    done = request.query_params
    message = (
        "The hold is placed."
        if done.get("placed")
        else "The hold is released."
        if done.get("released")
        else None
    )
    return _hold_page(request, principal, hold_id, message=message)


@pages.post("/admin/holds/{hold_id}/release")
async def hold_release_form(request: Request, principal: PageAdmin, hold_id: HoldId) -> Response:
    form = await _pages._form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    reason = form.get("reason", "").strip()
    try:
        if not reason:
            raise HTTPException(422, "releasing a hold needs a reason: say why it ends")
        release(request, principal, hold_id, reason[:TEXT_MAX])
    except HTTPException as exc:
        if exc.status_code == 404:
            raise
        return _hold_page(request, principal, hold_id, exc.status_code, error=str(exc.detail))
    return RedirectResponse(f"/admin/holds/{hold_id}?released=1", status_code=303)


def _subject_page(
    request: Request, principal: Principal, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    extra.setdefault("number", "")
    extra.setdefault("reason", "")
    return _pages.render(request, "subject.html", principal, status_code=status_code, **extra)


@pages.get("/admin/subjects")
def subject_page(request: Request, principal: PageAdmin) -> HTMLResponse:
    return _subject_page(request, principal)


@pages.post("/admin/subjects")
async def subject_form(request: Request, principal: PageAdmin) -> Response:
    """Find, Export, Erase (which first shows what it would erase), and Confirm."""
    form = await _pages._form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    number, reason = form.get("number", "").strip()[:64], form.get("reason", "").strip()
    action = form.get("action", "find")
    kept: dict[str, Any] = {"number": number, "reason": reason}
    try:
        if not number:
            raise HTTPException(422, "Number: give the data subject's phone number")
        if action == "export":
            return subject_export(request, principal, number)
        if action == "confirm":
            if not reason:
                raise HTTPException(422, "Reason: say which request this erasure answers")
            erasure = erase(request, principal, number, reason[:TEXT_MAX])
            return _subject_page(request, principal, erasure=erasure, **kept)
        findings = find(request, principal, number)
        if action == "erase" and not reason:
            raise HTTPException(422, "Reason: say which request this erasure answers")
    except HTTPException as exc:
        return _subject_page(request, principal, exc.status_code, error=str(exc.detail), **kept)
    confirm = action == "erase" and bool(findings.calls)
    return _subject_page(request, principal, findings=findings, confirm=confirm, **kept)
