"""Causal language models for instruction tuning (``task = "sft"``): the response-token loss, generation, letters.

A :class:`CausalLM` wraps a ``*ForCausalLM`` (fcmoe's upcycled SmolLM2, or a fused-expert hub family, full or LoRA).
It trains the next-token loss on response tokens only: ``targets[t]`` is the token at ``t + 1`` where that token
belongs to the response (the tokenizer's end-of-sequence token after it included), −100 elsewhere, and the LM head
runs on those positions alone,

    loss = Σ_{t: targets[t] ≠ −100} −log softmax(W_lm · h_t)[targets[t]] / #{t: targets[t] ≠ −100}

(``h_t``: the final normed hidden state ``[H]``; a 49k–152k-row head at every position would be most of the
memory). This is the completion-only loss of TRL's ``SFTTrainer`` on the same batch. The input embeddings stay
frozen; the LM head too, unless ``model.train_lm_head`` (then untied from the embeddings where they share weights).

Prompts are laid out by the model's chat template when its tokenizer has one (one user turn, the generation cue),
else by :data:`PLAIN_TEMPLATE`; the response follows, then the end-of-sequence token. A pair longer than
``max_length`` keeps the prompt's end (the cue) and at least half the length for the response.

What is cached of a sequence (``featurize``) is its token ids, or — for the upcycled SmolLM2, whose lower layers
are frozen — the hidden states after those layers ``[n, T, H]``, so a local step runs only the trainable top.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from fcmoe.models.classifier import TrainableTree

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
IGNORE = -100  # a position without loss, as transformers' and TRL's labels


class TextCodec(Protocol):
    """What instruction tuning needs of a tokenizer."""

    eos_id: int
    pad_id: int

    def prompt_ids(self, prompt: str) -> list[int]: ...

    def plain_ids(self, text: str) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFCodec:
    """A Hugging Face tokenizer: its chat template (one user turn + generation cue) or :data:`PLAIN_TEMPLATE`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("the model's tokenizer has no end-of-sequence token, which ends each response in "
                             "instruction tuning; use a tokenizer that defines eos_token (model.path)")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.plain_ids(PLAIN_TEMPLATE.format(prompt=prompt))

    def plain_ids(self, text: str) -> list[int]:
        """``text`` as it is, with the model's BOS if it adds one."""
        return self.tokenizer.encode(text)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclass
class WordCodec:
    """Words hashed into a random model's vocabulary (tests): pad 0, BOS 1, EOS 2, a word → 3 + crc32 mod (V − 3).
    Decoding returns the words this codec encoded (``w<id>`` for an id it never produced)."""

    vocab_size: int
    eos_id: int = 2
    pad_id: int = 0
    words: dict[int, str] = field(default_factory=dict)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.plain_ids(PLAIN_TEMPLATE.format(prompt=prompt))

    def plain_ids(self, text: str) -> list[int]:
        return [1, *self.encode(text)]

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            token = 3 + zlib.crc32(word.encode()) % (self.vocab_size - 3)
            self.words.setdefault(token, word)
            ids.append(token)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words.get(int(i), f"w{int(i)}") for i in ids if int(i) > 2)


@dataclass
class EncodedPairs:
    """Prompt/response pairs as one right-padded batch."""

    ids: torch.Tensor  # [n, T] prompt then response then EOS, padded with pad_id
    mask: torch.Tensor  # [n, T] 1 = real token
    targets: torch.Tensor  # [n, T] the next token where it is a response token, else IGNORE


def encode_pairs(codec: TextCodec, prompts: Sequence[str], responses: Sequence[str], max_length: int,
                 ) -> EncodedPairs:
    """Token ids, mask and next-token targets of ``(prompt, response)`` pairs (see the module docstring)."""
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        head, tail = codec.prompt_ids(prompt), [*codec.encode(response), codec.eos_id]
        if len(head) + len(tail) > max_length:
            tail = tail[: max(max_length // 2, max_length - len(head))]
            head = head[len(head) - (max_length - len(tail)):]
        rows.append((head, tail))
    length = max(len(h) + len(t) for h, t in rows)
    ids = torch.full((len(rows), length), codec.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (head, tail) in enumerate(rows):
        ids[row, : len(head) + len(tail)] = torch.tensor(head + tail)
        mask[row, : len(head) + len(tail)] = 1
        targets[row, len(head) - 1: len(head) + len(tail) - 1] = torch.tensor(tail)  # position t predicts t + 1
    return EncodedPairs(ids, mask, targets)


def encode_plain(codec: TextCodec, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask ``[n, T]`` of ``texts`` without a template (MMLU's zero-shot prompts), each cut on
    the left to ``max_length`` tokens so its end (the ``Answer:`` cue) stays."""
    rows = [codec.plain_ids(text)[-max_length:] for text in texts]
    ids = torch.full((len(rows), max(map(len, rows))), codec.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = torch.tensor(tokens), 1
    return ids, mask


def answer_tokens(codec: TextCodec, words: Sequence[str], cue: str = "Answer:") -> list[int] | None:
    """The token each of ``words`` (" A" … " D") is after ``cue``, as the model reads "Answer: A" (SentencePiece and
    byte-level BPE tokenizers spell the space differently); None when one is not a single token there."""
    prefix = codec.encode(cue)
    tokens = []
    for word in words:
        ids = codec.encode(f"{cue} {word}")
        if ids[: len(prefix)] != prefix or len(ids) != len(prefix) + 1:
            return None
        tokens.append(ids[-1])
    return tokens


def summed_nll(token_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed cross-entropy of the targets ``[B]`` and their count ``[B]``, the LM head (``token_logits``)
    run on the hidden states ``[B, T, H]`` of the target positions (``targets [B, T]`` ≠ IGNORE) alone."""
    where = targets != IGNORE  # [B, T]
    logits = token_logits(hidden[where])  # [m, V]
    nll = nn.functional.cross_entropy(logits.float(), targets[where], reduction="none")  # [m]
    rows = where.nonzero()[:, 0]  # [m] the row of each scored position
    per_row = torch.zeros(len(targets), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return per_row, where.sum(dim=1)


def prompt_lengths(targets: torch.Tensor) -> torch.Tensor:
    """``[n]`` prompt length of each row: the first response token sits one past the first target."""
    has = targets != IGNORE  # [n, T]
    return has.int().argmax(dim=1) + 1


class CausalLM(TrainableTree):
    """A causal LM whose trainable tree is everything not frozen (experts, routers, attention or LoRA adapters).

    Parameters
    ----------
    lm
        A ``*ForCausalLM``, or a ``PeftModel`` wrapping one; its input embeddings and LM head are frozen here.
    codec
        Its tokenizer, as :class:`TextCodec`.
    frozen_layers
        The bottom layers that never train: their output is the cached feature (0: the token ids are).
    train_head
        Train the LM head as well (``model.train_lm_head``). A head tied to the input embeddings (SmolLM2) gets its
        own copy of the weights first: the embeddings stay frozen, as the cached features need.
    """

    head_keys: tuple[str, ...] = ()  # no classification head

    def __init__(self, lm: nn.Module, codec: TextCodec, frozen_layers: int = 0, train_head: bool = False) -> None:
        super().__init__()
        self.lm = lm
        causal = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self._parts = [causal]  # a list: registered once, under lm
        self.codec = codec
        self.frozen_layers = frozen_layers
        head = causal.get_output_embeddings()
        if train_head and head.weight is causal.get_input_embeddings().weight:
            head.weight = nn.Parameter(head.weight.detach().clone())  # untied: [V, H], trained apart
            causal.config.tie_word_embeddings = False
        causal.get_input_embeddings().weight.requires_grad_(False)
        head.weight.requires_grad_(train_head)
        for layer in self.body.layers[:frozen_layers]:
            layer.requires_grad_(False)

    @property
    def causal(self) -> nn.Module:
        """The ``*ForCausalLM`` (inside the PEFT wrapper, with its adapters)."""
        return self._parts[0]

    @property
    def body(self) -> nn.Module:
        """The decoder stack (``*Model``: embeddings, layers, final norm)."""
        return self.causal.model

    @torch.no_grad()
    def featurize(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What is cached: the ids ``[B, T]``, or the hidden states after the frozen layers ``[B, T, H]``."""
        if not self.frozen_layers:
            return input_ids
        was_training = self.training
        self.eval()
        hidden = self._run(self.body.get_input_embeddings()(input_ids), attention_mask, self.body.layers[
            : self.frozen_layers])
        self.train(was_training)
        return hidden

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states ``[B, T, H]`` from cached features (no LM head: see :meth:`token_logits`)."""
        if not self.frozen_layers:
            with torch.no_grad():
                embedded = self.body.get_input_embeddings()(features)  # [B, T, H]
            return self.body(inputs_embeds=embedded, attention_mask=attention_mask).last_hidden_state
        return self.body.norm(self._run(features, attention_mask, self.body.layers[self.frozen_layers:]))

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits ``[m, V]`` of the hidden states ``[m, H]`` (only the positions that need them)."""
        return self.causal.get_output_embeddings()(hidden)

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head."""
        return int(self.causal.get_output_embeddings().weight.shape[0])

    def response_loss(self, features: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the summed cross-entropy of its response tokens ``[B]`` and their count ``[B]``: the batch's
        token-mean loss is ``sums.sum() / counts.sum()``, a row's mean ``sums / counts``."""
        return summed_nll(self.token_logits, self(features, attention_mask), targets)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuations ``[B, ≤ max_new_tokens]`` of left-padded prompts ``[B, T]`` (EOS, then padding)."""
        out = self.causal.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=self.codec.eos_id, pad_token_id=self.codec.pad_id)
        return out[:, ids.shape[1]:]

    @torch.no_grad()
    def last_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits of ``token_ids`` ``[B, K]`` at each right-padded sequence's last real token (full model)."""
        hidden = self.causal.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        last = attention_mask.long().sum(dim=1) - 1  # [B]
        return self.token_logits(hidden[torch.arange(len(ids), device=ids.device), last])[:, list(token_ids)]

    def _run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
        """``layers`` of the decoder on hidden states ``[B, T, H]`` of right-padded sequences from position 0."""
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # [1, T]
        causal_mask = create_causal_mask(config=self.body.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                         cache=None, position_ids=positions)
        rotary = self.body.rotary_emb(hidden, position_ids=positions)
        for layer in layers:
            hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=rotary, position_ids=positions)
        return hidden
