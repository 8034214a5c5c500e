"""Names of the model families ``model.name`` accepts (no heavy imports: the config validates against it).

``<family>`` loads pretrained weights from ``model.path`` (a local folder or a hub id; the hub is unreachable
offline); ``<family>-tiny`` is a random 2-layer, d = 64, 4-expert configuration of the same family for tests.
"""

from __future__ import annotations

UPCYCLED = ("minilm-moe", "tiny-bert-moe", "smollm2-moe", "smollm2-moe-tiny")  # dense models upcycled by fcmoe
# experts as fused [E, …] tensors
FUSED = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss")
HUB = ("switch", "switch-t2t", *FUSED)  # switch: encoder + head; switch-t2t: encoder-decoder, label generated
FAMILY_NAMES: tuple[str, ...] = (*UPCYCLED, *HUB, *(f"{name}-tiny" for name in HUB))
DEFAULT_PATHS = {"switch": "google/switch-base-16", "switch-t2t": "google/switch-base-16"}
# task = "sft" trains a language model on the response: fcmoe's upcycled SmolLM2, a fused decoder family, or Switch's
# encoder-decoder (text to text)
SFT_MODELS: tuple[str, ...] = ("smollm2-moe", "smollm2-moe-tiny", *FUSED, *(f"{name}-tiny" for name in FUSED),
                               "switch-t2t", "switch-t2t-tiny")
DEFAULT_MODEL = {"classify": "minilm-moe", "sft": "smollm2-moe"}  # model.name = "" (the default): the task's


def base_family(name: str) -> str:
    """``qwen3_moe-tiny`` → ``qwen3_moe``."""
    return name.removesuffix("-tiny")


def weights_family(name: str) -> str:
    """The family whose configuration and weights ``name`` builds on: ``switch-t2t`` is Switch's."""
    family = base_family(name)
    return "switch" if family == "switch-t2t" else family


def supports_lora(name: str) -> bool:
    """LoRA on experts (PEFT ``target_parameters``) needs fused expert tensors."""
    return base_family(name) in FUSED
