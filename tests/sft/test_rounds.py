"""Instruction tuning through the round: every method and variant on a tiny causal LM, both engines."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fcmoe.algorithms import ALGORITHMS
from fcmoe.config import ConfigError, ExperimentConfig, load_config
from fcmoe.experiment import prepare_experiment
from fcmoe.report.build import build_report
from fcmoe.runner import run_experiment
from fcmoe.sim.engine import run_method

EVERY_METHOD = [*ALGORITHMS.names(), *(f"{name}/{variant}" for name in ALGORITHMS.names()
                                       for variant in ALGORITHMS.get(name).variants)]
TOPICS = ("sport", "politics", "science")


def instruct_file(folder: Path) -> Path:
    """Two tasks: a label word (exact match) and a short title (ROUGE-L), 24 records each."""
    records = []
    for i in range(24):
        topic = TOPICS[i % 3]
        records.append({"instruction": f"Which topic is story {i} about {topic} news today?", "output": topic,
                        "task": "topic", "metric": "exact"})
        records.append({"prompt": f"Give a title to the {topic} report number {i}.",
                        "completion": f"{topic} report {i % 5}", "task": "title"})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_config(folder: Path, model: str = "smollm2-moe-tiny", *more: str) -> ExperimentConfig:
    return load_config(overrides=[
        "data.name=instruct-file", f"data.path={instruct_file(folder)}", f"model.name={model}",
        "model.num_experts=4", "model.moe_layers=[-1]", "model.trainable_layers=1", "data.max_length=48",
        "partition.kind=natural", "partition.by=task", "partition.num_clients=4", "rounds=2", "train.batch_size=8",
        "eval.mmlu_questions=8", "eval.max_new_tokens=4", *more])


def test_every_method_and_variant_runs_sft_in_process(tmp_path: Path) -> None:
    methods = "methods=[" + ",".join(f"'{m}'" for m in EVERY_METHOD) + "]"
    config = sft_config(tmp_path, "smollm2-moe-tiny", methods)
    assert config.task == "sft"
    (tmp_path / "run").mkdir()
    summaries = run_experiment(config, tmp_path / "run", show_progress=False)
    assert [s.method for s in summaries] == list(config.methods)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(config.methods) * config.rounds
    for row in rows:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["global_loss"])
        assert set(row["task_scores"]) == {"title", "topic"} and 0.0 <= row["global_acc"] <= 1.0
        assert ("mmlu_acc" in row) == (row["round"] == config.rounds)  # the final global model's
        assert len(row["local_acc"]) == 4 and row["bytes_up"] > 0
    fcmoe = [r for r in rows if r["method"] == "fcmoe"]
    assert all(0.0 <= r["conflict_rate"] <= 1.0 for r in fcmoe)  # the mechanism's metrics, as on classification
    pfl = [r for r in rows if r["method"] == "pflmoe"]
    assert all(r["personalisation"] == "none (sft)" and "deployed_global_acc" not in r for r in pfl)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["initial"]["mmlu_acc"] <= 1.0 and set(summary["initial"]["task_scores"]) == {"title", "topic"}
    assert all(0.0 <= s["mmlu_acc"] <= 1.0 for s in summary["methods"].values())
    build_report([tmp_path / "run"])
    table = (tmp_path / "run" / "report" / "tables" / "table5_instruct.csv").read_text().splitlines()
    header = table[0].split(",")
    records = [dict(zip(header, line.split(","), strict=True)) for line in table[1:]]
    initial = {r["metric"]: float(r["mean"]) for r in records if r["method"] == "initial"}
    assert initial["mmlu_acc"] == summary["initial"]["mmlu_acc"]
    assert initial["task_scores:topic"] == summary["initial"]["task_scores"]["topic"]
    fcmoe_mmlu = [float(r["mean"]) for r in records if r["method"] == "fcmoe" and r["metric"] == "mmlu_acc"]
    assert fcmoe_mmlu == [summary["methods"]["fcmoe"]["mmlu_acc"]]


def test_sft_trains_the_fused_family_with_lora(tmp_path: Path) -> None:
    config = sft_config(tmp_path, "qwen3_moe-tiny", "model.finetune=lora", "methods=['fcmoe']", "rounds=1")
    exp = prepare_experiment(config)
    assert all("lora_" in key for key in exp.initial_state)
    _, final = run_method(exp, "fcmoe", tmp_path / "m.jsonl")
    assert any(not torch.equal(final[k], exp.initial_state[k]) for k in final)


def test_switch_text_to_text_sft_trains_encoder_and_decoder_experts(tmp_path: Path) -> None:
    """``switch-t2t``: every method's round runs on the encoder-decoder (FedMoE's mask on both stacks), and the
    decoder's experts learn the responses."""
    config = sft_config(tmp_path, "switch-t2t-tiny", "methods=['fcmoe','fedmoe']", "rounds=1")
    exp = prepare_experiment(config)
    decoder_experts = [k for k in exp.initial_state if k.startswith("model.decoder.") and ".experts." in k]
    assert decoder_experts
    for method in config.methods:
        _, final = run_method(exp, method, tmp_path / f"{method}.jsonl")
        assert any(not torch.equal(final[k], exp.initial_state[k]) for k in decoder_experts)
        (row,) = [json.loads(line) for line in (tmp_path / f"{method}.jsonl").read_text().splitlines()]
        assert math.isfinite(row["global_loss"]) and set(row["task_scores"]) == {"title", "topic"}


@pytest.mark.parametrize(("model", "finetune"), [("smollm2-moe-tiny", "full"), ("qwen3_moe-tiny", "lora"),
                                                ("switch-t2t-tiny", "full")])
def test_the_lm_head_trains_when_asked_and_the_embeddings_stay(tmp_path: Path, model: str, finetune: str) -> None:
    """``model.train_lm_head``: the head is in the federated tree and moves; the input embeddings (tied to the head
    in SmolLM2 and Switch, untied here) do not, so the cached features stay valid. Off, the head is frozen."""
    off = prepare_experiment(sft_config(tmp_path, model, f"model.finetune={finetune}", "methods=['fedavg']"))
    assert not any("lm_head" in key for key in off.initial_state)
    exp = prepare_experiment(sft_config(tmp_path, model, f"model.finetune={finetune}", "methods=['fedavg']",
                                        "model.train_lm_head=true"))
    (head,) = [key for key in exp.initial_state if "lm_head" in key]
    lm = exp.built.model.causal if model != "switch-t2t-tiny" else exp.built.model.model  # the transformers model
    embeddings = lm.get_input_embeddings().weight.detach().clone()
    assert lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight
    _, final = run_method(exp, "fedavg", tmp_path / "m.jsonl")
    assert not torch.equal(final[head], exp.initial_state[head])
    assert torch.equal(lm.get_input_embeddings().weight, embeddings)
    with pytest.raises(ConfigError, match="train_lm_head = true .* needs task = 'sft'"):
        load_config(overrides=["model.train_lm_head=true"])


def test_flower_sft_equals_in_process(tmp_path: Path) -> None:
    config = sft_config(tmp_path, "smollm2-moe-tiny", "methods=['fedavg','fcmoe','fedmoe']")
    exp = prepare_experiment(config)
    in_process = {m: run_method(exp, m, tmp_path / "in-process.jsonl")[1] for m in config.methods}
    flower_dir = tmp_path / "flower"
    flower_dir.mkdir()
    run_experiment(dataclasses.replace(config, engine="flower"), flower_dir, show_progress=False)
    for method, expected in in_process.items():
        got = load_file(str(flower_dir / f"model-{method}.safetensors"))
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst <= 1e-6, f"{method}: max |Δθ| = {worst}"
    rows = {(r["method"], r["round"]): r
            for r in map(json.loads, (flower_dir / "metrics.jsonl").read_text().splitlines())}
    reference = {(r["method"], r["round"]): r
                 for r in map(json.loads, (tmp_path / "in-process.jsonl").read_text().splitlines())}
    for key, row in rows.items():
        for field in ("global_acc", "task_scores", "local_acc", "train_loss", "mmlu_acc"):
            assert row.get(field) == reference[key].get(field), (key, field)
        assert row["global_loss"] == pytest.approx(reference[key]["global_loss"], rel=1e-6)


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "instruct"


def test_the_flowertune_config_runs_on_a_tiny_twin_and_a_local_copy(tmp_path: Path) -> None:
    """configs/instruct/flowertune-olmoe.toml as shipped, with the model and dataset swapped for a tiny twin and a
    local copy laid out like the hub dataset, on the CPU."""
    folder = tmp_path / "alpaca"
    folder.mkdir()
    rows = [{"instruction": f"Say something about item {i}.", "input": "", "output": f"item {i} is fine"}
            for i in range(60)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(CONFIGS / "flowertune-olmoe.toml", [
        "model.name=olmoe-tiny", "model.path=", f"data.path={folder}", "train.device=cpu", "train.precision=auto",
        "rounds=1", "data.test_per_class=4", "data.max_length=48", "eval.mmlu_questions=4", "partition.num_clients=4",
        "participation.fraction=0.5", "train.local_steps=2"])
    assert config.task == "sft" and config.model.finetune == "lora" and config.model.lora_rank == 32
    (tmp_path / "run").mkdir()
    summaries = run_experiment(config, tmp_path / "run", show_progress=False)
    assert [s.method for s in summaries] == ["fedavg", "fcmoe"] and all(0 <= s.mmlu_acc <= 1 for s in summaries)


def test_the_instruct_benchmark_config_loads() -> None:
    config = load_config(CONFIGS / "benchmark.toml")
    assert config.task == "sft" and config.model.name == "smollm2-moe" and config.data.name == "instruct"
    assert config.partition.kind == "natural" and config.partition.by == "task"
