"""Pure tensor math of federated aggregation: no transformers, no flwr, inputs never mutated."""

from fcmoe.core.aggregate import (
                                  WEIGHTED_MEAN,
                                  MeanRule,
                                  WeightedMean,
                                  expert_weighted_mean,
                                  fedavg_step,
                                  holder_weights,
)
from fcmoe.core.consensus import (
                                  ConsensusCoefficients,
                                  ConsensusResult,
                                  ExpertStep,
                                  PairwiseProjection,
                                  consensus_coefficients,
                                  consensus_project,
                                  consensus_step,
                                  expert_norms,
                                  pairwise_project,
                                  pairwise_step,
)
from fcmoe.core.importance import IMPORTANCE_SCHEMES, importance_scores, importance_weights, normalise_columns
from fcmoe.core.robust import ROBUST_AGGREGATORS, CoordinateMean, clip_factors, coordinate_aggregate
from fcmoe.core.tree import Tree, row_squared_norms, tree_add, tree_clone, tree_norm, tree_num_bytes, tree_sub

__all__ = [
    "IMPORTANCE_SCHEMES",
    "ROBUST_AGGREGATORS",
    "WEIGHTED_MEAN",
    "ConsensusCoefficients",
    "ConsensusResult",
    "CoordinateMean",
    "ExpertStep",
    "MeanRule",
    "PairwiseProjection",
    "Tree",
    "WeightedMean",
    "clip_factors",
    "consensus_coefficients",
    "consensus_project",
    "consensus_step",
    "coordinate_aggregate",
    "expert_norms",
    "expert_weighted_mean",
    "fedavg_step",
    "holder_weights",
    "importance_scores",
    "importance_weights",
    "normalise_columns",
    "pairwise_project",
    "pairwise_step",
    "row_squared_norms",
    "tree_add",
    "tree_clone",
    "tree_norm",
    "tree_num_bytes",
    "tree_sub",
]
