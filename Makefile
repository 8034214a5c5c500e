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

.PHONY: install assets run test lint test-slow bench bench-gpu clean

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

# `make test`: the linters (ruff on everything, mypy on core, algorithms and the config; pyproject.toml), then
# everything but the multi-process Flower runs (deployments, resume, sparse and participation parity), which
# `make test-slow` runs; CI runs both.
test: assets lint
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check fcmoe tests bench
	$(BIN)/mypy

test-slow: assets
	$(BIN)/python -m pytest -q -m slow

# Benchmarks (not in CI): each prints its figures with their targets, measured side by side in one run.
bench: assets
	$(BIN)/python bench/aggregation.py --phases
	$(BIN)/python bench/routing_overhead.py
	$(BIN)/python bench/communication.py
	$(BIN)/python bench/end_to_end.py
	$(BIN)/python bench/deployment.py --model tiny
	$(BIN)/python bench/sft_step.py --models smollm2-moe-tiny,smollm2-moe

# On a machine with a CUDA GPU: the training step in fp32 and bf16 autocast, at the default and an 8x batch; then
# real MoE LLM shapes at full depth with random weights (peak memory, tokens/s against a plain PyTorch loop) and a
# 2-client, 1-round fcmoe run on OLMoE-1B-7B's shape; the sft local step against a plain PyTorch loop.
bench-gpu: assets
	for args in "--precision fp32" "--precision bf16" "--precision fp32 --batch 128" "--precision bf16 --batch 128"; do \
		$(BIN)/python bench/routing_overhead.py --device cuda $$args || exit 1; done
	$(BIN)/python bench/memory.py --device cuda --full-depth --shapes allenai/OLMoE-1B-7B-0924,Qwen/Qwen3-30B-A3B \
		--variants lora-factored-ckpt,lora-merged-ckpt --batch 8 --length 512 --throughput 5
	$(BIN)/fcmoe run --methods fcmoe --out /tmp/fcmoe-bench-gpu --set model.name=olmoe --set model.init=random \
		--set model.finetune=lora --set data.name=20ng4 --set data.train_per_class=16 --set data.test_per_class=4 \
		--set data.max_length=512 --set partition.kind=iid --set partition.num_clients=2 --set rounds=1 \
		--set train.batch_size=8 --set train.local_steps=4 --set train.device=cuda
	$(BIN)/python bench/sft_step.py --device cuda --models smollm2-moe-tiny,smollm2-moe --steps 22

clean:
	rm -rf $(VENV) runs .pytest_cache
