# fcmoe: `make run` (set-up + the default 4-method comparison) and `make test` (set-up + test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline by design: no hub calls (a failed one hangs 25-50 s), no Flower telemetry or update checks.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install assets run test test-slow bench bench-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned resolve pulls several GB of CUDA wheels
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(STAMP)

assets: $(STAMP)
	$(BIN)/fcmoe fetch

run: assets
	$(BIN)/fcmoe run

# `make test`: everything but the multi-process Flower runs (deployments, resume, sparse and participation parity),
# which `make test-slow` runs; CI runs both.
test: assets
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: assets
	$(BIN)/python -m pytest -q -m slow

# Benchmarks (not in CI): each prints its figures with their targets, measured side by side in one run.
bench: assets
	$(BIN)/python bench/aggregation.py --phases
	$(BIN)/python bench/routing_overhead.py
	$(BIN)/python bench/communication.py
	$(BIN)/python bench/end_to_end.py
	$(BIN)/python bench/deployment.py --model tiny

# On a machine with a CUDA GPU: the training step in fp32 and bf16 autocast, at the default and an 8x batch.
bench-gpu: assets
	for args in "--precision fp32" "--precision bf16" "--precision fp32 --batch 128" "--precision bf16 --batch 128"; do \
		$(BIN)/python bench/routing_overhead.py --device cuda $$args || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
