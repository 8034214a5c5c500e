"""``fcmoe plan``: parameter counts and the memory a configured run needs, before any weight is loaded.

The model is built on the ``meta`` device (shapes only: a published shape, a checkpoint's ``config.json``, or a
``-tiny`` configuration; fcmoe's small upcycled models are built for real), and
:func:`fcmoe.models.memory.estimate_step` adds up what one client's local step holds on the training device. On the
host, the in-process engine holds the initial, global and new trees and each participating client's update (fp32),
the updates only up to ``server.memory_budget`` (the rest wait on disk, :mod:`fcmoe.spill`).
:func:`check_fits` is what ``fcmoe run`` calls before loading: a run whose step cannot fit the training device stops
there with one line naming the estimate and the fixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from fcmoe.config import ExperimentConfig
from fcmoe.models.build import checkpointing, meta_model
from fcmoe.models.catalog import HUB
from fcmoe.models.memory import GIB, StepMemory, estimate_step, idle_expert_parameters
from fcmoe.models.shapes import DEFAULT_SHAPES
from fcmoe.training.local import resolve_device


class DoesNotFit(ValueError):
    """A run whose estimated memory exceeds the training device's; the message names both and the fixes."""


@dataclass(frozen=True)
class RunPlan:
    """What :func:`plan_run` works out."""

    step: StepMemory
    active: int  # parameters a token uses
    host_trees: float  # bytes of the trees the in-process engine holds (updates: up to the memory budget)
    device: torch.device
    capacity: float  # bytes the training device has
    precision: str
    checkpointing: bool
    spilled: float = 0.0  # bytes of a round's updates written to disk (server.memory_budget)

    @property
    def needed(self) -> float:
        """Bytes the training device must hold: the step, and on the CPU the engine's trees beside it."""
        return self.step.total + (self.host_trees if self.device.type == "cpu" else 0)

    @property
    def fits(self) -> bool:
        return self.needed <= self.capacity


def plan_run(config: ExperimentConfig) -> RunPlan:
    """Counts and memory of ``config``'s model and local step, from shapes alone."""
    model_cfg, train = config.model, config.train
    device = resolve_device(train.device)
    built = meta_model(model_cfg.name, path=model_cfg.path, finetune=model_cfg.finetune,
                       lora_rank=model_cfg.lora_rank, init=model_cfg.init, num_layers=model_cfg.num_layers,
                       precision=train.precision, master_weights=train.master_weights,
                       expert_lora=model_cfg.expert_lora, num_experts=model_cfg.num_experts,
                       moe_layers=model_cfg.moe_layers, trainable_layers=model_cfg.trainable_layers,
                       task=config.task, train_lm_head=model_cfg.train_lm_head)
    on = checkpointing(model_cfg.name, train.gradient_checkpointing)
    tokens = train.batch_size * config.data.max_length
    step = estimate_step(built.model, built.layout, built.precision, tokens=tokens, checkpointing=on,
                         expert_lora=model_cfg.expert_lora, lora_rank=model_cfg.lora_rank)
    if config.task == "sft":  # the LM head's fp32 logits and their gradient, at most at every token of the batch
        step.device["LM logits"] = 2 * tokens * built.model.vocab_size * 4
    clients = max(1, round(config.participation.fraction * config.partition.num_clients))
    update = step.trainable * 4  # an fp32 Δ_i
    held = clients * update if config.server.budget is None else min(clients * update, config.server.budget)
    trees = 3 * update + held
    capacity = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                else psutil.virtual_memory().total)
    active = step.parameters - idle_expert_parameters(built.model, built.layout.top_k)
    return RunPlan(step, active, trees, device, capacity, built.precision.describe(), on, clients * update - held)


def describe(plan: RunPlan, config: ExperimentConfig) -> list[str]:
    """The lines ``fcmoe plan`` prints."""
    model_cfg, train = config.model, config.train
    step = plan.step
    tuning = (f"LoRA r={model_cfg.lora_rank} ({model_cfg.expert_lora} experts)" if model_cfg.finetune == "lora"
              else "full")
    where = (f"{torch.cuda.get_device_name(plan.device)}, {plan.capacity / GIB:.1f} GiB" if plan.device.type == "cuda"
             else f"the CPU, {plan.capacity / GIB:.1f} GiB of RAM")
    verdict = "fits" if plan.fits else "does NOT fit"
    return [
        f"model: {model_cfg.name} ({model_cfg.init} weights, {_source(config)}), {tuning}",
        f"parameters: {step.parameters / 1e9:.2f} B total, {plan.active / 1e9:.2f} B active per token, "
        f"{step.trainable / 1e6:.1f} M trainable ({100 * step.trainable / max(step.parameters, 1):.2f} %)",
        f"precision: {plan.precision}",
        f"one client's step, {train.batch_size} x {config.data.max_length} tokens, gradient checkpointing "
        f"{'on' if plan.checkpointing else 'off'}: {step.describe()}",
        f"host: the trees the in-process engine holds {plan.host_trees / GIB:.2f} GiB"
        + (f" (a round's updates beyond server.memory_budget: {plan.spilled / GIB:.2f} GiB on disk)"
           if config.server.memory_budget else ""),
        f"device: {where}: {verdict}",
    ]


def _source(config: ExperimentConfig) -> str:
    model_cfg = config.model
    if model_cfg.name.endswith("-tiny"):
        return "the tiny test configuration"
    if model_cfg.path:
        return model_cfg.path
    return (f"the {DEFAULT_SHAPES[model_cfg.name]} shape" if model_cfg.init == "random" and model_cfg.name in
            DEFAULT_SHAPES else "the family's default")


def check_fits(config: ExperimentConfig) -> None:
    """Raise :class:`DoesNotFit` (one line) when ``config``'s step cannot fit its training device (hub families;
    fcmoe's upcycled models and the ``-tiny`` ones are small)."""
    if config.model.name not in HUB or config.model.name == "switch-t2t":
        return
    plan = plan_run(config)
    if plan.fits:
        return
    fixes = []
    if config.model.finetune == "full":
        fixes.append("model.finetune = 'lora'")
    if not plan.checkpointing:
        fixes.append("train.gradient_checkpointing = 'on'")
    if config.model.expert_lora == "merged" and config.model.finetune == "lora":
        fixes.append("model.expert_lora = 'factored'")
    fixes += ["a smaller train.batch_size or data.max_length", "a larger GPU"]
    trees = f" and the engine's trees {plan.host_trees / GIB:.1f} GiB" if plan.device.type == "cpu" else ""
    raise DoesNotFit(f"{config.model.name}: one client's step needs about {plan.step.total / GIB:.1f} GiB "
                     f"({plan.step.describe()}){trees} but {plan.device} has {plan.capacity / GIB:.1f} GiB; try "
                     f"{', '.join(fixes)} (fcmoe plan shows the estimate)")


def print_plan(config: ExperimentConfig) -> int:
    """``fcmoe plan``: print :func:`describe`'s lines; exit code 0 when the run fits, 1 when it does not."""
    plan = plan_run(config)
    print("\n".join(describe(plan, config)))
    return 0 if plan.fits else 1
