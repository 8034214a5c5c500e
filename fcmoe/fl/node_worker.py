"""The node's worker: one long-lived process per SuperNode that does the ClientApp's work.

Flower starts a new ClientApp process for every message (flwr #3670). Warm caches on disk spare such a process
the featurising, not its imports (torch, transformers) and the rebuild of the experiment, which were most of a
deployed message. So the ClientApp process forwards each message's content to this worker — started by the first
message a SuperNode gets, alive as long as that SuperNode — which keeps the prepared experiment in memory and
answers with :func:`fcmoe.fl.client_work.handle`, the same function the ClientApp would run itself.

Transport: a Unix socket (``multiprocessing.connection``, HMAC challenge with a 32-byte key the starter wrote
with mode 0600) under ``<state-dir>/workers/``; a message's content and its reply cross it as Flower's own
protobuf serialisation, so nothing is unpickled. The socket's name is a digest of fcmoe's version, the code's
folder (a new app version from ``flwr run`` gets a new worker) and the SuperNode's process (pid and start time,
so a restarted SuperNode gets a new worker). The worker exits when its SuperNode does, after ``worker-idle-s``
without a message, or on SIGTERM (once the message in hand is answered). Every handler is idempotent
(state is read from and written to the node's disk per round), so a message whose worker vanished is sent once
more to a fresh worker.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

import fcmoe
from fcmoe.files import write_private
from fcmoe.fl.node_settings import node_root, worker_idle_s
from fcmoe.fl.waiting import poll
from fcmoe.process_memory import release_freed_memory

log = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # generous: with many SuperNodes sharing a few cores, imports alone take a minute
_SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 108 bytes on Linux, 104 on macOS


class WorkerError(RuntimeError):
    """The worker could not answer a message; the text is its error."""


@dataclass(frozen=True)
class WorkerAddress:
    """Where the worker of one SuperNode process listens, and its key, start lock and log."""

    socket: Path
    key: Path
    lock: Path
    log: Path

    @classmethod
    def of(cls, node_config: Mapping[str, Any], owner_pid: int) -> WorkerAddress:
        """The worker of the SuperNode process ``owner_pid`` whose node config is ``node_config``."""
        owner = psutil.Process(owner_pid)
        code = Path(fcmoe.__file__).resolve().parent
        name = hashlib.sha256(f"{fcmoe.__version__}\n{code}\n{owner_pid}\n{owner.create_time()}".encode())
        digest = name.hexdigest()[:16]
        folder = node_root(node_config) / "workers"
        socket = folder / f"{digest}.sock"
        if len(str(socket)) > _SOCKET_PATH_MAX:
            socket = Path(tempfile.gettempdir()) / f"fcmoe-worker-{digest}.sock"
        return cls(socket, folder / f"{digest}.key", folder / f"{digest}.lock", folder / f"{digest}.log")


def supernode_pid() -> int:
    """The SuperNode that started this ClientApp process: the worker's owner."""
    return os.getppid()


def to_bytes(content: RecordDict) -> bytes:
    """A message's content as Flower's protobuf bytes."""
    return recorddict_to_proto(content).SerializeToString()


def from_bytes(data: bytes) -> RecordDict:
    """Inverse of :func:`to_bytes`."""
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def forward(kind: str, content: RecordDict, node_config: Mapping[str, Any], run_id: int,
            phases: dict[str, float], owner_pid: int | None = None) -> tuple[RecordDict, dict[str, Any] | None]:
    """Have the node's worker answer a message (starting the worker if there is none): what
    :func:`fcmoe.fl.client_work.handle` returns. ``owner_pid`` is the SuperNode (default: :func:`supernode_pid`);
    ``phases`` gets ``worker``, the seconds spent reaching the worker (its start and imports on a node's first
    message)."""
    started = time.perf_counter()
    owner = supernode_pid() if owner_pid is None else owner_pid
    address = WorkerAddress.of(node_config, owner)
    attempts_left = 2
    while True:
        conn = _connect_or_start(address, node_config, owner)
        phases["worker"] = time.perf_counter() - started
        request = {"kind": kind, "node_config": dict(node_config), "run_id": run_id, "phases": phases}
        try:
            with conn:
                conn.send_bytes(json.dumps(request).encode())
                conn.send_bytes(to_bytes(content))  # not kept: a model's size less while the worker works
                header = json.loads(conn.recv_bytes())
                if not header["ok"]:
                    raise WorkerError(f"the node's worker failed: {header['error']} (its log: {address.log})")
                reply = from_bytes(conn.recv_bytes())
        except (EOFError, ConnectionError) as err:
            attempts_left -= 1
            if not attempts_left:
                raise WorkerError(f"the node's worker stopped mid-message twice ({err!r}); its log: "
                                  f"{address.log}") from err
            log.warning("the node's worker stopped mid-message (%r); sending it again to a new worker", err)
            continue
        node_state = header.get("node_state")
        return reply, None if node_state is None else {**node_state, "worker-pid": header["pid"],
                                                       "experiments-prepared": header["prepared"]}


def _try_connect(address: WorkerAddress) -> Connection | None:
    try:
        return Client(str(address.socket), family="AF_UNIX", authkey=address.key.read_bytes())
    except (OSError, EOFError, AuthenticationError):  # none listening, a stale socket, or another worker's
        return None


def _connect_or_start(address: WorkerAddress, node_config: Mapping[str, Any], owner_pid: int) -> Connection:
    conn = _try_connect(address)
    if conn is not None:
        return conn
    address.lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(address.lock):  # one starter per node: two messages at once start one worker
        conn = _try_connect(address)
        if conn is not None:
            return conn
        address.socket.unlink(missing_ok=True)  # a worker killed outright leaves its socket file
        write_private(address.key, secrets.token_bytes(32))
        code_root = str(Path(fcmoe.__file__).resolve().parents[1])  # the app Flower installed, not another fcmoe
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")]))}
        with open(address.log, "ab") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "fcmoe.fl.node_worker", str(address.socket), str(address.key),
                 str(address.lock), str(address.log), str(owner_pid), str(worker_idle_s(node_config))],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)  # outlives this ClientApp process and its process group
        def serving() -> Connection | None:
            if worker.poll() is not None:
                tail = address.log.read_text(errors="replace")[-600:]
                raise WorkerError(f"the node's worker exited with code {worker.returncode} before serving: {tail}")
            return _try_connect(address)

        conn = poll(serving, lambda found: found is not None, START_TIMEOUT_S, 0.1)
        if conn is None:
            worker.kill()
            raise WorkerError(f"the node's worker did not listen within {START_TIMEOUT_S:.0f} s; see {address.log}")
        return conn


class _Watch:
    """When the worker exits: at once when its SuperNode is gone (its answer could reach no one, and the state
    files are written atomically); once the message in hand is answered when told to stop (SIGTERM); after
    ``idle_s`` without a message."""

    def __init__(self, owner: psutil.Process, idle_s: float) -> None:
        self.owner, self.idle_s = owner, idle_s
        self.lock = threading.Lock()
        self.busy, self.stopping, self.failures, self.last = False, False, 0, time.monotonic()

    def reason_to_exit(self) -> str | None:
        if not self._owner_alive():
            return "its SuperNode is gone"
        if self.busy:
            return None
        if self.stopping:
            return "SIGTERM"
        return "idle" if time.monotonic() - self.last > self.idle_s else None

    def _owner_alive(self) -> bool:
        try:  # a SuperNode that died but was not reaped yet is a zombie: gone too
            return self.owner.is_running() and self.owner.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    @contextlib.contextmanager
    def serving(self):  # noqa: ANN202 - a context manager
        with self.lock:
            self.busy = True
        try:
            yield
        finally:
            with self.lock:
                self.busy, self.last = False, time.monotonic()


def serve(address: WorkerAddress, owner_pid: int, idle_s: float) -> None:
    """The worker's loop: answer one connection at a time until :class:`_Watch` gives a reason to exit."""
    from fcmoe.fl import client_work  # the experiment's imports, once per worker

    watch = _Watch(psutil.Process(owner_pid), idle_s)

    def watcher() -> None:
        while True:
            time.sleep(0.2)
            with watch.lock:
                reason = watch.reason_to_exit()
                if reason:
                    log.info("exiting: %s", reason)
                    kept = [address.log] if watch.failures else []  # a log worth reading stays
                    for path in {address.socket, address.key, address.lock, address.log} - set(kept):
                        path.unlink(missing_ok=True)
                    os._exit(0)  # the main thread's accept() would otherwise block the exit

    def stop(*_: object) -> None:
        watch.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    listener = Listener(str(address.socket), family="AF_UNIX", authkey=address.key.read_bytes())
    threading.Thread(target=watcher, daemon=True).start()
    log.info("worker %d serving SuperNode %d on %s", os.getpid(), owner_pid, address.socket)
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError) as err:
            log.warning("refused a connection: %r", err)
            continue
        with watch.serving(), conn:
            try:
                if not _answer(conn, client_work):
                    watch.failures += 1
            except (EOFError, OSError) as err:
                log.warning("the ClientApp went away mid-message: %r", err)
            release_freed_memory()  # a message's temporaries, kept by glibc, would stay with the worker for good


def _answer(conn: Connection, client_work: Any) -> bool:  # noqa: ANN401 - the module imported in serve
    """Answer one message; whether it succeeded."""
    request = json.loads(conn.recv_bytes())
    content = from_bytes(conn.recv_bytes())
    try:
        reply, node_state = client_work.handle(request["kind"], content, request["node_config"], request["run_id"],
                                               request["phases"])
    except Exception as err:  # the ClientApp reports it to Flower as this message's failure
        log.exception("message %s failed", request.get("kind"))
        conn.send_bytes(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}).encode())
        return False
    conn.send_bytes(json.dumps({"ok": True, "node_state": node_state, "pid": os.getpid(),
                                "prepared": client_work.experiments_prepared()}).encode())
    conn.send_bytes(to_bytes(reply))
    return True


def main() -> None:
    """Run the worker on the socket, key, lock and log the ClientApp passes."""
    parser = argparse.ArgumentParser(description="fcmoe's node-resident worker (started by the ClientApp)")
    for name in ("socket", "key", "lock", "log"):
        parser.add_argument(name, type=Path)
    parser.add_argument("owner_pid", type=int)
    parser.add_argument("idle_s", type=float)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        serve(WorkerAddress(args.socket, args.key, args.lock, args.log), args.owner_pid, args.idle_s)
    except psutil.NoSuchProcess:
        log.info("the SuperNode exited before its worker started")


if __name__ == "__main__":
    main()
