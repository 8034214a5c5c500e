"""One ``metrics.jsonl`` row (a method's round): its keys declared once, checked where rows are written and read.

:func:`fcmoe.rounds.round_metrics` writes a :class:`MetricsRow` for every method and round, with the server's own
metrics beside it (each algorithm declares those keys: ``Algorithm.metric_keys``). The report, the study and
TensorBoard read rows through the names below; a row without a required key is an error naming it, never a NaN.
(No ``from __future__ import annotations`` here: ``NotRequired`` must be evaluated for ``__required_keys__``.)
"""

from collections.abc import Collection, Mapping
from typing import Any, NotRequired, TypedDict

# the keys the report, the study, the engines' logs and the summaries read by name
GLOBAL_ACC, TASK_SCORES, MMLU_ACC = "global_acc", "task_scores", "mmlu_acc"
LOCAL_ACC_MEAN, LOCAL_ACC_STD, TRAIN_LOSS = "local_acc_mean", "local_acc_std", "train_loss"


class MetricsRow(TypedDict):
    """The keys of every round's row, and the readings some rounds add."""

    method: str
    round: int
    global_acc: float  # NaN in a round that eval.every does not score
    local_acc: list[float | None]  # by client id; None: a client that did not report
    local_acc_mean: float
    local_acc_std: float
    train_loss: float  # mean over the accepted updates
    utilisation: dict[str, list[float]]  # MoE layer → share of assignments per expert
    clients: list[int]  # the accepted updates' client ids
    client_utilisation: dict[str, Any]
    bytes_up: int
    bytes_down: int
    wall_s: float
    eval_s: float  # of wall_s, scoring the models
    participants: list[int]  # drawn
    failed: list[int]  # drawn, failed mid-round
    rejected: list[str]  # one reason per rejected update
    skipped: bool  # fewer accepted updates than robust.min_clients: the global model was kept
    engine: NotRequired[str]  # "flower" for the Flower engine's rows
    # instruction tuning (task = "sft")
    global_loss: NotRequired[float]
    task_scores: NotRequired[dict[str, float]]
    mmlu_acc: NotRequired[float]  # the last round
    # each local model after its local training, on the global test set
    local_model_global_acc: NotRequired[list[float]]
    local_model_global_acc_mean: NotRequired[float]
    local_model_global_acc_std: NotRequired[float]
    local_model_global_docs: NotRequired[int]
    # the last round, for PFL-MoE: each client's deployed model on the global test set
    deployed_global_acc: NotRequired[list[float]]
    deployed_global_acc_mean: NotRequired[float]
    deployed_global_acc_std: NotRequired[float]


REQUIRED_KEYS: frozenset[str] = MetricsRow.__required_keys__
KNOWN_KEYS: frozenset[str] = REQUIRED_KEYS | MetricsRow.__optional_keys__


def row_problem(row: Mapping[str, Any], algorithm_keys: Collection[str] | None = None) -> str | None:
    """What is wrong with ``row`` (a missing required key; with ``algorithm_keys``, a key neither the row type nor
    the algorithm declares), or None."""
    missing = sorted(REQUIRED_KEYS - row.keys())
    if missing:
        return f"no {', '.join(map(repr, missing))} in the row"
    if algorithm_keys is not None:
        unknown = sorted(row.keys() - KNOWN_KEYS - set(algorithm_keys))
        if unknown:
            return f"undeclared key(s) {', '.join(map(repr, unknown))}: add them to MetricsRow or metric_keys"
    return None
