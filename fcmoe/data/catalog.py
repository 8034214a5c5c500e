"""Names of the data sources and partition kinds (no heavy imports: the config validates against them)."""

from __future__ import annotations

OFFLINE_SOURCES = ("20ng", "20ng4", "reuters8", "bbc4", "mmlu-offline")
HUB_SOURCES = ("agnews", "mmlu")
FILE_SOURCES = ("csv", "jsonl", "parquet")
INSTRUCT_SOURCES = ("instruct", "instruct-file", "instruct-hub")  # task = "sft": prompt/response records
SOURCE_NAMES: tuple[str, ...] = (*OFFLINE_SOURCES, *HUB_SOURCES, *FILE_SOURCES, *INSTRUCT_SOURCES)
PARTITION_KINDS = ("dirichlet", "iid", "pathological", "natural")
