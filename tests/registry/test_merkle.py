"""RFC 6962 / RFC 9162 Merkle trees: known answers, the transparency-dev vectors and round trips."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightmark.registry import merkle
from weightmark.registry.merkle import (
    EMPTY_ROOT,
    CompactRange,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).resolve().parents[1] / "data" / "rfc6962"
REFERENCE_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
REFERENCE_HASHES = [leaf_hash(x) for x in REFERENCE_LEAVES]
REFERENCE_ROOT_B64 = "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg="


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _vector_files(kind: str) -> list[Path]:
    return sorted((VECTORS / kind).rglob("*.json"))


def _listing(kind: str) -> int:
    """JSON files under the folder, counted independently of pathlib's rglob."""
    return sum(
        name.endswith(".json") for _dir, _sub, names in os.walk(VECTORS / kind) for name in names
    )


INCLUSION_FILES = _vector_files("inclusion")
CONSISTENCY_FILES = _vector_files("consistency")


def _ids(files: list[Path]) -> list[str]:
    return [str(f.relative_to(VECTORS)) for f in files]


def _check_inclusion_vector(v: dict[str, Any]) -> None:
    proof = [_b64(p) for p in v["proof"] or []]
    verify_inclusion(_b64(v["leafHash"]), v["leafIdx"], v["treeSize"], proof, _b64(v["root"]))


def _check_consistency_vector(v: dict[str, Any]) -> None:
    proof = [_b64(p) for p in v["proof"] or []]
    verify_consistency(v["size1"], v["size2"], proof, _b64(v["root1"]), _b64(v["root2"]))


def _outcome(path: Path) -> tuple[bool, bool]:
    """(wantErr, raised ProofError) for one vector file."""
    v = json.loads(path.read_text())
    check = _check_inclusion_vector if "leafIdx" in v else _check_consistency_vector
    try:
        check(v)
    except ProofError:
        return v["wantErr"], True
    return v["wantErr"], False


# -- known answers --------------------------------------------------------------------------------


def test_hash_definitions() -> None:
    assert EMPTY_ROOT.hex().startswith("e3b0c442")
    assert root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    assert root([a]) == a
    assert root([a, b]) == node_hash(a, b)


def test_reference_tree_root() -> None:
    assert base64.b64encode(root(REFERENCE_HASHES)).decode() == REFERENCE_ROOT_B64
    assert root(REFERENCE_HASHES).hex().startswith("5dc9da79")


def _recursive_mth(hashes: list[bytes]) -> bytes:
    """The RFC 6962 definition, literally (test oracle only; small n)."""
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return node_hash(_recursive_mth(hashes[:k]), _recursive_mth(hashes[k:]))


@pytest.mark.parametrize("n", range(0, 70))
def test_root_matches_the_recursive_definition(n: int) -> None:
    hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    assert root(hashes) == _recursive_mth(hashes)


def test_happy_path_vectors_match_generated_proofs() -> None:
    """Our generator reproduces the vectors' proofs and roots for the reference leaves."""
    for path in _vector_files("inclusion"):
        v = json.loads(path.read_text())
        if path.name != "happy-path.json":
            continue
        size, index = v["treeSize"], v["leafIdx"]
        assert root(REFERENCE_HASHES[:size]) == _b64(v["root"])
        assert leaf_hash(REFERENCE_LEAVES[index]) == _b64(v["leafHash"])
        assert inclusion_proof(REFERENCE_HASHES, index, size) == [_b64(p) for p in v["proof"] or []]
    for path in _vector_files("consistency"):
        v = json.loads(path.read_text())
        if path.name != "happy-path.json":
            continue
        size1, size2 = v["size1"], v["size2"]
        assert root(REFERENCE_HASHES[:size1]) == _b64(v["root1"])
        assert root(REFERENCE_HASHES[:size2]) == _b64(v["root2"])
        want = [_b64(p) for p in v["proof"] or []]
        assert consistency_proof(REFERENCE_HASHES, size1, size2) == want


# -- the transparency-dev vectors -----------------------------------------------------------------


@pytest.mark.parametrize("path", INCLUSION_FILES + CONSISTENCY_FILES, ids=_ids(INCLUSION_FILES + CONSISTENCY_FILES))
def test_vector(path: Path) -> None:
    want_err, raised = _outcome(path)
    assert raised == want_err, f"{path.name}: wantErr={want_err} but ProofError raised={raised}"


def test_vector_count(capsys: pytest.CaptureFixture[str]) -> None:
    """Every JSON file in the folders was checked, both outcomes occur, and the tally is printed."""
    assert len(INCLUSION_FILES) == _listing("inclusion") > 0
    assert len(CONSISTENCY_FILES) == _listing("consistency") > 0
    tally = {"verified": 0, "rejected": 0}
    for path in INCLUSION_FILES + CONSISTENCY_FILES:
        want_err, raised = _outcome(path)
        assert raised == want_err, path
        tally["rejected" if raised else "verified"] += 1
    assert tally["verified"] > 0 and tally["rejected"] > 0
    assert sum(tally.values()) == _listing("inclusion") + _listing("consistency")
    with capsys.disabled():
        print(
            f"\nRFC 6962 vectors: {len(INCLUSION_FILES)} inclusion + {len(CONSISTENCY_FILES)} "
            f"consistency files; {tally['verified']} verified, {tally['rejected']} rejected"
        )


# -- compact range ---------------------------------------------------------------------------------


def _leaves(n: int, salt: bytes = b"") -> list[bytes]:
    """n distinct leaf hashes (distinct so that no proof is legitimately valid at two indices)."""
    return [leaf_hash(salt + i.to_bytes(4, "big")) for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 700), st.binary(max_size=8))
def test_compact_range_root_equals_root(n: int, salt: bytes) -> None:
    hashes = _leaves(n, salt)
    cr = CompactRange()
    for i, h in enumerate(hashes):
        assert cr.size == i
        assert len(cr.hashes) == i.bit_count()
        cr.append(h)
    assert cr.size == n
    assert cr.root() == root(hashes)
    # hashes are the perfect subtree roots of the binary decomposition, largest first
    lo = 0
    expected = []
    for bit in reversed(range(n.bit_length())):
        if n >> bit & 1:
            expected.append(root(hashes[lo : lo + (1 << bit)]))
            lo += 1 << bit
    assert cr.hashes == expected


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 400), st.data())
def test_compact_range_resumes_from_its_state(n: int, data: st.DataObject) -> None:
    hashes = _leaves(n)
    cut = data.draw(st.integers(0, n))
    first = CompactRange()
    first.extend(hashes[:cut])
    size, stored = first.size, first.hashes  # what a database would keep
    resumed = CompactRange(size, stored)
    assert resumed == first
    resumed.extend(hashes[cut:])
    assert resumed.root() == root(hashes)
    assert first.size == cut  # hashes was a copy


def test_compact_range_every_prefix() -> None:
    hashes = _leaves(300)
    cr = CompactRange()
    assert cr.root() == EMPTY_ROOT
    for i, h in enumerate(hashes):
        cr.append(h)
        assert cr.root() == root(hashes[: i + 1])


def test_compact_range_rejects_bad_state() -> None:
    h = leaf_hash(b"x")
    with pytest.raises(ValueError):
        CompactRange(3, [h])  # 3 = 2 + 1 needs two hashes
    with pytest.raises(ValueError):
        CompactRange(-1, [])
    with pytest.raises(ValueError):
        CompactRange(1, [b"short"])
    with pytest.raises(ValueError):
        CompactRange().append(b"short")


def test_large_tree_is_iterative() -> None:
    n = 100_003
    hashes = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]
    cr = CompactRange()
    cr.extend(hashes)
    assert cr.root() == root(hashes)
    index = 77_777
    proof = inclusion_proof(hashes, index, n)
    assert len(proof) == 17
    verify_inclusion(hashes[index], index, n, proof, cr.root())
    cproof = consistency_proof(hashes, 65_537, n)
    verify_consistency(65_537, n, cproof, root(hashes[:65_537]), cr.root())


def test_proof_generation_hashes_fewer_than_n(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = hashlib.sha256

    def counting(data: bytes = b"") -> Any:
        nonlocal calls
        calls += 1
        return real(data)

    n = 5000
    hashes = _leaves(n)
    monkeypatch.setattr(merkle, "_sha256", counting)
    for index in (0, 1, 2047, 2048, 4095, 4999):
        calls = 0
        inclusion_proof(hashes, index, n)
        assert calls < n
    for size1 in (1, 3, 2048, 4097, 4999):
        calls = 0
        consistency_proof(hashes, size1, n)
        assert calls < n


# -- round trips and tampering ----------------------------------------------------------------------


def _flips(proof: list[bytes]) -> list[list[bytes]]:
    """Every proof with exactly one bit flipped."""
    out = []
    for i, node in enumerate(proof):
        for bit in range(len(node) * 8):
            changed = bytearray(node)
            changed[bit // 8] ^= 1 << (bit % 8)
            out.append(proof[:i] + [bytes(changed)] + proof[i + 1 :])
    return out


def _drops_and_adds(proof: list[bytes], extra: bytes) -> list[list[bytes]]:
    out = [proof[:i] + proof[i + 1 :] for i in range(len(proof))]
    for i in range(len(proof) + 1):
        out.append(proof[:i] + [extra] + proof[i:])
        if proof:
            out.append(proof[:i] + [proof[min(i, len(proof) - 1)]] + proof[i:])  # a duplicate
    return out


def _rejects(fn: Any, *args: Any) -> bool:
    try:
        fn(*args)
    except ProofError:
        return True
    return False


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.data())
def test_inclusion_round_trip_and_tampering(n: int, data: st.DataObject) -> None:
    hashes = _leaves(n + 1)
    r = root(hashes[:n])
    for i in range(n):
        verify_inclusion(hashes[i], i, n, inclusion_proof(hashes, i, n), r)

    i = data.draw(st.integers(0, n - 1), label="index")
    proof = inclusion_proof(hashes, i, n)
    extra = data.draw(st.binary(min_size=32, max_size=32), label="extra node")
    for bad in _flips(proof) + _drops_and_adds(proof, extra):
        assert _rejects(verify_inclusion, hashes[i], i, n, bad, r)
    for bad_leaf in _flips([hashes[i]]):
        assert _rejects(verify_inclusion, bad_leaf[0], i, n, proof, r)
    for bad_root in _flips([r]):
        assert _rejects(verify_inclusion, hashes[i], i, n, proof, bad_root[0])
    for j in (i - 1, i + 1, i ^ 1, n, n + 1):  # neighbour indices (and out-of-range ones)
        if j != i and j >= 0:
            assert _rejects(verify_inclusion, hashes[i], j, n, proof, r)
    for m in (n - 1, n + 1, 2 * n):  # neighbour sizes, each with its own true root
        if m >= 1:
            m_root = root(_leaves(m)) if m > n + 1 else root(hashes[:m])
            assert _rejects(verify_inclusion, hashes[i], i, m, proof, m_root)
    assert _rejects(verify_inclusion, hashes[n], i, n, proof, r)  # a leaf not in the tree


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.data())
def test_consistency_round_trip_and_tampering(n: int, data: st.DataObject) -> None:
    hashes = _leaves(n + 1)
    roots = [root(hashes[:k]) for k in range(n + 2)]
    for m in range(1, n + 1):
        verify_consistency(m, n, consistency_proof(hashes, m, n), roots[m], roots[n])

    m = data.draw(st.integers(1, n), label="size1")
    proof = consistency_proof(hashes, m, n)
    extra = data.draw(st.binary(min_size=32, max_size=32), label="extra node")
    for bad in _flips(proof) + _drops_and_adds(proof, extra):
        assert _rejects(verify_consistency, m, n, bad, roots[m], roots[n])
    for bad_root in _flips([roots[m]]):
        assert _rejects(verify_consistency, m, n, proof, bad_root[0], roots[n])
    for bad_root in _flips([roots[n]]):
        assert _rejects(verify_consistency, m, n, proof, roots[m], bad_root[0])
    for m2, n2 in ((m - 1, n), (m + 1, n), (m, n + 1), (m, n - 1)):
        if (m2, n2) != (m, n) and 0 <= m2 and 0 <= n2 <= n + 1:
            assert _rejects(verify_consistency, m2, n2, proof, roots[m2], roots[n2])
    if m < n:
        assert _rejects(verify_consistency, m, n, proof, roots[n], roots[m])  # swapped roots
        assert _rejects(verify_consistency, n, m, proof, roots[n], roots[m])  # swapped sizes


def test_root_binds_the_size_not_the_proof() -> None:
    """PATH(0, D[5]) has the shape of PATH(0, D[6]): checked against size 6 and the *size-5* root it
    verifies, which is harmless only because a checkpoint signs (size, root) together."""
    hashes = _leaves(6)
    proof = inclusion_proof(hashes, 0, 5)
    verify_inclusion(hashes[0], 0, 6, proof, root(hashes[:5]))
    with pytest.raises(ProofError):
        verify_inclusion(hashes[0], 0, 6, proof, root(hashes))


# -- edge cases and argument checking -------------------------------------------------------------


def test_verify_edge_cases() -> None:
    h = _leaves(2)
    r1 = root(h[:1])
    with pytest.raises(ProofError, match="not below"):
        verify_inclusion(h[0], 0, 0, [], EMPTY_ROOT)
    with pytest.raises(ProofError, match="not below"):
        verify_inclusion(h[0], 1, 1, [], r1)
    with pytest.raises(ProofError, match="negative"):
        verify_inclusion(h[0], -1, 1, [], r1)
    with pytest.raises(ProofError, match="leaf hash"):
        verify_inclusion(h[0][:31], 0, 1, [], h[0][:31])
    verify_inclusion(h[0], 0, 1, [], r1)
    verify_consistency(1, 1, [], r1, r1)
    verify_consistency(2, 2, [], root(h), root(h))
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(0, 2, [], EMPTY_ROOT, root(h))
    with pytest.raises(ProofError, match="greater"):
        verify_consistency(2, 1, [], root(h), r1)
    with pytest.raises(ProofError, match="empty proof"):
        verify_consistency(1, 1, [r1], r1, r1)
    with pytest.raises(ProofError, match="roots differ"):
        verify_consistency(1, 1, [], r1, h[1])
    with pytest.raises(ProofError):
        verify_consistency(True, 2, [h[1]], r1, root(h))  # type: ignore[arg-type]


def test_generation_argument_checks() -> None:
    h = _leaves(4)
    assert consistency_proof(h, 4, 4) == []
    assert inclusion_proof(h, 0, 1) == []
    for args in ((h, 4, 4), (h, -1, 4), (h, 0, 5), (h, 0, 0)):
        with pytest.raises(ValueError):
            inclusion_proof(*args)
    for args in ((h, 0, 4), (h, 3, 2), (h, 1, 5)):
        with pytest.raises(ValueError):
            consistency_proof(*args)
    with pytest.raises(ValueError):
        root([b"short"])
