"""Published shapes: their parameter counts are the published ones, and model.init = "random" builds them on the
meta device and materialises them in the checkpoint's dtype, cut to a few layers, without the hub."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fcmoe.config import ConfigError, load_config
from fcmoe.models.build import build_model
from fcmoe.models.shapes import DEFAULT_SHAPES, SHAPES, count_parameters, shape_config
from fcmoe.runner import run_experiment

PUBLISHED = [key for key, shape in SHAPES.items() if shape.total is not None]


@pytest.mark.parametrize("key", PUBLISHED)
def test_the_published_total_and_active_counts_come_out_of_each_shape(key: str) -> None:
    shape = SHAPES[key]
    total, active = count_parameters(shape)
    # published figures are rounded to 2-3 significant digits
    assert total / 1e9 == pytest.approx(shape.total, rel=0.02), total
    assert active / 1e9 == pytest.approx(shape.active, rel=0.03), active


def test_every_listed_family_has_a_default_shape_of_its_own() -> None:
    assert {"switch", "olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "gpt_oss"} <= set(DEFAULT_SHAPES)
    assert all(SHAPES[key].family == family for family, key in DEFAULT_SHAPES.items())
    assert len(PUBLISHED) >= 6


def test_a_real_width_shape_cut_to_one_layer_materialises_in_bf16_with_real_shapes() -> None:
    """OLMoE-1B-7B at its real width, one layer: the experts are [64, 2048, 2048] and [64, 2048, 1024] bf16."""
    built = build_model("olmoe", 4, num_experts=0, moe_layers=(), trainable_layers=1, router_init_std=0.0,
                        max_length=16, seed=0, path="allenai/OLMoE-1B-7B-0924", init="random", num_layers=1,
                        finetune="lora", lora_rank=2)
    params = dict(built.model.named_parameters())
    gate_up, down = (next(p for n, p in params.items() if n.endswith(f".{w}")) for w in ("gate_up_proj", "down_proj"))
    assert (gate_up.shape, down.shape) == ((64, 2048, 2048), (64, 2048, 1024))
    assert gate_up.dtype == down.dtype == torch.bfloat16 and gate_up.device.type == "cpu"
    assert not any(".layers.1." in n for n in params) and built.layout.top_k == 8
    assert all(p.dtype == torch.float32 for p in params.values() if p.requires_grad)  # fp32 adapter masters
    # transformers' own initialisation ran on the materialised tensors: no uninitialised memory
    assert 0.01 < gate_up.float().std().item() < 0.03 and torch.isfinite(down).all()
    ids, mask = built.tokenize(["one two three"])
    with torch.no_grad(), torch.autocast("cpu", dtype=built.precision.compute):  # as LocalTrainer runs it
        assert built.model(built.model.featurize(ids, mask), mask).shape == (1, 4)


def test_a_folder_config_json_federates_with_random_weights(tmp_path: Path) -> None:
    """Any config.json works as a shape: a tiny one here, through fcmoe run's default methods."""
    from fcmoe.models.families import FAMILIES

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", **FAMILIES["qwen3_moe"].tiny,
                                                      "dtype": "bfloat16", "num_hidden_layers": 3}))
    config = load_config(overrides=["model.name=qwen3_moe", f"model.path={tmp_path}", "model.init=random",
                                    "model.num_layers=2", "data.name=20ng4", "data.train_per_class=3",
                                    "data.test_per_class=1", "data.max_length=16", "partition.num_clients=2",
                                    "partition.min_partition_size=4", "rounds=2"])
    (tmp_path / "run").mkdir()
    summaries = run_experiment(config, tmp_path / "run", show_progress=False)
    assert len(summaries) == 4 and all(math.isfinite(s.global_acc) for s in summaries)
    assert shape_config("qwen3_moe", "Qwen3MoeConfig", str(tmp_path), 2).num_hidden_layers == 2


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.name=minilm-moe", "model.init=random"], "model.init = 'random' builds a hub family's published shape"),
    (["model.name=olmoe", "model.num_layers=2"], "model.num_layers = 2: a layer count >= 1 for model.init = 'random'"),
    (["model.name=olmoe", "model.init=rand"], "model.init = 'rand': choose 'pretrained' or 'random'"),
])
def test_bad_init_settings_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_a_shape_of_another_family_names_the_right_one() -> None:
    with pytest.raises(ValueError, match="is a qwen3_moe shape, not olmoe: set model.name = 'qwen3_moe'"):
        shape_config("olmoe", "OlmoeConfig", "Qwen/Qwen3-30B-A3B")
    with pytest.raises(ValueError, match="deepseek_v3 shapes: none for this family"):
        shape_config("deepseek_v3", "DeepseekV3Config", "")


@pytest.mark.parametrize("task", ["classify", "sft"])
def test_switch_t2t_builds_the_encoder_decoder_shape_with_random_weights(tmp_path: Path, task: str) -> None:
    """switch-base-8's published shape as the text-to-text model (meta: every weight but the shared embeddings
    trains, 619 M in all), and a folder's config.json materialised, cut to its layers, for both tasks."""
    from fcmoe.models.build import meta_model
    from fcmoe.models.families import FAMILIES

    meta = meta_model("switch-t2t", path="google/switch-base-8", finetune="full", lora_rank=8, init="random",
                      num_layers=0, precision="auto", master_weights=True, expert_lora="factored", num_experts=0,
                      moe_layers=(), trainable_layers=0, task=task)
    total = sum(p.numel() for p in meta.model.model.parameters())
    trainable = sum(p.numel() for p in meta.model.model.parameters() if p.requires_grad)
    assert total / 1e9 == pytest.approx(0.619, rel=0.01)  # switch-base-8: 619 M parameters
    assert trainable == total - meta.model.model.get_input_embeddings().weight.numel()
    stacks = {spec.name.split(".")[1] for spec in meta.layout.layers}
    assert len(meta.layout.layers) == 12 and stacks == {"encoder", "decoder"}

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "switch_transformers",
                                                      **FAMILIES["switch"].tiny, "num_layers": 4,
                                                      "num_decoder_layers": 4}))
    built = build_model("switch-t2t", 2, num_experts=0, moe_layers=(), trainable_layers=0, router_init_std=0.0,
                        max_length=16, seed=0, path=str(tmp_path), init="random", num_layers=2, task=task,
                        label_names=["yes", "no"])
    assert len(built.model.model.encoder.block) == len(built.model.model.decoder.block) == 2
    assert [spec.name for spec in built.layout.layers] == ["model.encoder.block.1.layer.1.mlp",
                                                           "model.decoder.block.1.layer.2.mlp"]
