"""C2SP signed-note checkpoints: round trips, tampering at every byte, key ids and strict parsing."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from weightmark.registry.note import (
    MAX_NOTE_BYTES,
    Checkpoint,
    NoteError,
    note_key_id,
    parse_checkpoint,
    parse_note,
    sign_note,
    verifier_key,
    verify_note,
)

ORIGIN = "weightmark.example/log"
ROOT = hashlib.sha256(b"root").digest()
ROOT_B64 = base64.b64encode(ROOT).decode()
URLSAFE_B64 = base64.urlsafe_b64encode(bytes([0xFF]) * 32).decode()


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


OLD, NEW, STRANGER = _key(1), _key(2), _key(3)


def _trust(*keys: tuple[str, Ed25519PrivateKey]) -> dict:
    return {note_key_id(name, k.public_key()): (name, k.public_key()) for name, k in keys}


def _raw_pub(k: Ed25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _signed(body: bytes, name: str = ORIGIN, key: Ed25519PrivateKey = OLD) -> bytes:
    return sign_note(body, [(name, key)])


# -- keys ------------------------------------------------------------------------------------------


def test_key_id_and_vkey() -> None:
    pub = OLD.public_key()
    want = hashlib.sha256(b"example.com/log\n\x01" + _raw_pub(OLD)).digest()[:4]
    assert note_key_id("example.com/log", pub) == want
    vkey = verifier_key("example.com/log", pub)
    name, hex_id, blob = vkey.split("+")
    assert name == "example.com/log" and hex_id == want.hex() and len(hex_id) == 8
    assert base64.b64decode(blob) == b"\x01" + _raw_pub(OLD)
    assert note_key_id("other", pub) != want  # the name is part of the id
    for bad in ("", "a b", "a+b", "tab\there"):
        with pytest.raises(NoteError):
            note_key_id(bad, pub)


# -- checkpoints -----------------------------------------------------------------------------------


def test_checkpoint_body_and_round_trip() -> None:
    cp = Checkpoint(ORIGIN, 42, ROOT)
    assert cp.body() == f"{ORIGIN}\n42\n{ROOT_B64}\n".encode()
    assert parse_checkpoint(cp.body()) == cp
    ext = Checkpoint(ORIGIN, 0, ROOT, ("— grease line", "x"))
    assert ext.body().endswith(b"\nx\n")
    assert parse_checkpoint(ext.body()) == ext
    note = sign_note(ext.body(), [(ORIGIN, OLD)])
    parsed, sigs = parse_note(note)
    assert parsed == ext
    assert [(n, k) for n, k, _ in sigs] == [(ORIGIN, note_key_id(ORIGIN, OLD.public_key()))]
    assert verify_note(note, _trust((ORIGIN, OLD))) == ext


def test_note_layout() -> None:
    body = Checkpoint(ORIGIN, 7, ROOT).body()
    note = _signed(body)
    text = note.decode()
    head, sig = text.split("\n\n")
    assert head + "\n" == body.decode()
    assert sig.startswith("\u2014 " + ORIGIN + " ") and sig.endswith("\n") and sig.count("\n") == 1
    blob = base64.b64decode(sig.rstrip("\n").split(" ")[2])
    assert len(blob) == 68
    assert blob[:4] == note_key_id(ORIGIN, OLD.public_key())
    OLD.public_key().verify(blob[4:], body)  # the signature covers the body incl. its final \n


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(origin="", size=1, root=ROOT),
        dict(origin="two words", size=1, root=ROOT),
        dict(origin="a\nb", size=1, root=ROOT),
        dict(origin=ORIGIN, size=-1, root=ROOT),
        dict(origin=ORIGIN, size=1 << 64, root=ROOT),
        dict(origin=ORIGIN, size=True, root=ROOT),
        dict(origin=ORIGIN, size=1, root=ROOT[:31]),
        dict(origin=ORIGIN, size=1, root=ROOT, extensions=("",)),
        dict(origin=ORIGIN, size=1, root=ROOT, extensions=("a\nb",)),
        dict(origin=ORIGIN, size=1, root=ROOT, extensions=("a\rb",)),
    ],
)
def test_checkpoint_rejects_bad_fields(kwargs: dict) -> None:
    with pytest.raises(NoteError):
        Checkpoint(**kwargs)


# -- verification ----------------------------------------------------------------------------------


def test_untrusted_signature_fails() -> None:
    note = _signed(Checkpoint(ORIGIN, 3, ROOT).body(), key=STRANGER)
    with pytest.raises(NoteError, match="no signature by a trusted key"):
        verify_note(note, _trust((ORIGIN, OLD)))
    with pytest.raises(NoteError, match="no signature by a trusted key"):
        verify_note(note, {})


def test_handover_note_verifies_with_either_key() -> None:
    body = Checkpoint(ORIGIN, 100, ROOT).body()
    note = sign_note(body, [("lab-2024", OLD), ("lab-2025", NEW)])
    _cp, sigs = parse_note(note)
    assert [name for name, _, _ in sigs] == ["lab-2024", "lab-2025"]
    for trusted in (
        _trust(("lab-2024", OLD)),
        _trust(("lab-2025", NEW)),
        _trust(("lab-2024", OLD), ("lab-2025", NEW)),
    ):
        assert verify_note(note, trusted).size == 100
    with pytest.raises(NoteError):
        verify_note(note, _trust(("lab-2026", STRANGER)))


def test_bad_signature_by_trusted_key_is_an_error_even_next_to_a_good_one() -> None:
    body = Checkpoint(ORIGIN, 5, ROOT).body()
    good = sign_note(body, [("a", OLD)])
    other_body = Checkpoint(ORIGIN, 6, ROOT).body()
    wrong = sign_note(other_body, [("b", NEW)]).split(b"\n\n")[1]  # NEW's line over another body
    note = good + wrong
    assert len(parse_note(note)[1]) == 2
    assert verify_note(note, _trust(("a", OLD))).size == 5  # NEW unknown: its line is ignored
    with pytest.raises(NoteError, match="invalid signature by trusted key 'b'"):
        verify_note(note, _trust(("a", OLD), ("b", NEW)))


def test_trusted_key_id_under_another_name_is_an_error() -> None:
    body = Checkpoint(ORIGIN, 5, ROOT).body()
    note = sign_note(body, [("a", OLD)]).replace("— a ".encode(), "— z ".encode())
    with pytest.raises(NoteError, match="trusted as 'a'"):
        verify_note(note, _trust(("a", OLD)))


def test_expected_origin_and_inconsistent_trust_table() -> None:
    note = _signed(Checkpoint(ORIGIN, 5, ROOT).body())
    assert verify_note(note, _trust((ORIGIN, OLD)), origin=ORIGIN).size == 5
    with pytest.raises(NoteError, match="origin"):
        verify_note(note, _trust((ORIGIN, OLD)), origin="elsewhere")
    with pytest.raises(ValueError, match="trusted key table"):
        verify_note(note, {b"\0\0\0\0": (ORIGIN, OLD.public_key())})


def _flipped(note: bytes) -> list[tuple[int, bytes]]:
    """Each byte of the note XORed with 0x01, with 0x80, and replaced by another ASCII letter."""
    out = []
    for pos in range(len(note)):
        for new in (note[pos] ^ 0x01, note[pos] ^ 0x80, ord("A") if note[pos] != ord("A") else ord("B")):
            bad = bytearray(note)
            bad[pos] = new
            out.append((pos, bytes(bad)))
    return out


def test_every_byte_flip_is_caught() -> None:
    body = Checkpoint("o", 1, ROOT, ("e",)).body()
    note = sign_note(body, [("k1", OLD)])
    trusted = _trust(("k1", OLD))
    assert verify_note(note, trusted).size == 1
    variants = _flipped(note)
    assert len(variants) == 3 * len(note)
    for pos, bad in variants:
        with pytest.raises(NoteError):
            verify_note(bad, trusted)
            pytest.fail(f"flip at byte {pos} verified")


def test_two_signer_flips_only_survive_as_unknown_keys() -> None:
    """With two trusted signers, a flip inside one line's key id turns that line into a signature
    by an unknown key, which the spec says to ignore; the other signature still carries the
    (unchanged) checkpoint. Every other flip fails."""
    body = Checkpoint("o", 1, ROOT, ("e",)).body()
    keys = [("k1", OLD), ("k2", NEW)]
    note = sign_note(body, keys)
    trusted = _trust(*keys)
    blob_starts = [note.index(f" {name} ".encode()) + len(name) + 2 for name, _ in keys]
    survivors = 0
    for pos, bad in _flipped(note):
        try:
            checkpoint = verify_note(bad, trusted)
        except NoteError:
            continue
        survivors += 1
        assert any(start <= pos < start + 6 for start in blob_starts), pos  # the key id chars
        assert checkpoint == parse_note(note)[0]
        assert sum(key_id in trusted for _n, key_id, _s in parse_note(bad)[1]) == 1
    assert survivors > 0


def test_truncation_and_extension_are_caught() -> None:
    note = _signed(Checkpoint(ORIGIN, 9, ROOT).body())
    trusted = _trust((ORIGIN, OLD))
    for cut in range(len(note)):
        with pytest.raises(NoteError):
            verify_note(note[:cut], trusted)
    for extra in (b"x", b"\n", b"\xe2\x80\x94 x AAAA\n"):
        with pytest.raises(NoteError):
            verify_note(note + extra, trusted)


# -- malformed notes -------------------------------------------------------------------------------


def _note_from(body_text: str, key: Ed25519PrivateKey = OLD) -> bytes:
    """A note whose body we write by hand, signed with the real key so only the body is at fault."""
    body = body_text.encode()
    blob = base64.b64encode(note_key_id(ORIGIN, key.public_key()) + key.sign(body)).decode()
    return body + f"\n\u2014 {ORIGIN} {blob}\n".encode()


@pytest.mark.parametrize(
    "body_text, rule",
    [
        (f"{ORIGIN}\n007\n{ROOT_B64}\n", "leading zeros"),
        (f"{ORIGIN}\n00\n{ROOT_B64}\n", "leading zeros"),
        (f"{ORIGIN}\n+7\n{ROOT_B64}\n", "leading zeros"),
        (f"{ORIGIN}\n-1\n{ROOT_B64}\n", "leading zeros"),
        (f"{ORIGIN}\n\u0667\n{ROOT_B64}\n", "ASCII decimal"),  # ARABIC-INDIC DIGIT SEVEN
        (f"{ORIGIN}\n 7\n{ROOT_B64}\n", "ASCII decimal"),
        (f"{ORIGIN}\n18446744073709551616\n{ROOT_B64}\n", "64 bits"),
        (f"{ORIGIN}\n7\n{ROOT_B64[:-1]}\n", "base64"),
        (f"{ORIGIN}\n7\n{ROOT_B64.rstrip('=')}\n", "base64"),
        (f"{ORIGIN}\n7\n{ROOT_B64[:20]}*{ROOT_B64[21:]}\n", "base64"),
        (f"{ORIGIN}\n7\n{URLSAFE_B64}\n", "base64"),
        (f"{ORIGIN}\n7\n{base64.b64encode(ROOT[:31]).decode()}\n", "31 bytes"),
        (f"{ORIGIN}\n7\n{base64.b64encode(ROOT + b'x').decode()}\n", "33 bytes"),
        (f"{ORIGIN}\n7\n{ROOT_B64[:42]}R=\n", "canonical"),  # same bytes, non-zero pad bits
        (f"{ORIGIN}\n7\n", "origin, tree size and root"),
        (f"\n7\n{ROOT_B64}\n", "blank line"),
        (f"{ORIGIN}\n7\n{ROOT_B64}\n\next\n", "blank line"),
        (f"{ORIGIN} x\n7\n{ROOT_B64}\n", "spaces"),
        (f"{ORIGIN}\n7\n{ROOT_B64}\nbad\tline\n", "control character"),
    ],
)
def test_malformed_bodies_are_rejected(body_text: str, rule: str) -> None:
    note = _note_from(body_text)
    with pytest.raises(NoteError, match=rule):
        parse_note(note)
    with pytest.raises(NoteError, match=rule):
        verify_note(note, _trust((ORIGIN, OLD)))


def test_malformed_notes_are_rejected() -> None:
    good = _signed(Checkpoint(ORIGIN, 7, ROOT).body())
    body, sig = good.split(b"\n\n")
    sig_line = sig.decode()
    name, blob = sig_line[2:].rstrip("\n").split(" ")
    raw = base64.b64decode(blob)
    cases = {
        "blank line": body + b"\n" + sig,  # missing blank line
        "carriage return": good.replace(b"\n", b"\r\n"),
        "em dash": body + b"\n\n" + sig_line.replace("\u2014", "-").encode(),
        "em dash (U+2014)": body + b"\n\n" + sig_line.replace("\u2014 ", "\u2014").encode(),
        "no signature lines": body + b"\n\n",
        "end with a newline": good.rstrip(b"\n"),
        "UTF-8": good.replace("\u2014".encode(), b"\xe2\x80"),
        "<key name> <base64": body + b"\n\n" + f"\u2014 {name}  {blob}\n".encode(),
        "non-empty": body + b"\n\n" + f"\u2014  {blob}\n".encode(),
        "'+'": body + b"\n\n" + f"\u2014 a+b {blob}\n".encode(),
        "signature is not valid": body + b"\n\n" + f"\u2014 {name} {blob[:-2]}\n".encode(),
        "4-byte key id": body + b"\n\n" + f"\u2014 {name} {base64.b64encode(raw[:4]).decode()}\n".encode(),
        "more than 100": body + b"\n\n" + sig * 101,
        "limit is": body + b"\n\n" + sig * ((MAX_NOTE_BYTES // len(sig)) + 1),
    }
    for rule, note in cases.items():
        with pytest.raises(NoteError, match=re.escape(rule)):
            parse_note(note)
    with pytest.raises(NoteError, match="Ed25519 needs 64"):
        short = base64.b64encode(raw[:-1]).decode()
        verify_note(body + b"\n\n" + f"\u2014 {name} {short}\n".encode(), _trust((ORIGIN, OLD)))


def test_unknown_signature_types_parse_but_do_not_count() -> None:
    """A line from an unknown key may have any length >= 5 bytes; verify ignores it."""
    good = _signed(Checkpoint(ORIGIN, 7, ROOT).body())
    other = base64.b64encode(b"\xde\xad\xbe\xef" + b"x" * 10).decode()
    note = good + f"\u2014 other-log {other}\n".encode()
    assert len(parse_note(note)[1]) == 2
    assert verify_note(note, _trust((ORIGIN, OLD))).size == 7


def test_sign_note_checks_its_input() -> None:
    body = Checkpoint(ORIGIN, 7, ROOT).body()
    with pytest.raises(NoteError, match="at least one signer"):
        sign_note(body, [])
    with pytest.raises(NoteError, match="end with a newline"):
        sign_note(body.rstrip(b"\n"), [(ORIGIN, OLD)])
    with pytest.raises(NoteError, match="blank line"):
        sign_note(body + b"\n", [(ORIGIN, OLD)])
    with pytest.raises(NoteError, match="carriage return"):
        sign_note(body.replace(b"\n", b"\r\n"), [(ORIGIN, OLD)])
    with pytest.raises(NoteError, match="spaces"):
        sign_note(body, [("two words", OLD)])
