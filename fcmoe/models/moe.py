"""A Switch-style top-1 MoE feed-forward block, and sparse upcycling of a dense BERT layer into it.

Parameter names follow transformers' Switch Transformers (``mlp.router.classifier``,
``mlp.experts.expert_{k}.wi`` / ``.wo``) so that one :class:`~fcmoe.models.layout.ExpertLayout` addresses both
the paper's Switch models and our upcycled encoders.
"""

from __future__ import annotations

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
    """One expert: ``wo(act(wi(x)))`` with biases (a copy of BERT's FFN, which has them)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.wi = nn.Linear(hidden_size, intermediate_size)
        self.wo = nn.Linear(intermediate_size, hidden_size)
        self.act = ACT2FN[activation]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi(hidden)))


class SwitchMoE(nn.Module):
    """Top-1 routed mixture of :class:`DenseExpert` (Fedus et al. 2021), without capacity limits.

    The combine weight is ``p / stopgrad(p)``: exactly 1 in the forward pass, so a freshly upcycled layer computes
    the dense FFN bit-for-bit, while the router still receives the gradient of ``p`` (straight-through). The
    load-balancing loss is computed from the router logits by :class:`~fcmoe.models.routing.RoutingRecorder`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, activation: str,
                 router_init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.router = SwitchRouter(hidden_size, num_experts, router_init_std)
        self.experts = nn.ModuleDict(
            {f"expert_{k}": DenseExpert(hidden_size, intermediate_size, activation) for k in range(num_experts)}
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape  # [B, T, H]
        tokens = hidden.reshape(-1, shape[-1])  # [B·T, H]
        logits = self.router(tokens)  # [B·T, E]
        probs = torch.softmax(logits.float(), dim=-1)  # [B·T, E]
        top_prob, top_expert = probs.max(dim=-1)  # [B·T]
        combine = (top_prob / top_prob.detach()).to(tokens.dtype)  # == 1, carries the router gradient
        out = torch.zeros_like(tokens)
        for k, expert in enumerate(self.experts.values()):
            rows = (top_expert == k).nonzero(as_tuple=True)[0]
            if rows.numel():
                out.index_copy_(0, rows, expert(tokens[rows]) * combine[rows, None])
        return out.reshape(shape)

    @classmethod
    def upcycle(cls, wi: nn.Linear, wo: nn.Linear, num_experts: int, activation: str,
                router_init_std: float = 0.02) -> SwitchMoE:
        """Sparse upcycling (Komatsuzaki et al. 2022): every expert starts as a copy of the dense FFN."""
        moe = cls(wi.in_features, wi.out_features, num_experts, activation, router_init_std)
        with torch.no_grad():
            for expert in moe.experts.values():
                expert.wi.weight.copy_(wi.weight)
                expert.wi.bias.copy_(wi.bias)
                expert.wo.weight.copy_(wo.weight)
                expert.wo.bias.copy_(wo.bias)
        return moe


class MoEEncoderLayer(nn.Module):
    """A BERT layer whose FFN is a :class:`SwitchMoE`: ``LN(attn + dropout(moe(attn)))``.

    Re-uses the dense layer's attention and output LayerNorm modules (same parameters, same names under
    ``attention.`` / ``output_norm.``) and calls them exactly as ``BertLayer`` does.
    """

    def __init__(self, dense_layer: nn.Module, num_experts: int, activation: str, router_init_std: float) -> None:
        super().__init__()
        self.attention = dense_layer.attention
        self.mlp = SwitchMoE.upcycle(
            dense_layer.intermediate.dense, dense_layer.output.dense, num_experts, activation, router_init_std
        )
        self.output_norm = dense_layer.output.LayerNorm
        self.dropout = dense_layer.output.dropout

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor:
        attention_output, _ = self.attention(hidden_states, attention_mask)
        return self.output_norm(self.dropout(self.mlp(attention_output)) + attention_output)
