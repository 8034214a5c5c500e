"""A real local Flower deployment: TLS with a throw-away CA, SuperNode authentication, 2 SuperNodes, 2 rounds.

Slow (~80 s on 2 cores: each message starts a ClientApp process), but within `make test`'s budget, so it runs
there. It checks the run's real status (``flwr ls``) and that the deployed run equals the in-process engine.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fcmoe.cli import main
from fcmoe.config import load_config
from fcmoe.experiment import prepare_experiment
from fcmoe.fl.deploy import _register_node, make_certificates, make_node_keys
from fcmoe.sim.engine import run_method
from tests.fl.faults import kill_when, restart_after_train

TINY = ["model.name=tiny-bert-moe", "model.num_experts=4", "data.train_per_class=8", "data.test_per_class=3",
        "data.max_length=32", "partition.num_clients=2", "partition.min_partition_size=6", "rounds=2"]


def test_certificates_chain_to_the_ca(tmp_path: Path) -> None:
    from cryptography import x509

    ca_path, cert_path, _ = make_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    private, _ = make_node_keys(tmp_path, 0)
    assert {(tmp_path / "server.key").stat().st_mode & 0o777, private.stat().st_mode & 0o777} == {0o600}


def test_node_registration_waits_for_a_superlink_that_is_still_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its port can open before it serves: "unavailable" is retried, any other failure is returned at once."""
    monkeypatch.setattr("fcmoe.fl.waiting.time.sleep", lambda s: None)
    unavailable = subprocess.CompletedProcess([], 1, "Connection to the SuperLink is unavailable.", "")
    replies = [unavailable, unavailable, subprocess.CompletedProcess([], 0, "registered", "")]
    calls: list[tuple[str, ...]] = []
    result = _register_node(lambda *args: calls.append(args) or replies[len(calls) - 1], Path("node_0.pub"))
    assert result.returncode == 0 and len(calls) == 3 and calls[0][:2] == ("supernode", "register")
    refused = subprocess.CompletedProcess([], 1, "", "invalid public key")
    calls.clear()
    assert _register_node(lambda *args: calls.append(args) or refused, Path("node_0.pub")) is refused
    assert len(calls) == 1
    calls.clear()
    assert _register_node(lambda *args: calls.append(args) or unavailable, Path("k"), timeout_s=-1.0) is unavailable
    assert len(calls) == 1  # past the deadline: the last reply, whatever it says


@pytest.mark.slow
def test_tls_authenticated_deployment_completes_and_matches_in_process(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["deploy-local", "--method", "fcmoe", "--out", str(tmp_path / "runs"), "--port", "39300"]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0, capsys.readouterr()
    assert "status finished:completed" in capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["engine"], r["rejected"]) for r in rows] == [(1, "flower", []), (2, "flower", [])]
    exp = prepare_experiment(load_config(overrides=TINY))
    _, expected = run_method(exp, "fcmoe", tmp_path / "in-process.jsonl")
    deployed = load_file(str(run_dir / "model-fcmoe.safetensors"))
    assert max((deployed[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6


@pytest.mark.slow
def test_a_supernode_killed_after_round_1_does_not_stop_the_run(tmp_path: Path) -> None:
    """SIGKILL of SuperNode 1 once round 1's row is written: round 2 rejects its error reply and completes."""
    from fcmoe.fl.deploy import deploy_local

    out = tmp_path / "runs"
    run_config = f'overrides="{";".join(TINY)}" method="fcmoe" out-dir="{out}" round-timeout-s=300.0'
    result = deploy_local(Path(__file__).resolve().parents[2], 2, run_config, base_port=39400, timeout_s=600,
                          during=kill_when(str(out / "*" / "metrics.jsonl")))
    assert result.status == "finished:completed"
    (run_dir,) = out.iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rejected"] == [] and rows[0]["local_acc"][1] is not None
    assert len(rows[1]["rejected"]) == 1 and "error reply" in rows[1]["rejected"][0]
    assert rows[1]["local_acc"][1] is None and rows[1]["local_acc"][0] is not None  # client 1 is gone


@pytest.mark.slow
def test_a_killed_deployment_resumes_with_node_state_and_equals_in_process(tmp_path: Path) -> None:
    """SIGKILL of the whole deployment (SuperLink, ServerApp, both SuperNodes) once round 1 is checkpointed; a new
    deployment with --resume continues from round 2 on fresh SuperNodes, which find their clients' FC-MoE state on
    disk, and ends equal to the in-process run."""
    from fcmoe.fl.deploy import deploy_local

    out, app = tmp_path / "runs", Path(__file__).resolve().parents[2]
    overrides = [*TINY, "partition.num_clients=4", "partition.alpha=0.1", "rounds=3"]
    run_config = f'overrides="{";".join(overrides)}" method="fcmoe" out-dir="{out}" round-timeout-s=300.0'
    first = deploy_local(app, 4, run_config, base_port=39500, timeout_s=600,
                         during=kill_when(str(out / "*" / "checkpoint" / "progress.json"), everything=True))
    assert first.status == "killed"
    (run_dir,) = out.iterdir()
    assert not (run_dir / "model-fcmoe.safetensors").exists()
    assert main(["deploy-local", "--resume", str(run_dir), "--port", "39600"]) == 0
    assert_equals_in_process(run_dir, overrides, tmp_path)


@pytest.mark.slow
def test_a_supernode_restarted_mid_round_keeps_its_client_state_and_equals_in_process(tmp_path: Path) -> None:
    """SuperNode 3 is stopped (SIGTERM to its process group) right after its round-2 training reply and started
    again, with the SuperLink, the ServerApp and the other nodes up; the restarted node finds its trained state
    and the global model it trained from on its disk, applies the server's FC-MoE message to them, and the run
    ends equal to the in-process run, deployed residuals included."""
    from fcmoe.fl.deploy import deploy_local

    app = Path(__file__).resolve().parents[2]
    overrides = [*TINY, "partition.num_clients=4", "partition.alpha=0.1", "rounds=3"]
    for attempt in range(3):
        out, nodes = tmp_path / f"attempt{attempt}" / "runs", tmp_path / f"attempt{attempt}" / "nodes"
        run_config = f'overrides="{";".join(overrides)}" method="fcmoe" out-dir="{out}" round-timeout-s=300.0'
        result = deploy_local(app, 4, run_config, base_port=39700 + 50 * attempt, timeout_s=600,
                              during=restart_after_train(3, 2),
                              node_options=f"state-dir='{nodes}'")
        assert result.status == "finished:completed"
        assert result.logs["supernode_3"].read_text().count("SuperNode ID") == 2  # restarted, and connected again
        (run_dir,) = out.iterdir()
        rejected = [reason for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                    for reason in json.loads(line)["rejected"]]
        # Seen in 2 of 5 deployments on 2 cores: Flower declared a node whose ClientApp was frozen (never the restarted
        # one) "Node Unavailable" in round 2, though its reply went through; a fresh attempt then (3 at most)
        if not any("Node Unavailable" in reason for reason in rejected):
            break
    assert_equals_in_process(run_dir, overrides, tmp_path)


def assert_equals_in_process(run_dir: Path, overrides: list[str], tmp_path: Path) -> None:
    """The deployed FC-MoE run in ``run_dir`` has all 3 rounds, no rejection, the in-process run's final model
    (within 1e-6) and its clients' deployed accuracies θ + λ r_i, with residuals that were not all zero."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["rejected"] == [] for r in rows)
    exp = prepare_experiment(load_config(overrides=overrides))
    _, expected = run_method(exp, "fcmoe", tmp_path / "in-process.jsonl")
    deployed = load_file(str(run_dir / "model-fcmoe.safetensors"))
    assert max((deployed[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6
    reference = [json.loads(line) for line in (tmp_path / "in-process.jsonl").read_text().splitlines()]
    assert [r["local_acc"] for r in rows] == [r["local_acc"] for r in reference]
    assert any(v > 0 for r in reference[1:] for v in r["retention_ratio_per_layer"].values())
