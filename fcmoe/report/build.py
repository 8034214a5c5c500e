"""``fcmoe report``: the paper's tables and figures from run folders, as Markdown, CSV and one self-contained HTML.

Output folder::

    report.md, report.html     the same content; the HTML embeds every figure (base64), so it opens with no server
    tables/*.csv               long form: method, alpha, metric, mean, std, n (n = seeds averaged)
    figures/*.png              convergence, ablation, conflicts, expert utilisation, partitions

Tables (DESIGN §2): I global accuracy per method × α; II the FC-MoE ablation; III local accuracy, both readings
(each client's deployed model on its own test split; each client's local model after its local epoch on the global
test set), mean ± std over clients; IV rounds to reach a target global accuracy.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fcmoe import plots
from fcmoe.metrics_row import GLOBAL_ACC, LOCAL_ACC_MEAN, MMLU_ACC, TASK_SCORES, TRAIN_LOSS
from fcmoe.report.results import (
    ReportError,
    RunResult,
    Stat,
    alphas_of,
    curve,
    default_target,
    find_runs,
    layer_curve,
    methods_of,
    rounds_to_target,
    shifted_clients,
    stat,
)
from fcmoe.report.table import display_name
from fcmoe.sweep import skipped_cells

log = logging.getLogger(__name__)

__all__ = ["ReportError", "build_report", "display_name"]


@dataclass
class ReportTable:
    """A table as displayed (strings) and as data (long-form CSV records)."""

    name: str  # file stem, e.g. "table1_global_accuracy"
    title: str
    caption: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    records: list[dict[str, object]] = field(default_factory=list)

    def add_record(self, method: str, alpha: float, metric: str, value: Stat) -> str:
        self.records.append({"method": method, "alpha": alpha, "metric": metric, "mean": value.mean,
                             "std": value.std, "n": value.n})
        return value.text()


def build_report(paths: Sequence[Path], out: Path | None = None, target: float | None = None) -> Path:
    """Read every run under ``paths``, write the report into ``out`` (default ``paths[0]/report``); return the HTML.

    Raises :class:`ReportError` when there is no finished run or a run folder cannot be read.
    """
    problems: list[str] = []
    runs = find_runs(paths, problems=problems)
    out = out or paths[0] / "report"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    alphas, methods = alphas_of(runs), methods_of(runs)
    # Tables I, III, IV: the methods and the variants that are methods of their own (fedmoe/agg, fcmoe/pairwise);
    # the "no-…" ablations go to Table II only
    main = [m for m in methods if not m.partition("/")[2].startswith("no-")]
    tables = [global_table(runs, alphas, main), local_table(runs, alphas, main),
              target_table(runs, alphas, main, target)]
    ablation = [m for m in methods if "/" in m]
    bases = list(dict.fromkeys(m.partition("/")[0] for m in ablation))
    # Table II is always there, so the tables keep the paper's numbers (empty when no variant ran)
    tables.insert(1, ablation_table(runs, alphas, [m for b in bases for m in (b, *ablation)
                                                   if m == b or m.startswith(b + "/")]))
    if any(s.get(TASK_SCORES) for run in runs for s in run.summaries.values()):  # instruction tuning
        tables.append(instruct_table(runs, alphas, methods))
    for table in tables:
        write_csv(table, out / "tables" / f"{table.name}.csv")
    figures = write_figures(runs, alphas, main, ablation, out / "figures")
    header = describe(runs, alphas, methods) + missing(runs, paths, problems)
    (out / "report.md").write_text(markdown(header, tables, figures, out))
    html_path = out / "report.html"
    html_path.write_text(to_html(header, tables, figures))
    log.info("report of %d runs written to %s", len(runs), out)
    return html_path


# ---------------------------------------------------------------------------------------------------- tables
def global_table(runs: Sequence[RunResult], alphas: Sequence[float], methods: Sequence[str]) -> ReportTable:
    """Table I: final global accuracy, mean ± std over seeds, per method × α."""
    table = ReportTable("table1_global_accuracy", "Table I: global accuracy",
                        "Global model on the global test set after the last round; mean ± std over seeds.",
                        ["method", *(f"α = {a:g}" for a in alphas)])
    for method in methods:
        table.rows.append([display_name(method), *(table.add_record(method, a, GLOBAL_ACC,
                                                                    stat(runs, method, a, GLOBAL_ACC))
                                                   + device_mark(runs, method, a) for a in alphas)])
        mixtures = [stat(runs, method, a, "deployed_global_acc_mean") for a in alphas]
        if any(math.isfinite(s.mean) for s in mixtures):  # PFL-MoE: its authors' reading of global accuracy
            table.rows.append([f"{display_name(method)} (clients' mixtures, its paper's reading)",
                               *(table.add_record(method, a, "deployed_global_acc_mean", s) for a, s in
                                 zip(alphas, mixtures, strict=True))])
    return table


def ablation_table(runs: Sequence[RunResult], alphas: Sequence[float], methods: Sequence[str]) -> ReportTable:
    """Table II: the full method and each variant, global and (personalised) local accuracy per α."""
    table = ReportTable("table2_ablation", "Table II: ablation",
                        "Global accuracy and mean local accuracy (each client's deployed model on its own test "
                        "split); mean ± std over seeds." + ("" if methods else " No variant ran: add e.g. "
                                                           "fcmoe/no-projection, fcmoe/no-retention to the methods."),
                        ["method", *(f"{kind} α = {a:g}" for a in alphas for kind in ("global", "local"))])
    for method in methods:
        cells = []
        for a in alphas:
            mark = device_mark(runs, method, a)
            cells.append(table.add_record(method, a, GLOBAL_ACC, stat(runs, method, a, GLOBAL_ACC)) + mark)
            cells.append(table.add_record(method, a, LOCAL_ACC_MEAN, stat(runs, method, a, LOCAL_ACC_MEAN))
                         + mark)
        table.rows.append([display_name(method), *cells])
    return table


def local_table(runs: Sequence[RunResult], alphas: Sequence[float], methods: Sequence[str]) -> ReportTable:
    """Table III: local accuracy, mean ± std over clients (each averaged over seeds), both readings."""
    probes = sorted({r.get("local_model_global_docs", 0) for run in runs for r in run.rows
                     if "local_model_global_acc_mean" in r})  # 0: runs that scored the whole set
    classes = sorted({n for run in runs if (n := len(label_names(run)))})
    of_classes = f" of {' / '.join(map(str, classes))} classes" if classes else ""
    scope = " / ".join("all of it" if n == 0 else f"{n} documents{of_classes}, stratified" for n in probes) \
        or "not measured"
    table = ReportTable(
        "table3_local_accuracy", "Table III: local accuracy (mean ± std over clients)",
        "deployed: each client's deployed model (FedAvg / FedMoE: the global model; FC-MoE: θ + λr_i; PFL-MoE: "
        "the mixture) on its own test split. local model: each client's model after its local epoch of the last "
        f"round, on the global test set ({scope}). Mean over clients ± std over clients, both averaged over seeds.",
        ["method", *(f"{kind} α = {a:g}" for a in alphas for kind in ("deployed", "local model"))])
    for method in methods:
        cells = []
        for a in alphas:
            for prefix in ("local_acc", "local_model_global_acc"):
                mean, spread = stat(runs, method, a, f"{prefix}_mean"), stat(runs, method, a, f"{prefix}_std")
                table.add_record(method, a, f"{prefix}_mean", mean)
                table.add_record(method, a, f"{prefix}_std", spread)
                cells.append("—" if mean.n == 0 else f"{mean.mean:.4f} ± {spread.mean:.4f}"
                             + device_mark(runs, method, a))
        table.rows.append([display_name(method), *cells])
    return table


def target_table(runs: Sequence[RunResult], alphas: Sequence[float], methods: Sequence[str],
                 target: float | None) -> ReportTable:
    """Table IV: the first round whose seed-mean global accuracy reaches the target ("—": never)."""
    targets = {a: target if target is not None else default_target(runs, a, methods) for a in alphas}
    source = "given with --target" if target is not None else "FedAvg's final global accuracy at each α"
    table = ReportTable("table4_rounds_to_target", "Table IV: rounds to reach the target global accuracy",
                        f"Target ({source}): " + ", ".join(f"α = {a:g}: {t:.4f}" for a, t in targets.items())
                        + ". Seed-mean curves; — = not reached.",
                        ["method", *(f"α = {a:g}" for a in alphas)])
    for method in methods:
        cells = []
        for a in alphas:
            reached = rounds_to_target(runs, method, a, targets[a]) if math.isfinite(targets[a]) else None
            table.records.append({"method": method, "alpha": a, "metric": "rounds_to_target",
                                  "mean": reached if reached is not None else math.nan, "std": 0.0,
                                  "n": 1 if reached is not None else 0, "target": targets[a]})
            cells.append("—" if reached is None else str(reached))
        table.rows.append([display_name(method), *cells])
    return table


def instruct_table(runs: Sequence[RunResult], alphas: Sequence[float], methods: Sequence[str]) -> ReportTable:
    """Table V (``task = "sft"``): the final global model's generation score per task and over the held-out
    prompts, the clients' deployed models' mean score, and MMLU, beside the model before training."""
    tasks = list(dict.fromkeys(t for run in runs for s in [run.initial, *run.summaries.values()]
                               for t in (s.get(TASK_SCORES) or {})))
    table = ReportTable("table5_instruct", "Table V: instruction tuning",
                        "Generation score of the global model on held-out prompts per task (exact match or ROUGE-L) "
                        "and over all of them, the mean over clients of each deployed model on its own prompts "
                        "(local), and MMLU zero-shot accuracy; mean ± std over seeds. 'before training': the initial "
                        "model, shared by every method.",
                        ["method", *(["α"] if len(alphas) > 1 else []), *tasks, "mean", "local", "MMLU"])

    columns = [*((f"task_scores:{t}", lambda found, t=t: (found.get(TASK_SCORES) or {}).get(t)) for t in tasks),
               *((key, lambda found, key=key: found.get(key)) for key in (GLOBAL_ACC, LOCAL_ACC_MEAN, MMLU_ACC))]
    for source in [None, *methods]:  # None: the initial model (summary.json's "initial")
        for a in alphas:
            found = [run.initial if source is None else run.summaries[source] for run in runs
                     if run.alpha == a and (source is None or source in run.summaries)]
            cells = [table.add_record(source or "initial", a, metric, Stat.of([read(f) for f in found]))
                     for metric, read in columns]
            table.rows.append([display_name(source) if source else "before training",
                               *([f"{a:g}"] if len(alphas) > 1 else []), *cells])
    return table


def write_csv(table: ReportTable, path: Path) -> None:
    fields = list(dict.fromkeys(k for record in table.records for k in record))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table.records)


# ---------------------------------------------------------------------------------------------------- figures
MECHANISM_ROWS = (("conflict_rate_per_layer", "conflict rate"), ("mean_cosine_per_layer", "mean cosine to consensus"),
                  ("projection_step_change_per_layer", "projection step change"),
                  ("retention_ratio_per_layer", "retention ratio"))


TRAINING_ROWS = ((TRAIN_LOSS, ("train loss", 1.0)), ("bytes_up", ("MB up per round", 1e-6)),
                 ("bytes_down", ("MB down per round", 1e-6)))


def label_names(run: RunResult) -> list[str]:
    """The run's classes (``partition.json``); ``[]`` when it has none."""
    try:
        return list(json.loads((run.path / "partition.json").read_text()).get("label_names", []))
    except (OSError, ValueError, AttributeError):
        return []


def write_figures(runs: Sequence[RunResult], alphas: Sequence[float], main: Sequence[str],
                  ablation: Sequence[str], folder: Path) -> list[tuple[str, Path]]:
    """Every figure the runs have data for, as (caption, path)."""
    figures = []

    def lines(methods: Sequence[str], alpha: float, key: str, scale: float = 1.0) -> dict[str, plots.Curve]:
        out = {}
        for m in methods:
            rounds, stats = curve(runs, m, alpha, key)
            if rounds:
                out[display_name(m)] = (rounds, [s.mean * scale for s in stats], [s.std * scale for s in stats])
        return out

    classes = {len(label_names(r)) for r in runs} - {0}
    chance = 1.0 / classes.pop() if len(classes) == 1 else None
    for name, methods, caption in (("convergence", main, "Convergence: global and mean local accuracy per round "
                                                         "(line: mean over seeds, band: ± std; y from 0 to 1"
                                                         + (f", dashed: chance = 1/{round(1 / chance)}" if chance
                                                            else "") + ")"),
                                   ("ablation_convergence", [m.partition("/")[0] for m in ablation[:1]]
                                    + list(ablation), "Ablation convergence")):
        if not methods:
            continue
        panels = [[(f"α = {a:g}", lines(methods, a, key)) for a in alphas] for key in (GLOBAL_ACC, LOCAL_ACC_MEAN)]
        figures.append((caption, plots.curve_grid(panels, ["global accuracy", "local accuracy"],
                                                  folder / f"{name}.png", ylims=[(0.0, 1.0)] * 2,
                                                  chance=[chance] * 2)))
    training = [(key, label) for key, label in TRAINING_ROWS if any(key in r for run in runs for r in run.rows)]
    if training:
        panels = [[(f"α = {a:g}", lines(main, a, key, scale)) for a in alphas] for key, (_, scale) in training]
        figures.append(("Training: mean train loss of the accepted updates, and megabytes sent per round "
                        "(uploads: every accepted update; downloads: the model and any per-client message)",
                        plots.curve_grid(panels, [label for _, (label, _) in training], folder / "training.png",
                                         ylims=[None if key == TRAIN_LOSS else (0.0, None) for key, _ in training])))
    conflict_method = "fcmoe" if "fcmoe" in main else None
    keys = [(key, label) for key, label in MECHANISM_ROWS
            if conflict_method and any(r.get(key) for run in runs for r in run.method_rows(conflict_method))]
    if keys:
        panels = []
        for key, _ in keys:
            row = []
            for a in alphas:
                per_layer = layer_curve(runs, conflict_method, a, key)
                row.append((f"α = {a:g}", {layer: (r, [s.mean for s in st], [s.std for s in st])
                                           for layer, (r, st) in per_layer.items()}))
            panels.append(row)
        figures.append(("FC-MoE per MoE layer: share of (client, expert) pairs projected (cos < τ), mean cosine of "
                        "client updates to the consensus direction, how far projection moved the step "
                        "(‖with − without‖ / ‖without‖) and retention next to the update (mean ‖λ r_i‖ / ‖Δ_i‖)",
                        plots.curve_grid(panels, [label for _, label in keys], folder / "conflicts.png")))
    for a in alphas:
        first = next((r for r in runs if r.alpha == a), None)
        if first is None:
            continue
        method = conflict_method or next(iter(first.summaries))
        last = first.method_rows(method)[-1:] or [{}]
        shares = last[0].get("client_utilisation") or {}
        if shares:
            path = folder / f"utilisation_alpha{a:g}.png"
            plots.utilisation_heatmaps({layer: np.asarray(grid) for layer, grid in shares.items()}, path,
                                       f"{display_name(method)}, α = {a:g}, seed {first.seed}, round "
                                       f"{last[0]['round']}: share of each client's tokens per expert")
            figures.append((f"Expert utilisation (clients × experts), α = {a:g}", path))
        if (first.path / "partition.png").is_file():
            path = folder / f"partition_alpha{a:g}.png"
            shutil.copyfile(first.path / "partition.png", path)
            figures.append((f"Partition (documents per client and label), α = {a:g}, seed {first.seed}", path))
    return figures


# ---------------------------------------------------------------------------------------------------- documents
def describe(runs: Sequence[RunResult], alphas: Sequence[float], methods: Sequence[str]) -> list[str]:
    seeds = sorted({r.seed for r in runs})
    rounds = sorted({int(s.get("rounds", 0)) for r in runs for s in r.summaries.values()})
    lines = [f"{len(runs)} run folders: α ∈ {{{', '.join(f'{a:g}' for a in alphas)}}}, seeds {seeds}, "
             f"rounds {', '.join(map(str, rounds))}",
             "methods: " + ", ".join(display_name(m) for m in methods),
             "local training ran on: " + device_counts(runs) + device_legend(runs),
             "runs: " + ", ".join(sorted({str(r.path.parent) for r in runs}))]
    subsets = sorted({str(chosen) for r in runs if (chosen := r.config.get("eval", {}).get("clients", "all")) != "all"
                      and (chosen != "participants" or r.config.get("participation", {}).get("fraction", 1.0) < 1)})
    if subsets:  # eval.clients: before the last round the local curves are not over every client
        lines.append(f"local accuracy before the last round: eval.clients = {' / '.join(subsets)} (the round's "
                     "participants, or k clients drawn per round), not every client; the last round scores all")
    shifted = [(r, clients) for r in runs if (clients := shifted_clients(r))]
    if shifted:
        lines.append("concept shift, clients with permuted labels: " + "; ".join(
            f"α = {r.alpha:g} seed {r.seed}: {', '.join(map(str, c))}" for r, c in shifted))
    return lines


def missing(runs: Sequence[RunResult], paths: Sequence[Path], problems: Sequence[str]) -> list[str]:
    """What the report lacks: interrupted methods, sweep cells that were skipped, folders that could not be read."""
    lines = [f"**incomplete**: {', '.join(display_name(m) for m in r.unfinished)} not finished in {r.path} (resume: "
             f"fcmoe run --resume {r.path})" for r in runs if r.unfinished]
    for path in paths:
        lines += [f"**missing cell** {path / name}: {reason}" for name, reason in skipped_cells(path).items()]
    return lines + [f"**left out** (unreadable): {problem}" for problem in problems]


def _devices(runs: Sequence[RunResult], method: str | None = None, alpha: float | None = None) -> Counter[str]:
    return Counter(s.get("device") or "not recorded" for r in runs if alpha is None or r.alpha == alpha
                   for m, s in r.summaries.items() if method is None or m == method)


def device_counts(runs: Sequence[RunResult]) -> str:
    """``"NVIDIA H200 (54 runs), cpu (9 runs)"``: GPU and CPU results of one seed differ, so say which."""
    return ", ".join(f"{device} ({n} run{'s' * (n != 1)})" for device, n in _devices(runs).most_common())


def device_mark(runs: Sequence[RunResult], method: str, alpha: float) -> str:
    """``"\u00a0†"`` when a run of this cell trained on another device than most runs of the report, else ``""``."""
    everywhere = _devices(runs)
    usual = everywhere.most_common(1)[0][0]
    return "\u00a0†" if len(everywhere) > 1 and set(_devices(runs, method, alpha)) - {usual} else ""


def device_legend(runs: Sequence[RunResult]) -> str:
    everywhere = _devices(runs)
    if len(everywhere) < 2:
        return ""
    return (f"; † marks a cell with runs on another device than {everywhere.most_common(1)[0][0]}: float rounding "
            "differs between devices and compounds over the rounds, so compare such a cell with its own device's")


def markdown(header: Sequence[str], tables: Sequence[ReportTable], figures: Sequence[tuple[str, Path]],
             out: Path) -> str:
    lines = ["# fcmoe report", "", *(f"- {h}" for h in header), ""]
    for table in tables:
        lines += [f"## {table.title}", "", table.caption, "", "| " + " | ".join(table.columns) + " |",
                  "|" + "|".join("---" for _ in table.columns) + "|",
                  *("| " + " | ".join(row) + " |" for row in table.rows), "",
                  f"CSV: `tables/{table.name}.csv`", ""]
    lines += ["## Figures", ""]
    for caption, path in figures:
        lines += [f"### {caption}", "", f"![{caption}]({path.relative_to(out).as_posix()})", ""]
    return "\n".join(lines)


def to_html(header: Sequence[str], tables: Sequence[ReportTable], figures: Sequence[tuple[str, Path]]) -> str:
    """One HTML file with every figure embedded as a base64 PNG: it opens in a browser with no server."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>fcmoe report</title>',
             "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #bbb;padding:4px 8px;"
             "text-align:right;white-space:nowrap}th:first-child,td:first-child{text-align:left}th{background:#eef}"
             "img{max-width:100%;border:1px solid #ddd}.caption{color:#444}</style></head><body>",
             "<h1>fcmoe report</h1><ul>", *(f"<li>{esc(h)}</li>" for h in header), "</ul>"]
    for table in tables:
        parts += [f"<h2>{esc(table.title)}</h2>", f'<p class="caption">{esc(table.caption)}</p>', "<table><tr>",
                  *(f"<th>{esc(c)}</th>" for c in table.columns), "</tr>",
                  *("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in table.rows),
                  "</table>"]
    parts.append("<h2>Figures</h2>")
    for caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts += [f"<h3>{esc(caption)}</h3>", f'<img alt="{esc(caption)}" src="data:image/png;base64,{data}">']
    parts.append("</body></html>")
    return "\n".join(parts)
