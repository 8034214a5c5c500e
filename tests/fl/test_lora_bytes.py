"""With LoRA on a fused-expert family only the adapters (and the head) travel: the bytes on the wire are theirs."""

from __future__ import annotations

from fcmoe.config import load_config
from fcmoe.core import tree_num_bytes
from fcmoe.experiment import prepare_experiment
from fcmoe.fl.codec import DELTA, encode_update
from fcmoe.rounds import client_step, initial_client_state, upload_bytes

TINY = ["model.name=qwen3_moe-tiny", "model.lora_rank=2", "model.num_experts=4", "data.train_per_class=2",
        "data.test_per_class=1", "data.max_length=16", "partition.num_clients=2", "partition.min_partition_size=4"]


def _wire_bytes(finetune: str) -> tuple[int, int, int, set[str]]:
    """(bytes of Δ in the train reply, bytes of the adapters + head, bytes of the whole model, Δ's keys)."""
    exp = prepare_experiment(load_config(overrides=[*TINY, f"model.finetune={finetune}"]))
    algo = exp.config.make_algorithm("fcmoe", exp.built.layout)
    update = client_step(exp, algo, 0, 1, exp.initial_state, initial_client_state(exp.config.seed, 0))
    record = encode_update(update, algo.layout)
    wire = sum(array.numpy().nbytes for array in record[DELTA].values())  # the tensors' bytes, no .npy headers
    assert wire == upload_bytes(update) - tree_num_bytes(update.routing_counts) - tree_num_bytes(update.statistics) - 8
    headers = sum(len(array.data) for array in record[DELTA].values()) - wire
    assert headers <= 128 * len(record[DELTA])  # one small .npy header per tensor, nothing else
    model = exp.built.model
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    return wire, tree_num_bytes(model.trainable_state()), whole, set(update.delta)


def test_lora_uploads_only_the_adapter_tensors_and_the_head() -> None:
    wire, trainable, whole, keys = _wire_bytes("lora")
    assert all("lora_A" in k or "lora_B" in k or k.startswith("head.") for k in keys)
    assert any("experts.lora_A" in k for k in keys)  # LoRA on the fused experts themselves
    assert wire == trainable  # the trainable tree of a LoRA model is its adapters and the fresh head
    full_wire, _, _, full_keys = _wire_bytes("full")
    assert any("experts.gate_up_proj" in k for k in full_keys)  # full fine-tuning sends the expert tensors
    assert wire < full_wire / 5 and full_wire < whole
