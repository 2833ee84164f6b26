"""Signed notes and checkpoints: how the audit log's state is published and checked offline.

The ledger's state is published as a C2SP tlog-checkpoint (c2sp.org/tlog-checkpoint) inside a
C2SP signed note (c2sp.org/signed-note), signed with Ed25519. Both formats are the ones the
transparency-log ecosystem already verifies (Go's golang.org/x/mod/sumdb/note, witnesses,
monitors), so compliance tooling checks imageledger's checkpoints with tools it trusts rather
than with code of ours. This module is the pure part: key strings, signing, opening notes,
checkpoint bodies. It reads no file and knows no clock; the wiring stores and loads keys.

Key strings (the forms Go's note package reads and writes, so keys move between the two):

- verifier key (public): ``<name>+<key id, 8 lowercase hex>+<base64(0x01 || public key)>``;
- signer key (secret): ``PRIVATE+KEY+<name>+<key id>+<base64(0x01 || 32-byte seed)>``;
- key id: the first 4 bytes, big-endian, of SHA-256(name || 0x0A || 0x01 || public key).

Decisions beyond the specifications (each a place where they allow a choice):

- Strictness: base64 must be the canonical standard encoding (re-encoding what it decodes gives
  it back), key ids lowercase hex, names free of control characters as well as of Unicode
  spaces and ``+``. What imageledger and Go write always passes; a non-canonical spelling of
  the same bytes is refused instead of being a second accepted form of one signature.
- Errors are one-line `NoteError`s that never quote a key string (a signer string is the
  secret itself, and a mangled one may put the seed anywhere) nor the note's untrusted
  content; they name only keys the caller trusts.
- Opening: at most `MAX_SIGNATURES` signature lines (the spec asks verifiers for a limit of at
  least 16; Go's is 100), all parsed before any is verified; every signature of a known key is
  verified, duplicates included (Go verifies only the first of a key's duplicates; the spec
  says a known key's signature MUST be verified), and one that fails rejects the whole note.
- The note text may hold blank lines (the spec allows them: the signatures begin after the
  last blank line, and a text ending in a newline always splits back exactly).
- Checkpoint extension lines are parsed and kept in `Checkpoint.extensions`, and `body()`
  writes them back, so a parsed checkpoint round-trips; checkpoints imageledger makes have
  none, and a verifier that accepts only imageledger's own must refuse a non-empty
  `extensions` itself (the caller decides, as the spec makes them opaque).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from imageledger.domain.errors import NoteError

__all__ = [
    "ALG_ED25519",
    "MAX_SIGNATURES",
    "Checkpoint",
    "NoteError",
    "Signer",
    "Verifier",
    "generate_signer",
    "open",
    "sign",
    "verify",
]


ALG_ED25519: Final = 0x01
"""The signature type byte of Ed25519 in key strings and key ids (c2sp.org/signed-note)."""

MAX_SIGNATURES: Final = 100
"""The most signature lines `open` reads: a bound on the work one note can demand."""

_PRIVATE_PREFIX: Final = "PRIVATE+KEY+"
_SIGNATURE_PREFIX: Final = "\u2014 "  # em dash, space
_KEY_LENGTH: Final = 32  # an Ed25519 public key and seed alike
_SIGNATURE_LENGTH: Final = 64
_ROOT_LENGTH: Final = 32  # a SHA-256 Merkle tree root
_MAX_SIZE: Final = 2**64 - 1  # tree sizes are uint64 wherever checkpoints are read
_KEY_ID: Final = re.compile(r"[0-9a-f]{8}")
_SIZE: Final = re.compile(r"0|[1-9][0-9]{0,19}")
# Forbidden anywhere in a note: ASCII controls but newline, and lone surrogates (a str holding
# one has no UTF-8 encoding: it came from undecodable bytes).
_FORBIDDEN_IN_NOTE: Final = re.compile("[\x00-\x09\x0b-\x1f\ud800-\udfff]")
_FORBIDDEN_IN_LINE: Final = re.compile("[\x00-\x1f\ud800-\udfff]")


def _is_valid_name(name: str) -> bool:
    """A key name as the spec requires (non-empty, no Unicode space nor ``+``), and one that
    can appear in a note (UTF-8, no control character)."""
    return (
        isinstance(name, str)
        and name != ""
        and "+" not in name
        and _FORBIDDEN_IN_LINE.search(name) is None
        and not any(ch.isspace() for ch in name)
    )


def _decode_base64(text: str) -> bytes | None:
    """The bytes of canonical standard base64 (RFC 4648 section 4), or None.

    Canonical only: one byte string has one accepted spelling, so nothing signed or
    compared has a second form.
    """
    if not text or not text.isascii():
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw


def _encode_base64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _key_id(name: str, public_key: bytes) -> int:
    """The key id the spec recommends (and Go computes) for an Ed25519 key."""
    digest = hashlib.sha256(
        name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + public_key
    ).digest()
    return int.from_bytes(digest[:4], "big")


def _split_key(rest: str, what: str) -> tuple[str, int, bytes]:
    """``<name>+<key id>+<base64(0x01 || key)>`` -> name, key id, the 32 key bytes.

    `what` names the kind of key in messages; nothing of `rest` is ever quoted.
    """
    parts = rest.split("+", 2)
    if len(parts) != 3:
        raise NoteError(f"malformed {what}: expected <name>+<key id>+<key>")
    name, key_id_hex, key_base64 = parts
    if not _is_valid_name(name):
        raise NoteError(
            f"malformed {what}: the key name must be non-empty, without spaces, '+' or "
            "control characters"
        )
    if _KEY_ID.fullmatch(key_id_hex) is None:
        raise NoteError(f"malformed {what}: the key id must be 8 lowercase hex digits")
    raw = _decode_base64(key_base64)
    if raw is None:
        raise NoteError(f"malformed {what}: the key is not canonical base64")
    if raw[0] != ALG_ED25519:
        raise NoteError(f"unsupported {what}: only Ed25519 (signature type 0x01) is known")
    if len(raw) != 1 + _KEY_LENGTH:
        raise NoteError(f"malformed {what}: an Ed25519 key is {_KEY_LENGTH} bytes")
    return name, int(key_id_hex, 16), raw[1:]


@dataclass(frozen=True, slots=True, repr=False)
class Verifier:
    """A public key that checks signatures: its name, its key id and the Ed25519 key.

    What auditors are given (as `to_string()`); holding it allows verifying, never signing.
    """

    name: str
    public_key: bytes
    key_id: int = field(init=False)
    _key: Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _is_valid_name(self.name):
            raise NoteError(
                "invalid key name: it must be non-empty, without spaces, '+' or control characters"
            )
        if not isinstance(self.public_key, bytes) or len(self.public_key) != _KEY_LENGTH:
            raise NoteError(f"invalid Ed25519 public key: it must be {_KEY_LENGTH} bytes")
        try:
            key = Ed25519PublicKey.from_public_bytes(self.public_key)
        except ValueError:
            raise NoteError("invalid Ed25519 public key") from None
        object.__setattr__(self, "key_id", _key_id(self.name, self.public_key))
        object.__setattr__(self, "_key", key)

    @classmethod
    def from_string(cls, text: str) -> Verifier:
        """Read a verifier key string (``<name>+<key id>+<base64(0x01 || key)>``).

        The key id must be the one the name and key give: a string whose parts were mixed up
        or mistyped is refused rather than quietly naming another key.
        """
        if not isinstance(text, str):
            raise NoteError("malformed verifier key: not a string")
        if text.startswith(_PRIVATE_PREFIX):
            # The message must not quote it: it is the secret.
            raise NoteError("a signer key was given where a verifier key is expected")
        name, key_id, public_key = _split_key(text, "verifier key")
        verifier = cls(name, public_key)
        if verifier.key_id != key_id:
            raise NoteError("malformed verifier key: the key id does not match the key")
        return verifier

    def to_string(self) -> str:
        """The verifier key string, as Go's note package writes it."""
        key = _encode_base64(bytes([ALG_ED25519]) + self.public_key)
        return f"{self.name}+{self.key_id:08x}+{key}"

    def __repr__(self) -> str:
        return f"Verifier.from_string({self.to_string()!r})"

    def verify_signature(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` is this key's Ed25519 signature of `message`."""
        if len(signature) != _SIGNATURE_LENGTH:
            return False
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


class Signer:
    """A private key that signs notes; its seed is the secret of the whole audit log.

    Its repr and str show the name and key id only, so that a log line, a traceback's locals or
    an assertion message never carries the seed; `to_string()` is the one way out, for the
    key file.
    """

    __slots__ = ("_key", "_key_id", "_name", "_public_key")

    def __init__(self, name: str, seed: bytes) -> None:
        """The signer of `name` whose Ed25519 private key is made from the 32-byte `seed`."""
        if not _is_valid_name(name):
            raise NoteError(
                "invalid key name: it must be non-empty, without spaces, '+' or control characters"
            )
        if not isinstance(seed, bytes) or len(seed) != _KEY_LENGTH:
            raise NoteError(f"invalid Ed25519 seed: it must be {_KEY_LENGTH} bytes")
        self._name = name
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self._public_key = self._key.public_key().public_bytes_raw()
        self._key_id = _key_id(name, self._public_key)

    @classmethod
    def from_string(cls, text: str) -> Signer:
        """Read a signer key string (``PRIVATE+KEY+<name>+<key id>+<base64(0x01 || seed)>``).

        The key id is checked against the public key the seed gives, as Go does: a key file
        whose parts do not belong together is refused.
        """
        if not isinstance(text, str):
            raise NoteError("malformed signer key: not a string")
        if not text.startswith(_PRIVATE_PREFIX):
            raise NoteError("malformed signer key: it lacks the private key prefix")
        name, key_id, seed = _split_key(text[len(_PRIVATE_PREFIX) :], "signer key")
        signer = cls(name, seed)
        if signer.key_id != key_id:
            raise NoteError("malformed signer key: the key id does not match the key")
        return signer

    @property
    def name(self) -> str:
        """The key name, written in every signature line (for a checkpoint: its origin)."""
        return self._name

    @property
    def key_id(self) -> int:
        """The 32-bit key id, written at the head of every signature."""
        return self._key_id

    def verifier(self) -> Verifier:
        """The public half, to give to whoever verifies."""
        return Verifier(self._name, self._public_key)

    def to_string(self) -> str:
        """The signer key string: the secret itself, for the key file only."""
        seed = self._key.private_bytes_raw()
        key = _encode_base64(bytes([ALG_ED25519]) + seed)
        return f"{_PRIVATE_PREFIX}{self._name}+{self._key_id:08x}+{key}"

    def sign_message(self, message: bytes) -> bytes:
        """The raw Ed25519 signature of `message` (`sign` makes the note around it)."""
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"Signer(name={self._name!r}, key_id={self._key_id:08x})"

    __str__ = __repr__


def generate_signer(name: str) -> Signer:
    """A fresh Ed25519 signer named `name`, from the operating system's randomness."""
    if not _is_valid_name(name):
        raise NoteError(
            "invalid key name: it must be non-empty, without spaces, '+' or control characters"
        )
    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    return Signer(name, seed)


def _check_text(text: str) -> None:
    """The rules a note text obeys, so that whatever `sign` writes, `open` reads back."""
    if not isinstance(text, str):
        raise NoteError("malformed note text: not a string")
    if not text.endswith("\n"):
        raise NoteError("malformed note text: it must end with a newline")
    bad = _FORBIDDEN_IN_NOTE.search(text)
    if bad is not None:
        raise NoteError(
            f"malformed note text: character {bad.start()} is a control character or not "
            "valid UTF-8"
        )


def sign(text: str, signer: Signer) -> str:
    """The signed note of `text`: the text, a blank line, one signature line by `signer`.

    What is signed is the text's UTF-8 bytes, final newline included, blank line excluded.
    """
    _check_text(text)
    signature = signer.sign_message(text.encode("utf-8"))
    encoded = _encode_base64(signer.key_id.to_bytes(4, "big") + signature)
    return f"{text}\n{_SIGNATURE_PREFIX}{signer.name} {encoded}\n"


def _verifier_index(verifiers: Iterable[Verifier]) -> dict[tuple[str, int], Verifier]:
    """Known keys by (name, key id); two different keys sharing both are a configuration
    error (one of them could never be told apart), refused rather than guessed."""
    index: dict[tuple[str, int], Verifier] = {}
    for verifier in verifiers:
        if not isinstance(verifier, Verifier):
            raise TypeError("verifiers must be Verifier objects")
        slot = (verifier.name, verifier.key_id)
        known = index.setdefault(slot, verifier)
        if known.public_key != verifier.public_key:
            raise NoteError(
                f"ambiguous verifiers: two keys are named {verifier.name}+{verifier.key_id:08x}"
            )
    return index


def open(note: str | bytes, verifiers: Iterable[Verifier]) -> tuple[str, list[str]]:
    """Check a signed note against known keys; return its text and who verifiably signed it.

    Follows c2sp.org/signed-note: the signatures begin after the note's last blank line;
    signatures of unknown keys (name and key id not both those of a known key) are ignored;
    a known key's signature that fails rejects the whole note; at least one must verify.
    The names are those of the verified keys, in the order their first signature appears,
    once per key. `note` may be the bytes read from a file: they must be UTF-8.

    Named as the spec's operation; call it as ``note.open`` (it is not the builtin).
    """
    if isinstance(note, bytes):
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("malformed note: not valid UTF-8") from None
    if not isinstance(note, str):
        raise NoteError("malformed note: not a string")
    bad = _FORBIDDEN_IN_NOTE.search(note)
    if bad is not None:
        raise NoteError(
            f"malformed note: character {bad.start()} is a control character or not valid UTF-8"
        )
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("malformed note: no blank line before the signatures")
    text, block = note[: split + 1], note[split + 2 :]
    if not block.endswith("\n"):
        raise NoteError("malformed note: the signatures must end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"malformed note: more than {MAX_SIGNATURES} signatures")

    parsed: list[tuple[str, int, bytes]] = []
    for number, line in enumerate(lines, 1):
        if not line.startswith(_SIGNATURE_PREFIX):
            raise NoteError(
                f"malformed note: signature line {number} does not begin with an em dash "
                "and a space"
            )
        name, space, encoded = line[len(_SIGNATURE_PREFIX) :].partition(" ")
        if not space or not _is_valid_name(name):
            raise NoteError(f"malformed note: signature line {number} has no valid key name")
        raw = _decode_base64(encoded)
        if raw is None or len(raw) < 5:
            raise NoteError(
                f"malformed note: signature line {number} is not a base64 key id and signature"
            )
        parsed.append((name, int.from_bytes(raw[:4], "big"), raw[4:]))

    known = _verifier_index(verifiers)
    message = text.encode("utf-8")
    verified: list[str] = []
    seen: set[tuple[str, int]] = set()
    for name, key_id, signature in parsed:
        verifier = known.get((name, key_id))
        if verifier is None:
            continue
        if not verifier.verify_signature(message, signature):
            raise NoteError(f"invalid signature by the known key {name}+{key_id:08x}")
        if (name, key_id) not in seen:
            seen.add((name, key_id))
            verified.append(name)
    if not verified:
        raise NoteError(
            f"note not verified: none of its {len(parsed)} signatures is by a known key"
        )
    return text, verified


def verify(note: str | bytes, verifier: Verifier) -> str:
    """The text of `note` if `verifier`'s key signed it (the one-key case of `open`)."""
    text, _ = open(note, [verifier])
    return text


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A transparency log's state as c2sp.org/tlog-checkpoint writes it: the note text that
    is signed, so that anyone holding the log's verifier key can check a size and root offline.

    `origin` names the log (and should be the signer's key name); `size` is the number of
    leaves; `root` the 32-byte RFC 9162 root hash; `extensions` are opaque extra lines, which
    imageledger never writes and `parse` reports for the caller to judge.
    """

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not self.origin:
            raise NoteError("invalid checkpoint: the origin must be a non-empty line")
        if _FORBIDDEN_IN_LINE.search(self.origin) is not None:
            raise NoteError(
                "invalid checkpoint: the origin has a control character or is not UTF-8"
            )
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise NoteError("invalid checkpoint: the size must be an integer")
        if not 0 <= self.size <= _MAX_SIZE:
            raise NoteError("invalid checkpoint: the size must be between 0 and 2**64-1")
        if not isinstance(self.root, bytes) or len(self.root) != _ROOT_LENGTH:
            raise NoteError(f"invalid checkpoint: the root hash must be {_ROOT_LENGTH} bytes")
        if not isinstance(self.extensions, tuple):
            raise NoteError("invalid checkpoint: the extension lines must be a tuple")
        for line in self.extensions:
            if not isinstance(line, str) or not line:
                raise NoteError("invalid checkpoint: an extension line must be non-empty")
            if _FORBIDDEN_IN_LINE.search(line) is not None:
                raise NoteError(
                    "invalid checkpoint: an extension line has a control character or is not UTF-8"
                )

    def body(self) -> str:
        """The note text to sign: origin, size, base64 root, then any extension lines."""
        lines = [self.origin, str(self.size), _encode_base64(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Read a checkpoint note text (what `open` returns), strictly.

        The size is decimal without leading zeros (``0`` for the empty tree), the root
        canonical base64 of 32 bytes; extension lines are kept in `extensions`.
        """
        if not isinstance(text, str):
            raise NoteError("malformed checkpoint: not a string")
        if not text.endswith("\n"):
            raise NoteError("malformed checkpoint: it must end with a newline")
        if _FORBIDDEN_IN_NOTE.search(text) is not None:
            raise NoteError("malformed checkpoint: a control character or text not UTF-8")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError("malformed checkpoint: it needs an origin, a size and a root hash")
        origin, size, root, *extensions = lines
        if not origin:
            raise NoteError("malformed checkpoint: the origin line is empty")
        if _SIZE.fullmatch(size) is None or int(size) > _MAX_SIZE:
            raise NoteError(
                "malformed checkpoint: the size must be a decimal integer without leading "
                "zeros, below 2**64"
            )
        raw = _decode_base64(root)
        if raw is None or len(raw) != _ROOT_LENGTH:
            raise NoteError(
                f"malformed checkpoint: the root hash must be canonical base64 of "
                f"{_ROOT_LENGTH} bytes"
            )
        if any(not line for line in extensions):
            raise NoteError("malformed checkpoint: an extension line is empty")
        return cls(origin, int(size), raw, tuple(extensions))
