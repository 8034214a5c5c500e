"""A round's client updates within the server's memory budget: the ones beyond it wait on disk.

``server.memory_budget`` bounds the bytes of Δ_i a server holds in one round. :class:`UpdateInbox` keeps each
update as it arrives unless it would take the updates held past the budget; such an update is written to a
safetensors file in the round's spill folder at once, and its Δ_i becomes a :class:`SpilledTree`: a read-only
mapping that reads a tensor from its file when asked and keeps nothing. The aggregation code is unchanged: it reads
Δ_i key by key (FedAvg, the shared and router parameters of every method) or one expert unit at a time (FC-MoE's
importance weights and projection, robust means, pairwise projection: :meth:`SpilledTree.rows` reads only that
expert's bytes of a fused tensor), so its working set is one key, or one expert, of every client. The values read
back are the values written: results are bit-identical to holding every update in memory. Not bounded:
``robust.clip > 0``, whose clipped updates are new trees in memory (a warning says so).

A spill that fails (a full disk) raises the ``OSError`` before the round aggregates anything; the checkpoint of
the round before stands, and the command says how to resume.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fcmoe.algorithms import ClientUpdate
from fcmoe.core import tree_num_bytes
from fcmoe.errors import first_line

log = logging.getLogger(__name__)


class SpilledTree(Mapping[str, torch.Tensor]):
    """A client's Δ_i in a safetensors file: ``tree[key]`` reads that tensor (a fresh copy each time)."""

    def __init__(self, path: Path, keys: list[str]) -> None:
        self.path = path
        self._keys = keys

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(str(self.path), "pt") as file:
            return file.get_tensor(key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor ``key`` (its first dimension), reading only their bytes."""
        with safe_open(str(self.path), "pt") as file:
            return file.get_slice(key)[start:stop]

    def __contains__(self, key: object) -> bool:  # by name: Mapping's own would read the tensor
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class UpdateInbox:
    """One round's arrived updates: in memory up to ``budget`` bytes of Δ_i, the rest spilled to ``folder``.

    Parameters
    ----------
    budget
        Bytes of Δ_i held in memory (``None``: no limit, nothing is written).
    folder
        Where spilled updates are written (created when the first one is, removed by :meth:`close`; ``None``: a
        temporary folder).
    """

    def __init__(self, budget: int | None, folder: Path | None = None) -> None:
        self.budget = budget
        self.folder = folder or Path(tempfile.gettempdir()) / f"fcmoe-spill-{os.getpid()}-{id(self):x}"
        self.updates: list[ClientUpdate] = []
        self.held_bytes = 0  # Δ_i bytes in memory
        self.spilled = 0  # updates written to disk

    def add(self, update: ClientUpdate) -> None:
        """Take ``update`` as it arrives: kept, or written to disk first when it would pass the budget."""
        size = tree_num_bytes(update.delta)
        update = dataclasses.replace(update, upload_bytes=size if update.upload_bytes is None else update.upload_bytes)
        if self.budget is None or self.held_bytes + size <= self.budget:
            self.held_bytes += size
            self.updates.append(update)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"client{update.client_id}-{len(self.updates)}.safetensors"
        tensors = {k: v.detach().contiguous() for k, v in update.delta.items()}
        try:
            save_file(tensors, str(path))
        except (OSError, SafetensorError) as err:  # a full disk: the round stops before aggregating anything
            path.unlink(missing_ok=True)
            code = getattr(err, "errno", None) or (errno.ENOSPC if "No space left" in str(err) else errno.EIO)
            raise OSError(code, f"spilling client {update.client_id}'s update: {first_line(err)}", str(path)) from None
        self.spilled += 1
        self.updates.append(dataclasses.replace(update, delta=SpilledTree(path, list(tensors))))

    def close(self) -> None:
        """Delete the spilled files (the round is aggregated, or abandoned)."""
        if self.spilled:
            log.info("%d of %d updates were spilled to %s (server.memory_budget)", self.spilled,
                     len(self.updates), self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> UpdateInbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
