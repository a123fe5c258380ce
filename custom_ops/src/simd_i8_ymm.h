// simd_i8_ymm.h: the int8 traits (simd_i8_kernels.h) on 256-bit vectors, for the AVX2 module (vpmaddubsw +
// vpmaddwd) and the AVX2 + AVX-VNNI module (vpdpbusd on ymm). Internal linkage (see simd_common.h).
//
// A step decodes 32 bytes of B (64 codes) into two vectors: vpshufb maps the high nibbles (even k) to the
// first and the low nibbles (odd k) to the second (code order of group 64, as on AVX-512). For blocks of 32
// codes (kStepCodes = 32) a step decodes 16 bytes: the high nibbles to the lower 16 bytes of one vector, the
// low nibbles to its upper 16 bytes.
//   kVnni = false: signed weight bytes round(NF4 * 127). vpmaddubsw needs one unsigned operand: it multiplies
//   |x| by y carrying the sign of x (both magnitudes <= 127, so the pair sums cannot saturate), vpmaddwd adds
//   the pairs; x is the operand shared by several products (its absolute value is taken once).
//   kVnni = true: unsigned weight bytes round(NF4 * 127) + 128 against signed activations, one vpdpbusd.
#ifndef ONNX_NF4_SIMD_I8_YMM_H_
#define ONNX_NF4_SIMD_I8_YMM_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"
#include "simd_i8_kernels.h"

namespace onnx_nf4::cpu {
namespace {  // NOLINT(build/namespaces): see simd_common.h

template <bool kVnni, int kStepCodes>
struct I8Ymm {
  using VecI = __m256i;
  using VecF = __m256;
  static constexpr int64_t kLanes = 8;
  static constexpr int64_t kGroup = kStepCodes;
  static constexpr bool kBiased = kVnni;
  static constexpr int kGemvRows = kStepCodes == 64 ? 3 : 4;  // accumulators of 3 x 2 or 4 x 1 rows fit 16 registers
  static constexpr int kGemvColumns = 4;                      // one row: 4 accumulators and 4 totals
  static constexpr int kGemmV = kVnni ? 2 : 1;  // rows 16 (VNNI) or 8: accumulators + operands fit 16 registers
  static constexpr int kGemmTN = 6;
  static constexpr int64_t kMinGemmRows = 8;

  static VecI ZeroI() { return _mm256_setzero_si256(); }
  static VecI LoadI(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static void StoreI(void* p, VecI v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  static VecI AddI(VecI a, VecI b) { return _mm256_add_epi32(a, b); }
  static VecI FirstLaneI(int32_t x) { return _mm256_setr_epi32(x, 0, 0, 0, 0, 0, 0, 0); }  // x, then zeros
  static VecI Broadcast32(const void* p) {
    int32_t x;
    std::memcpy(&x, p, 4);
    return _mm256_set1_epi32(x);
  }

  static VecF ZeroF() { return _mm256_setzero_ps(); }
  static VecF LoadF(const float* p) { return _mm256_loadu_ps(p); }
  static void StoreF(float* p, VecF v) { _mm256_storeu_ps(p, v); }
  static VecF Set1F(float x) { return _mm256_set1_ps(x); }
  static VecF AddF(VecF a, VecF b) { return _mm256_add_ps(a, b); }
  static VecF MulF(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
  static VecF MaxF(VecF a, VecF b) { return _mm256_max_ps(a, b); }
  static VecF AndNotF(VecF a, VecF b) { return _mm256_andnot_ps(a, b); }
  static VecF FmaddF(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
  static VecF CvtF(VecI v) { return _mm256_cvtepi32_ps(v); }
  static float SumF(VecF v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }

  static VecI DecodeTable() { return _mm256_broadcastsi128_si256(I8Table128(kVnni)); }
  static constexpr int kDecodeVecs = kStepCodes / 32;
  static void Decode(const uint8_t* bytes, VecI table, VecI* out) {
    if constexpr (kStepCodes == 64) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
      const __m256i mask = _mm256_set1_epi8(0x0F);
      out[0] = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));  // even k
      out[1] = _mm256_shuffle_epi8(table, _mm256_and_si256(v, mask));                        // odd k
    } else {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
      const __m128i mask = _mm_set1_epi8(0x0F);
      const __m128i even = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
      const __m128i odd = _mm_and_si128(v, mask);
      out[0] = _mm256_shuffle_epi8(table, _mm256_set_m128i(odd, even));
    }
  }

  // The shared operand and, without VNNI, its absolute value (taken once for all its products).
  struct Shared {
    VecI v, abs;
  };
  static Shared Share(VecI v) {
    if constexpr (kVnni) {
      return {v, v};
    } else {
      return {v, _mm256_abs_epi8(v)};
    }
  }
  // acc + per int32 lane the sum of the 4 products x_i * y_i; x is the shared operand.
  static VecI DotShared(VecI acc, const Shared& x, VecI y) {
    const __m256i prod16 = _mm256_maddubs_epi16(x.abs, _mm256_sign_epi8(y, x.v));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(prod16, _mm256_set1_epi16(1)));
  }
  // vpdpbusd (VEX) in inline assembly: GCC 12 wraps the intrinsic's accumulator in register copies inside
  // loops. "x": the VEX encoding reaches ymm0-15 only.
  static VecI DotVnni(VecI acc, VecI w, VecI a) {
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(w), "xm"(a));
    return acc;
  }
  static VecI DotSharedW(VecI acc, const Shared& w, VecI a) {
    if constexpr (kVnni) {
      return DotVnni(acc, w.v, a);
    } else {
      return DotShared(acc, w, a);
    }
  }
  static VecI DotSharedA(VecI acc, VecI w, const Shared& a) {
    if constexpr (kVnni) {
      return DotVnni(acc, w, a.v);
    } else {
      return DotShared(acc, a, w);
    }
  }
};

}  // namespace
}  // namespace onnx_nf4::cpu

#endif  // ONNX_NF4_SIMD_I8_YMM_H_
