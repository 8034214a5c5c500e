"""Training step time per model family: tiny random configs, and MiniLM-MoE at real size (offline wheel).

Usage: ``python bench/step_time.py [--real]``. Prints seconds per AdamW step (batch 16 × 64 tokens for MiniLM,
8 × 16 for tiny models) on this machine's CPU, with the per-epoch set-up (optimiser creation, state copies)
subtracted.
"""

from __future__ import annotations

import argparse
import time

import torch

from fcmoe.data.offline import load_20ng
from fcmoe.models.build import build_model
from fcmoe.models.catalog import FAMILY_NAMES, supports_lora
from fcmoe.training.config import TrainConfig
from fcmoe.training.local import LocalTrainer, featurize


def step_time(name: str, finetune: str, batch: int, length: int, steps: int = 12, num_experts: int = 4) -> float:
    """(time of a ``steps``-batch epoch − time of a 2-batch epoch) / (steps − 2): per-call set-up cancels out."""
    built = build_model(name, 20, num_experts=num_experts, moe_layers=(-2, -1), trainable_layers=2,
                        router_init_std=0.02, max_length=length, seed=0, finetune=finetune, lora_rank=8)
    texts = load_20ng()[0].texts[: batch * steps]
    ids, mask = built.tokenize(texts)
    data = featurize(built.model, ids, mask, torch.arange(len(texts)) % 20)
    trainer = LocalTrainer(built.model, built.layout, TrainConfig(batch_size=batch))
    state = built.model.trainable_state()
    trainer.train(state, data.subset(torch.arange(2 * batch)), seed=0)  # warm-up
    timings = {}
    for n in (2, steps):
        started = time.perf_counter()
        trainer.train(state, data.subset(torch.arange(n * batch)), seed=0)
        timings[n] = time.perf_counter() - started
    return (timings[steps] - timings[2]) / (steps - 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real", action="store_true", help="also MiniLM-MoE at real size (E = 8 and 16)")
    args = parser.parse_args()
    print(f"{'family':<22} {'mode':<5} {'s/step':>8}")
    for name in [n for n in FAMILY_NAMES if n.endswith("-tiny")] + ["tiny-bert-moe"]:
        for finetune in ("full", "lora") if supports_lora(name) else ("full",):
            print(f"{name:<22} {finetune:<5} {step_time(name, finetune, 8, 16):8.4f}")
    if args.real:
        for experts in (8, 16):
            t = step_time("minilm-moe", "full", 16, 64, num_experts=experts)
            print(f"{'minilm-moe E=' + str(experts):<22} {'full':<5} {t:8.4f}")


if __name__ == "__main__":
    main()
