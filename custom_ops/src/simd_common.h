// simd_common.h: scale access, activation packing and row grouping shared by the SIMD modules. Internal linkage
// on purpose (each module is built with its own instruction-set flags, so no out-of-line copy may be shared
// between them); no library templates.
#ifndef ONNX_NF4_SIMD_COMMON_H_
#define ONNX_NF4_SIMD_COMMON_H_

#include <immintrin.h>

#include <cstdint>

#include "cpu_kernels.h"

namespace onnx_nf4::cpu {
namespace {  // NOLINT(build/namespaces): see above

inline int64_t MinI64(int64_t a, int64_t b) { return a < b ? a : b; }

// Weight-streaming kernels request the float32 scales of the column this many columns ahead when they start a
// column: each column's scales are a new short stream, and a demand miss on them stalls the column's start.
constexpr int64_t kScaleLookahead = 4;

inline void PrefetchScales(const Nf4Weight& w, int64_t n) {
  if (w.absmax == nullptr || n >= w.N) return;
  const float* row = w.absmax + n * w.k_blocks;
  for (int64_t i = 0; i < w.k_blocks; i += 16) __builtin_prefetch(row + i, 0, 3);
}

inline int64_t MaxI64(int64_t a, int64_t b) { return a > b ? a : b; }

// dst[K_pad] (zeroed) <- row a[K] in code order of `group`.
inline void PackRowCodeOrder(const float* a, int64_t K, int64_t group, float* dst) {
  for (int64_t k = 0; k < K; ++k) dst[CodeOrderPos(k, group)] = a[k];
}

// at[K_pad][mpad] (zeroed) <- A[M][K] transposed, K in code order of `group`. Cache-blocked over 64 k: the
// rows of A are read sequentially and the 64 destination rows (64 * mpad floats) stay in L1.
inline void PackTransposedCodeOrder(const float* A, int64_t M, int64_t K, int64_t mpad, int64_t group, float* at) {
  constexpr int64_t kBlock = 64;
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t k1 = MinI64(K, k0 + kBlock);
    for (int64_t m = 0; m < M; ++m) {
      const float* a = A + m * K;
      for (int64_t k = k0; k < k1; ++k) at[CodeOrderPos(k, group) * mpad + m] = a[k];
    }
  }
}

// A number of rows as a type, for kernels templated on their row count.
template <int R>
struct RowCount {
  static constexpr int kValue = R;
};

// Calls f(RowCount<R>{}, m0) with R = min(rows, kMax) for rows in [1, kMax] (the largest R first).
template <int kMax, typename F>
inline void ForRowGroup(int64_t rows, int64_t m0, F& f) {
  if constexpr (kMax > 1) {
    if (rows < kMax) return ForRowGroup<kMax - 1>(rows, m0, f);
  }
  f(RowCount<kMax>{}, m0);
}

// Walks the rows [0, M) in groups of kMax (the last group smaller): f(RowCount<R>{}, m0) for each.
template <int kMax, typename F>
inline void ForRowGroups(int64_t M, F&& f) {
  for (int64_t m0 = 0; m0 < M; m0 += kMax) ForRowGroup<kMax>(MinI64(M - m0, kMax), m0, f);
}

}  // namespace
}  // namespace onnx_nf4::cpu

#endif  // ONNX_NF4_SIMD_COMMON_H_
