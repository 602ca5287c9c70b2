// Fused bias + GeLU: out[r, c] = gelu(x[r, c] + bias[c]), exact (erf) or tanh approximation,
// computed in fp32 and stored in the input's type. One pass instead of two over the activation.
#include "compat.h"

namespace dsg {

__device__ __forceinline__ float gelu(float v, int tanh_approx) {
  if (tanh_approx) {
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * v * (1.f + tanhf(k * (v + 0.044715f * v * v * v)));
  }
  return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
}

template <class T>
__global__ void bias_gelu_kernel(const T* x, const T* bias, T* out, int64_t numel, int64_t cols, int tanh_approx) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    float v = to_float(x[i]);
    if (bias) v += to_float(bias[i % cols]);
    out[i] = from_float<T>(gelu(v, tanh_approx));
  }
}

}  // namespace dsg

DS_EXPORT int ds_cuda_bias_gelu(const void* x, const void* bias, void* out, int64_t numel, int64_t cols,
                                int dtype, int tanh_approx, void* stream) {
  using namespace dsg;
  const int threads = 256;
  const unsigned blocks = grid_for(numel, threads);
  if (numel == 0) return 0;
  DSG_DISPATCH(dtype, T, bias_gelu_kernel<T><<<blocks, threads, 0, static_cast<dsStream_t>(stream)>>>(
      static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(out), numel, cols, tanh_approx));
  return last_error();
}
