// Optimizer kernels over flat fp32 master params, written once on the Vec vocabulary (vec.h).
// One pass per step: read grad (fp32/bf16/fp16), param and states; write param, states and
// optionally a bf16/fp16 copy of the param. Each thread streams one contiguous slice.
#pragma once
#include <cmath>
#include <omp.h>

#include "common.h"
#include "vec.h"

// Everything below lives in dsk::<ISA> so the per-ISA copies never merge at link time.
namespace dsk {
namespace DSK_ISA {

struct NoOut {};  // no low-precision copy requested

template <class O> inline void store_out(O* o, int64_t i, Vec v) { vstore(o + i, v); }
template <> inline void store_out<NoOut>(NoOut*, int64_t, Vec) {}
template <class O> inline void store_out_lane(O* o, int64_t i, float v) { Lane::store(o + i, v); }
template <> inline void store_out_lane<NoOut>(NoOut*, int64_t, float) {}

// Runs body(lo, hi) over [0, n) in chunks of 64K elements (256 KiB per fp32 stream), handed out
// dynamically: a thread that the OS delays (a busy machine) does not hold up the others' share.
// Chunk starts are multiples of 64 elements, so every chunk but the last is whole SIMD vectors.
template <class F> inline void parallel_slices(int64_t n, int threads, F body) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  threads = imax(1, int(imin<int64_t>(threads, chunks)));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) body(c * kChunk, imin(n, (c + 1) * kChunk));
}

template <class G, class O, class S>
void adam_typed(const AdamArgs& a) {
  const G* g = static_cast<const G*>(a.grad);
  O* out = static_cast<O*>(a.out_lowp);
  S* exp_avg = static_cast<S*>(a.exp_avg);
  S* exp_avg_sq = static_cast<S*>(a.exp_avg_sq);
  const bool l2 = a.weight_decay != 0.f && !a.adamw_mode;
  const float decay = a.decay;  // 1 - lr * wd in AdamW mode, else 1
  parallel_slices(a.n, a.threads, [&](int64_t lo, int64_t hi) {
    const Vec b1 = vset(a.beta1), b2 = vset(a.beta2), nb1 = vset(a.one_minus_beta1), nb2 = vset(a.one_minus_beta2);
    const Vec eps = vset(a.eps), wd = vset(a.weight_decay), dec = vset(decay);
    const Vec bc2 = vset(a.bc2_rsqrt), neg_step = vset(-a.step_size);
    int64_t i = lo;
    for (; i + Vec::W <= hi; i += Vec::W) {
      Vec gr = vload(g + i), p = vload(a.param + i);
      if (l2) gr = vfma(wd, p, gr);
      Vec m = vfma(b1, vload(exp_avg + i), nb1 * gr);
      Vec v = vfma(b2, vload(exp_avg_sq + i), nb2 * gr * gr);
      Vec denom = vfma(vsqrt(v), bc2, eps);
      p = vfma(neg_step, m / denom, p * dec);
      vstore(exp_avg + i, m);
      vstore(exp_avg_sq + i, v);
      vstore(a.param + i, p);
      store_out(out, i, p);
    }
    for (; i < hi; ++i) {
      float gr = Lane::load(g + i), p = a.param[i];
      if (l2) gr += a.weight_decay * p;
      float m = a.beta1 * Lane::load(exp_avg + i) + a.one_minus_beta1 * gr;
      float v = a.beta2 * Lane::load(exp_avg_sq + i) + a.one_minus_beta2 * gr * gr;
      p = p * decay - a.step_size * (m / (std::sqrt(v) * a.bc2_rsqrt + a.eps));
      Lane::store(exp_avg + i, m); Lane::store(exp_avg_sq + i, v); a.param[i] = p;
      store_out_lane(out, i, p);
    }
  });
}

template <class G, class O>
void adagrad_typed(const AdagradArgs& a) {
  const G* g = static_cast<const G*>(a.grad);
  O* out = static_cast<O*>(a.out_lowp);
  const bool l2 = a.weight_decay != 0.f;
  parallel_slices(a.n, a.threads, [&](int64_t lo, int64_t hi) {
    const Vec eps = vset(a.eps), wd = vset(a.weight_decay), neg_lr = vset(-a.lr);
    int64_t i = lo;
    for (; i + Vec::W <= hi; i += Vec::W) {
      Vec gr = vload(g + i), p = vload(a.param + i);
      if (l2) gr = vfma(wd, p, gr);
      Vec v = vfma(gr, gr, vload(a.exp_avg_sq + i));
      p = vfma(neg_lr, gr / (vsqrt(v) + eps), p);
      vstore(a.exp_avg_sq + i, v);
      vstore(a.param + i, p);
      store_out(out, i, p);
    }
    for (; i < hi; ++i) {
      float gr = Lane::load(g + i), p = a.param[i];
      if (l2) gr += a.weight_decay * p;
      float v = a.exp_avg_sq[i] + gr * gr;
      p = p - a.lr * (gr / (std::sqrt(v) + a.eps));
      a.exp_avg_sq[i] = v; a.param[i] = p;
      store_out_lane(out, i, p);
    }
  });
}

template <class G, class O>
void lion_typed(const LionArgs& a) {
  const G* g = static_cast<const G*>(a.grad);
  O* out = static_cast<O*>(a.out_lowp);
  const float decay = a.decay;
  parallel_slices(a.n, a.threads, [&](int64_t lo, int64_t hi) {
    const Vec b1 = vset(a.beta1), b2 = vset(a.beta2), nb1 = vset(a.one_minus_beta1), nb2 = vset(a.one_minus_beta2);
    const Vec dec = vset(decay), neg_lr = vset(-a.lr);
    int64_t i = lo;
    for (; i + Vec::W <= hi; i += Vec::W) {
      Vec gr = vload(g + i), p = vload(a.param + i), m = vload(a.exp_avg + i);
      Vec c = vfma(b1, m, nb1 * gr);
      p = vfma(neg_lr, vsign(c), p * dec);
      vstore(a.exp_avg + i, vfma(b2, m, nb2 * gr));
      vstore(a.param + i, p);
      store_out(out, i, p);
    }
    for (; i < hi; ++i) {
      float gr = Lane::load(g + i), p = a.param[i], m = a.exp_avg[i];
      float c = a.beta1 * m + a.one_minus_beta1 * gr;
      float s = c > 0.f ? 1.f : (c < 0.f ? -1.f : 0.f);
      a.param[i] = p * decay - a.lr * s;
      a.exp_avg[i] = a.beta2 * m + a.one_minus_beta2 * gr;
      store_out_lane(out, i, a.param[i]);
    }
  });
}

// STREAM triad with the same chunking and threads as the optimizers, to measure the bandwidth bound.
inline void triad(const TriadArgs& a) {
  parallel_slices(a.n, a.threads, [&](int64_t lo, int64_t hi) {
    const Vec s = vset(a.s);
    int64_t i = lo;
    for (; i + Vec::W <= hi; i += Vec::W) vstore(a.a + i, vfma(s, vload(a.c + i), vload(a.b + i)));
    for (; i < hi; ++i) a.a[i] = a.b[i] + a.s * a.c[i];
  });
}

// Expands the (grad dtype, out dtype) pair into the typed instantiation.
template <template <class, class> class K, class Args>
void dispatch_types(const Args& a) {
  auto with_out = [&](auto gtag) {
    using G = decltype(gtag);
    switch (a.out_dtype) {
      case kBF16: K<G, bf16_t>::run(a); break;
      case kF16: K<G, half_t>::run(a); break;
      default: K<G, NoOut>::run(a); break;
    }
  };
  switch (a.grad_dtype) {
    case kBF16: with_out(bf16_t{}); break;
    case kF16: with_out(half_t{}); break;
    default: with_out(float{}); break;
  }
}

template <class G, class O> struct AdamK {
  static void run(const AdamArgs& a) {
    if (a.state_dtype == kBF16) adam_typed<G, O, bf16_t>(a);
    else adam_typed<G, O, float>(a);
  }
};
template <class G, class O> struct AdagradK { static void run(const AdagradArgs& a) { adagrad_typed<G, O>(a); } };
template <class G, class O> struct LionK { static void run(const LionArgs& a) { lion_typed<G, O>(a); } };

}  // namespace DSK_ISA
}  // namespace dsk
