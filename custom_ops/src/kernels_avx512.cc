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

namespace onnx_nf4::cpu {
namespace {

constexpr int64_t kGroup = 32;    // codes per 16-byte step
constexpr int64_t kGemvCols = 16;  // columns per GEMV task
constexpr int64_t kTileN = 12;     // GEMM tile: 12 columns x 32 rows
constexpr int64_t kTileM = 32;
constexpr int64_t kGemmKc = 256;   // K per decoded panel (12 x 256 floats: 12 KiB, L1)
constexpr int64_t kMinGemmRows = 16;    // float32: rows from which the tiles beat weight streaming
constexpr int64_t kMinInt8GemmRows = 32;  // accuracy_level 4: rows from which the float32 tiles are faster

// Decodes 32 codes (16 bytes) into the NF4 values of the even k (lo) and odd k (hi) of the group.
inline void Decode32(const uint8_t* bytes, __m512 table, __m512* even, __m512* odd) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  *odd = _mm512_permutexvar_ps(v, table);
  *even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}

// ---------------------------------------------------------------- float32, small M (weight streaming)

struct GemvArgs {
  const Problem* p;
  const float* ap;  // [M][K_pad] in code order
  int64_t kpad;
};

// MR rows of A against NC columns at a time; the scale multiplies the per-block sums.
template <int MR, int NC>
void GemvTile(const GemvArgs& g, int64_t m0, int64_t n0) {
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks, row_bytes = kb * bs / 2;
  const __m512 table = _mm512_loadu_ps(kNF4);
  __m512 tot[MR][NC];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NC; ++c) tot[m][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    __m512 acc_e[MR][NC], acc_o[MR][NC];
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < NC; ++c) acc_e[m][c] = acc_o[m][c] = _mm512_setzero_ps();
    for (int64_t k = b * bs; k < (b + 1) * bs; k += kGroup) {
      for (int c = 0; c < NC; ++c) {
        __m512 we, wo;
        Decode32(w.packed + (n0 + c) * row_bytes + k / 2, table, &we, &wo);
        for (int m = 0; m < MR; ++m) {
          const float* a = g.ap + (m0 + m) * g.kpad + k;
          acc_e[m][c] = _mm512_fmadd_ps(we, _mm512_loadu_ps(a), acc_e[m][c]);
          acc_o[m][c] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(a + 16), acc_o[m][c]);
        }
      }
    }
    for (int c = 0; c < NC; ++c) {
      const __m512 s = _mm512_set1_ps(Scale(w, n0 + c, b));
      for (int m = 0; m < MR; ++m) tot[m][c] = _mm512_fmadd_ps(_mm512_add_ps(acc_e[m][c], acc_o[m][c]), s, tot[m][c]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int c = 0; c < NC; ++c) {
      float y = _mm512_reduce_add_ps(tot[m][c]);
      if (p.bias != nullptr) y += p.bias[n0 + c];
      p.Y[(m0 + m) * w.N + n0 + c] = y;
    }
  }
}

template <int MR>
void GemvRows(const GemvArgs& g, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NC = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  int64_t n = n0;
  for (; n + NC <= n1; n += NC) GemvTile<MR, NC>(g, m0, n);
  for (; n < n1; ++n) GemvTile<MR, 1>(g, m0, n);
}

void GemvTask(void* data, size_t task) {
  const GemvArgs& g = *static_cast<const GemvArgs*>(data);
  const int64_t N = g.p->w.N, M = g.p->M;
  const int64_t n0 = static_cast<int64_t>(task) * kGemvCols, n1 = MinI64(n0 + kGemvCols, N);
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t rows = MinI64(M - m0, 8);
    switch (rows) {
      case 1: GemvRows<1>(g, m0, n0, n1); break;
      case 2: GemvRows<2>(g, m0, n0, n1); break;
      case 3: GemvRows<3>(g, m0, n0, n1); break;
      case 4: GemvRows<4>(g, m0, n0, n1); break;
      case 5: GemvRows<5>(g, m0, n0, n1); break;
      case 6: GemvRows<6>(g, m0, n0, n1); break;
      case 7: GemvRows<7>(g, m0, n0, n1); break;
      default: GemvRows<8>(g, m0, n0, n1); break;
    }
    m0 += rows;
  }
}

// ---------------------------------------------------------------- float32, large M (tiles)
//
// Computes Y^T tile by tile: a task owns 12 columns; per chunk of K it decodes their exact weights
// W[k, n] = NF4 * scale into a 12 x kc panel (L1), then every 32-row tile of A^T (packed once per call,
// in code order) accumulates 12 x 32 outputs in 24 registers. Y^T lives in a per-call buffer and is
// transposed into Y (+ bias) by the task at the end.

struct GemmArgs {
  const Problem* p;
  const float* at;  // [K_pad][M_pad] in code order along K
  float* yt;        // [N][M_pad]
  int64_t kpad, mpad;
};

void GemmTask(void* data, size_t task) {
  const GemmArgs& g = *static_cast<const GemmArgs*>(data);
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks, row_bytes = kb * bs / 2;
  const int64_t n0 = static_cast<int64_t>(task) * kTileN, nc = MinI64(kTileN, w.N - n0);
  const __m512 table = _mm512_loadu_ps(kNF4);
  alignas(64) float panel[kTileN * kGemmKc];
  float* yt = g.yt + n0 * g.mpad;
  for (int64_t k0 = 0; k0 < g.kpad; k0 += kGemmKc) {
    const int64_t kc = MinI64(kGemmKc, g.kpad - k0);
    for (int64_t c = 0; c < kTileN; ++c) {
      float* dst = panel + c * kc;
      if (c >= nc) {
        std::memset(dst, 0, sizeof(float) * kc);
        continue;
      }
      const uint8_t* codes = w.packed + (n0 + c) * row_bytes;
      for (int64_t j = 0; j < kc; j += kGroup) {
        const __m512 s = _mm512_set1_ps(Scale(w, n0 + c, (k0 + j) / bs));
        __m512 we, wo;
        Decode32(codes + (k0 + j) / 2, table, &we, &wo);
        _mm512_storeu_ps(dst + j, _mm512_mul_ps(we, s));
        _mm512_storeu_ps(dst + j + 16, _mm512_mul_ps(wo, s));
      }
    }
    for (int64_t m = 0; m < g.mpad; m += kTileM) {
      __m512 acc[kTileN][2];
      if (k0 == 0) {
        for (int c = 0; c < kTileN; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_ps();
      } else {
        for (int c = 0; c < kTileN; ++c) {
          acc[c][0] = _mm512_loadu_ps(yt + c * g.mpad + m);
          acc[c][1] = _mm512_loadu_ps(yt + c * g.mpad + m + 16);
        }
      }
      const float* at = g.at + k0 * g.mpad + m;
      for (int64_t k = 0; k < kc; ++k) {
        const __m512 a0 = _mm512_loadu_ps(at + k * g.mpad);
        const __m512 a1 = _mm512_loadu_ps(at + k * g.mpad + 16);
        for (int c = 0; c < kTileN; ++c) {
          const __m512 wv = _mm512_set1_ps(panel[c * kc + k]);
          acc[c][0] = _mm512_fmadd_ps(a0, wv, acc[c][0]);
          acc[c][1] = _mm512_fmadd_ps(a1, wv, acc[c][1]);
        }
      }
      for (int c = 0; c < kTileN; ++c) {
        _mm512_storeu_ps(yt + c * g.mpad + m, acc[c][0]);
        _mm512_storeu_ps(yt + c * g.mpad + m + 16, acc[c][1]);
      }
    }
  }
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t c = 0; c < nc; ++c) {
      p.Y[m * w.N + n0 + c] = yt[c * g.mpad + m] + (p.bias != nullptr ? p.bias[n0 + c] : 0.0f);
    }
  }
}

void MatMulF32(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  const Nf4Weight& w = p.w;
  if (w.block_size < kGroup) {
    Avx2Kernels().matmul_f32(p, par, scratch);
    return;
  }
  const int64_t kpad = w.k_blocks * w.block_size;
  if (p.M < kMinGemmRows) {
    auto* ap = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(p.M * kpad)));
    for (int64_t m = 0; m < p.M; ++m) PackRowCodeOrder(p.A + m * w.K, w.K, kGroup, ap + m * kpad);
    GemvArgs g{&p, ap, kpad};
    par.For(static_cast<size_t>(CeilDiv(w.N, kGemvCols)), GemvTask, &g);
    return;
  }
  const int64_t mpad = CeilDiv(p.M, kTileM) * kTileM;
  auto* at = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(kpad * mpad)));
  PackTransposedCodeOrder(p.A, p.M, w.K, mpad, kGroup, at);
  const int64_t tiles = CeilDiv(w.N, kTileN);
  auto* yt = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(tiles * kTileN * mpad)));
  GemmArgs g{&p, at, yt, kpad, mpad};
  par.For(static_cast<size_t>(tiles), GemmTask, &g);
}

// ---------------------------------------------------------------- accuracy_level 4 (int8 activations)
//
// 64 codes per step: 32 bytes of B, nibbles split into 32 even-k and 32 odd-k codes, vpshufb maps them to
// unsigned bytes round(NF4 * 127) + 128, vpdpbusd multiplies with the int8 activations (packed in the same
// order). The +128 adds 128 * sum(q_a) per block, subtracted with the per-(row, block) sums.

constexpr int64_t kGroupI8 = 64;

struct Int8Args {
  const Problem* p;
  const int8_t* qa;      // [M][K_pad] in int8 code order
  const float* ascale;   // [M][k_blocks]
  const int32_t* qsum;   // [M][k_blocks]
  int64_t kpad;
};

inline __m512i Decode64U8(const uint8_t* bytes, __m512i table) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i even = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  const __m256i odd = _mm256_and_si256(v, mask);
  return _mm512_shuffle_epi8(table, _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1));
}

template <int MR>
void Int8Tile(const Int8Args& g, int64_t m0, int64_t n) {
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks;
  const uint8_t* codes = w.packed + n * kb * bs / 2;
  const __m512i table = _mm512_broadcast_i32x4(_mm_add_epi8(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(kNF4I8)), _mm_set1_epi8(static_cast<char>(-128))));
  float tot[MR] = {};
  __m512 totv[MR];
  for (int m = 0; m < MR; ++m) totv[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    __m512i acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_si512();
    for (int64_t k = b * bs; k < (b + 1) * bs; k += kGroupI8) {
      const __m512i wq = Decode64U8(codes + k / 2, table);
      for (int m = 0; m < MR; ++m) {
        acc[m] = _mm512_dpbusd_epi32(acc[m], wq, _mm512_loadu_si512(g.qa + (m0 + m) * g.kpad + k));
      }
    }
    const float s = Scale(w, n, b);
    for (int m = 0; m < MR; ++m) {
      const float f = s * g.ascale[(m0 + m) * kb + b];
      totv[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_set1_ps(f), totv[m]);
      tot[m] += f * static_cast<float>(g.qsum[(m0 + m) * kb + b]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float y = (_mm512_reduce_add_ps(totv[m]) - 128.0f * tot[m]) * (1.0f / kInt8Levels);
    if (p.bias != nullptr) y += p.bias[n];
    p.Y[(m0 + m) * w.N + n] = y;
  }
}

void Int8Task(void* data, size_t task) {
  const Int8Args& g = *static_cast<const Int8Args*>(data);
  const int64_t N = g.p->w.N, M = g.p->M;
  const int64_t n0 = static_cast<int64_t>(task) * kGemvCols, n1 = MinI64(n0 + kGemvCols, N);
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t rows = MinI64(M - m0, 4);
    for (int64_t n = n0; n < n1; ++n) {
      switch (rows) {
        case 1: Int8Tile<1>(g, m0, n); break;
        case 2: Int8Tile<2>(g, m0, n); break;
        case 3: Int8Tile<3>(g, m0, n); break;
        default: Int8Tile<4>(g, m0, n); break;
      }
    }
    m0 += rows;
  }
}

void MatMulInt8(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  const Nf4Weight& w = p.w;
  if (p.M >= kMinInt8GemmRows) {  // compute-bound: the float32 tiles are faster (and exact)
    MatMulF32(p, par, scratch);
    return;
  }
  if (w.block_size < kGroupI8) {
    Avx2Kernels().matmul_int8(p, par, scratch);
    return;
  }
  const int64_t kb = w.k_blocks, kpad = kb * w.block_size;
  auto* qa = static_cast<int8_t*>(scratch.Zeroed(static_cast<size_t>(p.M * kpad)));
  auto* ascale = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(p.M * kb)));
  auto* qsum = static_cast<int32_t*>(scratch.Zeroed(sizeof(int32_t) * static_cast<size_t>(p.M * kb)));
  QuantizeRowsInt8(p, kGroupI8, qa, ascale, qsum);
  Int8Args g{&p, qa, ascale, qsum, kpad};
  par.For(static_cast<size_t>(CeilDiv(w.N, kGemvCols)), Int8Task, &g);
}

}  // namespace

const KernelSet& Avx512Kernels() {
  static const KernelSet set{"avx512", MatMulF32, MatMulInt8};
  return set;
}

}  // namespace onnx_nf4::cpu
