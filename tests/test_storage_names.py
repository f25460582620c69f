"""Untrusted names: safe ones kept, anything else derived; keys never leave the root."""

from __future__ import annotations

import string
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callvault.storage import (
    LocalStorage,
    UnsafeNameError,
    check_key,
    is_safe_name,
    recording_key,
    safe_name,
    safe_serial,
)

START = datetime(2017, 9, 14, 9, 27, 25)

HOSTILE = [
    "../../../etc/passwd",
    "..",
    ".",
    "",
    "/etc/passwd",
    "a/b.wav",
    "a\\..\\b.wav",
    "C:\\Windows\\x.wav",
    "a\x00b.wav",
    ".hidden.wav",
    "x" * 5000 + ".wav",
    "\uff46\uff55\uff4c\uff4c.wav",  # fullwidth letters
    "e\u0301\u202e.wav",
    "CON.wav",
    "nul",
    "a..b.wav",
    "-rf.wav",
    "\udcff.wav",
]


def test_pbx_names_are_kept_as_they_are() -> None:
    for name in (
        "20170914092747-1505352445.265-102-1000-Inbound.wav",
        "20180315201242-1521173562.46-203-201-Internal.yswav",
        "20191024012719-1571909237.191-4000-4001-Internal.wav",
        "20240101000000-1.1-+4930123-1000-Outbound.wav",
    ):
        assert safe_name(name) == name
    assert (
        recording_key("369451090405", START, "20170914092747-1505352445.265-102-1000-Inbound.wav")
        == "369451090405/2017/09/14/20170914092747-1505352445.265-102-1000-Inbound.wav"
    )
    assert recording_key("", START, "a.wav") == "unknown/2017/09/14/a.wav"
    # A serial can never produce a top-level name reserved for callvault's own files.
    assert not recording_key("callvault.db", START, "a.wav").startswith("callvault.")


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_derived_safely(name: str) -> None:
    derived = safe_name(name)
    assert is_safe_name(derived)
    assert derived != name
    assert len(derived) <= 200
    assert check_key(recording_key(name, START, name))


def test_derived_names_keep_a_safe_extension_and_differ_per_input() -> None:
    assert safe_name("../a.wav").endswith(".wav")
    assert safe_name("a b.WAV").endswith(".wav")
    assert not safe_name("x/evil.p/hp").endswith(".p/hp")
    assert safe_name("a b.wav") != safe_name("a_b .wav")
    assert safe_name("../x.wav") == safe_name("../x.wav")


@pytest.mark.parametrize(
    "key", ["", "../x", "a/../b", "/abs", "a//b", "a/./b", "a/.hidden", "callvault.db", "a\\b"]
)
def test_unsafe_keys_are_refused(tmp_path: Path, key: str) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(UnsafeNameError):
        storage.local_path(key)


_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(list("./\\\x00:") + list(string.ascii_letters)),
    ),
    max_size=300,
)


@given(serial=_text, name=_text)
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_name_lands_under_the_root(tmp_path: Path, serial: str, name: str) -> None:
    root = tmp_path / "root"
    storage = LocalStorage(root)
    key = recording_key(serial, START, name)
    path = storage.local_path(key)
    assert path.resolve().is_relative_to(root.resolve())
    assert path.parent.parent.parent.parent.parent == root.resolve()
    assert is_safe_name(path.name) and is_safe_name(safe_serial(serial))
    assert not key.startswith("callvault.")


@given(name=_text)
@settings(max_examples=300, deadline=None)
def test_safe_name_is_safe_idempotent_and_injective_on_safe_names(name: str) -> None:
    derived = safe_name(name)
    assert is_safe_name(derived)
    assert safe_name(derived) == derived
    assert (derived == name) == is_safe_name(name)


@given(name=_text)
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_raw_untrusted_keys_are_refused_or_stay_inside(tmp_path: Path, name: str) -> None:
    storage = LocalStorage(tmp_path / "root")
    try:
        path = storage.local_path(name)
    except UnsafeNameError:
        return
    assert path.resolve().is_relative_to((tmp_path / "root").resolve())
