"""Tokens per second of fcmoe's ``sft`` local step against a plain PyTorch loop over the same model and batches.

Usage: ``python bench/sft_step.py [--models smollm2-moe-tiny,smollm2-moe] [--steps 12] [--device cpu]``.

For each model: the offline instruction mixture's first ``--batch × --steps`` pairs (the same order for both), and
- fcmoe: ``LocalTrainer.train`` over the cached features, one epoch (token-mean response loss, the LM head on
  response positions only, balance loss, AdamW over the trainable tree, gradient clipping);
- plain: the same causal LM built by fcmoe (upcycled, the same parameters trainable), ``lm(input_ids,
  attention_mask, labels)`` with −100 off the response (transformers' own loss: logits at every position), each
  batch padded to its own longest, ``torch.optim.AdamW`` over the same parameters, the same clipping; no fcmoe code.
Tokens/s counts real (non-padding) tokens. Each side times an epoch of ``--steps`` batches minus one of 2 batches,
so per-call set-up cancels; both sides run in this process, alternating, twice, and the faster of each is kept.
smollm2-moe's fcmoe step runs from the cached hidden states of its frozen layers (what a run does); the plain loop
runs the whole model, as a plain PyTorch user would; ``--trainable-layers`` equal to the model's depth compares
without the cache.
"""

from __future__ import annotations

import argparse
import time

import torch

from fcmoe.data.mixture import load_instruct
from fcmoe.models.build import build_model
from fcmoe.models.causal_lm import encode_pairs
from fcmoe.training.config import TrainConfig
from fcmoe.training.local import FeatureSet, LocalTrainer, featurize


def fcmoe_epoch(trainer: LocalTrainer, state: dict, data: FeatureSet) -> float:
    started = time.perf_counter()
    trainer.train(state, data, seed=0)
    return time.perf_counter() - started


def plain_epoch(lm: torch.nn.Module, params: list[torch.nn.Parameter], ids: torch.Tensor, mask: torch.Tensor,
                labels: torch.Tensor, batch: int, device: torch.device) -> float:
    started = time.perf_counter()
    optimiser = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    lm.train()
    for i in range(0, len(ids), batch):
        rows = slice(i, i + batch)
        length = int(mask[rows].sum(dim=1).max())
        loss = lm(input_ids=ids[rows, :length].to(device), attention_mask=mask[rows, :length].to(device),
                  labels=labels[rows, :length].to(device)).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
    return time.perf_counter() - started


def measure(name: str, batch: int, steps: int, trainable_layers: int, device: str) -> dict[str, float]:
    built = build_model(name, 0, num_experts=8, moe_layers=(-2, -1), trainable_layers=trainable_layers,
                        router_init_std=0.02, max_length=256, seed=0, task="sft", device=device)
    model = built.model
    train, _ = load_instruct(0)
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: batch * steps].tolist()
    pairs = encode_pairs(model.codec, [train.texts[i] for i in rows], [train.responses[i] for i in rows], 256)
    data = featurize(model, pairs.ids, pairs.mask, torch.zeros(len(rows), dtype=torch.long), bucketed=True)
    data = FeatureSet(data.features, pairs.mask, data.labels, pairs.targets, torch.zeros(len(rows), dtype=torch.bool),
                      None if data.features.dim() == 2 else pairs.ids)
    trainer = LocalTrainer(model, built.layout, TrainConfig(batch_size=batch, device=device, local_epochs=1))
    state = model.trainable_state()
    # labels for transformers' loss: the token itself where it is a response token (it shifts them itself)
    labels = torch.full_like(pairs.ids, -100)
    labels[:, 1:] = pairs.targets[:, :-1]
    params = [p for p in model.parameters() if p.requires_grad]
    dev = torch.device(device)
    tokens = int(pairs.mask[: batch * (steps - 2) + 2 * batch].sum() - pairs.mask[: 2 * batch].sum())
    best = {"fcmoe": float("inf"), "plain": float("inf")}
    short = data.subset(torch.arange(2 * batch))
    for _ in range(2):
        best["fcmoe"] = min(best["fcmoe"], fcmoe_epoch(trainer, state, data) - fcmoe_epoch(trainer, state, short))
        full = plain_epoch(model.causal, params, pairs.ids, pairs.mask, labels, batch, dev)
        part = plain_epoch(model.causal, params, pairs.ids[: 2 * batch], pairs.mask[: 2 * batch],
                           labels[: 2 * batch], batch, dev)
        best["plain"] = min(best["plain"], full - part)
    return {"fcmoe_tok_s": tokens / best["fcmoe"], "plain_tok_s": tokens / best["plain"],
            "ratio": best["plain"] / best["fcmoe"], "frozen_layers": model.frozen_layers, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-moe-tiny,smollm2-moe")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--trainable-layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, batch {args.batch}, "
          f"{args.steps} steps")
    print("| model | frozen (cached) layers | fcmoe tokens/s | plain PyTorch tokens/s | fcmoe / plain |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        r = measure(name, args.batch, args.steps, args.trainable_layers, args.device)
        print(f"| {name} | {r['frozen_layers']} | {r['fcmoe_tok_s']:.0f} | {r['plain_tok_s']:.0f} | "
              f"{r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
