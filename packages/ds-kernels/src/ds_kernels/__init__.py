"""ds_kernels: Compiled ops (C++ SIMD/OpenMP and CUDA/HIP) with a PyTorch reference for each."""

__version__ = "0.1.0"
