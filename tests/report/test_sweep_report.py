"""``fcmoe sweep`` and ``fcmoe report`` on a tiny synthetic sweep: 2 methods × 2 α × 2 seeds, tiny model."""

from __future__ import annotations

import base64
import csv
import html.parser
import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

import fcmoe.runner
from fcmoe.cli import main
from fcmoe.config import ConfigError, load_config
from fcmoe.report.build import build_report
from fcmoe.sweep import run_sweep, sweep_cells
from tests.helpers import TINY

METHODS = ["fedavg", "fcmoe"]
ALPHAS = [0.1, 1.0]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    config = load_config(overrides=[*TINY, 'methods=["fedavg", "fcmoe"]'])
    run_sweep(config, ALPHAS, SEEDS, folder, show_progress=False)
    return folder


def _summaries(sweep_dir: Path) -> dict[tuple[float, int], dict]:
    return {(a, s): json.loads((sweep_dir / f"alpha{a:g}-seed{s}" / "summary.json").read_text())["methods"]
            for a in ALPHAS for s in SEEDS}


def _csv(path: Path) -> dict[tuple[str, float, str], dict[str, str]]:
    with path.open() as fh:
        return {(r["method"], float(r["alpha"]), r["metric"]): r for r in csv.DictReader(fh)}


def test_sweep_grid_is_seed_major_and_each_cell_holds_its_alpha_and_seed(sweep_dir: Path) -> None:
    cells = sweep_cells(load_config(overrides=TINY), ALPHAS, SEEDS)
    assert [c.name for c in cells] == ["alpha0.1-seed0", "alpha1-seed0", "alpha0.1-seed1", "alpha1-seed1"]
    for cell in cells:
        saved = load_config(sweep_dir / cell.name / "config.toml")
        assert (saved.partition.alpha, saved.seed) == (cell.config.partition.alpha, cell.config.seed)
        assert list(saved.methods) == METHODS
    partitions = [json.loads((sweep_dir / f"alpha0.1-seed{s}" / "partition.json").read_text())["clients"]
                  for s in SEEDS]
    assert partitions[0] != partitions[1]  # another seed draws another partition


def test_every_table_cell_is_the_mean_over_seeds_of_summary_json(sweep_dir: Path, tmp_path: Path) -> None:
    build_report([sweep_dir], tmp_path)
    summaries = _summaries(sweep_dir)
    table1 = _csv(tmp_path / "tables" / "table1_global_accuracy.csv")
    table3 = _csv(tmp_path / "tables" / "table3_local_accuracy.csv")
    assert len(table1) == len(METHODS) * len(ALPHAS)
    assert len(table3) == len(METHODS) * len(ALPHAS) * 4
    markdown = (tmp_path / "report.md").read_text()
    for method in METHODS:
        for alpha in ALPHAS:
            for table, metric in ((table1, "global_acc"), (table3, "local_acc_mean"), (table3, "local_acc_std"),
                                  (table3, "local_model_global_acc_mean")):
                values = [summaries[(alpha, s)][method][metric] for s in SEEDS]
                row = table[(method, alpha, metric)]
                assert float(row["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-12)
                assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
                assert int(row["n"]) == len(SEEDS)
            mean = statistics.fmean(summaries[(alpha, s)][method]["global_acc"] for s in SEEDS)
            assert f"{mean:.4f} ± " in markdown
    assert "## Table II: ablation\n\nGlobal accuracy" in markdown and "No variant ran" in markdown  # numbering kept


def test_report_writes_nonempty_figures_and_an_html_that_embeds_them(sweep_dir: Path, tmp_path: Path) -> None:
    html_path = build_report([sweep_dir], tmp_path)
    figures = sorted((tmp_path / "figures").glob("*.png"))
    names = {p.name for p in figures}
    assert {"convergence.png", "conflicts.png", "utilisation_alpha0.1.png", "utilisation_alpha1.png",
            "partition_alpha0.1.png", "partition_alpha1.png"} <= names
    assert all(p.stat().st_size > 10_000 for p in figures)

    class Parser(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.images: list[bytes] = []
            self.cells = 0

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            src = dict(attrs).get("src") or ""
            if tag == "img" and src.startswith("data:image/png;base64,"):
                self.images.append(base64.b64decode(src.split(",", 1)[1]))
            self.cells += tag == "td"

    parser = Parser()
    parser.feed(html_path.read_text())
    assert len(parser.images) == len(figures)  # every figure embedded: the file opens with no server
    assert all(image.startswith(b"\x89PNG") for image in parser.images)
    assert parser.cells == len(METHODS) * (3 + 4 * len(ALPHAS))  # tables I, III (2 columns per α) and IV
    runs = len(METHODS) * len(ALPHAS) * 2  # 2 seeds
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    assert f"local training ran on: {device} ({runs} runs)" in (tmp_path / "report.md").read_text()


def test_resuming_a_half_done_sweep_runs_only_the_missing_runs(sweep_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    folder = tmp_path / "sweep"
    shutil.copytree(sweep_dir, folder)
    # cell A lost its last method mid-run (summary without it, a partial metrics row); cell B never started
    cell_a, cell_b = folder / "alpha1-seed0", folder / "alpha1-seed1"
    summary = json.loads((cell_a / "summary.json").read_text())
    del summary["methods"]["fcmoe"]
    (cell_a / "summary.json").write_text(json.dumps(summary))
    with (cell_a / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"method": "fcmoe", "round": 1, "global_acc": 0.99}) + "\n")
    shutil.rmtree(cell_b)
    untouched = (folder / "alpha0.1-seed0" / "metrics.jsonl").read_bytes()
    calls: list[tuple[str, str]] = []
    real = fcmoe.runner.run_method

    def spy(exp, method, metrics_path, *rest):  # type: ignore[no-untyped-def]
        calls.append((metrics_path.parent.name, method))
        return real(exp, method, metrics_path, *rest)

    monkeypatch.setattr(fcmoe.runner, "run_method", spy)
    config = load_config(overrides=[*TINY, 'methods=["fedavg", "fcmoe"]'])
    run_sweep(config, ALPHAS, SEEDS, folder, show_progress=False)
    assert calls == [("alpha1-seed0", "fcmoe"), ("alpha1-seed1", "fedavg"), ("alpha1-seed1", "fcmoe")]
    assert (folder / "alpha0.1-seed0" / "metrics.jsonl").read_bytes() == untouched
    rows = [json.loads(line) for line in (cell_a / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in rows] == [(m, t) for m in METHODS for t in (1, 2)]
    assert all(r["global_acc"] != 0.99 for r in rows)
    # resumed and uninterrupted runs agree: the in-process engine is deterministic on CPU
    assert _summaries(folder)[(1.0, 0)]["fcmoe"]["global_acc"] == _summaries(sweep_dir)[(1.0, 0)]["fcmoe"]["global_acc"]
    calls.clear()
    run_sweep(config, ALPHAS, SEEDS, folder, show_progress=False)
    assert calls == []  # everything done: nothing reruns


def test_sweep_refuses_a_folder_of_another_experiment(sweep_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "sweep"
    shutil.copytree(sweep_dir, folder)
    config = load_config(overrides=[*TINY, 'methods=["fedavg", "fcmoe"]', "train.lr=0.5"])
    with pytest.raises(ValueError, match=r"different experiment \(train.lr differ\)"):
        run_sweep(config, ALPHAS, SEEDS, folder, show_progress=False)


def test_ablation_variants_run_in_the_same_experiment_and_fill_table_ii(tmp_path: Path) -> None:
    sets = [arg for item in TINY for arg in ("--set", item)]
    code = main(["sweep", *sets, "--set", "rounds=1", "--methods", "fcmoe,fcmoe/no-projection,fcmoe/no-retention",
                 "--seeds", "0", "--out", str(tmp_path / "abl"), "--quiet"])
    assert code == 0
    table = _csv(tmp_path / "abl" / "report" / "tables" / "table2_ablation.csv")
    assert {m for m, _, _ in table} == {"fcmoe", "fcmoe/no-projection", "fcmoe/no-retention"}
    assert "FC-MoE w/o projection" in (tmp_path / "abl" / "report" / "report.md").read_text()


def test_method_variants_are_validated_and_applied() -> None:
    config = load_config(overrides=['methods=["fcmoe", "fcmoe/no-projection", "fcmoe/no-importance"]'])
    assert config.algorithm_config("fcmoe").projection is True
    assert config.algorithm_config("fcmoe/no-projection").projection is False
    assert config.algorithm_config("fcmoe/no-importance").importance == "size"
    with pytest.raises(ConfigError, match="unknown variant 'fcmoe/no-such'.*fcmoe/no-projection"):
        load_config(overrides=['methods=["fcmoe/no-such"]'])
    with pytest.raises(ConfigError, match="unknown variant 'fedavg/x'"):
        load_config(overrides=['methods=["fedavg/x"]'])


@pytest.mark.parametrize(("args", "message"), [
    (["--alphas", "0.1,-1"], "α = -1.0 must be > 0"),
    (["--alphas", "0.1,zero"], "expected comma-separated numbers"),
    (["--seeds", "0,0"], "--seeds lists a value twice"),
    (["--alphas", "0.5", "--set", 'partition.kind="iid"'], "--alphas needs partition.kind"),
    (["--jobs", "0"], "--jobs = 0: must be >= 1"),
])
def test_sweep_rejects_a_bad_grid_before_any_work(args: list[str], message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", *args, "--out", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_report_of_nothing_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 1
    assert "no finished run" in capsys.readouterr().err


def test_the_config_sweep_section_is_the_default_grid(tmp_path: Path) -> None:
    config_file = tmp_path / "grid.toml"
    config_file.write_text('methods = ["fedavg"]\n\n[sweep]\nalphas = [0.1, 1.0]\nseeds = [3]\n')
    sets = [arg for item in [*TINY, "rounds=1"] for arg in ("--set", item)]
    assert main(["sweep", "--config", str(config_file), *sets, "--out", str(tmp_path / "s"), "--no-report",
                 "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == ["alpha0.1-seed3", "alpha1-seed3"]
    with pytest.raises(ConfigError, match="sweep.alphas: α = 0.0 must be > 0"):
        load_config(overrides=["sweep.alphas=[0.0]"])


def test_one_seed_has_no_spread_rather_than_a_zero_one() -> None:
    from fcmoe.report.results import Stat

    assert Stat.of([0.5]).text() == "0.5000 (n = 1)" and math.isnan(Stat.of([0.5]).std)
    assert Stat.of([0.5, 0.7]).text() == "0.6000 ± 0.1414"
    assert Stat.of([]).text() == "—"


def test_cells_with_runs_on_another_device_are_marked(sweep_dir: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(sweep_dir, mixed, ignore=shutil.ignore_patterns("report", "*.safetensors"))
    path = mixed / "alpha1-seed1" / "summary.json"
    summary = json.loads(path.read_text())
    summary["methods"]["fcmoe"]["device"] = "Some GPU"  # one run of the (FC-MoE, α = 1) cell
    path.write_text(json.dumps(summary))
    build_report([mixed], tmp_path / "report")
    lines = (tmp_path / "report" / "report.md").read_text().splitlines()
    usual = "cpu"  # every other run trained where this test runs
    if torch.cuda.is_available():
        usual = torch.cuda.get_device_name()
    assert any(f"local training ran on: {usual} (7 runs), Some GPU (1 run); † marks" in line for line in lines)
    table1 = [line for line in lines if line.startswith(("| FedAvg |", "| FC-MoE |"))][:2]
    assert table1[0].count("†") == 0
    assert table1[1].count("†") == 1 and table1[1].rstrip(" |").endswith("†")  # α = 1, the last column
    build_report([sweep_dir], tmp_path / "plain")
    assert "†" not in (tmp_path / "plain" / "report.md").read_text()


def test_cells_run_in_parallel_processes_equal_the_sequential_run(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(overrides=[*TINY, 'methods=["fedavg", "fcmoe"]'])
    with monkeypatch.context() as patch:  # spawned workers import fcmoe afresh: only an in-process cell would fail
        patch.setattr("fcmoe.sweep.run_experiment", lambda *a, **k: pytest.fail("a cell ran in this process"))
        run_sweep(config, ALPHAS, [0], tmp_path / "parallel", show_progress=False, jobs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))  # what each of the 2 workers used
    try:
        run_sweep(config, ALPHAS, [0], tmp_path / "sequential", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    for alpha in ALPHAS:
        cell = f"alpha{alpha:g}-seed0"
        rows = [[{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "eval_s")}
                 for line in (tmp_path / folder / cell / "metrics.jsonl").read_text().splitlines()]
                for folder in ("parallel", "sequential")]
        assert len(rows[0]) == len(METHODS) * config.rounds and rows[0] == rows[1]
    with pytest.raises(ConfigError, match="--jobs = 0"):
        run_sweep(config, ALPHAS, [0], tmp_path / "none", jobs=0)


def test_partition_heatmap_of_a_large_population_draws_the_first_clients(tmp_path: Path) -> None:
    """1,000 clients draw a figure of the first HEATMAP_CLIENTS rows (a figure of every client would be ~40,000
    pixels tall and take seconds); 10 clients draw them all."""
    from PIL import Image

    from fcmoe.plots import HEATMAP_CLIENTS, partition_heatmap

    counts = np.arange(1000 * 4).reshape(1000, 4) % 7
    big = Image.open(partition_heatmap(counts, list("abcd"), tmp_path / "big.png"))
    small = Image.open(partition_heatmap(counts[:10], list("abcd"), tmp_path / "small.png"))
    limit = Image.open(partition_heatmap(counts[:HEATMAP_CLIENTS], list("abcd"), tmp_path / "limit.png"))
    assert big.size == limit.size and small.size[1] < big.size[1]


def test_a_row_without_a_required_key_stops_the_report_naming_it(sweep_dir: Path, tmp_path: Path) -> None:
    """A metrics row that lost ``global_acc`` (renamed, say) is an error naming the file, row and key, not a NaN."""
    from fcmoe.report.results import ReportError, load_run

    cell = tmp_path / "cell"
    shutil.copytree(sweep_dir / "alpha0.1-seed0", cell)
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    rows[1]["accuracy"] = rows[1].pop("global_acc")
    (cell / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ReportError, match=r"metrics.jsonl row 2: no 'global_acc' in the row"):
        load_run(cell)
