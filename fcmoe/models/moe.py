"""A Switch-style top-1 MoE feed-forward block, and sparse upcycling of a dense BERT layer into it.

Parameter names follow transformers' Switch Transformers (``mlp.router.classifier``,
``mlp.experts.expert_{k}.wi`` / ``.wo``) so that one :class:`~fcmoe.models.layout.ExpertLayout` addresses both
the paper's Switch models and our upcycled encoders.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.activations import ACT2FN


class SwitchRouter(nn.Module):
    """Linear router producing raw logits ``[..., E]`` (``classifier`` as in Switch Transformers)."""

    def __init__(self, hidden_size: int, num_experts: int, init_std: float) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.classifier.weight, std=init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)


class DenseExpert(nn.Module):
    """BERT's FFN as one module, named as a Switch expert: ``wo(act(wi(x)))`` with BERT's biases."""

    def __init__(self, wi: nn.Linear, wo: nn.Linear, activation: str) -> None:
        super().__init__()
        self.wi = copy.deepcopy(wi)
        self.wo = copy.deepcopy(wo)
        self.act = ACT2FN[activation]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi(hidden)))


class SwitchMoE(nn.Module):
    """Top-1 routed mixture of copies of one feed-forward block (Fedus et al. 2021), without capacity limits.

    The combine weight is ``p / stopgrad(p)``: exactly 1 in the forward pass, so a freshly upcycled layer computes
    the dense FFN bit-for-bit, while the router still receives the gradient of ``p`` (straight-through). The
    load-balancing loss is computed from the router logits by :class:`~fcmoe.models.routing.RoutingRecorder`.
    """

    def __init__(self, experts: list[nn.Module], hidden_size: int, router_init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts = len(experts)
        self.router = SwitchRouter(hidden_size, self.num_experts, router_init_std)
        self.experts = nn.ModuleDict({f"expert_{k}": expert for k, expert in enumerate(experts)})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape  # [B, T, H]
        tokens = hidden.reshape(-1, shape[-1])  # [B·T, H]
        logits = self.router(tokens)  # [B·T, E]
        probs = torch.softmax(logits.float(), dim=-1)  # [B·T, E]
        top_prob, top_expert = probs.max(dim=-1)  # [B·T]
        combine = (top_prob / top_prob.detach()).to(tokens.dtype)  # == 1, carries the router gradient
        # Tokens grouped by expert with one stable sort, so each expert sees its rows in their original order, and
        # one host read of the group sizes per layer: a `nonzero` per expert stalled a GPU E times per layer.
        order = top_expert.argsort(stable=True)  # [B·T]
        sizes = torch.bincount(top_expert, minlength=self.num_experts).tolist()  # [E] tokens per expert
        groups = zip(self.experts.values(), order.split(sizes), strict=True)
        # an expert with no token is not called: its gradient stays None, so AdamW leaves it untouched
        outputs = [expert(tokens[rows]) * combine[rows, None] for expert, rows in groups if rows.numel()]
        out = torch.empty_like(tokens)
        out[order] = torch.cat(outputs)
        return out.reshape(shape)

    @classmethod
    def upcycle(cls, dense_ffn: nn.Module, hidden_size: int, num_experts: int,
                router_init_std: float = 0.02) -> SwitchMoE:
        """Sparse upcycling (Komatsuzaki et al. 2022): every expert starts as a copy of the dense FFN."""
        return cls([copy.deepcopy(dense_ffn) for _ in range(num_experts)], hidden_size, router_init_std)


class MoEEncoderLayer(nn.Module):
    """A BERT layer whose FFN is a :class:`SwitchMoE`: ``LN(attn + dropout(moe(attn)))``.

    Re-uses the dense layer's attention and output LayerNorm modules (same parameters, same names under
    ``attention.`` / ``output_norm.``) and calls them exactly as ``BertLayer`` does.
    """

    def __init__(self, dense_layer: nn.Module, num_experts: int, activation: str, router_init_std: float) -> None:
        super().__init__()
        self.attention = dense_layer.attention
        dense_ffn = DenseExpert(dense_layer.intermediate.dense, dense_layer.output.dense, activation)
        self.mlp = SwitchMoE.upcycle(dense_ffn, dense_ffn.wi.in_features, num_experts, router_init_std)
        self.output_norm = dense_layer.output.LayerNorm
        self.dropout = dense_layer.output.dropout

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor:
        attention_output, _ = self.attention(hidden_states, attention_mask)
        return self.output_norm(self.dropout(self.mlp(attention_output)) + attention_output)
