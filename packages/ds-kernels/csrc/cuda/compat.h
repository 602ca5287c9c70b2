// CUDA/HIP portability and element-type helpers for the GPU ops. The sources compile with nvcc, or
// with hipcc (which defines __HIP_PLATFORM_AMD__), through the few aliases below.
#pragma once
#include <cstdint>

#if defined(__HIP_PLATFORM_AMD__)
#include <hip/hip_bf16.h>
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
typedef hipStream_t dsStream_t;
typedef __hip_bfloat16 ds_bf16;
#define dsGetLastError hipGetLastError
#define dsGetErrorString hipGetErrorString
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
typedef cudaStream_t dsStream_t;
typedef __nv_bfloat16 ds_bf16;
#define dsGetLastError cudaGetLastError
#define dsGetErrorString cudaGetErrorString
#endif

#define DS_EXPORT extern "C" __attribute__((visibility("default")))

namespace dsg {

// Element type codes, the same as the CPU ops (ds_kernels/_checks.py).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(ds_bf16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ ds_bf16 from_float<ds_bf16>(float v) { return __float2bfloat16_rn(v); }

inline int last_error() { return int(dsGetLastError()); }

// Grid size for a grid-stride loop over `numel` elements (capped; each thread then loops).
inline unsigned grid_for(int64_t numel, int threads) {
  int64_t blocks = (numel + threads - 1) / threads;
  return unsigned(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace dsg

// Runs `body` with T bound to the element type named by `code`.
#define DSG_DISPATCH(code, T, ...)                      \
  switch (code) {                                       \
    case dsg::kBF16: { using T = ds_bf16; __VA_ARGS__; break; } \
    case dsg::kF16: { using T = __half; __VA_ARGS__; break; }   \
    default: { using T = float; __VA_ARGS__; break; }           \
  }
