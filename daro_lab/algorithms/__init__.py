"""The loss library: pure functions, usable from any training loop.

from daro_lab.algorithms import compute_advantages, policy_loss, PolicyBatch, DaroWeights
"""

from daro_lab.algorithms.advantages import ADVANTAGES, compute_advantages, kept_prompts, register_advantage
from daro_lab.algorithms.aggregation import AGGREGATIONS, constant_normaliser, seq_mean_token_mean, token_mean
from daro_lab.algorithms.daro_weights import DaroWeights
from daro_lab.algorithms.losses import (
    METHODS,
    SIGNALS,
    DaroState,
    GroupView,
    LossSettings,
    LossTerms,
    Method,
    MetricSums,
    PolicyBatch,
    Scaling,
    Shard,
    Totals,
    batch_totals,
    group_keys,
    length_corrected_shape,
    loss_terms,
    policy_loss,
    read_signal,
    register_method,
    shaped_methods,
    static_shape,
)
from daro_lab.algorithms.surrogate import clipped_surrogate, kl_k3

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "METHODS",
    "SIGNALS",
    "DaroState",
    "DaroWeights",
    "GroupView",
    "LossSettings",
    "LossTerms",
    "Method",
    "MetricSums",
    "PolicyBatch",
    "Scaling",
    "Shard",
    "Totals",
    "batch_totals",
    "clipped_surrogate",
    "compute_advantages",
    "constant_normaliser",
    "group_keys",
    "kept_prompts",
    "kl_k3",
    "length_corrected_shape",
    "loss_terms",
    "policy_loss",
    "read_signal",
    "register_advantage",
    "register_method",
    "seq_mean_token_mean",
    "shaped_methods",
    "static_shape",
    "token_mean",
]
