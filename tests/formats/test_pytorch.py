"""PyTorch checkpoints read without torch: values bit-exact against torch's own (fixtures written
by real torch, tests/data/make_torch_fixtures.py), bounds checks, and hostile pickles refused
through the real CLI before anything in them runs."""

from __future__ import annotations

import pickle
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.formats.torch_writer import (
    global_op,
    integer,
    save_state_dict,
    state_dict_pickle,
    tensor_op,
    unicode,
    write_archive,
)
from weightmark.errors import FormatError
from weightmark.formats import open_suspect
from weightmark.formats.pytorch import PyTorchModel, read_state_dict

DATA = Path(__file__).resolve().parents[1] / "data" / "torch"


def _same_bits(ours: np.ndarray, theirs: np.ndarray, name: str) -> None:
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    assert ours.dtype.itemsize == theirs.dtype.itemsize, (name, ours.dtype, theirs.dtype)
    bits = f"u{ours.dtype.itemsize}"
    diff = np.flatnonzero(ours.view(bits) != theirs.view(bits))
    assert diff.size == 0, f"{name}: {diff.size} elements differ, first at flat index {diff[:5]}"


def _expected(npz: str) -> dict[str, np.ndarray]:
    with np.load(DATA / npz) as data:
        return {key: data[key] for key in data.files}


# --------------------------------------------------------------------------------------------
# Values, against torch


def test_state_dict_values_match_torch_bit_for_bit() -> None:
    expected = _expected("state_dict.npz")
    with open_suspect(DATA / "state_dict.pt") as suspect:
        assert isinstance(suspect, PyTorchModel) and suspect.format == "pytorch"
        metas = suspect.tensors()
        floats = {k for k in expected if not k.endswith(".bits")}
        assert set(metas) == floats  # the int64 buffer is no weight
        for name in floats:
            _same_bits(suspect.load(name), expected[name], name)
        assert metas["bf16"].source_dtype == "BF16" and metas["f16"].source_dtype == "F16"
        assert metas["f8"].source_dtype == "F8_E4M3" and metas["view"].shape == (28, 12)
    raw = read_state_dict(DATA / "state_dict.pt")
    for name, value in raw.items():
        _same_bits(value, expected[f"{name}.bits"], name)
    assert raw["i64"].tolist() == list(range(17))


def test_views_and_shared_storages_are_what_torch_says() -> None:
    """The strided view (storage offset 79, strides (36, 3)), the transposed tensor and the two
    halves of one storage each come out as torch saw them, not as their storage's prefix."""
    expected = _expected("state_dict.npz")
    with open_suspect(DATA / "state_dict.pt") as suspect:
        view = suspect.load("view")
        shared_a, shared_b = suspect.load("shared_a"), suspect.load("shared_b")
        transposed = suspect.load("view_t")
    assert view.flags.c_contiguous and view.flags.writeable
    _same_bits(view, expected["view"], "view")
    _same_bits(transposed, expected["view_t"], "view_t")
    assert not np.array_equal(shared_a, shared_b)
    _same_bits(np.concatenate([shared_a, shared_b]), np.concatenate([expected["shared_a"], expected["shared_b"]]), "shared")


def test_sharded_folder_with_index() -> None:
    expected = _expected("sharded.npz")
    with open_suspect(DATA / "sharded") as suspect:
        assert suspect.format == "pytorch"
        assert set(suspect.tensors()) == {k for k in expected if not k.endswith(".bits")}
        for name in suspect.tensors():
            _same_bits(suspect.load(name), expected[name], name)


def test_sharded_index_naming_a_missing_shard_is_refused(tmp_path: Path) -> None:
    folder = shutil.copytree(DATA / "sharded", tmp_path / "sharded")
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FormatError, match="names shard 'pytorch_model-00002-of-00002.bin', which is missing"):
        open_suspect(folder)


def test_meta_consolidated_maps_to_hugging_face_names_and_rope_order() -> None:
    expected = _expected("meta.npz")
    with open_suspect(DATA / "meta") as suspect:
        assert suspect.format == "pytorch-meta"
        names = set(suspect.tensors())
        assert names == {k for k in expected if not k.endswith(".bits")}
        for name in names:
            _same_bits(suspect.load(name), expected[name], name)
        assert suspect.tensors()["model.layers.0.self_attn.q_proj.weight"].source_name == "layers.0.attention.wq.weight"


def test_meta_without_params_keeps_q_and_k_under_meta_names(tmp_path: Path) -> None:
    """Without head counts the q/k rows cannot be brought to Hugging Face order: they are not
    offered under Hugging Face names (a scan would skip them, never misread them)."""
    shutil.copy(DATA / "meta" / "consolidated.00.pth", tmp_path / "consolidated.00.pth")
    with open_suspect(tmp_path) as suspect:
        names = set(suspect.tensors())
    assert "layers.0.attention.wq.weight" in names and "model.layers.0.self_attn.q_proj.weight" not in names
    assert "model.layers.0.self_attn.v_proj.weight" in names


def test_model_parallel_meta_shards_are_refused(tmp_path: Path) -> None:
    for k in range(2):
        shutil.copy(DATA / "meta" / "consolidated.00.pth", tmp_path / f"consolidated.0{k}.pth")
    with pytest.raises(FormatError, match="model-parallel Meta shards"):
        open_suspect(tmp_path)


def test_our_writer_agrees_with_our_reader(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    f32 = rng.standard_normal((33, 65)).astype(np.float32)
    bf16 = (rng.standard_normal((16, 8)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    path = save_state_dict(tmp_path / "w.pt", {"a.weight": ("F32", f32), "b.weight": ("BF16", bf16)})
    with open_suspect(path) as suspect:
        _same_bits(suspect.load("a.weight"), f32, "a")
        _same_bits(suspect.load("b.weight"), (bf16.astype(np.uint32) << 16).view(np.float32), "b")


# --------------------------------------------------------------------------------------------
# Refusals with a message saying what the file is


def _one_line_error(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        ("legacy.pt", "is a legacy (pre-1.6) torch.save pickle"),
        ("torchscript.pt", "is a TorchScript archive"),
    ],
)
def test_formats_we_do_not_read_are_named(fixture: str, message: str) -> None:
    with pytest.raises(FormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_suspect(DATA / fixture)


def test_a_bare_pickle_and_a_random_pt_are_named(tmp_path: Path) -> None:
    bare = tmp_path / "bare.pt"
    bare.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    with pytest.raises(FormatError, match="is a bare pickle"):
        open_suspect(bare)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(FormatError, match="not safetensors .*not a PyTorch zip checkpoint") as info:
        open_suspect(junk)
    assert "header length" not in str(info.value)


def _tensor_archive(tmp_path: Path, *, numel: int, offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                    nbytes: int, compress: bool = False, key: str = "0", member_key: str = "0") -> Path:
    pkl = state_dict_pickle([("w", tensor_op(key, "F32", numel, offset, shape, stride))])
    return write_archive(tmp_path / "bad.pt", pkl, {member_key: b"\0" * nbytes}, compress=compress)


@pytest.mark.parametrize(
    ("case", "kwargs", "message"),
    [
        ("storage longer than member", dict(numel=100, offset=0, shape=(10, 10), stride=(10, 1), nbytes=396),
         "needs 400 bytes but member archive/data/0 holds 396"),
        ("view past the storage", dict(numel=100, offset=1, shape=(10, 10), stride=(10, 1), nbytes=400),
         "reaches element 100 of storage '0', which holds 100"),
        ("stride past the storage", dict(numel=100, offset=0, shape=(10, 10), stride=(11, 1), nbytes=400),
         "reaches element 108"),
        ("huge stride", dict(numel=100, offset=0, shape=(2, 2), stride=(2**62, 1), nbytes=400),
         "reaches element 4611686018427387905"),
        ("negative stride", dict(numel=100, offset=50, shape=(10,), stride=(-1,), nbytes=400),
         "has negative entries"),
        ("rank mismatch", dict(numel=100, offset=0, shape=(10, 10), stride=(1,), nbytes=400),
         "differ in length"),
        ("missing member", dict(numel=10, offset=0, shape=(10,), stride=(1,), nbytes=40, member_key="1"),
         "has no member archive/data/0"),
        ("compressed member", dict(numel=10, offset=0, shape=(10,), stride=(1,), nbytes=40, compress=True),
         "is compressed"),
    ],
)
def test_storage_bounds_are_checked(tmp_path: Path, case: str, kwargs: dict, message: str) -> None:
    path = _tensor_archive(tmp_path, **kwargs)
    with pytest.raises(FormatError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        open_suspect(path).load("w")
    assert str(path) in str(info.value), case


def test_truncated_pickle_is_a_format_error(tmp_path: Path) -> None:
    pkl = state_dict_pickle([("w", tensor_op("0", "F32", 4, 0, (4,), (1,)))])
    path = write_archive(tmp_path / "cut.pt", pkl[:-20], {"0": b"\0" * 16})
    with pytest.raises(FormatError, match="data.pkl is not a valid pickle"):
        open_suspect(path)


def _build_on(target: bytes, state: bytes) -> bytes:
    """A state dict whose one entry is `target` after BUILD with `state` (dict or (None, dict))."""
    return state_dict_pickle([("w", target + state + b"b")])


@pytest.mark.parametrize(
    ("case", "pkl"),
    [
        ("dict state on a tensor", _build_on(tensor_op("0", "F32", 4, 0, (4,), (1,)),
                                             b"}" + unicode("offset") + integer(10**6) + b"s")),
        ("slot state on a tensor", _build_on(tensor_op("0", "F32", 4, 0, (4,), (1,)),
                                             b"N}" + unicode("stride") + b"(J\xff\xff\xff\xfft" + b"s\x86")),
        ("dict state on a storage class", _build_on(global_op("torch", "FloatStorage"),
                                                    b"}" + unicode("dtype") + unicode("F64") + b"s")),
    ],
)
def test_build_cannot_change_checked_objects(case: str, pkl: bytes, tmp_path: Path) -> None:
    """BUILD sets attributes; on our tensor and storage stand-ins it must fail, never succeed
    after their bounds were checked (nor change the allow-list for later files)."""
    from weightmark.formats.pytorch import ALLOWED_GLOBALS

    before = dict(ALLOWED_GLOBALS)
    path = write_archive(tmp_path / "build.pt", pkl, {"0": b"\0" * 16})
    with pytest.raises(FormatError, match="data.pkl cannot be read"):
        open_suspect(path)
    assert ALLOWED_GLOBALS == before, case


# --------------------------------------------------------------------------------------------
# Hostile pickles: refused before anything runs


def _payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that, unpickled by a general unpickler, would create `marker` (or import
    something outside the allow-list), each hidden among legitimate torch opcodes."""
    cmd = f"touch {marker}"
    legit = unicode("ok") + tensor_op("0", "F32", 4, 0, (4,), (1,))

    def wrap(evil: bytes) -> bytes:
        return b"\x80\x02" + global_op("collections", "OrderedDict") + b")R(" + unicode("evil") + evil + legit + b"u."

    return {
        "os.system": wrap(global_op("os", "system") + b"(" + unicode(cmd) + b"tR"),
        "posix.system": wrap(global_op("posix", "system") + b"(" + unicode(cmd) + b"tR"),
        "subprocess.Popen": wrap(global_op("subprocess", "Popen") + b"((" + unicode("touch") + unicode(str(marker))
                                 + b"ltR"),
        "builtins.eval": wrap(global_op("builtins", "eval") + b"(" + unicode(f"open({str(marker)!r}, 'w')") + b"tR"),
        "builtins.exec": wrap(global_op("builtins", "exec") + b"(" + unicode(f"open({str(marker)!r}, 'w')") + b"tR"),
        "torch.load": wrap(global_op("torch", "load") + b"(" + unicode(str(marker)) + b"tR"),
        "numpy._reconstruct": wrap(global_op("numpy.core.multiarray", "_reconstruct") + b"(" + integer(0) + b"tR"),
        # protocol 4's STACK_GLOBAL takes module and name from the stack: only find_class sees them
        "stack_global": b"\x80\x04" + unicode("os") + unicode("system") + b"\x93(" + unicode(cmd) + b"tR.",
        # INST imports and calls in one opcode
        "inst": b"\x80\x02(" + unicode(cmd) + b"ios\nsystem\n.",
        # the tensor rebuild with a callable smuggled in as its storage
        "rebuild_with_global": wrap(global_op("torch._utils", "_rebuild_tensor_v2") + b"(" + global_op("os", "system")
                                    + integer(0) + b"(J\x04\x00\x00\x00t(J\x01\x00\x00\x00t\x89}tR"),
    }


@pytest.fixture(scope="module")
def lab_home(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Path:
    home = tmp_path_factory.mktemp("torch-hostile") / "home"
    assert run_cli("init", "--insecure-no-passphrase", "--home", str(home)).returncode == 0
    assert run_cli("model", "register", str(minilm), "--name", "minilm", home=home).returncode == 0
    return home


RUNNABLE = ["builtins.eval", "builtins.exec", "inst", "os.system", "posix.system", "stack_global", "subprocess.Popen"]


@pytest.mark.parametrize("case", RUNNABLE)
def test_the_payloads_are_real(case: str, tmp_path: Path) -> None:
    """Control: a general unpickler really runs each payload (so the refusals below mean something)."""
    marker = tmp_path / "pwned"
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(_payloads(marker)[case])
    code = f"import pickle; pickle.loads(open({str(pkl)!r}, 'rb').read())"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=60)
    deadline = time.monotonic() + 10  # Popen's child may finish after the interpreter exits
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()


@pytest.mark.parametrize("case", sorted(_payloads(Path("/x"))))
def test_hostile_pickle_is_refused_by_the_cli_before_it_runs(case: str, tmp_path: Path, lab_home: Path) -> None:
    marker = tmp_path / "pwned"
    path = write_archive(tmp_path / "leak.pt", _payloads(marker)[case], {"0": b"\0" * 16})
    r = run_cli("scan", str(path), "--model", "minilm", home=lab_home)
    line = _one_line_error(r, 3, str(path))
    assert "is not allowed" in line or "not a valid pickle" in line, line
    assert not marker.exists(), f"{case}: the payload ran"
    if case in ("os.system", "subprocess.Popen", "builtins.eval", "builtins.exec", "torch.load", "stack_global"):
        shown = {"stack_global": "os.system"}.get(case, case)
        assert f"pickle global {shown} is not allowed (only tensors and plain containers are read)" in line
    if case == "inst":
        assert "pickle opcode INST is not allowed" in line


def test_legacy_and_random_files_through_the_cli(tmp_path: Path, lab_home: Path) -> None:
    r = run_cli("scan", str(DATA / "legacy.pt"), "--model", "minilm", home=lab_home)
    _one_line_error(r, 3, "legacy.pt", "legacy (pre-1.6) torch.save pickle")
    junk = tmp_path / "weights.pt"
    junk.write_bytes(struct.pack("<Q", 2**40) + b"\x00" * 64)
    r = run_cli("scan", str(junk), "--model", "minilm", home=lab_home)
    line = _one_line_error(r, 3, "weights.pt", "not a PyTorch zip checkpoint")
    assert "header length" not in line


# --------------------------------------------------------------------------------------------
# Checkpoints injected by a real attack tool (fickling 0.1.12, tests/data/make_torch_fixtures.py)

FICKLING_MARKER = Path("/tmp/weightmark-fickling-pwned")  # what the injected payloads create


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


@pytest.mark.parametrize("injection", ["insertion", "combination"])
def test_fickling_payloads_are_real(injection: str) -> None:
    """Control: a general unpickler runs fickling's payload (the exec / eval comes first)."""
    FICKLING_MARKER.unlink(missing_ok=True)
    try:
        try:
            pickle.loads(_data_pkl(DATA / f"fickling_{injection}.pt"))
        except Exception:
            pass  # the torch part fails without torch; the payload has run by then
        assert FICKLING_MARKER.exists()
    finally:
        FICKLING_MARKER.unlink(missing_ok=True)


@pytest.mark.parametrize(("injection", "shown"), [("insertion", "builtins.exec"), ("combination", "__builtin__.eval")])
def test_fickling_injected_checkpoints_are_refused(injection: str, shown: str, lab_home: Path) -> None:
    FICKLING_MARKER.unlink(missing_ok=True)
    path = DATA / f"fickling_{injection}.pt"
    r = run_cli("scan", str(path), "--model", "minilm", home=lab_home)
    _one_line_error(r, 3, str(path), f"pickle global {shown} is not allowed")
    assert not FICKLING_MARKER.exists()
