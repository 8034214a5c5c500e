"""Fault injection for the local deployments of ``tests/fl/test_deploy.py``: callbacks for ``deploy_local(during=)``.

Each returns a function of the running :class:`~fcmoe.fl.deploy.DeploymentHandle` that waits for its moment, then
kills or restarts processes through it.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from fcmoe.fl.deploy import DeploymentHandle, signal_group

log = logging.getLogger(__name__)

Fault = Callable[[DeploymentHandle], None]


def kill_when(pattern: str, everything: bool = False) -> Fault:
    """SIGKILL the last SuperNode (``everything``: the SuperLink, the ServerApp and every SuperNode, a crash of the
    whole deployment, whose status is then ``"killed"``) once a non-empty file matches the glob ``pattern``."""

    def fault(handle: DeploymentHandle) -> None:
        victims = list(handle.processes) if everything else handle.processes[-1:]
        deadline = time.monotonic() + handle.timeout_s
        while time.monotonic() < deadline:
            if any(Path(match).stat().st_size > 0 for match in glob.glob(pattern)):
                if everything:
                    handle.crashed.set()
                for process in victims:
                    signal_group(process, signal.SIGKILL)
                    log.warning("fault injection: killed %s", " ".join(map(str, process.args[:1])))
                return
            time.sleep(0.2)

    return fault


def restart_after_train(node: int, round_index: int) -> Fault:
    """Stop SuperNode ``node`` after its reply to its ``round_index``-th train message (that round's, when it
    trains every round), then start it again.

    Deterministic, from the SuperNodes' own logs: the ClientApp process of every other node's train message is
    frozen (SIGSTOP) as soon as it starts, so the server cannot finish the train phase and send ``node`` anything
    new, while those SuperNodes go on sending heartbeats; ``node`` is stopped once its log says its train reply
    was "Sent successfully" (the SuperLink has it), started again with its own key and node config, and the
    frozen ClientApps go on once it is connected again. So the restart falls between two of ``node``'s
    messages, with its trained state on disk only.

    SIGTERM, not SIGKILL: a SuperNode that stops deactivates itself at the SuperLink, while one killed outright
    stays "online" there until two heartbeat intervals (60 s) pass, and Flower 1.41 refuses to activate its key
    again before that (error 2004).
    """

    def fault(handle: DeploymentHandle) -> None:
        logs = handle.logs
        nodes = {i: handle.processes[1 + i] for i in range(len(handle.processes) - 1)}
        victim = f"supernode_{node}"
        others = [i for i in nodes if i != node]
        frozen: dict[int, psutil.Process] = {}
        deadline = time.monotonic() + handle.timeout_s
        try:
            while time.monotonic() < deadline and not (_train_reply_sent(logs[victim], round_index)
                                                       and len(frozen) == len(others)):
                for i in others:
                    if i not in frozen and _log_count(logs[f"supernode_{i}"],
                                                      "Receiving: train message") >= round_index:
                        app = _client_app_process(nodes[i])
                        if app is not None:
                            app.suspend()
                            frozen[i] = app
                time.sleep(0.1)
            old = nodes[node]
            signal_group(old, signal.SIGTERM)
            old.wait(timeout=30)
            connected = _log_count(logs[victim], "SuperNode ID")
            log.warning("fault injection: stopped SuperNode %d after its round-%d train reply; restarting it", node,
                        round_index)
            handle.start(victim, list(map(str, old.args)))
            while time.monotonic() < deadline and _log_count(logs[victim], "SuperNode ID") <= connected:
                time.sleep(0.2)
        finally:
            for app in frozen.values():
                with contextlib.suppress(psutil.NoSuchProcess):
                    app.resume()

    return fault


def _client_app_process(supernode: subprocess.Popen) -> psutil.Process | None:
    """The running ``flwr-clientapp`` process a SuperNode started, if there is one."""
    try:
        children = psutil.Process(supernode.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if child.status() != psutil.STATUS_ZOMBIE and any("flwr-clientapp" in a for a in child.cmdline()):
                return child
    return None


def _log_count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.is_file() else 0


def _train_reply_sent(path: Path, round_index: int) -> bool:
    """Whether the SuperNode log at ``path`` says its ``round_index``-th train reply reached the SuperLink."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    parts = text.split("Sending: train message")
    return len(parts) > round_index and "Sent successfully" in parts[round_index]
