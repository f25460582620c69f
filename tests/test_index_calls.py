"""record_calls: normalised rows, one transaction per batch, idempotent recordings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from callvault.index import Index, open_index
from callvault.index.schema import ARCHIVED, PENDING, calls, recordings
from callvault.pbx._types import CallDetail

SHANGHAI = ZoneInfo("Asia/Shanghai")
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
    yield idx
    idx.close()


def cdr(callid: str = "1505352445.265", **fields: object) -> CallDetail:
    base: dict[str, object] = {
        "timestart": "2017-09-14 09:27:25",
        "callfrom": "102",
        "callto": "1000",
        "callduration": 38,
        "talkduration": 29,
        "srctrunkname": "Apple_test",
        "status": "ANSWERED",
        "type": "Inbound",
        "recording": f"20170914092747-{callid}-102-1000-Inbound.wav",
        "sn": "369451090405",
    }
    base.update(fields)
    return CallDetail(callid=callid, **base)  # type: ignore[arg-type]


def test_call_is_stored_normalised(index: Index) -> None:
    [result] = index.record_calls(
        [cdr(didnumber="5551234", pincode="77", agentringtime=3)],
        source="event",
        tz=SHANGHAI,
        now=NOW,
    )
    assert result.new_recording and result.recording_id is not None
    with index.engine.connect() as conn:
        row = conn.execute(select(calls)).one()
    # 09:27:25 in UTC+8 is 01:27:25 UTC, and the callid's epoch says the same.
    start = row.start_at.replace(tzinfo=UTC)
    assert start == datetime(2017, 9, 14, 1, 27, 25, tzinfo=UTC)
    assert int(start.timestamp()) == 1505352445
    assert (row.timestart_local, row.call_from, row.call_to) == (
        "2017-09-14 09:27:25",
        "102",
        "1000",
    )
    assert (row.duration_s, row.talk_s, row.agent_ring_s) == (38, 29, 3)
    assert (row.direction, row.status, row.src_trunk) == ("Inbound", "ANSWERED", "Apple_test")
    assert (row.did, row.pincode, row.pbx_serial, row.source) == (
        "5551234",
        "77",
        "369451090405",
        "event",
    )
    assert json.loads(row.raw)["callid"] == "1505352445.265"
    recording = index.recording_by_id(result.recording_id)
    assert recording is not None
    assert recording.state == PENDING
    assert recording.next_attempt_at == NOW
    assert recording.attempts == 0
    assert recording.call_id == result.call_id


def test_no_recording_means_no_recordings_row(index: Index) -> None:
    [result] = index.record_calls([cdr(recording=None)], source="event", tz=SHANGHAI, now=NOW)
    assert result.recording_id is None and not result.new_recording
    [result] = index.record_calls([cdr("2.1", recording="")], source="event", tz=SHANGHAI, now=NOW)
    assert result.recording_id is None
    assert index.counts_by_state()[PENDING] == 0


def test_bad_timestart_keeps_text_and_null_start(index: Index) -> None:
    index.record_calls([cdr(timestart="12:10:10 AM")], source="event", tz=SHANGHAI, now=NOW)
    with index.engine.connect() as conn:
        row = conn.execute(select(calls.c.start_at, calls.c.timestart_local)).one()
    assert row.start_at is None and row.timestart_local == "12:10:10 AM"


def test_resent_event_and_backfill_never_duplicate_or_reset(index: Index) -> None:
    [first] = index.record_calls([cdr()], source="event", tz=SHANGHAI, now=NOW)
    assert first.recording_id is not None
    [job] = index.claim_jobs("w1", 5, now=NOW, lease=timedelta(minutes=5))
    assert index.mark_archived(
        job.recording_id,
        worker_id="w1",
        size=100,
        sha256="a" * 64,
        storage_key="k/1.wav",
        content_type="audio/wav",
        now=NOW,
    )
    later = NOW + timedelta(hours=1)
    again = index.record_calls([cdr(), cdr()], source="event", tz=SHANGHAI, now=later)
    backfill = index.record_calls([cdr()], source="cdr", tz=SHANGHAI, now=later)
    for result in [*again, *backfill]:
        assert result.call_id == first.call_id
        assert result.recording_id == first.recording_id
        assert not result.new_recording
    with index.engine.connect() as conn:
        assert conn.execute(select(calls.c.id)).all() == [(first.call_id,)]
        rows = conn.execute(select(recordings.c.state, recordings.c.sha256)).all()
    assert rows == [(ARCHIVED, "a" * 64)]


def test_later_report_fills_in_but_never_blanks(index: Index) -> None:
    index.record_calls(
        [cdr(srctrunkname="", didnumber="", talkduration=None)],
        source="event",
        tz=SHANGHAI,
        now=NOW,
    )
    index.record_calls(
        [cdr(srctrunkname="TrunkA", didnumber="555", talkduration=29, callfrom="")],
        source="cdr",
        tz=SHANGHAI,
        now=NOW,
    )
    with index.engine.connect() as conn:
        row = conn.execute(select(calls)).one()
    assert (row.src_trunk, row.did, row.talk_s, row.call_from) == ("TrunkA", "555", 29, "102")
    assert row.source == "event"  # the first report's


def test_a_batch_is_one_transaction(index: Index) -> None:
    with pytest.raises(ValueError):
        index.record_calls(
            [cdr("1.1"), CallDetail(callid="")], source="event", tz=SHANGHAI, now=NOW
        )
    with index.engine.connect() as conn:
        assert conn.execute(select(calls.c.id)).all() == []
    results = index.record_calls(
        [cdr(f"1.{i}") for i in range(50)], source="cdr", tz=SHANGHAI, now=NOW
    )
    assert len({r.recording_id for r in results}) == 50
    assert index.counts_by_state()[PENDING] == 50


def test_naive_datetimes_are_refused(index: Index) -> None:
    with pytest.raises(ValueError):
        index.record_calls([cdr()], source="event", tz=SHANGHAI, now=datetime(2024, 1, 1))


def test_settings_round_trip_and_setdefault(index: Index) -> None:
    assert index.get_setting("last_event_at") is None
    index.set_setting("last_event_at", "2024-05-01T12:00:00+00:00", NOW)
    index.set_setting("last_event_at", "2024-05-01T12:00:05+00:00", NOW)
    assert index.get_setting("last_event_at") == "2024-05-01T12:00:05+00:00"
    assert index.setdefault_setting("events_secret_path", "abc", NOW) == "abc"
    assert index.setdefault_setting("events_secret_path", "other", NOW) == "abc"
    assert index.get_setting("events_secret_path") == "abc"


def test_over_long_identifiers_are_refused_and_other_fields_truncated(index: Index) -> None:
    from callvault.index import InvalidCallDetail
    from callvault.index._index import _FIELD_LIMITS
    from callvault.index.schema import recordings as recordings_table

    # Every text field of a CDR that lands in a length-limited column, named here and not
    # taken from the code under test: a field dropped from the checks must fail this test.
    expected = {
        "callid": "callid",
        "sn": "pbx_serial",
        "timestart": "timestart_local",
        "callfrom": "call_from",
        "callto": "call_to",
        "type": "direction",
        "status": "status",
        "srctrunkname": "src_trunk",
        "dsttrunkname": "dst_trunk",
        "didnumber": "did",
        "pincode": "pincode",
        "recording": "name",
    }
    assert {field: column for field, (column, _limit) in _FIELD_LIMITS.items()} == expected
    # The callid and the recording name identify the call and the file: never shortened,
    # the whole batch is refused with a specific error the receiver turns into a 400.
    for field in ("callid", "recording"):
        table = recordings_table if field == "recording" else calls
        limit = table.c[expected[field]].type.length  # type: ignore[attr-defined]
        assert isinstance(limit, int) and _FIELD_LIMITS[field][1] == limit, field
        with pytest.raises(InvalidCallDetail, match=field):
            index.record_calls(
                [cdr("9.9"), cdr("9.8", recording="1" * (limit + 1))]
                if field == "recording"
                else [cdr("9.9"), cdr("1" * (limit + 1))],
                source="event",
                tz=SHANGHAI,
                now=NOW,
            )
    with index.engine.connect() as conn:
        assert conn.execute(select(calls.c.id)).all() == []
    # Every other field is a display column: cut to its length (the same on every engine,
    # SQLite would store it whole), kept whole in `raw`, and the call is stored.
    for number, (field, column) in enumerate(expected.items()):
        if field in ("callid", "recording"):
            continue
        limit = calls.c[column].type.length  # type: ignore[attr-defined]
        assert isinstance(limit, int) and _FIELD_LIMITS[field][1] == limit, field
        long_value = "".join(str(n % 10) for n in range(limit + 7))
        [result] = index.record_calls(
            [cdr(f"8.{number}", **{field: long_value})], source="event", tz=SHANGHAI, now=NOW
        )
        assert result.new_recording, field
        with index.engine.connect() as conn:
            row = conn.execute(select(calls).where(calls.c.callid == f"8.{number}")).one()
        assert row._mapping[column] == long_value[:limit], field
        assert json.loads(row.raw)[field] == long_value, field
