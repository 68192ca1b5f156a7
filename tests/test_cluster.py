"""A 2-process Dask LocalCluster gives the serial path's results: the same stamped bytes, the same
scores, and every suspect of a sweep reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numba
import numpy as np
import pytest

from benchmarks.synth import write_checkpoint
from tests.conftest import run_cli
from weightmark import Lab
from weightmark.cluster import Cluster, DerivedKeys
from weightmark.errors import KeyProblem
from weightmark.kernels import FLOAT, extract

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with Cluster(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def sharded_lab(tmp_path_factory: pytest.TempPathFactory):
    """A small llama in 4 shards, registered, with a licensee; and a byte copy of the lab home
    taken before any copy was issued (so both issue codeword 0 to the same licensee)."""
    work = tmp_path_factory.mktemp("cluster")
    base = write_checkpoint(work / "base", "llama-3.2-1b", scale=0.05, layers=2, shard_bytes=600_000).path
    assert len(list(base.glob("*.safetensors"))) >= 3
    home = work / "lab"
    with Lab.init(home, passphrase=None) as lab:
        lab.register_model(base, name="tiny-llama")
        lid = lab.add_licensee("Gamma Labs", "SE").id
        lab.add_licensee("Delta Labs", "NO")
    shutil.copytree(home, work / "lab-twin")
    return work, base, home, work / "lab-twin", lid


def test_extract_is_the_same_on_any_thread_count() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((517, 96)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 517)
    sums = []
    before = numba.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            num, den = np.zeros(128), np.zeros(128)
            extract(w, FLOAT, None, FLOAT, scale, 11, num, den)
            sums.append((num.tobytes(), den.tobytes()))
    finally:
        numba.set_num_threads(before)
    assert sums[0] == sums[1]


def test_worker_keys_hold_only_the_models_given() -> None:
    keys = DerivedKeys({"ab" * 32: b"k" * 32})
    assert keys.model_key("ab" * 32) == b"k" * 32
    with pytest.raises(KeyProblem):
        keys.model_key("cd" * 32)
    assert not hasattr(keys, "master_secret") and not hasattr(keys, "signing_key")


def test_cluster_stamp_and_scan_identical_to_serial(sharded_lab, cluster) -> None:
    work, base, home, twin, lid = sharded_lab
    with Lab(home, passphrase=lambda: None) as lab:
        serial = lab.stamp("tiny-llama", lid, work / "serial-copy", collusion=1)
    shards = len(list(base.glob("*.safetensors")))
    before = sum(cluster.client.run(_executed).values())
    with Lab(twin, passphrase=lambda: None) as lab:
        parallel = lab.stamp("tiny-llama", lid, work / "cluster-copy", collusion=1, cluster=cluster)
    assert serial.codeword_index == parallel.codeword_index == 0
    assert sum(cluster.client.run(_executed).values()) - before == shards  # one task per output shard
    names = sorted(p.name for p in (work / "serial-copy").iterdir())
    assert names == sorted(p.name for p in (work / "cluster-copy").iterdir())
    for name in names:
        assert (work / "serial-copy" / name).read_bytes() == (work / "cluster-copy" / name).read_bytes(), name
    assert not any(p.name.startswith(".") for p in (work / "cluster-copy").iterdir())
    with Lab(twin, passphrase=lambda: None) as lab:
        (entry,) = lab.registry.issued(lab.registry.model("tiny-llama").model_id)
        assert entry.out_path == str((work / "cluster-copy").resolve())
    with Lab(home, passphrase=lambda: None) as lab:
        one = lab.scan(work / "cluster-copy")
        before = sum(cluster.client.run(_executed).values())
        many = lab.scan(work / "cluster-copy", cluster=cluster)
        assert sum(cluster.client.run(_executed).values()) - before == shards  # one task per suspect shard
    assert [c.licensee_id for c in one.accused] == [lid]
    assert np.array_equal(one.z, many.z)
    assert [(c.entry_id, c.score, c.log10_p) for c in one.candidates] == \
        [(c.entry_id, c.score, c.log10_p) for c in many.candidates]
    assert one.to_json() == many.to_json()


def test_cluster_sweep_reports_every_suspect_like_serial(sharded_lab, cluster, tmp_path: Path) -> None:
    work, base, home, _, lid = sharded_lab
    with Lab(home, passphrase=lambda: None) as lab:
        copy = work / "sweep-copy"
        lab.stamp("tiny-llama", lab.registry.licensees()[1].id, copy, collusion=1)
    folder = tmp_path / "uploads"
    folder.mkdir()
    for i in range(17):
        shutil.copytree(copy if i % 2 else base, folder / f"upload-{i:02d}")
    (folder / "bad-1.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{not json")
    (folder / "bad-2.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (folder / "bad-3.safetensors").write_bytes(b"")
    serial = run_cli("scan", str(folder), "--json", home=home)
    # the CLI on the running cluster, found through $WEIGHTMARK_SCHEDULER
    before = sum(cluster.client.run(_executed).values())
    parallel = run_cli("scan", str(folder), "--json", home=home,
                       env={"WEIGHTMARK_SCHEDULER": cluster.client.scheduler.address})
    assert serial.returncode == parallel.returncode == 3, parallel.stderr
    lines = [json.loads(line) for line in serial.stdout.splitlines()]
    assert len(lines) == 20
    assert sum("error" in line for line in lines) == 3
    assert sum(bool(line.get("accused")) for line in lines) == 8
    assert [json.loads(line) for line in parallel.stdout.splitlines()] == lines
    assert sum(cluster.client.run(_executed).values()) - before == 17  # one task per readable suspect


def _executed(dask_worker) -> int:  # noqa: ANN001 (distributed passes its Worker)
    return dask_worker.state.executed_count


def test_cluster_scan_ships_the_alignment(sharded_lab, cluster) -> None:
    """A copy with permuted FFN units: the coordinator estimates the alignment once, the shard
    tasks read through it, and the result equals the serial scan's."""
    from weightmark.attacks import permute_ffn

    work, _, home, _, _ = sharded_lab
    with Lab(home, passphrase=lambda: None) as lab:
        lid = lab.registry.licensees()[0].id
        copy = work / "permuted-source"
        lab.stamp("tiny-llama", lid, copy, collusion=1)
        leak = permute_ffn(copy, work / "permuted-leak", seed=3)
        one = lab.scan(leak)
        many = lab.scan(leak, cluster=cluster)
    assert any(line.startswith("mlp of layer 0: rows permuted") for line in one.aligned)
    assert [c.licensee_id for c in one.accused] == [lid]
    assert one.to_json() == many.to_json()
    assert np.array_equal(one.z, many.z)


def test_cluster_stamps_and_scans_fused_experts_like_serial(cluster, tmp_path: Path) -> None:
    """Fused expert tensors' units (`<name>[e]`) go with the shard holding the tensor."""
    from tests.test_moe_fused import write_fused

    base = write_fused(tmp_path / "base", shards=3)
    home = tmp_path / "lab"
    with Lab.init(home, passphrase=None) as lab:
        lab.register_model(base, name="fused")
        lid = lab.add_licensee("Gamma Labs", "SE").id
    shutil.copytree(home, tmp_path / "twin")
    with Lab(home, passphrase=lambda: None) as lab:
        lab.stamp("fused", lid, tmp_path / "serial", collusion=1)
    with Lab(tmp_path / "twin", passphrase=lambda: None) as lab:
        lab.stamp("fused", lid, tmp_path / "parallel", collusion=1, cluster=cluster)
    for shard in sorted(base.glob("*.safetensors")):
        stamped = (tmp_path / "serial" / shard.name).read_bytes()
        assert stamped != shard.read_bytes()
        assert (tmp_path / "parallel" / shard.name).read_bytes() == stamped, shard.name
    with Lab(home, passphrase=lambda: None) as lab:
        one, many = lab.scan(tmp_path / "parallel"), lab.scan(tmp_path / "parallel", cluster=cluster)
    assert [c.licensee_id for c in one.accused] == [lid]
    assert one.to_json() == many.to_json()
