"""Records codec: fcmoe's trees, client updates, server messages and client state as Flower records.

The only place that knows how fcmoe objects travel in a Flower ``Message``:

- a tree ``{name: tensor}`` (model, Δ_i, residual) → one ``ArrayRecord`` (bfloat16 travels as int16 bits under
  ``<key>@bfloat16``, so every record is self-describing);
- a :class:`~fcmoe.algorithms.base.ClientUpdate` → ``"delta"`` arrays, ``"routing"`` arrays (layer → ``[E]``
  counts), ``"update"`` metrics (client id, n_i, loss);
- the server's per-client message (FC-MoE: one scalar per layer and expert) → ``"message"`` arrays;
- the private client state (residual, PFL-MoE head and gate, seed) → ``context.state``: one ``ArrayRecord`` per
  tree and a ``ConfigRecord`` ``"scalars"``.

Decoding never trusts the sender: :func:`decode_update` raises :class:`MalformedReply` naming what is wrong.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fcmoe.algorithms.base import ClientUpdate
from fcmoe.core import Tree, tree_num_bytes
from fcmoe.models.layout import ExpertLayout

DELTA, ROUTING, UPDATE, MESSAGE = "delta", "routing", "update", "message"
NORMS = "expert-norms"  # optional: MoE layer → [E] ‖Δ_{i,k}‖ as the client computed them
BF16_SUFFIX = "@bfloat16"  # array key suffix: int16 bits of a bfloat16 tensor
SPARSE = "sparse"  # update metric: the reply carries only the experts that saw a token
ABSENT = "absent"  # update metric: the client was not drawn this round (participation.fraction) and sent nothing
STATE_SCALARS = "scalars"
_TREE_PREFIX = "tree:"


class MalformedReply(ValueError):
    """A client reply that cannot be decoded into an update; the message says what is missing or wrong."""


def tree_to_record(tree: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord`` of the tensors (contiguous CPU copies), self-describing for bfloat16.

    NumPy has no bfloat16, so those tensors travel as their int16 bit patterns under ``<key>@bfloat16`` and are
    restored exactly by :func:`record_to_tree`: the global model of a bf16 run needs no side record.
    """
    arrays = {}
    for key, value in tree.items():
        value = value.detach().cpu().contiguous()
        if value.dtype == torch.bfloat16:
            arrays[key + BF16_SUFFIX] = value.view(torch.int16)
        else:
            arrays[key] = value
    return ArrayRecord(arrays)


def record_to_tree(record: ArrayRecord, copy: bool = True) -> Tree:
    """Inverse of :func:`tree_to_record`.

    ``copy=False`` returns read-only views of the record's bytes (the server's path: a 1 GB update is then read
    once, by the aggregation, instead of being copied twice by ``np.load`` first); never write into them.
    """
    tree = {}
    for key, array in record.items():
        value = _view(array)
        value = value.clone() if copy else value
        if key.endswith(BF16_SUFFIX):
            tree[key.removesuffix(BF16_SUFFIX)] = value.view(torch.bfloat16)
        else:
            tree[key] = value
    return tree


def _view(array: Any) -> torch.Tensor:
    """A tensor over an ``Array``'s ``.npy`` bytes without copying them (no pickled objects accepted)."""
    buffer = io.BytesIO(array.data)
    major, _ = np.lib.format.read_magic(buffer)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(buffer)
    if dtype.hasobject:
        raise ValueError("array of Python objects refused")
    count = int(np.prod(shape)) if shape else 1
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=buffer.tell())
    values = flat.reshape(shape, order="F" if fortran_order else "C")
    with warnings.catch_warnings():  # read-only by design: the bytes belong to the message
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values)


def encode_update(update: ClientUpdate, layout: ExpertLayout | None = None) -> RecordDict:
    """A train reply: Δ_i, routing counts, and (client id, n_i, metrics).

    A sparse update (``update.sparse``, which needs ``layout``) carries only the experts that saw a token, packed
    per MoE layer by :meth:`~fcmoe.models.layout.ExpertLayout.pack_experts`; the routing counts say which.
    """
    tree = dict(update.delta)
    if update.sparse:
        if layout is None:
            raise ValueError("a sparse update needs the expert layout to be packed")
        for layer in layout.layers:
            tree = layout.pack_experts(tree, layer, update.routing_counts[layer.name] > 0)
    delta = tree_to_record(tree)
    routing = ArrayRecord({layer: counts.to(torch.int64) for layer, counts in update.routing_counts.items()})
    metrics = MetricRecord({"client_id": update.client_id, "num-examples": update.num_samples,
                            SPARSE: int(update.sparse), **{k: float(v) for k, v in update.metrics.items()}})
    reply = RecordDict({DELTA: delta, ROUTING: routing, UPDATE: metrics})
    if update.expert_norms:
        reply[NORMS] = ArrayRecord({layer: norms.contiguous() for layer, norms in update.expert_norms.items()})
    return reply


def decode_update(content: RecordDict, layout: ExpertLayout | None = None) -> ClientUpdate:
    """A :class:`ClientUpdate` from a train reply (``layout`` unpacks an expert-sparse one).

    Raises
    ------
    MalformedReply
        A missing record or field, or a sample count that is not a positive integer.
    """
    for key, kind in ((DELTA, ArrayRecord), (ROUTING, ArrayRecord), (UPDATE, MetricRecord)):
        if not isinstance(content.get(key), kind):
            raise MalformedReply(f"reply has no {kind.__name__} {key!r} (has: {', '.join(content) or 'nothing'})")
    info = content[UPDATE]
    for field in ("client_id", "num-examples"):
        if field not in info:
            raise MalformedReply(f"reply metrics lack {field!r}")
    client_id, num_samples = info["client_id"], info["num-examples"]
    if not float(num_samples).is_integer() or num_samples < 1:
        raise MalformedReply(f"reply num-examples = {num_samples!r}: must be a positive integer")
    sparse = bool(info.get(SPARSE, False))
    try:
        delta = record_to_tree(content[DELTA], copy=False)  # read-only: aggregation only reads Δ_i
        routing = {k: v.to(torch.int64) for k, v in content[ROUTING].to_torch_state_dict().items()}
        norms = content[NORMS].to_torch_state_dict() if isinstance(content.get(NORMS), ArrayRecord) else {}
        sent = tree_num_bytes(delta)
        if sparse:
            if layout is None:
                raise ValueError("sparse reply but no expert layout to unpack it")
            for layer in layout.layers:
                if layer.name not in routing:
                    raise ValueError(f"sparse reply lacks the routing counts of {layer.name}")
                delta = layout.unpack_experts(delta, layer, routing[layer.name] > 0)
    except (TypeError, ValueError, IndexError) as err:
        raise MalformedReply(f"reply arrays cannot be read: {err}") from None
    metrics = {k: float(v) for k, v in info.items() if k not in ("client_id", "num-examples", SPARSE)}
    return ClientUpdate(int(client_id), delta, int(num_samples), routing, metrics, sparse,
                        sent if sparse else None, norms)


def encode_message(message: Mapping[str, torch.Tensor] | None) -> ArrayRecord:
    """The server's per-client message (empty when the algorithm sends none)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in (message or {}).items()})


def decode_message(record: ArrayRecord | None) -> dict[str, torch.Tensor] | None:
    if record is None or not len(record):
        return None
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def save_client_state(state: Mapping[str, Any], records: RecordDict) -> None:
    """Write an algorithm's private client state into ``context.state``: trees as arrays, the rest as config.

    Keys the state no longer has are removed, so a dropped residual does not come back.
    """
    scalars: dict[str, Any] = {}
    for key in [k for k in records if k.startswith(_TREE_PREFIX)]:
        if key[len(_TREE_PREFIX):] not in state:
            del records[key]
    for key, value in state.items():
        if isinstance(value, Mapping):
            records[_TREE_PREFIX + key] = tree_to_record(value)
        elif isinstance(value, (bool, int, float, str)):
            scalars[key] = value
        else:
            raise TypeError(f"client state {key!r} is a {type(value).__name__}; store trees or scalars")
    records[STATE_SCALARS] = ConfigRecord(scalars)


def load_client_state(records: RecordDict) -> dict[str, Any]:
    """Inverse of :func:`save_client_state`."""
    state: dict[str, Any] = dict(records[STATE_SCALARS]) if STATE_SCALARS in records else {}
    for key, record in records.items():
        if key.startswith(_TREE_PREFIX) and isinstance(record, ArrayRecord):
            state[key[len(_TREE_PREFIX):]] = record_to_tree(record)
    return state
