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

.PHONY: install assets run test clean

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

test: assets
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
