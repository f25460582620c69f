"""`/healthz`, `/readyz` and `/metrics` over real sockets: of the web app alone (the index's
figures) and of `serve` (the archiver's own: reports, downloads, session, workers), with
the real simulator pushing reports."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from callvault.archive import Archiver
from callvault.simulator import Simulator
from callvault.web import create_app
from support.archive import archiver_config, states, wait_until
from support.web import ADMIN, LISTENER_2000, LiveWeb, live_web


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive") as live:
        yield live


def sample(text: str, name: str) -> float:
    """The value of one sample (`name` with its labels, as exposed) in a scrape."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in the scrape"
    return float(match.group(1))


def test_healthz_and_readyz_need_no_login_and_say_only_what_passed(web: LiveWeb) -> None:
    anonymous = web.client()
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    ready = anonymous.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "checks": [{"name": "index", "ok": True}, {"name": "storage", "ok": True}],
    }
    admin, _ = web.bearer(ADMIN[0])
    detailed = admin.get("/readyz").json()["checks"]
    assert detailed[1] == {"name": "storage", "ok": True, "detail": web.archive.storage.describe()}


def test_readyz_is_503_when_the_storage_is_gone(web: LiveWeb, tmp_path: Path) -> None:
    root = Path(web.archive.storage.describe())
    root.rename(tmp_path / "moved")
    try:
        admin, _ = web.bearer(ADMIN[0])
        answer = admin.get("/readyz")
        assert answer.status_code == 503
        checks = {c["name"]: c for c in answer.json()["checks"]}
        assert checks["index"]["ok"] is True and checks["storage"]["ok"] is False
        assert "is missing" in checks["storage"]["detail"]
    finally:
        (tmp_path / "moved").rename(root)


def test_metrics_are_for_admins_and_count_what_waits(web: LiveWeb) -> None:
    assert web.client().get("/metrics").status_code == 401
    listener, _ = web.bearer(LISTENER_2000[0])
    assert listener.get("/metrics").status_code == 403
    admin, _ = web.bearer(ADMIN[0])
    scrape = admin.get("/metrics")
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    text = scrape.text
    assert sample(text, "callvault_index_up") == 1.0
    assert sample(text, 'callvault_recordings_waiting{state="pending"}') == 1.0
    assert sample(text, 'callvault_recordings_waiting{state="failed"}') == 1.0
    assert "archived" not in re.findall(r'recordings_waiting\{state="(\w+)"', text)
    assert "callvault_events_total" not in text  # the web app alone receives no reports
    # Per PBX (the archive's own, `main`), how far downloads lag, and no serve node yet.
    assert sample(text, 'callvault_recordings_waiting_by_pbx{pbx="0",state="pending"}') == 1.0
    assert sample(text, "callvault_queue_lag_seconds") > 0
    assert sample(text, 'callvault_nodes{state="live"}') == 0.0


def test_serve_counts_reports_and_downloads_and_is_ready_while_it_works(
    events_sim: Simulator, tmp_path: Path
) -> None:
    sim = events_sim
    config = archiver_config(sim, tmp_path / "archive", web_host="127.0.0.1", web_port=0)
    with Archiver(config, web_app_factory=create_app) as archiver:
        index = archiver.index
        assert index is not None
        for _ in range(3):
            sim.place_call(talk_seconds=1)  # each pushes its report; nothing else is fetched
        assert wait_until(lambda: states(index) == {"archived": 3}), states(index)
        assert httpx.post(archiver.events_url + "-wrong", content=b"{}").status_code == 404
        index.users.add("ops", "admin", "ops-password-123")
        _token, secret = index.tokens.create("ops", label="prometheus")
        base = f"http://127.0.0.1:{archiver.web_port}"
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"})
        ready = client.get("/readyz").json()
        assert ready["ready"] is True
        assert {c["name"]: c["detail"] for c in ready["checks"]}["workers"] == "2 of 2 alive"
        text = client.get("/metrics").text
    assert sample(text, 'callvault_events_total{outcome="stored"}') >= 3  # and re-sent ones
    assert sample(text, 'callvault_events_total{outcome="refused"}') == 1
    assert sample(text, "callvault_recordings_archived_total") == 3
    assert sample(text, "callvault_download_seconds_count") == 3
    assert sample(text, "callvault_report_to_archived_seconds_count") == 3
    assert sample(text, 'callvault_pbx_session_state{pbx="main",state="ok"}') == 1.0
    assert sample(text, 'callvault_pbx_owned{pbx="main"}') == 1.0
    assert sample(text, 'callvault_nodes{state="live"}') == 1.0
    assert sample(text, "callvault_queue_lag_seconds") == 0.0
    assert sample(text, "callvault_storage_errors_total") == 0.0
    assert sample(text, 'callvault_workers{pbx="main",state="alive"}') == 2.0
    assert sample(text, 'callvault_recordings_waiting{state="pending"}') == 0.0
    assert sample(text, "callvault_last_report_timestamp_seconds") > 0
    assert "_created" not in text


def test_load_balancers_may_ask_with_head(web: LiveWeb) -> None:
    anonymous = web.client()
    assert anonymous.head("/healthz").status_code == 200
    assert anonymous.head("/readyz").status_code == 200
