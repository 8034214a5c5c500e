"""Client training step with routing statistics vs a plain step of the same model (target overhead ≤ 5 %).

Usage: ``python bench/routing_overhead.py [--model minilm-moe] [--steps 20] [--repeats 5] [--device cuda]
[--precision bf16]``. On a GPU it also gives the training throughput (token slots per second, padding included).

"Plain" keeps everything a Switch-style MoE step needs (forward, the load-balancing loss from the router logits,
backward, clipping, fused AdamW) and turns off only what FC-MoE adds on the client: counting each real token's
expert per layer (padding masked out) for the routing frequencies f_{i,l,k}. The two variants alternate epoch by
epoch on the same batches, and each figure is the best of ``--repeats`` epochs, so drifts in machine load hit both.
"""

from __future__ import annotations

import argparse
import time

import torch

from fcmoe.config import ConfigError
from fcmoe.data.offline import load_20ng
from fcmoe.models.build import build_model
from fcmoe.training.config import TrainConfig
from fcmoe.training.local import LocalTrainer, featurize, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm-moe", help="family (default: the default benchmark's model)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="batches per timed epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", help="train.device: auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="fp32", help="train.precision: fp32 | bf16 (autocast)")
    args = parser.parse_args()
    try:
        resolve_device(args.device)
    except ConfigError as err:  # e.g. --device cuda on a machine without one: one line, no traceback
        raise SystemExit(str(err)) from None
    built = build_model(args.model, 20, num_experts=args.experts, moe_layers=(-2, -1), trainable_layers=2,
                        router_init_std=0.02, max_length=args.length, seed=0)
    texts = load_20ng()[0].texts[: args.batch * args.steps]
    ids, mask = built.tokenize(texts)
    trainer = LocalTrainer(built.model, built.layout,
                           TrainConfig(batch_size=args.batch, device=args.device, precision=args.precision))
    data = featurize(built.model, ids, mask, torch.arange(len(texts)) % 20)  # on the training device
    state = built.model.trainable_state()
    trainer.train(state, data, seed=0)  # warm-up
    best = {True: float("inf"), False: float("inf")}
    for _ in range(args.repeats):
        for counting in (True, False):
            trainer.recorder.counting = counting
            started = time.perf_counter()
            result = trainer.train(state, data, seed=0)
            best[counting] = min(best[counting], (time.perf_counter() - started) / result.steps)
    overhead = best[True] / best[False] - 1
    where = (torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    tokens_per_s = args.batch * args.length / best[True]
    print(f"{args.model} E={args.experts}, batch {args.batch} x {args.length} tokens, {where}, {args.precision}: "
          f"plain step {1e3 * best[False]:.1f} ms, with routing statistics {1e3 * best[True]:.1f} ms, "
          f"overhead {100 * overhead:+.1f} % (target <= 5 %); {tokens_per_s:,.0f} token slots/s")


if __name__ == "__main__":
    main()
