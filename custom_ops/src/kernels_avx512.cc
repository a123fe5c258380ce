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
  static constexpr bool kOutlinedPanel = false;
  static constexpr int kGemmMr = 8;   // 8 x 48 tile: 24 accumulators, 3 panel vectors, 1 broadcast
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

// ---------------------------------------------------------------- accuracy_level 4 (int8 activations)
//
// 64 codes per step: 32 bytes of B, nibbles split into 32 even-k and 32 odd-k codes, vpshufb maps them to
// unsigned bytes round(NF4 * 127) + 128, vpdpbusd multiplies with the int8 activations (packed in the same
// order). The +128 adds 128 * sum(q_a) per block, which starts the block's integer accumulator negative.

constexpr int64_t kGroupI8 = 64;

// 32 bytes -> 64 unsigned weight bytes in code order: both halves of a zmm get the bytes, the lower half is
// shifted right by 4 (high nibbles: even k), the upper half not (low nibbles: odd k), then vpshufb.
inline __m512i Decode64U8(const uint8_t* bytes, __m512i table, __m512i shifts, __m512i mask) {
  const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  return _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srlv_epi16(v, shifts), mask));
}

constexpr int64_t kInt8Chunk = 64;  // blocks whose combined scales are prepared at once (stack buffers)

// MR rows against column n. Per chunk of blocks, f[m][b] = scale_w[b] * scale_a[m][b] is prepared first
// (vectorized), so a block costs its dot products plus one convert and one FMA with a broadcast operand; the
// +128 bias of the table, 128 * sum_b f[m][b] * qsum[m][b], is one vector dot product per chunk.
template <int MR, int U>
void Int8Tile(const Int8Activations& g, int64_t m0, int64_t n) {
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks;
  const uint8_t* codes = w.packed + n * kb * bs / 2;
  const __m512i table = _mm512_broadcast_i32x4(_mm_add_epi8(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(kNF4I8)), _mm_set1_epi8(static_cast<char>(-128))));
  const __m512i shifts = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_setzero_si256(), 1);
  const __m512i mask = _mm512_set1_epi8(0x0F);
  alignas(64) float sw[kInt8Chunk];
  alignas(64) float f[MR][kInt8Chunk];
  __m512 tot0[MR], tot1[MR], corr[MR];
  for (int m = 0; m < MR; ++m) tot0[m] = tot1[m] = corr[m] = _mm512_setzero_ps();
  auto block = [&](int64_t b, int64_t j, __m512 (&tot)[MR]) {
    __m512i acc[MR][U];
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_si512();
    const uint8_t* c = codes + b * (bs / 2);
    const uint8_t* const c_end = c + bs / 2;
    const int8_t* a = g.qa + m0 * g.kpad + b * bs;
    do {  // at least one trip (block_size >= U * 64): acc stays in registers
      for (int u = 0; u < U; ++u) {
        const __m512i wq = Decode64U8(c + u * (kGroupI8 / 2), table, shifts, mask);
        for (int m = 0; m < MR; ++m) {
          acc[m][u] = _mm512_dpbusd_epi32(acc[m][u], wq, _mm512_loadu_si512(a + m * g.kpad + u * kGroupI8));
        }
      }
      c += U * (kGroupI8 / 2);
      a += U * kGroupI8;
    } while (c < c_end);
    for (int m = 0; m < MR; ++m) {
      for (int u = 1; u < U; ++u) acc[m][0] = _mm512_add_epi32(acc[m][0], acc[m][u]);
      tot[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][0]), _mm512_set1_ps(f[m][j]), tot[m]);
    }
  };
  PrefetchScales(w, n + kScaleLookahead);
  for (int64_t b0 = 0; b0 < kb; b0 += kInt8Chunk) {
    const int64_t nb = MinI64(kInt8Chunk, kb - b0);
    if (w.absmax != nullptr) {
      std::memcpy(sw, w.absmax + n * kb + b0, sizeof(float) * nb);
    } else {
      for (int64_t j = 0; j < nb; ++j) sw[j] = BlockScale(w, n, b0 + j);
    }
    for (int64_t j = 0; j < nb; j += 16) {
      const __mmask16 lanes = nb - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (nb - j)) - 1);
      const __m512 s = _mm512_maskz_loadu_ps(lanes, sw + j);
      for (int m = 0; m < MR; ++m) {
        const int64_t row = (m0 + m) * kb + b0 + j;
        const __m512 fm = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(lanes, g.ascale + row));
        _mm512_store_ps(f[m] + j, fm);
        corr[m] = _mm512_fmadd_ps(fm, _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(lanes, g.qsum + row)), corr[m]);
      }
    }
    int64_t j = 0;
    for (; j + 1 < nb; j += 2) {
      block(b0 + j, j, tot0);
      block(b0 + j + 1, j + 1, tot1);
    }
    if (j < nb) block(b0 + j, j, tot0);
  }
  for (int m = 0; m < MR; ++m) {
    const __m512 sum = _mm512_fmadd_ps(corr[m], _mm512_set1_ps(-128.0f), _mm512_add_ps(tot0[m], tot1[m]));
    float y = _mm512_reduce_add_ps(sum) * (1.0f / kInt8Levels);
    if (p.bias != nullptr) y += p.bias[n];
    p.Y[(m0 + m) * w.N + n] = y;
  }
}

void Int8Task(void* data, size_t task) {
  const Int8Activations& g = *static_cast<const Int8Activations*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * kGemvCols, n1 = MinI64(n0 + kGemvCols, g.p->w.N);
  const bool pairs = g.p->w.block_size >= 2 * kGroupI8;  // two independent sums per block
  ForRowGroups<4>(g.p->M, [&](auto rows, int64_t m0) {
    constexpr int kRows = decltype(rows)::kValue;
    for (int64_t n = n0; n < n1; ++n) {
      if constexpr (kRows <= 2) {
        pairs ? Int8Tile<kRows, 2>(g, m0, n) : Int8Tile<kRows, 1>(g, m0, n);
      } else {
        Int8Tile<kRows, 1>(g, m0, n);
      }
    }
  });
}

void MatMulInt8(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  if (p.M >= kMinInt8GemmRows) {  // compute-bound: the float32 tiles are faster (and exact)
    MatMulF32(p, par, scratch);
  } else if (p.w.block_size < kGroupI8) {
    Avx2Kernels().matmul_int8(p, par, scratch);
  } else {
    Int8Activations g = QuantizeActivationsInt8(p, kGroupI8, true, scratch);
    par.For(static_cast<size_t>(CeilDiv(p.w.N, kGemvCols)), Int8Task, &g);
  }
}

}  // namespace

const KernelSet& Avx512Kernels() {
  static const KernelSet set{"avx512", MatMulF32, MatMulInt8};
  return set;
}

}  // namespace onnx_nf4::cpu
