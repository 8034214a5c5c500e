"""train.device and train.precision: validated up front, bf16 autocast trains, results always come back on the CPU."""

from __future__ import annotations

import pytest
import torch

from fcmoe.config import ConfigError, load_config
from fcmoe.experiment import prepare_experiment
from fcmoe.training.config import TrainConfig
from fcmoe.training.local import FeatureSet, LocalResult, LocalTrainer, featurize, resolve_device
from tests.helpers import tiny_model


@pytest.mark.parametrize(("key", "value"), [("device", "gpu"), ("device", "cuda:x"), ("precision", "fp16")])
def test_bad_device_or_precision_is_a_config_error_naming_it(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"train.{key} = '{value}'"):
        load_config(overrides=[f"train.{key}={value}"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_stops_before_any_data_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_data(*args: object) -> None:
        raise AssertionError("data was read")

    monkeypatch.setattr("fcmoe.experiment.load_source", no_data)
    with pytest.raises(ConfigError, match="train.device = 'cuda'.*set train.device = 'cpu' or 'auto'"):
        prepare_experiment(load_config(overrides=["train.device=cuda", "model.name=tiny-bert-moe"]))
    assert resolve_device("auto") == torch.device("cpu")


def _train(precision: str) -> tuple[LocalTrainer, dict[str, torch.Tensor], LocalResult, FeatureSet]:
    built = tiny_model(num_experts=4)
    trainer = LocalTrainer(built.model, built.layout, TrainConfig(batch_size=4, device="auto", precision=precision))
    ids, mask = built.tokenize(["the cat sat on the mat", "stocks fell sharply today", "a goal in extra time",
                                "the senate passed the bill"] * 3)
    data = featurize(built.model, ids, mask, torch.tensor([0, 1, 2, 0] * 3))
    start = built.model.trainable_state()
    return trainer, start, trainer.train(start, data, seed=0), data


def test_bf16_autocast_trains_and_keeps_fp32_trees_on_the_cpu() -> None:
    trainer, start, fp32, data = _train("fp32")
    _, _, bf16, _ = _train("bf16")
    assert torch.isfinite(torch.tensor(bf16.loss)) and bf16.steps == fp32.steps == 3
    for result in (fp32, bf16):
        assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in result.state.values())
        assert all(c.device.type == "cpu" for c in result.routing_counts.values())
        assert any(not torch.equal(result.state[k], start[k]) for k in start)  # it trained
    # autocast really ran in bf16: the same seed and batches give different, but close, weights
    moved = {k: (bf16.state[k] - fp32.state[k]).abs().max().item() for k in start}
    assert 0 < max(moved.values()) < 1e-2
    prediction = trainer.predict(fp32.state, data)
    assert prediction.logits.device.type == "cpu" and prediction.logits.dtype == torch.float32
    assert trainer.device_name == ("cpu" if trainer.device.type == "cpu" else torch.cuda.get_device_name())
