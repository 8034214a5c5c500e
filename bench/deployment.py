"""Where a deployed round's time goes — cold, with warm caches, with a warm worker — against Flower's simulation.

Usage: ``python bench/deployment.py [--model tiny|default] [--rounds 2] [--method fcmoe] [--client-threads 1]
[--variants cold,cache,worker] [--set KEY=VALUE ...]``. It runs, one after another on this machine:

1. ``cold``: ``deploy_local`` (TLS, authenticated SuperNodes, one per client) with node config
   ``warm-cache=false warm-worker=false``: every ClientApp process — Flower starts one per message — imports
   everything and rebuilds the experiment, featurising included (what every message did before warm clients);
2. ``cache``: ``warm-cache=true warm-worker=false``: the first process of a config writes its frozen features to
   the node's disk, later ones read them, but each still imports and rebuilds the rest;
3. ``worker``: ``warm-cache=true warm-worker=true`` (the deployment default): each ClientApp process forwards its
   message to the node's long-lived worker, which holds the prepared experiment;
4. Flower's simulation runtime of the same experiment (``fcmoe run --engine flower``: one Ray actor with every
   core, clients one after another).

Deployed clients get ``train.threads = --client-threads`` (default 1: N SuperNodes share this machine's cores);
the simulation keeps torch's default, one thread per core. Sums over other thread counts differ in the last bits.

It prints each message's phases (``phases.jsonl`` of every node: process start to the first fcmoe import,
imports, reaching the worker, set-up, work, reply) as means per message kind and round, the round wall times
(``metrics.jsonl``'s ``wall_s``), and the deployed / simulated ratio of the rounds after the first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from fcmoe.config import load_config
from fcmoe.experiment import prepare_experiment
from fcmoe.fl.codec import RunSettings
from fcmoe.fl.deploy import deploy_local
from fcmoe.fl.server_app import run_flower_method
from fcmoe.runs import new_run_dir

MODELS = {
    "tiny": ["model.name=tiny-bert-moe", "model.num_experts=4", "data.train_per_class=8", "data.test_per_class=3",
             "data.max_length=32", "partition.num_clients=2", "partition.min_partition_size=6"],
    "default": [],
}
PHASES = ("start", "imports", "worker", "setup", "work", "reply")
VARIANTS = {"cold": "warm-cache=false warm-worker=false", "cache": "warm-cache=true warm-worker=false",
            "worker": "warm-cache=true warm-worker=true"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def phase_table(state_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    """(message kind, round) → mean seconds of each phase over every node's ``phases.jsonl`` under ``state_dir``,
    with ``n`` the number of messages."""
    grouped: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for path in sorted(state_dir.glob("*/client-*/phases.jsonl")):
        for row in _rows(path):
            grouped[(row["message"], row["round"])].append(row)
    return {key: {"n": len(rows), **{p: statistics.fmean(r.get(p, 0.0) for r in rows) for p in PHASES}}
            for key, rows in sorted(grouped.items(), key=lambda item: (item[0][1], item[0][0]))}


def deployed(overrides: list[str], method: str, work: Path, variant: str, port: int) -> tuple[list[float], dict]:
    """One deployment: (round wall times, phase table)."""
    out, state_dir = work / "runs", work / "nodes"
    run_config = RunSettings("", tuple(overrides), method, str(out), 3600.0).to_run_config()
    result = deploy_local(Path(__file__).resolve().parents[1], load_config(overrides=overrides).partition.num_clients,
                          run_config, base_port=port, timeout_s=6 * 3600, workdir=work / "flower",
                          node_options=f"state-dir='{state_dir}' {VARIANTS[variant]}")
    if result.status != "finished:completed":
        raise SystemExit(f"deployment ({variant}) ended {result.status}; logs in {result.workdir}")
    (run_dir,) = out.iterdir()
    return [r["wall_s"] for r in _rows(run_dir / "metrics.jsonl")], phase_table(state_dir)


def simulated(overrides: list[str], method: str, work: Path) -> list[float]:
    """Flower's simulation runtime of the same experiment: round wall times."""
    exp = prepare_experiment(load_config(overrides=overrides))
    run_dir = new_run_dir(str(work / "sim"))
    run_flower_method(exp, method, run_dir)
    return [r["wall_s"] for r in _rows(run_dir / "metrics.jsonl")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="fcmoe")
    parser.add_argument("--port", type=int, default=39800)
    parser.add_argument("--client-threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an experiment override on top of --model's (e.g. partition.num_clients=10)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="deployments to run, of " + ",".join(VARIANTS))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants {args.variants!r}: choose from {','.join(VARIANTS)}")
    overrides = [*MODELS[args.model], *args.set, f"rounds={args.rounds}"]
    on_nodes = [*overrides, f"train.threads={args.client_threads}"]
    rounds, phases = {}, {}
    work = Path(tempfile.mkdtemp(prefix="fcmoe-bench-deploy-"))  # a failed deployment's logs stay there
    for i, variant in enumerate(variants):
        rounds[variant], phases[variant] = deployed(on_nodes, args.method, work / variant, variant, args.port + 100 * i)
    rounds["Flower simulation"] = simulated(overrides, args.method, work)
    shutil.rmtree(work)
    print(f"deployment phases, {args.model} model, {args.method}, {args.rounds} rounds, {args.client_threads} "
          "thread(s) per client (mean seconds per message; start = process creation to the first fcmoe import)")
    print(f"{'variant':<9}{'message':<9}{'round':>5}{'n':>4}" + "".join(f"{p:>9}" for p in PHASES) + f"{'total':>9}")
    for variant, table in phases.items():
        for (kind, round_index), cell in table.items():
            total = sum(cell[p] for p in PHASES)
            print(f"{variant:<9}{kind:<9}{round_index:>5}{cell['n']:>4}"
                  + "".join(f"{cell[p]:>9.2f}" for p in PHASES) + f"{total:>9.2f}")
    print("\nround wall time (s)")
    print(f"{'round':<6}" + "".join(f"{name:>19}" for name in rounds))
    for i, times in enumerate(zip(*rounds.values(), strict=True), start=1):
        print(f"{i:<6}" + "".join(f"{t:>19.1f}" for t in times))
    later = slice(1, None) if args.rounds > 1 else slice(None)
    simulated_s = sum(rounds["Flower simulation"][later])
    print(f"deployed / simulated, rounds {'2+' if args.rounds > 1 else '1'}: "
          + ", ".join(f"{v} {sum(rounds[v][later]) / simulated_s:.2f}x" for v in variants)
          + " (target: the default deployment, worker, <= 1.5x)")


if __name__ == "__main__":
    main()
