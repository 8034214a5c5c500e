"""Flower's simulation on GPUs: each client's actor asks Ray for the configured GPU share, and the summary records
where the clients said they trained, not where the server runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcmoe.algorithms.base import ClientUpdate
from fcmoe.config import ConfigError, load_config
from fcmoe.fl.codec import decode_device, encode_update
from fcmoe.fl.server_app import client_resources


def test_a_gpu_run_gives_each_client_actor_a_gpu() -> None:
    assert client_resources(-1, torch.device("cuda:0"))["num_gpus"] == 1.0  # before: 0, so clients ran on the CPU
    assert client_resources(-1, torch.device("cpu"))["num_gpus"] == 0.0
    assert client_resources(0.5, torch.device("cuda"))["num_gpus"] == 0.5  # two clients share a GPU
    assert client_resources(0.25, torch.device("cpu"))["num_cpus"] >= 1
    with pytest.raises(ConfigError, match="train.client_gpus = -2.0: a GPU share in"):
        load_config(overrides=["train.client_gpus=-2"])
    with pytest.raises(ConfigError, match="train.client_gpus = 1.5"):
        load_config(overrides=["train.client_gpus=1.5"])
    with pytest.raises(ConfigError, match="a Flower client given no GPU sees none"):
        load_config(overrides=["train.client_gpus=0", "train.device=cuda"])


def test_a_train_reply_says_where_its_client_trained() -> None:
    update = ClientUpdate(0, {"w": torch.zeros(2)}, 3, {"l": torch.tensor([1, 2])})
    assert decode_device(encode_update(update, device="NVIDIA H100 80GB HBM3")) == "NVIDIA H100 80GB HBM3"
    assert decode_device(encode_update(update)) == ""  # an older client: not recorded


def test_a_sigterm_under_ray_stops_the_flower_run_as_ctrl_c_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray replaces the SIGTERM handler with ``sys.exit(15)`` once it starts: that exit becomes fcmoe's Stopped,
    so ``fcmoe run --engine flower`` ends with the resume line like the in-process engine."""
    import signal
    from types import SimpleNamespace

    import flwr.simulation

    from fcmoe.errors import Stopped
    from fcmoe.fl.server_app import run_flower_method

    def ray_exit(**kwargs: object) -> None:
        raise SystemExit(signal.SIGTERM)

    monkeypatch.setattr(flwr.simulation, "run_simulation", ray_exit)
    exp = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(client_gpus=-1.0)), num_clients=2,
                          trainer=SimpleNamespace(device=torch.device("cpu"), device_name="cpu"))
    with pytest.raises(Stopped):
        run_flower_method(exp, "fedavg", Path("unused"))
