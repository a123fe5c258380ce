// nf4_encoder_avx2.cc: the NF4 encoder with AVX2 + FMA + F16C (8 float32 lanes). Bit-identical to the portable
// module (nf4_encoder.h describes the interface, docs/codec.md the rules).
//
// A code is found by a four-round branch-free binary search (SearchTables): one permute, one compare and two
// integer operations per round and vector. Codes are packed two per byte from the 64-bit lanes.
#include <immintrin.h>

#include <cstring>

#include "nf4_encoder.h"
#include "nf4_encoder_gather_avx2.h"

namespace onnx_nf4::encoder {
namespace {

struct Tables {
  __m256 r1, r2, r3, r4;
};

inline __m256i Code8(__m256 s, const Tables& t) {
  __m256i c = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cmp_ps(s, t.r1, _CMP_GT_OQ)), 31);
  __m256 gt = _mm256_cmp_ps(s, _mm256_permutevar8x32_ps(t.r2, c), _CMP_GT_OQ);
  c = _mm256_sub_epi32(_mm256_add_epi32(c, c), _mm256_castps_si256(gt));
  gt = _mm256_cmp_ps(s, _mm256_permutevar8x32_ps(t.r3, c), _CMP_GT_OQ);
  c = _mm256_sub_epi32(_mm256_add_epi32(c, c), _mm256_castps_si256(gt));
  gt = _mm256_cmp_ps(s, _mm256_permutevar8x32_ps(t.r4, c), _CMP_GT_OQ);
  return _mm256_sub_epi32(_mm256_add_epi32(c, c), _mm256_castps_si256(gt));
}

// The 16 codes of elements 0-7 (c0) and 8-15 (c1) as 8 bytes, element 2j in the high nibble of byte j.
inline uint64_t Pack16(__m256i c0, __m256i c1) {
  // Byte 0 of each 64-bit lane becomes c[2j] << 4 | c[2j + 1].
  const __m256i p0 = _mm256_or_si256(_mm256_slli_epi64(c0, 4), _mm256_srli_epi64(c0, 32));
  const __m256i p1 = _mm256_or_si256(_mm256_slli_epi64(c1, 4), _mm256_srli_epi64(c1, 32));
  const __m256i pick0 = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                         -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i pick1 = _mm256_setr_epi8(-1, -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                         -1, -1, -1, -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i q = _mm256_or_si256(_mm256_shuffle_epi8(p0, pick0), _mm256_shuffle_epi8(p1, pick1));
  return static_cast<uint64_t>(
      _mm_cvtsi128_si64(_mm_or_si128(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1))));
}

// Lanes at positions >= valid (counted from `first`) get code 7.
inline __m256i PadCodes(__m256i c, int64_t first, int64_t valid) {
  const __m256i position =
      _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int32_t>(first)));
  const __m256i pad = _mm256_cmpgt_epi32(position, _mm256_set1_epi32(static_cast<int32_t>(valid - 1)));
  return _mm256_blendv_epi8(c, _mm256_set1_epi32(ONNX_NF4_ZERO_CODE), pad);
}

inline __m256 Decode8(__m256i c, __m256 lo, __m256 hi, __m256 absmax) {
  const __m256 value = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, c), _mm256_permutevar8x32_ps(hi, c),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
  return _mm256_mul_ps(value, absmax);
}

// acc[0], acc[1] += (x - y)^2 over the 8 lanes, in float64 (lanes 0-3 and 4-7); y == 0 gives x^2.
inline void AddSquaredDifferences(__m256 x, __m256 y, __m256d* acc) {
  const __m256d lo =
      _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), _mm256_cvtps_pd(_mm256_castps256_ps128(y)));
  const __m256d hi =
      _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1)));
  acc[0] = _mm256_add_pd(acc[0], _mm256_mul_pd(lo, lo));
  acc[1] = _mm256_add_pd(acc[1], _mm256_mul_pd(hi, hi));
}

inline uint32_t MaxAbsBits(const float* x, int64_t n) {
  const __m256i mask = _mm256_set1_epi32(static_cast<int32_t>(kAbsMask));
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  for (int64_t j = 0; j < n; j += 16) {
    m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), mask));
    m1 = _mm256_max_epu32(m1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j + 8)), mask));
  }
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(m0), _mm256_extracti128_si256(m0, 1));
  m = _mm_max_epu32(m, _mm_max_epu32(_mm256_castsi256_si128(m1), _mm256_extracti128_si256(m1, 1)));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

template <bool kSums>
bool EncodeTyped(const BlockRun& run) {
  const SearchTables st = MakeSearchTables(run.rounding);
  const Tables t{_mm256_set1_ps(st.r1), _mm256_loadu_ps(st.r2), _mm256_loadu_ps(st.r3), _mm256_loadu_ps(st.r4)};
  const __m256 nf4_lo = _mm256_loadu_ps(kCodebook), nf4_hi = _mm256_loadu_ps(kCodebook + 8);
  const int64_t bs = run.block_size;
  __m256d err[4], ref[4];
  if constexpr (kSums) {
    for (int i = 0; i < 4; ++i) {
      err[i] = _mm256_loadu_pd(run.sums->err + 4 * i);
      ref[i] = _mm256_loadu_pd(run.sums->ref + 4 * i);
    }
  }
  for (int64_t i = 0; i < run.count; ++i) {
    const float* x = run.x + i * run.x_stride;
    const uint32_t max_bits = MaxAbsBits(x, bs);
    if (max_bits >= kNotFiniteBits) return false;
    const float absmax = FloatFromBits(max_bits);
    const __m256 inv = _mm256_set1_ps(ScaleInverse(absmax, run.rounding));
    const __m256 scale = _mm256_set1_ps(absmax);
    uint8_t* out = run.packed + i * run.packed_stride;
    for (int64_t j = 0; j < bs; j += 16) {
      const __m256 v0 = _mm256_loadu_ps(x + j), v1 = _mm256_loadu_ps(x + j + 8);
      __m256i c0 = Code8(_mm256_mul_ps(v0, inv), t), c1 = Code8(_mm256_mul_ps(v1, inv), t);
      if (j + 16 > run.valid) {
        c0 = PadCodes(c0, j, run.valid);
        c1 = PadCodes(c1, j + 8, run.valid);
      }
      const uint64_t bytes = Pack16(c0, c1);
      std::memcpy(out + j / 2, &bytes, sizeof bytes);
      if constexpr (kSums) {
        const __m256 zero = _mm256_setzero_ps();
        AddSquaredDifferences(v0, Decode8(c0, nf4_lo, nf4_hi, scale), err);
        AddSquaredDifferences(v1, Decode8(c1, nf4_lo, nf4_hi, scale), err + 2);
        AddSquaredDifferences(v0, zero, ref);
        AddSquaredDifferences(v1, zero, ref + 2);
      }
    }
    run.absmax[i * run.absmax_stride] = absmax;
  }
  if constexpr (kSums) {
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_pd(run.sums->err + 4 * i, err[i]);
      _mm256_storeu_pd(run.sums->ref + 4 * i, ref[i]);
    }
  }
  return true;
}

bool Encode(const BlockRun& run) { return run.sums != nullptr ? EncodeTyped<true>(run) : EncodeTyped<false>(run); }

}  // namespace

const EncoderKernels& Avx2Encoder() {
  static const EncoderKernels kernels{"avx2", Encode, GatherAvx2};
  return kernels;
}

}  // namespace onnx_nf4::encoder
