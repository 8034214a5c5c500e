"""A study, ``fcmoe study``: several sweeps (one per config of a folder) run as one resumable grid of cells.

The shipped study (``configs/study/``, issue 19) asks when FC-MoE's projection and retention change the result:
each config is a regime (local work, concept shift) with its seeds in ``sweep.seeds``. Layout of a study folder::

    study.toml                 the regimes (each config as resolved) the study was started with
    local-1x-seed0/ …          one run folder per (regime, seed), every method of the regime
    study.md, study.png        the report (:mod:`fcmoe.report.study`), rebuilt from the cells' small files

Cells run seed-major (every regime of seed 0 first). Running the same command again resumes: finished cells are
skipped and half-done ones run their missing methods (:func:`fcmoe.sweep.run_cells`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tomli_w

from fcmoe.config import ConfigError, load_config
from fcmoe.sweep import Cell, check_cells, run_cells


def study_cells(config_dir: Path) -> list[Cell]:
    """``<config stem>-seed<s>`` for every ``*.toml`` of ``config_dir`` and each of its ``sweep.seeds``."""
    if not config_dir.is_dir():
        raise ConfigError(f"study configs {str(config_dir)!r} is not a folder; pass the folder of study TOML files, "
                          "e.g. --configs configs/study")
    regimes = [(path.stem, load_config(path)) for path in sorted(config_dir.glob("*.toml"))]
    if not regimes:
        raise ConfigError(f"study configs {str(config_dir)!r} holds no *.toml file")
    seeds = sorted({seed for _, config in regimes for seed in config.sweep.seeds})
    return [Cell(f"{name}-seed{seed}", dataclasses.replace(config, seed=seed))
            for seed in seeds for name, config in regimes if seed in config.sweep.seeds]


def run_study(config_dir: Path, study_dir: Path, show_progress: bool = True, jobs: int = 1) -> list[Path]:
    """Run (or resume) every cell of the study under ``study_dir``; return the cell folders."""
    cells = study_cells(config_dir)
    check_cells(cells, study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    regimes = {cell.name.rpartition("-seed")[0]: cell.config for cell in cells}
    (study_dir / "study.toml").write_text(tomli_w.dumps(
        {"configs": str(config_dir), "regimes": {name: config.to_dict() for name, config in regimes.items()}}))
    return run_cells(cells, study_dir, show_progress, jobs)
