// nf4_encoder_avx512.cc: the NF4 encoder with AVX-512 F/BW/VL/DQ (16 float32 lanes). Bit-identical to the portable
// module (nf4_encoder.h describes the interface, docs/codec.md the rules); the panel gather is the AVX2 one.
//
// A code is found by a four-round branch-free binary search (SearchTables): one permute, one compare into a mask
// and a masked add per round and vector; vpmovqb packs the 64-bit lanes' nibble pairs into bytes.
#include <immintrin.h>

#include <cstring>

#include "nf4_encoder.h"
#include "nf4_encoder_gather_avx2.h"

namespace onnx_nf4::encoder {
namespace {

struct Tables {
  __m512 r1, r2, r3, r4;
};

inline __m512i Code16(__m512 s, const Tables& t) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(s, t.r1, _CMP_GT_OQ), one);
  const __m512 rounds[3] = {t.r2, t.r3, t.r4};
  for (int r = 0; r < 3; ++r) {
    const __mmask16 gt = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(c, rounds[r]), _CMP_GT_OQ);
    c = _mm512_add_epi32(c, c);
    c = _mm512_mask_add_epi32(c, gt, c, one);
  }
  return c;
}

// The 16 codes as 8 bytes, element 2j in the high nibble of byte j.
inline __m128i Pack16(__m512i c) {
  return _mm512_cvtepi64_epi8(_mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32)));
}

// acc[0], acc[1] += (x - y)^2 over the 16 lanes, in float64 (lanes 0-7 and 8-15); y == 0 gives x^2.
inline void AddSquaredDifferences(__m512 x, __m512 y, __m512d* acc) {
  const __m512d lo =
      _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)), _mm512_cvtps_pd(_mm512_castps512_ps256(y)));
  const __m512d hi =
      _mm512_sub_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)), _mm512_cvtps_pd(_mm512_extractf32x8_ps(y, 1)));
  acc[0] = _mm512_add_pd(acc[0], _mm512_mul_pd(lo, lo));
  acc[1] = _mm512_add_pd(acc[1], _mm512_mul_pd(hi, hi));
}

template <bool kSums>
bool EncodeTyped(const BlockRun& run) {
  const SearchTables st = MakeSearchTables(run.rounding);
  const Tables t{_mm512_set1_ps(st.r1), _mm512_castps256_ps512(_mm256_loadu_ps(st.r2)),
                 _mm512_castps256_ps512(_mm256_loadu_ps(st.r3)), _mm512_castps256_ps512(_mm256_loadu_ps(st.r4))};
  const __m512 nf4 = _mm512_loadu_ps(kCodebook);
  const __m512i abs_mask = _mm512_set1_epi32(static_cast<int32_t>(kAbsMask));
  const __m512i zero_code = _mm512_set1_epi32(ONNX_NF4_ZERO_CODE);
  const int64_t bs = run.block_size;
  __m512d err[2], ref[2];
  if constexpr (kSums) {
    for (int i = 0; i < 2; ++i) {
      err[i] = _mm512_loadu_pd(run.sums->err + 8 * i);
      ref[i] = _mm512_loadu_pd(run.sums->ref + 8 * i);
    }
  }
  for (int64_t i = 0; i < run.count; ++i) {
    const float* x = run.x + i * run.x_stride;
    __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
    int64_t j = 0;
    for (; j + 32 <= bs; j += 32) {
      m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(x + j), abs_mask));
      m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(x + j + 16), abs_mask));
    }
    if (j < bs) m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(x + j), abs_mask));
    const uint32_t max_bits = _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
    if (max_bits >= kNotFiniteBits) return false;
    const float absmax = FloatFromBits(max_bits);
    const __m512 inv = _mm512_set1_ps(ScaleInverse(absmax, run.rounding));
    const __m512 scale = _mm512_set1_ps(absmax);
    uint8_t* out = run.packed + i * run.packed_stride;
    for (j = 0; j < bs; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + j);
      __m512i c = Code16(_mm512_mul_ps(v, inv), t);
      if (j + 16 > run.valid) {
        const int64_t keep = run.valid > j ? run.valid - j : 0;
        c = _mm512_mask_mov_epi32(c, static_cast<__mmask16>(~((1u << keep) - 1u)), zero_code);
      }
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + j / 2), Pack16(c));
      if constexpr (kSums) {
        AddSquaredDifferences(v, _mm512_mul_ps(_mm512_permutexvar_ps(c, nf4), scale), err);
        AddSquaredDifferences(v, _mm512_setzero_ps(), ref);
      }
    }
    run.absmax[i * run.absmax_stride] = absmax;
  }
  if constexpr (kSums) {
    for (int i = 0; i < 2; ++i) {
      _mm512_storeu_pd(run.sums->err + 8 * i, err[i]);
      _mm512_storeu_pd(run.sums->ref + 8 * i, ref[i]);
    }
  }
  return true;
}

bool Encode(const BlockRun& run) { return run.sums != nullptr ? EncodeTyped<true>(run) : EncodeTyped<false>(run); }

}  // namespace

const EncoderKernels& Avx512Encoder() {
  static const EncoderKernels kernels{"avx512", Encode, GatherAvx2};
  return kernels;
}

}  // namespace onnx_nf4::encoder
