"""Switch Transformers text to text: a classifier generating the label word, and instruction tuning on the response.

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

With ``task = "sft"`` the same model trains its decoder on the response (:class:`Seq2SeqLM`): the encoder reads the
prompt, the decoder the response behind its start token, as T5 and Switch were fine-tuned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

from fcmoe.models.causal_lm import IGNORE, HFCodec, TextCodec, WordCodec, prompt_lengths, summed_nll
from fcmoe.models.classifier import TrainableTree
from fcmoe.models.families import (
    hashing_token_id,
    hashing_tokenize,
    hub_config,
    load_tokenizer,
    pretrained_path,
    pretrained_source,
    tokenize_with,
)
from fcmoe.models.layout import SwitchLayout
from fcmoe.models.shapes import materialise, on_meta


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
        return first_decoder_state(self.model, self.start_id, features, attention_mask)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Label-word scores ``[B, C]``."""
        return self.head(self.encode(features, attention_mask))


def first_decoder_state(model: nn.Module, start_id: int, ids: torch.Tensor, attention_mask: torch.Tensor,
                        ) -> torch.Tensor:
    """The decoder's output ``[B, H]`` at its start position, the encoder reading ``ids`` ``[B, T]``."""
    encoded = model.encoder(input_ids=ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    start = torch.full((ids.shape[0], 1), start_id, dtype=torch.long, device=ids.device)
    decoded = model.decoder(input_ids=start, encoder_hidden_states=encoded,
                            encoder_attention_mask=attention_mask).last_hidden_state  # [B, 1, H]
    return decoded[:, 0]


@dataclass
class SplitRows:
    """Prompt/response rows cut into the encoder's input and the decoder's, for teacher forcing."""

    prompt: torch.Tensor  # [B, W] ids, W = the longest prompt
    prompt_mask: torch.Tensor  # [B, W] 1 = a prompt token
    decoder_ids: torch.Tensor  # [B, M] the start token, then the response but its last token, padded
    response_mask: torch.Tensor  # [B, M] 1 = a response position (EOS included)
    labels: torch.Tensor  # [B, M] the response and its EOS, left-aligned, IGNORE after


class Seq2SeqLM(TrainableTree):
    """``SwitchTransformersForConditionalGeneration`` fine-tuned on instruction data (``task = "sft"``).

    It reads the rows of :func:`~fcmoe.models.causal_lm.encode_pairs` (prompt, response and EOS in one right-padded
    row; the targets mark the response) and cuts each in two (:meth:`split`): the encoder reads the prompt, the
    decoder the response shifted right behind the start token, and the loss is the response tokens'

        loss = Σ_j −log softmax(W_lm · s · h_j)[y_j] / #{j}     h_j: decoder output [H] before response token y_j

    with s = d_model^-½ when the head is tied to the embeddings (Switch's own rescaling), the LM head run at the
    response positions alone. Generation and MMLU's letters go through the decoder from its start token.

    Parameters
    ----------
    model
        The encoder-decoder; its shared embeddings stay frozen, its LM head too unless ``train_head``.
    codec
        Its tokenizer, as :class:`~fcmoe.models.causal_lm.TextCodec`.
    train_head
        Train the LM head (``model.train_lm_head``). A head tied to the embeddings gets its own copy of the weights;
        the config still says tied, so Switch's forward keeps the rescaling the head was trained with.
    """

    head_keys: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, codec: TextCodec, train_head: bool = False) -> None:
        super().__init__()
        self.model = model
        self.codec = codec
        self.scale = model.config.d_model ** -0.5 if model.config.tie_word_embeddings else 1.0
        self.start_id = _decoder_start_id(model)
        embeddings = model.get_input_embeddings()
        if train_head and model.lm_head.weight is embeddings.weight:
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untied: [V, H]
        embeddings.weight.requires_grad_(False)
        model.lm_head.weight.requires_grad_(train_head)

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head."""
        return int(self.model.lm_head.weight.shape[0])

    @torch.no_grad()
    def featurize(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What is cached of a pair: its token ids ``[B, T]``."""
        return input_ids

    def split(self, ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> SplitRows:
        """The encoder's and the decoder's halves of prompt/response rows ``[B, T]``."""
        starts = prompt_lengths(targets)  # [B]
        width = int(starts.max())
        positions = torch.arange(width, device=ids.device)[None]  # [1, W]
        prompt_mask = attention_mask[:, :width] * (positions < starts[:, None])
        where = targets != IGNORE  # [B, T]: each row's response, contiguous
        counts = where.sum(dim=1)  # [B]
        labels = torch.full((len(ids), int(counts.max())), IGNORE, dtype=torch.long, device=ids.device)  # [B, M]
        labels[where.nonzero()[:, 0], (where.cumsum(dim=1) - 1)[where]] = targets[where]
        shifted = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE, int(self.model.config.pad_token_id))
        start = torch.full((len(ids), 1), self.start_id, dtype=torch.long, device=ids.device)
        response_mask = (torch.arange(labels.shape[1], device=ids.device)[None] < counts[:, None]).long()
        return SplitRows(ids[:, :width], prompt_mask, torch.cat([start, shifted], dim=1), response_mask, labels)

    def routing_masks(self, attention_mask: torch.Tensor, targets: torch.Tensor | None,
                      ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The real tokens each router sees: the prompt's in the encoder, the response's in the decoder."""
        if targets is None:
            return attention_mask
        rows = self.split(attention_mask, attention_mask, targets)  # the masks only: the ids are not read
        return {"model.encoder.": rows.prompt_mask, "model.decoder.": rows.response_mask}

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits ``[m, V]`` of decoder outputs ``[m, H]``."""
        return self.model.lm_head(hidden * self.scale)

    def response_loss(self, features: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the summed cross-entropy of its response tokens ``[B]`` and their count ``[B]``."""
        rows = self.split(features, attention_mask, targets)
        encoded = self.model.encoder(input_ids=rows.prompt, attention_mask=rows.prompt_mask).last_hidden_state
        decoded = self.model.decoder(input_ids=rows.decoder_ids, attention_mask=rows.response_mask,
                                     encoder_hidden_states=encoded, encoder_attention_mask=rows.prompt_mask,
                                     use_cache=False).last_hidden_state  # [B, M, H]
        return summed_nll(self.token_logits, decoded, rows.labels)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy responses ``[B, ≤ max_new_tokens]`` to padded prompts ``[B, T]`` (EOS, then padding)."""
        out = self.model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, decoder_start_token_id=self.start_id,
                                  eos_token_id=self.codec.eos_id, pad_token_id=self.codec.pad_id)
        return out[:, 1:]  # without the start token

    @torch.no_grad()
    def last_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits of ``token_ids`` ``[B, K]`` as the response's first token to the prompts ``ids`` ``[B, T]``."""
        hidden = first_decoder_state(self.model, self.start_id, ids, attention_mask)  # [B, H]
        return self.token_logits(hidden)[:, list(token_ids)]


def _decoder_start_id(model: nn.Module) -> int:
    """T5-family decoders start from the pad token; transformers 5 keeps it in the generation config."""
    for source in (model.config, getattr(model, "generation_config", None)):
        value = getattr(source, "decoder_start_token_id", None) if source is not None else None
        if value is not None:
            return int(value)
    return int(model.config.pad_token_id)


def build_text_to_text(name: str, label_names: Sequence[str], *, path: str, max_length: int,
                       dtype: torch.dtype = torch.float32, init: str = "pretrained", num_layers: int = 0,
                       device: torch.device | str = "cpu") -> tuple[TextToTextClassifier, SwitchLayout, Any]:
    """``switch-t2t`` (pretrained: ``model.path`` or ``google/switch-base-16``, loaded in ``dtype``; or a published
    shape with random weights, ``init = "random"``) or ``switch-t2t-tiny`` (random, the ``switch-tiny``
    configuration with its decoder); random weights come with the hashing tokenizer."""
    model, tokenizer = _load(name, path, dtype, init, num_layers, device)
    if tokenizer is None:
        tokenize = hashing_tokenize(model.config.vocab_size, max_length)
        token_ids = [hashing_token_id(label.split()[0], model.config.vocab_size) for label in label_names]
    else:
        tokenize = tokenize_with(tokenizer, max_length)
        token_ids = [tokenizer.encode(label, add_special_tokens=False)[0] for label in label_names]
    classifier = TextToTextClassifier(model, token_ids)
    return classifier, _layout(classifier), tokenize


def build_seq2seq_lm(name: str, *, path: str, dtype: torch.dtype = torch.float32, train_head: bool = False,
                     init: str = "pretrained", num_layers: int = 0, device: torch.device | str = "cpu",
                     ) -> tuple[Seq2SeqLM, SwitchLayout]:
    """``switch-t2t`` for ``task = "sft"``, built as :func:`build_text_to_text` builds it; pretrained weights come
    with their tokenizer, random ones with words hashed into the vocabulary."""
    model, tokenizer = _load(name, path, dtype, init, num_layers, device)
    lm = Seq2SeqLM(model, WordCodec(model.config.vocab_size) if tokenizer is None else HFCodec(tokenizer), train_head)
    return lm, _layout(lm)


def meta_text_to_text(name: str, *, path: str, init: str, num_layers: int, dtype: torch.dtype, task: str,
                      train_head: bool = False) -> tuple[TextToTextClassifier | Seq2SeqLM, SwitchLayout]:
    """What the two builders above build, on the ``meta`` device (shapes only: a checkpoint's ``config.json`` is
    read, no weight)."""
    config = hub_config(name, path, init, num_layers)
    with on_meta(dtype):
        model = transformers.SwitchTransformersForConditionalGeneration(config)
        wrapped = (Seq2SeqLM(model, WordCodec(config.vocab_size), train_head) if task == "sft"
                   else TextToTextClassifier(model, [0, 1]))
    return wrapped, _layout(wrapped)


def _layout(model: TextToTextClassifier | Seq2SeqLM) -> SwitchLayout:
    shapes = {key: p for key, p in model.named_parameters() if p.requires_grad}  # read for their shapes only
    return SwitchLayout.from_tree(shapes, int(model.model.config.num_experts))


def _load(name: str, path: str, dtype: torch.dtype, init: str, num_layers: int, device: torch.device | str,
          ) -> tuple[nn.Module, Any]:
    """The encoder-decoder and its tokenizer (None for random weights)."""
    build = transformers.SwitchTransformersForConditionalGeneration
    if name.endswith("-tiny"):
        return build(hub_config(name, path)), None
    if init == "random":
        return materialise(build, hub_config(name, path, init, num_layers), torch.device(device), dtype), None
    source = pretrained_path(name, path)
    with pretrained_source(name, source):
        model = build.from_pretrained(source, dtype=dtype)
    return model, load_tokenizer(source)
