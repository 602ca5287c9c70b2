"""Mixed precision: loss scalers (fp16) and the dtype rules of the engine."""
from ds_train.precision.dtypes import DTYPE_NAMES, dtype_from_name, model_dtype
from ds_train.precision.loss_scaler import DynamicLossScaler, LossScaler, StaticLossScaler, build_loss_scaler

__all__ = [
    "DynamicLossScaler",
    "LossScaler",
    "StaticLossScaler",
    "build_loss_scaler",
    "DTYPE_NAMES",
    "dtype_from_name",
    "model_dtype",
]
