// kernels_avx2.cc: AVX2 + FMA kernels. Built with -mavx2 -mfma; only called when the CPU has them
// (cpu_common.cc). docs/cpu_kernel.md explains the algorithms.
//
// Code order. An 8-byte run of B holds 16 codes; vpmovzxbd spreads it over 8 dword lanes, the low nibble of
// lane j is the code of k = 2j + 1 and the high nibble that of k = 2j. vpermps reads 3 index bits, so the
// table lives in two registers (codes 0-7 and 8-15) and bit 3 of the code picks one with vblendvps. The
// activations are packed once per call in the same order: per 16-group of k, the 8 even k then the 8 odd.
#include <immintrin.h>

#include "cpu_kernels.h"
#include "simd_common.h"
#include "simd_f32_kernels.h"

namespace onnx_nf4::cpu {
namespace {

// The float32 operations of this module (simd_f32_kernels.h).
struct Isa {
  using Vec = __m256;
  static constexpr int64_t kLanes = 8;
  static constexpr int64_t kGroup = 16;         // codes per 8-byte step
  static constexpr int kMaxGemvRows = 3;        // 3 rows: 6 accumulators + 3 totals + table fit 16 registers
  static constexpr int kGemvColumns = 2;        // 2 scaled tables (4 registers), 4 accumulators, A, the decode
  static constexpr bool kOutlinedPanel = true;  // 16 registers: the decode's table would crowd the 12 accumulators
  static constexpr int kGemmMr = 6;             // 6 x 16 tile: 12 accumulators, 2 panel vectors, 1 broadcast
  static constexpr int kGemmNv = 2;
  static constexpr int64_t kGemmKc = 256;  // 256 x 16 panel: 16 KiB
  static constexpr int64_t kGemmTaskGroups = 4;

  static Vec Zero() { return _mm256_setzero_ps(); }
  static Vec Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static Vec Set1(float x) { return _mm256_set1_ps(x); }
  static Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec And(Vec a, Vec b) { return _mm256_and_ps(a, b); }
  static Vec Fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float Sum(Vec v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }

  struct Table {
    __m256 lo, hi;
  };
  static Table LoadTable() { return {_mm256_loadu_ps(kNF4), _mm256_loadu_ps(kNF4 + 8)}; }
  static Table ScaleTable(const Table& t, Vec s) { return {_mm256_mul_ps(t.lo, s), _mm256_mul_ps(t.hi, s)}; }
  static Vec Lookup(const Table& t, __m256i idx, __m256i select_in_sign) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx),
                            _mm256_castsi256_ps(select_in_sign));
  }
  // Decodes 16 codes (8 bytes) into the NF4 values of the even k and the odd k of the group.
  static void Decode(const uint8_t* bytes, const Table& t, Vec* even, Vec* odd) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    *odd = Lookup(t, v, _mm256_slli_epi32(v, 28));
    *even = Lookup(t, _mm256_srli_epi32(v, 4), _mm256_slli_epi32(v, 24));
  }
};

constexpr int64_t kTileN = 6;  // Y^T tile: 6 columns x 16 rows (12 accumulators)

void MatMulF32(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  if (p.M < kMinGemmRows) {
    GemvF32<Isa>(p, par, scratch);
  } else if (p.M < kMinPackedGemmRows) {
    TileGemmF32<Isa, kTileN, 2>(p, par, scratch);
  } else {
    GemmF32<Isa>(p, par, scratch);
  }
}

}  // namespace

const KernelSet& Avx2Kernels() {
  static const KernelSet set{"avx2", MatMulF32, Avx2MatMulInt8};
  return set;
}

}  // namespace onnx_nf4::cpu
