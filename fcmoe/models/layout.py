"""Expert addressing: which slice of which tensor is expert k of MoE layer l. The only module that knows.

An :class:`ExpertLayout` is built from the key → shape map of a trainable tree and splits it into
- *expert units*: per MoE layer, the parameters of each expert, gathered as one ``[E, P]`` matrix;
- *router rows*: per MoE layer, the router tensors whose first dimension is E (row k belongs to expert k);
- *shared* keys: everything else (attention, norms, dense FFNs, embeddings, head).

Algorithms never parse parameter names; they call :meth:`ExpertLayout.gather_experts` /
:meth:`ExpertLayout.scatter_experts` and the router equivalents.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fcmoe.registry import register_layout

Tree = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MoELayerSpec:
    """Where one MoE layer's experts and router live in the tree."""

    name: str  # module prefix, e.g. "layers.0.mlp"
    num_experts: int
    expert_keys: tuple[tuple[str, ...], ...]  # [E][j]: the j-th tensor of expert k (same order for every k)
    router_keys: tuple[str, ...]  # tensors with first dimension E
    expert_numel: int  # P: parameters per expert
    router_module: str  # module whose output is the router logits [..., E] (hooked for routing statistics)


class ExpertLayout:
    """Base class: subclasses implement :meth:`_parse` for one storage form of experts."""

    storage: str = ""

    def __init__(self, shapes: Mapping[str, torch.Size]) -> None:
        self.shapes = {k: torch.Size(v) for k, v in shapes.items()}
        self.layers: tuple[MoELayerSpec, ...] = self._parse(self.shapes)
        claimed = {k for spec in self.layers for ks in spec.expert_keys for k in ks}
        claimed |= {k for spec in self.layers for k in spec.router_keys}
        self.shared_keys: tuple[str, ...] = tuple(k for k in self.shapes if k not in claimed)
        self.router_keys: tuple[str, ...] = tuple(k for spec in self.layers for k in spec.router_keys)
        self.expert_keys: tuple[str, ...] = tuple(k for s in self.layers for ks in s.expert_keys for k in ks)

    @classmethod
    def from_tree(cls, tree: Mapping[str, torch.Tensor]) -> ExpertLayout:
        return cls({k: v.shape for k, v in tree.items()})

    def _parse(self, shapes: Mapping[str, torch.Size]) -> tuple[MoELayerSpec, ...]:
        raise NotImplementedError

    # ---------------------------------------------------------------- experts
    def gather_experts(self, tree: Mapping[str, torch.Tensor], layer: MoELayerSpec) -> torch.Tensor:
        """Expert parameters of one layer as ``[E, P]`` (row k = expert k's tensors, flattened, concatenated)."""
        rows = [torch.cat([tree[key].reshape(-1) for key in keys]) for keys in layer.expert_keys]
        return torch.stack(rows)  # [E, P]

    def split_experts(self, layer: MoELayerSpec, values: torch.Tensor) -> Tree:
        """The inverse of :meth:`gather_experts`: ``values [E, P]`` → a tree of that layer's expert keys only."""
        if values.shape != (layer.num_experts, layer.expert_numel):
            raise ValueError(f"{layer.name}: expected expert values of shape "
                             f"{(layer.num_experts, layer.expert_numel)}, got {tuple(values.shape)}")
        out: Tree = {}
        for k, keys in enumerate(layer.expert_keys):
            offset = 0
            for key in keys:
                numel = self.shapes[key].numel()
                out[key] = values[k, offset:offset + numel].reshape(self.shapes[key]).clone()
                offset += numel
        return out

    def scatter_experts(self, tree: Mapping[str, torch.Tensor], layer: MoELayerSpec, values: torch.Tensor) -> Tree:
        """A new tree equal to ``tree`` except that layer's experts are read from ``values [E, P]``."""
        out = dict(tree)
        out.update({k: v.to(tree[k].dtype) for k, v in self.split_experts(layer, values).items()})
        return out

    # ---------------------------------------------------------------- routers
    def gather_router(self, tree: Mapping[str, torch.Tensor], layer: MoELayerSpec) -> torch.Tensor:
        """Router rows of one layer as ``[E, R]`` (row k = every router tensor's row k, concatenated)."""
        if not layer.router_keys:
            return torch.zeros(layer.num_experts, 0)
        return torch.cat([tree[key].reshape(layer.num_experts, -1) for key in layer.router_keys], dim=1)

    def scatter_router(self, tree: Mapping[str, torch.Tensor], layer: MoELayerSpec, values: torch.Tensor) -> Tree:
        """A new tree with that layer's router rows read from ``values [E, R]``."""
        out = dict(tree)
        offset = 0
        for key in layer.router_keys:
            width = self.shapes[key].numel() // layer.num_experts
            out[key] = values[:, offset:offset + width].reshape(self.shapes[key]).to(tree[key].dtype).clone()
            offset += width
        return out


_EXPERT_MODULE = re.compile(r"^(?P<layer>.+)\.experts\.expert_(?P<k>\d+)\.(?P<param>.+)$")
_ROUTER = re.compile(r"^(?P<layer>.+)\.router\.classifier\.(weight|bias)$")


@register_layout("per_expert_modules")
class PerExpertModuleLayout(ExpertLayout):
    """Experts as separate modules ``<layer>.experts.expert_{k}.<param>``, router ``<layer>.router.classifier``.

    Used by transformers' Switch Transformers (``…mlp.experts.expert_{k}.wi/wo``) and fcmoe's upcycled encoders.
    """

    storage = "per_expert_modules"

    def _parse(self, shapes: Mapping[str, torch.Size]) -> tuple[MoELayerSpec, ...]:
        found: dict[str, dict[int, list[str]]] = {}
        for key in shapes:
            match = _EXPERT_MODULE.match(key)
            if match:
                found.setdefault(match["layer"], {}).setdefault(int(match["k"]), []).append(key)
        specs = []
        for name, experts in found.items():
            num_experts = len(experts)
            if sorted(experts) != list(range(num_experts)):
                raise ValueError(f"{name}: expert indices {sorted(experts)} are not 0..{num_experts - 1}")
            suffixes = [sorted(key[len(f"{name}.experts.expert_{k}."):] for key in experts[k])
                        for k in range(num_experts)]
            if any(s != suffixes[0] for s in suffixes):
                raise ValueError(f"{name}: experts do not all have the same parameters")
            keys = tuple(tuple(f"{name}.experts.expert_{k}.{s}" for s in suffixes[0]) for k in range(num_experts))
            routers = tuple(k for k in shapes if (m := _ROUTER.match(k)) and m["layer"] == name)
            for key in routers:
                if shapes[key][0] != num_experts:
                    raise ValueError(f"router {key} has {shapes[key][0]} rows for {num_experts} experts")
            numel = sum(math.prod(shapes[key]) for key in keys[0])
            specs.append(MoELayerSpec(name, num_experts, keys, routers, numel, f"{name}.router.classifier"))
        return tuple(specs)
