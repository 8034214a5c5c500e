"""The response-token loss: masking, per-row independence, TRL's completion-only loss on the same batch, training."""

from __future__ import annotations

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fcmoe.models.causal_lm import IGNORE, PLAIN_TEMPLATE, CausalLM, HFCodec, WordCodec, encode_pairs, prompt_lengths
from tests.helpers import tiny_sft

PROMPTS = ["what is two plus two", "name a color"]
RESPONSES = ["four", "blue is the sky red"]


def test_targets_cover_the_response_and_its_end_only() -> None:
    codec = WordCodec(1000)
    enc = encode_pairs(codec, PROMPTS, RESPONSES, 64)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        head = codec.prompt_ids(prompt)
        tail = [*codec.encode(response), codec.eos_id]
        scored = (enc.targets[row] != IGNORE).nonzero().flatten().tolist()
        assert scored == list(range(len(head) - 1, len(head) + len(tail) - 1))  # position t predicts t + 1
        assert enc.targets[row, scored].tolist() == tail
        assert enc.ids[row, : len(head)].tolist() == head
    assert prompt_lengths(enc.targets).tolist() == [len(codec.prompt_ids(p)) for p in PROMPTS]


def test_a_long_pair_keeps_the_prompt_end_and_half_for_the_response() -> None:
    codec = WordCodec(1000)
    enc = encode_pairs(codec, ["w " * 100 + "cue"], ["r " * 100], 32)
    assert enc.ids.shape == (1, 32)
    assert int((enc.targets != IGNORE).sum()) == 16
    assert enc.ids[0, 15].item() == codec.encode(PLAIN_TEMPLATE.format(prompt="cue").split()[-1])[0]


@pytest.mark.parametrize("name", ["smollm2-moe-tiny", "qwen3_moe-tiny"])
def test_prompt_tokens_never_reach_the_loss(name: str) -> None:
    """Changing a row's prompt-side logits (its LM head rows never scored) leaves the loss; changing its response
    changes only its own row's loss."""
    model = tiny_sft(name).model
    enc = encode_pairs(model.codec, PROMPTS, RESPONSES, 64)
    sums, counts = model.response_loss(model.featurize(enc.ids, enc.mask), enc.mask, enc.targets)
    assert counts.tolist() == (enc.targets != IGNORE).sum(dim=1).tolist()
    hidden = model(model.featurize(enc.ids, enc.mask), enc.mask)  # [B, T, H]
    where = enc.targets != IGNORE
    full = torch.nn.functional.cross_entropy(model.token_logits(hidden).flatten(0, 1).float(),
                                             enc.targets.flatten(), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(sums.sum(), full)
    assert where[0, : prompt_lengths(enc.targets)[0] - 1].sum() == 0

    changed = encode_pairs(model.codec, PROMPTS, [RESPONSES[0], "red red red"], 64)
    sums2, _ = model.response_loss(model.featurize(changed.ids, changed.mask), changed.mask, changed.targets)
    torch.testing.assert_close(sums2[0], sums[0])
    assert not torch.isclose(sums2[1], sums[1])


def _word_tokenizer() -> PreTrainedTokenizerFast:
    words = "### Instruction: Response: what is two plus two four name a color blue red the sky <eos> <pad> <unk>"
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words.split()))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def test_loss_equals_trl_sft_trainer_completion_only_loss(tmp_path) -> None:
    """TRL's SFTTrainer prepares the same prompt/completion pairs (its tokenisation, EOS, labels, collator) and
    computes its loss: the ids and the loss equal fcmoe's."""
    trl = pytest.importorskip("trl")
    tokenizer = _word_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False))
    pairs = datasets.Dataset.from_list([{"prompt": PLAIN_TEMPLATE.format(prompt=p), "completion": r}
                                        for p, r in zip(PROMPTS, RESPONSES, strict=True)])
    args = trl.SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, report_to=[], use_cpu=True,
                         per_device_train_batch_size=2, max_length=None)
    trainer = trl.SFTTrainer(model=lm, args=args, train_dataset=pairs, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    reference = trainer.compute_loss(lm, batch, num_items_in_batch=(batch["labels"][:, 1:] != IGNORE).sum())

    model = CausalLM(lm, HFCodec(tokenizer))
    enc = encode_pairs(model.codec, PROMPTS, RESPONSES, 64)
    assert torch.equal(enc.ids[enc.mask.bool()], batch["input_ids"][batch["attention_mask"].bool()])
    sums, counts = model.response_loss(model.featurize(enc.ids, enc.mask), enc.mask, enc.targets)
    torch.testing.assert_close(sums.sum() / counts.sum(), reference)


def test_cached_frozen_layers_give_the_full_models_loss() -> None:
    """smollm2-moe caches the hidden states after its frozen layers: the loss from them equals the full model's."""
    built = tiny_sft()
    model = built.model
    assert model.frozen_layers == 1
    enc = encode_pairs(model.codec, PROMPTS, RESPONSES, 64)
    features = model.featurize(enc.ids, enc.mask)
    assert features.dim() == 3
    sums, counts = model.response_loss(features, enc.mask, enc.targets)
    logits = model.causal(input_ids=enc.ids, attention_mask=enc.mask).logits  # [B, T, V]
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), enc.targets.flatten(), ignore_index=IGNORE,
                                             reduction="sum")
    torch.testing.assert_close(sums.sum(), full, rtol=1e-4, atol=1e-4)


def test_length_bucketed_featurize_equals_the_padded_one_on_real_tokens() -> None:
    from fcmoe.training.local import featurize

    model = tiny_sft().model
    enc = encode_pairs(model.codec, [*PROMPTS, "a much longer prompt " * 5], [*RESPONSES, "x"], 64)
    labels = torch.zeros(3, dtype=torch.long)
    padded = featurize(model, enc.ids, enc.mask, labels, batch_size=2)
    bucketed = featurize(model, enc.ids, enc.mask, labels, batch_size=2, bucketed=True)
    real = enc.mask.bool()
    torch.testing.assert_close(bucketed.features[real], padded.features[real])
    assert bucketed.features[~real].abs().sum() == 0


def test_switch_trains_its_decoder_on_the_response_as_its_own_seq2seq_loss() -> None:
    """``switch-t2t`` (text to text): the encoder reads the prompt alone, the decoder the response; the loss equals
    transformers' own loss of the model given the prompt and the response as labels, and a row's response changes
    only its own loss."""
    model = tiny_sft("switch-t2t-tiny").model.eval()
    enc = encode_pairs(model.codec, PROMPTS, RESPONSES, 64)
    rows = model.split(enc.ids, enc.mask, enc.targets)
    assert rows.prompt_mask.sum(dim=1).tolist() == [len(model.codec.prompt_ids(p)) for p in PROMPTS]
    assert rows.labels[1, : len(RESPONSES[1].split()) + 1].tolist() == [*model.codec.encode(RESPONSES[1]),
                                                                       model.codec.eos_id]
    sums, counts = model.response_loss(model.featurize(enc.ids, enc.mask), enc.mask, enc.targets)
    assert counts.tolist() == (enc.targets != IGNORE).sum(dim=1).tolist()
    model.model.config.decoder_start_token_id = model.start_id  # what transformers shifts the labels behind
    reference = model.model(input_ids=rows.prompt, attention_mask=rows.prompt_mask, labels=rows.labels).loss
    torch.testing.assert_close(sums.sum() / counts.sum(), reference)

    changed = encode_pairs(model.codec, PROMPTS, [RESPONSES[0], "red red red"], 64)
    sums2, _ = model.response_loss(changed.ids, changed.mask, changed.targets)
    torch.testing.assert_close(sums2[0], sums[0])
    assert not torch.isclose(sums2[1], sums[1])


def test_switchs_routers_count_the_prompt_in_the_encoder_and_the_response_in_the_decoder() -> None:
    from fcmoe.models.routing import RoutingRecorder

    built = tiny_sft("switch-t2t-tiny")
    model = built.model
    enc = encode_pairs(model.codec, PROMPTS, RESPONSES, 64)
    recorder = RoutingRecorder(model, built.layout)
    with recorder.recording(model.routing_masks(enc.mask, enc.targets)):
        model.response_loss(enc.ids, enc.mask, enc.targets)
    encoder, decoder = (spec.name for spec in built.layout.layers)
    assert recorder.tokens == {encoder: int(prompt_lengths(enc.targets).sum()),
                               decoder: int((enc.targets != IGNORE).sum())}
