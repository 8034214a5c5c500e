"""Scoring a causal LM on instruction data (``task = "sft"``): response loss, greedy generation, MMLU letters.

Per held-out prompt, three readings:
- the response-token loss (teacher forcing, the training loss of that row);
- a greedy continuation of at most ``max_new_tokens`` tokens, scored against the reference response by exact match
  (label-word tasks: both lower-cased, first line only, surrounding punctuation and spaces stripped) or ROUGE-L F1
  (generative tasks; Google's ``rouge-score`` package with its own tokenizer, Porter stemming on);
- MMLU: zero-shot, the log-likelihood of each answer letter (" A" … " D") as the token after ``Answer:``, argmax
  against the key (:func:`letter_accuracy`).
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence

import torch

from fcmoe.models.causal_lm import CausalLM, prompt_lengths


def normalise(text: str) -> str:
    """An answer as exact match compares it: first line, lower-cased, punctuation and spaces stripped at both ends."""
    line = text.strip().split("\n", 1)[0] if text.strip() else ""
    return " ".join(line.lower().strip(string.punctuation + " ").split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference, else 0.0."""
    return float(normalise(prediction) == normalise(reference))


@functools.cache
def _rouge_scorer():  # noqa: ANN202 - rouge_score has no type hints
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (``rouge-score``)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


@torch.no_grad()
def response_losses(model: CausalLM, features: torch.Tensor, mask: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean response-token loss of each row (teacher forcing)."""
    sums, counts = model.response_loss(features, mask, targets)
    return (sums / counts.clamp_min(1)).float()


@torch.no_grad()
def generation_scores(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                      exact: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """``[B]`` score of each row's greedy continuation of its prompt against its reference response.

    ``ids``/``mask``/``targets``: right-padded prompt + response rows ``[B, T]``; the prompts are re-laid left-padded
    for generation. ``exact`` ``[B]``: the row's task is scored by exact match, else ROUGE-L.
    """
    codec = model.codec
    starts = prompt_lengths(targets).tolist()
    ends = mask.sum(dim=1).tolist()
    width = max(starts)
    prompts = torch.full((len(ids), width), codec.pad_id, dtype=ids.dtype, device=ids.device)
    prompt_mask = torch.zeros_like(prompts)
    for row, start in enumerate(starts):
        prompts[row, width - start:] = ids[row, :start]
        prompt_mask[row, width - start:] = 1
    generated = model.generate(prompts, prompt_mask, max_new_tokens).tolist()
    references = ids.tolist()  # one copy off the device, read row by row below
    scores = []
    for row, (start, end) in enumerate(zip(starts, ends, strict=True)):
        reference = codec.decode(_until_eos(references[row][start:end], codec.eos_id))
        prediction = codec.decode(_until_eos(generated[row], codec.eos_id))
        scores.append(exact_match(prediction, reference) if exact[row] else rouge_l(prediction, reference))
    return torch.tensor(scores, dtype=torch.float64)


def _until_eos(ids: Sequence[int], eos: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids


@torch.no_grad()
def letter_accuracy(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, answers: torch.Tensor,
                    letter_ids: Sequence[int]) -> torch.Tensor:
    """``[B]`` 1.0 where the answer letter's logit is the highest of ``letter_ids`` at the last prompt token."""
    logits = model.last_logits(ids, mask, letter_ids)  # [B, K]
    return (logits.argmax(dim=-1).cpu() == answers).double()
