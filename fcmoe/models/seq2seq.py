"""Switch Transformers as a text-to-text classifier: the label is generated as the first decoder token.

The paper fine-tunes Switch Transformers, an encoder-decoder. In text-to-text form the model reads the document and
generates the label word. fcmoe generates it in one decoder step, restricted to the label words (rank
classification, as in T0 / FLAN evaluation): the encoder reads the cached input embeddings, the decoder runs one
position from its start token with cross-attention to the encoder, and the score of class c is the LM logit of the
first token of label name c at that position,

    z_c = lm_head[t_c] · (d_model^-½ · h_dec)        h_dec: [B, H] decoder output at the start position

(the d_model^-½ rescaling is Switch's own when the LM head is tied to the embeddings). Those C rows of the LM head
become a trainable ``[C, H]`` head, so at initialisation the classifier *is* the pretrained model's next-token
choice among the label words, and the cross-entropy over the C scores is the LM loss restricted to them. Labels
must start with distinct tokens (AG News' World / Sports / Business / Sci/Tech and MMLU's A–D do); otherwise use
``model.name = "switch"`` (encoder + linear head).

Both the encoder's and the decoder's MoE layers train and are aggregated per expert; the decoder routers see one
token per sequence, which the routing statistics count as real.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import transformers
from torch import nn

from fcmoe.models.catalog import DEFAULT_PATHS
from fcmoe.models.classifier import TrainableTree
from fcmoe.models.families import (FAMILIES, hashing_token_id, hashing_tokenize, load_tokenizer,
                                   pretrained_source, tokenize_with)
from fcmoe.models.layout import SwitchLayout


class TextToTextClassifier(TrainableTree):
    """``SwitchTransformersForConditionalGeneration`` scoring label words at the first decoder position.

    Parameters
    ----------
    model
        The encoder-decoder; its shared embeddings and LM head are frozen (the head rows are copied out).
    label_token_ids
        First token id of each label name, all distinct: ``[C]``.
    """

    head_keys: tuple[str, str] = ("head.weight", "head.bias")

    def __init__(self, model: nn.Module, label_token_ids: Sequence[int]) -> None:
        super().__init__()
        if len(set(label_token_ids)) != len(label_token_ids):
            raise ValueError("text-to-text labels must start with distinct tokens; rename the labels or use "
                             "model.name = 'switch' (encoder + linear head)")
        config = model.config
        self.model = model
        self.scale = config.d_model ** -0.5 if config.tie_word_embeddings else 1.0
        self.start_id = _decoder_start_id(model)
        embeddings = model.get_input_embeddings()
        embeddings.weight.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
        self.head = nn.Linear(config.d_model, len(label_token_ids))
        with torch.no_grad():
            self.head.weight.copy_(model.lm_head.weight[list(label_token_ids)] * self.scale)
            self.head.bias.zero_()

    @torch.no_grad()
    def featurize(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What is cached of a document: its token ids ``[B, T]`` (the embedding lookup is cheap; its output is not)."""
        return input_ids

    def encode(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder over the document, one decoder step from the start token: ``[B, T]`` ids → ``[B, H]``."""
        with torch.no_grad():
            embedded = self.model.get_input_embeddings()(features)  # [B, T, H]
        encoded = self.model.encoder(inputs_embeds=embedded, attention_mask=attention_mask).last_hidden_state
        start = torch.full((features.shape[0], 1), self.start_id, dtype=torch.long, device=features.device)
        decoded = self.model.decoder(input_ids=start, encoder_hidden_states=encoded,
                                     encoder_attention_mask=attention_mask).last_hidden_state  # [B, 1, H]
        return decoded[:, 0]

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Label-word scores ``[B, C]``."""
        return self.head(self.encode(features, attention_mask))


def _decoder_start_id(model: nn.Module) -> int:
    """T5-family decoders start from the pad token; transformers 5 keeps it in the generation config."""
    for source in (model.config, getattr(model, "generation_config", None)):
        value = getattr(source, "decoder_start_token_id", None) if source is not None else None
        if value is not None:
            return int(value)
    return int(model.config.pad_token_id)


def build_text_to_text(name: str, label_names: Sequence[str], *, path: str, max_length: int,
                       dtype: torch.dtype = torch.float32) -> tuple[TextToTextClassifier, SwitchLayout, Any]:
    """``switch-t2t`` (pretrained: ``model.path`` or ``google/switch-base-16``, loaded in ``dtype``) or
    ``switch-t2t-tiny`` (random, the ``switch-tiny`` configuration with its decoder, hashing tokenizer)."""
    if name.endswith("-tiny"):
        config = transformers.SwitchTransformersConfig(**FAMILIES["switch"].tiny)
        model = transformers.SwitchTransformersForConditionalGeneration(config)
        tokenize = hashing_tokenize(config.vocab_size, max_length)
        token_ids = [hashing_token_id(label.split()[0], config.vocab_size) for label in label_names]
    else:
        source = path or DEFAULT_PATHS["switch"]
        with pretrained_source(name, source):
            model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(source, dtype=dtype)
        tokenizer = load_tokenizer(source)
        tokenize = tokenize_with(tokenizer, max_length)
        token_ids = [tokenizer.encode(label, add_special_tokens=False)[0] for label in label_names]
    classifier = TextToTextClassifier(model, token_ids)
    num_experts = int(model.config.num_experts)
    return classifier, SwitchLayout.from_tree(classifier.trainable_state(), num_experts), tokenize
