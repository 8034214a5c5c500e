"""Scoring a causal LM: exact match, ROUGE-L (the package's own result), generation against references, MMLU
letters on a hand-built case, and the trainer's prediction on instruction data."""

from __future__ import annotations

import pytest
import torch
from rouge_score import rouge_scorer

from fcmoe.models.causal_lm import IGNORE, CausalLM, WordCodec, answer_tokens, encode_pairs, encode_plain
from fcmoe.training.sft import exact_match, generation_scores, letter_accuracy, normalise, rouge_l
from tests.helpers import tiny_sft


@pytest.mark.parametrize(("prediction", "reference", "expected"), [
    ("Sport", "sport", 1.0), ("  sport.\nmore text", "sport", 1.0), ("crude  oil!", "crude oil", 1.0),
    ("sports", "sport", 0.0), ("", "sport", 0.0), ("sport politics", "sport", 0.0)])
def test_exact_match_normalises_case_space_punctuation_and_later_lines(prediction: str, reference: str,
                                                                      expected: float) -> None:
    assert exact_match(prediction, reference) == expected
    assert normalise("  Crude  Oil. ") == "crude oil"


@pytest.mark.parametrize(("prediction", "reference"), [
    ("the cat sat on the mat", "the cat was on the mat"), ("Shares rose sharply", "shares in UK firm rose"),
    ("nothing alike", "entirely different words"), ("", "a headline")])
def test_rouge_l_is_the_packages_own(prediction: str, reference: str) -> None:
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected)


class _Scripted:
    """A stand-in causal LM whose greedy continuations are given (what generation_scores reads of a model)."""

    def __init__(self, codec: WordCodec, continuations: list[str]) -> None:
        self.codec = codec
        self.continuations = continuations
        self.prompts: list[list[int]] = []

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        self.prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        rows = [[*self.codec.encode(text), self.codec.eos_id] for text in self.continuations]
        out = torch.full((len(rows), max(map(len, rows))), self.codec.pad_id)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out[:, :max_new_tokens]


def test_generation_is_scored_against_each_reference_by_its_tasks_metric() -> None:
    codec = WordCodec(1000)
    prompts, references = ["topic?", "headline?", "topic again?"], ["sport", "shares rise in london", "tech"]
    enc = encode_pairs(codec, prompts, references, 64)
    model = _Scripted(codec, ["sport", "london shares rise today", "business"])
    scores = generation_scores(model, enc.ids, enc.mask, enc.targets, torch.tensor([True, False, True]), 8)
    assert model.prompts == [codec.prompt_ids(p) for p in prompts]  # the prompts alone, left-padded
    assert scores.tolist() == pytest.approx([1.0, rouge_l("london shares rise today", "shares rise in london"), 0.0])


def test_mmlu_letter_scoring_on_a_hand_built_case() -> None:
    """The LM head's letter rows are set so that letter B's logit is |h|² and the others −|h|² at the prompt's
    last token: the question is right exactly when its key is B."""
    model: CausalLM = tiny_sft().model
    model.eval()
    codec = model.codec
    letters = answer_tokens(codec, ["A", "B", "C", "D"])
    ids, mask = encode_plain(codec, ["which option holds Answer:", "another question here Answer:"], 64)
    with torch.no_grad():
        hidden = model.causal.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [2, T, H]
        last = hidden[torch.arange(2), mask.sum(dim=1) - 1]  # [2, H]
        head = model.causal.get_output_embeddings().weight
        head[letters] = -last[0]
        head[letters[1]] = last[0]
    right = letter_accuracy(model, ids[:1], mask[:1], torch.tensor([1]), letters)
    wrong = letter_accuracy(model, ids[:1], mask[:1], torch.tensor([0]), letters)
    assert right.tolist() == [1.0] and wrong.tolist() == [0.0]


def test_the_trainer_scores_instruction_data_per_row() -> None:
    from fcmoe.training.config import TrainConfig
    from fcmoe.training.local import FeatureSet, LocalTrainer

    built = tiny_sft()
    enc = encode_pairs(built.model.codec, ["a b c", "d e", "f"], ["x y", "z", "w v u"], 64)
    features = built.model.featurize(enc.ids, enc.mask)
    data = FeatureSet(features, enc.mask, torch.tensor([0, 1, 0]), enc.targets, torch.tensor([True, False, True]),
                      enc.ids)
    trainer = LocalTrainer(built.model, built.layout, TrainConfig(device="cpu", aux_loss_coef=0.0), built.precision,
                           max_new_tokens=4)
    state = built.model.trainable_state()
    seen = trainer.predict(state, data, batch_size=2, record_routing=True)
    assert seen.scores.shape == (3,) and seen.losses.shape == (3,)
    with torch.no_grad():
        sums, counts = built.model.response_loss(features, enc.mask, enc.targets)
    torch.testing.assert_close(seen.losses, sums / counts, rtol=1e-5, atol=1e-5)
    assert sum(int(c.sum()) for c in seen.routing_counts.values()) == int(enc.mask.sum())  # every real token routed
    result = trainer.train(state, data, seed=0)
    assert result.steps == 1 and result.loss == pytest.approx(float(sums.sum() / counts.sum()), rel=1e-4)
    assert (enc.targets != IGNORE).any()


def test_switch_scores_letters_and_generates_from_its_decoders_start() -> None:
    """``switch-t2t``: a letter's score is the full model's logit at the decoder's first position, and generation
    returns the response without the start token."""
    model = tiny_sft("switch-t2t-tiny").model.eval()
    ids, mask = encode_plain(model.codec, ["which option holds Answer:", "another question here Answer:"], 64)
    letters = answer_tokens(model.codec, ["A", "B", "C", "D"])
    start = torch.full((2, 1), model.start_id)
    with torch.no_grad():
        full = model.model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0]  # [2, V]
    torch.testing.assert_close(model.last_logits(ids, mask, letters), full[:, letters])
    generated = model.generate(ids, mask, 3)
    assert generated.shape[0] == 2 and generated.shape[1] <= 3
    with torch.no_grad():
        first = model.model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0].argmax(-1)
    assert generated[:, 0].tolist() == first.tolist()
