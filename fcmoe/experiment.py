"""Everything one experiment shares across methods: data, partition, model, cached features, initial state.

Built once per ``fcmoe run``; every method then starts from the same initial trainable tree on the same clients,
so differences in the results come from the algorithms alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fcmoe.config import ExperimentConfig
from fcmoe.core import Tree, tree_clone
from fcmoe.data.corpus import TextCorpus, subsample_per_class
from fcmoe.data.mmlu import MMLU_CHOICES, mmlu_zero_shot, stratified_questions
from fcmoe.data.offline import mmlu_offline_questions
from fcmoe.data.partition import Partition, partition_pool
from fcmoe.data.sources import load_source
from fcmoe.files import atomic_write
from fcmoe.models.build import BuiltModel, build_model, checkpointing
from fcmoe.models.causal_lm import answer_tokens, encode_pairs, encode_plain
from fcmoe.training.local import FeatureSet, LocalTrainer, featurize, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """Shared, read-only inputs of every method's run."""

    config: ExperimentConfig
    built: BuiltModel
    trainer: LocalTrainer
    pool: TextCorpus  # the federated training pool (before partitioning)
    partition: Partition
    client_train: Sequence[FeatureSet]  # client id → its training rows (ClientViews: cut from the pool when asked)
    client_test: Sequence[FeatureSet]
    global_test: FeatureSet
    initial_state: Tree
    setup_s: float
    probe_test: FeatureSet  # the first PROBE_PER_CLASS (sft: PROBE_PER_TASK) of each label of global_test
    # task = "sft": MMLU's zero-shot questions (labels: the answer's index) and the tokens of " A" … " D"
    mmlu: FeatureSet | None = None
    letter_ids: tuple[int, ...] = ()

    @property
    def num_clients(self) -> int:
        return len(self.client_train)


def prepare_experiment(config: ExperimentConfig, feature_cache: Path | None = None) -> Experiment:
    """Load and subsample the corpus, partition it, build the model, cache frozen features.

    Parameters
    ----------
    config
        The experiment.
    feature_cache
        A folder for this exact ``config``'s frozen features (the caller keys it, e.g. by a digest of the config):
        read from there when present, else computed and written there (a write that fails is logged and
        skipped). A ClientApp process starts afresh for every message, and featurising is most of its set-up.
    """
    started = time.perf_counter()
    if config.server.memory_budget and config.robust.clip > 0:
        log.warning("robust.clip = %g holds the clipped updates in memory: server.memory_budget = %r does not bound "
                    "them (set robust.clip = 0 to keep within it)", config.robust.clip, config.server.memory_budget)
    device = resolve_device(config.train.device)  # a GPU asked for but absent stops here, before any data is read
    data, model_cfg = config.data, config.model
    train_corpus, test_corpus = load_source(data, config.seed)
    pool = subsample_per_class(train_corpus, data.train_per_class, config.seed)
    test = subsample_per_class(test_corpus, data.test_per_class, config.seed + 1, require_every_class=False)
    part = config.partition
    partition = partition_pool(pool.labels, part, data.local_test_fraction, config.seed, pool.groups)
    built = build_model(model_cfg.name, len(pool.label_names), num_experts=model_cfg.num_experts,
                        moe_layers=model_cfg.moe_layers, trainable_layers=model_cfg.trainable_layers,
                        router_init_std=model_cfg.router_init_std, max_length=data.max_length, seed=config.seed,
                        path=model_cfg.path, finetune=model_cfg.finetune, lora_rank=model_cfg.lora_rank,
                        label_names=pool.label_names, precision=config.train.precision,
                        master_weights=config.train.master_weights, init=model_cfg.init,
                        num_layers=model_cfg.num_layers, device=device, expert_lora=model_cfg.expert_lora,
                        task=config.task, train_lm_head=model_cfg.train_lm_head)
    log.info("precision: %s", built.precision.describe())
    if checkpointing(model_cfg.name, config.train.gradient_checkpointing):
        built.model.enable_gradient_checkpointing()
    trainer = LocalTrainer(built.model, built.layout, config.train, built.precision,  # moves it to train.device
                           built.router_defaults, config.eval.max_new_tokens)
    log.info("router lr %.3g, balance-loss weight %.3g per MoE layer", trainer.router_lr, trainer.aux_loss_coef)
    pool_features = _featurize(built, pool, data.max_length, feature_cache and feature_cache / FEATURE_FILES[0])
    global_test = _featurize(built, test, data.max_length, feature_cache and feature_cache / FEATURE_FILES[1])
    client_train, client_test = ClientViews(pool_features, partition, "train"), ClientViews(pool_features, partition,
                                                                                          "test")
    if partition.label_maps:
        log.info("concept shift: clients %s see permuted labels", sorted(partition.label_maps))
    setup_s = time.perf_counter() - started
    log.info("setup: %d pool docs, %d global test docs, %d clients, %.1f s", len(pool.texts), len(test.texts),
             part.num_clients, setup_s)
    mmlu, letters = (_mmlu(built, config.eval.mmlu_questions, feature_cache) if config.task == "sft"
                     else (None, ()))
    probe = stratified_head(global_test, PROBE_PER_CLASS if config.task == "classify" else PROBE_PER_TASK)
    return Experiment(config, built, trainer, pool, partition, client_train, client_test, global_test,
                      tree_clone(built.model.trainable_state()), setup_s, probe, mmlu, letters)


FEATURE_FILES = ("pool.safetensors", "global-test.safetensors")  # in a feature cache folder: pool, global test
MMLU_FILE = "mmlu.safetensors"  # beside them for sft: MMLU's tokenised questions (cheap to redo: not waited for)
MMLU_MAX_TOKENS = 512  # an MMLU prompt is cut on the left to this many tokens

# DESIGN §2's second local reading scores every client's local model on the global test set in the final round:
# on all 800 documents of the default that made each method's final round ~25 s longer (10 clients × 800 forwards).
PROBE_PER_CLASS = 10
# instruction tuning: a held-out prompt costs a generation (a forward pass per new token, tens of classification
# forwards), so each client's local model reads 2 prompts a task
PROBE_PER_TASK = 2


def stratified_head(data: FeatureSet, per_class: int) -> FeatureSet:
    """The first ``per_class`` rows of every label, in their original order."""
    rows = [i for label in data.labels.unique().tolist()
            for i in (data.labels == label).nonzero().flatten()[:per_class].tolist()]
    return data.subset(torch.tensor(sorted(rows)))


class ClientViews(Sequence[FeatureSet]):
    """Every client's train (or test) rows of the pool, cut when asked: the pool's features are held once, not a
    second time split over the clients (with 10,000 clients the copies doubled set-up's peak memory)."""

    def __init__(self, features: FeatureSet, partition: Partition, split: str) -> None:
        self.features, self.partition, self.split = features, partition, split

    def __len__(self) -> int:
        return len(self.partition.clients)

    def __getitem__(self, client: int) -> FeatureSet:  # type: ignore[override]
        rows = getattr(self.partition.clients[client], self.split)
        return _client_view(self.features, self.partition, client, rows)


def _client_view(features: FeatureSet, partition: Partition, client: int, rows: np.ndarray) -> FeatureSet:
    """Client ``client``'s ``rows`` of the pool, with its labels as it sees them (concept shift)."""
    view = features.subset(torch.from_numpy(rows))
    if client in partition.label_maps:
        view.labels = torch.from_numpy(partition.client_labels(client, view.labels.numpy()))
    return view


def _same_kind(built: BuiltModel, found: FeatureSet, corpus: TextCorpus, max_length: int) -> bool:
    """Whether a cached feature file holds what this model caches (token ids, or frozen-layer outputs of its
    width), judged against its features of one document."""
    ids, mask = _tokenized(built, corpus.subset(np.arange(1)), max_length)[:2]
    probe = built.model.featurize(ids.to(_model_device(built)), mask.to(_model_device(built)))
    return found.features.dtype == probe.dtype and found.features.shape[2:] == probe.shape[2:]


def _tokenized(built: BuiltModel, corpus: TextCorpus, max_length: int,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Ids and mask ``[n, T]`` of the documents (instruction data: prompt/response pairs, with their targets)."""
    if corpus.responses is None:
        return (*built.tokenize(corpus.texts), None)
    pairs = encode_pairs(built.model.codec, corpus.texts, corpus.responses, max_length)
    return pairs.ids, pairs.mask, pairs.targets


def _model_device(built: BuiltModel) -> torch.device:
    return next(built.model.parameters()).device


def _features(built: BuiltModel, corpus: TextCorpus, max_length: int) -> FeatureSet:
    """What the model caches of ``corpus``: classification documents, or prompt/response pairs (instruction data)."""
    labels = torch.from_numpy(np.asarray(corpus.labels))
    ids, mask, targets = _tokenized(built, corpus, max_length)
    features = featurize(built.model, ids, mask, labels, bucketed=targets is not None)
    if targets is None:
        return features
    exact = torch.from_numpy(np.asarray(corpus.groups["metric"]) == "exact")
    return FeatureSet(features.features, mask, labels, targets, exact, None if features.features.dim() == 2 else ids)


def _featurize(built: BuiltModel, corpus: TextCorpus, max_length: int, cached: Path | None) -> FeatureSet:
    labels = torch.from_numpy(np.asarray(corpus.labels))
    found = _read_cache(cached)
    if found is not None:
        if (torch.equal(found.labels, labels) and len(found.features) == len(labels)
                and (found.targets is None) == (corpus.responses is None)
                and _same_kind(built, found, corpus, max_length)):
            log.info("frozen features read from %s", cached)
            return found
        log.warning("the feature cache %s is for other documents or of another kind; computing the features again",
                    cached)
    features = _features(built, corpus, max_length)
    if cached is not None:
        _write_cache(cached, features)
    return features


def _read_cache(cached: Path | None) -> FeatureSet | None:
    """A feature cache file, or None when there is none or it cannot be read (damaged, or not a feature file: the
    caller computes it again)."""
    if cached is None or not cached.is_file():
        return None
    try:
        return FeatureSet(**load_file(str(cached)))
    except (OSError, SafetensorError, TypeError) as err:
        log.warning("ignoring the feature cache %s (%s); computing it again", cached, err)
        return None


def _write_cache(cached: Path, features: FeatureSet) -> None:
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, lambda tmp: save_file(features.tensors(), str(tmp)))
    except (OSError, SafetensorError) as err:  # a full disk costs the cache, not the message
        log.warning("could not write the feature cache %s (%s); the next process computes it again", cached, err)


def _mmlu(built: BuiltModel, count: int, feature_cache: Path | None,
          ) -> tuple[FeatureSet | None, tuple[int, ...]]:
    """MMLU's zero-shot questions for a causal LM (:func:`fcmoe.data.mmlu.stratified_questions`), and the answer
    letters' tokens; (None, ()) when ``count`` is 0 or the letters are not single tokens of the model."""
    letters = answer_tokens(built.model.codec, MMLU_CHOICES)
    if not count or letters is None:
        if count:
            log.warning("MMLU is not scored: the answer letters are not single tokens of this model's tokenizer")
        return None, ()
    cached = feature_cache and feature_cache / MMLU_FILE
    found = _read_cache(cached)
    if found is not None:
        if len(found) == count and found.features.dtype == torch.long:
            return found, tuple(letters)
        log.warning("the feature cache %s holds other questions; tokenising them again", cached)
    questions = stratified_questions(mmlu_offline_questions(), count)
    ids, mask = encode_plain(built.model.codec, [mmlu_zero_shot(q) for q in questions], MMLU_MAX_TOKENS)
    answers = torch.tensor([MMLU_CHOICES.index(q.answer) for q in questions])
    mmlu = FeatureSet(ids, mask, answers)
    if cached is not None:
        _write_cache(cached, mmlu)
    return mmlu, tuple(letters)
