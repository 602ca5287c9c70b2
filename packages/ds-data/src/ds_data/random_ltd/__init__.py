"""Random layerwise token dropping (random-LTD) and its layer-token learning-rate schedule."""

from ds_data.random_ltd.layer import (
    RandomLTDLayer,
    RandomLTDState,
    convert_to_random_ltd,
    find_layer_list,
    is_random_ltd_layer,
    revert_random_ltd,
)
from ds_data.random_ltd.lr import LayerTokenLR
from ds_data.random_ltd.scheduler import RandomLTDScheduler
from ds_data.random_ltd.tokens import gather_mask, gather_tokens, sample_kept_indices, scatter_tokens

__all__ = [
    "LayerTokenLR",
    "RandomLTDLayer",
    "RandomLTDScheduler",
    "RandomLTDState",
    "convert_to_random_ltd",
    "find_layer_list",
    "is_random_ltd_layer",
    "revert_random_ltd",
    "gather_mask",
    "gather_tokens",
    "sample_kept_indices",
    "scatter_tokens",
]
