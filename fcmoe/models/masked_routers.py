"""FedMoE's sub-MoE mask on routers that compute their logits and top-k in one module (the fused families).

A sub-MoE must keep the experts a client does not hold from ever being chosen. Where a router only returns logits
(Switch, fcmoe's upcycled layers) adding −∞ to them is enough (:func:`~fcmoe.models.routing.masked_routing`). The
fused families' routers choose inside ``forward``, each by its own rule, so the mask is applied by re-doing that
rule with the masked experts excluded *before* the choice. Each rule below repeats transformers' own router
``forward`` line for line, with one change: ``bias [E]`` (0 for held experts, −∞ for the others) is added where
the family makes its choice. With nothing masked it returns what the module itself returns (tested, per family).

- softmax top-k (Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral): softmax over the masked logits, so a sub-MoE's held
  experts share the probability mass exactly as a model with only those experts would; top-k; renormalised
  where the family renormalises;
- sigmoid with a score-correction bias and group-limited top-k (DeepSeek-V3): the mask joins the correction
  bias in the scores used for the choice; the weights stay the chosen experts' sigmoid scores;
- softmax, then greedy or group-limited top-k (DeepSeek-V2);
- top-k on the biased logits, softmax over the k chosen (GPT-OSS).

A masked expert therefore gets no token, and no gradient through the router's choice: its router row's logit is
−∞ wherever a softmax reads it (probability 0), and DeepSeek's sigmoid weights are gathered for chosen experts only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

RouterOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # logits [n, E], weights [n, k], indices [n, k]


def _softmax_top_k(router: nn.Module, hidden: torch.Tensor, bias: torch.Tensor, normalise: bool,
                   cast_back: bool) -> RouterOutput:
    hidden = hidden.reshape(-1, router.hidden_dim)
    logits = F.linear(hidden, router.weight)
    logits = logits + bias.to(logits.dtype)  # [n, E], −∞ for masked experts
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    top, indices = torch.topk(probs, router.top_k, dim=-1)  # [n, k]
    if normalise:
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype) if cast_back else top, indices


def qwen_olmoe(router: nn.Module, hidden: torch.Tensor, bias: torch.Tensor) -> RouterOutput:
    """Qwen2-MoE, Qwen3-MoE, OLMoE: softmax top-k, renormalised when ``norm_topk_prob``."""
    return _softmax_top_k(router, hidden, bias, router.norm_topk_prob, cast_back=True)


def mixtral(router: nn.Module, hidden: torch.Tensor, bias: torch.Tensor) -> RouterOutput:
    """Mixtral: softmax top-k, always renormalised, weights left in fp32."""
    return _softmax_top_k(router, hidden, bias, normalise=True, cast_back=False)


def deepseek_v3(router: nn.Module, hidden: torch.Tensor, bias: torch.Tensor) -> RouterOutput:
    """DeepSeek-V3: sigmoid scores; the choice reads scores + correction bias (+ the mask) within the top groups."""
    hidden = hidden.view(-1, router.hidden_dim)
    logits = F.linear(hidden.type(torch.float32), router.weight.type(torch.float32))  # [n, E]
    scores = logits.sigmoid()
    choice = scores + router.e_score_correction_bias + bias  # [n, E]
    groups, per_group = router.num_group, router.num_experts // router.num_group
    top2 = choice.view(-1, groups, per_group).topk(2, dim=-1)[0]  # [n, G, 2]
    # a group's score is the sum of its two best held experts: one held expert counts alone, none rules it out
    group_scores = top2.masked_fill(top2.isneginf(), 0.0).sum(dim=-1).masked_fill(top2[..., 0].isneginf(),
                                                                                   float("-inf"))  # [n, G]
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, groups, per_group).reshape(-1, router.num_experts)
    restricted = choice.masked_fill(~score_mask.bool(), float("-inf"))
    values, indices = torch.topk(restricted, k=router.top_k, dim=-1, sorted=False)  # [n, k]
    # where the chosen groups hold fewer than k of the client's experts, choose among all it holds
    short = values.isneginf().any(dim=-1, keepdim=True)  # [n, 1]
    indices = torch.where(short, torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1], indices)
    weights = scores.gather(1, indices)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return logits + bias, weights * router.routed_scaling_factor, indices  # masked logits: for the balance loss


def deepseek_v2(router: nn.Module, hidden: torch.Tensor, bias: torch.Tensor) -> RouterOutput:
    """DeepSeek-V2: softmax scores; greedy top-k, or top-k within the groups of the best expert scores."""
    hidden = hidden.view(-1, router.hidden_dim)
    logits = F.linear(hidden.type(torch.float32), router.weight.type(torch.float32)) + bias  # [n, E]
    scores = logits.softmax(dim=-1, dtype=torch.float32)  # masked experts: 0
    if router.topk_method == "group_limited_greedy":
        groups, per_group = router.num_group, router.num_experts // router.num_group
        group_scores = scores.view(-1, groups, per_group).max(dim=-1).values  # [n, G]
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, per_group).reshape(-1, router.num_experts)
        restricted = scores.masked_fill(~score_mask.bool(), 0.0)
        weights, indices = torch.topk(restricted, k=router.top_k, dim=-1, sorted=False)
        # where the chosen groups hold fewer than k of the client's experts, choose among all it holds
        short = (restricted > 0).sum(dim=-1, keepdim=True) < router.top_k  # [n, 1]
        any_weights, any_indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        weights, indices = torch.where(short, any_weights, weights), torch.where(short, any_indices, indices)
    else:
        weights, indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
    return logits, weights * router.routed_scaling_factor, indices


def gpt_oss(router: nn.Module, hidden: torch.Tensor, bias: torch.Tensor) -> RouterOutput:
    """GPT-OSS: top-k of the biased logits, softmax over the k chosen."""
    logits = F.linear(hidden, router.weight, router.bias)
    logits = logits + bias.to(logits.dtype)  # [n, E]
    top, indices = torch.topk(logits, router.top_k, dim=-1)
    return logits, torch.softmax(top, dim=1, dtype=top.dtype), indices


# transformers' router class → its rule with a mask
MASKED_RULES: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], RouterOutput]] = {
    "Qwen2MoeTopKRouter": qwen_olmoe, "Qwen3MoeTopKRouter": qwen_olmoe, "OlmoeTopKRouter": qwen_olmoe,
    "MixtralTopKRouter": mixtral, "DeepseekV2TopkRouter": deepseek_v2, "DeepseekV3TopkRouter": deepseek_v3,
    "GptOssTopKRouter": gpt_oss,
}


def masked_rule(router: nn.Module, layer: str) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], RouterOutput]:
    """The rule of ``router``'s class; ``ValueError`` naming the class when fcmoe has none."""
    rule = MASKED_RULES.get(type(router).__name__)
    if rule is None:
        raise ValueError(f"{layer}: fcmoe has no sub-MoE rule for the router class {type(router).__name__}; use "
                         f"fedmoe/agg (no sub-models), or a family with one of {', '.join(sorted(MASKED_RULES))}")
    return rule
