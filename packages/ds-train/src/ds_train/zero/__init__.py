"""ZeRO strategies: the engine talks to them through `ZeroStrategy` only."""
from ds_train.zero.full_state import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_grad,
    safe_set_full_optimizer_state,
)
from ds_train.zero.init import GatheredParameters, Init
from ds_train.zero.partition import Bucket, GroupLayout, ParamSlot, Piece, build_layout
from ds_train.zero.stage1_2 import ZeroStage012
from ds_train.zero.stage3_prefetch import set_z3_leaf_modules
from ds_train.zero.stage3_pretrained import from_pretrained_partitioned
from ds_train.zero.strategy import ShardReader, StepResult, ZeroStrategy

__all__ = [
    "Bucket", "GroupLayout", "ParamSlot", "Piece", "build_layout",
    "ZeroStage012", "ShardReader", "StepResult", "ZeroStrategy", "strategy_class",
    "Init", "GatheredParameters", "set_z3_leaf_modules", "from_pretrained_partitioned",
    "safe_get_full_fp32_param", "safe_get_full_grad", "safe_get_full_optimizer_state",
    "safe_set_full_fp32_param", "safe_set_full_grad", "safe_set_full_optimizer_state",
]


def strategy_class(stage: int) -> type[ZeroStrategy]:
    """The strategy implementing `stage` (stage 3 registers itself here when it lands)."""
    if stage in (0, 1, 2):
        return ZeroStage012
    if stage == 3:
        from ds_train.zero.stage3 import ZeroStage3

        return ZeroStage3
    raise ValueError(f"ZeRO stage {stage} is not supported yet (ds-train issue 5); use 0, 1 or 2")
