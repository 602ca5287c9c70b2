// Multi-tensor fused Adam/AdamW: one launch updates many tensors. The host packs up to kMaxTensors
// tensor addresses and a block -> (tensor, chunk) map into the kernel argument (no device metadata copy).
#include "compat.h"

namespace dsg {

constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 256;
constexpr int kChunk = 4096;  // elements per block
constexpr int kThreads = 256;

struct TensorList {
  float* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  int64_t numel[kMaxTensors];
  int16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

struct AdamHyper {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay, step_size, bc2_rsqrt;
  int adamw_mode;
};

template <class G>
__global__ void adam_kernel(TensorList tl, AdamHyper h) {
  const int t = tl.block_tensor[blockIdx.x];
  const int64_t start = int64_t(tl.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, tl.numel[t]);
  float* p = tl.param[t];
  const G* g = static_cast<const G*>(tl.grad[t]);
  float* m = tl.exp_avg[t];
  float* v = tl.exp_avg_sq[t];
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    float gr = to_float(g[i]);
    float pv = p[i];
    if (h.weight_decay != 0.f && !h.adamw_mode) gr = fmaf(h.weight_decay, pv, gr);
    float mv = fmaf(h.beta1, m[i], h.one_minus_beta1 * gr);
    float vv = fmaf(h.beta2, v[i], h.one_minus_beta2 * gr * gr);
    float denom = fmaf(sqrtf(vv), h.bc2_rsqrt, h.eps);
    p[i] = fmaf(-h.step_size, mv / denom, pv * h.decay);
    m[i] = mv;
    v[i] = vv;
  }
}

}  // namespace dsg

// Updates `n` tensors. grad_dtype applies to every grad; params and states are fp32.
// Returns 0 or the runtime's error code (ds_cuda_error_string gives the text).
DS_EXPORT int ds_cuda_multi_tensor_adam(int n, float** params, const void** grads, float** exp_avgs,
                                        float** exp_avg_sqs, const int64_t* numels, int grad_dtype,
                                        float beta1, float beta2, float one_minus_beta1, float one_minus_beta2,
                                        float eps, float weight_decay, float decay, float step_size,
                                        float bc2_rsqrt, int adamw_mode, void* stream) {
  using namespace dsg;
  AdamHyper h{beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay, step_size, bc2_rsqrt, adamw_mode};
  TensorList tl;
  int nt = 0, nb = 0;
  auto launch = [&]() -> int {
    if (nb == 0) return 0;
    DSG_DISPATCH(grad_dtype, G, adam_kernel<G><<<nb, kThreads, 0, static_cast<dsStream_t>(stream)>>>(tl, h));
    nt = nb = 0;
    return last_error();
  };
  for (int i = 0; i < n; ++i) {
    if (numels[i] == 0) continue;
    if (nt == kMaxTensors) { int e = launch(); if (e) return e; }
    tl.param[nt] = params[i]; tl.grad[nt] = grads[i]; tl.exp_avg[nt] = exp_avgs[i];
    tl.exp_avg_sq[nt] = exp_avg_sqs[i]; tl.numel[nt] = numels[i];
    const int64_t chunks = (numels[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      if (nb == kMaxBlocks) {
        // Flush the full launch; the current tensor continues in the next one at slot 0.
        int64_t keep_numel = tl.numel[nt];
        float* kp = tl.param[nt]; const void* kg = tl.grad[nt]; float* km = tl.exp_avg[nt]; float* kv = tl.exp_avg_sq[nt];
        ++nt;
        int e = launch(); if (e) return e;
        tl.param[0] = kp; tl.grad[0] = kg; tl.exp_avg[0] = km; tl.exp_avg_sq[0] = kv; tl.numel[0] = keep_numel;
        nt = 0;
      }
      tl.block_tensor[nb] = int16_t(nt);
      tl.block_chunk[nb] = int32_t(c);
      ++nb;
    }
    ++nt;
  }
  return launch();
}

DS_EXPORT const char* ds_cuda_error_string(int code) { return dsGetErrorString(static_cast<decltype(dsGetLastError())>(code)); }
