"""ds_kernels: compiled CPU (SIMD + OpenMP) and CUDA ops, each with a PyTorch reference twin.

- `ds_kernels.optim`: CPU Adam/AdamW, Adagrad, Lion over flat fp32 master params (`DSCPUAdam`, ...).
- `ds_kernels.aio`: async tensor file I/O for NVMe offload (`AsyncIO`, `aligned_empty`).
- `ds_kernels.quant`: group-wise INT8/INT4 quantization and a fused dequantize+matmul.
- `ds_kernels.reference`: the plain-PyTorch twin of every op (the fallback and the test oracle).
"""

from ds_kernels._loader import isa, set_isa

__version__ = "0.1.0"

__all__ = ["isa", "set_isa", "__version__"]
