"""fcmoe plan's memory estimate against the model and a measured step, and the plan command's verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcmoe.cli import main
from fcmoe.models.build import build_model, meta_model
from fcmoe.models.memory import estimate_step, kept_for_backward
from fcmoe.models.routing import RoutingRecorder
from tests.helpers import save_tiny_checkpoint


def _saved_bytes(built, tokens: int) -> int:  # noqa: ANN001 - a BuiltModel
    """What autograd keeps for the backward pass of one training forward (parameters excluded)."""
    ids, mask = torch.randint(5, 900, (4, tokens // 4)), torch.ones(4, tokens // 4, dtype=torch.long)
    features = built.model.featurize(ids, mask)
    recorder = RoutingRecorder(built.model, built.layout)
    built.model.train()
    with kept_for_backward(built.model) as saved, recorder.recording(mask):
        built.model(features, mask).sum() + recorder.balance_loss()
    return sum(saved.values())


def test_weights_gradients_and_optimizer_are_the_models_own_bytes(tmp_path: Path) -> None:
    """A bf16 checkpoint with fp32 LoRA masters: the estimate's weights are the parameters' bytes, exactly."""
    folder = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt")
    built = build_model("qwen3_moe", 2, num_experts=4, moe_layers=(0,), trainable_layers=2, router_init_std=0.02,
                        max_length=16, seed=0, path=str(folder), finetune="lora", lora_rank=2)
    step = estimate_step(built.model, built.layout, built.precision, tokens=64, checkpointing=False,
                         expert_lora="factored", lora_rank=2)
    params = list(built.model.parameters())
    trained = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    assert step.device["weights"] == sum(p.numel() * p.element_size() for p in params)
    assert (step.device["gradients"], step.device["optimizer"]) == (trained, 2 * trained)
    assert {p.dtype for p in params if p.requires_grad} == {torch.float32}  # masters
    meta = meta_model("qwen3_moe", path=str(folder), finetune="lora", lora_rank=2, init="pretrained", num_layers=0,
                      precision="auto", master_weights=True, expert_lora="factored", num_experts=4, moe_layers=(0,),
                      trainable_layers=2)
    assert all(p.device.type == "meta" for p in meta.model.backbone.parameters())  # shapes only, nothing loaded
    assert estimate_step(meta.model, meta.layout, meta.precision, tokens=64, checkpointing=False,
                         expert_lora="factored", lora_rank=2).device == step.device


@pytest.mark.parametrize("family", ["qwen3_moe-tiny", "gpt_oss-tiny"])
@pytest.mark.parametrize("expert_lora", ["merged", "factored"])
def test_the_activation_estimate_is_near_a_measured_step(family: str, expert_lora: str) -> None:
    """Tiny widths (where attention's bookkeeping weighs most) within 25 %; bench/memory.py checks real widths."""
    built = build_model(family, 3, num_experts=4, moe_layers=(0, 1), trainable_layers=2, router_init_std=0.5,
                        max_length=64, seed=0, finetune="lora", lora_rank=2, expert_lora=expert_lora)
    step = estimate_step(built.model, built.layout, built.precision, tokens=256, checkpointing=False,
                         expert_lora=expert_lora, lora_rank=2)
    estimate = step.device["activations"] + step.device.get("merged experts", 0)
    assert ("merged experts" in step.device) == (expert_lora == "merged")
    assert estimate == pytest.approx(_saved_bytes(built, 256), rel=0.25)


def test_plan_prints_counts_and_a_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--set", "model.name=qwen3_moe-tiny", "--set", "model.finetune=lora",
                 "--set", "train.device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "one client's step" in out and ": fits" in out
    # a real Mixtral-8x7B fully fine-tuned cannot fit this machine: the plan says so, and run stops before loading
    big = ["--set", "model.name=mixtral", "--set", "model.init=random", "--set", "train.device=cpu"]
    assert main(["plan", *big]) == 1
    assert "46.57 B total, 12.75 B active" in capsys.readouterr().out  # the classifier: no LM head
    assert main(["run", "--quiet", *big]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fcmoe: error: mixtral: one client's step needs about") and "model.finetune = 'lora'" in err


def test_the_plan_holds_a_rounds_updates_only_up_to_the_memory_budget() -> None:
    """Host: the initial, global and new trees and the participants' fp32 updates; under server.memory_budget the
    updates beyond it are counted on disk instead."""
    from fcmoe.config import load_config
    from fcmoe.plan import plan_run

    sets = ["model.name=qwen3_moe-tiny", "train.device=cpu", "partition.num_clients=10"]
    whole = plan_run(load_config(overrides=sets))
    update = whole.step.trainable * 4
    assert whole.host_trees == 13 * update and whole.spilled == 0
    budgeted = plan_run(load_config(overrides=[*sets, f"server.memory_budget='{2 * update}B'"]))
    assert budgeted.host_trees == 5 * update and budgeted.spilled == 8 * update


def test_the_plan_of_an_sft_run_counts_the_causal_lm_and_its_logits() -> None:
    """Task = "sft": the causal LM on the meta device (its LM head frozen, or trained when asked) and the fp32
    logits with their gradient at every token of the batch."""
    from fcmoe.config import load_config
    from fcmoe.models.families import hub_config
    from fcmoe.plan import plan_run

    sets = ["data.name=instruct", "model.name=qwen3_moe-tiny", "train.device=cpu", "train.batch_size=4",
            "data.max_length=32"]
    plan = plan_run(load_config(overrides=sets))
    vocab = hub_config("qwen3_moe-tiny", "").vocab_size
    assert plan.step.device["LM logits"] == 2 * 4 * 32 * vocab * 4
    trained = plan_run(load_config(overrides=[*sets, "model.train_lm_head=true"]))
    assert trained.step.trainable - plan.step.trainable == vocab * hub_config("qwen3_moe-tiny", "").hidden_size
