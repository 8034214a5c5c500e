"""Every client's private state in the in-process engine, held in memory or in the run's checkpoint files.

A round touches the states of the clients it draws (training, the server's message) and of those it scores
(PFL-MoE fits its head and gate there); the others stand still. :meth:`ClientStates.checkpoint` writes the touched
states to ``clients-r<t>.safetensors`` beside the round's checkpoint, so a checkpoint costs what the round changed,
and each client's entry in ``progress.json`` names the file that holds its newest state.

With every client drawn every round (``participation.fraction = 1``, the default) every state stays in memory.
With a few clients of many drawn, a state is *resident* only from the moment the round touches it until the
round's checkpoint is written; between the rounds it takes part in it lives in its clients file and is read back
(only its own tensors) when it is drawn or scored. Between rounds, host memory then holds no client's tensors;
during a round, those of the clients it draws or scores — the participants, but every client in the last round
(and with ``eval.clients = "all"``), which also writes every state once. A tensor several clients of a round share
(FC-MoE's round step) is written once and read back as one tensor.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch

from fcmoe.checkpoint import Checkpoint, read_client_state, write_client_states


class ClientStates:
    """Client id → private state (a plain dict), with the touched states written at each checkpoint.

    Parameters
    ----------
    states
        Each client's state to start from (scalars only where ``files`` names a file for its tensors).
    files
        Each client's clients file in ``folder`` (``None``: its state is all in ``states``); ``None``: none yet.
    folder
        The checkpoint folder; ``None``: no checkpoints, every state stays in memory.
    resident
        Keep every state in memory between rounds (``participation.fraction = 1``).
    """

    def __init__(self, states: list[dict[str, Any]], files: list[str | None] | None = None,
                 folder: Path | None = None, resident: bool = True) -> None:
        self._plain = list(states)  # each client's scalars as of the last checkpoint
        self._files: list[str | None] = list(files) if files is not None else [None] * len(states)
        self._folder = folder
        self._resident = resident or folder is None
        self._loaded: dict[int, dict[str, Any]] = {}  # client id → its whole state, while in memory
        self._touched: set[int] = set()  # read since the last checkpoint: to be written with it
        if files is None:  # whole states (a fresh run, an older checkpoint): in memory until the first checkpoint
            self._loaded, self._touched = dict(enumerate(self._plain)), set(range(len(self._plain)))
        self._shared: weakref.WeakValueDictionary[tuple[str, str], torch.Tensor] = weakref.WeakValueDictionary()

    def __len__(self) -> int:
        return len(self._plain)

    def __getitem__(self, cid: int) -> dict[str, Any]:
        """Client ``cid``'s state, read back from its clients file if it is not in memory; it counts as changed."""
        state = self._loaded.get(cid)
        if state is None:
            file = self._files[cid]
            state = (dict(self._plain[cid]) if file is None or self._folder is None else  # scalars only
                     read_client_state(self._folder / file, cid, self._plain[cid], self._shared))
            self._loaded[cid] = state
        self._touched.add(cid)
        return state

    @property
    def in_memory(self) -> int:
        """How many clients' states are in memory now."""
        return len(self._loaded)

    def checkpoint(self, checkpoint: Checkpoint) -> Checkpoint:
        """``checkpoint`` (its client fields left empty) completed with the clients' scalars and files, once the
        states touched since the last one are written to ``clients-r<round>.safetensors``; with non-resident states,
        those are then let go from memory."""
        if self._folder is None:
            raise ValueError("ClientStates without a folder writes no checkpoint")
        touched = {cid: self._loaded[cid] for cid in sorted(self._touched)}
        if touched:
            name, plains = write_client_states(self._folder, checkpoint.round, touched)
            for cid, plain in plains.items():
                self._plain[cid] = plain
                self._files[cid] = name if plain.get("__trees__") else None
        self._touched.clear()
        if not self._resident:
            self._loaded.clear()
        checkpoint.client_states, checkpoint.client_files = list(self._plain), list(self._files)
        return checkpoint
