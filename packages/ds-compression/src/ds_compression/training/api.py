"""`init_compression` / `redundancy_clean`: DeepSpeed's compression-during-training entry points.

    model = init_compression(model, ds_config)            # before building the optimizer
    scheduler = CompressionScheduler(model, ds_config)     # engine: scheduler.step(global_step)
    ... train ...
    model = redundancy_clean(model, ds_config)             # masks made permanent, smaller model
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Union

import torch
from ds_core.config import ConfigError, load_config_source, parse_config
from torch import nn

from ..history import record_attribute, record_method
from ..model_utils import set_module
from ..prune.surgery import keep_cols, keep_rows
from .config import CompressionTrainingConfig
from .layers import CompressedLinear

__all__ = ["init_compression", "redundancy_clean", "section_from"]

ConfigSource = Union[CompressionTrainingConfig, Mapping[str, Any], str, os.PathLike]  # noqa: UP007 (py3.9 alias)


def section_from(config: ConfigSource) -> CompressionTrainingConfig:
    """The `compression_training` section from a whole ds config, the section itself, a path or JSON."""
    if isinstance(config, CompressionTrainingConfig):
        return config
    data = load_config_source(config)
    if "compression_training" in data:
        data = data["compression_training"]
    return parse_config(CompressionTrainingConfig, data)


def _matching(model: nn.Module, patterns: list[str], what: str) -> list[str]:
    names = []
    explicit = [p for p in patterns if p != "*"]
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if "*" in patterns or any(re.search(p, name) for p in explicit):
            names.append(name)
    if not names:
        raise ConfigError(f"compression_training.{what}: modules {patterns} match no nn.Linear in the model")
    return names


def _related(model: nn.Module, anchor: str, pattern: str, what: str) -> str:
    """The module matching `pattern` closest to `anchor` in the tree (the one in the same layer)."""
    cands = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(pattern, n)]
    if not cands:
        raise ConfigError(f"compression_training.{what}: related module {pattern!r} matches nothing")
    return max(cands, key=lambda n: (len(os.path.commonprefix([n, anchor])), -len(n)))


def _wrap(model: nn.Module, name: str) -> CompressedLinear:
    mod = model.get_submodule(name)
    if isinstance(mod, CompressedLinear):
        return mod
    new = CompressedLinear(mod)
    set_module(model, name, new)
    return new


def _reduce_layers(model: nn.Module, cfg: Any, teacher: nn.Module | None) -> None:
    try:
        layers = model.get_submodule(cfg.module_name_prefix)
    except AttributeError:
        raise ConfigError(f"layer_reduction.module_name_prefix {cfg.module_name_prefix!r} is not in the model") from None
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"layer_reduction.module_name_prefix {cfg.module_name_prefix!r} is not a ModuleList")
    source = teacher.get_submodule(cfg.module_name_prefix) if teacher is not None else layers
    bad = [i for i in cfg.teacher_layer if not 0 <= i < len(source)]
    if bad:
        raise ConfigError(f"layer_reduction.teacher_layer {bad} out of range (teacher has {len(source)} layers)")
    if teacher is not None:
        if len(layers) != len(cfg.teacher_layer):
            raise ConfigError(f"student has {len(layers)} layers under {cfg.module_name_prefix}, "
                              f"teacher_layer lists {len(cfg.teacher_layer)}")
        for student_idx, teacher_idx in enumerate(cfg.teacher_layer):
            layers[student_idx].load_state_dict(source[teacher_idx].state_dict())
        for other in cfg.other_module_name:
            model.get_submodule(other).load_state_dict(teacher.get_submodule(other).state_dict())
    else:
        kept = nn.ModuleList([layers[i] for i in cfg.teacher_layer])
        for new_idx, layer in enumerate(kept):
            for sub in layer.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = new_idx
        set_module(model, cfg.module_name_prefix, kept)
        model_cfg = getattr(model, "config", None)
        if model_cfg is not None and hasattr(model_cfg, "num_hidden_layers"):
            model_cfg.num_hidden_layers = len(kept)
            if getattr(model_cfg, "layer_types", None):
                model_cfg.layer_types = [model_cfg.layer_types[i] for i in cfg.teacher_layer]
    record_method(model, {"method": "layer_reduction", "teacher_layer": list(cfg.teacher_layer)})


def init_compression(model: nn.Module, config: ConfigSource, teacher_model: nn.Module | None = None) -> nn.Module:
    """Prepare `model` (in place, like DeepSpeed) for the configured compression; returns it.

    Call before creating the optimizer so 'topk' mask scores are trained.
    """
    cfg = section_from(config)
    if cfg.layer_reduction.enabled:
        _reduce_layers(model, cfg.layer_reduction, teacher_model)
    wq = cfg.weight_quantization
    if wq.shared_parameters.enabled:
        for gname, group in wq.different_groups.items():
            for name in _matching(model, group.modules, f"weight_quantization.different_groups.{gname}"):
                layer = _wrap(model, name)
                if layer.weight.numel() % wq.shared_parameters.quantize_groups:
                    raise ConfigError(f"weight_quantization.quantize_groups={wq.shared_parameters.quantize_groups} "
                                      f"does not divide the {layer.weight.numel()} weights of {name}")
                layer.weight_quant = {
                    "start_bits": group.params.start_bits, "target_bits": group.params.target_bits,
                    "period": group.params.quantization_period, "groups": wq.shared_parameters.quantize_groups,
                    "symmetric": wq.shared_parameters.quantization_type == "symmetric",
                }
    aq = cfg.activation_quantization
    if aq.shared_parameters.enabled:
        for gname, group in aq.different_groups.items():
            for name in _matching(model, group.modules, f"activation_quantization.different_groups.{gname}"):
                _wrap(model, name).act_quant = {
                    "bits": group.params.bits, "symmetric": aq.shared_parameters.quantization_type == "symmetric"}
    for kind, section in (("sparse", cfg.sparse_pruning), ("row", cfg.row_pruning), ("head", cfg.head_pruning)):
        shared = section.shared_parameters
        if not shared.enabled:
            continue
        for gname, group in section.different_groups.items():
            what = f"{kind}_pruning.different_groups.{gname}"
            for name in _matching(model, group.modules, what):
                layer = _wrap(model, name)
                related = [_related(model, name, p, what) for pats in (group.related_modules or []) for p in pats]
                spec = {"method": shared.method, "dense_ratio": group.params.dense_ratio, "related": related}
                if kind == "head":
                    if layer.in_features % shared.num_heads:
                        raise ConfigError(f"head_pruning.num_heads={shared.num_heads} does not divide "
                                          f"{name}.in_features={layer.in_features}")
                    spec["num_heads"] = shared.num_heads
                setattr(layer, kind, spec)
                if shared.method == "topk":
                    layer.configure_scores(kind)
    return model


def _fold(layer: CompressedLinear) -> nn.Linear:
    """The plain linear whose weight is what `layer` computes now (masks and quantization included)."""
    with torch.no_grad():
        w, b = layer.effective_weight()
        new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        dtype=layer.weight.dtype, device=layer.weight.device)
        new.weight.copy_(w.detach())
        if b is not None:
            new.bias.copy_(b.detach())
    return new


def redundancy_clean(model: nn.Module, config: ConfigSource) -> nn.Module:
    """Make the compression permanent (in place; returns the model): masked and quantized weights are
    folded into plain linears, and pruned rows/heads are removed together with the matching
    inputs/outputs of their related modules, giving a smaller model."""
    section_from(config)  # validates; the layers carry their own settings
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    cuts: list[tuple[str, str, torch.Tensor]] = []  # (module, "rows"|"cols", index)
    attrs: list[tuple[str, int, int]] = []
    for name, layer in layers.items():
        row = layer.current_mask("row")
        if row is not None:
            index = torch.nonzero(row.detach() > 0).flatten()
            cuts.append((name, "rows", index))
            cuts.extend((rel, "cols", index) for rel in layer.row["related"])
        head = layer.current_mask("head")
        if head is not None:
            n_heads = head.numel()
            head_dim = layer.in_features // n_heads
            kept = torch.nonzero(head.detach() > 0).flatten()
            index = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()
            cuts.append((name, "cols", index))
            for rel in layer.head["related"]:
                if model.get_submodule(rel).out_features != layer.in_features:
                    raise ConfigError(f"head_pruning: related module {rel} has {model.get_submodule(rel).out_features} "
                                      f"outputs, {name} reads {layer.in_features} (grouped KV heads are not supported)")
                cuts.append((rel, "rows", index))
            attrs.append((name, len(kept), head_dim))
    for name, layer in layers.items():
        keep_act = layer.act_quant is not None and layer.act_quant_enabled
        folded = _fold(layer)
        if keep_act:
            wrapped = CompressedLinear(folded)
            wrapped.act_quant, wrapped.act_quant_enabled = layer.act_quant, True
            set_module(model, name, wrapped)
        else:
            set_module(model, name, folded)
    for name, how, index in cuts:
        mod = model.get_submodule(name)
        base = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        base.weight, base.bias = mod.weight, mod.bias
        new = keep_rows(base, index) if how == "rows" else keep_cols(base, index)
        if isinstance(mod, CompressedLinear):
            new = CompressedLinear(new)
            new.act_quant, new.act_quant_enabled = mod.act_quant, mod.act_quant_enabled
        set_module(model, name, new)
    for name, n_kept, head_dim in attrs:
        holder = _attention_holder(model, name)
        if holder is not None:
            hname, hmod = holder
            if hasattr(hmod, "num_attention_heads"):
                record_attribute(model, hname, "num_attention_heads", n_kept)
            if hasattr(hmod, "all_head_size"):
                record_attribute(model, hname, "all_head_size", n_kept * head_dim)
    record_method(model, {"method": "redundancy_clean", "layers": len(layers), "structural_cuts": len(cuts)})
    return model


def _attention_holder(model: nn.Module, output_name: str) -> tuple[str, nn.Module] | None:
    """The module next to an attention output projection that stores the head count, if any."""
    best = None
    for name, mod in model.named_modules():
        if hasattr(mod, "num_attention_heads") and not isinstance(mod, nn.Linear) and name:
            score = len(os.path.commonprefix([name, output_name]))
            if best is None or score > best[0]:
                best = (score, name, mod)
    return None if best is None else (best[1], best[2])
