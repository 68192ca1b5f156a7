"""Aligning a suspect to the reference undoes function-preserving attacks before extraction.

Each transform of weightmark.attacks.functional is applied to a tiny random llama and to the
real MiniLM; the aligned carriers must equal the originals (to float rounding when clean, to
the re-quantization noise after Q4_0), the report must say what was undone, and an
unmodified or merely re-quantized suspect must come back untouched. The end-to-end test
traces a stamped MiniLM copy through permutations, rescaling and Q4_0 to its licensee.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_stamped_lab
from tests.test_attacks_functional import make_tiny_llama
from weightmark.align import Alignment, align, match_rows, relative_difference
from weightmark.attacks import add_noise, requantize
from weightmark.attacks.functional import (
    function_preserving,
    permute_ffn,
    permute_heads,
    rename_transpose_drop,
    rescale,
    rotate_residual,
)
from weightmark.formats import SafetensorsSuspect, open_suspect
from weightmark.formats.safetensors import Checkpoint, load_file, save_file

Attack = Callable[[Path, Path], Path]
ATTACKS: dict[str, tuple[Attack, tuple[str, ...]]] = {
    "permute_ffn": (lambda a, b: permute_ffn(a, b, 21), ("rows permuted",)),
    "permute_heads": (lambda a, b: permute_heads(a, b, 22), ("heads permuted",)),
    "rescale": (lambda a, b: rescale(a, b, 23), ("rows rescaled", "columns rescaled")),
    "rotate_residual": (lambda a, b: rotate_residual(a, b, 24), ("residual stream rotated",)),
    "function_preserving": (
        lambda a, b: function_preserving(a, b, 25),
        ("rows permuted", "heads permuted", "rescaled", "residual stream rotated"),
    ),
    "rename_transpose_drop": (
        lambda a, b: rename_transpose_drop(a, b, 26, drop=1),
        ("found under name", "transposed", "not found in the suspect"),
    ),
}
# function_preserving runs all three single transforms at once; they also run alone under `slow`.
BERT_ATTACKS = [
    pytest.param("permute_ffn", marks=pytest.mark.slow),
    pytest.param("permute_heads", marks=pytest.mark.slow),
    pytest.param("rescale", marks=pytest.mark.slow),
    "function_preserving",
    "rename_transpose_drop",
]
MIN_CARRIER = 4096  # elements; smaller matrices (the tiny model's k/v) are structure, not carriers


def carriers_of(model: SafetensorsSuspect) -> dict[str, tuple[int, ...]]:
    return {
        n: m.shape
        for n, m in model.tensors().items()
        if len(m.shape) >= 2 and math.prod(m.shape) >= MIN_CARRIER
    }


def aligned_errors(al: Alignment, ref: SafetensorsSuspect, carriers: dict) -> dict[str, float]:
    return {
        n: relative_difference(al.tensor(n), ref.load(n))
        for n in carriers
        if al.source(n) is not None
    }


def check_report(al: Alignment, phrases: tuple[str, ...]) -> None:
    text = "\n".join(al.report)
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} missing from the report:\n{text}"
    if "not found in the suspect" in phrases:
        assert sum(al.source(n) is None for n in al.plans) == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("align-tiny") / "base", seed=3)


@pytest.fixture(scope="module")
def tiny_config(tiny: Path) -> dict:
    return json.loads((tiny / "config.json").read_text())


def test_match_rows_is_exact_on_a_clear_match() -> None:
    rng = np.random.default_rng(0)
    perm = rng.permutation(300)
    ref = rng.standard_normal((300, 40))
    sus = ref[perm] + 0.3 * rng.standard_normal((300, 40))
    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)  # noqa: E731
    order = match_rows(unit(sus) @ unit(ref).T)
    assert np.array_equal(perm[order], np.arange(300))
    # Ambiguous scores still give a permutation.
    order = match_rows(rng.random((50, 50)))
    assert sorted(order.tolist()) == list(range(50))


def test_unmodified_and_requantized_suspects_are_left_alone(
    tiny: Path, tiny_config: dict, tmp_path: Path
) -> None:
    ref = open_suspect(tiny)
    carriers = carriers_of(ref)
    for path in (tiny, requantize(tiny, tmp_path / "q4", "Q4_0")):
        sus = open_suspect(path)
        al = align(sus, ref, carriers, tiny_config)
        assert al.report == [] and not al.changed
        for name in carriers:
            assert al.is_identity(name)
            assert np.array_equal(al.tensor(name), sus.load(name))


NOISES: dict[str, Attack] = {
    "Q4_0": lambda a, b: requantize(a, b, "Q4_0"),
    # Fine-tuning moves every weight a little: 5% of each row's RMS, independently.
    "fine-tuning": lambda a, b: add_noise(a, b, 0.05, seed=9),
}


@pytest.mark.parametrize("noise", sorted(NOISES))
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tiny_llama_alignment_undoes_each_attack(
    tiny: Path, tiny_config: dict, tmp_path: Path, attack: str, noise: str
) -> None:
    transform, phrases = ATTACKS[attack]
    clean = transform(tiny, tmp_path / "clean")
    noisy = NOISES[noise](clean, tmp_path / "noisy")
    ref = open_suspect(tiny)
    carriers = carriers_of(ref)
    unaligned = [
        relative_difference(open_suspect(clean).load(n), ref.load(n))
        for n in carriers
        if n in open_suspect(clean).tensors()
    ]
    assert not unaligned or max(unaligned) > 0.5  # the attack really moved something

    al_clean = align(open_suspect(clean), ref, carriers, tiny_config)
    check_report(al_clean, phrases)
    assert max(aligned_errors(al_clean, ref, carriers).values()) < 1e-4

    # With noise on top the alignment is estimated from noisy weights; it must be as good as the
    # exact inverse (the plan found on the clean copy) applied to the same noisy weights.
    sus = open_suspect(noisy)
    al = align(sus, ref, carriers, tiny_config)
    check_report(al, phrases)
    for name, err in aligned_errors(al, ref, carriers).items():
        plan = al_clean.plans[name]
        oracle = relative_difference(plan.moved(sus.load(plan.source)), ref.load(name))
        assert err <= 1.1 * oracle + 0.01, name


def test_swapped_tensor_names_are_found_by_content(
    tiny: Path, tiny_config: dict, tmp_path: Path
) -> None:
    tensors = load_file(tiny / "model.safetensors")
    a, b = "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
    tensors[a], tensors[b] = tensors[b], tensors[a]
    (tmp_path / "swapped").mkdir()
    save_file(
        tmp_path / "swapped" / "model.safetensors", [(n, d, x) for n, (d, x) in tensors.items()]
    )
    ref = open_suspect(tiny)
    carriers = carriers_of(ref)
    al = align(open_suspect(tmp_path / "swapped"), ref, carriers, tiny_config)
    assert al.source(a) == b and al.source(b) == a
    assert f"tensor {a} found under name {b}" in al.report
    assert max(aligned_errors(al, ref, carriers).values()) == 0.0


def test_tiny_llama_leaked_as_gguf_is_aligned_through_gguf_names(
    tiny: Path, tiny_config: dict, tmp_path: Path
) -> None:
    """GGUF renames tensors and permutes q/k rows for rope; the reader undoes both, and the
    alignment then works on the canonical view."""
    from weightmark.formats.gguf import GGUFModel, write_gguf

    attacked = open_suspect(function_preserving(tiny, tmp_path / "fp", 27))
    tensors = [(n, attacked.load(n).reshape(m.shape)) for n, m in attacked.tensors().items()]
    hparams = {
        "attention.head_count": tiny_config["num_attention_heads"],
        "attention.head_count_kv": tiny_config["num_key_value_heads"],
        "context_length": 256,
        "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 10000.0,
    }
    write_gguf(tmp_path / "leak.gguf", "llama", tensors, "Q8_0", hparams)
    ref = open_suspect(tiny)
    carriers = carriers_of(ref)
    with GGUFModel(tmp_path / "leak.gguf") as sus:
        assert {m.source_name for m in sus.tensors().values()} & {"blk.0.attn_q.weight"}
        al = align(sus, ref, carriers, tiny_config)
        check_report(al, ("rows permuted", "heads permuted", "rescaled", "residual stream rotated"))
        errors = aligned_errors(al, ref, carriers)
    assert len(errors) == len(carriers)
    assert max(errors.values()) < 0.05  # Q8_0 noise (0.005), amplified where rows were shrunk


@pytest.fixture(scope="module")
def minilm_config(minilm: Path) -> dict:
    return json.loads((minilm / "config.json").read_text())


@pytest.mark.parametrize("attack", BERT_ATTACKS)
def test_minilm_alignment_undoes_each_attack(
    minilm: Path, minilm_config: dict, tmp_path: Path, attack: str
) -> None:
    transform, phrases = ATTACKS[attack]
    phrases = tuple(p for p in phrases if p != "residual stream rotated")
    ref = open_suspect(minilm)
    carriers = carriers_of(ref)
    al = align(open_suspect(transform(minilm, tmp_path / "out")), ref, carriers, minilm_config)
    check_report(al, phrases)
    assert max(aligned_errors(al, ref, carriers).values()) < 1e-4


def test_minilm_function_preserving_then_q4_0_aligns_to_the_noise_level(
    minilm: Path, minilm_config: dict, tmp_path: Path
) -> None:
    ref = open_suspect(minilm)
    carriers = carriers_of(ref)
    plain = open_suspect(requantize(minilm, tmp_path / "plain-q4", "Q4_0"))
    noise = {n: relative_difference(plain.load(n), ref.load(n)) for n in carriers}
    leaked = requantize(
        function_preserving(minilm, tmp_path / "fp", 31, spread=2.0), tmp_path / "fp-q4", "Q4_0"
    )
    al = align(open_suspect(leaked), ref, carriers, minilm_config)
    check_report(al, ("rows permuted", "heads permuted", "rescaled"))
    errors = aligned_errors(al, ref, carriers)
    assert len(errors) == len(carriers)
    # Rescaling before 4-bit quantization costs the small-scaled rows some precision.
    assert all(errors[n] < 2.0 * noise[n] + 0.02 for n in carriers), {
        n: (errors[n], noise[n]) for n in carriers
    }


def write_aligned(al: Alignment, ref: SafetensorsSuspect, carriers: dict, out: Path) -> Path:
    """The aligned carriers (and the reference's other tensors) as a safetensors folder."""
    items = []
    for name, meta in ref.tensors().items():
        aligned = al.tensor(name) if name in carriers else None
        if aligned is not None:
            items.append((name, "F32", aligned.reshape(meta.shape)))
        else:
            items.append(
                (name, ref.checkpoint.info(name).dtype, np.array(ref.checkpoint.raw(name)))
            )
    out.mkdir()
    save_file(out / "model.safetensors", items)
    return out


def _leak(src: Path, out: Path) -> Path:
    """What the leaker does: FFN and head permutations, rescaling, then Q4_0."""
    leaked = permute_ffn(src, out / "a1", 41)
    leaked = permute_heads(leaked, out / "a2", 42)
    leaked = rescale(leaked, out / "a3", 43, spread=2.0)
    return requantize(leaked, out / "a4", "Q4_0")


def test_permuted_rescaled_requantized_minilm_copy_is_traced_after_alignment(
    minilm: Path, minilm_config: dict, tmp_path: Path
) -> None:
    lab = make_stamped_lab(tmp_path, minilm, "F32")
    ref = open_suspect(minilm)
    model = lab.lab.registry.model("minilm")
    carriers = {c.name: c.shape for c in lab.lab.registry.carriers(model.model_id)}
    (tmp_path / "guilty").mkdir()
    leaked = _leak(lab.copies[1], tmp_path / "guilty")
    al = align(open_suspect(leaked), ref, carriers, minilm_config)
    check_report(al, ("rows permuted", "heads permuted", "rows rescaled"))

    unaligned = lab.lab.scan(leaked, model_name="minilm", realign=False)
    aligned = lab.lab.scan(
        write_aligned(al, ref, carriers, tmp_path / "aligned"), model_name="minilm"
    )
    # The scan re-aligns by itself, to the same result.
    direct = lab.lab.scan(leaked, model_name="minilm")
    assert any("rows permuted" in line for line in direct.aligned)
    assert [c.licensee_id for c in direct.accused] == [lab.ids[1]]
    assert abs(direct.accused[0].score - aligned.accused[0].score) < 0.5
    assert [c.licensee_id for c in aligned.accused] == [lab.ids[1]]
    assert aligned.accused[0].log10_family_wise_p < -12
    # Unaligned, only the untouched embeddings still carry the mark; aligned, every carrier does.
    score = {c.licensee_id: c.score for c in unaligned.candidates}
    assert aligned.accused[0].score > 1.3 * score[lab.ids[1]]
    assert all(c.score < 4 for c in aligned.candidates[1:])

    # The same attack on the unstamped base, aligned the same way, accuses nobody: alignment
    # uses only the suspect and the reference, so innocents' scores stay pure noise.
    (tmp_path / "innocent").mkdir()
    clean = _leak(minilm, tmp_path / "innocent")
    al = align(open_suspect(clean), ref, carriers, minilm_config)
    check_report(al, ("rows permuted", "heads permuted"))
    report = lab.lab.scan(
        write_aligned(al, ref, carriers, tmp_path / "aligned-base"), model_name="minilm"
    )
    assert report.accused == []
    assert all(abs(c.score) < 4 for c in report.candidates)


def test_hostile_values_neither_hang_nor_break_the_aligned_scan(minilm: Path, tmp_path: Path) -> None:
    """Carriers replaced by inf, NaN, an integer tensor or a wrong shape: the scan finishes,
    skips what it cannot read, and still names the right licensee."""
    lab = make_stamped_lab(tmp_path, minilm, "F32")
    with Checkpoint.open(lab.copies[0]) as ckpt:
        items = {n: (i.dtype, np.array(ckpt.raw(n))) for n, (_, i) in ckpt.tensors.items()}
    items["encoder.layer.1.output.dense.weight"] = ("F32", np.full((384, 1536), np.inf, np.float32))
    items["encoder.layer.0.intermediate.dense.weight"] = ("F32", np.full((1536, 384), np.nan, np.float32))
    items["encoder.layer.0.attention.self.value.weight"] = ("I32", np.zeros((384, 384), np.int32))
    items["encoder.layer.0.attention.self.key.weight"] = ("F32", np.zeros((192, 768), np.float32))
    (tmp_path / "hostile").mkdir()
    save_file(tmp_path / "hostile" / "model.safetensors", [(n, d, a) for n, (d, a) in items.items()])
    report = lab.lab.scan(tmp_path / "hostile", model_name="minilm")
    skipped = " ".join(report.carriers_skipped)
    assert "attention.self.value" in skipped and "attention.self.key" in skipped
    assert [c.licensee_id for c in report.accused] == [lab.ids[0]]
