"""The paper's AG News / MMLU Switch configs run end to end offline: tiny Switch, local copies in the hub schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from fcmoe.config import load_config
from fcmoe.runner import run_experiment

PAPER = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*-switch-base-16-a*.toml"))


def _hub_copy(kind: str, folder: Path) -> None:
    """A few rows laid out like the hub repositories (what ``load_dataset(folder)`` reads)."""
    if kind == "agnews":
        for split, n in (("train", 40), ("test", 12)):
            rows = [{"text": f"article {i} about topic {i % 4}", "label": i % 4} for i in range(n)]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        rows = [{"question": f"question {i}?", "subject": ["anatomy", "virology", "sociology"][i % 3],
                 "choices": ["one", "two", "three", "four"], "answer": i % 4} for i in range(60)]
        pd.DataFrame(rows).to_parquet(folder / "test.parquet")


def test_all_six_paper_configs_ship() -> None:
    names = {p.name for p in PAPER}
    assert names == {f"{d}-switch-base-16-a{a}.toml" for d in ("agnews", "mmlu") for a in ("0.1", "0.5", "1.0")}


@pytest.mark.parametrize("path", [p for p in PAPER if p.name.endswith("a0.1.toml")], ids=lambda p: p.stem)
def test_paper_config_runs_on_a_tiny_switch(path: Path, tmp_path: Path) -> None:
    paper = load_config(path)
    assert paper.model.name == "switch-t2t" and paper.rounds == 25 and paper.partition.alpha == 0.1
    kind = paper.data.name
    _hub_copy(kind, tmp_path)
    config = load_config(path, [f"data.path={tmp_path}", "model.name=switch-t2t-tiny", "model.path=''",
                                "data.train_per_class=8", "data.test_per_class=3", "data.max_length=24",
                                "partition.num_clients=2", "partition.min_partition_size=2", "rounds=1",
                                "methods=['fedavg','fcmoe']"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summaries = run_experiment(config, run_dir, show_progress=False)
    assert [s.method for s in summaries] == ["fedavg", "fcmoe"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert any(".decoder." in layer for layer in rows[1]["conflict_rate_per_layer"])
