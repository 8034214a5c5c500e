"""``fcmoe list``: every name the configuration accepts, one line each."""

from __future__ import annotations


def print_names() -> int:
    """Every name the config accepts for a method, model, dataset and offline asset, one line each."""
    from fcmoe.data.assets import ASSETS
    from fcmoe.data.catalog import FILE_SOURCES, HUB_SOURCES, OFFLINE_SOURCES, PARTITION_KINDS
    from fcmoe.data.instruct import INSTRUCT_SUFFIXES, METRICS
    from fcmoe.models.catalog import FAMILY_NAMES, SFT_MODELS
    from fcmoe.registry import ALGORITHMS

    methods = [f"{name}{''.join(f', {name}/{v}' for v in ALGORITHMS.get(name).variants)}"
               for name in ALGORITHMS.names()]
    print(f"methods (--methods): {', '.join(methods)}")
    print(f"models (model.name): {', '.join(FAMILY_NAMES)}")
    from fcmoe.models.families import FAMILIES, LORA_TARGET_PARAMETERS

    targets = "; ".join(f"{name} {', '.join(family.lora_targets)}" for name, family in FAMILIES.items()
                        if name != "switch")
    print(f"LoRA targets (model.finetune = lora): {', '.join(LORA_TARGET_PARAMETERS)} and attention: {targets}")
    from fcmoe.models.shapes import SHAPES

    print(f"published shapes (model.init = random, model.path): {', '.join(SHAPES)}")
    print("tasks (task): classify (a head over C classes), sft (a causal LM on prompt/response pairs), auto (sft for "
          "instruction data)")
    print(f"causal LMs (task = sft): {', '.join(SFT_MODELS)}")
    print(f"datasets (data.name), classify: offline {', '.join(OFFLINE_SOURCES)}; hub {', '.join(HUB_SOURCES)}; "
          f"your file {', '.join(FILE_SOURCES)} (data.path)")
    formats = "Alpaca instruction/input/output, prompt/completion, or chat messages; optional task, metric"
    print(f"datasets (data.name), sft: offline instruct (5 tasks); your file instruct-file "
          f"({', '.join(INSTRUCT_SUFFIXES)}: {formats} {' | '.join(METRICS)}); hub instruct-hub (data.path = an id)")
    print(f"partitions (partition.kind): {', '.join(PARTITION_KINDS)}")
    print(f"offline assets (fcmoe fetch): {', '.join(f'{a.dist}=={a.version}' for a in ASSETS.values())}")
    print("engines (--engine): inprocess, flower; fcmoe deploy-local for a local TLS deployment")
    return 0
