"""The registry of PBXs in the JSON API, over real sockets: admins only, passwords sealed
with the master key and never returned, every change audited, a login test against the
real simulator that will not retry a refused password."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from callvault.keys import Keyring, MasterKey
from callvault.simulator import Simulator
from support.index_data import register_pbx
from support.pbx_sim import SIM_PASSWORD, outcomes
from support.web import ADMIN, LISTENER_2000, LiveWeb, audit_entries, live_web

KEYRING = Keyring((MasterKey.generate(),), "tests")


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive", keyring=KEYRING) as live:
        yield live


def pbx_body(sim: Simulator, **more: object) -> dict[str, object]:
    return {
        "name": "paris",
        "url": sim.url,
        "username": sim.username,
        "password": SIM_PASSWORD,
        "api_version": "v2.0.0",
        "pin_sha256": sim.cert_sha256,
        **more,
    }


def test_without_a_master_key_a_password_cannot_be_set(tmp_path: Path, sim: Simulator) -> None:
    with live_web(tmp_path / "archive") as web:
        admin, _ = web.bearer(ADMIN[0])
        answer = admin.post("/api/pbxs", json=pbx_body(sim))
        assert answer.status_code == 409 and "no master key" in answer.json()["detail"]
        assert admin.get("/api/pbxs").json() == []


def test_admins_register_change_and_remove_pbxs_and_never_see_a_password(
    web: LiveWeb, sim: Simulator
) -> None:
    listener, _ = web.bearer(LISTENER_2000[0])
    assert listener.get("/api/pbxs").status_code == 403
    assert listener.post("/api/pbxs", json=pbx_body(sim)).status_code == 403
    admin, _ = web.bearer(ADMIN[0])
    created = admin.post("/api/pbxs", json=pbx_body(sim, max_downloads=3))
    assert created.status_code == 201, created.text
    view = created.json()
    assert (view["name"], view["tls"], view["max_downloads"]) == ("paris", "pinned", 3)
    assert admin.post("/api/pbxs", json=pbx_body(sim)).status_code == 409
    bad = admin.post("/api/pbxs", json=pbx_body(sim, name="lyon", url="ftp://pbx"))
    assert bad.status_code == 422 and bad.json()["detail"].startswith("url:")
    record = web.archive.index.pbxs.require("paris")
    assert KEYRING.open(record.password_sealed, "pbx:paris:password") == SIM_PASSWORD.encode()

    changed = admin.patch("/api/pbxs/paris", json={"insecure": True, "max_downloads": 1})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["tls"], changed.json()["pin_sha256"]) == ("insecure", None)
    back = admin.patch("/api/pbxs/paris", json={"insecure": None})  # the system's CAs
    assert back.json()["tls"] == "verified"
    assert admin.patch("/api/pbxs/paris", json={"password": "new-Pa55word"}).status_code == 200
    resealed = web.archive.index.pbxs.require("paris").password_sealed
    assert resealed != record.password_sealed
    assert admin.patch("/api/pbxs/paris", json={"url": None}).status_code == 422
    assert admin.patch("/api/pbxs/lyon", json={"max_downloads": 2}).status_code == 404

    texts = [
        created.text,
        changed.text,
        admin.get("/api/pbxs").text,
        admin.get("/api/pbxs/paris").text,
    ]
    for text in texts:
        assert SIM_PASSWORD not in text and "new-Pa55word" not in text
        assert "password" not in text and "events_path" not in text
    assert admin.delete("/api/pbxs/paris").status_code == 204
    assert admin.get("/api/pbxs/paris").status_code == 404
    actions = [(e.action, e.actor) for e in reversed(audit_entries(web, target="paris"))]
    assert [a for a, _ in actions] == [
        "pbx_add",
        "pbx_edit",
        "pbx_edit",
        "pbx_edit",
        "pbx_remove",
    ]
    assert {actor for _, actor in actions} == {ADMIN[0]}
    details = " ".join(e.detail for e in audit_entries(web, target="paris"))
    assert "changed password" in details and "new-Pa55word" not in details


def test_a_browser_session_needs_its_csrf_token(web: LiveWeb, sim: Simulator) -> None:
    browser = web.login(*ADMIN)
    refused = browser.post("/api/pbxs", json=pbx_body(sim))
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    csrf = browser.get("/api/me").json()["csrf_token"]
    made = browser.post("/api/pbxs", json=pbx_body(sim), headers={"X-CSRF-Token": csrf})
    assert made.status_code == 201


def test_testing_a_pbx_logs_in_once_and_pauses_after_a_refusal(
    web: LiveWeb, sim: Simulator
) -> None:
    admin, _ = web.bearer(ADMIN[0])
    assert admin.post("/api/pbxs", json=pbx_body(sim)).status_code == 201
    tested = admin.post("/api/pbxs/paris/test").json()
    assert tested["ok"] is True and tested["report_transport"] == "HTTP"
    assert admin.get("/api/pbxs/paris").json()["last_test"]["ok"] is True
    admin.patch("/api/pbxs/paris", json={"password": "wrong-Pa55word"})
    refused = admin.post("/api/pbxs/paris/test").json()
    assert refused["ok"] is False and "20003" in refused["error"]
    again = admin.post("/api/pbxs/paris/test")
    assert again.status_code == 409 and "not trying it again" in again.json()["detail"]
    assert outcomes(sim, "login") == ["Success", "20003"]


def test_searches_show_and_filter_by_pbx(web: LiveWeb) -> None:
    from zoneinfo import ZoneInfo

    from callvault.pbx import CallDetail

    index = web.archive.index
    now = web.clock()
    lyon, _paris = (register_pbx(index, name, now) for name in ("lyon", "paris"))
    call = CallDetail(
        callid="1.1",
        timestart="2024-05-03 10:00:00",
        callfrom="2001",
        callto="2002",
        recording="20240503100000-1.1-2001-2002-Internal.wav",
    )
    index.calls.record([call], source="event", tz=ZoneInfo("UTC"), now=now, pbx_id=lyon.id)
    admin, _ = web.bearer(ADMIN[0])
    everything = admin.get("/api/recordings").json()
    assert {(item["pbx"], item["pbx_kind"]) for item in everything["items"]} == {
        ("", ""),
        ("lyon", "s-series"),
    }
    only = admin.get("/api/recordings", params={"pbx": "lyon"}).json()
    assert [item["name"] for item in only["items"]] == [call.recording]
    assert (only["items"][0]["pbx"], only["items"][0]["pbx_kind"]) == ("lyon", "s-series")
    one = admin.get(f"/api/recordings/{only['items'][0]['id']}").json()
    assert (one["pbx"], one["pbx_kind"]) == ("lyon", "s-series")
    unknown = admin.get("/api/recordings", params={"pbx": "nice"})
    assert unknown.status_code == 422 and "no PBX named 'nice'" in unknown.json()["detail"]
    browser = web.login(*ADMIN)
    page = browser.get("/search", params={"pbx": "lyon"}).text
    assert '<select id="pbx" name="pbx"' in page and "<option selected>lyon</option>" in page
    assert '<th scope="col">PBX</th>' in page
    kind = '<small class="pbx-kind">s-series</small>'
    assert f'<td class="pbx" data-label="PBX">lyon<br>{kind}</td>' in page
    assert "pbx=lyon" in page  # the export keeps the filter


def test_requeue_through_the_api_takes_one_pbx(web: LiveWeb) -> None:

    register_pbx(web.archive.index, "lyon", web.clock())
    admin, _ = web.bearer(ADMIN[0])
    # The archive's failed recording is not Lyon's: nothing of Lyon's to queue again.
    lyon = admin.post("/api/requeue", json={"pbx": "lyon"})
    assert lyon.status_code == 200 and lyon.json()["requeued"] == {"failed": 0, "missing": 0}
    unknown = admin.post("/api/requeue", json={"pbx": "nice"})
    assert unknown.status_code == 422 and "no PBX named 'nice'" in unknown.json()["detail"]
    everything = admin.post("/api/requeue", json={})
    assert everything.json()["requeued"]["failed"] == 1


def test_a_user_limited_to_a_pbx_sees_only_its_calls(web: LiveWeb) -> None:
    import io
    import zipfile
    from zoneinfo import ZoneInfo

    from callvault.pbx import CallDetail

    index = web.archive.index
    now = web.clock()
    lyon = register_pbx(index, "lyon", now)
    call = CallDetail(
        callid="1.1",
        timestart="2024-05-03 10:00:00",
        callfrom="2001",
        callto="2002",
        recording="20240503100000-1.1-2001-2002-Internal.wav",
    )
    index.calls.record([call], source="event", tz=ZoneInfo("UTC"), now=now, pbx_id=lyon.id)
    index.users.add("louise", "listener", "louise-password-1", "", pbxs="lyon")
    louise, _ = web.bearer("louise")
    seen = louise.get("/api/recordings").json()
    assert [item["pbx"] for item in seen["items"]] == ["lyon"]
    assert seen["total"] == 1
    others = web.bearer(ADMIN[0])[0].get("/api/recordings").json()["items"]
    elsewhere = next(item for item in others if item["pbx"] != "lyon")
    assert louise.get(f"/api/recordings/{elsewhere['id']}").status_code == 404
    assert louise.get(f"/api/recordings/{elsewhere['id']}/audio").status_code == 404

    def exported(client: object) -> list[str]:
        answer = client.get("/api/export")  # type: ignore[attr-defined]
        return zipfile.ZipFile(io.BytesIO(answer.content)).namelist()

    # Lyon's one recording is not archived yet: nothing of the others' may be exported.
    assert not [name for name in exported(louise) if name.startswith("recordings/")]
    assert [name for name in exported(web.bearer(ADMIN[0])[0]) if name.startswith("recordings/")]
    assert louise.get("/api/me").status_code == 200
    [listed] = [
        u for u in web.bearer(ADMIN[0])[0].get("/api/users").json() if u["name"] == "louise"
    ]
    assert listed["pbxs"] == ["lyon"]


def test_a_user_limited_to_a_pbx_learns_nothing_of_the_others_from_a_pbx_filter(
    web: LiveWeb,
) -> None:
    index = web.archive.index
    for name in ("lyon", "paris"):
        register_pbx(index, name, web.clock())
    index.users.add("louise", "listener", "louise-password-1", "", pbxs="lyon")
    louise, _ = web.bearer("louise")
    assert louise.get("/api/recordings", params={"pbx": "lyon"}).status_code == 200
    # Another PBX that exists and one that does not: the same answer, naming neither.
    answers = [louise.get("/api/recordings", params={"pbx": name}) for name in ("paris", "nosuch")]
    assert [a.status_code for a in answers] == [422, 422]
    details = [a.json()["detail"] for a in answers]
    assert details == [
        "pbx: none of yours is named 'paris'",
        "pbx: none of yours is named 'nosuch'",
    ]
    # An admin (every PBX) is told which names there are.
    admin = web.bearer(ADMIN[0])[0].get("/api/recordings", params={"pbx": "nosuch"})
    assert admin.status_code == 422 and "lyon" in admin.json()["detail"]
