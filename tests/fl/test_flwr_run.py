"""``flwr run .`` from the repository root: Flower builds the app bundle, starts a local SuperLink, runs FC-MoE.

``flwr run --stream`` exits 0 even when the ServerApp fails, so the run's status is read from
``flwr ls --format json``. The local SuperLink outlives the command: it is stopped by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERRIDES = ";".join(["model.name=tiny-bert-moe", "model.num_experts=4", "data.train_per_class=8",
                      "data.test_per_class=3", "data.max_length=32", "partition.num_clients=2",
                      "partition.min_partition_size=6", "rounds=2"])


def _stop_processes_mentioning(marker: str) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.mark.slow  # a whole `flwr run` stack (SuperLink, SuperExec, Ray): multi-process, in make test-slow
def test_flwr_run_from_the_repo_root_completes(tmp_path: Path) -> None:
    home, out = tmp_path / "flwr-home", tmp_path / "runs"
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    run_config = f'overrides="{OVERRIDES}" method="fcmoe" out-dir="{out}"'
    try:
        run = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "--stream", "--run-config", run_config,
                              "--federation-config", "num-supernodes=2"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        listing = subprocess.run([str(BIN / "flwr"), "ls", "--format", "json"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)
    finally:
        _stop_processes_mentioning(str(home))
    runs = json.loads(listing.stdout)["runs"]
    assert len(runs) == 1 and runs[0]["status"] == "finished:completed", (runs, run.stdout[-3000:])
    (run_dir,) = out.iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"], r["engine"]) for r in rows] == [("fcmoe", 1, "flower"), ("fcmoe", 2, "flower")]
    assert (run_dir / "model-fcmoe.safetensors").stat().st_size > 0
