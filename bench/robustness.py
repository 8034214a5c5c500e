"""Accuracy under attack: 1 and 2 of 10 clients send scaled (×100) or sign-flipped updates every round.

Usage: ``python bench/robustness.py [--rounds 5] [--set key=value …] [--out DIR]``.

For FedAvg and FC-MoE on the default benchmark (or the ``--set`` overrides), prints the final global and mean local
accuracy of:

- ``none``: no defence at all (``robust.max_norm_ratio = 0``: even the norm screening is off);
- ``screen``: the default server (updates above 10× the round's median norm rejected);
- ``robust``: screening plus per-unit clipping at 2× the median and the coordinate-wise median as inner aggregator;

under no attack, and under each attack. Cells that cannot differ are not run: "screen" without an attack or
against sign flips (a flipped update has an honest norm) equals "none". Each cell is one seeded run; every run
keeps its folder under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fcmoe.config import load_config
from fcmoe.runner import run_experiment

ATTACKS = {"clean": [], "scale x100, 1 of 10": ['attack.kind="scale"', "attack.clients=[0]"],
           "scale x100, 2 of 10": ['attack.kind="scale"', "attack.clients=[0, 1]"],
           "sign flip, 1 of 10": ['attack.kind="signflip"', "attack.clients=[0]"],
           "sign flip, 2 of 10": ['attack.kind="signflip"', "attack.clients=[0, 1]"]}
DEFENCES = {"none": ["robust.max_norm_ratio=0"], "screen": [],
            "robust": ["robust.clip=2.0", 'robust.aggregator="median"']}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="runs/robustness")
    args = parser.parse_args()
    out = Path(args.out)
    print(f"{'attack':<22} {'defence':<8} {'FedAvg global':>13} {'FC-MoE global':>13} {'FedAvg local':>12} "
          f"{'FC-MoE local':>12} {'rejected':>8}")
    for attack, attack_sets in ATTACKS.items():
        for defence, defence_sets in DEFENCES.items():
            if defence == "screen" and not attack.startswith("scale"):
                continue  # identical to "none": nothing there has an outlying norm
            folder = out / f"{attack.replace(' ', '').replace(',', '-')}-{defence}"
            folder.mkdir(parents=True, exist_ok=True)
            config = load_config(overrides=[f"rounds={args.rounds}", 'methods=["fedavg", "fcmoe"]', *args.set,
                                            *attack_sets, *defence_sets])
            summaries = {s.method: s for s in run_experiment(config, folder, show_progress=False)}
            rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            rejected = sum(len(r.get("rejected", [])) for r in rows)
            print(f"{attack:<22} {defence:<8} {summaries['fedavg'].global_acc:>13.4f} "
                  f"{summaries['fcmoe'].global_acc:>13.4f} {summaries['fedavg'].local_acc_mean:>12.4f} "
                  f"{summaries['fcmoe'].local_acc_mean:>12.4f} {rejected:>8}", flush=True)


if __name__ == "__main__":
    main()
