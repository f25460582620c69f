"""index.calls.record: normalised rows, one transaction per batch, idempotent recordings,
field limits of the schema; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from callvault.index import Index, InvalidCallDetail
from callvault.index.schema import ARCHIVED, PENDING, calls, column_length, recordings
from callvault.pbx._types import CallDetail
from support.index_data import NOW, WORKER, archive

SHANGHAI = ZoneInfo("Asia/Shanghai")


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
    [result] = index.calls.record(
        [cdr(didnumber="5551234", pincode="77", agentringtime=3)],
        source="event",
        tz=SHANGHAI,
        now=NOW,
    )
    assert result.new_recording and result.recording_id is not None
    with index.engine.connect() as conn:
        row = conn.execute(select(calls)).one()
    # 09:27:25 in UTC+8 is 01:27:25 UTC, and the callid's epoch says the same.
    start = row.start_at.replace(tzinfo=UTC) if row.start_at.tzinfo is None else row.start_at
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
    recording = index.recordings.by_id(result.recording_id)
    assert recording is not None
    assert recording.state == PENDING
    assert recording.next_attempt_at == NOW
    assert recording.attempts == 0
    assert recording.call_id == result.call_id
    assert recording.start_at == start


def test_no_recording_means_no_recordings_row(index: Index) -> None:
    [result] = index.calls.record([cdr(recording=None)], source="event", tz=SHANGHAI, now=NOW)
    assert result.recording_id is None and not result.new_recording
    [result] = index.calls.record([cdr("2.1", recording="")], source="event", tz=SHANGHAI, now=NOW)
    assert result.recording_id is None
    assert index.recordings.counts_by_state()[PENDING] == 0


def test_bad_timestart_keeps_text_and_null_start(index: Index) -> None:
    index.calls.record([cdr(timestart="12:10:10 AM")], source="event", tz=SHANGHAI, now=NOW)
    with index.engine.connect() as conn:
        row = conn.execute(select(calls.c.start_at, calls.c.timestart_local)).one()
    assert row.start_at is None and row.timestart_local == "12:10:10 AM"


def test_resent_event_and_backfill_never_duplicate_or_reset(index: Index) -> None:
    [first] = index.calls.record([cdr()], source="event", tz=SHANGHAI, now=NOW)
    assert first.recording_id is not None
    [job] = index.jobs.claim(WORKER, 5, now=NOW, lease=timedelta(minutes=5))
    assert archive(index, job.recording_id, WORKER)
    later = NOW + timedelta(hours=1)
    again = index.calls.record([cdr(), cdr()], source="event", tz=SHANGHAI, now=later)
    backfill = index.calls.record([cdr()], source="cdr", tz=SHANGHAI, now=later)
    for result in [*again, *backfill]:
        assert result.call_id == first.call_id
        assert result.recording_id == first.recording_id
        assert not result.new_recording
    with index.engine.connect() as conn:
        assert conn.execute(select(calls.c.id)).all() == [(first.call_id,)]
        rows = conn.execute(select(recordings.c.state, recordings.c.sha256)).all()
    assert [tuple(row) for row in rows] == [(ARCHIVED, "b" * 64)]


def test_a_batch_with_repeats_and_shared_names_is_stored_once_each(index: Index) -> None:
    # The same call twice (the second fills in), two calls sharing one recording name, a
    # call without a recording: one transaction, and each result says what happened.
    results = index.calls.record(
        [
            cdr("1.1", callfrom="", recording="first.wav"),
            cdr("1.2", recording=None),
            cdr("1.3", recording="shared.wav", agentringtime=3),
            cdr("1.1", callfrom="1003", recording="second.wav"),
            cdr("1.4", recording="shared.wav"),
        ],
        source="event",
        tz=SHANGHAI,
        now=NOW,
    )
    assert [r.new_recording for r in results] == [True, False, True, True, False]
    assert results[0].call_id == results[3].call_id
    assert results[2].recording_id == results[4].recording_id
    with index.engine.connect() as conn:
        rows = conn.execute(select(calls.c.callid, calls.c.call_from).order_by(calls.c.id)).all()
        names = conn.execute(select(recordings.c.name).order_by(recordings.c.id)).scalars().all()
    assert [tuple(row) for row in rows] == [
        ("1.1", "1003"),
        ("1.2", "102"),
        ("1.3", "102"),
        ("1.4", "102"),
    ]
    assert names == ["first.wav", "shared.wav", "second.wav"]


def test_later_report_fills_in_but_never_blanks(index: Index) -> None:
    index.calls.record(
        [cdr(srctrunkname="", didnumber="", talkduration=None)],
        source="event",
        tz=SHANGHAI,
        now=NOW,
    )
    index.calls.record(
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
        index.calls.record(
            [cdr("1.1"), CallDetail(callid="")], source="event", tz=SHANGHAI, now=NOW
        )
    with index.engine.connect() as conn:
        assert conn.execute(select(calls.c.id)).all() == []
    results = index.calls.record(
        [cdr(f"1.{i}") for i in range(50)], source="cdr", tz=SHANGHAI, now=NOW
    )
    assert len({r.recording_id for r in results}) == 50
    assert index.recordings.counts_by_state()[PENDING] == 50


def test_a_batch_larger_than_one_lookup_chunk(index: Index) -> None:
    results = index.calls.record(
        [cdr(f"3.{i}") for i in range(1203)], source="cdr", tz=SHANGHAI, now=NOW
    )
    assert len({r.recording_id for r in results}) == 1203 and all(r.new_recording for r in results)
    again = index.calls.record(
        [cdr(f"3.{i}") for i in range(1203)], source="cdr", tz=SHANGHAI, now=NOW
    )
    assert [r.recording_id for r in again] == [r.recording_id for r in results]


def test_naive_datetimes_are_refused(index: Index) -> None:
    with pytest.raises(ValueError):
        index.calls.record([cdr()], source="event", tz=SHANGHAI, now=datetime(2024, 1, 1))


# Every text field of a CDR that lands in a length-limited column, named here and not taken
# from the code under test: a field dropped from the checks must fail the test below.
FIELD_COLUMNS = {
    "callid": calls.c.callid,
    "sn": calls.c.pbx_serial,
    "timestart": calls.c.timestart_local,
    "callfrom": calls.c.call_from,
    "callto": calls.c.call_to,
    "type": calls.c.direction,
    "status": calls.c.status,
    "srctrunkname": calls.c.src_trunk,
    "dsttrunkname": calls.c.dst_trunk,
    "didnumber": calls.c.did,
    "pincode": calls.c.pincode,
    "recording": recordings.c.name,
}


def test_over_long_identifiers_are_refused_and_other_fields_cut_to_the_schema(
    index: Index,
) -> None:
    # The callid and the recording name identify the call and the file: never shortened,
    # the whole batch is refused with a specific error the receiver turns into a 400.
    for field in ("callid", "recording"):
        limit = column_length(FIELD_COLUMNS[field])
        exact = "1" * limit
        too_long = "1" * (limit + 1)
        with pytest.raises(InvalidCallDetail, match=field):
            index.calls.record(
                [cdr("9.9"), cdr("9.8", recording=too_long)]
                if field == "recording"
                else [cdr("9.9"), cdr(too_long)],
                source="event",
                tz=SHANGHAI,
                now=NOW,
            )
        # Exactly the column's length is stored whole.
        [stored] = index.calls.record(
            [cdr("9.7", recording=exact) if field == "recording" else cdr(exact)],
            source="event",
            tz=SHANGHAI,
            now=NOW,
        )
        assert stored.new_recording, field
    with index.engine.connect() as conn:
        assert sorted(conn.execute(select(calls.c.callid)).scalars()) == sorted(
            ["9.7", "1" * column_length(calls.c.callid)]
        )
    # Every other field is a display column: cut to its length (the same on every engine,
    # SQLite would store it whole), kept whole in `raw`, and the call is stored.
    for number, (field, column) in enumerate(FIELD_COLUMNS.items()):
        if field in ("callid", "recording"):
            continue
        limit = column_length(column)
        long_value = "".join(str(n % 10) for n in range(limit + 7))
        [result] = index.calls.record(
            [cdr(f"8.{number}", **{field: long_value})], source="event", tz=SHANGHAI, now=NOW
        )
        assert result.new_recording, field
        with index.engine.connect() as conn:
            row = conn.execute(select(calls).where(calls.c.callid == f"8.{number}")).one()
        assert row._mapping[column.name] == long_value[:limit], field
        assert json.loads(row.raw)[field] == long_value, field
