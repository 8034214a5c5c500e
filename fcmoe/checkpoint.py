"""Per-round checkpoints of both engines, so a killed run resumes to the same result.

After every round, ``<run>/checkpoint/`` receives (the Flower ServerApp writes no client states: those live on
the nodes, :mod:`fcmoe.fl.node_state`):

- ``state-r<round>.safetensors``: the global trainable tree (``global/<key>``), the server half's state
  (``server/<key>``: FedAdam's moments) and the torch RNG state;
- ``clients-r<round>.safetensors`` (in-process): the private tensors (``client<i>/<state key>/<key>``: FC-MoE
  residuals, PFL-MoE heads) of the clients that round drew or scored, the only states it changed; the others
  stay in the files of the rounds that last changed them (:mod:`fcmoe.sim.client_states`);
- ``progress.json``: method, round, each client's scalar state and clients file, the round's ``metrics.jsonl`` row,
  and the name of the state file above.

Both are written to a temporary name and renamed (atomic on POSIX), the state file first: a crash at any moment
leaves ``progress.json`` naming complete files, of this round or the one before. ``progress.json`` also
keeps the previous round's entry, and its files stay until the next round's are written: a file of the newest
round that was damaged afterwards (truncated by a full disk, a bad copy) is detected on reading and the run
continues from the round before, with a warning. The engine is deterministic on CPU (seeded per client and
round), so continuing from round t's checkpoint reproduces the uninterrupted run bit for bit (tested by SIGKILL
and ``fcmoe run --resume``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fcmoe.core import Tree
from fcmoe.errors import first_line
from fcmoe.files import atomic_write

PROGRESS = "progress.json"
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and how to continue."""


@dataclass
class Checkpoint:
    """Everything the round loop needs to continue after ``round``."""

    method: str
    round: int
    global_state: Tree
    client_states: list[dict[str, Any]]
    row: dict[str, Any]  # the metrics.jsonl row of ``round``
    server_state: Tree = field(default_factory=dict)  # Algorithm.server_state() after ``round``
    # in-process: the clients file holding each client's tensors (None: it has none), written by
    # :func:`write_client_states`, and ``client_states`` are their scalars only; None: the tensors are in the state
    # file (every client's, the Flower ServerApp's empty list, and checkpoints written before the clients files)
    client_files: list[str | None] | None = None


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` atomically into ``folder`` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"global/{k}": v.detach().contiguous() for k, v in checkpoint.global_state.items()}
    tensors.update({f"server/{k}": v.detach().contiguous() for k, v in checkpoint.server_state.items()})
    scalars: list[dict[str, Any]] = list(checkpoint.client_states)
    if checkpoint.client_files is None:
        scalars = []
        for cid, state in enumerate(checkpoint.client_states):
            plain, client_tensors = split_client_state(state, f"client{cid}/")
            tensors.update(client_tensors)
            scalars.append(plain)
    tensors["rng/torch"] = torch.get_rng_state()
    name = f"state-r{checkpoint.round}.safetensors"
    kept, aliases = deduplicated(tensors)
    atomic_write(folder / name, lambda tmp: save_file(kept, str(tmp)))
    progress = {"method": checkpoint.method, "round": checkpoint.round, "state": name, "clients": scalars,
                "row": checkpoint.row, "aliases": aliases}
    if checkpoint.client_files is not None:
        progress["client_files"] = checkpoint.client_files
    try:
        before = _read_progress(folder)
    except CheckpointError:  # a damaged progress.json is replaced, with no previous round to fall back to
        before = None
    if before and before["method"] == checkpoint.method and before["round"] < checkpoint.round:
        progress["previous"] = {k: v for k, v in before.items() if k != "previous"}
    atomic_write(folder / PROGRESS, lambda tmp: tmp.write_text(json.dumps(progress)))
    entries = [progress, progress.get("previous", {})]
    keep = {entry.get("state") for entry in entries} | {f for entry in entries for f in entry.get("client_files") or ()}
    for old in [*folder.glob("state-r*.safetensors"), *folder.glob("clients-r*.safetensors")]:
        if old.name not in keep:
            old.unlink()


def write_client_states(folder: Path, round_index: int, states: Mapping[int, Mapping[str, Any]]) -> tuple[
        str, dict[int, dict[str, Any]]]:
    """Write ``states`` (client id → state: the clients a round touched) to ``clients-r<round>.safetensors`` in
    ``folder``, atomically; return its name and each client's scalars (:func:`split_client_state`). A tensor
    several clients share (FC-MoE's round step) is written once (:func:`deduplicated`)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    plains = {}
    for cid, state in states.items():
        plains[cid], client_tensors = split_client_state(state, f"client{cid}/")
        tensors.update(client_tensors)
    kept, aliases = deduplicated(tensors)
    name = f"clients-r{round_index}.safetensors"
    atomic_write(folder / name, lambda tmp: save_file(kept, str(tmp), metadata={"aliases": json.dumps(aliases)}))
    return name, plains


def read_client_state(path: Path, cid: int, plain: Mapping[str, Any],
                      shared: MutableMapping[tuple[str, str], torch.Tensor] | None = None) -> dict[str, Any]:
    """Client ``cid``'s state from its scalars ``plain`` and its tensors in the clients file ``path``. ``shared``
    ((file, key) → tensor, e.g. a ``WeakValueDictionary``) returns a tensor already read for another client, so a
    tensor shared when written is one tensor again."""
    prefix = f"client{cid}/"
    try:
        with safe_open(str(path), "pt") as file:
            aliases = json.loads((file.metadata() or {}).get("aliases", "{}"))
            names = [k for k in (*file.keys(), *aliases) if k.startswith(prefix)]
            tensors = {}
            for key in names:
                stored = aliases.get(key, key)
                tensor = None if shared is None else shared.get((path.name, stored))
                if tensor is None:
                    tensor = file.get_tensor(stored)
                    if shared is not None:
                        shared[(path.name, stored)] = tensor
                tensors[key] = tensor
    except (OSError, SafetensorError, json.JSONDecodeError) as err:
        raise CheckpointError(_damaged(path, err)) from None
    return join_client_state(plain, tensors, prefix)


def load_checkpoint(folder: Path, method: str) -> Checkpoint | None:
    """The checkpoint of ``method`` in ``folder``; ``None`` if there is none, or it belongs to another method."""
    progress = _progress(folder)
    if progress is None or progress["method"] != method:
        return None
    try:
        tensors = load_file(str(folder / progress["state"]))
    except (OSError, SafetensorError) as err:  # checked by _progress, so only a file damaged since then
        raise CheckpointError(_damaged(folder / progress["state"], err)) from None
    torch.set_rng_state(tensors.pop("rng/torch"))
    tensors.update({key: tensors[kept] for key, kept in progress.get("aliases", {}).items()})  # one tensor again
    global_state = {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}
    server_state = {k.removeprefix("server/"): v for k, v in tensors.items() if k.startswith("server/")}
    files = progress.get("client_files")
    clients = (list(progress["clients"]) if files is not None else
               [join_client_state(plain, tensors, f"client{cid}/") for cid, plain in enumerate(progress["clients"])])
    return Checkpoint(method, int(progress["round"]), global_state, clients, progress["row"], server_state, files)


def checkpointed_round(folder: Path) -> tuple[str, int] | None:
    """(method, round) of the checkpoint in ``folder``, or ``None`` if it holds none."""
    progress = _progress(folder)
    return None if progress is None else (progress["method"], int(progress["round"]))


def _progress(folder: Path) -> dict[str, Any] | None:
    """The newest round of ``folder`` whose state file reads back whole (the round before it, with a warning, if
    that file is damaged); ``None`` if ``folder`` holds no checkpoint.

    Raises
    ------
    CheckpointError
        ``progress.json`` is not readable, or neither state file is.
    """
    progress = _read_progress(folder)
    if progress is None:
        return None
    problem = _entry_problem(folder, progress)
    if problem is None:
        return progress
    previous = progress.get("previous")
    if previous and _entry_problem(folder, previous) is None:
        log.warning("%s; continuing from round %d instead", _damaged(*problem), previous["round"])
        return previous
    raise CheckpointError(_damaged(*problem))


def _entry_problem(folder: Path, entry: Mapping[str, Any]) -> tuple[Path, Exception] | None:
    """The first file of a progress entry (its state file, then its clients files) that cannot be read, and why."""
    for name in [entry["state"], *sorted({f for f in entry.get("client_files") or () if f})]:
        problem = _unreadable(folder / name)
        if problem is not None:
            return folder / name, problem
    return None


def _read_progress(folder: Path) -> dict[str, Any] | None:
    path = folder / PROGRESS
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(_damaged(path, err)) from None
    if not isinstance(progress, dict) or not {"method", "round", "state"} <= progress.keys():
        raise CheckpointError(_damaged(path, ValueError("it lacks method, round or state")))
    return progress


def _unreadable(path: Path) -> Exception | None:
    """Why the safetensors file ``path`` cannot be read whole (its header promises more bytes than it has, …)."""
    try:
        with safe_open(str(path), "pt"):
            return None
    except (OSError, SafetensorError) as err:
        return err


def _damaged(path: Path, err: Exception) -> str:
    run_dir = path.parent.parent
    return (f"the checkpoint file {path} is damaged ({first_line(err)})"
            f"; delete {path.parent} to restart the interrupted method from round 1 (finished methods are kept), "
            f"then fcmoe run --resume {run_dir}")


def split_client_state(state: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A client's private state as (JSON-able scalars, tensors keyed ``<prefix><state key>/<name>``); the scalars'
    ``__trees__`` lists the tree-valued keys."""
    plain: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            tensors.update({f"{prefix}{key}/{name}": t.detach().contiguous() for name, t in value.items()})
            plain.setdefault("__trees__", []).append(key)
        elif isinstance(value, (bool, int, float, str)):
            plain[key] = value
        else:
            raise TypeError(f"client state {key!r} is a {type(value).__name__}; store trees or scalars")
    return plain, tensors


def join_client_state(plain: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """Inverse of :func:`split_client_state`."""
    state = {k: v for k, v in plain.items() if k != "__trees__"}
    for key in plain.get("__trees__", []):
        start = f"{prefix}{key}/"
        state[key] = {k.removeprefix(start): v for k, v in tensors.items() if k.startswith(start)}
    return state


def deduplicated(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(what to write, aliases): a tensor that is another's (the same memory, shape, strides and dtype: FC-MoE's
    round step in every residual of that round) is written once and its key maps to the key written; tensors that
    only overlap are cloned (:func:`unshared`)."""
    first: dict[tuple[Any, ...], str] = {}
    kept, aliases = {}, {}
    for key, tensor in tensors.items():
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and identity in first:
            aliases[key] = first[identity]
            continue
        first.setdefault(identity, key)
        kept[key] = tensor
    return unshared(kept), aliases


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every tensor that shares storage with an earlier one cloned (safetensors refuses them)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out
