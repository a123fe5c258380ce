// nf4_encoder_gather_avx2.h: the AVX2 + F16C panel gather of the NF4 encoder, included by nf4_encoder_avx2.cc
// and nf4_encoder_avx512.cc (each compiles its own internal copy with its own flags).
//
// The fast cases: a transposing gather (stride_t == 1, e.g. a row-major W[K, N] read column by column) in 8 x 8
// tiles, and a contiguous run per column (stride_r == 1). Every element type is widened on load; the edges and
// other strides go to the scalar GatherRect.
#ifndef ONNX_NF4_NF4_ENCODER_GATHER_AVX2_H_
#define ONNX_NF4_NF4_ENCODER_GATHER_AVX2_H_

#include <immintrin.h>

#include "nf4_encoder.h"

namespace onnx_nf4::encoder {
namespace {

// Eight consecutive elements of type dtype at p, as float32 (float64 rounded to nearest).
template <int32_t kDType>
inline __m256 Load8(const void* p) {
  if constexpr (kDType == kFloat16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  } else if constexpr (kDType == kBFloat16) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  } else if constexpr (kDType == kFloat64) {
    const double* d = static_cast<const double*>(p);
    return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(d + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(d)));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(p));
  }
}

template <int32_t kDType>
inline const void* ElementAt(const void* base, int64_t index) {
  constexpr int64_t kSize = kDType == kFloat64 ? 8 : (kDType == kFloat32 ? 4 : 2);
  return static_cast<const char*>(base) + index * kSize;
}

// Transposes the 8 x 8 tile in r[0..7] (row i = r[i]) in place (afterwards r[j] = column j).
inline void Transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

template <int32_t kDType>
void GatherTyped(const GatherArgs& g) {
  if (g.stride_t == 1 && g.rows >= 8 && g.cols >= 8) {
    const int64_t rows8 = g.rows & ~int64_t{7}, cols8 = g.cols & ~int64_t{7};
    for (int64_t t = 0; t < cols8; t += 8) {
      for (int64_t r = 0; r < rows8; r += 8) {
        __m256 tile[8];
        for (int i = 0; i < 8; ++i) {
          const void* row = ElementAt<kDType>(g.src, (r + i) * g.stride_r + t);
          if (g.prefetch != 0) _mm_prefetch(static_cast<const char*>(ElementAt<kDType>(row, g.prefetch)), _MM_HINT_T0);
          tile[i] = Load8<kDType>(row);
        }
        Transpose8x8(tile);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(g.dst + (t + j) * g.ld + r, tile[j]);
      }
    }
    GatherRect(g, rows8, g.rows, 0, cols8);
    GatherRect(g, 0, g.rows, cols8, g.cols);
    return;
  }
  if (g.stride_r == 1) {
    const int64_t rows8 = g.rows & ~int64_t{7};
    for (int64_t t = 0; t < g.cols; ++t) {
      const void* column = ElementAt<kDType>(g.src, t * g.stride_t);
      float* dst = g.dst + t * g.ld;
      for (int64_t r = 0; r < rows8; r += 8) _mm256_storeu_ps(dst + r, Load8<kDType>(ElementAt<kDType>(column, r)));
    }
    GatherRect(g, rows8, g.rows, 0, g.cols);
    return;
  }
  GatherRect(g, 0, g.rows, 0, g.cols);
}

void GatherAvx2(const GatherArgs& g) {
  switch (g.dtype) {
    case kFloat16: return GatherTyped<kFloat16>(g);
    case kBFloat16: return GatherTyped<kBFloat16>(g);
    case kFloat64: return GatherTyped<kFloat64>(g);
    default: return GatherTyped<kFloat32>(g);
  }
}

}  // namespace
}  // namespace onnx_nf4::encoder

#endif  // ONNX_NF4_NF4_ENCODER_GATHER_AVX2_H_
