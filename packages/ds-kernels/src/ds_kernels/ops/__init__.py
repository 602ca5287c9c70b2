"""`ds_kernels.ops.*`: the op modules under one namespace (the same modules as `ds_kernels.<name>`)."""

from ds_kernels import aio, cuda, optim, quant, reference

__all__ = ["aio", "cuda", "optim", "quant", "reference"]
