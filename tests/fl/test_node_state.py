"""Node-local client state: files per round on the node, atomic, read back exactly, the right round's."""

from __future__ import annotations

from pathlib import Path

import torch

from fcmoe.fl.node_settings import STATE_DIR
from fcmoe.fl.node_state import NodeStateStore


def test_state_round_trips_and_training_starts_from_the_last_finished_round(tmp_path: Path) -> None:
    store = NodeStateStore(tmp_path, "run/a b", 3)
    assert store.folder == tmp_path / "run_a_b" / "client-3"  # the key cannot leave the state folder
    assert store.load_before(1) is None and store.load_trained(1) is None
    residual = {"layer.0.w": torch.arange(6.0).reshape(2, 3), "layer.0.b": torch.ones(2, dtype=torch.bfloat16)}
    store.save_trained(1, {"seed": 7, "stage": "one"}, {"g": torch.zeros(3)})
    state, trained_from = store.load_trained(1)
    assert state == {"seed": 7, "stage": "one"} and torch.equal(trained_from["g"], torch.zeros(3))
    store.save_done(1, {"seed": 7, "residual": residual})
    store.save_trained(2, {"seed": 7, "residual": {k: 2 * v for k, v in residual.items()}}, {"g": torch.ones(3)})
    store.save_done(2, {"seed": 7})  # the residual was dropped in round 2: it must not come back
    assert store.load_before(3) == {"seed": 7}
    again = store.load_before(2)  # a repeated round 2 (a resumed ServerApp) starts from round 1's end, not 2's
    assert again["seed"] == 7 and set(again["residual"]) == set(residual)
    for key, value in residual.items():
        assert again["residual"][key].dtype == value.dtype and torch.equal(again["residual"][key], value)
    store.save_done(3, {"seed": 7})
    store.save_done(4, {"seed": 7})
    assert sorted(p.name for p in store.folder.iterdir()) == ["r3.safetensors", "r4.safetensors"]
    assert not list(store.folder.glob("*.tmp"))


def test_the_node_config_names_the_state_folder(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    assert NodeStateStore.for_node({STATE_DIR: str(tmp_path)}, "k", 0).folder == tmp_path / "k" / "client-0"
    monkeypatch.setenv("FCMOE_CACHE", str(tmp_path / "cache"))
    assert NodeStateStore.for_node({}, "k", 1).folder == tmp_path / "cache" / "node-state" / "k" / "client-1"


def test_a_bad_node_config_value_is_named_with_what_it_takes() -> None:
    import pytest

    from fcmoe.fl.node_settings import partition_id, worker_idle_s

    assert partition_id({"partition-id": 3}) == 3 and worker_idle_s({}) == 1800.0
    with pytest.raises(ValueError, match=r"^node config partition-id = 'x': expected a client index"):
        partition_id({"partition-id": "x"})
    with pytest.raises(ValueError, match=r"^node config worker-idle-s = 'abc': expected seconds, e\.g\. "):
        worker_idle_s({"worker-idle-s": "abc"})


def test_a_node_left_out_of_rounds_keeps_its_last_state_for_a_repeated_round(tmp_path: Path) -> None:
    """A node asked in rounds 1 and 5 only (eval.clients: nobody else asks it): saving round 5 keeps round 1's
    file, from which a resumed ServerApp that repeats round 5 starts the node; older files go."""
    store = NodeStateStore(tmp_path, "run", 0)
    store.save_done(0, {"seed": 1, "stage": 0})
    store.save_done(1, {"seed": 1, "head": {"w": torch.full((2,), 3.0)}})
    store.save_trained(5, {"seed": 1}, {"g": torch.zeros(1)})
    store.save_done(5, {"seed": 1, "stage": 5})
    again = store.load_before(5)
    assert torch.equal(again["head"]["w"], torch.full((2,), 3.0))
    assert sorted(p.name for p in store.folder.glob("r*.safetensors")) == ["r1.safetensors", "r5-train.safetensors",
                                                                            "r5.safetensors"]
