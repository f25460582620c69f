"""The registry of PBXs in the JSON API and on the page /admin/pbxs, for admins: list,
add, change, remove and test.

The same operations as `callvault pbx ...` (`callvault.ops`). Setting a password needs the
deployment's master key in this process (`--master-key-file` or CALLVAULT_MASTER_KEY of
`serve` or `web`): without it the answer is 409 saying so; so does setting a P-Series
PBX's `webhook_secret`. No answer ever carries a password or a webhook secret, sealed or
not, nor the secret path of the PBX's reports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Annotated, Any, Literal, get_args
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from callvault.index.pbxs import (
    DEFAULT_MAX_DOWNLOADS,
    MAX_DOWNLOADS_LIMIT,
    NoSuchPbx,
    PbxConfig,
    PbxInUse,
    PbxRecord,
    PbxRegistryError,
)
from callvault.keys import Keyring, MasterKeyError
from callvault.ops import (
    OPENAPI,
    PbxTest,
    PbxView,
    add_pbx,
    edit_pbx,
    pbx_view,
    remove_pbx,
    test_pbx,
)
from callvault.web import _pages
from callvault.web._api import Admin
from callvault.web._context import Principal, check_csrf, context, remote_addr
from callvault.web._security import CSRF_FIELD

router = APIRouter(prefix="/api", tags=["pbxs"])


PbxName = Annotated[str, Path(min_length=1, max_length=32)]


class PbxIn(BaseModel):
    """A PBX to register: the fields of `callvault pbx add`."""

    model_config = ConfigDict(extra="allow")  # checked by `_refuse_unknown`

    name: str = Field(min_length=1, max_length=32, description="Short slug, e.g. paris")
    kind: Literal["s-series", "cloud", "p-series"] = "s-series"
    url: str = Field(min_length=1, max_length=255, description="https://HOST:PORT")
    username: str = Field(
        min_length=1, max_length=64, description="The API user; P-Series: the Client ID"
    )
    password: str = Field(
        min_length=1, max_length=256, repr=False, description="P-Series: the Client Secret"
    )
    api_version: str = "v1.1.0"
    pin_sha256: str | None = None
    ca_file: str | None = Field(default=None, description="A CA file on the server")
    insecure: bool = False
    tls_min_version: str = "1.2"
    timezone: str | None = None
    max_downloads: int = Field(default=DEFAULT_MAX_DOWNLOADS, ge=1, le=MAX_DOWNLOADS_LIMIT)
    events_allow: list[str] = Field(default_factory=list)
    report_url: str | None = Field(
        default=None, max_length=255, description="HOST:PORT its reports go to"
    )
    tcp_report_port: int | None = Field(
        default=None, ge=1, le=65535, description="S-Series v2 reporting over TCP: its port"
    )
    webhook_secret: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        repr=False,
        description="P-Series: the Secret of its webhook (Webhook Event Push)",
    )


class PbxPatch(BaseModel):
    """What to change; fields left out stay. Setting one of pin_sha256, ca_file or
    insecure replaces how the certificate is trusted; null for all three: the system's
    CAs. `webhook_secret` (P-Series) sets its webhook secret; null forgets it.

    The object GET answered, with a field changed, may be sent back whole: a field as GET
    shows it is left as it is (`api_version` "openapi" of a P-Series PBX, `webhook_secret`
    true or false, `pin_sha256` and `ca_file` of an insecure PBX), and the fields only GET
    has (`tls`, `serial`, `last_test`, ...) are ignored."""

    model_config = ConfigDict(extra="allow")  # checked by `_refuse_unknown`

    kind: Literal["s-series", "cloud", "p-series"] | None = None
    url: str | None = Field(default=None, max_length=255)
    username: str | None = Field(default=None, max_length=64)
    password: str | None = Field(default=None, min_length=1, max_length=256, repr=False)
    api_version: str | None = None
    pin_sha256: str | None = None
    ca_file: str | None = None
    insecure: bool | None = None
    tls_min_version: str | None = None
    timezone: str | None = None
    max_downloads: int | None = Field(default=None, ge=1, le=MAX_DOWNLOADS_LIMIT)
    events_allow: list[str] | None = None
    report_url: str | None = Field(default=None, max_length=255)
    tcp_report_port: int | None = Field(default=None, ge=1, le=65535)
    # A string sets it, null forgets it; true or false as GET shows it (whether one is
    # kept) leaves it as it is.
    webhook_secret: Annotated[str, Field(min_length=1, max_length=256)] | bool | None = Field(
        default=None, repr=False
    )


_TRUST = ("pin_sha256", "ca_file", "insecure")


def _keyring(request: Request, need: str = "seal PBX passwords with") -> Keyring:
    """The web app's master keys; 409 in one line saying what they are needed for
    (`need`) and how to give them, when it was started without."""
    keyring = context(request).keyring
    if keyring is None:
        raise HTTPException(
            409,
            f"this web app has no master key to {need}: start it with --master-key-file "
            "(or CALLVAULT_MASTER_KEY_FILE, or the key itself in CALLVAULT_MASTER_KEY), or "
            "use `callvault pbx`",
        )
    return keyring


# The registry's messages name `callvault pbx add`'s flags; the API's fields are these.
_FIELD_OF_FLAG = {
    "client-id": "username",
    "password-env": "password",
    "secret-env": "password",
    "webhook-secret-env": "webhook_secret",
}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")


def api_words(message: str) -> str:
    """`message` with the CLI's flags (``--pin-sha256``) named as the API's fields
    (``pin_sha256``), except inside a quoted command (`callvault pbx edit ...`)."""
    parts = message.split("`")
    for at in range(0, len(parts), 2):  # outside backquotes
        parts[at] = _FLAG.sub(lambda m: _FIELD_OF_FLAG.get(m[1], m[1].replace("-", "_")), parts[at])
    return "`".join(parts)


def _unprocessable(exc: PbxRegistryError) -> HTTPException:
    return HTTPException(422, api_words(str(exc)))


# What a body may hold beside a model's own fields: what GET shows of a PBX (a body copied
# from it), ignored.
_SHOWN = frozenset(field.name for field in dataclasses.fields(PbxView))


def _refuse_unknown(body: BaseModel, name: str | None = None) -> None:
    """422 in one line for a field the API does not know (a typo would otherwise change
    nothing, silently), or for a `name` other than the PBX's own (PATCH)."""
    extra = body.model_extra or {}
    unknown = sorted(set(extra) - _SHOWN)
    if unknown:
        known = sorted(set(type(body).model_fields))
        raise HTTPException(
            422, f"unknown field {', '.join(unknown)[:80]}: the fields are {', '.join(known)}"
        )
    if name is not None and "name" in extra and extra["name"] != name:
        raise HTTPException(422, f"name: a PBX keeps its name ({name}); it cannot be renamed")


@router.get("/pbxs")
def list_pbxs(request: Request, _admin: Admin) -> list[PbxView]:
    """The registered PBXs, by name."""
    return [pbx_view(record) for record in context(request).index.pbxs.list()]


@router.get("/pbxs/{name}", responses={404: {}})
def get_pbx(request: Request, _admin: Admin, name: PbxName) -> PbxView:
    try:
        return pbx_view(context(request).index.pbxs.require(name))
    except NoSuchPbx as exc:
        raise HTTPException(404, str(exc)) from None


@router.post("/pbxs", status_code=201, responses={409: {}, 422: {}})
def create_pbx(request: Request, principal: Admin, body: PbxIn) -> PbxView:
    """Register a PBX; its password is sealed with the master key and never returned."""
    check_csrf(request, principal)
    return register(request, principal, body)


def register(request: Request, principal: Principal, body: PbxIn) -> PbxView:
    """Register a PBX (the API's POST and the page's form; the caller checked CSRF)."""
    ctx = context(request)
    _refuse_unknown(body)
    keyring = _keyring(request)
    if ctx.index.pbxs.get(body.name) is not None:
        raise HTTPException(409, f"a PBX named {body.name!r} is registered already")
    fields = body.model_dump(
        exclude={"name", "password", "webhook_secret", *(body.model_extra or ())}
    )
    # A P-Series PBX's version, as GET shows it ("openapi"), is the default it is kept as.
    fields["api_version"] = _api_version_as_shown(
        body.kind, body.api_version, PbxIn.model_fields["api_version"].default
    )
    config = PbxConfig(**{**fields, "events_allow": tuple(body.events_allow)})
    try:
        record = add_pbx(
            ctx.index,
            keyring,
            body.name,
            config,
            body.password,
            webhook_secret=body.webhook_secret,
            actor=principal.name,
            remote_addr=remote_addr(request),
            now=ctx.clock(),
        )
    except PbxRegistryError as exc:
        raise _unprocessable(exc) from None
    return pbx_view(record)


def _as_shown(given: dict[str, Any], current: PbxRecord) -> None:
    """Drop from `given` what a PATCH of the object GET answered carries unchanged, in
    GET's terms: `webhook_secret` true or false (whether one is kept; 422 if it says the
    other), and `pin_sha256` and `ca_file` as they are, without `insecure` (GET shows an
    insecure PBX's as null: they do not make it trust the system's CAs)."""
    shown = given.get("webhook_secret")
    if isinstance(shown, bool):
        if shown != current.has_webhook_secret:
            raise HTTPException(
                422,
                "webhook_secret: true or false only as GET shows it (whether one is kept): "
                "give the webhook's Secret to set it, or null to forget it",
            )
        del given["webhook_secret"]
    trust = [field for field in _TRUST if field in given]
    if (
        trust
        and "insecure" not in trust
        and all(given[field] == getattr(current.config, field) for field in trust)
    ):
        for field in trust:
            del given[field]


def _check_api_version(changes: dict[str, Any], current: PbxConfig) -> None:
    """Take `changes["api_version"]` as GET shows it, for the PBX's kind after the change
    (see `_api_version_as_shown`); dropped from `changes` when it changes nothing."""
    kind = str(changes.get("kind") or current.kind)
    version = _api_version_as_shown(kind, str(changes["api_version"]), current.api_version)
    if kind == "p-series":
        del changes["api_version"]  # the one kept
    else:
        changes["api_version"] = version


def _api_version_as_shown(kind: str, version: str, kept: str) -> str:
    """The API version to keep for a PBX of `kind` given `version` as GET shows it: for a
    P-Series PBX "openapi" (or the version `kept` in its entry, which GET does not show)
    means `kept`; 422 in one line for "openapi" of a PBX of the S-Series API, or another
    S-Series version of a P-Series PBX (the version field means nothing there)."""
    version = version.strip()
    if kind == "p-series":
        if version.lower() == OPENAPI or version == kept:
            return kept
        raise HTTPException(
            422,
            f"api_version: a P-Series PBX speaks the OpenAPI, not an S-Series API version "
            f"such as {version[:20]!r}: give {OPENAPI!r} (as GET shows it) or leave "
            "api_version out",
        )
    if version.lower() == OPENAPI:
        from callvault.pbx import ApiVersion

        versions = ", ".join(v.value for v in ApiVersion)
        raise HTTPException(
            422,
            f"api_version: {OPENAPI!r} is the P-Series API; this PBX ({kind}) speaks the "
            f"S-Series API: give its version ({versions}), or leave api_version out to "
            "keep it",
        )
    return version


@router.patch("/pbxs/{name}", responses={404: {}, 409: {}, 422: {}})
def change_pbx(request: Request, principal: Admin, name: PbxName, body: PbxPatch) -> PbxView:
    """Change a PBX's settings or password; the result is checked as a whole."""
    check_csrf(request, principal)
    return change(request, principal, name, body)


def change(request: Request, principal: Principal, name: str, body: PbxPatch) -> PbxView:
    """Change what `body` sets of a PBX (the API's PATCH and the page's form; the caller
    checked CSRF)."""
    ctx = context(request)
    _refuse_unknown(body, name)
    given = body.model_dump(exclude_unset=True, exclude=set(body.model_extra or ()))
    before = ctx.index.pbxs.get(name)
    if before is not None:  # else edit_pbx answers 404
        _as_shown(given, before)
    password = given.pop("password", None)
    drop_webhook = "webhook_secret" in given and given["webhook_secret"] is None
    webhook_secret = given.pop("webhook_secret", None)
    changes: dict[str, Any] = dict(given)
    if any(field in given for field in _TRUST):
        changes = {"pin_sha256": None, "ca_file": None, "insecure": False, **changes}
        if changes["insecure"] is None:
            changes["insecure"] = False
    if "events_allow" in changes:
        changes["events_allow"] = tuple(changes["events_allow"] or ())
    for field in ("kind", "url", "username", "api_version", "tls_min_version", "max_downloads"):
        if field in changes and changes[field] is None:
            raise HTTPException(422, f"{field} cannot be null")
    if "api_version" in changes and before is not None:
        _check_api_version(changes, before.config)
    sealing = password is not None or webhook_secret is not None
    keyring = _keyring(request) if sealing else None
    try:
        edited = edit_pbx(
            ctx.index,
            name,
            changes,
            password=password,
            webhook_secret=webhook_secret,
            drop_webhook_secret=drop_webhook,
            keyring=keyring,
            actor=principal.name,
            remote_addr=remote_addr(request),
            now=ctx.clock(),
        )
    except NoSuchPbx as exc:
        raise HTTPException(404, str(exc)) from None
    except PbxRegistryError as exc:
        raise _unprocessable(exc) from None
    return pbx_view(edited.record)


@router.delete("/pbxs/{name}", status_code=204, responses={404: {}, 409: {}})
def delete_pbx(request: Request, principal: Admin, name: PbxName) -> Response:
    """Take a PBX off the registry; 409 while calls of it are archived (they are known by
    it)."""
    check_csrf(request, principal)
    unregister(request, principal, name)
    return Response(status_code=204)


def unregister(request: Request, principal: Principal, name: str) -> None:
    """Take a PBX off the registry (the API's DELETE and the page's form; the caller
    checked CSRF): 404 if there is none, 409 while calls of it are archived."""
    try:
        remove_pbx(
            context(request).index, name, actor=principal.name, remote_addr=remote_addr(request)
        )
    except NoSuchPbx as exc:
        raise HTTPException(404, str(exc)) from None
    except PbxInUse as exc:
        raise HTTPException(409, str(exc)) from None


@router.post("/pbxs/{name}/test", responses={404: {}, 409: {}})
def test_registered_pbx(request: Request, principal: Admin, name: PbxName) -> PbxTest:
    """Log in to the PBX once and say what it found (`ok` false with the PBX's error when
    the login failed). 409 when the same password was refused less than ten minutes ago:
    testing again could lock this host out of the PBX."""
    check_csrf(request, principal)
    return run_test(request, name)


def run_test(request: Request, name: str) -> PbxTest:
    """Log in to the registered PBX `name` once (the API and the page; the caller checked
    CSRF); not on the event loop's thread: it runs its own loop."""
    ctx = context(request)
    keyring = _keyring(request, "open the PBX's password with")
    try:
        record = ctx.index.pbxs.require(name)
        return asyncio.run(test_pbx(ctx.index, record, keyring, now=ctx.clock()))
    except NoSuchPbx as exc:
        raise HTTPException(404, str(exc)) from None
    except (PbxRegistryError, MasterKeyError) as exc:
        raise HTTPException(409, str(exc)) from None


# -- the page: /admin/pbxs ------------------------------------------------------------------

pages = APIRouter(include_in_schema=False)

KINDS: tuple[str, ...] = get_args(PbxIn.model_fields["kind"].annotation)
# The page's fields as labelled: a refused value is named this way.
PBX_LABELS = {
    "name": "Name",
    "kind": "Kind",
    "url": "URL",
    "username": "User (P-Series: Client ID)",
    "password": "Password (P-Series: Client Secret)",
    "webhook_secret": "Webhook secret (P-Series)",
    "api_version": "API version (S-Series, Cloud)",
    "pin_sha256": "Certificate pin (SHA-256)",
    "timezone": "Time zone",
    "max_downloads": "Downloads at once",
}
# Typed in the page, kept in it when refused (never the password nor the webhook secret).
_KEPT = ("name", "kind", "url", "username", "api_version", "pin_sha256", "timezone")
# The fields a change on the page may set, besides the password and the webhook secret.
_CHANGEABLE = ("kind", "url", "username", "api_version", "timezone", "max_downloads")


def _refusal(exc: ValidationError) -> str:
    """Why the form was refused, naming each field as the page labels it."""
    reasons = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        reasons.append(f"{PBX_LABELS.get(field, field)}: {error['msg']}")
    return "; ".join(reasons)


def _pbxs_page(
    request: Request, principal: Principal, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    ctx = context(request)
    extra.setdefault("values", {})
    extra.setdefault("tested", None)
    return _pages.render(
        request,
        "pbxs.html",
        principal,
        status_code=status_code,
        pbxs=[pbx_view(record) for record in ctx.index.pbxs.list()],
        kinds=KINDS,
        labels=PBX_LABELS,
        sealing=ctx.keyring is not None,
        **extra,
    )


@pages.get("/admin/pbxs")
def pbxs_page(request: Request, principal: _pages.PageAdmin) -> HTMLResponse:
    """The registry of PBXs: each one's kind, address, user or Client ID and TLS; forms to
    register one, change it, test its login and take it off the registry."""
    query = request.query_params
    index = context(request).index
    message = None
    for key, done in (("added", "registered"), ("saved", "saved")):
        name = query.get(key, "")
        record = index.pbxs.get(name) if name else None
        if record is not None:
            message = f"PBX {record.name} ({record.config.kind}) {done}."
    if query.get("done") == "removed":
        message = "PBX taken off the registry."
    return _pbxs_page(request, principal, message=message)


@pages.post("/admin/pbxs")
async def pbxs_add(request: Request, principal: _pages.PageAdmin) -> Response:
    """Register a PBX from the page's form, as POST /api/pbxs does."""
    form = await _pages._form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    values = {name: form.get(name, "").strip() for name in _KEPT}
    try:
        body = PbxIn(
            name=values["name"],
            kind=values["kind"] or "s-series",
            url=values["url"],
            username=values["username"],
            password=form.get("password", ""),
            api_version=values["api_version"] or "v1.1.0",
            pin_sha256=values["pin_sha256"] or None,
            timezone=values["timezone"] or None,
            max_downloads=form.get("max_downloads", "").strip() or DEFAULT_MAX_DOWNLOADS,
            webhook_secret=form.get("webhook_secret", "").strip() or None,
        )
        view = register(request, principal, body)
    except ValidationError as exc:
        return _pbxs_page(request, principal, 422, error=_refusal(exc), values=values)
    except HTTPException as exc:
        return _pbxs_page(request, principal, exc.status_code, error=str(exc.detail), values=values)
    return RedirectResponse(f"/admin/pbxs?added={quote(view.name)}", status_code=303)


@pages.post("/admin/pbxs/{name}/edit")
async def pbxs_edit(request: Request, principal: _pages.PageAdmin, name: PbxName) -> Response:
    """Change a PBX from its form, as PATCH /api/pbxs/{name} does: only what differs from
    what is registered; an empty password or webhook secret leaves it as it is."""
    form = await _pages._form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    record = context(request).index.pbxs.get(name)
    if record is None:
        return _pbxs_page(request, principal, 404, error=f"no PBX named {name!r}")
    current = pbx_view(record).to_json()
    given: dict[str, Any] = {}
    for field in _CHANGEABLE:
        value = form.get(field, "").strip()
        if field == "timezone" and value == (current["timezone"] or ""):
            continue
        if value != str(current[field]):
            given[field] = value or None
    if form.get("password"):
        given["password"] = form["password"]
    if form.get("webhook_secret", "").strip():
        given["webhook_secret"] = form["webhook_secret"].strip()
    elif form.get("drop_webhook_secret") and record.has_webhook_secret:
        given["webhook_secret"] = None
    if not given:
        return _pbxs_page(request, principal, message=f"Nothing to change in PBX {name}.")
    try:
        view = change(request, principal, name, PbxPatch(**given))
    except ValidationError as exc:
        return _pbxs_page(request, principal, 422, error=_refusal(exc))
    except HTTPException as exc:
        return _pbxs_page(request, principal, exc.status_code, error=str(exc.detail))
    return RedirectResponse(f"/admin/pbxs?saved={quote(view.name)}", status_code=303)


@pages.post("/admin/pbxs/{name}/test")
async def pbxs_test(request: Request, principal: _pages.PageAdmin, name: PbxName) -> Response:
    """Log in to the PBX once, as POST /api/pbxs/{name}/test does, and say what it found."""
    form = await _pages._form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    try:
        result = await asyncio.to_thread(run_test, request, name)
    except HTTPException as exc:
        return _pbxs_page(request, principal, exc.status_code, error=str(exc.detail))
    return _pbxs_page(request, principal, tested=(name, result))


@pages.post("/admin/pbxs/{name}/remove")
async def pbxs_remove(request: Request, principal: _pages.PageAdmin, name: PbxName) -> Response:
    """Take a PBX off the registry, as DELETE /api/pbxs/{name} does."""
    form = await _pages._form(request)
    check_csrf(request, principal, form.get(CSRF_FIELD, ""))
    try:
        unregister(request, principal, name)
    except HTTPException as exc:
        return _pbxs_page(request, principal, exc.status_code, error=str(exc.detail))
    return RedirectResponse("/admin/pbxs?done=removed", status_code=303)
