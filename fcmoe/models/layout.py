"""Expert addressing: which slice of which tensor is expert k of MoE layer l. The only module that knows.

An :class:`ExpertLayout` is built from the key → shape map of a trainable tree and splits it into
- *expert units*: per MoE layer, the parameters of each expert, gathered as one ``[E, P]`` matrix;
- *router rows*: per MoE layer, the router tensors whose first dimension is E (row k belongs to expert k);
- *shared* keys: everything else (attention, norms, dense FFNs, shared experts, embeddings, head).

Three storage forms are registered:
- ``per_expert_modules``: ``<layer>.experts.expert_{k}.<param>`` (Switch Transformers, fcmoe's upcycled models);
- ``fused``: ``<layer>.experts.gate_up_proj [E, …]`` / ``down_proj [E, …]`` (+ GPT-OSS's ``*_bias [E, …]``)
  (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3; GPT-OSS's transposed tensors too, since only dimension 0 is read),
  router ``<layer>.gate`` (GPT-OSS: ``<layer>.router``);
- ``lora``: PEFT LoRA on fused experts (``target_parameters``): ``lora_A [E·r, in]`` holds expert k in rows
  ``k·r:(k+1)·r``; ``lora_B [out, E·r]`` holds it in the strided columns ``k, k+E, k+2E, …``.

Algorithms never parse parameter names; they call :meth:`ExpertLayout.gather_experts` /
:meth:`ExpertLayout.split_experts` / :meth:`ExpertLayout.scatter_experts` and the router equivalents.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fcmoe.core.tree import Tree
from fcmoe.registry import register_layout


@dataclass(frozen=True)
class ExpertPart:
    """One way expert parameters are stored: ``keys`` read as an ``[E, width]`` block.

    kind: "module" (``keys[k]`` is expert k's whole tensor), "index" (``keys[0][k]``), "lora_a" (rows
    ``k·r:(k+1)·r`` of ``keys[0]``), "lora_b" (columns ``k::E`` of ``keys[0]``).
    """

    kind: str
    keys: tuple[str, ...]
    shape: torch.Size  # of one stored tensor
    num_experts: int

    @property
    def width(self) -> int:
        numel = self.shape.numel()
        return numel if self.kind == "module" else numel // self.num_experts

    def gather(self, tree: Mapping[str, torch.Tensor]) -> torch.Tensor:
        e = self.num_experts
        if self.kind == "module":
            return torch.stack([tree[key].reshape(-1) for key in self.keys])  # [E, p]
        tensor = tree[self.keys[0]]
        if self.kind == "lora_b":  # [out, r·E], column c = j·E + k → [E, out·r]
            return tensor.reshape(tensor.shape[0], -1, e).permute(2, 0, 1).reshape(e, -1)
        return tensor.reshape(e, -1)  # "index" [E, …] and "lora_a" [E·r, in] are both row-major in k

    def row(self, tree: Mapping[str, torch.Tensor], k: int) -> torch.Tensor:
        """Expert k's values as one flat tensor, in :meth:`gather`'s order (a view where the storage allows)."""
        if self.kind == "module":
            return tree[self.keys[k]].reshape(-1)
        if self.kind == "lora_b":  # columns k, k+E, …: [out, r]
            return tree[self.keys[0]][:, k::self.num_experts].reshape(-1)
        rows = self.shape[0] // self.num_experts  # "index": 1 row of [E, …]; "lora_a": r rows of [E·r, in]
        read_rows = getattr(tree, "rows", None)  # a tree on disk reads expert k's rows alone (fcmoe.spill)
        if read_rows is not None:
            return read_rows(self.keys[0], k * rows, (k + 1) * rows).reshape(-1)
        return tree[self.keys[0]][k * rows:(k + 1) * rows].reshape(-1)

    def split(self, block: torch.Tensor) -> Tree:
        e = self.num_experts
        if self.kind == "module":
            return {key: block[k].reshape(self.shape).clone() for k, key in enumerate(self.keys)}
        if self.kind == "lora_b":
            out = self.shape[0]
            return {self.keys[0]: block.reshape(e, out, -1).permute(1, 2, 0).reshape(self.shape).clone()}
        return {self.keys[0]: block.reshape(self.shape).clone()}


def _packed_key(layer: MoELayerSpec, part: int) -> str:
    """Where :meth:`ExpertLayout.pack_experts` puts part ``part`` of ``layer``'s held experts."""
    return f"{layer.name}#part{part}"


@dataclass(frozen=True)
class MoELayerSpec:
    """Where one MoE layer's experts and router live in the tree."""

    name: str  # module prefix, e.g. "layers.0.mlp"
    num_experts: int
    parts: tuple[ExpertPart, ...]
    router_keys: tuple[str, ...]  # trainable tensors with first dimension E
    router_module: str  # module hooked for routing statistics
    router_output: str  # "logits" | "switch" | "topk": how to read the hooked module's output

    @property
    def logits_module(self) -> str | None:
        """The module whose output is this layer's raw router logits ``[..., E]`` (where a sub-MoE mask is added),
        or ``None`` when the router computes its logits and top-k inside one module (the fused families: the mask
        re-does the family's choice, :mod:`fcmoe.models.masked_routers`)."""
        if self.router_output == "logits":
            return self.router_module
        return f"{self.router_module}.classifier" if self.router_output == "switch" else None

    @property
    def expert_numel(self) -> int:
        """P: parameters per expert."""
        return sum(part.width for part in self.parts)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(key for part in self.parts for key in part.keys)


class ExpertLayout:
    """Base class: subclasses implement :meth:`_parse` for one storage form of experts."""

    storage: str = ""

    def __init__(self, shapes: Mapping[str, torch.Size], num_experts: int | None = None,
                 router_attr: str = "gate", top_k: int = 1) -> None:
        self.shapes = {k: torch.Size(v) for k, v in shapes.items()}
        self.num_experts_hint = num_experts
        self.router_attr = router_attr  # fused families: the router module's attribute name (GPT-OSS: "router")
        self.top_k = top_k  # experts each token is routed to (a sub-MoE must hold at least this many per layer)
        self.layers: tuple[MoELayerSpec, ...] = self._parse(self.shapes)
        self.expert_keys: tuple[str, ...] = tuple(k for spec in self.layers for k in spec.keys)
        self.router_keys: tuple[str, ...] = tuple(k for spec in self.layers for k in spec.router_keys)
        claimed = set(self.expert_keys) | set(self.router_keys)
        self.shared_keys: tuple[str, ...] = tuple(k for k in self.shapes if k not in claimed)

    @classmethod
    def from_tree(cls, tree: Mapping[str, torch.Tensor], num_experts: int | None = None,
                  router_attr: str = "gate", top_k: int = 1) -> ExpertLayout:
        return cls({k: v.shape for k, v in tree.items()}, num_experts, router_attr, top_k)

    def _router_keys(self, shapes: Mapping[str, torch.Size], layer: str) -> tuple[str, ...]:
        """Trainable tensors of ``<layer>.<router_attr>`` (weight, bias): row k belongs to expert k."""
        return tuple(f"{layer}.{self.router_attr}.{p}" for p in ("weight", "bias")
                     if f"{layer}.{self.router_attr}.{p}" in shapes)

    def _parse(self, shapes: Mapping[str, torch.Size]) -> tuple[MoELayerSpec, ...]:
        raise NotImplementedError

    # ---------------------------------------------------------------- experts
    def gather_experts(self, tree: Mapping[str, torch.Tensor], layer: MoELayerSpec) -> torch.Tensor:
        """Expert parameters of one layer as ``[E, P]`` (row k = every part of expert k, flattened)."""
        return torch.cat([part.gather(tree) for part in layer.parts], dim=1)

    def stack_expert(self, trees: Sequence[Mapping[str, torch.Tensor]], layer: MoELayerSpec, k: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Expert k of one layer in every tree as ``[N, P]`` (row i = tree i's expert k, flattened), in one copy.

        Aggregation works one expert unit at a time on this stack: its rows are contiguous, so the per-expert
        sums and inner products are matrix–vector products, and the copy is one expert's, not the layer's. ``out``
        (the previous expert's stack, when shape and dtype fit) is written over instead of a fresh allocation.
        """
        n, p = len(trees), layer.expert_numel
        dtype = layer.parts[0].row(trees[0], k).dtype
        if out is None or out.shape != (n, p) or out.dtype != dtype:
            out = torch.empty(n, p, dtype=dtype)
        offset = 0
        for part in layer.parts:
            for i, tree in enumerate(trees):
                out[i, offset:offset + part.width].copy_(part.row(tree, k))
            offset += part.width
        return out

    def split_experts(self, layer: MoELayerSpec, values: torch.Tensor) -> Tree:
        """The inverse of :meth:`gather_experts`: ``values [E, P]`` → a tree of that layer's expert keys only."""
        if values.shape != (layer.num_experts, layer.expert_numel):
            raise ValueError(f"{layer.name}: expected expert values of shape "
                             f"{(layer.num_experts, layer.expert_numel)}, got {tuple(values.shape)}")
        out: Tree = {}
        offset = 0
        for part in layer.parts:
            out.update(part.split(values[:, offset:offset + part.width]))
            offset += part.width
        return out

    def add_to_experts(self, tree: Mapping[str, torch.Tensor], layer: MoELayerSpec, step: torch.Tensor,
                       scale: torch.Tensor) -> Tree:
        """A new tree whose experts of ``layer`` are ``tree``'s plus ``scale[k] · step[k]`` (``step [E, P]``).

        One fused multiply-add per stored tensor, written straight into its own shape: no ``[E, P]`` concatenation
        of the old values and no copy of the result.
        """
        out = dict(tree)
        offset = 0
        for part in layer.parts:
            block = step[:, offset:offset + part.width]  # [E, w]
            if part.kind == "index":
                old = tree[part.keys[0]]
                new = torch.addcmul(old.reshape(layer.num_experts, -1).to(block.dtype), block, scale[:, None])
                out[part.keys[0]] = new.reshape(old.shape).to(old.dtype)
            elif part.kind == "module":  # E tensors: one multiply-add each (a gather and a split would copy twice)
                for k, key in enumerate(part.keys):
                    old = tree[key]
                    out[key] = torch.addcmul(old.to(block.dtype), block[k].view(old.shape), scale[k]).to(old.dtype)
            else:  # LoRA factors: small tensors, through the general path
                merged = torch.addcmul(part.gather(tree).to(block.dtype), block, scale[:, None])  # gather may be a view
                out.update({k: v.to(tree[k].dtype) for k, v in part.split(merged).items()})
            offset += part.width
        return out

    def pack_experts(self, tree: Mapping[str, torch.Tensor], layer: MoELayerSpec, held: torch.Tensor) -> Tree:
        """``tree`` with ``layer``'s experts reduced to the ``held [E]`` ones: an expert-sparse upload.

        The layer's stored expert tensors are replaced by one ``[H, w]`` block per part (H = held experts) under
        ``"<layer>#part<j>"``; :meth:`unpack_experts` restores the stored form with zeros for the others.
        """
        out = {k: v for k, v in tree.items() if k not in set(layer.keys)}
        for j, part in enumerate(layer.parts):
            out[_packed_key(layer, j)] = part.gather(tree)[held].contiguous()  # [H, w]
        return out

    def holds_experts(self, tree: Mapping[str, torch.Tensor], layer: MoELayerSpec) -> bool:
        """Whether ``tree`` carries ``layer``'s experts, stored or packed by :meth:`pack_experts` (a local-experts
        upload carries neither)."""
        return layer.keys[0] in tree or _packed_key(layer, 0) in tree

    def unpack_experts(self, tree: Mapping[str, torch.Tensor], layer: MoELayerSpec, held: torch.Tensor) -> Tree:
        """Inverse of :meth:`pack_experts`. Raises ``ValueError`` naming a missing or wrong-shaped block."""
        out = {k: v for k, v in tree.items() if not k.startswith(f"{layer.name}#part")}
        rows = int(held.sum())
        for j, part in enumerate(layer.parts):
            key = _packed_key(layer, j)
            block = tree.get(key)
            if block is None or block.shape != (rows, part.width):
                got = "nothing" if block is None else f"shape {tuple(block.shape)}"
                raise ValueError(f"sparse upload {key}: expected [{rows}, {part.width}] (held experts × width), "
                                 f"got {got}")
            full = torch.zeros(layer.num_experts, part.width, dtype=block.dtype)
            full[held] = block
            out.update(part.split(full))
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
_SWITCH_ROUTER = re.compile(r"^(?P<layer>.+)\.router\.classifier\.(weight|bias)$")


@register_layout("per_expert_modules")
class PerExpertModuleLayout(ExpertLayout):
    """Experts as separate modules ``<layer>.experts.expert_{k}.<param>``, router ``<layer>.router.classifier``.

    Used by transformers' Switch Transformers (``…mlp.experts.expert_{k}.wi/wo``, router module
    ``…mlp.router`` returning the capacity-masked dispatch) and fcmoe's upcycled models (router logits from
    ``…mlp.router.classifier``).
    """

    storage = "per_expert_modules"
    router_output = "logits"

    def _parse(self, shapes: Mapping[str, torch.Size]) -> tuple[MoELayerSpec, ...]:
        found: dict[str, dict[int, dict[str, str]]] = {}
        for key in shapes:
            match = _EXPERT_MODULE.match(key)
            if match:
                found.setdefault(match["layer"], {}).setdefault(int(match["k"]), {})[match["param"]] = key
        specs = []
        for name, experts in found.items():
            num_experts = len(experts)
            if sorted(experts) != list(range(num_experts)):
                raise ValueError(f"{name}: expert indices {sorted(experts)} are not 0..{num_experts - 1}")
            params = sorted(experts[0])
            if any(sorted(experts[k]) != params for k in experts):
                raise ValueError(f"{name}: experts do not all have the same parameters")
            parts = tuple(ExpertPart("module", tuple(experts[k][p] for k in range(num_experts)),
                                     shapes[experts[0][p]], num_experts) for p in params)
            routers = tuple(k for k in shapes if (m := _SWITCH_ROUTER.match(k)) and m["layer"] == name)
            for key in routers:
                if shapes[key][0] != num_experts:
                    raise ValueError(f"router {key} has {shapes[key][0]} rows for {num_experts} experts")
            module = f"{name}.router" if self.router_output == "switch" else f"{name}.router.classifier"
            specs.append(MoELayerSpec(name, num_experts, parts, routers, module, self.router_output))
        return tuple(specs)


@register_layout("switch")
class SwitchLayout(PerExpertModuleLayout):
    """transformers' Switch Transformers: hooks ``…mlp.router`` to see capacity-dropped tokens."""

    storage = "switch"
    router_output = "switch"


_FUSED = re.compile(r"^(?P<layer>.+)\.experts\.(?P<param>gate_up_proj|down_proj|gate_up_proj_bias|down_proj_bias)$")


@register_layout("fused")
class FusedExpertLayout(ExpertLayout):
    """Fused 3-D expert tensors: expert k is ``tensor[k]`` for every ``<layer>.experts.*`` tensor."""

    storage = "fused"

    def _parse(self, shapes: Mapping[str, torch.Size]) -> tuple[MoELayerSpec, ...]:
        found: dict[str, list[str]] = {}
        for key in shapes:
            if match := _FUSED.match(key):
                found.setdefault(match["layer"], []).append(key)
        specs = []
        for name, keys in found.items():
            num_experts = shapes[keys[0]][0]
            if any(shapes[k][0] != num_experts for k in keys):
                raise ValueError(f"{name}: fused expert tensors disagree on the number of experts")
            parts = tuple(ExpertPart("index", (k,), shapes[k], num_experts) for k in keys)
            specs.append(MoELayerSpec(name, num_experts, parts, self._router_keys(shapes, name),
                                      f"{name}.{self.router_attr}", "topk"))
        return tuple(specs)


_LORA = re.compile(r"^(?P<layer>.+?)\.experts(?P<wrapper>(\.base_layer)*)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)"
                   r"\.weight$")


@register_layout("lora")
class LoRAExpertLayout(ExpertLayout):
    """PEFT LoRA on fused experts (``LoraConfig(target_parameters=["experts.gate_up_proj", …])``).

    Aggregation works on each expert's *factor slices* (its r rows of A and r strided columns of B), not on
    ΔW = B·A: slices are what clients upload and what a per-expert weighted mean can combine without ever
    materialising ``E × out × in`` matrices; it is FedIT-style factor averaging, applied expert by expert. Editing
    expert k's slices leaves every other expert's factors bit-identical (tested).
    """

    storage = "lora"

    def _parse(self, shapes: Mapping[str, torch.Size]) -> tuple[MoELayerSpec, ...]:
        if not self.num_experts_hint:
            raise ValueError("the LoRA expert layout needs the number of experts (from the model config)")
        e = self.num_experts_hint
        found: dict[str, list[ExpertPart]] = {}
        for key in shapes:
            if match := _LORA.match(key):
                kind = "lora_a" if match["ab"] == "A" else "lora_b"
                found.setdefault(match["layer"], []).append(ExpertPart(kind, (key,), shapes[key], e))
        specs = []
        for name, parts in found.items():
            specs.append(MoELayerSpec(name, e, tuple(parts), self._router_keys(shapes, name),
                                      f"{name}.{self.router_attr}", "topk"))
        return tuple(specs)
