"""Consolidate a ds-train checkpoint into one fp32 state dict (DeepSpeed's zero_to_fp32.py role).

    ds-zero-to-fp32 <checkpoint_dir> <output> [--tag TAG] [--format safetensors|torch]

The trainable parameters come from the fp32 master shards (regathered from any number of ranks);
frozen parameters and buffers come from the module state dict, upcast to fp32 when floating.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ds_train.checkpoint.format import CheckpointError

__all__ = ["get_fp32_state_dict_from_zero_checkpoint", "convert_zero_checkpoint_to_fp32_state_dict", "main"]


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Name -> fp32 tensor for every entry of the module's state dict."""
    from ds_train.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(checkpoint_dir, tag)
    module_sd = reader.module_state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, t in module_sd.items():
        out[name] = t.float() if t.is_floating_point() else t
    for g in range(reader.group_count()):
        for name, t in reader.full_tensors(g, "fp32").items():
            out[name] = t
    # tied weights: every alias points at the same fp32 tensor as its stored name
    for alias, name in reader.manifest.get("module_aliases", {}).items():
        out[alias] = out[name]
    return out


def convert_zero_checkpoint_to_fp32_state_dict(
    checkpoint_dir: str, output_file: str, tag: str | None = None, safe_serialization: bool = True
) -> Path:
    """Write the consolidated fp32 state dict to `output_file` (safetensors, or torch.save format)."""
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    out = Path(output_file)
    if out.is_dir() or str(output_file).endswith(os.sep):
        out = out / ("model.safetensors" if safe_serialization else "pytorch_model.bin")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if safe_serialization:
        from safetensors.torch import save_file

        # safetensors stores each storage once: drop aliases of tied weights, record them as metadata
        seen: dict[int, str] = {}
        unique: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        for name, t in state.items():
            if id(t) in seen:
                aliases[name] = seen[id(t)]
                continue
            seen[id(t)] = name
            unique[name] = t.contiguous()
        meta = {"format": "pt"}
        if aliases:
            meta["tied_weights"] = ",".join(f"{a}={b}" for a, b in aliases.items())
        save_file(unique, str(tmp), metadata=meta)
    else:
        torch.save(state, tmp)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ds-zero-to-fp32", description="Consolidate a ds-train (ZeRO) checkpoint into one fp32 state dict."
    )
    parser.add_argument("checkpoint_dir", help="the directory passed to save_checkpoint (holds 'latest')")
    parser.add_argument("output", help="output file (.safetensors, or .bin/.pt for torch format) or directory")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in 'latest')")
    parser.add_argument("--format", choices=["safetensors", "torch"], default=None,
                        help="output format (default: from the output's extension; safetensors otherwise)")
    args = parser.parse_args(argv)
    fmt = args.format or ("torch" if args.output.endswith((".bin", ".pt", ".pth")) else "safetensors")
    try:
        out = convert_zero_checkpoint_to_fp32_state_dict(args.checkpoint_dir, args.output, args.tag,
                                                         safe_serialization=fmt == "safetensors")
    except CheckpointError as exc:
        print(f"ds-zero-to-fp32: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote fp32 state dict to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
