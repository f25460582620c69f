"""What every route needs: the app's context, who is asking, and the shared checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from fastapi import HTTPException, Request

from callvault.archive import ServiceProbe
from callvault.index import Index, Position, RecordingRow, SearchFilters, audit
from callvault.index.schema import RECORDING_STATES
from callvault.index.users import User
from callvault.keys import Keyring
from callvault.ops import MAX_OFFSET, Archive, RecordingPage, pbx_id_of, search_recordings
from callvault.storage import Storage
from callvault.times import TimeFormatError, parse_moment
from callvault.web._security import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    LoginLimiter,
    Session,
    SessionSigner,
)

Clock = Callable[[], datetime]
# Several range requests from one player make one play in the audit log.
PLAY_DEDUPE_WINDOW = timedelta(seconds=30)


@dataclass
class WebContext:
    index: Index
    storage: Storage
    signer: SessionSigner
    limiter: LoginLimiter
    clock: Clock
    secure_cookies: bool
    # What a process that archives (serve) tells about itself; None for `callvault web`.
    service: ServiceProbe | None = None
    # The master keys, to seal the passwords of PBXs registered here; None: not loaded.
    keyring: Keyring | None = field(default=None, repr=False)
    archive: Archive = field(init=False)

    def __post_init__(self) -> None:
        # The operations shared with the command line (callvault.ops) run on this.
        self.archive = Archive(self.index, self.storage, keyring=self.keyring)
        # Sessions live in this index: issued for its users, logged out in it; failed
        # logins are counted in its audit log.
        self.signer.attach(self.index)
        self.limiter.attach(self.index)

    def __repr__(self) -> str:
        return "WebContext(...)"

    def metrics_exposition(self) -> tuple[bytes, str]:
        """The text of a Prometheus scrape and its content type: the index's figures, and
        the archiver's when this app runs inside `serve`."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from callvault.ops import metrics_registry

        more = [self.service.registry] if self.service is not None else []
        registry = metrics_registry(self.index, *more)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def first_play(self, actor: str, recording_id: int) -> bool:
        """True unless this user started playing this recording moments ago (as the audit
        log says: on whichever node that play was served)."""
        since = self.clock() - PLAY_DEDUPE_WINDOW
        return not self.index.audit.recent(
            audit.PLAY, since=since, actor=actor, detail=f"id={recording_id}", limit=1
        )


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a user, by session cookie (with its CSRF token) or by API token."""

    user: User
    session: Session | None
    csrf: str = field(repr=False)

    @property
    def name(self) -> str:
        return self.user.name


def context(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.callvault
    return ctx


def remote_addr(request: Request) -> str:
    return request.client.host if request.client else ""


def authenticate(request: Request) -> Principal | None:
    """The user behind a request's Bearer token or session cookie, or None."""
    ctx = context(request)
    authorization = request.headers.get("authorization")
    if authorization is not None:
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return None
        user = ctx.index.tokens.user_for(secret.strip(), now=ctx.clock())
        return None if user is None else Principal(user, None, "")
    session = ctx.signer.read(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    user = ctx.signer.live_user(session)
    if user is None:
        return None
    return Principal(user, session, ctx.signer.csrf_token(session))


def home_of(user: User) -> str:
    """Where a user starts: the search, or for an auditor who is no listener the audit log."""
    return "/search" if user.can_listen or not user.can_audit else "/admin/audit"


def require_listener(user: User) -> None:
    """403 unless the user may search and hear recordings (a listener or an admin): every
    way to a recording (search, export, a recording, its audio) goes through this."""
    if not user.can_listen:
        raise HTTPException(
            403,
            f"your role ({user.role}) may not search, play or download recordings: "
            "that needs the listener role",
        )


def require_auditor(user: User) -> None:
    """403 unless the user may read the audit log and verify it (an auditor or an admin)."""
    if not user.can_audit:
        raise HTTPException(403, "the audit log is for auditors and admins")


def check_csrf(request: Request, principal: Principal, form_token: str | None = None) -> None:
    """Refuse a state-changing request made with a session cookie but no valid CSRF token."""
    if principal.session is None:
        return  # API tokens are not sent by browsers on their own: no CSRF to fear
    token = form_token if form_token is not None else request.headers.get(CSRF_HEADER)
    if not context(request).signer.check_csrf(principal.session, token):
        where = f"form field {CSRF_FIELD!r}" if form_token is not None else "header X-CSRF-Token"
        raise HTTPException(403, f"missing or wrong CSRF token ({where})")


def record_audit(
    request: Request, actor: str, action: str, target: str = "", detail: str = ""
) -> None:
    ctx = context(request)
    ctx.index.audit.record(actor, action, target, detail, remote_addr(request), at=ctx.clock())


def parse_when(text: str | None, *, end: bool, field_name: str) -> datetime | None:
    """A filter time as callvault.times reads it (a date as an end means through that
    day); without an offset it is UTC. HTTPException 422 naming `field_name` otherwise."""
    if text is None or not text.strip():
        return None
    try:
        return parse_moment(text, UTC, end=end, name=field_name).astimezone(UTC)
    except TimeFormatError as exc:
        raise HTTPException(422, str(exc)) from None


@dataclass(frozen=True, slots=True)
class SearchParams:
    """The search filters as given in a query string (API and search page alike)."""

    since: str | None = None
    until: str | None = None
    number: str | None = None
    extension: str | None = None
    direction: str | None = None
    status: str | None = None
    min_talk_s: int | None = None
    state: str | None = None
    pbx: str | None = None

    def filters(self, user: User, index: Index) -> SearchFilters:
        """The filters of a search within the user's scope; 403 for a user who may not
        search (`require_listener`), 422 for a value that cannot be read."""
        require_listener(user)
        if self.state and self.state not in RECORDING_STATES:
            raise HTTPException(422, f"state: use one of {', '.join(RECORDING_STATES)}")
        pbx_id = None
        name = (self.pbx or "").strip()
        if name:
            from callvault.index.pbxs import NoSuchPbx

            if user.pbxs and name not in user.pbxs:
                # As for a name not registered, and without the names: a user kept to some
                # PBXs learns nothing of the others, not even whether one exists.
                raise HTTPException(422, f"pbx: none of yours is named {name[:40]!r}")
            try:
                pbx_id = pbx_id_of(index, name)
            except NoSuchPbx as exc:
                detail = str(exc) if not user.pbxs else f"none of yours is named {name[:40]!r}"
                raise HTTPException(422, f"pbx: {detail}") from None
        return SearchFilters(
            since=parse_when(self.since, end=False, field_name="since"),
            until=parse_when(self.until, end=True, field_name="until"),
            number=(self.number or "").strip() or None,
            extension=(self.extension or "").strip() or None,
            direction=(self.direction or "").strip() or None,
            status=(self.status or "").strip() or None,
            min_talk_s=self.min_talk_s,
            state=self.state or None,
            scope=user.scope_ranges,
            pbx_id=pbx_id,
            pbx_scope=pbx_scope_of(user, index),
        )

    def query_items(self) -> list[tuple[str, str]]:
        items: list[tuple[str, str]] = []
        for name in (
            "since",
            "until",
            "number",
            "extension",
            "direction",
            "status",
            "min_talk_s",
            "state",
            "pbx",
        ):
            value = getattr(self, name)
            if value is not None and str(value) != "":
                items.append((name, str(value)))
        return items


def search_page_of(
    index: Index,
    filters: SearchFilters,
    limit: int,
    after: str | None,
    offset: int,
    exact_total: bool = False,
) -> RecordingPage:
    """A page of a search (API and search page alike); HTTPException 422 for a cursor that
    is not one, or an offset past the first pages."""
    position = None
    if after:
        try:
            position = Position.parse(after)
        except ValueError:
            raise HTTPException(
                422, "after: not a cursor of a search: give the `next` of the previous page"
            ) from None
    if offset > MAX_OFFSET:
        raise HTTPException(
            422,
            f"offset: at most {MAX_OFFSET}; page on with after=<the `next` of the previous "
            "page>, which is as quick at any depth",
        )
    return search_recordings(
        index, filters, limit=limit, offset=offset, after=position, exact_total=exact_total
    )


def pbx_scope_of(user: User, index: Index) -> list[int] | None:
    """The registry ids of the PBXs `user` may see; None for every PBX (names the registry
    no longer has count for nothing)."""
    if not user.pbxs:
        return None
    wanted = set(user.pbxs)
    return sorted(record.id for record in index.pbxs.list() if record.name in wanted)


def visible_recording(request: Request, principal: Principal, recording_id: int) -> RecordingRow:
    """The recording if it exists and is within the user's scope (extensions and PBXs);
    else 404 (same answer for both, so a listener cannot tell an out-of-scope recording
    from a missing one). 403 for a user who may not hear recordings at all."""
    require_listener(principal.user)
    index = context(request).index
    row = index.recordings.by_id(recording_id)
    if row is None or not principal.user.may_see(row.call_from, row.call_to):
        raise HTTPException(404, "no such recording")
    allowed = pbx_scope_of(principal.user, index)
    if allowed is not None and row.pbx_id not in allowed:
        raise HTTPException(404, "no such recording")
    return row
