"""Published MoE shapes, for building real-size models with random weights where the hub is out of reach.

``model.init = "random"`` builds a hub family from one of these configurations (``model.path`` = its hub id, or the
family's default below), or from a local folder's ``config.json``, optionally cut to ``model.num_layers`` layers.
The weights are created on the ``meta`` device and materialised on the training device in the checkpoint's dtype,
so no host copy of the model is ever made. The values are those of each model's ``config.json`` on the hub (the
``source`` of each entry); ``total`` and ``active`` are the parameter counts its authors publish, in billions,
which :func:`count_parameters` reproduces from the shape (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from fcmoe.models.catalog import weights_family
from fcmoe.models.memory import idle_expert_parameters


@dataclass(frozen=True)
class PublishedShape:
    """One published model's architecture, as its ``config.json`` gives it."""

    family: str
    config: dict[str, Any]
    source: str  # where the values were read
    total: float | None  # published parameter count, billions (None: its authors publish none)
    active: float | None  # published parameters active per token, billions
    active_counts_embedding: bool = True  # False: the authors leave the input embedding out of "active"
    notes: str = field(default="")


_SWITCH = dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
               encoder_sparse_step=2, decoder_sparse_step=2, vocab_size=32128, expert_capacity=64,
               relative_attention_num_buckets=32, tie_word_embeddings=True, dtype="float32")

SHAPES: dict[str, PublishedShape] = {
    "google/switch-base-8": PublishedShape(
        "switch", dict(_SWITCH, num_experts=8), "https://huggingface.co/google/switch-base-8/blob/main/config.json",
        None, None, notes="no published count; its 1.24 GB bf16 checkpoint holds ~0.62 B"),
    "google/switch-base-16": PublishedShape(
        "switch", dict(_SWITCH, num_experts=16), "https://huggingface.co/google/switch-base-16/blob/main/config.json",
        None, None, notes="no published count; its 4.29 GB fp32 checkpoint holds ~1.07 B"),
    "allenai/OLMoE-1B-7B-0924": PublishedShape(
        "olmoe", dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                      norm_topk_prob=False, tie_word_embeddings=False, max_position_embeddings=4096,
                      dtype="bfloat16"),
        "https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json", 6.9, 1.3,
        notes="counts: github.com/allenai/OLMoE README"),
    "Qwen/Qwen1.5-MoE-A2.7B": PublishedShape(
        "qwen2_moe", dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                          shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                          num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, vocab_size=151936,
                          tie_word_embeddings=False, decoder_sparse_step=1, norm_topk_prob=False,
                          max_position_embeddings=8192, dtype="bfloat16"),
        "https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json", 14.3, 2.7,
        notes="counts: the model card"),
    "Qwen/Qwen3-30B-A3B": PublishedShape(
        "qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, vocab_size=151936, tie_word_embeddings=False, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960,
                          dtype="bfloat16"),
        "https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json", 30.5, 3.3,
        notes="counts: the model card"),
    "mistralai/Mixtral-8x7B-v0.1": PublishedShape(
        "mixtral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                        tie_word_embeddings=False, max_position_embeddings=32768, dtype="bfloat16"),
        "https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json", 46.7, 12.9,
        notes="counts: Mistral's announcement (the paper rounds to 47 B and 13 B)"),
    "deepseek-ai/DeepSeek-V2-Lite": PublishedShape(
        "deepseek_v2", dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                            num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                            n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                            kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
                            v_head_dim=128, vocab_size=102400, n_group=1, topk_group=1, topk_method="greedy",
                            routed_scaling_factor=1.0, norm_topk_prob=False, tie_word_embeddings=False,
                            max_position_embeddings=163840, dtype="bfloat16"),
        "https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json", 15.7, 2.4,
        active_counts_embedding=False, notes="counts: the DeepSeek-V2 paper (the model card rounds to 16 B)"),
    "openai/gpt-oss-20b": PublishedShape(
        "gpt_oss", dict(hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                        vocab_size=201088, tie_word_embeddings=False, sliding_window=128,
                        max_position_embeddings=131072, dtype="bfloat16"),
        "https://huggingface.co/openai/gpt-oss-20b/blob/main/config.json", 20.9, 3.6, active_counts_embedding=False,
        notes="counts: the gpt-oss model card (arXiv 2508.10925); published as MXFP4 experts, built here in bf16, "
              "the dtype it trains in"),
}

# the shape ``model.init = "random"`` builds when model.path is empty
DEFAULT_SHAPES = {"switch": "google/switch-base-16", "olmoe": "allenai/OLMoE-1B-7B-0924",
                  "qwen2_moe": "Qwen/Qwen1.5-MoE-A2.7B", "qwen3_moe": "Qwen/Qwen3-30B-A3B",
                  "mixtral": "mistralai/Mixtral-8x7B-v0.1", "deepseek_v2": "deepseek-ai/DeepSeek-V2-Lite",
                  "gpt_oss": "openai/gpt-oss-20b"}


def shape_config(name: str, config_class: str, path: str, num_layers: int = 0) -> Any:
    """The transformers config ``model.init = "random"`` builds: ``path`` is a hub id of :data:`SHAPES`, a local
    folder holding a ``config.json``, or empty (the family's :data:`DEFAULT_SHAPES` entry); cut to ``num_layers``
    layers when > 0."""
    family = weights_family(name)
    key = path or DEFAULT_SHAPES.get(family, "")
    if key in SHAPES:
        shape = SHAPES[key]
        if shape.family != family:
            raise ValueError(f"model.path = {key!r} is a {shape.family} shape, not {family}: set model.name = "
                             f"{shape.family!r}")
        config = getattr(transformers, config_class)(**shape.config)
    elif key and (Path(key) / "config.json").is_file():
        config = transformers.AutoConfig.from_pretrained(key)
    else:
        known = ", ".join(k for k, s in SHAPES.items() if s.family == family) or "none for this family"
        raise ValueError(f"model.init = 'random' needs a published shape or a folder with a config.json in "
                         f"model.path, got {key!r}; {family} shapes: {known}")
    return cut_layers(config, num_layers) if num_layers else config


def cut_layers(config: Any, num_layers: int) -> Any:
    """``config`` with its first ``num_layers`` layers (Switch: encoder and decoder each), per-layer lists cut too."""
    switch = hasattr(config, "num_decoder_layers")  # Switch: a count per stack, encoder and decoder
    depth = config.num_layers if switch else config.num_hidden_layers
    if num_layers > depth:
        raise ValueError(f"model.num_layers = {num_layers}: the shape has only {depth} layers")
    if switch:
        config.num_layers = config.num_decoder_layers = num_layers
        return config
    config.num_hidden_layers = num_layers
    for key in ("layer_types", "mlp_layer_types"):
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, getattr(config, key)[:num_layers])
    return config


@contextmanager
def on_meta(dtype: torch.dtype) -> Iterator[None]:
    """Inside the block, modules are created on the ``meta`` device (shapes only, no memory) in ``dtype``."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(default)


def materialise(build: Any, config: Any, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``build(config)`` created on the ``meta`` device (no memory), then allocated on ``device`` in ``dtype`` and
    initialised there by transformers' own weight initialisation: no host copy of the weights."""
    with on_meta(dtype):
        model = build(config)
    model.to_empty(device=device)
    model.initialize_weights()
    return model


def count_parameters(shape: PublishedShape, num_layers: int = 0) -> tuple[int, int]:
    """(total, active) parameters of ``shape``'s full model with its LM head, built on the ``meta`` device: active
    counts the k routed experts a token uses in each MoE layer, not the E − k others, and leaves the input embedding
    out where the authors do (``active_counts_embedding``)."""
    from fcmoe.models.families import FAMILIES  # the family table sits above this module

    family = FAMILIES[shape.family]
    config = getattr(transformers, family.config_class)(**shape.config)
    if num_layers:
        cut_layers(config, num_layers)
    with torch.device("meta"):
        model = (transformers.SwitchTransformersForConditionalGeneration(config) if shape.family == "switch"
                 else transformers.AutoModelForCausalLM.from_config(config))
    total = sum(p.numel() for p in model.parameters())
    idle = idle_expert_parameters(model, int(getattr(config, "num_experts_per_tok", 1)))
    embedding = 0 if shape.active_counts_embedding else model.get_input_embeddings().weight.numel()
    return total, total - idle - embedding
