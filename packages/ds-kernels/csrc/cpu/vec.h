// A tiny SIMD vocabulary (fp32 lanes) so each kernel is written once and compiled per ISA.
// The ISA is whatever this translation unit is compiled for: AVX-512F, AVX2+FMA+F16C, or scalar.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "convert.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// Everything below lives in dsk::<ISA> so the per-ISA copies never merge at link time.
namespace dsk {
namespace DSK_ISA {

// Own min/max/buffer instead of std:: templates: a std:: instantiation compiled with AVX-512 flags
// could be merged by the linker into the scalar path and fault on an older CPU.
template <class T> inline T imin(T a, T b) { return a < b ? a : b; }
template <class T> inline T imax(T a, T b) { return a < b ? b : a; }
template <class T> struct Buffer {
  explicit Buffer(int64_t n) : p(n > 0 ? new T[n] : nullptr) {}
  ~Buffer() { delete[] p; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T& operator[](int64_t i) { return p[i]; }
  T* data() { return p; }
  T* p;
};

struct bf16_t { uint16_t x; };
struct half_t { uint16_t x; };

#if defined(__AVX512F__)
struct Vec {
  static constexpr int W = 16;
  __m512 v;
};
inline Vec vset(float a) { return {_mm512_set1_ps(a)}; }
inline Vec vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec vload(const bf16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
inline Vec vload(const half_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
inline void vstore(bf16_t* p, Vec a) {
  __m512i u = _mm512_castps_si512(a.v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline void vstore(half_t* p, Vec a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a*b+c
inline Vec vsqrt(Vec a) { return {_mm512_sqrt_ps(a.v)}; }
inline Vec vsign(Vec a) {
  __mmask16 pos = _mm512_cmp_ps_mask(a.v, _mm512_setzero_ps(), _CMP_GT_OQ);
  __mmask16 neg = _mm512_cmp_ps_mask(a.v, _mm512_setzero_ps(), _CMP_LT_OQ);
  __m512 r = _mm512_mask_mov_ps(_mm512_setzero_ps(), pos, _mm512_set1_ps(1.0f));
  return {_mm512_mask_mov_ps(r, neg, _mm512_set1_ps(-1.0f))};
}
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a.v); }
// 16 int8 values / 16 packed int4 values (8 bytes) to fp32.
inline Vec vload_i8(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
inline Vec vload_i4(const uint8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  __m128i m = _mm_set1_epi8(0x0f);
  __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  __m128i v = _mm_unpacklo_epi8(lo, hi);
  v = _mm_sub_epi8(_mm_xor_si128(v, _mm_set1_epi8(8)), _mm_set1_epi8(8));  // sign-extend the nibble
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))};
}
#elif defined(__AVX2__)
struct Vec {
  static constexpr int W = 8;
  __m256 v;
};
inline Vec vset(float a) { return {_mm256_set1_ps(a)}; }
inline Vec vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Vec vload(const bf16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
inline Vec vload(const half_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
inline void vstore(bf16_t* p, Vec a) {
  __m256i u = _mm256_castps_si256(a.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void vstore(half_t* p, Vec a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vsqrt(Vec a) { return {_mm256_sqrt_ps(a.v)}; }
inline Vec vsign(Vec a) {
  __m256 z = _mm256_setzero_ps();
  __m256 pos = _mm256_and_ps(_mm256_cmp_ps(a.v, z, _CMP_GT_OQ), _mm256_set1_ps(1.0f));
  __m256 neg = _mm256_and_ps(_mm256_cmp_ps(a.v, z, _CMP_LT_OQ), _mm256_set1_ps(1.0f));
  return {_mm256_sub_ps(pos, neg)};
}
inline float vsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vec vload_i8(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
inline Vec vload_i4(const uint8_t* p) {  // 8 values from 4 bytes
  int32_t word; std::memcpy(&word, p, 4);
  __m128i b = _mm_cvtsi32_si128(word);
  __m128i m = _mm_set1_epi8(0x0f);
  __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  __m128i v = _mm_unpacklo_epi8(lo, hi);
  v = _mm_sub_epi8(_mm_xor_si128(v, _mm_set1_epi8(8)), _mm_set1_epi8(8));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))};
}
#else
struct Vec {
  static constexpr int W = 1;
  float v;
};
inline Vec vset(float a) { return {a}; }
inline Vec vload(const float* p) { return {*p}; }
inline Vec vload(const bf16_t* p) { return {bf16_to_float(p->x)}; }
inline Vec vload(const half_t* p) { return {half_to_float(p->x)}; }
inline void vstore(float* p, Vec a) { *p = a.v; }
inline void vstore(bf16_t* p, Vec a) { p->x = float_to_bf16(a.v); }
inline void vstore(half_t* p, Vec a) { p->x = float_to_half(a.v); }
inline Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
inline Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
inline Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
inline Vec operator/(Vec a, Vec b) { return {a.v / b.v}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }  // no hardware FMA on baseline x86-64
inline Vec vsqrt(Vec a) { return {std::sqrt(a.v)}; }
inline Vec vsign(Vec a) { return {a.v > 0.f ? 1.f : (a.v < 0.f ? -1.f : 0.f)}; }
inline float vsum(Vec a) { return a.v; }
inline Vec vload_i8(const int8_t* p) { return {float(*p)}; }
#endif

// Scalar lane helpers used for tails on every ISA.
struct Lane {
  static float load(const float* p) { return *p; }
  static float load(const bf16_t* p) { return bf16_to_float(p->x); }
  static float load(const half_t* p) { return half_to_float(p->x); }
  static void store(float* p, float a) { *p = a; }
  static void store(bf16_t* p, float a) { p->x = float_to_bf16(a); }
  static void store(half_t* p, float a) { p->x = float_to_half(a); }
};

inline float int4_at(const uint8_t* packed, int64_t i) {
  int v = (packed[i >> 1] >> ((i & 1) * 4)) & 0xf;
  return float(v >= 8 ? v - 16 : v);
}

}  // namespace DSK_ISA
}  // namespace dsk
