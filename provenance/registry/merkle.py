"""RFC 6962 / RFC 9162 Merkle tree hashing, compact ranges, and inclusion and consistency proofs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


class ProofError(Exception):
    """A Merkle proof (or the sizes and hashes it is checked against) failed verification."""


def leaf_hash(data: bytes) -> bytes:
    """MTH of a one-entry tree: SHA-256(0x00 || data)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Interior node: SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


# -- tree hashes ----------------------------------------------------------------------------------


def _check_leaf_hashes(leaf_hashes: Sequence[bytes], count: int) -> None:
    for i in range(count):
        if len(leaf_hashes[i]) != HASH_SIZE:
            raise ValueError(f"leaf hash {i} has {len(leaf_hashes[i])} bytes, expected {HASH_SIZE}")


def _mth(leaf_hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) bottom-up; promoting an odd last node gives exactly RFC 6962's split tree."""
    if hi <= lo:
        return EMPTY_ROOT
    level = list(leaf_hashes[lo:hi])
    sha = _sha256
    while len(level) > 1:
        paired = [sha(b"\x01" + a + b).digest() for a, b in zip(level[0::2], level[1::2], strict=False)]
        if len(level) & 1:
            paired.append(level[-1])
        level = paired
    return level[0]


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Merkle Tree Hash (RFC 6962 section 2.1) of the given leaf hashes; n - 1 hashes, no recursion."""
    _check_leaf_hashes(leaf_hashes, len(leaf_hashes))
    return _mth(leaf_hashes, 0, len(leaf_hashes))


def _split(n: int) -> int:
    """The largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class CompactRange:
    """Frontier of an append-only tree: the perfect-subtree roots of size's binary decomposition.

    `hashes` is largest subtree first, one per set bit of `size`; `(size, hashes)` is the whole
    state, so a database can store it and resume with `CompactRange(size, hashes)`.
    """

    __slots__ = ("_size", "_hashes")

    def __init__(self, size: int = 0, hashes: Iterable[bytes] = ()) -> None:
        hashes = list(hashes)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"compact range size must be a non-negative int, got {size!r}")
        if len(hashes) != size.bit_count():
            raise ValueError(
                f"a compact range of size {size} holds {size.bit_count()} hashes, got {len(hashes)}"
            )
        for h in hashes:
            if not isinstance(h, bytes) or len(h) != HASH_SIZE:
                raise ValueError(f"compact range hashes must be {HASH_SIZE}-byte bytes")
        self._size = size
        self._hashes = hashes

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> list[bytes]:
        """A copy of the subtree roots, largest (leftmost) first."""
        return list(self._hashes)

    def append(self, leaf_hash: bytes) -> None:
        """Add one leaf hash: merge the equal-sized subtrees it completes (O(log n) hashes)."""
        if len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"leaf hash has {len(leaf_hash)} bytes, expected {HASH_SIZE}")
        stack = self._hashes
        h = bytes(leaf_hash)
        n = self._size
        while n & 1:
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self._size += 1

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        for h in leaf_hashes:
            self.append(h)

    def root(self) -> bytes:
        """MTH of the whole tree: fold the subtree roots from the right."""
        if not self._hashes:
            return EMPTY_ROOT
        r = self._hashes[-1]
        for h in reversed(self._hashes[:-1]):
            r = _sha256(b"\x01" + h + r).digest()
        return r

    def copy(self) -> CompactRange:
        return CompactRange(self._size, self._hashes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, hashes=[{len(self._hashes)} x 32 bytes])"


# -- proof generation (RFC 6962 section 2.1.1 and 2.1.2) -----------------------------------------


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]): the audit path, leaf excluded, bottom-up (RFC 9162 wire form).

    The sibling subtrees are disjoint, so the whole proof costs fewer than `size` hashes.
    """
    if not 0 <= size <= len(leaf_hashes):
        raise ValueError(f"tree size {size} outside 0..{len(leaf_hashes)}")
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} outside 0..{size - 1}")
    _check_leaf_hashes(leaf_hashes, size)
    return inclusion_proof_by(lambda lo, hi: _mth(leaf_hashes, lo, hi), index, size)


def inclusion_proof_by(subtree: Callable[[int, int], bytes], index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]) with `subtree(lo, hi)` giving MTH(D[lo:hi]): from the leaves, or
    from stored interior nodes (every range asked for is an RFC 6962 split of the tree)."""
    path: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree(lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_proof(leaf_hashes: Sequence[bytes], size1: int, size2: int) -> list[bytes]:
    """PROOF(size1, D[0:size2]) per RFC 6962 section 2.1.2; empty when size1 == size2.

    Requires 0 < size1 <= size2 (a proof from the empty tree is not defined). Fewer than
    `size2` hashes: every node of the proof is the root of a disjoint subtree.
    """
    if not 0 <= size2 <= len(leaf_hashes):
        raise ValueError(f"tree size {size2} outside 0..{len(leaf_hashes)}")
    if not 0 < size1 <= size2:
        raise ValueError(f"consistency proof needs 0 < size1 <= size2, got {size1}, {size2}")
    _check_leaf_hashes(leaf_hashes, size2)
    return consistency_proof_by(lambda lo, hi: _mth(leaf_hashes, lo, hi), size1, size2)


def consistency_proof_by(subtree: Callable[[int, int], bytes], size1: int, size2: int) -> list[bytes]:
    """PROOF(size1, D[0:size2]) with `subtree(lo, hi)` giving MTH(D[lo:hi])."""
    nodes: list[bytes] = []
    m, lo, hi, complete = size1, 0, size2, True
    while True:  # SUBPROOF(m, D[lo:hi], complete), unrolled
        n = hi - lo
        if m == n:
            if not complete:
                nodes.append(subtree(lo, hi))
            break
        k = _split(n)
        if m <= k:
            nodes.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            nodes.append(subtree(lo, lo + k))
            lo += k
            m -= k
            complete = False
    nodes.reverse()
    return nodes


# -- verification (RFC 9162 section 2.1.3.2 and 2.1.4.2) ------------------------------------------


def inclusion_proof_length(index: int, size: int) -> int:
    """Number of nodes in the audit path of leaf `index` in a tree of `size` leaves."""
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def consistency_proof_length(size1: int, size2: int) -> int:
    """Number of nodes in PROOF(size1, D[size2]) for 0 < size1 < size2."""
    fn, sn = size1 - 1, size2 - 1
    inner = (fn ^ sn).bit_length()
    border = (fn >> inner).bit_count()
    shift = (size1 & -size1).bit_length() - 1  # trailing zeros of size1 = trailing ones of fn
    power_of_two = size1 & (size1 - 1) == 0
    return inner - shift + border + (0 if power_of_two else 1)


def _check_sizes(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProofError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ProofError(f"{name} is negative ({value})")


def _check_nodes(proof: Sequence[bytes]) -> None:
    for i, node in enumerate(proof):
        if len(node) != HASH_SIZE:
            raise ProofError(f"proof node {i} has {len(node)} bytes, expected {HASH_SIZE}")


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise ProofError unless `proof` shows `leaf_hash` at `index` in the tree (`size`, `root`)."""
    _check_sizes(index=index, size=size)
    if index >= size:
        raise ProofError(f"leaf index {index} is not below tree size {size}")
    if len(leaf_hash) != HASH_SIZE:
        raise ProofError(f"leaf hash has {len(leaf_hash)} bytes, expected {HASH_SIZE}")
    want = inclusion_proof_length(index, size)
    if len(proof) != want:
        raise ProofError(
            f"inclusion proof for leaf {index} of {size} has {len(proof)} nodes, expected {want}"
        )
    _check_nodes(proof)
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = _sha256(b"\x01" + p + r).digest()
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = _sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    if r != root:
        raise ProofError("inclusion proof does not lead to the given root")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Raise ProofError unless `proof` shows tree (`size1`, `root1`) is a prefix of (`size2`, `root2`).

    As in the RFC 9162 vectors, size1 == 0 is always rejected (the proof is not defined there;
    every tree trivially extends the empty one, so callers special-case it themselves).
    """
    _check_sizes(size1=size1, size2=size2)
    if size1 > size2:
        raise ProofError(f"size1 ({size1}) is greater than size2 ({size2})")
    if size1 == 0:
        raise ProofError("consistency with an empty tree (size1 = 0) has no proof to check")
    if size1 == size2:
        if len(proof) != 0:
            raise ProofError(f"size1 == size2 needs an empty proof, got {len(proof)} nodes")
        if root1 != root2:
            raise ProofError("size1 == size2 but the roots differ")
        return
    want = consistency_proof_length(size1, size2)
    if len(proof) != want:
        raise ProofError(
            f"consistency proof {size1} -> {size2} has {len(proof)} nodes, expected {want}"
        )
    _check_nodes(proof)
    nodes = list(proof)
    if size1 & (size1 - 1) == 0:
        nodes.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = nodes[0]
    for c in nodes[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = _sha256(b"\x01" + c + fr).digest()
            sr = _sha256(b"\x01" + c + sr).digest()
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = _sha256(b"\x01" + sr + c).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the tree is deep")
    if fr != root1:
        raise ProofError("consistency proof does not lead to root1")
    if sr != root2:
        raise ProofError("consistency proof does not lead to root2")
