"""The precision policy: what dtype each kind of weight is kept in, and what dtype the forward pass computes in.

MoE LLMs ship their weights in bf16 (a few older ones in fp16). Three dtypes follow from the checkpoint's and the
user's ``train.precision`` / ``train.master_weights``:

- *compute*: the autocast dtype of the forward and backward passes (fp32 = no autocast);
- *frozen*: the weights that never change (embeddings, frozen layers, LoRA's base weights);
- *trainable*: the weights the optimiser updates. With master weights (the default) they are fp32 while the
  computation runs in bf16: AdamW's small steps are not lost to bf16's 8-bit mantissa. Without them every weight is
  bf16 ("pure bf16"): half the memory of the trainable weights and their gradients, at the cost of that rounding.

The trees clients and the server exchange are always fp32, whatever the model holds
(:meth:`~fcmoe.models.classifier.TrainableTree.trainable_state`).

| checkpoint | precision | compute | frozen | trainable (masters on / off) |
|---|---|---|---|---|
| fp32 | auto, fp32 | fp32 | fp32 | fp32 / fp32 |
| fp32 | bf16 | bf16 | fp32 / bf16 | fp32 / bf16 |
| bf16, fp16 | auto, bf16 | bf16 | bf16 | fp32 / bf16 |
| bf16, fp16 | fp32 | fp32 | fp32 (up-cast when loaded) | fp32 / fp32 |

An fp16 checkpoint is loaded as bf16 for bf16 compute: fp16 training needs loss scaling, and bf16 has fp32's range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")


class PrecisionError(ValueError):
    """A precision the device cannot run; the message names the setting and the fix."""


@dataclass(frozen=True)
class PrecisionPlan:
    """The dtypes of one model (see the module docstring's table)."""

    checkpoint: torch.dtype  # as stored
    compute: torch.dtype  # autocast dtype; float32 = autocast off
    frozen: torch.dtype
    trainable: torch.dtype

    @property
    def autocast(self) -> bool:
        return self.compute != torch.float32

    def describe(self) -> str:
        """e.g. ``bf16 checkpoint: compute bf16, frozen bf16, trainable fp32 (master weights)``."""
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        masters = " (master weights)" if self.autocast and self.trainable == torch.float32 else ""
        return (f"{name[self.checkpoint]} checkpoint: compute {name[self.compute]}, frozen {name[self.frozen]}, "
                f"trainable {name[self.trainable]}{masters}")


def plan_precision(checkpoint: torch.dtype, precision: str, master_weights: bool) -> PrecisionPlan:
    """The dtypes for a checkpoint stored in ``checkpoint`` under ``train.precision`` and ``train.master_weights``."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"train.precision = {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if checkpoint not in (torch.float32, torch.bfloat16, torch.float16):
        raise PrecisionError(f"the checkpoint's weights are {checkpoint}, which cannot be trained; load a bf16, fp16 "
                             "or fp32 checkpoint (a quantised one must be de-quantised first)")
    half = checkpoint != torch.float32
    if precision == "fp32" or (precision == "auto" and not half):
        return PrecisionPlan(checkpoint, torch.float32, torch.float32, torch.float32)
    trainable = torch.float32 if master_weights else torch.bfloat16
    # an fp32 checkpoint under bf16 autocast keeps its fp32 weights unless the user asked for pure bf16
    frozen = torch.float32 if not half and master_weights else torch.bfloat16
    return PrecisionPlan(checkpoint, torch.bfloat16, frozen, trainable)


def check_device(plan: PrecisionPlan, device: torch.device) -> None:
    """Refuse bf16 compute on a GPU without bf16 support, before any work."""
    if plan.autocast and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        gpu = torch.cuda.get_device_name(device)
        raise PrecisionError(f"train.precision: bf16 compute ({plan.describe()}) but {gpu}"
                             " has no bf16 support; set train.precision = 'fp32' (the weights are then up-cast)")


def apply_precision(model: nn.Module, plan: PrecisionPlan) -> None:
    """Cast every parameter to its plan dtype in place: trainable ones (``requires_grad``) to ``plan.trainable``,
    the others to ``plan.frozen``. Buffers keep their dtype (rotary frequencies and DeepSeek's routing bias are fp32
    on purpose)."""
    for param in model.parameters():
        dtype = plan.trainable if param.requires_grad else plan.frozen
        if param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)


def stored_dtype(config: object) -> torch.dtype:
    """The dtype a transformers config says its weights were saved in (fp32 when it does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
