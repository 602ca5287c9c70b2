"""Bit-packing of 1-bit and 2-bit weight codes (XTC) along the last dim, little end first."""
from __future__ import annotations

import torch

__all__ = ["pack_codes", "unpack_codes"]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes < 2**bits, shape [rows, n] -> uint8 [rows, ceil(n * bits / 8)] (zero-padded)."""
    per_byte = 8 // bits
    rows, n = codes.shape
    pad = (-n) % per_byte
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, pad)).reshape(rows, -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 codes of shape [rows, n]."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(packed.shape[0], -1)[:, :n].to(torch.uint8)
