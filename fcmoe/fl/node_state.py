"""Node-local client state: a SuperNode keeps its client's private tensors on its own disk, never on the wire.

Flower's ``context.state`` travels with every message as one unchunked protobuf (2 GiB cap) and is lost when a
SuperNode restarts; FC-MoE's residual or PFL-MoE's head would ride along every round. Here each client's state
is a file per round on the node, under ``<state-dir>/<state key>/client-<id>/``:

- ``r<t>-train.safetensors``: the state after round t's local training, and the global model it trained from
  (θ_t, needed when the server's message arrives with the new model);
- ``r<t>.safetensors``: the state after round t's evaluation (the server's message applied).

``state-dir`` is the node config key of that name (``--node-config "partition-id=0 state-dir=/var/fcmoe"``),
else ``<fcmoe cache>/node-state``; the state key comes from the server (its run folder and method), so a
restarted SuperNode — or a resumed ServerApp — finds the same files. Round t's training starts from the newest
``r<s>.safetensors`` with s < t, not from a later one: a ServerApp resumed after round k repeats round k + 1 from
the state the first attempt started with. Every file is written atomically (temporary name, fsync, rename); the
files of rounds before the last two are deleted.

Beside the state, a node keeps what its ClientApp processes would otherwise rebuild for every message (Flower
starts one per message): the experiment's frozen features, under ``<state-dir>/warm/<config digest>/`` (node
config ``warm-cache = false`` turns it off; the :data:`WARM_KEEP` most recently used experiments are kept, older
ones deleted), and ``phases.jsonl`` in each client folder, one line per message with the seconds of its phases
(process start, imports, set-up, work, reply).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

from fcmoe.checkpoint import join_client_state, split_client_state, unshared
from fcmoe.core import Tree
from fcmoe.experiment import FEATURE_FILES
from fcmoe.files import atomic_write
from fcmoe.fl.node_settings import node_root

WARM_KEEP = 4  # experiments whose frozen features a node keeps (each the size of its pool's features)
_STATE, _TRAINED_FROM = "state/", "trained-from/"
_FILE = re.compile(r"r(\d+)(-train)?\.safetensors")


def use_warm_folder(root: Path, digest: str) -> Path:
    """``<root>/warm/<digest>``, marked as just used; of the others, all but the ``WARM_KEEP - 1`` used last are
    deleted (a process still reading one keeps its open files; one about to read it computes the features)."""
    folder = Path(root) / "warm" / digest
    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder)
    others = [p for p in folder.parent.iterdir() if p.is_dir() and p != folder]
    for old in sorted(others, key=_last_used, reverse=True)[WARM_KEEP - 1:]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


@contextlib.contextmanager
def one_featurises(folder: Path | None) -> Iterator[None]:
    """Around preparing an experiment whose features are cached in ``folder``: while the cache is incomplete,
    nodes on one machine take turns (``<folder>/.lock``), so the first featurises and writes it and the others
    read it, instead of every node featurising at once on the same cores. A complete cache needs no turn."""
    if folder is None or all((folder / name).is_file() for name in FEATURE_FILES):
        yield
        return
    with FileLock(folder / ".lock"):
        yield


def _last_used(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except FileNotFoundError:  # another node on this machine pruned it a moment ago
        return 0.0


def run_state_folder(root: Path, key: str) -> Path:
    """The folder under ``root`` that holds every client's state of the run ``key`` on this node."""
    return Path(root) / re.sub(r"[^A-Za-z0-9._-]", "_", key)


class NodeStateStore:
    """One client's state files on this node.

    Parameters
    ----------
    root
        The node's state folder.
    key
        The run's state key (from the server); anything but letters, digits, ``.``, ``_`` and ``-`` becomes ``_``.
    client_id
        The client (partition id) this node is.
    """

    def __init__(self, root: Path, key: str, client_id: int) -> None:
        self.folder = run_state_folder(root, key) / f"client-{client_id}"

    @classmethod
    def for_node(cls, node_config: Mapping[str, Any], key: str, client_id: int) -> NodeStateStore:
        """The store of the node whose node config is ``node_config``."""
        return cls(node_root(node_config), key, client_id)

    def record_phases(self, message: str, round_index: int, seconds: Mapping[str, float]) -> None:
        """Append one message's phase times to ``phases.jsonl`` beside the state files."""
        self.folder.mkdir(parents=True, exist_ok=True)
        row = {"message": message, "round": round_index, **{k: round(v, 4) for k, v in seconds.items()}}
        with open(self.folder / "phases.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def save_trained(self, round_index: int, state: Mapping[str, Any], trained_from: Tree) -> Path:
        """The state after round ``round_index``'s training, with the global model it trained from."""
        extra = {_TRAINED_FROM + k: v.detach().contiguous() for k, v in trained_from.items()}
        return self._write(f"r{round_index}-train.safetensors", state, extra)

    def save_done(self, round_index: int, state: Mapping[str, Any]) -> Path:
        """The state at the end of round ``round_index``; older rounds' files are then deleted, but for the newest
        one before it (a node left out of rounds keeps its last state in an older file, and a resumed ServerApp that
        repeats ``round_index`` starts the node from that one)."""
        path = self._write(f"r{round_index}.safetensors", state, {})
        before = [r for r, train in self._files().values() if not train and r < round_index]
        keep_from = min(round_index - 1, max(before, default=round_index - 1))
        for old, (round_of, _) in self._files().items():
            if round_of < keep_from:
                old.unlink(missing_ok=True)
        return path

    def load_before(self, round_index: int) -> dict[str, Any] | None:
        """The state at the end of the newest round before ``round_index``; ``None`` if there is none."""
        done = [(r, path) for path, (r, train) in self._files().items() if not train and r < round_index]
        return self._read(max(done)[1])[0] if done else None

    def load_trained(self, round_index: int) -> tuple[dict[str, Any], Tree] | None:
        """(state, global model it trained from) after round ``round_index``'s training; ``None`` if it did not."""
        path = self.folder / f"r{round_index}-train.safetensors"
        return self._read(path) if path.is_file() else None

    def _files(self) -> dict[Path, tuple[int, bool]]:
        """Every state file: path → (round, is a train file)."""
        if not self.folder.is_dir():
            return {}
        return {p: (int(m.group(1)), bool(m.group(2))) for p in self.folder.iterdir()
                if (m := _FILE.fullmatch(p.name))}

    def _write(self, name: str, state: Mapping[str, Any], extra: Mapping[str, Any]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        plain, tensors = split_client_state(state, _STATE)
        tensors.update(extra)
        path = self.folder / name
        atomic_write(path, lambda tmp: save_file(unshared(tensors), str(tmp), metadata={"scalars": json.dumps(plain)}))
        return path

    def _read(self, path: Path) -> tuple[dict[str, Any], Tree]:
        with safe_open(str(path), "pt") as fh:
            plain = json.loads((fh.metadata() or {}).get("scalars", "{}"))
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        trained_from = {k.removeprefix(_TRAINED_FROM): v for k, v in tensors.items() if k.startswith(_TRAINED_FROM)}
        return join_client_state(plain, tensors, _STATE), trained_from
