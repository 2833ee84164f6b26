"""Signed notes and checkpoints (domain/note.py): byte for byte what the transparency-log
ecosystem writes and reads, so that auditors verify imageledger's checkpoints with their tools.

The vectors are those of Go's golang.org/x/mod/sumdb/note (note_test.go), of its sumdb client
test (a checkpoint-shaped tree note) and of the C2SP signed-note and tlog-checkpoint specs.
"""

from __future__ import annotations

import base64
import traceback

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageledger.domain import note
from imageledger.domain.note import Checkpoint, NoteError, Signer, Verifier

# Go's note_test.go and the package documentation.
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_SEED_B64 = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngo"
    "tpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWL"
    "ox33WWd1RvMc+QQ=\n"
)
SIGNED = TEXT + "\n" + PETER_SIG

# Go's sumdb client_test.go: a name with '/', a key whose base64 holds '+', and two signed
# tree notes (quoted in its security-error test) that are checkpoint bodies.
SUMDB_SKEY = (
    "PRIVATE+KEY+localhost.localdev/sumdb+00000c67+AXu6+oaVaOYuQOFrf1V59JK1owcFlJcHwwXHDfDGxSPk"
)
SUMDB_VKEY = "localhost.localdev/sumdb+00000c67+AcTrnkbUA+TU4heY3hkjiSES/DSQniBqIeQ/YppAUtK6"
SUMDB_TREE_6 = "go.sum database tree\n6\nwc4SkQt52o5W2nQ8To2ARs+mWuUJjss+sdleoiqxMmM=\n"
SUMDB_SIGNED_6 = (
    SUMDB_TREE_6 + "\n\u2014 localhost.localdev/sumdb AAAMZ6oRNswlEZ6ZZhxrCvgl1MBy+nusq4JU+TG6Fe2N"
    "ihWLqOzb+y2c2kzRLoCr4tvw9o36ucQEnhc20e4nA4Qc/wc=\n"
)
SUMDB_TREE_5 = "go.sum database tree\n5\nnWzN20+pwMt62p7jbv1/NlN95ePTlHijabv5zO/s36w=\n"
SUMDB_SIGNED_5 = (
    SUMDB_TREE_5 + "\n\u2014 localhost.localdev/sumdb AAAMZ5/2FVAdMH58kmnz/0h299pwyskEbzDzoa2/Ya"
    "PdhvLya4YWDFQQxu2TQb5GpwAH4NdWnTwuhILafisyf3CNbgg=\n"
)

# The real verifier key of sum.golang.org (golang/mod gosumcheck).
SUM_GOLANG_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"

# c2sp.org/signed-note's example.
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    "This is an example message.\n\n\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6Tf"
    "Xppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)

# c2sp.org/tlog-checkpoint's example (its key is not published: the body is the vector).
SPEC_CHECKPOINT_NOTE = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
    "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5"
    "/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
)
SPEC_CHECKPOINT_BODY = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)

SECRETS = (PETER_SKEY, PETER_SEED_B64, "PRIVATE+KEY", SUMDB_SKEY)


def _peter() -> Signer:
    return Signer.from_string(PETER_SKEY)


def _no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
    assert "\n" not in text


def _rejected(call: object, *args: object) -> NoteError:
    """`call(*args)` raises a one-line NoteError that carries no secret, chained to nothing
    (a chained exception's message would print in the traceback)."""
    assert callable(call)
    with pytest.raises(NoteError) as caught:
        call(*args)
    error = caught.value
    _no_secret(str(error))
    _no_secret(repr(error))
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    return error


# --- keys -------------------------------------------------------------------------------------


def test_go_signer_key_gives_go_verifier_key_and_key_id() -> None:
    signer = _peter()
    assert signer.name == "PeterNeumann"
    assert signer.key_id == 0xC74F20A3
    assert signer.to_string() == PETER_SKEY
    verifier = signer.verifier()
    assert verifier.to_string() == PETER_VKEY
    assert verifier == Verifier.from_string(PETER_VKEY)
    assert verifier.key_id == 0xC74F20A3


@pytest.mark.parametrize(
    ("vkey", "name", "key_id"),
    [
        (PETER_VKEY, "PeterNeumann", 0xC74F20A3),
        (ENOCH_VKEY, "EnochRoot", 0xAF0CFE78),
        (SUMDB_VKEY, "localhost.localdev/sumdb", 0x00000C67),
        (SUM_GOLANG_VKEY, "sum.golang.org", 0x033DE0AE),
        (SPEC_VKEY, "example.com/foo", 0x530D903A),
    ],
)
def test_verifier_keys_round_trip(vkey: str, name: str, key_id: int) -> None:
    verifier = Verifier.from_string(vkey)
    assert (verifier.name, verifier.key_id) == (name, key_id)
    assert verifier.to_string() == vkey
    assert Verifier(name, verifier.public_key) == verifier
    assert vkey in repr(verifier)


def test_sumdb_signer_key_round_trips() -> None:
    signer = Signer.from_string(SUMDB_SKEY)
    assert signer.to_string() == SUMDB_SKEY
    assert signer.verifier().to_string() == SUMDB_VKEY


def test_generated_signer_is_self_consistent() -> None:
    signer = note.generate_signer("example.com/log")
    again = Signer.from_string(signer.to_string())
    assert again.verifier() == signer.verifier()
    assert Verifier.from_string(signer.verifier().to_string()) == signer.verifier()
    assert note.generate_signer("example.com/log").verifier() != signer.verifier()
    text = "hi\n"
    assert note.open(note.sign(text, again), [signer.verifier()]) == (text, ["example.com/log"])


def test_go_mangled_verifier_keys_are_rejected() -> None:
    """Go's TestNewVerifier: every proper substring and every one-byte change is refused."""
    key = PETER_VKEY.encode()
    mangled = [key[i:j] for i in range(len(key) + 1) for j in range(i + 1, len(key) + 1)]
    mangled.remove(key)
    for i in range(len(key)):
        mangled.append(key[:i] + bytes([key[i] + 1]) + key[i + 1 :])
    for candidate in mangled:
        with pytest.raises(NoteError):
            Verifier.from_string(candidate.decode())
    # Wrong key length and unknown algorithm, each with a key id that matches its bytes.
    _rejected(
        Verifier.from_string,
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
    )
    _rejected(
        Verifier.from_string, "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
    )


def test_go_mangled_signer_keys_are_rejected_without_quoting_them() -> None:
    """Go's TestNewSigner, and no message carries any part of the key string."""
    key = PETER_SKEY.encode()
    mangled = [key[i:j] for i in range(len(key) + 1) for j in range(i + 1, len(key) + 1)]
    mangled.remove(key)
    for i in range(len(key)):
        mangled.append(key[:i] + bytes([key[i] + 1]) + key[i + 1 :])
    for candidate in mangled:
        text = candidate.decode()
        error = _rejected(Signer.from_string, text)
        if len(text) >= 8:
            assert text not in str(error)


@pytest.mark.parametrize(
    "skey",
    [
        "",
        "PRIVATE+KEY",
        "PRIVATE+KEY+PeterNeumann+c74f20a3",
        "private+key+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
        "PRIVATE+KEY+PeterNeumann+C74F20A3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
        "PRIVATE+KEY+Peter Neumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz\n",
        "PRIVATE+KEY+PeterNeumann+c74f20a3+ AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
        "PRIVATE+KEY+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
        "PRIVATE+KEY+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
        PETER_VKEY,
    ],
)
def test_malformed_signer_keys(skey: str) -> None:
    _rejected(Signer.from_string, skey)


def test_a_signer_key_given_as_verifier_key_is_not_quoted() -> None:
    error = _rejected(Verifier.from_string, PETER_SKEY)
    assert "signer key" in str(error)


@pytest.mark.parametrize(
    "name",
    ["", "a+b", "a b", "a\tb", "a\u00a0b", "a\u3000b", "a\u2028b", "a\nb", "a\x01b", "\ud800"],
)
def test_invalid_key_names(name: str) -> None:
    _rejected(note.generate_signer, name)
    _rejected(Signer, name, bytes(32))
    _rejected(Verifier, name, _peter().verifier().public_key)


def test_names_may_be_any_other_unicode() -> None:
    signer = note.generate_signer("пример.example/журнал")
    signed = note.sign(TEXT, signer)
    assert note.open(signed, [signer.verifier()]) == (TEXT, [signer.name])


def test_signer_repr_and_str_hide_the_seed() -> None:
    signer = _peter()
    for shown in (repr(signer), str(signer), f"{signer}", f"{signer!r}"):
        assert "PeterNeumann" in shown
        assert "c74f20a3" in shown
        _no_secret(shown)
    seed = base64.b64decode(PETER_SEED_B64)[1:]
    assert seed not in repr(signer).encode()
    assert not hasattr(signer, "__dict__")


def test_bad_seed_and_public_key_lengths() -> None:
    _rejected(Signer, "a", bytes(31))
    _rejected(Verifier, "a", bytes(33))


# --- signing and opening ----------------------------------------------------------------------


def test_sign_reproduces_go_byte_for_byte() -> None:
    assert note.sign(TEXT, _peter()) == SIGNED


def test_sign_reproduces_the_sumdb_tree_notes() -> None:
    signer = Signer.from_string(SUMDB_SKEY)
    assert note.sign(SUMDB_TREE_6, signer) == SUMDB_SIGNED_6
    assert note.sign(SUMDB_TREE_5, signer) == SUMDB_SIGNED_5
    verifier = Verifier.from_string(SUMDB_VKEY)
    assert note.verify(SUMDB_SIGNED_6, verifier) == SUMDB_TREE_6


def test_the_signed_note_spec_example_verifies() -> None:
    assert note.verify(SPEC_NOTE, Verifier.from_string(SPEC_VKEY)) == (
        "This is an example message.\n"
    )


def test_open_as_go_does() -> None:
    """Go's TestOpen: one verified and one unknown, both verified, none known."""
    peter = Verifier.from_string(PETER_VKEY)
    enoch = Verifier.from_string(ENOCH_VKEY)
    both = TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert note.open(both, [peter]) == (TEXT, ["PeterNeumann"])
    assert note.open(both, [enoch]) == (TEXT, ["EnochRoot"])
    assert note.open(both, [peter, enoch]) == (TEXT, ["PeterNeumann", "EnochRoot"])
    assert note.open(both.encode(), (enoch, peter)) == (TEXT, ["PeterNeumann", "EnochRoot"])
    error = _rejected(note.open, both, [])
    assert "known key" in str(error)
    # Duplicated verifiers (the same key twice) are one key; an unused one is harmless.
    assert note.open(SIGNED, [enoch, peter, enoch, peter]) == (TEXT, ["PeterNeumann"])


def test_duplicated_and_unknown_signatures_as_go() -> None:
    """Go's duplicated verified and unverified signatures: accepted, Peter counted once."""
    peter = Verifier.from_string(PETER_VKEY)
    # Go's mangling is by bytes (the em dash is three of them).
    enoch_abcd = (ENOCH_SIG.encode()[:60] + b"ABCD" + ENOCH_SIG.encode()[60:]).decode()
    signed = TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + enoch_abcd
    assert note.open(signed, [peter]) == (TEXT, ["PeterNeumann"])
    # Enoch known: his mangled signature is verified too, and rejects the note.
    _rejected(note.open, signed, [peter, Verifier.from_string(ENOCH_VKEY)])


def test_invalid_signature_of_a_known_key_rejects_the_note() -> None:
    """Go's "invalid signature" case, and a bad one beside a good one."""
    peter = Verifier.from_string(PETER_VKEY)
    bad = (PETER_SIG.encode()[:60] + b"ABCD" + PETER_SIG.encode()[60:]).decode()
    error = _rejected(note.open, TEXT + "\n" + bad, [peter])
    assert str(error) == "invalid signature by the known key PeterNeumann+c74f20a3"
    _rejected(note.open, TEXT + "\n" + PETER_SIG + bad, [peter])
    _rejected(note.open, TEXT + "\n" + bad + PETER_SIG, [peter])


def test_signature_limit() -> None:
    peter = Verifier.from_string(PETER_VKEY)
    assert note.MAX_SIGNATURES == 100
    assert note.open(TEXT + "\n" + PETER_SIG * 100, [peter]) == (TEXT, ["PeterNeumann"])
    _rejected(note.open, TEXT + "\n" + PETER_SIG * 101, [peter])
    _rejected(note.open, TEXT + "\n" + PETER_SIG * 101, [])
    _rejected(note.open, TEXT + "\n" + ENOCH_SIG * 100 + PETER_SIG, [peter])


def _flip(text: str, index: int) -> str:
    """`text` with the character at `index` changed to another of the same class."""
    char = text[index]
    if char.isdigit():
        other = "0" if char != "0" else "1"
    elif char.isupper():
        other = "A" if char != "A" else "B"
    else:
        other = "a" if char != "a" else "b"
    return text[:index] + other + text[index + 1 :]


def test_tampering_is_rejected() -> None:
    peter = Verifier.from_string(PETER_VKEY)
    signature_at = SIGNED.index("x08go")
    # Every change of the text.
    for index in range(len(TEXT) - 1):
        _rejected(note.open, _flip(SIGNED, index), [peter])
    # Every change of the signature (the key id's characters included: then no known key).
    for index in range(signature_at, len(SIGNED) - 2):
        _rejected(note.open, _flip(SIGNED, index), [peter])
    # The key id of another key with the signature intact: an unknown key.
    raw = base64.b64decode(SIGNED[signature_at:-1])
    other_id = base64.b64encode(b"\x00\x00\x00\x01" + raw[4:]).decode()
    _rejected(note.open, SIGNED[:signature_at] + other_id + "\n", [peter])
    # The name changed: an unknown key too.
    _rejected(note.open, SIGNED.replace("\u2014 PeterNeumann", "\u2014 PeterNeuman"), [peter])


def test_note_by_another_key_of_the_same_name_is_rejected() -> None:
    impostor = note.generate_signer("PeterNeumann")
    signed = note.sign(TEXT, impostor)
    error = _rejected(note.open, signed, [Verifier.from_string(PETER_VKEY)])
    assert "known key" in str(error)
    # The impostor's signature is ignored, not an error, when Peter's is there too.
    both = signed + PETER_SIG
    assert note.open(both, [Verifier.from_string(PETER_VKEY)]) == (TEXT, ["PeterNeumann"])


def test_ambiguous_verifiers_are_refused() -> None:
    """Two different keys with one name and key id cannot both be trusted: refused, as Go."""
    peter = Verifier.from_string(PETER_VKEY)
    twin = Verifier("PeterNeumann", bytes(32))
    object.__setattr__(twin, "key_id", peter.key_id)
    _rejected(note.open, SIGNED, [peter, twin])


GO_BAD_NOTES = [
    TEXT,
    TEXT + "\n",
    TEXT + "\n" + PETER_SIG[:-1],
    "\x01" + TEXT + "\n" + PETER_SIG,
    TEXT + "\n" + "\u2014 Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZS"
    "NXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
    TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
]

OTHER_BAD_NOTES = [
    "",
    "\n",
    "\n\n",
    PETER_SIG,
    TEXT + PETER_SIG,  # no blank line
    SIGNED.replace("\u2014", "\u2013"),  # en dash
    SIGNED.replace("\u2014", "-"),
    SIGNED.replace("\u2014", "--"),
    SIGNED.replace("\u2014 ", "\u2014"),
    SIGNED.replace("\u2014 ", "\u2014  "),
    SIGNED.replace("PeterNeumann ", "PeterNeumann  "),
    SIGNED.replace("x08go", "x08g!"),  # not base64
    SIGNED.replace("AM=\n", "AM\n"),  # padding missing
    SIGNED.replace("AM=\n", "AN=\n"),  # non-canonical trailing bits
    SIGNED.replace("AM=\n", "AM= \n"),
    SIGNED.replace("\u2014 PeterNeumann x08go/ZJ", "\u2014 PeterNeumann x08go/ZJ\n"),
    TEXT + "\n\u2014 PeterNeumann AAAAAA==\n",  # shorter than a key id and one byte
    TEXT + "\n\u2014 PeterNeumann\n",
    TEXT + "\n\u2014  x08go\n",
    TEXT + "\n\u2014 Peter+Neumann " + PETER_SIG.split(" ")[2],
    SIGNED + "\n",
    SIGNED[:-1] + "x",  # no final newline, whatever ends the last line
    SIGNED.replace("\n", "\r\n"),
    "\t" + SIGNED,
    SIGNED.replace("problem,", "problem,\x7f\x1b"),
    SIGNED.replace("problem,", "problem\x00,"),
    SIGNED.replace("problem,", "problem\ud800,"),
]


@pytest.mark.parametrize("bad", GO_BAD_NOTES + OTHER_BAD_NOTES)
def test_malformed_notes_are_rejected(bad: str) -> None:
    _rejected(note.open, bad, [Verifier.from_string(PETER_VKEY)])


def test_invalid_utf8_bytes_are_rejected() -> None:
    peter = Verifier.from_string(PETER_VKEY)
    _rejected(note.open, b"\xff" + SIGNED.encode(), [peter])  # Go's "\xff" case
    _rejected(note.open, SIGNED.encode().replace("\u2014".encode(), b"\xe2\x80"), [peter])
    assert note.open(SIGNED.encode(), [peter]) == (TEXT, ["PeterNeumann"])


def test_blank_lines_in_the_text_are_allowed() -> None:
    """c2sp.org/signed-note: the text MAY hold empty lines; the last one splits."""
    signer = _peter()
    for text in ("a\n\nb\n", "a\n\n", "\n", "\n\n\n", "x\n\n\u2014 PeterNeumann AAAA\n"):
        assert note.open(note.sign(text, signer), [signer.verifier()]) == (
            text,
            ["PeterNeumann"],
        )


@pytest.mark.parametrize(
    "text", ["", "no newline", "a\r\n", "\x00\n", "tab\there\n", "a\ud800\n", "\x1f\n"]
)
def test_sign_refuses_texts_that_cannot_be_notes(text: str) -> None:
    _rejected(note.sign, text, _peter())


def test_verify_is_open_with_one_key() -> None:
    assert note.verify(SIGNED, Verifier.from_string(PETER_VKEY)) == TEXT
    _rejected(note.verify, SIGNED, Verifier.from_string(ENOCH_VKEY))


def test_no_traceback_of_a_rejected_key_holds_the_secret() -> None:
    """The whole printed traceback, not only the message: nothing chained quotes the key."""
    for skey in (PETER_SKEY[:-1], PETER_SKEY.replace("c74f20a3", "c74f20a4"), PETER_SKEY + "="):
        try:
            Signer.from_string(skey)
        except NoteError as error:
            printed = "".join(traceback.format_exception(error))
        else:
            pytest.fail("accepted a mangled signer key")
        assert PETER_SEED_B64[:-1] not in printed
        assert "PRIVATE+KEY" not in printed.replace("_PRIVATE_PREFIX", "")


_TEXT_CHARACTERS = st.characters(
    codec="utf-8", exclude_categories=["Cs"], exclude_characters="".join(map(chr, range(10)))
).filter(lambda c: c == "\n" or ord(c) >= 0x20)


@settings(max_examples=100, deadline=None)
@given(text=st.text(_TEXT_CHARACTERS, max_size=200), name=st.sampled_from(["a", "é/β", "x.y/z"]))
def test_any_valid_text_round_trips(text: str, name: str) -> None:
    text += "\n"
    signer = note.generate_signer(name)
    signed = note.sign(text, signer)
    assert note.open(signed, [signer.verifier()]) == (text, [name])
    assert note.open(signed.encode("utf-8"), [signer.verifier()]) == (text, [name])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300) | st.builds(lambda s: SIGNED[: len(s)] + s, st.text(max_size=50)))
def test_open_fails_only_with_note_error(garbage: str) -> None:
    try:
        note.open(garbage, [Verifier.from_string(PETER_VKEY)])
    except NoteError as error:
        assert "\n" not in str(error)


# --- checkpoints ------------------------------------------------------------------------------


def test_the_spec_checkpoint_example() -> None:
    checkpoint = Checkpoint.parse(SPEC_CHECKPOINT_BODY)
    assert checkpoint.origin == "example.com/behind-the-sofa"
    assert checkpoint.size == 20852163
    assert checkpoint.root == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert checkpoint.extensions == ()
    assert checkpoint.body() == SPEC_CHECKPOINT_BODY
    # The note's text (its signature's key is not published, so it is read unverified here).
    assert SPEC_CHECKPOINT_NOTE.startswith(checkpoint.body() + "\n\u2014 ")


def test_the_sumdb_tree_notes_are_checkpoints() -> None:
    text = note.verify(SUMDB_SIGNED_6, Verifier.from_string(SUMDB_VKEY))
    checkpoint = Checkpoint.parse(text)
    assert (checkpoint.origin, checkpoint.size) == ("go.sum database tree", 6)
    assert checkpoint.body() == text


def test_signing_a_checkpoint() -> None:
    signer = note.generate_signer("example.com/imageledger")
    checkpoint = Checkpoint(signer.name, 0, bytes(range(32)))
    assert checkpoint.body() == (
        "example.com/imageledger\n0\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
    )
    signed = note.sign(checkpoint.body(), signer)
    assert Checkpoint.parse(note.verify(signed, signer.verifier())) == checkpoint


def test_extension_lines_are_reported() -> None:
    text = SPEC_CHECKPOINT_BODY + "extension one\n\u2014 two\n"
    checkpoint = Checkpoint.parse(text)
    assert checkpoint.extensions == ("extension one", "\u2014 two")
    assert checkpoint.body() == text


ROOT = "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        "origin\n",
        "origin\n1\n",
        f"origin\n1\n{ROOT}",  # no final newline
        f"\n1\n{ROOT}\n",  # empty origin
        f"origin\n01\n{ROOT}\n",
        f"origin\n00\n{ROOT}\n",
        f"origin\n-1\n{ROOT}\n",
        f"origin\n+1\n{ROOT}\n",
        f"origin\n 1\n{ROOT}\n",
        f"origin\n1 \n{ROOT}\n",
        f"origin\n1_000\n{ROOT}\n",
        f"origin\n0x10\n{ROOT}\n",
        f"origin\n\u0661\n{ROOT}\n",  # an Arabic-Indic digit: int() would take it
        f"origin\n\n{ROOT}\n",
        f"origin\n18446744073709551616\n{ROOT}\n",  # 2**64
        f"origin\n{'9' * 5000}\n{ROOT}\n",
        "origin\n1\n\n",
        "origin\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I\n",  # padding missing
        "origin\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2J=\n",  # non-canonical
        "origin\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxqw==\n",  # 31 bytes
        f"origin\n1\n{base64.b64encode(bytes(33)).decode()}\n",
        f"origin\n1\n{base64.b64encode(bytes(64)).decode()}\n",
        f"origin\n1\n{ROOT} \n",
        f"origin\n1\n{ROOT}\n\n",  # an empty extension line
        f"origin\n1\n{ROOT}\next\n\n",
        f"origin\r\n1\n{ROOT}\n",
        f"ori\x00gin\n1\n{ROOT}\n",
        f"origin\n1\n{ROOT}\next\x01\n",
        f"orig\ud800in\n1\n{ROOT}\n",
    ],
)
def test_malformed_checkpoints_are_rejected(text: str) -> None:
    _rejected(Checkpoint.parse, text)


def test_largest_size_is_accepted() -> None:
    text = f"origin\n18446744073709551615\n{ROOT}\n"
    assert Checkpoint.parse(text).size == 2**64 - 1


@pytest.mark.parametrize(
    ("origin", "size", "root", "extensions"),
    [
        ("", 1, bytes(32), ()),
        ("a\nb", 1, bytes(32), ()),
        ("a", -1, bytes(32), ()),
        ("a", 2**64, bytes(32), ()),
        ("a", True, bytes(32), ()),
        ("a", 1, bytes(31), ()),
        ("a", 1, bytes(32), ("",)),
        ("a", 1, bytes(32), ("x\ny",)),
    ],
)
def test_invalid_checkpoints_are_refused(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    _rejected(Checkpoint, origin, size, root, extensions)


_LINE = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]).filter(lambda c: ord(c) >= 0x20),
    min_size=1,
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(
    origin=_LINE,
    size=st.integers(0, 2**64 - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(_LINE, max_size=3).map(tuple),
)
def test_checkpoints_round_trip(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    checkpoint = Checkpoint(origin, size, root, extensions)
    assert Checkpoint.parse(checkpoint.body()) == checkpoint
