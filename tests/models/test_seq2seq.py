"""Switch text-to-text: the classifier is next-token label generation at initialisation; encoder and decoder MoE."""

from __future__ import annotations

import pytest
import torch

from fcmoe.models.build import build_model
from fcmoe.models.families import hashing_token_id
from fcmoe.models.seq2seq import TextToTextClassifier

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def _built():  # noqa: ANN202
    return build_model("switch-t2t-tiny", 4, num_experts=4, moe_layers=(0,), trainable_layers=2,
                       router_init_std=0.02, max_length=16, seed=0, label_names=LABELS)


def test_scores_equal_the_lm_logits_of_the_label_words_at_init() -> None:
    built = _built()
    built.model.eval()  # no dropout
    model = built.model.model  # SwitchTransformersForConditionalGeneration
    ids, mask = built.tokenize(["stocks fell sharply", "the team won the final"])
    with torch.no_grad():
        scores = built.model(built.model.featurize(ids, mask), mask)  # [2, 4]
        start = torch.full((2, 1), built.model.start_id)
        lm = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0]  # [2, V]
    assert built.model.start_id == 0  # T5 family: the pad token
    words = [hashing_token_id(label, model.config.vocab_size) for label in LABELS]
    torch.testing.assert_close(scores, lm[:, words], rtol=1e-5, atol=1e-5)


def test_encoder_and_decoder_experts_are_addressed_and_trained() -> None:
    built = _built()
    names = [spec.name for spec in built.layout.layers]
    assert any(".encoder." in n for n in names) and any(".decoder." in n for n in names)
    state = built.model.trainable_state()
    assert "head.weight" in state and not any("shared" in k or "lm_head" in k for k in state)
    ids, mask = built.tokenize(["a b c", "d e"])
    loss = built.model(built.model.featurize(ids, mask), mask).logsumexp(dim=-1).sum()
    loss.backward()
    params = dict(built.model.named_parameters())
    for spec in built.layout.layers:
        grads = [params[k].grad for k in spec.keys if params[k].grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), spec.name


def test_labels_sharing_a_first_token_are_refused() -> None:
    base = _built().model.model
    with pytest.raises(ValueError, match="distinct tokens"):
        TextToTextClassifier(base, [5, 7, 5])
