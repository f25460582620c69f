"""The deployment's master keys: what seals the secrets callvault must keep in its index.

A PBX's API password has to be kept (the archiver logs in with it, on whichever node owns
the PBX), but never in clear: it is sealed with AES-256-GCM under a *master key* that lives
outside the index, in a key file or an environment variable, so that a copy of the
database (a backup, a dump, a stolen disk) does not give away the PBXs.

Where the keys come from (`load_keyring`), first that is set:

* ``CALLVAULT_MASTER_KEY``: one key, or several separated by commas;
* a key file (the ``master_key_file`` option, ``CALLVAULT_MASTER_KEY_FILE``): one key per
  line, ``#`` comments allowed; it must not be readable by other users (like an SSH key).

The first key is the *primary*: new secrets are sealed with it. The others are kept only
to open what older keys sealed, so that a key can be replaced without losing anything:
put the new key first, keep the old one below it, and re-seal (`callvault pbx edit NAME
--password-env VAR` does so for one PBX).

Formats (stable: they are stored and written to files):

* a key: ``cvmk1.`` + the 32 key bytes in URL-safe Base64 without padding;
* its id: the first 8 hex digits of SHA-256(``callvault master key`` NUL key), which names
  the key in sealed values and messages without giving it away;
* a sealed value: ``v1.<key id>.<URL-safe Base64 of nonce (12 bytes) + ciphertext + tag>``,
  the `context` (e.g. ``pbx:main:password``) bound in as associated data, so that a sealed
  value copied to another row or field does not open.

Errors are `MasterKeyError`s with one line for a person; a key is never part of a message, a
repr or a log line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

KEY_PREFIX = "cvmk1."
SEALED_PREFIX = "v1."
KEY_BYTES = 32
NONCE_BYTES = 12
MASTER_KEY_ENV = "CALLVAULT_MASTER_KEY"
HOW_TO_MAKE_ONE = (
    "name the key file the passwords were sealed with (--master-key-file, "
    "CALLVAULT_MASTER_KEY_FILE or master_key_file in the config file), or for a new "
    "deployment make one with `callvault keys create --file /etc/callvault/master.key`"
)


class MasterKeyError(ValueError):
    """No usable master key, or a sealed value that cannot be opened: one line for a person."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class MasterKey:
    """One master key; `id` names it, `secret` is never shown (not in repr either)."""

    secret: bytes = field(repr=False)
    id: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise MasterKeyError(f"a master key is {KEY_BYTES} bytes, not {len(self.secret)}")
        digest = hashlib.sha256(b"callvault master key\0" + self.secret).hexdigest()
        object.__setattr__(self, "id", digest[:8])

    @classmethod
    def generate(cls) -> MasterKey:
        """A new random key (from the operating system's generator)."""
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def parse(cls, text: str, *, where: str) -> MasterKey:
        """The key written as `text` (see `encoded`); MasterKeyError naming `where` it came
        from, never quoting it."""
        text = text.strip()
        if not text.startswith(KEY_PREFIX):
            raise MasterKeyError(
                f"{where}: not a callvault master key (one starts with {KEY_PREFIX!r}); "
                + HOW_TO_MAKE_ONE
            )
        try:
            secret = _b64decode(text[len(KEY_PREFIX) :])
        except (binascii.Error, ValueError):
            raise MasterKeyError(f"{where}: the master key is damaged (not Base64)") from None
        if len(secret) != KEY_BYTES:
            raise MasterKeyError(
                f"{where}: the master key is damaged ({len(secret)} bytes, not {KEY_BYTES})"
            )
        return cls(secret)

    def encoded(self) -> str:
        """The key as text, for a key file; the only way its secret leaves this object."""
        return KEY_PREFIX + _b64encode(self.secret)


@dataclass(frozen=True, slots=True)
class Keyring:
    """The master keys loaded: `primary` seals, any of `keys` opens what it sealed."""

    keys: tuple[MasterKey, ...]
    source: str  # where they came from, for messages ("CALLVAULT_MASTER_KEY", a file)

    def __post_init__(self) -> None:
        if not self.keys:
            raise MasterKeyError(f"{self.source}: no master key in it; " + HOW_TO_MAKE_ONE)

    @property
    def primary(self) -> MasterKey:
        return self.keys[0]

    def ids(self) -> list[str]:
        return [key.id for key in self.keys]

    def seal(self, plaintext: bytes, context: str) -> str:
        """`plaintext` encrypted and authenticated under the primary key, bound to
        `context`; the result is text for a database column."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.primary.secret).encrypt(nonce, plaintext, context.encode())
        return f"{SEALED_PREFIX}{self.primary.id}.{_b64encode(nonce + sealed)}"

    def _how_to_add(self) -> str:
        """How to load one more key, where these came from (in words: never the key)."""
        if self.source == MASTER_KEY_ENV:
            return (
                f"add that key to {MASTER_KEY_ENV} after the first one, separated by a comma "
                "(the first key seals, the others only open)"
            )
        return (
            f"add that key to {self.source} on a line of its own below the first key (copy "
            "its line from the key file that holds it; the first key seals, the others only "
            "open)"
        )

    def open(self, sealed: str, context: str) -> bytes:
        """The plaintext `seal` was given; MasterKeyError if the key it names is not loaded,
        or the value was altered, sealed for another context or with another key."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        version, _, rest = sealed.partition(".")
        key_id, _, body = rest.partition(".")
        if version + "." != SEALED_PREFIX or not key_id or not body:
            raise MasterKeyError(f"{context}: not a value sealed by callvault")
        key = next((k for k in self.keys if k.id == key_id), None)
        if key is None:
            raise MasterKeyError(
                f"{context}: sealed with master key {key_id}, which is not among the keys "
                f"loaded from {self.source} ({', '.join(self.ids())}); {self._how_to_add()}"
            )
        try:
            data = _b64decode(body)
            return AESGCM(key.secret).decrypt(
                data[:NONCE_BYTES], data[NONCE_BYTES:], context.encode()
            )
        except (binascii.Error, ValueError, InvalidTag):
            raise MasterKeyError(
                f"{context}: the sealed value does not open with master key {key_id}: it was "
                "altered or copied from elsewhere; set it again"
            ) from None


def _parse_many(lines: Sequence[str], where: str) -> tuple[MasterKey, ...]:
    keys: list[MasterKey] = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            keys.append(MasterKey.parse(text, where=f"{where}, key {number}"))
    return tuple(keys)


def read_key_file(path: Path) -> Keyring:
    """The keys in the key file `path`; MasterKeyError if it is missing, unreadable, open
    to other users or holds no valid key."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise MasterKeyError(
                f"master key file {path} can be read by other users: chmod 600 {path}"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MasterKeyError(f"master key file {path} does not exist; " + HOW_TO_MAKE_ONE) from None
    except OSError as exc:
        raise MasterKeyError(f"cannot read master key file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise MasterKeyError(f"master key file {path} is not a text file of keys") from None
    return Keyring(_parse_many(text.splitlines(), str(path)), str(path))


def load_keyring(key_file: Path | None, environ: Mapping[str, str] | None = None) -> Keyring | None:
    """The master keys from ``CALLVAULT_MASTER_KEY``, else from `key_file`; None when
    neither is set. MasterKeyError (one line) for a key that is set but unusable."""
    environ = os.environ if environ is None else environ
    value = environ.get(MASTER_KEY_ENV, "").strip()
    if value:
        return Keyring(_parse_many(value.split(","), MASTER_KEY_ENV), MASTER_KEY_ENV)
    if key_file is not None:
        return read_key_file(key_file)
    return None


def require_keyring(key_file: Path | None, environ: Mapping[str, str] | None = None) -> Keyring:
    """`load_keyring`, or MasterKeyError saying how to make a key when none is set."""
    keyring = load_keyring(key_file, environ)
    if keyring is None:
        raise MasterKeyError(
            "no master key (it seals and opens the PBX passwords): " + HOW_TO_MAKE_ONE
        )
    return keyring


def recording_context(recording_id: int) -> str:
    """The context a recording's data key (encryption at rest, `callvault.cipher`) is
    sealed under: bound to its row, so a sealed key copied to another row does not open."""
    return f"recording:{recording_id}"


def create_key_file(path: Path) -> MasterKey:
    """Write a new key to a new file `path`, readable by its owner only (never replacing a
    file: that would lose the key the index's secrets are sealed with)."""
    key = MasterKey.generate()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise MasterKeyError(
            f"{path} exists: a master key file is never replaced (the secrets sealed with "
            "its key would be lost); choose another path"
        ) from None
    except OSError as exc:
        raise MasterKeyError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        text = (
            f"# callvault master key {key.id}: keep a copy somewhere safe; without it the\n"
            "# PBX passwords sealed with it cannot be read. The first key seals; keys\n"
            "# below it only open what they sealed.\n"
            f"{key.encoded()}\n"
        )
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


# The deployment's signing keys (Ed25519): what signs the audit log's checkpoints and the
# manifests of exports, so that anyone holding the public key can check them offline.
#
# Formats (stable: they are stored, printed and put in exports):
#
# * a public key's *fingerprint*: the SHA-256, in hex, of its DER SubjectPublicKeyInfo,
#   the same bytes as ``openssl pkey -pubin -in key.pem -outform DER | sha256sum``, so
#   that it can be compared with standard tools; its *id* is the first 16 hex digits;
# * a public key as text: PEM (``-----BEGIN PUBLIC KEY-----``), which OpenSSL reads;
# * a signature: the 64 raw bytes of Ed25519 (RFC 8032), Base64 (standard, padded) where
#   it is text;
# * the private key kept in the index: its 32 raw bytes sealed with the master keyring
#   under the context ``signing-key:<id>``.

SIGNATURE_BYTES = 64


def signing_context(key_id: str) -> str:
    """The context a signing key's private half is sealed under (see `Keyring.seal`)."""
    return f"signing-key:{key_id}"


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An Ed25519 public key: `raw` (32 bytes), its `fingerprint` and `id`."""

    raw: bytes
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise MasterKeyError(f"an Ed25519 public key is 32 bytes, not {len(self.raw)}")
        object.__setattr__(self, "fingerprint", hashlib.sha256(self._der()).hexdigest())

    @property
    def id(self) -> str:
        return self.fingerprint[:16]

    def _der(self) -> bytes:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        key = Ed25519PublicKey.from_public_bytes(self.raw)
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def pem(self) -> str:
        """The key as PEM text (what ``openssl pkeyutl -verify -pubin -inkey`` reads)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        key = Ed25519PublicKey.from_public_bytes(self.raw)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def b64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @classmethod
    def from_b64(cls, text: str) -> PublicKey:
        try:
            return cls(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise MasterKeyError("not a public key (Base64 of 32 bytes expected)") from None

    @classmethod
    def from_pem(cls, text: str, *, where: str) -> PublicKey:
        """The key in PEM text `text`; MasterKeyError naming `where` it came from."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            key = serialization.load_pem_public_key(text.encode("ascii", "replace"))
        except (ValueError, TypeError):
            raise MasterKeyError(f"{where}: not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise MasterKeyError(f"{where}: not an Ed25519 public key")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether `signature` is this key's signature of `message`."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An Ed25519 private key; `secret` is never shown (not in repr either)."""

    secret: bytes = field(repr=False)
    public: PublicKey = field(init=False)

    def __post_init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if len(self.secret) != 32:
            raise MasterKeyError(f"an Ed25519 private key is 32 bytes, not {len(self.secret)}")
        public = Ed25519PrivateKey.from_private_bytes(self.secret).public_key()
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        object.__setattr__(self, "public", PublicKey(raw))

    @property
    def id(self) -> str:
        return self.public.id

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(os.urandom(32))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.secret).sign(message)

    def sealed(self, keyring: Keyring) -> str:
        """The private key sealed with the keyring's primary key, for the index."""
        return keyring.seal(self.secret, signing_context(self.id))

    @classmethod
    def unsealed(cls, sealed: str, key_id: str, keyring: Keyring) -> SigningKey:
        """The key `sealed` returned; MasterKeyError if it does not open or is not `key_id`."""
        key = cls(keyring.open(sealed, signing_context(key_id)))
        if key.id != key_id:
            raise MasterKeyError(f"signing key {key_id}: the sealed key is another key")
        return key
