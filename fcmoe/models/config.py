"""The ``[model]`` section: which backbone, and how it is made sparse (read by :mod:`fcmoe.models.build`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fcmoe.config_sections import ConfigError
from fcmoe.models.catalog import FAMILY_NAMES, HUB, supports_lora


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone, and how it is made sparse."""

    # a family of fcmoe.models.catalog.FAMILY_NAMES ("<family>-tiny" = random, for tests); "" = the task's default
    # (minilm-moe to classify, smollm2-moe for sft)
    name: str = ""
    path: str = ""  # a local Hugging Face folder (or hub id) instead of the offline asset / family default
    finetune: str = "full"  # full | lora (LoRA on fused experts + attention; fused families only)
    lora_rank: int = 8
    # LoRA on fused experts: factored = x·W_e + s·(x·A_e)·B_e per routed expert (fcmoe.models.expert_lora); merged =
    # PEFT's W + s·B·A, a full copy of every adapted expert stack kept for the backward pass (same results)
    expert_lora: str = "factored"  # factored | merged
    num_experts: int = 8
    moe_layers: tuple[int, ...] = (-2, -1)  # layer indices to upcycle; negative counts from the top
    trainable_layers: int = 2  # the top layers trained; the embeddings and all lower layers are frozen and cached
    router_init_std: float = 0.02
    # pretrained = the weights in model.path (or the family's hub default); random = a hub family's published shape
    # (model.path = its hub id, or empty for the family's default; fcmoe.models.shapes) or a folder's config.json,
    # with random weights made on the training device: real sizes without the hub
    init: str = "pretrained"  # pretrained | random
    num_layers: int = 0  # init = random: keep only the first N layers (0 = all)
    # task = "sft": train the LM head too, federated like the shared parameters (a head tied to the input embeddings
    # is untied: the embeddings stay frozen, so cached features stay valid); off: the head is frozen
    train_lm_head: bool = False

    def __post_init__(self) -> None:
        if self.name and self.name not in FAMILY_NAMES:
            raise ConfigError(f"model.name = {self.name!r}: choose one of {', '.join(FAMILY_NAMES)}")
        local = self.path.startswith(("/", ".", "~")) or "\\" in self.path
        if local and not Path(self.path).expanduser().is_dir():
            raise ConfigError(f"model.path = {self.path!r}: no such folder; point it at a local Hugging Face folder "
                              "(config.json and weights) or give a hub id such as 'Qwen/Qwen3-30B-A3B'")
        if self.finetune not in ("full", "lora"):
            raise ConfigError(f"model.finetune = {self.finetune!r}: choose 'full' or 'lora'")
        # model.name = "" is the task's default, checked again once the experiment resolves it
        if self.name and self.finetune == "lora" and not supports_lora(self.name):
            raise ConfigError(f"model.finetune = 'lora' with model.name = {self.name!r}: LoRA on experts needs fused "
                              f"expert tensors; use one of {', '.join(n for n in FAMILY_NAMES if supports_lora(n))}")
        if self.expert_lora not in ("factored", "merged"):
            raise ConfigError(f"model.expert_lora = {self.expert_lora!r}: choose 'factored' (default) or 'merged' "
                              "(PEFT's)")
        if self.lora_rank < 1:
            raise ConfigError(f"model.lora_rank = {self.lora_rank}: must be >= 1 (e.g. 8)")
        if self.num_experts < 1:
            raise ConfigError(f"model.num_experts = {self.num_experts}: must be >= 1 (the paper uses 16)")
        if self.trainable_layers < 1:
            raise ConfigError(f"model.trainable_layers = {self.trainable_layers}: must be >= 1")
        if not self.router_init_std >= 0:
            raise ConfigError(f"model.router_init_std = {self.router_init_std}: must be >= 0")
        if self.init not in ("pretrained", "random"):
            raise ConfigError(f"model.init = {self.init!r}: choose 'pretrained' or 'random'")
        if self.name and self.init == "random" and self.name not in HUB:
            raise ConfigError(f"model.init = 'random' builds a hub family's published shape; {self.name!r} is not one: "
                              f"use one of {', '.join(HUB)}")
        if self.num_layers < 0 or (self.num_layers and self.init != "random"):
            raise ConfigError(f"model.num_layers = {self.num_layers}: a layer count >= 1 for model.init = 'random' "
                              "(0 = every layer of the shape)")
