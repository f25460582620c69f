"""The master keys (callvault.keys): what they seal opens only with the same key and
context, a damaged or foreign value is one clear line, keys rotate, and a key never shows
in a message, a repr or a file others can read."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from callvault.keys import (
    KEY_PREFIX,
    MASTER_KEY_ENV,
    Keyring,
    MasterKey,
    MasterKeyError,
    create_key_file,
    load_keyring,
    read_key_file,
    require_keyring,
)


def ring(*keys: MasterKey) -> Keyring:
    return Keyring(keys, "test")


def test_a_sealed_value_opens_with_its_key_and_context_only() -> None:
    key = MasterKey.generate()
    sealed = ring(key).seal(b"pbx-Pa55word", "pbx:paris:password")
    assert b"pbx-Pa55word" not in sealed.encode() and sealed.startswith(f"v1.{key.id}.")
    assert ring(key).open(sealed, "pbx:paris:password") == b"pbx-Pa55word"
    # Every seal is new (a random nonce): equal passwords do not look equal.
    assert ring(key).seal(b"pbx-Pa55word", "pbx:paris:password") != sealed
    with pytest.raises(MasterKeyError, match="altered or copied from elsewhere"):
        ring(key).open(sealed, "pbx:lyon:password")  # copied to another PBX's row


def test_an_altered_value_or_an_unknown_key_is_one_line_naming_the_key() -> None:
    key, other = MasterKey.generate(), MasterKey.generate()
    sealed = ring(key).seal(b"secret", "ctx")
    prefix, body = sealed.rsplit(".", 1)
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(MasterKeyError, match=f"does not open with master key {key.id}"):
        ring(key).open(f"{prefix}.{flipped}", "ctx")
    with pytest.raises(MasterKeyError) as caught:
        ring(other).open(sealed, "ctx")
    assert f"sealed with master key {key.id}" in str(caught.value)
    assert other.id in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(MasterKeyError, match="not a value sealed by callvault"):
        ring(key).open("hunter2", "ctx")


def test_keys_rotate_the_first_seals_the_others_still_open() -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    sealed_before = ring(old).seal(b"one", "ctx")
    rotated = ring(new, old)
    assert rotated.open(sealed_before, "ctx") == b"one"
    assert rotated.seal(b"two", "ctx").startswith(f"v1.{new.id}.")
    assert rotated.ids() == [new.id, old.id]


def test_a_key_never_shows_in_repr_or_errors() -> None:
    key = MasterKey.generate()
    text = key.encoded()
    assert text.startswith(KEY_PREFIX)
    assert MasterKey.parse(text, where="x") == key
    assert text[len(KEY_PREFIX) :] not in repr(key) and key.id in repr(key)
    assert text not in repr(ring(key))
    damaged = text[:-3]
    with pytest.raises(MasterKeyError) as caught:
        MasterKey.parse(damaged, where="CALLVAULT_MASTER_KEY")
    assert damaged not in str(caught.value) and "damaged" in str(caught.value)
    with pytest.raises(MasterKeyError, match="not a callvault master key"):
        MasterKey.parse("correct horse battery staple", where="x")


def test_the_key_file_is_made_for_its_owner_only_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "master.key"
    key = create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path).primary == key
    before = path.read_bytes()
    with pytest.raises(MasterKeyError, match="never replaced"):
        create_key_file(path)
    assert path.read_bytes() == before


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    create_key_file(path)
    path.chmod(0o644)
    with pytest.raises(MasterKeyError, match=f"chmod 600 {path}"):
        read_key_file(path)


def test_a_key_file_holds_several_keys_with_comments(tmp_path: Path) -> None:
    new, old = MasterKey.generate(), MasterKey.generate()
    path = tmp_path / "keys"
    path.write_text(f"# rotated today\n{new.encoded()}  # current\n\n{old.encoded()}\n")
    path.chmod(0o600)
    assert read_key_file(path).ids() == [new.id, old.id]


def test_where_the_keys_come_from(tmp_path: Path) -> None:
    from_file, from_env = MasterKey.generate(), MasterKey.generate()
    path = tmp_path / "master.key"
    path.write_text(from_file.encoded())
    path.chmod(0o600)
    assert load_keyring(None, {}) is None
    assert load_keyring(path, {}) is not None
    assert load_keyring(path, {}).primary == from_file  # type: ignore[union-attr]
    environ = {MASTER_KEY_ENV: from_env.encoded()}
    env_ring = load_keyring(path, environ)  # the variable wins
    assert env_ring is not None and env_ring.primary == from_env
    assert env_ring.source == MASTER_KEY_ENV
    with pytest.raises(MasterKeyError, match="callvault keys create --file"):
        require_keyring(None, {})
    with pytest.raises(MasterKeyError, match="does not exist"):
        require_keyring(tmp_path / "nowhere.key", {})
