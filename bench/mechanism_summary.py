"""FC-MoE's mechanism metrics of finished runs: per run folder and FC-MoE method, the mean over rounds and MoE
layers of conflict rate, projected weight share, projection step change and retention ratio (rounds >= 2).

Usage: ``python bench/mechanism_summary.py RUN_OR_SWEEP_FOLDER...`` (prints run | method | the four figures).
"""

import json
import statistics
import sys
from pathlib import Path

keys = ("conflict_rate", "projected_weight_share_per_layer", "projection_step_change_per_layer",
        "retention_ratio_per_layer")
for folder in sys.argv[1:]:
    for metrics in sorted(Path(folder).rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        for method in dict.fromkeys(r["method"] for r in rows):
            if not method.startswith("fcmoe"):
                continue
            mine = [r for r in rows if r["method"] == method]
            out = []
            for key in keys:
                vals = [v for r in mine
                        for v in ((r.get(key) or {}).values() if isinstance(r.get(key), dict) else [r.get(key)])
                        if v is not None and (key != "retention_ratio_per_layer" or r["round"] >= 2)]
                out.append(f"{statistics.fmean(vals):.4f}" if vals else "—")
            print(metrics.parent.name, method, *out, sep=" | ")
