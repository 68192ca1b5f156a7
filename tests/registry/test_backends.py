"""The registry and its log behave the same on SQLite and on PostgreSQL (byte-identical proofs)."""

from __future__ import annotations

from pathlib import Path

from weightmark import Lab
from weightmark.registry import merkle


def test_smoke(tmp_path: Path, registry_location: str | None) -> None:
    home = tmp_path / "home"
    with Lab.init(home, passphrase=None, registry=registry_location) as lab:
        for i in range(5):
            lab.add_licensee(f"lic {i}", "DE")
    with Lab(home, passphrase=None) as lab:
        assert lab.verify_log().size == 6
        reg = lab.registry
        leaves = reg.leaf_hashes(6)
        for size in range(1, 7):
            for i in range(size):
                assert reg.inclusion_proof(i, size) == merkle.inclusion_proof(leaves, i, size)
