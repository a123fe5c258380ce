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
constexpr int64_t kTileNNarrow = 24;  // columns of the 16-row tile (M <= 16)
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

// MR rows of A against one column, U code groups per step (U independent accumulator pairs per row).
// Columns are walked one after the other, so the weight is read as one sequential stream (several
// interleaved column streams measured markedly slower from DRAM). The scale multiplies each block's sum; two
// running totals alternate between blocks to halve their dependency chain.
template <int MR, int U>
void GemvColumn(const GemvArgs& g, int64_t m0, int64_t n, int64_t b_begin, int64_t b_end, bool prefetch_next) {
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks;
  const uint8_t* codes = w.packed + n * kb * bs / 2;
  const __m512 table = _mm512_loadu_ps(kNF4);
  if (b_begin == 0) PrefetchScales(w, n + kScaleLookahead);
  __m512 tot0[MR], tot1[MR];
  for (int m = 0; m < MR; ++m) tot0[m] = tot1[m] = _mm512_setzero_ps();
  // One block: its sums, times its scale, into tot (a lambda: the two totals stay in registers).
  auto block = [&](int64_t b, __m512 (&tot)[MR]) {
    __m512 acc[MR][2 * U];
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < 2 * U; ++u) acc[m][u] = _mm512_setzero_ps();
    // do-while with pointers: the compiler sees at least one trip and keeps acc in registers.
    const uint8_t* c = codes + b * (bs / 2);
    const uint8_t* const c_end = c + bs / 2;
    const float* a = g.ap + m0 * g.kpad + b * bs;
    // When K is walked in pieces, the next column's piece is not where the hardware prefetchers look: request
    // it gradually, at the current offset of this piece (one piece ahead).
    if (prefetch_next) __builtin_prefetch(c + kb * bs / 2, 0, 3);
    do {
      for (int u = 0; u < U; ++u) {
        __m512 we, wo;
        Decode32(c + u * (kGroup / 2), table, &we, &wo);
        for (int m = 0; m < MR; ++m) {
          const float* am = a + m * g.kpad + u * kGroup;
          acc[m][2 * u] = _mm512_fmadd_ps(we, _mm512_loadu_ps(am), acc[m][2 * u]);
          acc[m][2 * u + 1] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(am + 16), acc[m][2 * u + 1]);
        }
      }
      c += U * (kGroup / 2);
      a += U * kGroup;
    } while (c < c_end);
    const __m512 s = _mm512_set1_ps(Scale(w, n, b));
    for (int m = 0; m < MR; ++m) {
      for (int u = 2 * U; u > 1; u /= 2)
        for (int v = 0; v < u / 2; ++v) acc[m][v] = _mm512_add_ps(acc[m][v], acc[m][v + u / 2]);
      tot[m] = _mm512_fmadd_ps(acc[m][0], s, tot[m]);
    }
  };
  if constexpr (MR <= 2) {  // few rows: alternate two totals to halve their dependency chains
    int64_t b = b_begin;
    for (; b + 1 < b_end; b += 2) {
      block(b, tot0);
      block(b + 1, tot1);
    }
    if (b < b_end) block(b, tot0);
  } else {  // MR independent chains already; a second set of totals would spill registers
    for (int64_t b = b_begin; b < b_end; ++b) block(b, tot0);
  }
  for (int m = 0; m < MR; ++m) {
    float& y = p.Y[(m0 + m) * w.N + n];
    const float base = b_begin > 0 ? y : (p.bias != nullptr ? p.bias[n] : 0.0f);
    y = base + _mm512_reduce_add_ps(_mm512_add_ps(tot0[m], tot1[m]));
  }
}

// Columns [n0, n1) for MR rows; one row gets up to 4 groups per step, two rows 2 (block size permitting).
// K is walked in chunks whose MR activation rows fit in L1 (32 KiB), partial sums accumulating in Y.
template <int MR>
void GemvRows(const GemvArgs& g, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t bs = g.p->w.block_size, kb = g.p->w.k_blocks, groups = bs / kGroup;
  const int64_t chunk = MaxI64(1, (int64_t{32768} / (MR * static_cast<int64_t>(sizeof(float)))) / bs);
  for (int64_t b0 = 0; b0 < kb; b0 += chunk) {
    const int64_t b1 = MinI64(kb, b0 + chunk);
    const bool pieces = chunk < kb;
    for (int64_t n = n0; n < n1; ++n) {
      const bool prefetch = pieces && n + 1 < n1;
      if (MR == 1 && groups % 4 == 0) {
        GemvColumn<MR, 4>(g, m0, n, b0, b1, prefetch);
      } else if (MR <= 2 && groups % 2 == 0) {
        GemvColumn<MR, 2>(g, m0, n, b0, b1, prefetch);
      } else {
        GemvColumn<MR, 1>(g, m0, n, b0, b1, prefetch);
      }
    }
  }
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

// TN columns x (16 * V) rows per register tile: <12, 2> (24 accumulators) in general, <24, 1> when M <= 16
// (a 32-row tile would be half padding).
template <int TN, int V>
void GemmTask(void* data, size_t task) {
  const GemmArgs& g = *static_cast<const GemmArgs*>(data);
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks, row_bytes = kb * bs / 2;
  const int bs_log2 = __builtin_ctzll(static_cast<unsigned long long>(bs));
  const int64_t n0 = static_cast<int64_t>(task) * TN, nc = MinI64(TN, w.N - n0);
  const __m512 table = _mm512_loadu_ps(kNF4);
  alignas(64) float panel[TN * kGemmKc];
  float* yt = g.yt + n0 * g.mpad;
  for (int64_t k0 = 0; k0 < g.kpad; k0 += kGemmKc) {
    const int64_t kc = MinI64(kGemmKc, g.kpad - k0);
    for (int64_t c = 0; c < TN; ++c) {
      float* dst = panel + c * kc;
      if (c >= nc) {
        std::memset(dst, 0, sizeof(float) * kc);
        continue;
      }
      const uint8_t* codes = w.packed + (n0 + c) * row_bytes;
      // The columns are TN interleaved streams, which the hardware prefetchers serve poorly: fetch the next
      // chunk's codes (kc / 2 bytes) now.
      if (k0 + kc < g.kpad) {
        for (int64_t off = 0; off < kc / 2; off += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(codes + (k0 + kc) / 2 + off), _MM_HINT_T0);
        }
      }
      for (int64_t j = 0; j < kc;) {  // block by block (block_size and kc are powers of two)
        const int64_t b = (k0 + j) >> bs_log2;
        const __m512 s = _mm512_set1_ps(Scale(w, n0 + c, b));
        const int64_t j_end = MinI64(kc, (b + 1) * bs - k0);
        for (; j < j_end; j += kGroup) {
          __m512 we, wo;
          Decode32(codes + (k0 + j) / 2, table, &we, &wo);
          _mm512_storeu_ps(dst + j, _mm512_mul_ps(we, s));
          _mm512_storeu_ps(dst + j + 16, _mm512_mul_ps(wo, s));
        }
      }
    }
    for (int64_t m = 0; m < g.mpad; m += 16 * V) {
      __m512 acc[TN][V];
      if (k0 == 0) {
#pragma GCC unroll 24
        for (int c = 0; c < TN; ++c)
          for (int v = 0; v < V; ++v) acc[c][v] = _mm512_setzero_ps();
      } else {
#pragma GCC unroll 24
        for (int c = 0; c < TN; ++c)
          for (int v = 0; v < V; ++v) acc[c][v] = _mm512_loadu_ps(yt + c * g.mpad + m + 16 * v);
      }
      const float* at = g.at + k0 * g.mpad + m;
      for (int64_t k = 0; k < kc; ++k) {
        __m512 a[V];
        for (int v = 0; v < V; ++v) a[v] = _mm512_loadu_ps(at + k * g.mpad + 16 * v);
#pragma GCC unroll 24
        for (int c = 0; c < TN; ++c) {
          const __m512 wv = _mm512_set1_ps(panel[c * kc + k]);
          for (int v = 0; v < V; ++v) acc[c][v] = _mm512_fmadd_ps(a[v], wv, acc[c][v]);
        }
      }
#pragma GCC unroll 24
      for (int c = 0; c < TN; ++c)
        for (int v = 0; v < V; ++v) _mm512_storeu_ps(yt + c * g.mpad + m + 16 * v, acc[c][v]);
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
  const bool narrow = p.M <= 16;
  const int64_t tile_n = narrow ? kTileNNarrow : kTileN, tile_m = narrow ? kTileM / 2 : kTileM;
  const int64_t mpad = CeilDiv(p.M, tile_m) * tile_m;
  auto* at = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(kpad * mpad)));
  PackTransposedCodeOrder(p.A, p.M, w.K, mpad, kGroup, at);
  const int64_t tiles = CeilDiv(w.N, tile_n);
  auto* yt = static_cast<float*>(scratch.Uninitialized(sizeof(float) * static_cast<size_t>(tiles * tile_n * mpad)));
  GemmArgs g{&p, at, yt, kpad, mpad};
  par.For(static_cast<size_t>(tiles), narrow ? GemmTask<kTileNNarrow, 1> : GemmTask<kTileN, 2>, &g);
}

// ---------------------------------------------------------------- accuracy_level 4 (int8 activations)
//
// 64 codes per step: 32 bytes of B, nibbles split into 32 even-k and 32 odd-k codes, vpshufb maps them to
// unsigned bytes round(NF4 * 127) + 128, vpdpbusd multiplies with the int8 activations (packed in the same
// order). The +128 adds 128 * sum(q_a) per block, which starts the block's integer accumulator negative.

constexpr int64_t kGroupI8 = 64;

struct Int8Args {
  const Problem* p;
  const int8_t* qa;      // [M][K_pad] in int8 code order
  const float* ascale;   // [M][k_blocks]
  const int32_t* qsum;   // [M][k_blocks]
  int64_t kpad;
};

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
void Int8Tile(const Int8Args& g, int64_t m0, int64_t n) {
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
      for (int64_t j = 0; j < nb; ++j) sw[j] = Scale(w, n, b0 + j);
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
  const Int8Args& g = *static_cast<const Int8Args*>(data);
  const int64_t N = g.p->w.N, M = g.p->M;
  const int64_t n0 = static_cast<int64_t>(task) * kGemvCols, n1 = MinI64(n0 + kGemvCols, N);
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t rows = MinI64(M - m0, 4);
    for (int64_t n = n0; n < n1; ++n) {
      const bool pairs = g.p->w.block_size >= 2 * kGroupI8;  // two independent sums per block
      switch (rows) {
        case 1: pairs ? Int8Tile<1, 2>(g, m0, n) : Int8Tile<1, 1>(g, m0, n); break;
        case 2: pairs ? Int8Tile<2, 2>(g, m0, n) : Int8Tile<2, 1>(g, m0, n); break;
        case 3: Int8Tile<3, 1>(g, m0, n); break;
        default: Int8Tile<4, 1>(g, m0, n); break;
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
