"""Simulator: recording randoms and downloads, WAV files, and the download faults."""

from __future__ import annotations

import hashlib
import io
import re
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from callvault.pbx._types import CallDetail, EventFormat
from callvault.simulator import ApiFailure, Clock, Faults, PbxState
from callvault.simulator._state import Recording, Session
from support.sim_helpers import Pbx, running_pbx


@pytest.fixture
def pbx() -> Iterator[Pbx]:
    yield from running_pbx()


def test_download_streams_a_valid_wav_as_long_as_the_talk(pbx: Pbx) -> None:
    cdr = pbx.sim.place_call(callfrom="1001", callto="1003", talk_seconds=3, ring_seconds=2)
    assert cdr.recording is not None
    token = pbx.login()
    response = pbx.download(token, cdr.recording, pbx.random(token, cdr.recording))
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/x-wav"
    assert int(response.headers["content-length"]) == len(response.content) == 44 + 3 * 16000
    assert response.headers["content-disposition"] == f'attachment; filename="{cdr.recording}"'
    assert response.headers["connection"] == "close"
    with wave.open(io.BytesIO(response.content)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 8000)
        assert wav.getnframes() == 3 * 8000
        assert any(wav.readframes(800))  # a tone, not silence
    assert hashlib.sha256(response.content).hexdigest() == pbx.sim.recording_sha256(cdr.recording)
    assert pbx.sim.recording_path(cdr.recording).read_bytes() == response.content


def test_a_random_is_good_for_one_download_only(pbx: Pbx) -> None:
    name = pbx.sim.place_call().recording
    assert name is not None
    token = pbx.login()
    value = pbx.random(token, name)
    assert len(value) == 32 and value == value.lower()
    assert pbx.download(token, name, value).content.startswith(b"RIFF")
    assert pbx.download(token, name, value).json() == {"status": "Failed", "errno": "20012"}
    assert pbx.sim.request_log[-2:] == [
        ("recording/download", "Success"),
        ("recording/download", "20012"),
    ]


def test_a_random_expires_after_thirty_seconds(pbx: Pbx) -> None:
    name = pbx.sim.place_call().recording
    assert name is not None
    token = pbx.login()
    fresh = pbx.random(token, name)
    stale = pbx.random(token, name)
    pbx.sim.clock.advance(29)
    assert pbx.download(token, name, fresh).content.startswith(b"RIFF")
    pbx.sim.clock.advance(2)
    assert pbx.download(token, name, stale).json()["errno"] == "20012"


def test_a_random_is_bound_to_its_token_and_recording(pbx: Pbx) -> None:
    first = pbx.sim.place_call(callfrom="1001").recording
    second = pbx.sim.place_call(callfrom="1002").recording
    assert first is not None and second is not None
    token_a, token_b = pbx.login(), pbx.login()
    value = pbx.random(token_a, first)
    assert pbx.download(token_b, first, value).json()["errno"] == "20012"
    assert pbx.download(token_a, first, value).json()["errno"] == "20012"  # used up
    value = pbx.random(token_a, first)
    assert pbx.download(token_a, second, value).json()["errno"] == "20012"


def test_names_with_plus_must_be_url_encoded(pbx: Pbx) -> None:
    cdr = pbx.sim.place_call(
        callfrom="+4915112345678",
        callto="1003",
        type="Inbound",
        srctrunkname="SIP-Provider",
        didnumber="+49301234567",
    )
    name = cdr.recording
    assert name is not None and "-+4915112345678-1003-Inbound.wav" in name
    token = pbx.login()
    response = pbx.download(token, name, pbx.random(token, name))  # httpx encodes + as %2B
    assert response.content.startswith(b"RIFF")
    value = pbx.random(token, name)
    query = f"recording={name}&random={value}&token={token}"
    raw = f"{pbx.sim.url}/api/v1.1.0/recording/download?{query}"
    assert pbx.client.get(raw).json()["errno"] == "20012"  # a raw + reads as a space


# What real PBXs' recording names look like: digits, the callid, digits, digits, the type.
DIGITS_ONLY_NAME = re.compile(r"\d{14}-\d+\.\d+-\d+-\d+-(Internal|Inbound|Outbound)\.wav")


def _answered_random_calls(pbx: Pbx, count: int = 30) -> list[CallDetail]:
    return [pbx.sim.place_random_call(answered=True) for _ in range(count)]


def test_generated_names_and_numbers_are_digits_only(pbx: Pbx) -> None:
    """Names in the peers' material are digits only (``...-16601274540-10000-Inbound.wav``);
    a ``+`` breaks every client that does not URL-encode the name."""
    cdrs = _answered_random_calls(pbx)
    assert {cdr.type for cdr in cdrs} == {"Internal", "Inbound", "Outbound"}
    for cdr in cdrs:
        assert cdr.recording is not None and DIGITS_ONLY_NAME.fullmatch(cdr.recording), cdr
        assert cdr.callfrom.isdigit() and cdr.callto.isdigit(), cdr
        assert cdr.didnumber == "" or cdr.didnumber.isdigit(), cdr
    assert any(len(cdr.callfrom) == 12 for cdr in cdrs if cdr.type == "Inbound")
    # The name a client that does not URL-encode sends is still the right one.
    name = cdrs[0].recording
    assert name is not None
    token = pbx.login()
    value = pbx.random(token, name)
    raw = f"{pbx.sim.url}/api/v1.1.0/recording/download?recording={name}&random={value}"
    assert pbx.client.get(f"{raw}&token={token}").content.startswith(b"RIFF")


def test_names_with_plus_fault(pbx: Pbx) -> None:
    pbx.sim.faults.names_with_plus = True
    external = [cdr for cdr in _answered_random_calls(pbx) if cdr.type != "Internal"]
    assert external
    for cdr in external:
        number = cdr.callfrom if cdr.type == "Inbound" else cdr.callto
        assert number.startswith("+4915") and number[1:].isdigit()
        assert cdr.recording is not None and f"-{number}-" in cdr.recording
        assert cdr.type == "Outbound" or cdr.didnumber == "+49301234567"


def test_names_with_spaces_fault(pbx: Pbx) -> None:
    pbx.sim.faults.names_with_spaces = True
    external = [cdr for cdr in _answered_random_calls(pbx) if cdr.type != "Internal"]
    assert external and all(cdr.recording and " " in cdr.recording for cdr in external)
    name = external[0].recording
    assert name is not None
    token = pbx.login()
    response = pbx.download(token, name, pbx.random(token, name))  # encoded: %20
    assert response.content.startswith(b"RIFF")


@pytest.mark.parametrize("latin1", [False, True])
def test_non_ascii_names_reach_content_disposition_as_raw_bytes(pbx: Pbx, latin1: bool) -> None:
    """A PBX copies the file name's bytes into the header (UTF-8, or Latin-1 with the
    disposition_latin1 fault): clients must decode them without crashing."""
    pbx.sim.faults.names_non_ascii = True
    pbx.sim.faults.disposition_latin1 = latin1
    external = [cdr for cdr in _answered_random_calls(pbx) if cdr.type != "Internal"]
    assert external
    token = pbx.login()
    for cdr in external[:5]:
        name = cdr.recording
        assert name is not None and not name.isascii()
        response = pbx.download(token, name, pbx.random(token, name))
        assert response.content.startswith(b"RIFF")
        raw = dict(response.headers.raw)[b"content-disposition"]
        expected = name.encode("latin-1", "replace") if latin1 else name.encode()
        assert raw == b'attachment; filename="' + expected + b'"'


def test_missing_and_deleted_recordings_answer_20014(pbx: Pbx) -> None:
    token = pbx.login()
    body = {"recording": "20170901181806-1504261084.7-1001-1003-Internal.wav"}
    assert pbx.errno("recording/get_random", token=token, body=body) == "20014"
    name = pbx.sim.place_call().recording
    assert name is not None
    path = pbx.sim.recording_path(name)
    value = pbx.random(token, name)
    pbx.sim.delete_recording(name)
    assert not path.exists()
    assert name not in pbx.sim.recording_names()
    assert pbx.download(token, name, value).json()["errno"] == "20014"
    assert pbx.errno("recording/get_random", token=token, body={"recording": name}) == "20014"


def test_a_recording_can_be_not_ready_right_after_its_newcdr(pbx: Pbx) -> None:
    pbx.sim.faults.not_ready_seconds = 10
    name = pbx.sim.place_call().recording
    assert name is not None
    token = pbx.login()
    assert pbx.errno("recording/get_random", token=token, body={"recording": name}) == "20014"
    pbx.sim.clock.advance(11)
    assert pbx.download(token, name, pbx.random(token, name)).content.startswith(b"RIFF")


def test_delete_rate_one_deletes_every_new_recording(pbx: Pbx) -> None:
    pbx.sim.faults.delete_rate = 1.0
    name = pbx.sim.place_call().recording
    assert name is not None
    token = pbx.login()
    assert pbx.errno("recording/get_random", token=token, body={"recording": name}) == "20014"


def test_dropped_download_ends_before_content_length(pbx: Pbx) -> None:
    name = pbx.sim.place_call(talk_seconds=4).recording
    assert name is not None
    token = pbx.login()
    pbx.sim.faults.drop_next_downloads = 1
    params = {"recording": name, "random": pbx.random(token, name), "token": token}
    got = bytearray()
    with (
        pytest.raises(httpx.RemoteProtocolError),
        pbx.client.stream(
            "GET", f"{pbx.sim.url}/api/v1.1.0/recording/download", params=params
        ) as response,
    ):
        size = pbx.sim.recording_path(name).stat().st_size
        assert int(response.headers["content-length"]) == size
        for chunk in response.iter_raw():
            got.extend(chunk)
    assert 0 < len(got) < pbx.sim.recording_path(name).stat().st_size
    assert pbx.sim.faults.drop_next_downloads == 0
    assert ("recording/download", "dropped") in pbx.sim.request_log
    assert pbx.download(token, name, pbx.random(token, name)).content.startswith(b"RIFF")


def test_5xx_fault_answers_html_without_processing(pbx: Pbx) -> None:
    pbx.sim.faults.error_5xx_next = 2
    for _ in range(2):
        response = pbx.call("login", body={"username": "api"})
        assert response.status_code in {500, 502, 503}
        assert response.headers["content-type"].startswith("text/html")
    assert pbx.sim.login_count == 0
    assert pbx.login()
    outcomes = [outcome for _endpoint, outcome in pbx.sim.request_log]
    assert outcomes[0] in {"HTTP 500", "HTTP 502", "HTTP 503"}
    assert outcomes[1] in {"HTTP 500", "HTTP 502", "HTTP 503"}
    assert outcomes[2] == "Success"


def test_html_error_fault_answers_boa_404(pbx: Pbx) -> None:
    token = pbx.login()
    pbx.sim.faults.html_error_next = 1
    response = pbx.call("recording/get_random", token=token, body={"recording": "x.wav"})
    assert response.status_code == 404
    assert response.text.startswith("<HTML><HEAD><TITLE>404 Not Found")
    assert token not in response.text
    assert pbx.errno("recording/get_random", token=token, body={"recording": "x.wav"}) == "20014"


def test_slow_fault_delays_responses(pbx: Pbx) -> None:
    pbx.sim.faults.slow_seconds = 0.3
    started = time.monotonic()
    pbx.login()
    assert time.monotonic() - started >= 0.3


def test_big_recording_of_a_given_size_streams_whole(pbx: Pbx, tmp_path: Path) -> None:
    name = pbx.sim.place_call(talk_seconds=1, size_bytes=3_000_001).recording
    assert name is not None
    token = pbx.login()
    target = tmp_path / "big.wav"
    params = {"recording": name, "random": pbx.random(token, name), "token": token}
    with (
        target.open("wb") as out,
        pbx.client.stream(
            "GET", f"{pbx.sim.url}/api/v1.1.0/recording/download", params=params
        ) as response,
    ):
        for chunk in response.iter_bytes():
            out.write(chunk)
    assert target.stat().st_size == 3_000_000  # whole samples
    assert hashlib.sha256(target.read_bytes()).hexdigest() == pbx.sim.recording_sha256(name)
    with wave.open(str(target)) as wav:
        assert wav.getnframes() == (3_000_000 - 44) // 2


def test_range_is_ignored_unless_honoured(pbx: Pbx) -> None:
    name = pbx.sim.place_call(talk_seconds=1).recording
    assert name is not None
    token = pbx.login()
    params = {"recording": name, "random": pbx.random(token, name), "token": token}
    url = f"{pbx.sim.url}/api/v1.1.0/recording/download"
    whole = pbx.client.get(url, params=params, headers={"Range": "bytes=0-43"})
    assert whole.status_code == 200 and len(whole.content) == 44 + 16000
    pbx.sim.faults.honour_range = True
    params["random"] = pbx.random(token, name)
    part = pbx.client.get(url, params=params, headers={"Range": "bytes=4-43"})
    assert part.status_code == 206
    assert part.content == whole.content[4:44]
    assert part.headers["content-range"] == f"bytes 4-43/{44 + 16000}"


def test_download_errors(pbx: Pbx) -> None:
    name = pbx.sim.place_call().recording
    assert name is not None
    token = pbx.login()
    value = pbx.random(token, name)
    assert (
        pbx.errno("recording/download", method="GET", params={"recording": name, "random": value})
        == "20005"
    )
    assert (
        pbx.errno(
            "recording/download",
            method="PUT",
            token=token,
            params={"recording": name, "random": value},
        )
        == "20001"
    )
    assert (
        pbx.errno("recording/download", method="GET", token=token, params={"recording": name})
        == "10004"
    )
    # POST with query parameters is accepted too (seen in third-party clients).
    response = pbx.call(
        "recording/download",
        token=token,
        params={"recording": name, "random": pbx.random(token, name)},
    )
    assert response.content.startswith(b"RIFF")


def test_allowedip_extends_who_may_download_over_http(pbx: Pbx) -> None:
    name = pbx.sim.place_call().recording
    assert name is not None
    token = pbx.login()
    value = pbx.random(token, name, allowedip="198.51.100.7")  # the app server stays allowed
    assert pbx.download(token, name, value).content.startswith(b"RIFF")
    assert (
        pbx.errno(
            "recording/get_random", token=token, body={"recording": name, "allowedip": "not-an-ip"}
        )
        == "20015"
    )
    assert pbx.download(token, name, pbx.random(token, name, allowedip=" ")).status_code == 200


def _state(tmp_path: Path, seed: int | None = 1) -> PbxState:
    return PbxState(
        username="api",
        password="pw",
        serial="1",
        clock=Clock(),
        faults=Faults(),
        recordings_dir=tmp_path,
        seed=seed,
    )


def _session_with_recording(state: PbxState, tmp_path: Path) -> tuple[Session, str]:
    path = tmp_path / "r.wav"
    path.write_bytes(b"RIFF")
    state.add_recording(Recording(name="r.wav", path=path, size=4, sha256="", created_at=0.0))
    session = state.login(
        ip="127.0.0.1",
        username="api",
        password_md5=hashlib.md5(b"pw").hexdigest(),
        api_version="v1.1.0",
        port=0,
        url="",
        urltag=False,
        version=None,
    )
    assert session.format is EventFormat.LEGACY
    return session, "r.wav"


def test_random_is_bound_to_the_api_client_ip_plus_allowedip(tmp_path: Path) -> None:
    # Only 127.0.0.1 carries traffic in tests; other addresses are plain strings here.
    state = _state(tmp_path)
    session, name = _session_with_recording(state, tmp_path)
    value = state.recording_random(session, name=name, allowedip=None)
    with pytest.raises(ApiFailure) as refused:
        state.redeem_recording_random(session, ip="198.51.100.7", name=name, value=value)
    assert refused.value.errno == "20015"
    value = state.recording_random(session, name=name, allowedip="198.51.100.7")
    assert (
        state.redeem_recording_random(session, ip="198.51.100.7", name=name, value=value).name
        == name
    )
    value = state.recording_random(session, name=name, allowedip="198.51.100.7")
    with pytest.raises(ApiFailure) as other:
        state.redeem_recording_random(session, ip="198.51.100.8", name=name, value=value)
    assert other.value.errno == "20015"


def test_fault_rates_are_reproducible_with_a_seed(tmp_path: Path) -> None:
    a, b = _state(tmp_path, seed=42), _state(tmp_path, seed=42)
    draws = [a.chance(0.5) for _ in range(50)]
    assert draws == [b.chance(0.5) for _ in range(50)]
    assert True in draws and False in draws
    assert not _state(tmp_path).chance(0.0) and _state(tmp_path).chance(1.0)
