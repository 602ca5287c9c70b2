// Scalar bf16/fp16 <-> fp32 conversions, round-to-nearest-even like torch's .to(dtype).
#pragma once
#include <cstdint>
#include <cstring>

// Everything below lives in dsk::<ISA> so the per-ISA copies never merge at link time.
namespace dsk {
namespace DSK_ISA {

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN, as torch
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // Subnormal half: value = mant * 2^-24, exact in fp32.
    float v = float(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;               // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;              // overflows to inf after rounding
  if (a < 0x38800000u) {                                    // result is subnormal or zero
    if (a < 0x33000000u) return sign;                       // below half of the smallest subnormal
    uint32_t exp = a >> 23, mant = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - exp;                            // 14 + (113 - exp)
    uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return sign | uint16_t(q);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);  // rebias and round to 10 mantissa bits
  return sign | uint16_t(r >> 13);
}

}  // namespace DSK_ISA
}  // namespace dsk
