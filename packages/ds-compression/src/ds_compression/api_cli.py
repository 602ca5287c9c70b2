"""The operations behind each `ds-compress` subcommand (kept apart from argument parsing)."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from .model_utils import CompressionInputError, load_model_dir, model_bytes

__all__ = ["precheck", "load", "size", "quantize", "xtc", "prune", "lowrank", "export", "info"]


def precheck(args: argparse.Namespace) -> None:
    """Argument checks that need no model, so a bad flag fails before a slow load."""
    from .quant.functional import check_bits

    if args.command == "quantize":
        check_bits(args.weight_bits, (4, 8) if args.method == "zeroquant" else (1, 2), "weight quantization")
        if args.act_bits is not None:
            check_bits(args.act_bits, (4, 8), "activation quantization")
        if args.lkd and not args.calib:
            raise CompressionInputError("--lkd needs calibration data: pass --calib <text file>")
        if args.smooth_alpha is not None and (args.act_bits is None or not args.calib):
            raise CompressionInputError("--smooth-alpha needs --act-bits and calibration data (--calib <text file>)")
        if args.act_asymmetric and args.act_bits is None:
            raise CompressionInputError("--act-asymmetric needs --act-bits")
        if args.lkd_learn_ranges and not args.lkd:
            raise CompressionInputError("--lkd-learn-ranges needs --lkd")
    if args.command == "prune" and args.method != "2:4" and args.ratio is None:
        raise CompressionInputError(f"--method {args.method} needs --ratio")


def load(args: argparse.Namespace) -> nn.Module:
    return load_model_dir(args.model_dir, gguf_file=args.gguf_file)


def size(model: nn.Module) -> int:
    return model_bytes(model)


def quantize(model: nn.Module, args: argparse.Namespace, batches: list | None) -> tuple[nn.Module, str]:
    from .zeroquant import quantize as run

    out = run(model, method=args.method, weight_bits=args.weight_bits, group_size=args.group_size,
              act_bits=args.act_bits, symmetric=not args.asymmetric, modules=args.modules, exclude=args.exclude,
              lkd=args.lkd, calib_batches=batches, lkd_steps=args.lkd_steps, lkd_lr=args.lkd_lr,
              act_symmetric=not args.act_asymmetric, smooth_alpha=args.smooth_alpha, clip_search=args.clip_search,
              lkd_learn_ranges=args.lkd_learn_ranges, show_progress=not args.no_progress)
    note = f"W{args.weight_bits}" + (f"A{args.act_bits}" if args.act_bits else "") + \
        (f" g{args.group_size}" if args.group_size else " per-row") + (" +LKD" if args.lkd else "") + \
        (f" +SmoothQuant({args.smooth_alpha})" if args.smooth_alpha is not None else "") + \
        (" +clip" if args.clip_search else "")
    return out, note


def xtc(model: nn.Module, args: argparse.Namespace, batches: list | None) -> tuple[nn.Module, str]:
    from .xtc import xtc_compress

    keep = None
    if args.keep_layers:
        try:
            keep = [int(i) for i in args.keep_layers.split(",")]
        except ValueError:
            raise CompressionInputError(f"--keep-layers must be comma-separated integers, got {args.keep_layers!r}") from None
    out = xtc_compress(model, batches, weight_bits=args.weight_bits, keep_layers=keep, steps=args.steps, lr=args.lr,
                       modules=args.modules, exclude=args.exclude, show_progress=not args.no_progress)
    e = out.ds_compression_history[-1]
    return out, f"{args.weight_bits}-bit, layers {e['keep_layers']}, KD loss {e['kd_loss_first']:.3g}->{e['kd_loss_last']:.3g}"


def prune(model: nn.Module, args: argparse.Namespace) -> tuple[nn.Module, str]:
    from .prune.structured import prune_channels, prune_heads
    from .prune.unstructured import prune_magnitude, prune_n_m, sparsity

    if args.method != "2:4" and args.ratio is None:
        raise CompressionInputError(f"--method {args.method} needs --ratio")
    if args.method == "2:4" and args.ratio is not None:
        raise CompressionInputError("--method 2:4 has a fixed ratio; drop --ratio")
    if args.method == "sparse":
        out = prune_magnitude(model, sparsity_ratio=args.ratio, modules=args.modules, exclude=args.exclude)
    elif args.method == "2:4":
        out = prune_n_m(model, n=2, m=4, modules=args.modules, exclude=args.exclude)
    elif args.method == "channel":
        out = prune_channels(model, ratio=args.ratio)
    else:
        out = prune_heads(model, ratio=args.ratio)
    if args.method in ("sparse", "2:4"):
        return out, f"sparsity {sparsity(out, args.modules, args.exclude):.1%} (dense storage)"
    return out, f"{sum(p.numel() for p in out.parameters()) / 1e6:.2f}M params"


def lowrank(model: nn.Module, args: argparse.Namespace) -> tuple[nn.Module, str]:
    from .lowrank import low_rank

    out = low_rank(model, rank=args.rank, rank_ratio=args.rank_ratio, modules=args.modules, exclude=args.exclude)
    e = out.ds_compression_history[-1]
    return out, f"params {e['params_before'] / 1e6:.2f}M -> {e['params_after'] / 1e6:.2f}M ({e['param_savings']:.1%} saved)"


def export(compressed_dir: str, out_path: str, seq_len: int) -> tuple[float, str]:
    from .export.checkpoint import load_compressed
    from .export.onnx_export import export_onnx, run_onnx

    model = load_compressed(compressed_dir)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg._attn_implementation = "eager"  # the TorchScript exporter cannot trace sdpa's mask helpers
        if hasattr(cfg, "use_cache"):
            cfg.use_cache = False
    vocab = getattr(cfg, "vocab_size", 100)
    gen = torch.Generator().manual_seed(0)
    ex = {"input_ids": torch.randint(0, vocab, (1, seq_len), generator=gen),
          "attention_mask": torch.ones(1, seq_len, dtype=torch.long)}
    names = ["logits"] if hasattr(model, "lm_head") else ["last_hidden_state"]
    path = export_onnx(model, out_path, ex, output_names=names)
    check = {"input_ids": torch.randint(0, vocab, (2, seq_len + 3), generator=gen),
             "attention_mask": torch.ones(2, seq_len + 3, dtype=torch.long)}
    got = torch.from_numpy(run_onnx(path, check)[0])
    with torch.no_grad():
        ref = model(**check)[names[0]]
    return (got - ref).abs().max().item(), str(path)


def info(compressed_dir: str) -> str:
    import json
    from pathlib import Path

    from .progress import format_table

    p = Path(compressed_dir)
    f = p / "compression_config.json"
    if not f.is_file():
        raise CompressionInputError(f"{p} is not a compressed model directory (no compression_config.json)")
    scheme = json.loads(f.read_text())
    rows = [{k: v for k, v in e.items() if not isinstance(v, (list, dict))} for e in scheme.get("history", [])]
    cols = sorted({k for r in rows for k in r}, key=lambda c: (c != "method", c))
    kinds: dict[str, int] = {}
    for spec in scheme["modules"].values():
        kinds[spec["type"]] = kinds.get(spec["type"], 0) + 1
    size = (p / "model.safetensors").stat().st_size
    head = f"{p}: {scheme['architecture']}, {size / 2**20:.2f} MB, layers: {kinds}"
    return head + ("\n" + format_table(rows, cols) if rows else "")
