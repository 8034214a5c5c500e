"""Peak memory of one local training step at real MoE widths, each configuration in a fresh process.

Usage: ``python bench/memory.py [--shapes all|KEY,…] [--layers 1,2] [--batch 2] [--length 256] [--device cpu]
[--variants lora-merged,lora-factored,…] [--out results/memory-measured.jsonl]``.

Each shape of :data:`fcmoe.models.shapes.SHAPES` is built with random weights at its real width and cut to each of
``--layers`` layers (``model.init = "random"``, bf16 weights as published, fp32 master copies of the trainable
ones), then one client takes one local step (``LocalTrainer.train``, AdamW, the balance loss, routing statistics)
on ``--batch`` × ``--length`` tokens. A fresh process per configuration measures, above what the process held
after its imports:
- ``weights_mb``: after the model is built;
- ``peak_mb``: the peak during the step (CPU: the process's peak RSS; CUDA: ``torch.cuda.max_memory_allocated``);
- ``saved_mb``: what autograd kept for the backward pass (unique storages other than parameters).

From two depths the script separates a per-layer cost from the rest and extrapolates to the shape's full depth with
the printed formula ``full = m(1) + (L − 1) · (m(2) − m(1))`` (Switch: per pair of layers, since every other layer
is an MoE one; DeepSeek-V2-Lite from depths 2 and 3, its first layer being dense), and prints ``fcmoe plan``'s
estimate of the same step beside it. Variants: ``lora-merged`` (PEFT's W + s·B·A forward), ``lora-factored``
(fcmoe's), ``full``; each
with ``-ckpt`` for gradient checkpointing. CPU figures show the relative sizes; a GPU's kernels keep other tensors.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("lora-merged", "lora-factored", "lora-merged-ckpt", "lora-factored-ckpt")


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def measure_one(shape: str, layers: int, variant: str, batch: int, length: int, device: str,
                throughput: int = 0) -> dict:
    """One configuration, in this process (run by :func:`main` in a child of its own); with ``throughput`` > 0
    also the tokens a second of that many fcmoe local steps and of a plain PyTorch loop over the same model and
    batch (forward under the same autocast, cross-entropy, backward, fused AdamW; no routing statistics)."""
    import torch

    from fcmoe.models.build import build_model
    from fcmoe.models.memory import kept_for_backward
    from fcmoe.models.shapes import SHAPES
    from fcmoe.training.config import TrainConfig
    from fcmoe.training.local import FeatureSet, LocalTrainer

    base = _rss_mb()
    finetune = "full" if variant.startswith("full") else "lora"
    expert_lora = "merged" if "merged" in variant else "factored"
    started = time.perf_counter()
    built = build_model(SHAPES[shape].family, 4, num_experts=0, moe_layers=(), trainable_layers=1,
                        router_init_std=0.0, max_length=length, seed=0, path=shape, init="random",
                        num_layers=layers, finetune=finetune, lora_rank=8, expert_lora=expert_lora, device=device)
    if variant.endswith("-ckpt"):
        built.model.enable_gradient_checkpointing()
    cuda = torch.device(device).type == "cuda"
    weights = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb() - base
    trainer = LocalTrainer(built.model, built.layout, TrainConfig(batch_size=batch, device=device, local_steps=1),
                           built.precision)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 30000, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    data = FeatureSet(built.model.featurize(ids.to(device), mask.to(device)).cpu(), mask, torch.zeros(batch).long())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_started = time.perf_counter()
    with kept_for_backward(built.model) as saved:
        trainer.train(built.model.trainable_state(), data, seed=0)
    step_s = time.perf_counter() - step_started
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    row = dict(shape=shape, layers=layers, variant=variant, batch=batch, length=length, device=device,
               weights_mb=round(weights), peak_mb=round(peak), saved_mb=round(sum(saved.values()) / 2**20),
               build_s=round(step_started - started, 1), step_s=round(step_s, 1))
    if throughput:
        steps = TrainConfig(batch_size=batch, device=device, local_steps=throughput)
        trainer = LocalTrainer(built.model, built.layout, steps, built.precision)
        state = built.model.trainable_state()
        fcmoe_s = _timed(lambda: trainer.train(state, data, seed=0), cuda)
        plain_s = _timed(lambda: _plain_steps(built.model, data, throughput, trainer), cuda)
        row.update(fcmoe_tokens_s=round(throughput * batch * length / fcmoe_s),
                   plain_tokens_s=round(throughput * batch * length / plain_s))
    return row


def _timed(work: object, cuda: bool) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _plain_steps(model: object, data: object, steps: int, trainer: object) -> None:
    """The same model and batch in a plain loop: what a bare PyTorch step of it costs."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-4, fused=True)
    features, mask, labels = (t.to(trainer.device) for t in (data.features, data.mask, data.labels))
    model.train()
    for _ in range(steps):
        with trainer.autocast():
            logits = model(features, mask)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="all", help="comma-separated keys of fcmoe.models.shapes.SHAPES, or all")
    parser.add_argument("--layers", default="1,2", help="two depths, e.g. 1,2 (Switch: 2,4)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="", help="append each measurement as a JSON line to this file")
    parser.add_argument("--full-depth", action="store_true", help="one measurement at each shape's full depth "
                                                                  "(a GPU's), no extrapolation")
    parser.add_argument("--throughput", type=int, default=0, metavar="STEPS",
                        help="also time STEPS fcmoe local steps against a plain PyTorch loop (tokens/s)")
    parser.add_argument("--one", nargs=3, metavar=("SHAPE", "LAYERS", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        shape, layers, variant = args.one
        print(json.dumps(measure_one(shape, int(layers), variant, args.batch, args.length, args.device,
                                     args.throughput)))
        return
    from fcmoe.models.shapes import SHAPES

    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    depths = [int(n) for n in args.layers.split(",")]
    for shape in shapes:
        family = SHAPES[shape].family
        # Switch: every other layer is an MoE one; DeepSeek-V2-Lite's first layer is dense
        family_depths = ([2 * n for n in depths] if family == "switch" else
                         [n + SHAPES[shape].config.get("first_k_dense_replace", 0) for n in depths])
        if args.full_depth:
            family_depths = [SHAPES[shape].config.get("num_hidden_layers") or SHAPES[shape].config["num_layers"]]
        for variant in args.variants.split(","):
            rows = []
            for layers in family_depths:
                command = [sys.executable, __file__, "--one", shape, str(layers), variant, "--batch", str(args.batch),
                           "--length", str(args.length), "--device", args.device, "--throughput",
                           str(args.throughput)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{shape} {variant} L={layers}: failed: {done.stderr.strip().splitlines()[-1:]}")
                    break
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                if args.out:
                    with Path(args.out).open("a") as out:
                        out.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
            if len(rows) == 2 and not args.full_depth:
                _extrapolate(shape, variant, rows)


def _extrapolate(shape: str, variant: str, rows: list[dict]) -> None:
    """Full-depth figures from two depths, beside fcmoe plan's estimate of the same step."""
    from fcmoe.models.families import FAMILIES
    from fcmoe.models.shapes import SHAPES, shape_config

    shallow, deep = rows
    unit = deep["layers"] - shallow["layers"]
    config = shape_config(SHAPES[shape].family, FAMILIES[SHAPES[shape].family].config_class, shape)
    full = getattr(config, "num_hidden_layers", None) or config.num_layers
    measured = {}
    for key in ("peak_mb", "weights_mb", "saved_mb"):
        per = (deep[key] - shallow[key]) / unit
        measured[key] = shallow[key] + (full - shallow["layers"]) * per
        print(f"  {shape} {variant} {key}: {shallow[key]} + ({full} − {shallow['layers']}) × {per:.0f} = "
              f"{measured[key] / 1024:.1f} GiB at full depth")
    estimate = plan_estimate(shape, variant, deep["batch"] * deep["length"])
    print(f"  {shape} {variant}: fcmoe plan {estimate / 2**30:.1f} GiB (with the step's two host trees) vs measured "
          f"{measured['peak_mb'] / 1024:.1f} GiB: {estimate / 2**20 / measured['peak_mb'] - 1:+.0%}")


def plan_estimate(shape: str, variant: str, tokens: int, layers: int = 0) -> float:
    """Fcmoe plan's bytes for this step (``layers`` = 0: full depth), plus the start and end trees a CPU step
    keeps beside the model (fp32, on the host: on a GPU run they are not in the device's figure)."""
    from fcmoe.models.build import meta_model
    from fcmoe.models.memory import estimate_step
    from fcmoe.models.shapes import SHAPES

    finetune = "full" if variant.startswith("full") else "lora"
    expert_lora = "merged" if "merged" in variant else "factored"
    built = meta_model(SHAPES[shape].family, path=shape, finetune=finetune, lora_rank=8, init="random",
                       num_layers=layers, precision="auto", master_weights=True, expert_lora=expert_lora,
                       num_experts=0, moe_layers=(), trainable_layers=1)
    step = estimate_step(built.model, built.layout, built.precision, tokens=tokens,
                         checkpointing=variant.endswith("-ckpt"), expert_lora=expert_lora, lora_rank=8)
    return step.total + 2 * step.trainable * 4


if __name__ == "__main__":
    main()
