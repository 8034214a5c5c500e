"""``fcmoe study``: regimes from a folder of configs, resumable cells, and the paired report built from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcmoe.cli import main
from fcmoe.config import ConfigError, load_config
from fcmoe.report.results import RunResult
from fcmoe.report.study import Regime, paired, study_regimes
from fcmoe.study import study_cells

TINY = '''methods = ["fedavg", "fcmoe"]
rounds = 2
[data]
train_per_class = 8
test_per_class = 3
max_length = 16
[partition]
num_clients = 4
min_partition_size = 6
{shift}
[model]
name = "tiny-bert-moe"
num_experts = 4
[train]
batch_size = 8
local_steps = {steps}
[sweep]
seeds = [0, 1]
'''


def _configs(folder: Path, many: bool = True) -> Path:
    folder.mkdir()
    (folder / "few.toml").write_text(TINY.format(steps=2, shift=""))
    (folder / "shifted.toml").write_text(TINY.format(steps=2, shift="concept_shift = 0.5"))
    if many:
        (folder / "many.toml").write_text(TINY.format(steps=6, shift=""))
    return folder


def test_cells_are_seed_major_over_the_regimes(tmp_path: Path) -> None:
    cells = study_cells(_configs(tmp_path / "configs"))
    assert [c.name for c in cells] == ["few-seed0", "many-seed0", "shifted-seed0",
                                       "few-seed1", "many-seed1", "shifted-seed1"]
    assert cells[4].config.seed == 1 and cells[4].config.train.local_steps == 6
    with pytest.raises(ConfigError, match="holds no"):
        study_cells(tmp_path)


def test_a_study_runs_resumes_and_reports_from_its_cells_alone(tmp_path: Path) -> None:
    configs, out = _configs(tmp_path / "configs", many=False), tmp_path / "study"
    assert main(["study", "--configs", str(configs), "--out", str(out), "--quiet"]) == 0
    regimes = study_regimes(out)
    assert [(r.name, r.local_steps, r.concept_shift) for r in regimes] == [("few", 2, 0.0), ("shifted", 2, 0.5)]
    report = (out / "study.md").read_text()
    assert (out / "study.png").stat().st_size > 0
    assert "## shifted (2 local steps, concept shift 0.5)" in report and "Shifted clients: seed 0: " in report
    few = regimes[0]
    diff = paired(few, "fedavg", "global_acc")
    expected = [c.summaries["fcmoe"]["global_acc"] - c.summaries["fedavg"]["global_acc"] for c in few.cells]
    assert list(diff.diffs) == pytest.approx(expected) and len(expected) == 2
    assert f"{diff.stat.mean:+.4f}" in report
    for key in ("projection_step_change_per_layer", "retention_ratio_per_layer"):
        assert all(key in row for row in few.cells[0].method_rows("fcmoe"))
    # a second call finds every cell done: nothing reruns, the report comes back the same
    stamp = (out / "few-seed0" / "metrics.jsonl").stat().st_mtime_ns
    (out / "study.md").unlink()
    assert main(["study", "--configs", str(configs), "--out", str(out), "--quiet"]) == 0
    assert (out / "few-seed0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert (out / "study.md").read_text() == report
    # the sweep report of a shifted cell names its shifted clients too
    assert main(["report", str(out / "shifted-seed0"), "--out", str(tmp_path / "report")]) == 0
    sweep_report = (tmp_path / "report" / "report.md").read_text()
    assert "concept shift, clients with permuted labels: α = 0.1 seed 0: " in sweep_report
    # the report needs nothing but the cells' small files
    for model in out.rglob("*.safetensors"):
        model.unlink()
    assert main(["study", "--out", str(out), "--report-only"]) == 0


def test_paired_signs_count_seeds() -> None:
    cells = [RunResult(Path(f"r-seed{s}"), 0.1, s, {"fcmoe": {"global_acc": a}, "fedavg": {"global_acc": b}})
             for s, (a, b) in enumerate([(0.5, 0.4), (0.5, 0.6), (0.3, 0.3)])]
    result = paired(Regime("r", 10, 0.0, cells), "fedavg", "global_acc")
    assert result.signs == "1+ 1− 1=" and result.diffs == pytest.approx((0.1, -0.1, 0.0))


def test_the_shipped_study_configs_load() -> None:
    cells = study_cells(Path(__file__).parents[2] / "configs" / "study")
    assert {c.config.train.local_steps for c in cells} == {10, 50, 200}
    assert len(cells) == 12 and {c.config.seed for c in cells} == {0, 1, 2}
    assert any(c.config.partition.concept_shift > 0 for c in cells)
    assert load_config(Path(__file__).parents[2] / "configs" / "study" / "local-1x.toml").model.moe_layers == (-1,)
