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

// Integer weights of one row to fp32 lanes: W values starting at element j (j a multiple of W).
template <int BITS> inline Vec load_q(const void* qrow, int64_t j) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (BITS == 8) return vload_i8(static_cast<const int8_t*>(qrow) + j);
  else return vload_i4(static_cast<const uint8_t*>(qrow) + j / 2);
#else
  return {BITS == 8 ? float(static_cast<const int8_t*>(qrow)[j]) : int4_at(static_cast<const uint8_t*>(qrow), j)};
#endif
}

template <int BITS> inline float q_at(const void* qrow, int64_t j) {
  return BITS == 8 ? float(static_cast<const int8_t*>(qrow)[j]) : int4_at(static_cast<const uint8_t*>(qrow), j);
}

// Batch 1-2 (memory-bound): stream each weight row once. Per group, integer-valued products are
// summed in vector lanes, scaled by the group's scale into a running vector; one horizontal sum per row.
template <int BITS>
inline float row_dot_q(const float* x, const void* qrow, const float* sc, const float* zp, const float* xsum,
                       int64_t groups, int64_t gs) {
  constexpr int W = Vec::W;
  Vec total = vset(0.f);
  float scalar = 0.f;
  const int64_t full = gs / W * W;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t base = g * gs;
    Vec acc0 = vset(0.f), acc1 = vset(0.f);
    int64_t i = 0;
    for (; i + 2 * W <= full; i += 2 * W) {
      acc0 = vfma(vload(x + base + i), load_q<BITS>(qrow, base + i), acc0);
      acc1 = vfma(vload(x + base + i + W), load_q<BITS>(qrow, base + i + W), acc1);
    }
    for (; i < full; i += W) acc0 = vfma(vload(x + base + i), load_q<BITS>(qrow, base + i), acc0);
    float tail = 0.f;
    for (; i < gs; ++i) tail += x[base + i] * q_at<BITS>(qrow, base + i);
    total = vfma(acc0 + acc1, vset(sc[g]), total);
    scalar += tail * sc[g];
    if (zp) scalar += zp[g] * xsum[g];
  }
  return vsum(total) + scalar;
}

// Larger batches: dequantize the row once into an L1-resident buffer, then four x rows share each load.
template <int BITS>
inline void dequant_row(const void* qrow, const float* sc, const float* zp, int64_t groups, int64_t gs, float* w) {
  constexpr int W = Vec::W;
  const int64_t full = gs / W * W;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t base = g * gs;
    const Vec s = vset(sc[g]), z = vset(zp ? zp[g] : 0.f);
    int64_t i = 0;
    for (; i < full; i += W) vstore(w + base + i, vfma(load_q<BITS>(qrow, base + i), s, z));
    for (; i < gs; ++i) w[base + i] = q_at<BITS>(qrow, base + i) * sc[g] + (zp ? zp[g] : 0.f);
  }
}

inline void dot4(const float* x0, const float* x1, const float* x2, const float* x3, const float* w, int64_t k,
                 float* out) {
  constexpr int W = Vec::W;
  Vec a0 = vset(0.f), a1 = vset(0.f), a2 = vset(0.f), a3 = vset(0.f);
  int64_t i = 0;
  for (; i + W <= k; i += W) {
    Vec wv = vload(w + i);
    a0 = vfma(vload(x0 + i), wv, a0);
    a1 = vfma(vload(x1 + i), wv, a1);
    a2 = vfma(vload(x2 + i), wv, a2);
    a3 = vfma(vload(x3 + i), wv, a3);
  }
  float s0 = vsum(a0), s1 = vsum(a1), s2 = vsum(a2), s3 = vsum(a3);
  for (; i < k; ++i) {
    s0 += x0[i] * w[i]; s1 += x1[i] * w[i]; s2 += x2[i] * w[i]; s3 += x3[i] * w[i];
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

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
#pragma omp for schedule(dynamic, 16)
    for (int64_t n = 0; n < a.n; ++n) {
      const uint8_t* qrow = static_cast<const uint8_t*>(a.q) + n * row_stride;
      const float* sc = a.scale + n * groups;
      const float* zp = a.zero_point ? a.zero_point + n * groups : nullptr;
      const float b = a.bias ? a.bias[n] : 0.f;
      if (stream_rows) {
        for (int64_t r = 0; r < a.m; ++r)
          a.out[r * a.n + n] = row_dot_q<BITS>(a.x + r * a.k, qrow, sc, zp, zp ? xsum.data() + r * groups : nullptr,
                                               groups, gs) + b;
        continue;
      }
      dequant_row<BITS>(qrow, sc, zp, groups, gs, wrow.data());
      int64_t r = 0;
      float s[4];
      for (; r + 4 <= a.m; r += 4) {
        const float* x = a.x + r * a.k;
        dot4(x, x + a.k, x + 2 * a.k, x + 3 * a.k, wrow.data(), a.k, s);
        for (int j = 0; j < 4; ++j) a.out[(r + j) * a.n + n] = s[j] + b;
      }
      for (; r < a.m; ++r) {
        const float* x = a.x + r * a.k;
        dot4(x, x, x, x, wrow.data(), a.k, s);
        a.out[r * a.n + n] = s[0] + b;
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
