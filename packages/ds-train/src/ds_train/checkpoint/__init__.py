"""Checkpoints: DeepSpeed's directory shape, safetensors + JSON inside, atomic saves, resharding loads."""
from ds_train.checkpoint.format import CheckpointError, read_latest, resolve_tag
from ds_train.checkpoint.reader import CheckpointReader
from ds_train.checkpoint.writer import write_checkpoint
from ds_train.checkpoint.zero_to_fp32 import (
    convert_zero_checkpoint_to_fp32_state_dict,
    get_fp32_state_dict_from_zero_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "write_checkpoint",
    "read_latest",
    "resolve_tag",
    "convert_zero_checkpoint_to_fp32_state_dict",
    "get_fp32_state_dict_from_zero_checkpoint",
]
