"""Gradient checkpointing changes memory, not the training: the same local training with and without it ends in the
same trees (a FedMoE sub-MoE mask active, so the routers re-run inside it in the backward pass)."""

from __future__ import annotations

import pytest
import torch

from fcmoe.models.build import checkpointing
from fcmoe.training.config import TrainConfig
from fcmoe.training.local import LocalTrainer, featurize
from tests.helpers import TEXTS, build_family, tiny_sft

CASES = [("tiny-bert-moe", "full"), ("smollm2-moe-tiny", "full"), ("switch-tiny", "full"),
         ("switch-t2t-tiny", "full"), ("qwen3_moe-tiny", "full"), ("qwen3_moe-tiny", "lora"),
         ("deepseek_v3-tiny", "full"), ("gpt_oss-tiny", "lora")]


def _train(name: str, finetune: str, on: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(start tree, end tree, forward calls of the first router)."""
    built = build_family(name, finetune)
    if on:
        built.model.enable_gradient_checkpointing()
    calls = []
    built.model.get_submodule(built.layout.layers[0].router_module).register_forward_hook(
        lambda *args: calls.append(1))
    trainer = LocalTrainer(built.model, built.layout, TrainConfig(batch_size=3, device="cpu", lr=1e-2))
    ids, mask = built.tokenize(TEXTS * 3)
    data = featurize(built.model, ids, mask, torch.tensor([0, 1, 2] * 3))
    assert not data.features.requires_grad  # cached features stay outside every graph (steps reuse them)
    held = {spec.name: torch.tensor([1.0, 0.0, 1.0, 1.0]) for spec in built.layout.layers}
    start = built.model.trainable_state()
    end = trainer.train(start, data, seed=0, expert_mask=held).state
    return start, end, len(calls)


@pytest.mark.parametrize(("name", "finetune"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_checkpointing_gives_the_same_training(name: str, finetune: str) -> None:
    start, plain, forwards = _train(name, finetune, on=False)
    _, recomputed, with_recompute = _train(name, finetune, on=True)
    assert any(not torch.equal(plain[k], start[k]) for k in start)  # it trained
    assert (forwards, with_recompute) == (3, 6)  # 3 steps; checkpointing re-runs each router in the backward pass
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_checkpointing_is_on_by_default_for_hub_families_only() -> None:
    assert checkpointing("qwen3_moe", "auto") and checkpointing("switch-tiny", "auto")
    assert not checkpointing("minilm-moe", "auto") and not checkpointing("smollm2-moe", "auto")
    assert checkpointing("minilm-moe", "on") and not checkpointing("olmoe", "off")


@pytest.mark.parametrize("name", ["switch-t2t-tiny", "qwen3_moe-tiny"])
def test_checkpointing_gives_the_same_instruction_tuning(name: str) -> None:
    """Task = "sft": the response loss through an encoder-decoder and a decoder, with and without checkpointing."""
    from fcmoe.models.causal_lm import encode_pairs
    from fcmoe.training.local import FeatureSet

    ends = []
    for on in (False, True):
        built = tiny_sft(name)
        if on:
            built.model.enable_gradient_checkpointing()
        pairs = encode_pairs(built.model.codec, TEXTS * 2, ["yes", "no it is not", "maybe so"] * 2, 32)
        data = FeatureSet(pairs.ids, pairs.mask, torch.zeros(6, dtype=torch.long), pairs.targets,
                          torch.zeros(6, dtype=torch.bool))
        trainer = LocalTrainer(built.model, built.layout, TrainConfig(batch_size=3, device="cpu", lr=1e-2))
        start = built.model.trainable_state()
        ends.append(trainer.train(start, data, seed=0).state)
    assert any(not torch.equal(ends[0][k], start[k]) for k in start)
    for key in ends[0]:
        torch.testing.assert_close(ends[1][key], ends[0][key], rtol=1e-5, atol=1e-6, msg=key)
