"""``server.memory_budget``: updates beyond it wait on disk; every method and variant aggregates them to the very
values it gives them in memory (per-expert modules and fused experts), with any budget down to none at all."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest
import torch

from fcmoe.algorithms import ALGORITHMS
from fcmoe.algorithms.robust import RobustAggregation, RobustConfig
from fcmoe.config_sections import ConfigError, ServerConfig, budget_bytes
from fcmoe.core import tree_num_bytes
from fcmoe.models.build import BuiltModel
from fcmoe.rounds import server_step
from fcmoe.spill import SpilledTree, UpdateInbox
from tests.helpers import METHODS, build_family, make_updates, random_delta, uploaded


def _server(method: str, built: BuiltModel, robust: RobustConfig) -> RobustAggregation:
    name, _, variant = method.partition("/")
    cls = ALGORITHMS.get(name)
    config = cls.config_class()
    config = dataclasses.replace(config, **cls.variants[variant]) if variant else config
    return RobustAggregation(cls(config, built.layout), robust)


def _round(method: str, built: BuiltModel, budget: int | None, folder: Path,
           robust: RobustConfig | None = None) -> tuple[dict, dict, list[str]]:
    """One server step over 4 updates (one conflicting, one 50× too large) through an inbox of ``budget``."""
    server = _server(method, built, robust or RobustConfig())
    state = built.model.trainable_state()
    deltas = [uploaded(server.algorithm, random_delta(state, s), state) for s in range(4)]
    deltas[1] = {k: -v for k, v in deltas[0].items()}  # pulls against client 0
    deltas[3] = {k: 50 * v for k, v in deltas[3].items()}  # screened out by the median-norm rule
    counts = [torch.tensor([4, 1, 0, 2]), torch.tensor([1, 1, 1, 1]), torch.tensor([0, 3, 3, 0]),
              torch.tensor([2, 2, 2, 2])]
    with UpdateInbox(budget, folder) as inbox:
        for update in make_updates(built, deltas, [7, 5, 9, 6], counts):
            inbox.add(update)
        spilled = sum(isinstance(u.delta, SpilledTree) for u in inbox.updates)
        step = server_step(server, state, inbox.updates)
        assert spilled == (0 if budget is None else 4 - min(4, budget // tree_num_bytes(deltas[0])))
    assert not folder.exists()  # the spilled files go once the round is aggregated
    return step.result.global_state, step.result.messages, step.rejected


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", ["per-expert", "fused"])
def test_spilled_updates_aggregate_to_the_in_memory_values(method: str, model: str, tiny: BuiltModel,
                                                           tmp_path: Path) -> None:
    """Budget none, one update's worth, and 0 (everything on disk): bit-identical states and messages."""
    built = tiny if model == "per-expert" else build_family("qwen3_moe-tiny", "full")
    one = tree_num_bytes(uploaded(_server(method, built, RobustConfig()).algorithm,
                                  built.model.trainable_state(), built.model.trainable_state()))
    reference, messages, rejected = _round(method, built, None, tmp_path / "a")
    assert rejected and rejected[0].startswith("client 3")
    for budget in (one, 0):
        state, sent, again = _round(method, built, budget, tmp_path / "b")
        assert again == rejected
        assert all(torch.equal(state[k], reference[k]) for k in reference), (method, budget)
        assert sent.keys() == messages.keys()
        for cid, message in messages.items():
            assert sent[cid].keys() == message.keys()
            assert all(torch.equal(sent[cid][k], v) for k, v in message.items())


def test_robust_means_and_clipping_read_spilled_updates_too(tiny: BuiltModel, tmp_path: Path) -> None:
    robust = RobustConfig(aggregator="median", clip=2.0)
    reference, _, _ = _round("fcmoe", tiny, None, tmp_path / "a", robust)
    state, _, _ = _round("fcmoe", tiny, 0, tmp_path / "b", robust)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_full_disk_while_spilling_is_an_oserror_naming_the_file(tiny: BuiltModel, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fcmoe.spill.save_file", full)
    state = tiny.model.trainable_state()
    with UpdateInbox(0, tmp_path / "spill") as inbox, pytest.raises(OSError) as caught:
        inbox.add(make_updates(tiny, [random_delta(state, 0)], [5])[0])
    assert caught.value.errno == errno.ENOSPC and "spilling client 0" in str(caught.value)
    assert caught.value.filename.endswith(".safetensors")


@pytest.mark.parametrize(("text", "size"), [("8GiB", 8 * 2**30), ("500MB", 500 * 10**6), ("0", 0),
                                           ("1.5 KiB", 1536), ("12", 12)])
def test_budget_sizes(text: str, size: int) -> None:
    assert budget_bytes(text) == size and ServerConfig(text).budget == size


@pytest.mark.parametrize("text", ["8 gigs", "-1GB", "GiB", "1e9"])
def test_a_bad_budget_is_one_line_with_the_fix(text: str) -> None:
    with pytest.raises(ConfigError, match=r"server.memory_budget = .*give a size such as \"8GiB\""):
        ServerConfig(text)
