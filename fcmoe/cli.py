"""Command line: ``fcmoe run [--config FILE] [--set key=value …] [--methods a,b] [--out DIR]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from fcmoe.config import ConfigError, load_config

log = logging.getLogger("fcmoe")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcmoe", description="Federated fine-tuning of MoE models with FC-MoE.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every method of an experiment and print the comparison table")
    run.add_argument("--config", help="experiment TOML (default: the embedded offline benchmark)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set partition.alpha=0.5 (repeatable)")
    run.add_argument("--methods", help="comma-separated subset/order of methods, e.g. fedavg,fcmoe")
    run.add_argument("--out", help="parent folder of the run folder (default: config out_dir, 'runs')")
    run.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    overrides = list(args.set)
    if args.methods:
        overrides.append("methods=[" + ",".join(f'"{m.strip()}"' for m in args.methods.split(",")) + "]")
    if args.out:
        overrides.append(f"out_dir={args.out!r}".replace("'", '"'))
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"fcmoe: config error: {err}", file=sys.stderr)
        return 2
    return _run(config, show_progress=not args.quiet)


def _run(config: object, show_progress: bool) -> int:
    from fcmoe.data.assets import AssetError
    from fcmoe.report.table import print_summary
    from fcmoe.sim.run import new_run_dir, run_experiment

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    run_dir = new_run_dir(config.out_dir)  # type: ignore[attr-defined]
    try:
        summaries = run_experiment(config, run_dir, show_progress)  # type: ignore[arg-type]
    except (AssetError, ValueError, FileNotFoundError) as err:
        print(f"fcmoe: error: {err}", file=sys.stderr)
        return 1
    print_summary(summaries, title=f"fcmoe run ({time.perf_counter() - started:.0f} s)")
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
