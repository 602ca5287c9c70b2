// Group-wise INT8/INT4 quantize/dequantize and the fused dequantize+matmul (weight-only), per ISA.
// Formulas match ds_kernels/reference.py exactly (fp32 math, no contraction, round half to even).
#pragma once
#include <cmath>
#include <omp.h>
#include <cstring>

#include "common.h"
#include "vec.h"

// Everything below lives in dsk::<ISA> so the per-ISA copies never merge at link time.
namespace dsk {
namespace DSK_ISA {

template <class T>
void quantize_typed(const QuantArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  const int qmax = (1 << (a.bits - 1)) - 1, lo = -(1 << (a.bits - 1));
  const int64_t gs = a.group_size;
#pragma omp parallel num_threads(imax(1, a.threads))
  {
    Buffer<float> buf(gs);
    Buffer<int8_t> q(gs);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < a.n_groups; ++g) {
      const T* xg = x + g * gs;
      for (int64_t i = 0; i < gs; ++i) buf[i] = Lane::load(xg + i);
      float scale, offset = 0.f;
      int qlo, qhi;
      if (a.symmetric) {
        float amax = 0.f;
        for (int64_t i = 0; i < gs; ++i) amax = std::max(amax, std::fabs(buf[i]));
        scale = amax / float(qmax);
        qlo = -qmax; qhi = qmax;
      } else {
        float mn = buf[0], mx = buf[0];
        for (int64_t i = 1; i < gs; ++i) { mn = imin(mn, buf[i]); mx = imax(mx, buf[i]); }
        scale = (mx - mn) / float((1 << a.bits) - 1);
        offset = mn;
        qlo = 0; qhi = (1 << a.bits) - 1;
        a.zero_point[g] = mn - float(lo) * scale;
      }
      const float inv = scale > 0.f ? 1.f / scale : 0.f;
      const int shift = a.symmetric ? 0 : lo;
      for (int64_t i = 0; i < gs; ++i) {
        float v = a.symmetric ? buf[i] * inv : (buf[i] - offset) * inv;
        float r = std::nearbyint(v);
        r = imin(imax(r, float(qlo)), float(qhi));
        q[i] = int8_t(int(r) + shift);
      }
      a.scale[g] = scale;
      if (a.bits == 8) {
        std::memcpy(static_cast<int8_t*>(a.q) + g * gs, q.data(), size_t(gs));
      } else {
        uint8_t* dst = static_cast<uint8_t*>(a.q) + g * gs / 2;
        for (int64_t i = 0; i < gs; i += 2) dst[i / 2] = uint8_t((q[i] & 0xf) | ((q[i + 1] & 0xf) << 4));
      }
    }
  }
}

inline void quantize_any(const QuantArgs& a) {
  switch (a.x_dtype) {
    case kBF16: quantize_typed<bf16_t>(a); break;
    case kF16: quantize_typed<half_t>(a); break;
    default: quantize_typed<float>(a); break;
  }
}

template <class O>
void dequantize_typed(const DequantArgs& a) {
  O* out = static_cast<O*>(a.out);
  const int64_t gs = a.group_size;
#pragma omp parallel for num_threads(imax(1, a.threads)) schedule(static)
  for (int64_t g = 0; g < a.n_groups; ++g) {
    const float s = a.scale[g], z = a.zero_point ? a.zero_point[g] : 0.f;
    O* og = out + g * gs;
    if (a.bits == 8) {
      const int8_t* qg = static_cast<const int8_t*>(a.q) + g * gs;
      for (int64_t i = 0; i < gs; ++i) {
        float v = float(qg[i]) * s;
        Lane::store(og + i, a.zero_point ? v + z : v);
      }
    } else {
      const uint8_t* qg = static_cast<const uint8_t*>(a.q) + g * gs / 2;
      for (int64_t i = 0; i < gs; ++i) {
        float v = int4_at(qg, i) * s;
        Lane::store(og + i, a.zero_point ? v + z : v);
      }
    }
  }
}

inline void dequantize_any(const DequantArgs& a) {
  switch (a.out_dtype) {
    case kBF16: dequantize_typed<bf16_t>(a); break;
    case kF16: dequantize_typed<half_t>(a); break;
    default: dequantize_typed<float>(a); break;
  }
}

// dot(x[0:len], w[0:len]) where w are stored integers; four accumulators hide the FMA latency.
template <int BITS>
inline float dot_q(const float* x, const void* qrow, int64_t start, int64_t len) {
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  constexpr int W = Vec::W;
  Vec acc0 = vset(0.f), acc1 = vset(0.f), acc2 = vset(0.f), acc3 = vset(0.f);
  auto load = [&](int64_t j) {
    if constexpr (BITS == 8) return vload_i8(static_cast<const int8_t*>(qrow) + start + j);
    else return vload_i4(static_cast<const uint8_t*>(qrow) + (start + j) / 2);
  };
  for (; i + 4 * W <= len; i += 4 * W) {
    acc0 = vfma(vload(x + i), load(i), acc0);
    acc1 = vfma(vload(x + i + W), load(i + W), acc1);
    acc2 = vfma(vload(x + i + 2 * W), load(i + 2 * W), acc2);
    acc3 = vfma(vload(x + i + 3 * W), load(i + 3 * W), acc3);
  }
  for (; i + W <= len; i += W) acc0 = vfma(vload(x + i), load(i), acc0);
  float s = vsum((acc0 + acc1) + (acc2 + acc3));
#else
  float s = 0.f;
#endif
  for (; i < len; ++i) {
    float w = BITS == 8 ? float(static_cast<const int8_t*>(qrow)[start + i])
                        : int4_at(static_cast<const uint8_t*>(qrow), start + i);
    s += x[i] * w;
  }
  return s;
}

inline float dot_f(const float* x, const float* w, int64_t len) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__) || defined(__AVX2__)
  constexpr int W = Vec::W;
  Vec acc0 = vset(0.f), acc1 = vset(0.f), acc2 = vset(0.f), acc3 = vset(0.f);
  for (; i + 4 * W <= len; i += 4 * W) {
    acc0 = vfma(vload(x + i), vload(w + i), acc0);
    acc1 = vfma(vload(x + i + W), vload(w + i + W), acc1);
    acc2 = vfma(vload(x + i + 2 * W), vload(w + i + 2 * W), acc2);
    acc3 = vfma(vload(x + i + 3 * W), vload(w + i + 3 * W), acc3);
  }
  for (; i + W <= len; i += W) acc0 = vfma(vload(x + i), vload(w + i), acc0);
  s = vsum((acc0 + acc1) + (acc2 + acc3));
#endif
  for (; i < len; ++i) s += x[i] * w[i];
  return s;
}

// Small batches (memory-bound): stream each weight row once, scaling per-group integer dot products.
// Larger batches: dequantize a row into an L1-resident fp32 buffer once and reuse it for every x row.
template <int BITS>
void qmatmul_bits(const QMatmulArgs& a) {
  const int64_t gs = a.group_size, groups = a.k / gs;
  const int64_t row_stride = BITS == 8 ? a.k : a.k / 2;  // bytes per weight row
  Buffer<float> xsum(a.zero_point ? a.m * groups : 0);
  if (a.zero_point) {  // sum of x over each group: the zero point's contribution
    for (int64_t r = 0; r < a.m; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0.f;
        for (int64_t i = 0; i < gs; ++i) s += a.x[r * a.k + g * gs + i];
        xsum[r * groups + g] = s;
      }
  }
  const bool stream_rows = a.m <= 2;
#pragma omp parallel num_threads(imax(1, a.threads))
  {
    Buffer<float> wrow(stream_rows ? 0 : a.k);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < a.n; ++n) {
      const uint8_t* qrow = static_cast<const uint8_t*>(a.q) + n * row_stride;
      const float* sc = a.scale + n * groups;
      const float* zp = a.zero_point ? a.zero_point + n * groups : nullptr;
      const float b = a.bias ? a.bias[n] : 0.f;
      if (stream_rows) {
        for (int64_t r = 0; r < a.m; ++r) {
          const float* xr = a.x + r * a.k;
          float acc = 0.f;
          for (int64_t g = 0; g < groups; ++g) {
            acc += dot_q<BITS>(xr + g * gs, qrow, g * gs, gs) * sc[g];
            if (zp) acc += zp[g] * xsum[r * groups + g];
          }
          a.out[r * a.n + n] = acc + b;
        }
      } else {
        for (int64_t g = 0; g < groups; ++g) {
          const float s = sc[g], z = zp ? zp[g] : 0.f;
          float* wg = wrow.data() + g * gs;
          for (int64_t i = 0; i < gs; ++i) {
            float q = BITS == 8 ? float(reinterpret_cast<const int8_t*>(qrow)[g * gs + i]) : int4_at(qrow, g * gs + i);
            wg[i] = q * s + z;
          }
        }
        for (int64_t r = 0; r < a.m; ++r) a.out[r * a.n + n] = dot_f(a.x + r * a.k, wrow.data(), a.k) + b;
      }
    }
  }
}

inline void qmatmul_any(const QMatmulArgs& a) {
  if (a.bits == 8) qmatmul_bits<8>(a);
  else qmatmul_bits<4>(a);
}

}  // namespace DSK_ISA
}  // namespace dsk
