"""The compressed model directory: `model.safetensors` (quantized tensors, scales, pruned shapes),
`compression_config.json` (the scheme: every replaced or resized layer, changed attributes, the
history), and the transformers `config.json`. Written atomically; `load_compressed` rebuilds it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from ..history import get_attributes, get_history
from ..lowrank import LowRankLinear
from ..model_utils import CompressionInputError, set_module
from ..quant.modules import QuantLinear

__all__ = ["save_compressed", "load_compressed", "SCHEME_FILE", "WEIGHTS_FILE"]

SCHEME_FILE = "compression_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def _module_schemes(model: nn.Module) -> dict[str, dict[str, Any]]:
    schemes: dict[str, dict[str, Any]] = {}
    compound: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(c + ".") for c in compound):
            continue
        if isinstance(mod, (QuantLinear, LowRankLinear)):
            schemes[name] = mod.scheme()
            compound.append(name)
        elif type(mod) is nn.Linear:
            schemes[name] = {"type": "Linear", "in_features": mod.in_features,
                             "out_features": mod.out_features, "bias": mod.bias is not None}
    return schemes


def save_compressed(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Write `model` (compressed or not) as a loadable directory; returns its path."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CompressionInputError(f"output directory {out} exists and is not empty; pass overwrite=True / --overwrite")
    config = getattr(model, "config", None)
    scheme = {
        "format": "ds-compression",
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "transformers_config": config.to_dict() if hasattr(config, "to_dict") else None,
        "modules": _module_schemes(model),
        "attributes": get_attributes(model),
        "history": get_history(model),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": "ds-compression"})
        (tmp / SCHEME_FILE).write_text(json.dumps(scheme, indent=2, default=str), encoding="utf-8")
        if hasattr(config, "save_pretrained"):
            config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _empty_module(spec: dict[str, Any]) -> nn.Module:
    kind = spec["type"]
    if kind == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    if kind == "LowRankLinear":
        return LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"])
    if kind == "QuantLinear":
        bias = torch.zeros(spec["out_features"]) if spec["bias"] else None
        mod = QuantLinear(spec["in_features"], spec["out_features"], spec["weight_bits"], spec["group_size"],
                          spec["act_bits"], spec["symmetric"], spec.get("act_symmetric", True), bias)
        mod.weight_dtype = getattr(torch, spec.get("weight_dtype", "float32"))
        out_f, in_f, bits = spec["out_features"], spec["in_features"], spec["weight_bits"]
        if bits in (4, 8):
            groups = out_f * in_f // spec["group_size"]
            data = torch.zeros(out_f, in_f // 2, dtype=torch.uint8) if bits == 4 else torch.zeros(out_f, in_f, dtype=torch.int8)
            scale = torch.zeros(groups)
            zero = None if spec["symmetric"] else torch.zeros(groups)
        else:
            data = torch.zeros(out_f, -(-in_f * bits // 8), dtype=torch.uint8)
            scale, zero = torch.zeros(out_f), None
        mod._set_quantized(data, scale, zero)
        return mod
    raise CompressionInputError(f"unknown module type {kind!r} in {SCHEME_FILE}")


def _build_base(scheme: dict[str, Any], path: Path) -> nn.Module:
    cfg_dict = scheme.get("transformers_config")
    if not cfg_dict:
        raise CompressionInputError(
            f"{path} was saved from a model without a transformers config; pass the uncompressed "
            "architecture as load_compressed(path, model=...)"
        )
    import transformers

    cfg = transformers.AutoConfig.for_model(**cfg_dict)
    cls = getattr(transformers, scheme["architecture"], None)
    if cls is None:
        raise CompressionInputError(f"transformers has no class {scheme['architecture']!r} (saved in {path})")
    return cls(cfg)


def _restore_tied_embeddings(model: nn.Module, missing: set[str]) -> set[str]:
    """safetensors stores a tied tensor once; re-tie whichever side it dropped. Returns keys fixed."""
    cfg = getattr(model, "config", None)
    if not getattr(cfg, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return set()
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or outp is None:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    in_key, out_key = f"{names[id(inp)]}.weight", f"{names[id(outp)]}.weight"
    if in_key in missing and out_key not in missing:
        inp.weight = outp.weight
        return {in_key}
    if out_key in missing and in_key not in missing:
        outp.weight = inp.weight
        return {out_key}
    return set()


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The compressed model saved in `path`, ready for inference (eval mode, CPU).

    `model`: an uncompressed instance of the same architecture to rebuild on (needed only when the
    saved model had no transformers config); it is used in place.
    """
    p = Path(path)
    scheme_path = p / SCHEME_FILE
    if not scheme_path.is_file() or not (p / WEIGHTS_FILE).is_file():
        raise CompressionInputError(f"{p} is not a compressed model directory (needs {SCHEME_FILE} and {WEIGHTS_FILE})")
    try:
        scheme = json.loads(scheme_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CompressionInputError(f"{scheme_path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if scheme.get("format") != "ds-compression" or scheme.get("format_version", 0) > FORMAT_VERSION:
        raise CompressionInputError(f"{scheme_path}: unsupported format {scheme.get('format')!r} "
                                    f"version {scheme.get('format_version')!r}")
    model = model if model is not None else _build_base(scheme, p)
    for name in sorted(scheme["modules"], key=lambda n: n.count(".")):
        set_module(model, name, _empty_module(scheme["modules"][name]))
    for key, value in scheme.get("attributes", {}).items():
        module_name, _, attr = key.rpartition(":")
        setattr(model.get_submodule(module_name) if module_name else model, attr, value)
    model.ds_compression_attributes = dict(scheme.get("attributes", {}))
    model.ds_compression_history = list(scheme.get("history", []))
    missing, unexpected = load_model(model, str(p / WEIGHTS_FILE), strict=False)
    missing = set(missing) - _restore_tied_embeddings(model, set(missing))
    if missing or unexpected:
        raise CompressionInputError(
            f"{p / WEIGHTS_FILE} does not match its scheme: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.eval()
