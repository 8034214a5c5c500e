"""The ``[train]`` section: local training, identical for every method (read by :mod:`fcmoe.training.local`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fcmoe.config_sections import ConfigError, _positive


@dataclass(frozen=True)
class TrainConfig:
    """Local training, identical for every method."""

    local_epochs: int = 1
    # a fixed number of optimizer steps per round, cycling through the client's data in fresh shuffles (0 = use
    # local_epochs): the drift of a client's update then does not depend on how much data it holds
    local_steps: int = 0
    batch_size: int = 16
    lr: float = 1e-4
    # -1 = auto: 10 × lr for fcmoe's freshly upcycled routers, lr for a pretrained family's own (fcmoe.models.build)
    router_lr: float = -1.0
    weight_decay: float = 0.01
    # Switch load-balancing loss weight, summed over MoE layers; -1 = auto: 0.1 for fcmoe's upcycled routers, a
    # pretrained family's own coefficient in fcmoe's terms (coef · k / MoE layers: fcmoe.models.families)
    aux_loss_coef: float = -1.0
    max_grad_norm: float = 1.0
    # Where local training runs: auto = the first CUDA GPU when one is visible, else the CPU. Trees, aggregation and
    # evaluation outputs stay on the CPU either way (a client's tree of the default is ~75 MB: ~10 ms each way).
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto = the checkpoint's: bf16 compute for a bf16 / fp16 checkpoint, fp32 for an fp32 one; fp32 | bf16 to choose
    # (fcmoe.models.precision: what each weight is kept in). The exchanged trees are fp32 whatever this says
    precision: str = "auto"  # auto | fp32 | bf16
    # Flower's simulation: the share of a GPU each client's Ray actor asks for (-1 = one GPU when train.device is a
    # GPU, else none; an actor given none trains on the CPU)
    client_gpus: float = -1.0
    # under bf16 compute, keep fp32 master copies of the trainable weights (off: pure bf16, half their memory)
    master_weights: bool = True
    # recompute each layer's activations in the backward pass instead of keeping them (same gradients, ~1 more
    # forward): auto = on for the hub families (switch*, the fused decoders), off for fcmoe's upcycled models
    gradient_checkpointing: str = "auto"  # auto | on | off
    # torch's CPU threads for a `fcmoe` command (0 = torch's default, one per core). Part of the experiment: sums
    # over another thread count differ in the last bits, so a resumed run keeps the count it started with
    threads: int = 0

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(f"train.threads = {self.threads}: must be >= 0 (0 = one per core, e.g. 1 on a shared "
                              "machine)")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device = {self.device!r}: choose auto, cpu, cuda or cuda:N (default auto)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision = {self.precision!r}: choose auto, fp32 or bf16 (default auto: the "
                              "checkpoint's own)")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise ConfigError(f"train.gradient_checkpointing = {self.gradient_checkpointing!r}: choose auto, on or off "
                              "(auto = on for hub families)")
        if not (self.client_gpus == -1 or 0 <= self.client_gpus <= 1
                or self.client_gpus > 1 and float(self.client_gpus).is_integer()):
            raise ConfigError(f"train.client_gpus = {self.client_gpus}: a GPU share in [0, 1] (e.g. 0.5), a whole "
                              "number of GPUs, or -1 (one GPU when training on a GPU)")
        if self.client_gpus == 0 and self.device.startswith("cuda"):
            raise ConfigError(f"train.client_gpus = 0 with train.device = {self.device!r}: a Flower client given no "
                              "GPU sees none; give it a share (e.g. 0.5) or -1")
        _positive("train.local_epochs", self.local_epochs)
        if self.local_steps < 0:
            raise ConfigError(f"train.local_steps = {self.local_steps}: must be >= 0 (optimizer steps per round; "
                              "0 = train.local_epochs passes over the data)")
        _positive("train.batch_size", self.batch_size)
        if not self.lr > 0:
            raise ConfigError(f"train.lr = {self.lr}: must be > 0 (default 1e-4)")
        if not (self.router_lr > 0 or self.router_lr == -1):
            raise ConfigError(f"train.router_lr = {self.router_lr}: must be > 0, or -1 (auto: 10 × lr for upcycled "
                              "routers, lr for pretrained ones)")
        if not (self.aux_loss_coef >= 0 or self.aux_loss_coef == -1):
            raise ConfigError(f"train.aux_loss_coef = {self.aux_loss_coef}: must be >= 0, or -1 (auto: the model's "
                              "own)")
        for key in ("weight_decay", "max_grad_norm"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"train.{key} = {getattr(self, key)}: must be >= 0")
