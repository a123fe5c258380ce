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
  static constexpr int64_t kGroup = 16;  // codes per 8-byte step
  static constexpr int kMaxGemvRows = 3;  // 3 rows: 6 accumulators + 3 totals + table fit 16 registers
  static constexpr bool kOutlinedPanel = true;   // 16 registers: the decode's table would crowd the 12 accumulators
  static constexpr int kGemmMr = 6;   // 6 x 16 tile: 12 accumulators, 2 panel vectors, 1 broadcast
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

// ---------------------------------------------------------------- accuracy_level 4 (int8 activations)
//
// 32 codes per step: 16 bytes of B, nibbles split into 16 even-k and 16 odd-k codes, vpshufb maps them to
// signed bytes round(NF4 * 127). vpmaddubsw needs one unsigned operand, so it multiplies |w| by the
// activation carrying the sign of w (|w|, |a| <= 127: the pair sums cannot saturate), and vpmaddwd adds
// pairs to int32.

constexpr int64_t kGroupI8 = 32;

inline __m256i Decode32I8(const uint8_t* bytes, __m256i table) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i even = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  const __m128i odd = _mm_and_si128(v, mask);
  return _mm256_shuffle_epi8(table, _mm256_set_m128i(odd, even));
}

constexpr int64_t kInt8Chunk = 64;  // blocks whose combined scales are prepared at once (stack buffer)

// MR rows against column n. Per chunk of blocks, f[m][b] = scale_w[b] * scale_a[m][b] is prepared first, so
// a block costs its dot products plus one convert and one FMA.
template <int MR>
void Int8Tile(const Int8Activations& g, int64_t m0, int64_t n) {
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks;
  const uint8_t* codes = w.packed + n * kb * bs / 2;
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kNF4I8)));
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float f[MR][kInt8Chunk];
  PrefetchScales(w, n + kScaleLookahead);
  __m256 tot0[MR], tot1[MR];
  for (int m = 0; m < MR; ++m) tot0[m] = tot1[m] = _mm256_setzero_ps();
  auto block = [&](int64_t b, int64_t j, __m256 (&tot)[MR]) {
    __m256i acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_si256();
    const uint8_t* c = codes + b * (bs / 2);
    const uint8_t* const c_end = c + bs / 2;
    const int8_t* a = g.qa + m0 * g.kpad + b * bs;
    do {  // at least one trip (block_size >= 32): acc stays in registers
      const __m256i wq = Decode32I8(c, table);
      const __m256i wabs = _mm256_abs_epi8(wq);
      for (int m = 0; m < MR; ++m) {
        const __m256i am = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + m * g.kpad));
        const __m256i prod16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(am, wq));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(prod16, ones));
      }
      c += kGroupI8 / 2;
      a += kGroupI8;
    } while (c < c_end);
    for (int m = 0; m < MR; ++m) tot[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_set1_ps(f[m][j]), tot[m]);
  };
  for (int64_t b0 = 0; b0 < kb; b0 += kInt8Chunk) {
    const int64_t nb = MinI64(kInt8Chunk, kb - b0);
    for (int64_t j = 0; j < nb; ++j) {
      const float s = BlockScale(w, n, b0 + j);
      for (int m = 0; m < MR; ++m) f[m][j] = s * g.ascale[(m0 + m) * kb + b0 + j];
    }
    int64_t j = 0;
    if constexpr (MR <= 2) {  // alternate two totals to halve their dependency chains
      for (; j + 1 < nb; j += 2) {
        block(b0 + j, j, tot0);
        block(b0 + j + 1, j + 1, tot1);
      }
    }
    for (; j < nb; ++j) block(b0 + j, j, tot0);
  }
  for (int m = 0; m < MR; ++m) {
    float y = Isa::Sum(_mm256_add_ps(tot0[m], tot1[m])) * (1.0f / kInt8Levels);
    if (p.bias != nullptr) y += p.bias[n];
    p.Y[(m0 + m) * w.N + n] = y;
  }
}

void Int8Task(void* data, size_t task) {
  const Int8Activations& g = *static_cast<const Int8Activations*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * kGemvCols, n1 = MinI64(n0 + kGemvCols, g.p->w.N);
  ForRowGroups<4>(g.p->M, [&](auto rows, int64_t m0) {
    for (int64_t n = n0; n < n1; ++n) Int8Tile<decltype(rows)::kValue>(g, m0, n);
  });
}

void MatMulInt8(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  if (p.M >= kMinInt8GemmRows) {  // compute-bound: the float32 tiles are faster (and exact)
    MatMulF32(p, par, scratch);
  } else if (p.w.block_size < kGroupI8) {
    PortableKernels().matmul_int8(p, par, scratch);
  } else {
    Int8Activations g = QuantizeActivationsInt8(p, kGroupI8, false, scratch);  // the signed table needs no sums
    par.For(static_cast<size_t>(CeilDiv(p.w.N, kGemvCols)), Int8Task, &g);
  }
}

}  // namespace

const KernelSet& Avx2Kernels() {
  static const KernelSet set{"avx2", MatMulF32, MatMulInt8};
  return set;
}

}  // namespace onnx_nf4::cpu
