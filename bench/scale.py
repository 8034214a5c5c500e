"""Round time and host peak against the population: the same 10 clients a round out of N (issue 31).

Usage: ``python bench/scale.py [--population 10,100,1000,10000] [--methods fcmoe,fedavg] [--rounds 3]``, or
``python bench/scale.py --model google/switch-base-8 --budget 2GiB`` for the model-size axis: one round of each
method fully fine-tuning Switch in the published shape (random weights; ``--name switch-t2t``, the default: the
encoder-decoder generating the label word, every weight but the shared embeddings trained; ``--name switch``: the
encoder and a head) with 10 clients, cut to one local step of 2 × 16 tokens, with the plan's arithmetic beside the
measured peak.

Every point is a fresh process (``--point N``) running ``fcmoe run``'s code on the tiny model (``tiny-bert-moe``,
4 experts), IID, 10 documents a client (8 to train, 2 to test), ``participation.fraction = 10 / N``, checkpointed as
``fcmoe run`` is. The documents come from a generated CSV of 4 topics (a vocabulary per topic, seeded): 20
Newsgroups has too few documents for 10,000 clients × 10. Printed per point: set-up seconds (everything but the
rounds: data, partition, model, round-0 scores, writing the run folder), the process's peak resident memory and,
per method, the mean seconds of the rounds before the last (their ``metrics.jsonl`` ``wall_s`` plus the checkpoint
written after them) and of the last round (which scores every client); then each round time and peak against
N = 100's. Targets: N = 10,000 within 1.3× of N = 100's round time and +20 % of its peak.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOCS_PER_CLIENT = 10
PARTICIPANTS = 10
TOPICS = 4


def write_corpus(path: Path, documents: int, seed: int = 0) -> Path:
    """``documents`` rows of ``text,label``: 24 words each, 3 in 4 from the label's own 50-word vocabulary."""
    rng = random.Random(seed)
    vocabularies = [[f"{name}{i}" for i in range(50)] for name in ("alpha", "beta", "gamma", "delta")]
    common = [f"common{i}" for i in range(200)]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        for j in range(documents):
            label = j % TOPICS
            words = [rng.choice(vocabularies[label]) if rng.random() < 0.75 else rng.choice(common)
                     for _ in range(24)]
            writer.writerow([" ".join(words), f"topic{label}"])
    return path


def run_point(population: int, methods: list[str], rounds: int, folder: Path) -> dict:
    """One population size in this process: the figures of every method (see the module docstring)."""
    import torch

    from fcmoe.config import load_config
    from fcmoe.runner import run_experiment
    from fcmoe.sim import engine

    torch.set_num_threads(1)
    corpus = write_corpus(folder / "corpus.csv", population * DOCS_PER_CLIENT)
    config = load_config(overrides=[
        "model.name=tiny-bert-moe", "model.num_experts=4", "data.name=csv", f"data.path={corpus}",
        f"data.train_per_class={population * DOCS_PER_CLIENT // TOPICS}", "data.max_length=32",
        "data.holdout_fraction=0.1", "partition.kind=iid", f"partition.num_clients={population}",
        "partition.min_partition_size=2", "data.local_test_fraction=0.2",
        f"participation.fraction={PARTICIPANTS / population}", f"rounds={rounds}", f"methods={methods!r}",
        "train.batch_size=8", "train.threads=1", f"out_dir={folder}"])
    checkpoint_s: dict[tuple[str, int], float] = {}
    real = engine.save_checkpoint

    def timed(where: Path, checkpoint: object) -> None:
        started = time.perf_counter()
        real(where, checkpoint)
        checkpoint_s[(checkpoint.method, checkpoint.round)] = time.perf_counter() - started

    engine.save_checkpoint = timed
    started = time.perf_counter()
    (folder / "run").mkdir()
    run_experiment(config, folder / "run", show_progress=False)
    total = time.perf_counter() - started
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds_s = sum(r["wall_s"] for r in rows) + sum(checkpoint_s.values())
    out = {"population": population, "setup_s": total - rounds_s, "total_s": total,
           "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "methods": {}}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        steps = [r["wall_s"] + checkpoint_s.get((method, r["round"]), 0.0) for r in mine]
        out["methods"][method] = {"round_s": sum(steps[:-1]) / max(len(steps) - 1, 1), "last_s": steps[-1],
                                  "rounds_s": [round(t, 3) for t in steps],
                                  "checkpoint_s": sum(checkpoint_s.get((method, r["round"]), 0.0)
                                                      for r in mine[:-1]) / max(len(mine) - 1, 1)}
    return out


def run_model_point(shape: str, name: str, method: str, budget: str, folder: Path) -> dict:
    """One round of ``method`` fully fine-tuning the classifier ``name`` (``switch-t2t``: the encoder-decoder
    generating the label; ``switch``: the encoder and a head) in the published ``shape`` (random weights) with 10
    clients under ``server.memory_budget = budget``: cut to 1 local step of 2 × 16 tokens."""
    import torch

    from fcmoe.config import load_config
    from fcmoe.plan import plan_run
    from fcmoe.runner import run_experiment

    torch.set_num_threads(1)
    corpus = write_corpus(folder / "corpus.csv", 10 * 4 * 2)
    config = load_config(overrides=[
        f"model.name={name}", "model.init=random", f"model.path={shape}", "model.finetune=full", "data.name=csv",
        f"data.path={corpus}", "data.train_per_class=16", "data.max_length=16", "partition.kind=iid",
        "partition.num_clients=10", "partition.min_partition_size=2", "rounds=1", f"methods=[{method!r}]",
        "train.batch_size=2", "train.local_steps=1", "train.threads=1", f"server.memory_budget={budget!r}",
        f"out_dir={folder}"])
    plan = plan_run(config)
    (folder / "run").mkdir()
    started = time.perf_counter()
    run_experiment(config, folder / "run", show_progress=False)
    (row,) = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"shape": shape, "model": name, "method": method, "budget": budget, "trainable": plan.step.trainable,
            "round_s": row["wall_s"], "run_s": time.perf_counter() - started,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "planned_host_gib": plan.host_trees / 2**30, "planned_step_gib": plan.step.total / 2**30,
            "planned_spilled_gib": plan.spilled / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", default="10,100,1000,10000")
    parser.add_argument("--methods", default="fcmoe,fedavg")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a point may take")
    parser.add_argument("--model", help="a published shape (e.g. google/switch-base-8): one full fine-tuning round "
                                            "a method under --budget instead of the population axis")
    parser.add_argument("--budget", default="2GiB", help="server.memory_budget of --model")
    parser.add_argument("--name", default="switch-t2t", help="model.name of --model: switch-t2t (encoder-decoder) or "
                                                              "switch (encoder + head)")
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = args.methods.split(",")
    if args.point:
        with tempfile.TemporaryDirectory() as tmp:
            point = (run_model_point(args.model, args.name, methods[0], args.budget, Path(tmp)) if args.model
                     else run_point(args.point, methods, args.rounds, Path(tmp)))
            print(json.dumps(point))
        return
    if args.model:
        for method in methods:
            command = [sys.executable, __file__, "--point", "1", "--model", args.model, "--methods", method,
                       "--budget", args.budget, "--name", args.name]
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
            print(done.stdout.strip().splitlines()[-1] if done.returncode == 0 else
                  f"{method}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return
    points = []
    for population in [int(n) for n in args.population.split(",")]:
        command = [sys.executable, __file__, "--point", str(population), "--methods", args.methods,
                   "--rounds", str(args.rounds)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            print(f"N = {population}: did not finish in {args.timeout:.0f} s")
            continue
        if done.returncode != 0:
            print(f"N = {population}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            continue
        point = json.loads(done.stdout.strip().splitlines()[-1])
        points.append(point)
        print(json.dumps(point), flush=True)
    base = next((p for p in points if p["population"] == 100), None)
    print(f"\n| N | set-up s | peak GiB | {' | '.join(f'{m} round s | {m} last round s' for m in methods)} |")
    print("|---" * (3 + 2 * len(methods)) + "|")
    for p in points:
        cells = []
        for m in methods:
            mine = p["methods"][m]
            ratio = f" ({mine['round_s'] / base['methods'][m]['round_s']:.2f}×)" if base else ""
            cells.append(f"{mine['round_s']:.2f}{ratio} | {mine['last_s']:.1f}")
        peak = f"{p['peak_gib']:.2f}" + (f" ({p['peak_gib'] / base['peak_gib'] - 1:+.0%})" if base else "")
        print(f"| {p['population']} | {p['setup_s']:.1f} | {peak} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
