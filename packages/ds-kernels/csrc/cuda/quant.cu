// Group-wise INT8/INT4 quantize/dequantize on the GPU, the same formulas and layout as the CPU ops
// (ds_kernels/reference.py): one block per group, block-wide min/max by shared-memory reduction.
#include "compat.h"

namespace dsg {

constexpr int kThreads = 256;

__device__ __forceinline__ void block_minmax(float& mn, float& mx) {
  __shared__ float smin[kThreads], smax[kThreads];
  smin[threadIdx.x] = mn;
  smax[threadIdx.x] = mx;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      smin[threadIdx.x] = fminf(smin[threadIdx.x], smin[threadIdx.x + s]);
      smax[threadIdx.x] = fmaxf(smax[threadIdx.x], smax[threadIdx.x + s]);
    }
    __syncthreads();
  }
  mn = smin[0];
  mx = smax[0];
  __syncthreads();
}

template <class T>
__global__ void quantize_kernel(const T* x, int64_t group_size, int bits, int symmetric, int8_t* q8,
                                uint8_t* q4, float* scale, float* zero_point) {
  const int64_t g = blockIdx.x;
  const T* xg = x + g * group_size;
  float mn = INFINITY, mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < group_size; i += blockDim.x) {
    float v = to_float(xg[i]);
    if (symmetric) v = fabsf(v);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
  block_minmax(mn, mx);
  const int qmax = (1 << (bits - 1)) - 1, lo = -(1 << (bits - 1));
  float s, offset = 0.f;
  int qlo, qhi, shift = 0;
  if (symmetric) {
    s = __fdiv_rn(mx, float(qmax));
    qlo = -qmax; qhi = qmax;
  } else {
    s = __fdiv_rn(mx - mn, float((1 << bits) - 1));
    offset = mn; qlo = 0; qhi = (1 << bits) - 1; shift = lo;
  }
  const float inv = s > 0.f ? __fdiv_rn(1.f, s) : 0.f;
  if (threadIdx.x == 0) {
    scale[g] = s;
    if (!symmetric) zero_point[g] = __fsub_rn(mn, __fmul_rn(float(lo), s));
  }
  auto quant = [&](int64_t i) {
    float v = __fmul_rn(symmetric ? to_float(xg[i]) : __fsub_rn(to_float(xg[i]), offset), inv);
    float r = fminf(fmaxf(rintf(v), float(qlo)), float(qhi));
    return int(r) + shift;
  };
  if (bits == 8) {
    for (int64_t i = threadIdx.x; i < group_size; i += blockDim.x) q8[g * group_size + i] = int8_t(quant(i));
  } else {
    for (int64_t i = threadIdx.x; i < group_size / 2; i += blockDim.x)
      q4[g * group_size / 2 + i] = uint8_t((quant(2 * i) & 0xf) | ((quant(2 * i + 1) & 0xf) << 4));
  }
}

template <class O>
__global__ void dequantize_kernel(const void* q, int bits, const float* scale, const float* zero_point,
                                  int64_t group_size, int64_t numel, O* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / group_size;
    float v;
    if (bits == 8) {
      v = float(static_cast<const int8_t*>(q)[i]);
    } else {
      int b = (static_cast<const uint8_t*>(q)[i >> 1] >> ((i & 1) * 4)) & 0xf;
      v = float(b >= 8 ? b - 16 : b);
    }
    v = __fmul_rn(v, scale[g]);
    if (zero_point) v = __fadd_rn(v, zero_point[g]);
    out[i] = from_float<O>(v);
  }
}

}  // namespace dsg

DS_EXPORT int ds_cuda_quantize(const void* x, int x_dtype, int64_t n_groups, int64_t group_size, int bits,
                               int symmetric, void* q, float* scale, float* zero_point, void* stream) {
  using namespace dsg;
  auto s = static_cast<dsStream_t>(stream);
  int8_t* q8 = bits == 8 ? static_cast<int8_t*>(q) : nullptr;
  uint8_t* q4 = bits == 4 ? static_cast<uint8_t*>(q) : nullptr;
  DSG_DISPATCH(x_dtype, T, quantize_kernel<T><<<unsigned(n_groups), kThreads, 0, s>>>(
      static_cast<const T*>(x), group_size, bits, symmetric, q8, q4, scale, zero_point));
  return last_error();
}

DS_EXPORT int ds_cuda_dequantize(const void* q, int bits, const float* scale, const float* zero_point,
                                 int64_t n_groups, int64_t group_size, void* out, int out_dtype, void* stream) {
  using namespace dsg;
  const int64_t numel = n_groups * group_size;
  const unsigned blocks = grid_for(numel, kThreads);
  auto s = static_cast<dsStream_t>(stream);
  DSG_DISPATCH(out_dtype, O, dequantize_kernel<O><<<blocks, kThreads, 0, s>>>(
      q, bits, scale, zero_point, group_size, numel, static_cast<O*>(out)));
  return last_error();
}
