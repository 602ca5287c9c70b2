"""What was done to a model: the steps (for the summary and the scheme config) and the plain
attributes that structural pruning changed (re-applied by `load_compressed`)."""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["record_method", "record_attribute", "get_history", "get_attributes"]


def record_method(model: nn.Module, entry: dict[str, Any]) -> None:
    """Append one compression step to the model's history."""
    get_history(model).append(entry)


def record_attribute(model: nn.Module, module_name: str, attr: str, value: Any) -> None:
    """Set `attr` on a submodule and remember it, so loading can rebuild the same structure."""
    setattr(model.get_submodule(module_name) if module_name else model, attr, value)
    attrs = getattr(model, "ds_compression_attributes", None)
    if attrs is None:
        attrs = {}
        model.ds_compression_attributes = attrs
    attrs[f"{module_name}:{attr}"] = value


def get_history(model: nn.Module) -> list[dict[str, Any]]:
    history = getattr(model, "ds_compression_history", None)
    if history is None:
        history = []
        model.ds_compression_history = history
    return history


def get_attributes(model: nn.Module) -> dict[str, Any]:
    return dict(getattr(model, "ds_compression_attributes", None) or {})
