// kernels_avx512.cc: AVX-512 (F, BW, VL, DQ, VNNI) kernels. Built with those -m flags; only called when
// the CPU has them (cpu_common.cc). docs/cpu_kernel.md explains the algorithms.
//
// Code order. A 16-byte run of B holds 32 codes; vpmovzxbd spreads it over 16 dword lanes, the low nibble of
// lane j is the code of k = 2j + 1 and (after a shift) the high nibble that of k = 2j. vpermps reads only
// the low 4 bits of each index, so one vpermps per 16 codes decodes them with the whole table in a register.
// The activations are packed once per call in the same order: per 32-group of k, the 16 even k then the 16 odd.
#include <immintrin.h>

#include <cstring>

#include "cpu_kernels.h"
#include "simd_common.h"
#include "simd_f32_kernels.h"

namespace onnx_nf4::cpu {
namespace {

// The float32 operations of this module (simd_f32_kernels.h).
struct Isa {
  using Vec = __m512;
  static constexpr int64_t kLanes = 16;
  static constexpr int64_t kGroup = 32;  // codes per 16-byte step
  static constexpr int kMaxGemvRows = 8;
  static constexpr int kGemvColumns = 4;  // 4 scaled tables, 8 accumulators, A and the decode: 17 registers
  static constexpr bool kOutlinedPanel = false;
  static constexpr int kGemmMr = 8;  // 8 x 48 tile: 24 accumulators, 3 panel vectors, 1 broadcast
  static constexpr int kGemmNv = 3;
  static constexpr int64_t kGemmKc = 128;  // 128 x 48 panel: 24 KiB
  static constexpr int64_t kGemmTaskGroups = 2;

  static Vec Zero() { return _mm512_setzero_ps(); }
  static Vec Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static Vec Set1(float x) { return _mm512_set1_ps(x); }
  static Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec And(Vec a, Vec b) { return _mm512_and_ps(a, b); }
  static Vec Fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float Sum(Vec v) { return _mm512_reduce_add_ps(v); }

  using Table = __m512;
  static Table LoadTable() { return _mm512_loadu_ps(kNF4); }
  static Table ScaleTable(Table t, Vec s) { return _mm512_mul_ps(t, s); }
  // Decodes 32 codes (16 bytes) into the NF4 values of the even k and the odd k of the group.
  static void Decode(const uint8_t* bytes, Table table, Vec* even, Vec* odd) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    *odd = _mm512_permutexvar_ps(v, table);
    *even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  }
};

constexpr int64_t kTileN = 12;        // Y^T tile: 12 columns x 32 rows (24 accumulators)
constexpr int64_t kTileNNarrow = 24;  // columns of the 16-row tile (M <= 16: a 32-row tile would be half padding)

void MatMulF32(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  if (p.w.block_size < Isa::kGroup) {
    Avx2Kernels().matmul_f32(p, par, scratch);
  } else if (p.M < kMinGemmRows) {
    GemvF32<Isa>(p, par, scratch);
  } else if (p.M <= 16) {
    TileGemmF32<Isa, kTileNNarrow, 1>(p, par, scratch);
  } else if (p.M < kMinPackedGemmRows) {
    TileGemmF32<Isa, kTileN, 2>(p, par, scratch);
  } else {
    GemmF32<Isa>(p, par, scratch);
  }
}

}  // namespace

const KernelSet& Avx512Kernels() {
  static const KernelSet set{"avx512", MatMulF32, Avx512MatMulInt8};
  return set;
}

}  // namespace onnx_nf4::cpu
