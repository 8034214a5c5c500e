"""train.local_steps: exactly that many optimizer steps per round, cycling through the data in fresh shuffles."""

from __future__ import annotations

import pytest
import torch

from fcmoe.config import ConfigError, load_config
from fcmoe.training.config import TrainConfig
from fcmoe.training.local import LocalTrainer, batch_rows, featurize
from tests.helpers import tiny_model


def test_batch_rows_gives_exactly_the_steps_asked_from_fresh_shuffles() -> None:
    batches = list(batch_rows(10, 4, epochs=1, steps=7, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]  # passes of 10 rows in batches of 4, cut at 7
    for start in (0, 3):  # each full pass is a permutation of every row
        assert sorted(torch.cat(batches[start:start + 3]).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(batches[0:3]), torch.cat(batches[3:6]))  # a fresh shuffle per pass
    epochs = list(batch_rows(10, 4, epochs=2, steps=0, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in epochs] == [4, 4, 2, 4, 4, 2]  # steps = 0: local_epochs passes


@pytest.mark.parametrize("steps", [1, 5, 13])
def test_trainer_takes_exactly_local_steps_optimizer_steps(steps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    built = tiny_model(num_experts=4)
    ids, mask = built.tokenize(["the cat sat on the mat", "stocks fell sharply today", "a goal in extra time"] * 2)
    data = featurize(built.model, ids, mask, torch.tensor([0, 1, 2] * 2))  # 6 rows: 2 batches of 4 and 2 a pass
    trainer = LocalTrainer(built.model, built.layout, TrainConfig(batch_size=4, local_steps=steps, device="cpu"))
    calls = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    result = trainer.train(built.model.trainable_state(), data, seed=0)
    assert result.steps == len(calls) == steps


def test_local_steps_is_validated_and_saved_with_the_run() -> None:
    with pytest.raises(ConfigError, match=r"train.local_steps = -1: must be >= 0"):
        load_config(overrides=["train.local_steps=-1"])
    config = load_config(overrides=["train.local_steps=50"])
    assert config.train.local_steps == 50 and config.to_dict()["train"]["local_steps"] == 50
