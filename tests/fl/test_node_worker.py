"""The node's worker: a ClientApp that forwards to it gets the very reply it would compute itself, the second
message is answered by the same process without building the experiment again, a failure reaches the ClientApp
as one error, a killed worker is replaced, and the worker exits (and cleans up) with its SuperNode."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import tomli_w
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fcmoe.config import load_config
from fcmoe.experiment import Experiment, prepare_experiment
from fcmoe.fl import client_app, node_worker
from fcmoe.fl.codec import (
    Instruction,
    decode_evaluation,
    decode_identity,
    decode_update,
    encode_instruction,
    tree_to_record,
)
from fcmoe.fl.node_settings import NODE_STATE, STATE_DIR, WARM_WORKER, WORKER_IDLE_S
from tests.helpers import TINY

CONFIG = [*TINY, "train.threads=1"]  # the worker and this process: the same sums to the last bit


@pytest.fixture(scope="module")
def exp() -> Experiment:
    return prepare_experiment(load_config(overrides=CONFIG))


@pytest.fixture
def supernode(monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen]:
    """A stand-in SuperNode process: the worker's owner."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    owner = subprocess.Popen(["sleep", "600"])
    monkeypatch.setattr(node_worker, "supernode_pid", lambda: owner.pid)
    yield owner
    owner.kill()
    owner.wait()


def _message(exp: Experiment, kind: str, round_index: int) -> Message:
    config_text = tomli_w.dumps(exp.config.to_dict())
    instruction = Instruction(round_index, "fcmoe", config_text, state_key="run")
    content = encode_instruction(tree_to_record(exp.initial_state), instruction, evaluate=kind == "evaluate")
    return Message(content=content, dst_node_id=1, message_type=kind)


def _context(folder: Path, worker: bool, partition: int = 0) -> Context:
    node_config = {"partition-id": partition, STATE_DIR: str(folder), WARM_WORKER: worker, WORKER_IDLE_S: 600.0}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _wait_gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_a_forwarded_message_gets_the_reply_computed_in_process_from_one_warm_worker(
        tmp_path: Path, exp: Experiment, supernode: subprocess.Popen) -> None:
    worker_node, local_node = _context(tmp_path / "w", True), _context(tmp_path / "l", False)
    assert decode_identity(client_app.query(_message(exp, "query", 1), worker_node).content) == 0
    forwarded = decode_update(client_app.train(_message(exp, "train", 1), worker_node).content)
    local = decode_update(client_app.train(_message(exp, "train", 1), local_node).content)
    assert forwarded.delta.keys() == local.delta.keys()
    assert all(torch.equal(forwarded.delta[k], local.delta[k]) for k in local.delta)
    assert forwarded.num_samples == local.num_samples
    assert all(torch.equal(forwarded.routing_counts[k], v) for k, v in local.routing_counts.items())
    first = dict(worker_node.state[NODE_STATE])
    assert first["experiments-prepared"] == 1 and first["worker-pid"] != os.getpid()
    assert "worker-pid" not in local_node.state[NODE_STATE]  # computed here, no worker

    acc_forwarded = decode_evaluation(client_app.evaluate(_message(exp, "evaluate", 1), worker_node).content)
    acc_local = decode_evaluation(client_app.evaluate(_message(exp, "evaluate", 1), local_node).content)
    assert acc_forwarded == acc_local and not math.isnan(acc_local[1])
    second = dict(worker_node.state[NODE_STATE])
    assert second["worker-pid"] == first["worker-pid"] and second["experiments-prepared"] == 1  # warm
    rows = (tmp_path / "w" / "run" / "client-0" / "phases.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all('"worker"' in row and '"setup"' in row for row in rows)

    workers = tmp_path / "w" / "workers"
    assert len(list(workers.glob("*.sock"))) == 1 and oct(next(workers.glob("*.key")).stat().st_mode)[-3:] == "600"
    supernode.kill()  # the worker goes with its SuperNode, and takes its socket, key, lock and log with it
    assert _wait_gone(first["worker-pid"])
    assert list(workers.iterdir()) == []


def test_a_failure_is_one_error_and_a_killed_worker_is_replaced(tmp_path: Path, exp: Experiment,
                                                                 supernode: subprocess.Popen) -> None:
    with pytest.raises(node_worker.WorkerError, match=r"partition-id = 9: this experiment has clients 0\.\.3"):
        client_app.train(_message(exp, "train", 1), _context(tmp_path, True, partition=9))
    node = _context(tmp_path, True)
    client_app.train(_message(exp, "train", 1), node)
    first = node.state[NODE_STATE]["worker-pid"]  # the same worker that reported the failure goes on
    os.kill(first, signal.SIGKILL)  # its socket file stays behind
    assert _wait_gone(first)
    reply = client_app.train(_message(exp, "train", 2), node)
    assert node.state[NODE_STATE]["worker-pid"] != first and decode_update(reply.content).num_samples > 0
    logs = list((tmp_path / "workers").glob("*.log"))
    assert len(logs) == 1 and "partition-id = 9" in logs[0].read_text()  # kept: a message failed in it
    os.kill(node.state[NODE_STATE]["worker-pid"], signal.SIGTERM)  # a stop, not a kill: it cleans up
    assert _wait_gone(node.state[NODE_STATE]["worker-pid"])
    assert not list((tmp_path / "workers").glob("*.sock"))


def test_work_in_process_needs_no_worker(tmp_path: Path, exp: Experiment) -> None:
    """Flower's simulation (a long-lived ClientApp) answers in its own process: the default outside
    ``flwr-clientapp``."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    node = Context(run_id=1, node_id=1, node_config={"partition-id": 1, STATE_DIR: str(tmp_path)}, state=RecordDict(),
                   run_config={})
    client_app.train(_message(exp, "train", 1), node)
    assert not (tmp_path / "workers").exists() and "worker-pid" not in node.state[NODE_STATE]
