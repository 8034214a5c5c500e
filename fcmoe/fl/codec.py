"""Records codec: fcmoe's trees, client updates, server messages and client state as Flower records.

The only place that knows how fcmoe objects travel in a Flower ``Message``:

- a tree ``{name: tensor}`` (model, Δ_i, residual) → one ``ArrayRecord`` (bfloat16 travels as int16 bits under
  ``<key>@bfloat16``, so every record is self-describing);
- a :class:`~fcmoe.algorithms.base.ClientUpdate` → ``"delta"`` arrays, ``"routing"`` arrays (layer → ``[E]``
  counts), ``"statistics"`` arrays (the algorithm's small per-client tensors, when it sends any), ``"update"``
  metrics (client id, n_i, loss);
- the server's per-client message (FC-MoE: one scalar per layer and expert) → ``"message"`` arrays;
- the private client state (residual, PFL-MoE head and gate, seed) never travels: it stays in files on the node
  (:mod:`fcmoe.fl.node_state`); ``context.state`` holds only ``"node-state"``, where they are;
- the server's instructions (:class:`Instruction`: round, method, experiment config, whether the client's update
  was aggregated, the run's key for node-local state), a client's identity (its partition id, asked once per
  node) and its local accuracy.

Every record, config and metric key fcmoe puts in a Flower message is defined here and nowhere else. Decoding
never trusts the sender: :func:`decode_update` raises :class:`MalformedReply` naming what is wrong.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fcmoe.algorithms.base import ClientUpdate
from fcmoe.core import Tree, tree_num_bytes
from fcmoe.models.layout import ExpertLayout

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"  # records of the server's instructions and eval replies
DELTA, ROUTING, UPDATE, MESSAGE, STATISTICS = "delta", "routing", "update", "message", "statistics"
CLIENT_ID, NUM_EXAMPLES, LOCAL_ACC = "client_id", "num-examples", "local_acc"  # metric keys
DEPLOYED_GLOBAL_ACC = "deployed_global_acc"  # evaluate reply, optional: the deployed model on the global test set
ROUND, METHOD, EXPERIMENT, TRAINED, SCORE = "server-round", "method", "fcmoe-config", "trained", "score"
VALID_UPDATES, REJECTED, LOCAL_ACC_MEAN, GLOBAL_ACC = "valid_updates", "rejected", "local_acc_mean", "global_acc"
STATE_KEY = "state-key"  # instruction: the run's key for node-local client state (run folder and method)
BF16_SUFFIX = "@bfloat16"  # array key suffix: int16 bits of a bfloat16 tensor
SPARSE = "sparse"  # update metric: the reply carries only the experts that saw a token
WHERE, DEVICE = "where", "device"  # train reply, optional: where the client trained ("cpu" or the GPU's name)


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


def encode_update(update: ClientUpdate, layout: ExpertLayout | None = None, device: str = "") -> RecordDict:
    """A train reply: Δ_i, routing counts, and (client id, n_i, metrics); with ``device``, where it trained.

    A sparse update (``update.sparse``, which needs ``layout``) carries only the experts that saw a token, packed
    per MoE layer by :meth:`~fcmoe.models.layout.ExpertLayout.pack_experts`; the routing counts say which.
    """
    tree = dict(update.delta)
    if update.sparse:
        if layout is None:
            raise ValueError("a sparse update needs the expert layout to be packed")
        for layer in layout.layers:
            if layout.holds_experts(tree, layer):  # a local-experts upload holds no expert
                tree = layout.pack_experts(tree, layer, update.routing_counts[layer.name] > 0)
    delta = tree_to_record(tree)
    routing = ArrayRecord({layer: counts.to(torch.int64) for layer, counts in update.routing_counts.items()})
    metrics = MetricRecord({CLIENT_ID: update.client_id, NUM_EXAMPLES: update.num_samples,
                            SPARSE: int(update.sparse), **{k: float(v) for k, v in update.metrics.items()}})
    records = {DELTA: delta, ROUTING: routing, UPDATE: metrics}
    if update.statistics:
        records[STATISTICS] = tree_to_record(update.statistics)
    if device:
        records[WHERE] = ConfigRecord({DEVICE: device})
    return RecordDict(records)


def decode_device(content: RecordDict) -> str:
    """Where a train reply's client trained ("" when it does not say)."""
    where = content.get(WHERE)
    return str(where.get(DEVICE, "")) if isinstance(where, ConfigRecord) else ""


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
    for field in (CLIENT_ID, NUM_EXAMPLES):
        if field not in info:
            raise MalformedReply(f"reply metrics lack {field!r}")
    client_id, num_samples = info[CLIENT_ID], info[NUM_EXAMPLES]
    if not float(num_samples).is_integer() or num_samples < 1:
        raise MalformedReply(f"reply {NUM_EXAMPLES} = {num_samples!r}: must be a positive integer")
    sparse = bool(info.get(SPARSE, False))
    try:
        delta = record_to_tree(content[DELTA], copy=False)  # read-only: aggregation only reads Δ_i
        routing = {k: v.to(torch.int64) for k, v in content[ROUTING].to_torch_state_dict().items()}
        sent = tree_num_bytes(delta)
        if sparse:
            if layout is None:
                raise ValueError("sparse reply but no expert layout to unpack it")
            for layer in layout.layers:
                if layer.name not in routing:
                    raise ValueError(f"sparse reply lacks the routing counts of {layer.name}")
                if layout.holds_experts(delta, layer):  # a local-experts upload holds no expert
                    delta = layout.unpack_experts(delta, layer, routing[layer.name] > 0)
        statistics = record_to_tree(content[STATISTICS]) if isinstance(content.get(STATISTICS), ArrayRecord) else {}
    except (TypeError, ValueError, IndexError) as err:
        raise MalformedReply(f"reply arrays cannot be read: {err}") from None
    metrics = {k: float(v) for k, v in info.items() if k not in (CLIENT_ID, NUM_EXAMPLES, SPARSE)}
    return ClientUpdate(int(client_id), delta, int(num_samples), routing, metrics, sparse, sent if sparse else None,
                        statistics)


@dataclass(frozen=True)
class RunSettings:
    """The run config of the fcmoe Flower app (``flwr run --run-config``; defaults in ``pyproject.toml``'s
    ``[tool.flwr.app.config]``)."""

    config_file: str = ""  # an experiment TOML; empty = the embedded default
    overrides: tuple[str, ...] = ()  # ``key=value`` settings on top of it
    method: str = ""  # empty = the config's first method
    out_dir: str = ""  # empty = the config's out_dir
    round_timeout_s: float = 3600.0  # a node that died mid-round is waited for this long
    resume_dir: str = ""  # a run folder to continue from its checkpoint (its config.toml is the experiment)

    def to_run_config(self) -> str:
        """The ``--run-config`` string of these settings."""
        return (f'config-file="{self.config_file}" overrides="{";".join(self.overrides)}" method="{self.method}" '
                f'out-dir="{self.out_dir}" resume-dir="{self.resume_dir}" '
                f'round-timeout-s={float(self.round_timeout_s)}')

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """The settings a ServerApp was started with (missing keys take the defaults)."""
        overrides = str(run_config.get("overrides", "")).split(";")
        return cls(str(run_config.get("config-file", "")), tuple(o.strip() for o in overrides if o.strip()),
                   str(run_config.get("method", "")), str(run_config.get("out-dir", "")),
                   float(run_config.get("round-timeout-s", cls.round_timeout_s)), str(run_config.get("resume-dir", "")))


@dataclass(frozen=True)
class Instruction:
    """What the server tells a client with every train and evaluate message besides the arrays."""

    server_round: int
    method: str  # the method label clients build their half from ("fcmoe/no-projection" for a variant)
    experiment: str  # the resolved experiment config as TOML: clients build the same experiment from it
    trained: bool = True  # evaluate: this client's update was aggregated, so it applies its message
    score: bool = True  # evaluate: score the deployed model this round (``eval.every``)
    state_key: str = ""  # where a node keeps this run's client state (:mod:`fcmoe.fl.node_state`); "" = by run id


def encode_instruction(arrays: ArrayRecord, instruction: Instruction,
                       message: Mapping[str, torch.Tensor] | None = None, evaluate: bool = False) -> RecordDict:
    """A train (or, with ``evaluate``, an evaluate) message's content: the global arrays, the instruction and,
    for evaluation, the client's own message from the server."""
    config = ConfigRecord({ROUND: instruction.server_round, METHOD: instruction.method,
                           EXPERIMENT: instruction.experiment, TRAINED: instruction.trained, SCORE: instruction.score,
                           STATE_KEY: instruction.state_key})
    content = RecordDict({ARRAYS: arrays, CONFIG: config})
    if evaluate:
        content[MESSAGE] = encode_message(message if instruction.trained else None)
    return content


def decode_instruction(content: RecordDict) -> Instruction:
    """Inverse of :func:`encode_instruction` (the arrays stay in ``content[ARRAYS]``)."""
    config = content[CONFIG]
    return Instruction(int(config[ROUND]), str(config[METHOD]), str(config[EXPERIMENT]), bool(config[TRAINED]),
                       bool(config[SCORE]), str(config.get(STATE_KEY, "")))


def encode_identity(client_id: int) -> RecordDict:
    """A query reply: which client this node is."""
    return RecordDict({METRICS: MetricRecord({CLIENT_ID: client_id})})


def decode_identity(content: RecordDict) -> int:
    """The client id of a query reply; :class:`MalformedReply` if it has none."""
    metrics = content.get(METRICS)
    if not isinstance(metrics, MetricRecord) or CLIENT_ID not in metrics:
        raise MalformedReply("query reply has no client id")
    return int(metrics[CLIENT_ID])


def encode_evaluation(client_id: int, local_acc: float, num_examples: int,
                      deployed_global_acc: float | None = None) -> RecordDict:
    """An evaluate reply: the client's local accuracy on its own test split (NaN: not scored this round), and its
    deployed model's accuracy on the global test set when measured (PFL-MoE's final round)."""
    metrics = {CLIENT_ID: client_id, LOCAL_ACC: local_acc, NUM_EXAMPLES: num_examples}
    if deployed_global_acc is not None:
        metrics[DEPLOYED_GLOBAL_ACC] = deployed_global_acc
    return RecordDict({METRICS: MetricRecord(metrics)})


def deployed_global_of(content: RecordDict) -> float | None:
    """The optional deployed-model global accuracy of an evaluate reply."""
    metrics = content.get(METRICS)
    value = metrics.get(DEPLOYED_GLOBAL_ACC) if isinstance(metrics, MetricRecord) else None
    return None if value is None else float(value)


def decode_evaluation(content: RecordDict) -> tuple[int, float]:
    """(client id, local accuracy) of an evaluate reply; :class:`MalformedReply` if either is missing."""
    metrics = content.get(METRICS)
    if not isinstance(metrics, MetricRecord) or CLIENT_ID not in metrics or LOCAL_ACC not in metrics:
        raise MalformedReply("evaluation reply has no client id or local accuracy")
    return int(metrics[CLIENT_ID]), float(metrics[LOCAL_ACC])


def round_counts(valid_updates: int, rejected: int) -> MetricRecord:
    """The train phase's metrics a strategy returns to Flower's loop."""
    return MetricRecord({VALID_UPDATES: valid_updates, REJECTED: rejected})


def mean_local_accuracy(accuracies: list[float]) -> MetricRecord | None:
    """The evaluate phase's metrics a strategy returns to Flower's loop (``None`` when nobody reported)."""
    return MetricRecord({LOCAL_ACC_MEAN: sum(accuracies) / len(accuracies)}) if accuracies else None


def global_accuracy_record(global_acc: float) -> MetricRecord:
    """The server-side evaluation's metrics for Flower's loop."""
    return MetricRecord({GLOBAL_ACC: global_acc})


def encode_message(message: Mapping[str, torch.Tensor] | None) -> ArrayRecord:
    """The server's per-client message (empty when the algorithm sends none)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in (message or {}).items()})


def decode_message(record: ArrayRecord | None) -> dict[str, torch.Tensor] | None:
    """A server message as tensors (copies), or None when there is none."""
    if record is None or not len(record):
        return None
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}
