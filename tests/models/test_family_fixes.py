"""Family fixes: pretrained routers keep their family's settings (router lr = lr, the family's own balance-loss
weight, per layer as fcmoe sums the layers' losses) while fcmoe's upcycled routers keep 10 × lr and 0.1; LoRA
targets per family (MLA included); GPT-OSS's MXFP4 experts de-quantised."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcmoe.config import ConfigError, load_config
from fcmoe.models.build import build_model
from fcmoe.models.families import FAMILIES
from fcmoe.training.config import TrainConfig
from fcmoe.training.local import LocalTrainer
from tests.helpers import save_tiny_checkpoint, tiny_model


def test_a_pretrained_family_gets_its_own_router_settings(tmp_path: Path) -> None:
    folder = save_tiny_checkpoint("olmoe", tmp_path / "olmoe")
    built = build_model("olmoe", 3, num_experts=4, moe_layers=(0,), trainable_layers=2, router_init_std=0.02,
                        max_length=16, seed=0, path=str(folder))
    # OLMoE's 0.01 on the mean over its 2 MoE layers of a loss whose fractions sum to k = 2 (fcmoe's sum to 1)
    assert built.router_defaults == (1.0, pytest.approx(0.01 * 2 / 2))
    trainer = LocalTrainer(built.model, built.layout, TrainConfig(lr=2e-4, device="cpu"), None, built.router_defaults)
    assert (trainer.router_lr, trainer.aux_loss_coef) == (2e-4, pytest.approx(0.01))


def test_upcycled_routers_and_explicit_values_keep_their_settings() -> None:
    built = tiny_model()
    trainer = LocalTrainer(built.model, built.layout, TrainConfig(lr=1e-4, device="cpu"), None,
                           built.router_defaults)
    assert (trainer.router_lr, trainer.aux_loss_coef) == (pytest.approx(1e-3), 0.1)  # today's defaults
    explicit = LocalTrainer(built.model, built.layout, TrainConfig(router_lr=5e-3, aux_loss_coef=0.0, device="cpu"))
    assert (explicit.router_lr, explicit.aux_loss_coef) == (5e-3, 0.0)
    with pytest.raises(ConfigError, match="train.router_lr = -2.0: must be > 0, or -1"):
        load_config(overrides=["train.router_lr=-2"])


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_lora_reaches_deepseeks_latent_attention(family: str) -> None:
    built = build_model(f"{family}-tiny", 3, num_experts=4, moe_layers=(0,), trainable_layers=2,
                        router_init_std=0.02, max_length=16, seed=0, finetune="lora", lora_rank=2)
    adapted = {key.split(".lora_A")[0].rsplit(".", 1)[-1] for key in built.model.trainable_state() if ".lora_A" in key}
    assert {"q_proj", "kv_b_proj"} <= adapted  # MLA has no v_proj: its values come out of kv_b_proj
    assert FAMILIES[family].lora_targets != FAMILIES["qwen3_moe"].lora_targets


def test_an_mxfp4_gpt_oss_checkpoint_is_dequantised_for_training(tmp_path: Path) -> None:
    import json

    from fcmoe.models.families import _dequantised

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss", **FAMILIES["gpt_oss"].tiny,
                                                      "quantization_config": {"quant_method": "mxfp4"}}))
    assert _dequantised(str(tmp_path))["quantization_config"].dequantize is True
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss", **FAMILIES["gpt_oss"].tiny}))
    assert _dequantised(str(tmp_path)) == {}


def test_a_pretrained_decoder_scores_label_words_with_its_lm_head_and_keeps_the_prompts_end(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = save_tiny_checkpoint("qwen3_moe", tmp_path / "qwen3", causal=True, tie_word_embeddings=False)
    lm_head = load_file(str(folder / "model.safetensors"))["lm_head.weight"]
    built = build_model("qwen3_moe", 4, num_experts=4, moe_layers=(0,), trainable_layers=2, router_init_std=0.02,
                        max_length=8, seed=0, path=str(folder), label_names=["A", "B", "C", "D"])
    ids, _ = built.tokenize(["one two three four five six seven eight nine ten Answer:"])
    letters = [ids for ids in (built.tokenize([f" {c}"])[0][0, 1].item() for c in "abcd")]
    assert torch.equal(built.model.head.weight.detach(), lm_head[letters].float())  # next-token scores of " A".." D"
    assert not built.model.head.bias.any()
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(folder)).convert_ids_to_tokens(ids[0].tolist())
    assert "answer" in tokens and ":" in tokens and "one" not in tokens  # truncated on the left: the cue is kept
    words = build_model("qwen3_moe", 2, num_experts=4, moe_layers=(0,), trainable_layers=2, router_init_std=0.02,
                        max_length=8, seed=0, path=str(folder), label_names=["world news", "sports"])
    assert not torch.equal(words.model.head.weight.detach(), lm_head[letters[:2]].float())  # a fresh head
