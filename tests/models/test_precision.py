"""The precision policy on checkpoints saved as the hub ships them: every checkpoint dtype × train.precision ×
master weights × finetune trains, each weight in its planned dtype, and the exchanged trees come back fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcmoe.models.build import build_model
from fcmoe.models.precision import PrecisionError, plan_precision
from fcmoe.training.config import TrainConfig
from fcmoe.training.local import LocalTrainer, featurize
from tests.helpers import save_tiny_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXTS = ["the cat sat on the mat", "stocks fell sharply today", "a goal in extra time", "the senate passed a bill"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_tiny_checkpoint("qwen3_moe", root / name, dtype) for name, dtype in DTYPES.items()}


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("master_weights", [True, False])
@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
@pytest.mark.parametrize("stored", list(DTYPES))
def test_every_dtype_and_precision_trains(checkpoints: dict[str, Path], stored: str, precision: str,
                                          master_weights: bool, finetune: str) -> None:
    built = build_model("qwen3_moe", 3, num_experts=4, moe_layers=(0,), trainable_layers=2, router_init_std=0.02,
                        max_length=16, seed=0, path=str(checkpoints[stored]), finetune=finetune, lora_rank=2,
                        precision=precision, master_weights=master_weights)
    plan = built.precision
    assert plan == plan_precision(DTYPES[stored], precision, master_weights)
    for name, param in built.model.named_parameters():
        assert param.dtype == (plan.trainable if param.requires_grad else plan.frozen), name
    train = TrainConfig(batch_size=2, device="cpu", precision=precision, master_weights=master_weights, lr=1e-2)
    trainer = LocalTrainer(built.model, built.layout, train, plan)
    ids, mask = built.tokenize(TEXTS)
    data = featurize(built.model, ids, mask, torch.tensor([0, 1, 2, 0]))
    start = built.model.trainable_state()
    result = trainer.train(start, data, seed=0)
    assert torch.isfinite(torch.tensor(result.loss)) and result.steps == 2
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in result.state.values())
    assert set(result.state) == set(start)
    assert any(not torch.equal(result.state[k], start[k]) for k in start)  # it trained
    assert trainer.predict(result.state, data).logits.dtype == torch.float32


def test_the_plan_table() -> None:
    bf16, fp32 = torch.bfloat16, torch.float32
    masters = plan_precision(bf16, "auto", True)
    assert (masters.compute, masters.frozen, masters.trainable) == (bf16, bf16, fp32)
    pure = plan_precision(bf16, "bf16", False)
    assert (pure.compute, pure.frozen, pure.trainable) == (bf16, bf16, bf16)
    upcast = plan_precision(torch.float16, "fp32", False)
    assert (upcast.compute, upcast.frozen, upcast.trainable) == (fp32, fp32, fp32)
    assert plan_precision(fp32, "auto", True) == plan_precision(fp32, "fp32", False)  # today's default: all fp32
    assert plan_precision(fp32, "bf16", True).frozen == fp32  # autocast over fp32 weights, as before
    with pytest.raises(PrecisionError, match="torch.uint8, which cannot be trained"):
        plan_precision(torch.uint8, "auto", True)


def test_bf16_on_a_gpu_without_bf16_is_refused_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from fcmoe.models.precision import check_device

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(PrecisionError, match="Tesla V100 has no bf16 support; set train.precision = 'fp32'"):
        check_device(plan_precision(torch.bfloat16, "auto", True), torch.device("cuda"))
    check_device(plan_precision(torch.bfloat16, "fp32", True), torch.device("cuda"))  # fp32 compute: fine
