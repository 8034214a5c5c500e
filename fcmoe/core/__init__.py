"""Pure tensor math of federated aggregation: no transformers, no flwr, inputs never mutated."""

from fcmoe.core.aggregate import expert_weighted_mean, fedavg_step, holder_weights
from fcmoe.core.consensus import (ConsensusCoefficients, ConsensusResult, consensus_coefficients, consensus_project,
                                  streamed_consensus_coefficients)
from fcmoe.core.importance import IMPORTANCE_SCHEMES, importance_scores, importance_weights, normalise_columns
from fcmoe.core.one_read import ExpertSegment, one_read_consensus_coefficients, segment_blocks
from fcmoe.core.robust import ROBUST_AGGREGATORS, clip_factors, coordinate_aggregate
from fcmoe.core.tree import (Tree, row_squared_norms, tree_add, tree_clone, tree_norm, tree_num_bytes, tree_sub,
                             weighted_mean)

__all__ = [
    "IMPORTANCE_SCHEMES",
    "ROBUST_AGGREGATORS",
    "ConsensusCoefficients",
    "ConsensusResult",
    "ExpertSegment",
    "Tree",
    "clip_factors",
    "consensus_coefficients",
    "coordinate_aggregate",
    "expert_weighted_mean",
    "fedavg_step",
    "holder_weights",
    "consensus_project",
    "importance_scores",
    "importance_weights",
    "normalise_columns",
    "one_read_consensus_coefficients",
    "row_squared_norms",
    "segment_blocks",
    "streamed_consensus_coefficients",
    "tree_add",
    "tree_clone",
    "tree_norm",
    "tree_num_bytes",
    "tree_sub",
    "weighted_mean",
]
