"""Bytes per round per method on the default benchmark, and what expert-sparse uploads save.

Usage: ``python bench/communication.py [--rounds 1] [--alpha 0.1]``, or
``python bench/communication.py --lora qwen3_moe-tiny [--model-path DIR]`` for full vs LoRA fine-tuning.

Runs the embedded default (20 Newsgroups, MiniLM-MoE, 10 clients) for ``--rounds`` rounds, every method with dense
uploads and FC-MoE again with ``sparse_uploads = true``, and prints from their ``metrics.jsonl``:

- bytes up (Δ_i, routing counts, n_i) and down (the global model, plus each algorithm's per-client message) per
  round; for FC-MoE the message is one float32 per (client, MoE layer, expert), compared with the tensor residual
  ρ_i it stands for (DESIGN §2);
- with sparse uploads, the share of upload bytes saved: experts a client routed no token to are not sent.

With ``--lora FAMILY`` (a fused-expert family: its ``-tiny`` random configuration offline, or a local checkpoint
with ``--model-path``) it runs FedAvg and FC-MoE on that model with ``model.finetune = "full"`` and ``"lora"`` and
prints bytes up / down per round of each, and their ratio: under LoRA only the adapters and the head travel.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fcmoe.config import load_config
from fcmoe.experiment import prepare_experiment
from fcmoe.runner import run_experiment


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def lora_comparison(family: str, model_path: str, rounds: int, alpha: float) -> None:
    """Bytes per round of the same model fine-tuned fully and with LoRA (FedAvg and FC-MoE each)."""
    common = [f"model.name={family}", f"rounds={rounds}", f"partition.alpha={alpha}", "methods=['fedavg','fcmoe']",
              "partition.num_clients=4", "partition.min_partition_size=4", "data.train_per_class=8",
              "data.test_per_class=2", "data.max_length=32", *([f"model.path={model_path}"] if model_path else [])]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for finetune in ("full", "lora"):
            folder = Path(tmp, finetune)
            folder.mkdir()
            run_experiment(load_config(overrides=[*common, f"model.finetune={finetune}"]), folder, show_progress=False)
            rows[finetune] = rows_of(folder)
    print(f"{family}{' at ' + model_path if model_path else ''}, 4 clients; bytes per round (all clients)")
    print(f"{'method':<8} {'round':>5} {'full up':>14} {'LoRA up':>12} {'full down':>14} {'LoRA down':>12} "
          f"{'up ratio':>9}")
    for full, lora in zip(rows["full"], rows["lora"], strict=True):
        print(f"{full['method']:<8} {full['round']:>5} {full['bytes_up']:>14,d} {lora['bytes_up']:>12,d} "
              f"{full['bytes_down']:>14,d} {lora['bytes_down']:>12,d} {full['bytes_up'] / lora['bytes_up']:>8.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--lora", metavar="FAMILY", help="compare full and LoRA fine-tuning of this fused-expert "
                                                         "family instead (e.g. qwen3_moe-tiny)")
    parser.add_argument("--model-path", default="", help="with --lora: a local checkpoint of the family")
    args = parser.parse_args()
    if args.lora:
        lora_comparison(args.lora, args.model_path, args.rounds, args.alpha)
        return
    common = [f"rounds={args.rounds}", f"partition.alpha={args.alpha}"]
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir, sparse_dir = Path(tmp, "dense"), Path(tmp, "sparse")
        dense_dir.mkdir(), sparse_dir.mkdir()
        dense_cfg = load_config(overrides=common)
        run_experiment(dense_cfg, dense_dir, show_progress=False)
        run_experiment(load_config(overrides=[*common, 'methods=["fcmoe"]', "sparse_uploads=true"]), sparse_dir,
                       show_progress=False)
        dense, sparse = rows_of(dense_dir), rows_of(sparse_dir)
    exp = prepare_experiment(dense_cfg)  # cached features: fast; for the layout's sizes only
    layout, clients = exp.built.layout, exp.num_clients
    expert_bytes = sum(layer.num_experts * layer.expert_numel * 4 for layer in layout.layers)
    scalars = sum(layer.num_experts for layer in layout.layers) * 4
    print(f"default benchmark, α = {args.alpha}, {clients} clients, {len(layout.layers)} MoE layers × "
          f"{layout.layers[0].num_experts} experts; MB per round (10^6 bytes)")
    print(f"{'method':<8} {'round':>5} {'up MB':>9} {'down MB':>9} {'message bytes':>14}")
    model_down = min(r["bytes_down"] for r in dense if r["method"] == "fedavg")
    for row in dense:
        message = row["bytes_down"] - model_down
        print(f"{row['method']:<8} {row['round']:>5} {row['bytes_up'] / 1e6:>9.3f} {row['bytes_down'] / 1e6:>9.3f} "
              f"{message:>14,d}")
    print(f"FC-MoE residual message: {scalars} B per client = one float32 per (layer, expert); sending ρ_i as a "
          f"tensor would be {expert_bytes / 1e6:.1f} MB per client ({expert_bytes // scalars:,}× more), "
          f"{clients * expert_bytes / 1e6:.1f} MB per round")
    for row in sparse:
        full = next(r["bytes_up"] for r in dense if r["method"] == "fcmoe" and r["round"] == row["round"])
        print(f"sparse uploads, FC-MoE round {row['round']}: up {row['bytes_up'] / 1e6:.3f} MB vs dense "
              f"{full / 1e6:.3f} MB, saved {100 * (1 - row['bytes_up'] / full):.2f} %")


if __name__ == "__main__":
    main()
