"""`ds-compress`: post-training compression of a model directory from the command line.

    ds-compress quantize <model_dir> --weight-bits 4 --group-size 128 [--act-bits 8] [--lkd --calib FILE] --out DIR
                         [--smooth-alpha 0.5] [--act-asymmetric] [--clip-search] [--lkd-learn-ranges]
    ds-compress xtc      <model_dir> --weight-bits 2 [--keep-layers 0,2,4] --calib FILE --out DIR
    ds-compress prune    <model_dir> --method sparse|2:4|channel|head --ratio R --out DIR
    ds-compress lowrank  <model_dir> --rank R | --rank-ratio F --out DIR
    ds-compress export-onnx <compressed_dir> --out model.onnx
    ds-compress info     <compressed_dir>
Each command ends with a summary table (size before/after, ratio, time). Errors exit with status 2
and one line saying what was wrong; the input directory is only read.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds-compress", description="Compress a Hugging Face model directory.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model_dir", help="directory with config.json + weights, or a GGUF file")
        sp.add_argument("--gguf-file", default=None, help="GGUF file name inside model_dir")
        sp.add_argument("--out", required=True, help="output directory (must be new or empty)")
        sp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        sp.add_argument("--modules", nargs="*", default=None, help="glob/regex patterns of layers to compress")
        sp.add_argument("--exclude", nargs="*", default=["lm_head"], help="patterns to leave alone")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    def calib_args(sp: argparse.ArgumentParser, required: bool) -> None:
        sp.add_argument("--calib", required=required, default=None, help="UTF-8 text file for calibration/KD")
        sp.add_argument("--tokenizer", default=None, help="tokenizer directory (default: model_dir)")
        sp.add_argument("--calib-samples", type=int, default=32)
        sp.add_argument("--seq-len", type=int, default=256)
        sp.add_argument("--batch-size", type=int, default=4)

    q = sub.add_parser("quantize", help="ZeroQuant: group-wise weights, token-wise activations, optional LKD")
    model_args(q)
    q.add_argument("--method", choices=["zeroquant", "xtc"], default="zeroquant")
    q.add_argument("--weight-bits", type=int, required=True)
    q.add_argument("--group-size", type=int, default=None, help="weights per scale along a row (default: whole row)")
    q.add_argument("--act-bits", type=int, default=None, help="token-wise dynamic activation bits (e.g. 8)")
    q.add_argument("--asymmetric", action="store_true", help="asymmetric weight ranges")
    q.add_argument("--act-asymmetric", action="store_true", help="token-wise activation ranges [min, max]")
    q.add_argument("--smooth-alpha", type=float, default=None,
                   help="SmoothQuant: migrate activation outliers into the weights (e.g. 0.5; needs --act-bits, --calib)")
    q.add_argument("--clip-search", action="store_true",
                   help="per-group clipping range with the least (input-weighted with --calib) squared error")
    q.add_argument("--lkd", action="store_true", help="layer-by-layer distillation on --calib")
    q.add_argument("--lkd-steps", type=int, default=10)
    q.add_argument("--lkd-lr", type=float, default=3e-4)
    q.add_argument("--lkd-learn-ranges", action="store_true", help="LKD also trains each group's scale (and zero)")
    calib_args(q, required=False)

    x = sub.add_parser("xtc", help="XTC: layer reduction + 1/2-bit weights + distillation")
    model_args(x)
    x.add_argument("--weight-bits", type=int, choices=[1, 2], default=2)
    x.add_argument("--keep-layers", default=None, help="comma-separated teacher layer indices to keep")
    x.add_argument("--steps", type=int, default=200)
    x.add_argument("--lr", type=float, default=5e-5)
    calib_args(x, required=True)

    pr = sub.add_parser("prune", help="sparse / 2:4 / channel (row) / head pruning")
    model_args(pr)
    pr.add_argument("--method", choices=["sparse", "2:4", "channel", "head"], required=True)
    pr.add_argument("--ratio", type=float, default=None, help="fraction removed (not for 2:4)")

    lr = sub.add_parser("lowrank", help="SVD low-rank factorization of linears")
    model_args(lr)
    lr.add_argument("--rank", type=int, default=None)
    lr.add_argument("--rank-ratio", type=float, default=None)

    ex = sub.add_parser("export-onnx", help="export a compressed directory to ONNX (QDQ) and check it in onnxruntime")
    ex.add_argument("compressed_dir")
    ex.add_argument("--out", required=True)
    ex.add_argument("--seq-len", type=int, default=16)
    ex.add_argument("--tolerance", type=float, default=1e-3, help="max |onnx - torch| allowed")

    info = sub.add_parser("info", help="summarize a compressed directory")
    info.add_argument("compressed_dir")
    return p


def _tokenizer(args: argparse.Namespace) -> Any:
    from transformers import AutoTokenizer

    src = args.tokenizer or args.model_dir
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file and not args.tokenizer else {}
    return AutoTokenizer.from_pretrained(src, **kwargs)


def _batches(args: argparse.Namespace) -> list | None:
    if not args.calib:
        return None
    from .calibration import calibration_batches

    return calibration_batches(args.calib, _tokenizer(args), args.calib_samples, args.seq_len, args.batch_size)


def _check_out(args: argparse.Namespace) -> None:
    from .model_utils import CompressionInputError

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CompressionInputError(f"output directory {out} exists and is not empty; pass --overwrite")


def _summary(name: str, before: int, after: int, seconds: float, extra: str = "") -> str:
    from .progress import format_table

    row = {"method": name, "size before (MB)": before / 2**20, "size after (MB)": after / 2**20,
           "ratio": before / max(after, 1), "time (s)": seconds, "notes": extra}
    return format_table([row], list(row))


def _run(args: argparse.Namespace) -> int:
    from . import api_cli as ops

    start = time.perf_counter()
    if args.command == "info":
        print(ops.info(args.compressed_dir))
        return 0
    if args.command == "export-onnx":
        diff, path = ops.export(args.compressed_dir, args.out, args.seq_len)
        ok = diff <= args.tolerance
        print(f"exported {path}; onnxruntime vs torch max |diff| = {diff:.3g} ({'ok' if ok else 'TOO LARGE'})")
        return 0 if ok else 1
    _check_out(args)
    ops.precheck(args)
    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    model = ops.load(args)
    before = ops.size(model)
    if args.command == "quantize":
        out, note = ops.quantize(model, args, _batches(args))
    elif args.command == "xtc":
        out, note = ops.xtc(model, args, _batches(args))
    elif args.command == "prune":
        out, note = ops.prune(model, args)
    else:
        out, note = ops.lowrank(model, args)
    tok = None
    try:
        tok = _tokenizer(args)
    except Exception:  # a model without a tokenizer is still a valid model to compress
        tok = None
    from .export.checkpoint import save_compressed

    save_compressed(out, args.out, tokenizer=tok, overwrite=args.overwrite)
    print(_summary(args.command if args.command != "quantize" else args.method, before, ops.size(out),
                   time.perf_counter() - start, note))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .model_utils import CompressionInputError

    try:
        return _run(args)
    except (CompressionInputError, ValueError, FileNotFoundError) as exc:
        print(f"ds-compress {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
