"""Hugging Face MoE families: Switch Transformers (encoder + head) and fused-expert decoders, full or LoRA.

Each family maps to a transformers config class (for the ``-tiny`` random variant), the pooling its classifier
uses, and the expert layout that addresses its parameters. Pretrained weights come from ``model.path`` (a local
folder, or a hub id when the hub is reachable).
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub.errors import HFValidationError
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import cached_file

from fcmoe.errors import first_line, why_hub_failed
from fcmoe.models.backbone import BackboneClassifier
from fcmoe.models.catalog import DEFAULT_PATHS, base_family, weights_family
from fcmoe.models.expert_lora import use_factored_expert_lora
from fcmoe.models.layout import ExpertLayout, FusedExpertLayout, LoRAExpertLayout, SwitchLayout
from fcmoe.models.precision import PrecisionPlan, plan_precision, stored_dtype
from fcmoe.models.shapes import materialise, on_meta, shape_config


@dataclass(frozen=True)
class Family:
    """How to build one family."""

    config_class: str  # transformers config class name
    tiny: dict[str, Any]  # kwargs of a 2-layer, d = 64, 4-expert random config
    pooling: str  # "mean" (encoder) | "last" (decoder)
    layout: type[ExpertLayout]
    experts_attribute: str  # config attribute holding the number of routed experts
    router_attr: str = "gate"  # attribute of the router module inside each MoE block
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # attention modules LoRA adapts besides the experts
    balance_coef: float | None = None  # the family's balance-loss coefficient (None: its config's router_aux_loss_coef)


# DeepSeek's multi-head latent attention has no v_proj: queries (q_proj, or q_b_proj under a query LoRA rank) and the
# up-projection of the compressed keys and values (kv_b_proj). Balance coefficients: DeepSeek-V2's aux_loss_alpha;
# DeepSeek-V3 balances through its routing bias and keeps a sequence-wise loss of weight 0.0001
MLA_TARGETS = ("q_proj", "q_b_proj", "kv_b_proj")

_DECODER = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)

FAMILIES: dict[str, Family] = {
    # Switch: sparse step 2 makes block 1 of 2 an MoE layer; transformers only adds Switch's own losses then.
    "switch": Family("SwitchTransformersConfig",
                     dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                          num_heads=4, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2,
                          expert_capacity=64), "mean", SwitchLayout, "num_experts"),
    "qwen3_moe": Family("Qwen3MoeConfig", dict(_DECODER, moe_intermediate_size=32, num_experts=4,
                                               num_experts_per_tok=2, head_dim=16), "last", FusedExpertLayout,
                        "num_experts"),
    "mixtral": Family("MixtralConfig", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2), "last",
                      FusedExpertLayout, "num_local_experts"),
    "olmoe": Family("OlmoeConfig", dict(_DECODER, num_experts=4, num_experts_per_tok=2), "last",
                    FusedExpertLayout, "num_experts"),
    "qwen2_moe": Family("Qwen2MoeConfig", dict(_DECODER, moe_intermediate_size=32, num_experts=4,
                                               num_experts_per_tok=2, shared_expert_intermediate_size=32),
                        "last", FusedExpertLayout, "num_experts"),
    "deepseek_v3": Family("DeepseekV3Config", dict(_DECODER, num_key_value_heads=4, moe_intermediate_size=32,
                                                   n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                                   first_k_dense_replace=0, n_group=1, topk_group=1,
                                                   q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                                   qk_nope_head_dim=8, v_head_dim=16), "last",
                          FusedExpertLayout, "n_routed_experts", lora_targets=MLA_TARGETS, balance_coef=0.0001),
    "deepseek_v2": Family("DeepseekV2Config", dict(_DECODER, num_key_value_heads=4, moe_intermediate_size=32,
                                                   n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                                   first_k_dense_replace=0, n_group=1, topk_group=1,
                                                   topk_method="greedy", q_lora_rank=None, kv_lora_rank=16,
                                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16), "last",
                          FusedExpertLayout, "n_routed_experts", lora_targets=MLA_TARGETS, balance_coef=0.001),
    "gpt_oss": Family("GptOssConfig", dict(_DECODER, intermediate_size=32, head_dim=16, num_local_experts=4,
                                           num_experts_per_tok=2, rope_parameters=None), "last",
                      FusedExpertLayout, "num_local_experts", router_attr="router"),
}

LORA_TARGET_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def build_hub_family(name: str, num_labels: int, *, path: str, finetune: str, lora_rank: int, max_length: int,
                     plan: PrecisionPlan, init: str = "pretrained", num_layers: int = 0,
                     device: torch.device | str = "cpu", expert_lora: str = "factored",
                     label_names: Sequence[str] = ()) -> tuple[BackboneClassifier, ExpertLayout, Any]:
    """Backbone classifier, its layout and a tokenize function for a Switch or fused-expert family.

    Pretrained weights are loaded straight onto ``device`` in ``plan.frozen``'s dtype; ``init = "random"`` builds a
    published shape (:mod:`fcmoe.models.shapes`) there with random weights, tokenised by the folder's tokenizer
    when ``path`` has one, else by the hashing tokenizer over the shape's vocabulary. ``expert_lora``: "factored"
    (:mod:`fcmoe.models.expert_lora`) or PEFT's "merged" forward.

    A pretrained decoder reads its prompts' ends (the tokenizer truncates on the left: the last-token pooling reads
    the ``Answer:`` cue), and when every label name is one token with a leading space its classification head starts
    as those rows of its LM head: the classifier then *is* next-token scoring of the label words (as smollm2-moe's).
    """
    head_rows = None
    if name.endswith("-tiny") or init == "random":
        config = hub_config(name, path, init, num_layers)
        if name.endswith("-tiny"):
            backbone = from_config(name, config)
        else:
            backbone = materialise(lambda c: from_config(name, c), config, torch.device(device), plan.frozen)
        tokenize = (hf_tokenize(path, max_length) if has_tokenizer(path)
                    else hashing_tokenize(config.vocab_size, max_length))
    else:
        source = pretrained_path(name, path)
        backbone = from_pretrained(name, source, plan.frozen, torch.device(device))
        tokenizer = load_tokenizer(source)
        if FAMILIES[base_family(name)].pooling == "last":
            tokenizer.truncation_side = "left"
            choice_ids = single_token_ids(tokenizer, label_names)
            head_rows = lm_head_rows(source, choice_ids, backbone) if choice_ids else None
        tokenize = tokenize_with(tokenizer, max_length)
    model, layout = _classifier(name, backbone, num_labels, finetune, lora_rank, expert_lora)
    if head_rows is not None:
        with torch.no_grad():
            model.head.weight.copy_(head_rows)
            model.head.bias.zero_()
    return model, layout, tokenize


def single_token_ids(tokenizer: Any, label_names: Sequence[str]) -> list[int] | None:
    """Token ids of " A", " B", … when each label is exactly one token; else None (a fresh head)."""
    ids = [tokenizer.encode(" " + label, add_special_tokens=False) for label in label_names]
    return [i[0] for i in ids] if ids and all(len(i) == 1 for i in ids) else None


def lm_head_rows(source: str, token_ids: Sequence[int], backbone: Any) -> torch.Tensor | None:
    """Rows ``token_ids`` of the checkpoint's LM head ``[C, H]``, read from its safetensors file alone (the head is
    not loaded); its input embeddings' rows when the two are tied; None when neither can be read."""
    if getattr(backbone.config, "tie_word_embeddings", False):
        return backbone.get_input_embeddings().weight[list(token_ids)].detach().float()
    with pretrained_source("lm head", source):
        index = cached_file(source, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
        shard = (json.loads(Path(index).read_text())["weight_map"].get("lm_head.weight") if index
                 else "model.safetensors")
        weights = cached_file(source, shard, _raise_exceptions_for_missing_entries=False) if shard else None
    if weights is None:
        return None
    with safe_open(weights, framework="pt") as file:
        if "lm_head.weight" not in file.keys():
            return None
        rows = file.get_slice("lm_head.weight")
        return torch.stack([rows[i] for i in token_ids]).float()


def meta_hub_family(name: str, num_labels: int, *, path: str, finetune: str, lora_rank: int, init: str,
                    num_layers: int, dtype: torch.dtype, expert_lora: str = "factored",
                    ) -> tuple[BackboneClassifier, ExpertLayout]:
    """The classifier :func:`build_hub_family` builds, on the ``meta`` device: every shape, no memory, no weights
    read (a pretrained checkpoint's ``config.json`` only)."""
    config = hub_config(name, path, init, num_layers)
    with on_meta(dtype):
        return _classifier(name, from_config(name, config), num_labels, finetune, lora_rank, expert_lora)


def hub_config(name: str, path: str, init: str = "pretrained", num_layers: int = 0) -> Any:
    """The transformers config of a hub family as fcmoe builds it: ``-tiny``'s, a published shape, or a checkpoint's
    own ``config.json``."""
    family = FAMILIES[weights_family(name)]
    if name.endswith("-tiny"):
        return getattr(transformers, family.config_class)(**family.tiny)
    if init == "random":
        return shape_config(name, family.config_class, path, num_layers)
    return checkpoint_config(name, pretrained_path(name, path))


def checkpoint_config(name: str, source: str) -> Any:
    """The ``config.json`` of the checkpoint at ``source`` (hub id or folder), read before any weight; a failure is
    one :class:`ModelLoadError` line."""
    with pretrained_source(name, source):
        return AutoConfig.from_pretrained(source)


def _classifier(name: str, backbone: Any, num_labels: int, finetune: str, lora_rank: int,
                expert_lora: str) -> tuple[BackboneClassifier, ExpertLayout]:
    """LoRA (when asked) and the classification head on ``backbone``, and the layout of the trainable tree."""
    embeddings = backbone.get_input_embeddings()
    model = BackboneClassifier(adapt(name, backbone, finetune, lora_rank, expert_lora), embeddings, num_labels,
                               FAMILIES[base_family(name)].pooling)
    return model, expert_layout(name, model, backbone.config, finetune)


def adapt(name: str, model: Any, finetune: str, lora_rank: int, expert_lora: str) -> Any:
    """``model`` itself (full fine-tuning), or wrapped by PEFT with LoRA on its experts and attention (everything
    else frozen); ``expert_lora`` = "factored" swaps in :mod:`fcmoe.models.expert_lora`'s forward."""
    if finetune != "lora":
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                      target_modules=list(FAMILIES[base_family(name)].lora_targets),
                      target_parameters=LORA_TARGET_PARAMETERS)
    model = get_peft_model(model, lora)
    if expert_lora == "factored":
        use_factored_expert_lora(model)
    return model


def expert_layout(name: str, model: Any, config: Any, finetune: str) -> ExpertLayout:
    """The layout of ``model``'s trainable tree (a family built by this module, full or LoRA)."""
    family = FAMILIES[base_family(name)]
    num_experts = int(getattr(config, family.experts_attribute))
    layout_class = LoRAExpertLayout if finetune == "lora" else family.layout
    top_k = int(getattr(config, "num_experts_per_tok", 1))  # Switch: top-1
    shapes = {key: p.shape for key, p in model.named_parameters() if p.requires_grad}  # the trainable tree's
    layout = layout_class(shapes, num_experts, family.router_attr, top_k)
    if not layout.layers:
        raise ValueError(f"{name}: no MoE layer found in the trainable parameters")
    return layout


def balance_coefficient(name: str, config: Any, moe_layers: int, top_k: int) -> float:
    """A pretrained family's own balance-loss weight in fcmoe's terms: transformers applies it to the mean over
    layers (fcmoe sums them: ÷ layers) of E · Σ_e (assignments_e / tokens) · prob_e, whose fractions sum to k
    (fcmoe's sum to 1: × k)."""
    family = FAMILIES[base_family(name)]
    coef = family.balance_coef if family.balance_coef is not None else getattr(config, "router_aux_loss_coef", 0.001)
    return float(coef) * top_k / max(moe_layers, 1)


def from_config(name: str, config: Any, causal: bool = False) -> Any:
    """A family's model with random weights: the backbone, or (``causal``) a decoder with its LM head."""
    if base_family(name) == "switch":
        return transformers.SwitchTransformersEncoderModel(config)
    return (AutoModelForCausalLM if causal else AutoModel).from_config(config)


class ModelLoadError(ValueError):
    """Pretrained weights or a tokenizer that cannot be loaded; the message names the source and the fix."""


@contextlib.contextmanager
def pretrained_source(name: str, source: str) -> Iterator[None]:
    """Turn transformers' failures to load ``source`` (hub id or folder) into one :class:`ModelLoadError` line."""
    try:
        yield
    except (OSError, HFValidationError) as err:
        local = Path(source).expanduser().is_dir()
        reason = first_line(err)[:200] if local or isinstance(err, HFValidationError) else why_hub_failed(err)
        raise ModelLoadError(
            f"model.name = {name!r}: cannot load {source!r}: {reason}; or set model.path to a local folder holding "
            "its config.json, weights and tokenizer") from None


def from_pretrained(name: str, source: str, dtype: torch.dtype, device: torch.device, causal: bool = False) -> Any:
    """The checkpoint's weights, read straight onto ``device`` in ``dtype`` (no host copy of a GPU model). GPT-OSS
    ships its experts in MXFP4 (uint8 blocks, untrainable), which transformers keeps where the ``kernels`` package
    is installed: they are de-quantised to ``dtype`` here, whatever is installed. ``causal``: with the LM head."""
    with pretrained_source(name, source):
        if base_family(name) == "switch":
            return transformers.SwitchTransformersEncoderModel.from_pretrained(source, dtype=dtype, device_map=device)
        extra = _dequantised(source) if base_family(name) == "gpt_oss" else {}
        return (AutoModelForCausalLM if causal else AutoModel).from_pretrained(source, dtype=dtype, device_map=device,
                                                                               **extra)


def _dequantised(source: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that de-quantise an MXFP4 checkpoint (none for one saved unquantised)."""
    config = AutoConfig.from_pretrained(source)
    quantisation = getattr(config, "quantization_config", None) or {}
    method = quantisation.get("quant_method") if isinstance(quantisation, dict) else getattr(quantisation,
                                                                                             "quant_method", None)
    return {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if method == "mxfp4" else {}


def has_tokenizer(path: str) -> bool:
    """Whether the folder ``path`` holds a tokenizer of its own."""
    return bool(path) and any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def pretrained_path(name: str, path: str) -> str:
    """``model.path``, or the family's default hub id; raises ``ValueError`` when there is neither."""
    source = path or DEFAULT_PATHS.get(base_family(name), "")
    if not source:
        raise ValueError(f"model.path is empty: {name!r} needs a local folder or hub id of its weights")
    return source


def hub_plan(name: str, path: str, init: str, num_layers: int, precision: str,
             master_weights: bool) -> PrecisionPlan:
    """The precision plan of a hub family's checkpoint or published shape, read from its config before any weight."""
    return plan_precision(stored_dtype(hub_config(name, path, init, num_layers)), precision, master_weights)


def pretrained_plan(name: str, source: str, precision: str, master_weights: bool) -> PrecisionPlan:
    """The precision plan of the checkpoint at ``source``, read from its config before any weight is loaded."""
    return plan_precision(stored_dtype(checkpoint_config(name, source)), precision, master_weights)


def load_tokenizer(source: str) -> Any:
    """The model's own tokenizer, right-padded (pad = eos if it has none)."""
    with pretrained_source("tokenizer", source):
        tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def tokenize_with(tokenizer: Any, max_length: int) -> Any:
    """Texts → (ids ``[n, max_length]``, mask ``[n, max_length]``), padded and truncated by ``tokenizer``."""

    def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    return tokenize


def hf_tokenize(source: str, max_length: int) -> Any:
    """Right-padded, truncated tokenisation with the model's own tokenizer."""
    return tokenize_with(load_tokenizer(source), max_length)


def hashing_token_id(word: str, vocab_size: int) -> int:
    """Id of ``word`` under :func:`hashing_tokenize`: 2 + crc32(word) mod (V − 2)."""
    return 2 + zlib.crc32(word.encode()) % (vocab_size - 2)


def hashing_tokenize(vocab_size: int, max_length: int) -> Any:
    """[CLS]=1, words → :func:`hashing_token_id`, padding 0: no vocabulary file needed (random tiny models)."""

    def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [1] + [hashing_token_id(w, vocab_size) for w in text.split()][: max_length - 1]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, (ids != 0).long()

    return tokenize
