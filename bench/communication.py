"""Bytes per round per method on the default benchmark, and what expert-sparse uploads save.

Usage: ``python bench/communication.py [--rounds 1] [--alpha 0.1]``.

Runs the embedded default (20 Newsgroups, MiniLM-MoE, 10 clients) for ``--rounds`` rounds, every method with dense
uploads and FC-MoE again with ``sparse_uploads = true``, and prints from their ``metrics.jsonl``:

- bytes up (Δ_i, routing counts, n_i) and down (the global model, plus each algorithm's per-client message) per
  round; for FC-MoE the message is one float32 per (client, MoE layer, expert), compared with the tensor residual
  ρ_i it stands for (DESIGN §2);
- with sparse uploads, the share of upload bytes saved: experts a client routed no token to are not sent.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.1)
    args = parser.parse_args()
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
