// kernels_avx2.cc: AVX2 + FMA kernels. Built with -mavx2 -mfma; only called when the CPU has them
// (cpu_common.cc). docs/cpu_kernel.md explains the algorithms.
//
// Code order. An 8-byte run of B holds 16 codes; vpmovzxbd spreads it over 8 dword lanes, the low nibble of
// lane j is the code of k = 2j + 1 and the high nibble that of k = 2j. vpermps reads 3 index bits, so the
// table lives in two registers (codes 0-7 and 8-15) and bit 3 of the code picks one with vblendvps. The
// activations are packed once per call in the same order: per 16-group of k, the 8 even k then the 8 odd.
#include <immintrin.h>

#include <cstring>

#include "cpu_kernels.h"
#include "simd_common.h"

namespace onnx_nf4::cpu {
namespace {

constexpr int64_t kGroup = 16;     // codes per 8-byte step
constexpr int64_t kGemvCols = 16;  // columns per GEMV task
constexpr int64_t kTileN = 6;      // GEMM tile: 6 columns x 16 rows
constexpr int64_t kTileM = 16;
constexpr int64_t kGemmKc = 256;   // K per decoded panel (6 x 256 floats: 6 KiB, L1)
constexpr int64_t kMinGemmRows = 16;    // float32: rows from which the tiles beat weight streaming
constexpr int64_t kMinInt8GemmRows = 32;  // accuracy_level 4: rows from which the float32 tiles are faster

struct Table {
  __m256 lo, hi;
};

inline Table LoadTable() { return {_mm256_loadu_ps(kNF4), _mm256_loadu_ps(kNF4 + 8)}; }

inline __m256 Lookup(const Table& t, __m256i idx, __m256i select_in_sign) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx),
                          _mm256_castsi256_ps(select_in_sign));
}

// Decodes 16 codes (8 bytes) into the NF4 values of the even k and the odd k of the group.
inline void Decode16(const uint8_t* bytes, const Table& t, __m256* even, __m256* odd) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  *odd = Lookup(t, v, _mm256_slli_epi32(v, 28));
  *even = Lookup(t, _mm256_srli_epi32(v, 4), _mm256_slli_epi32(v, 24));
}

inline float HorizontalSum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
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
  const Table table = LoadTable();
  if (b_begin == 0) PrefetchScales(w, n + kScaleLookahead);
  __m256 tot0[MR], tot1[MR];
  for (int m = 0; m < MR; ++m) tot0[m] = tot1[m] = _mm256_setzero_ps();
  // One block: its sums, times its scale, into tot (a lambda: the two totals stay in registers).
  auto block = [&](int64_t b, __m256 (&tot)[MR]) {
    __m256 acc[MR][2 * U];
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < 2 * U; ++u) acc[m][u] = _mm256_setzero_ps();
    // do-while with pointers: the compiler sees at least one trip and keeps acc in registers.
    const uint8_t* c = codes + b * (bs / 2);
    const uint8_t* const c_end = c + bs / 2;
    const float* a = g.ap + m0 * g.kpad + b * bs;
    // When K is walked in pieces, the next column's piece is not where the hardware prefetchers look: request
    // it gradually, at the current offset of this piece (one piece ahead).
    if (prefetch_next) __builtin_prefetch(c + kb * bs / 2, 0, 3);
    do {
      for (int u = 0; u < U; ++u) {
        __m256 we, wo;
        Decode16(c + u * (kGroup / 2), table, &we, &wo);
        for (int m = 0; m < MR; ++m) {
          const float* am = a + m * g.kpad + u * kGroup;
          acc[m][2 * u] = _mm256_fmadd_ps(we, _mm256_loadu_ps(am), acc[m][2 * u]);
          acc[m][2 * u + 1] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(am + 8), acc[m][2 * u + 1]);
        }
      }
      c += U * (kGroup / 2);
      a += U * kGroup;
    } while (c < c_end);
    const __m256 s = _mm256_set1_ps(Scale(w, n, b));
    for (int m = 0; m < MR; ++m) {
      for (int u = 2 * U; u > 1; u /= 2)
        for (int v = 0; v < u / 2; ++v) acc[m][v] = _mm256_add_ps(acc[m][v], acc[m][v + u / 2]);
      tot[m] = _mm256_fmadd_ps(acc[m][0], s, tot[m]);
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
    y = base + HorizontalSum(_mm256_add_ps(tot0[m], tot1[m]));
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
    const int64_t rows = MinI64(M - m0, 3);  // 3 rows: 6 accumulators + 3 totals + table fit 16 registers
    switch (rows) {
      case 1: GemvRows<1>(g, m0, n0, n1); break;
      case 2: GemvRows<2>(g, m0, n0, n1); break;
      default: GemvRows<3>(g, m0, n0, n1); break;
    }
    m0 += rows;
  }
}

// ---------------------------------------------------------------- float32, large M (tiles)
//
// As in kernels_avx512.cc: a task owns 6 columns, decodes their exact weights per 256-chunk of K into a
// 6 x 256 panel, and every 16-row tile of A^T accumulates 6 x 16 outputs in 12 registers into Y^T.

struct GemmArgs {
  const Problem* p;
  const float* at;  // [K_pad][M_pad] in code order along K
  float* yt;        // [N_pad][M_pad]
  int64_t kpad, mpad;
};

// Decodes the exact weights W[k0 + j, n0 + c] (j < kc, c < kTileN; zero for c >= nc) into panel[c][j], in
// code order. Not inlined: its table registers must not compete with the 12 accumulators of the tile loop.
__attribute__((noinline)) void DecodePanel(const Nf4Weight& w, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                                           int64_t kpad, float* panel) {
  const int64_t bs = w.block_size, row_bytes = w.k_blocks * bs / 2;
  const int bs_log2 = __builtin_ctzll(static_cast<unsigned long long>(bs));
  const Table table = LoadTable();
  for (int64_t c = 0; c < kTileN; ++c) {
    float* dst = panel + c * kc;
    if (c >= nc) {
      std::memset(dst, 0, sizeof(float) * kc);
      continue;
    }
    const uint8_t* codes = w.packed + (n0 + c) * row_bytes;
    // The columns are kTileN interleaved streams, which the hardware prefetchers serve poorly: fetch the next
    // chunk's codes (kc / 2 bytes) now.
    if (k0 + kc < kpad) {
      for (int64_t off = 0; off < kc / 2; off += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(codes + (k0 + kc) / 2 + off), _MM_HINT_T0);
      }
    }
    for (int64_t j = 0; j < kc;) {  // block by block (block_size and kc are powers of two)
      const int64_t b = (k0 + j) >> bs_log2;
      const __m256 s = _mm256_set1_ps(Scale(w, n0 + c, b));
      const int64_t j_end = MinI64(kc, (b + 1) * bs - k0);
      for (; j < j_end; j += kGroup) {
        __m256 we, wo;
        Decode16(codes + (k0 + j) / 2, table, &we, &wo);
        _mm256_storeu_ps(dst + j, _mm256_mul_ps(we, s));
        _mm256_storeu_ps(dst + j + 8, _mm256_mul_ps(wo, s));
      }
    }
  }
}

void GemmTask(void* data, size_t task) {
  const GemmArgs& g = *static_cast<const GemmArgs*>(data);
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t n0 = static_cast<int64_t>(task) * kTileN, nc = MinI64(kTileN, w.N - n0);
  alignas(32) float panel[kTileN * kGemmKc];
  float* yt = g.yt + n0 * g.mpad;
  for (int64_t k0 = 0; k0 < g.kpad; k0 += kGemmKc) {
    const int64_t kc = MinI64(kGemmKc, g.kpad - k0);
    DecodePanel(w, n0, nc, k0, kc, g.kpad, panel);
    for (int64_t m = 0; m < g.mpad; m += kTileM) {
      __m256 acc[kTileN][2];
      if (k0 == 0) {
        for (int c = 0; c < kTileN; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
      } else {
        for (int c = 0; c < kTileN; ++c) {
          acc[c][0] = _mm256_loadu_ps(yt + c * g.mpad + m);
          acc[c][1] = _mm256_loadu_ps(yt + c * g.mpad + m + 8);
        }
      }
      const float* at = g.at + k0 * g.mpad + m;
      for (int64_t k = 0; k < kc; ++k) {
        const __m256 a0 = _mm256_loadu_ps(at + k * g.mpad);
        const __m256 a1 = _mm256_loadu_ps(at + k * g.mpad + 8);
        for (int c = 0; c < kTileN; ++c) {
          const __m256 wv = _mm256_broadcast_ss(panel + c * kc + k);
          acc[c][0] = _mm256_fmadd_ps(a0, wv, acc[c][0]);
          acc[c][1] = _mm256_fmadd_ps(a1, wv, acc[c][1]);
        }
      }
      for (int c = 0; c < kTileN; ++c) {
        _mm256_storeu_ps(yt + c * g.mpad + m, acc[c][0]);
        _mm256_storeu_ps(yt + c * g.mpad + m + 8, acc[c][1]);
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
  auto* yt = static_cast<float*>(scratch.Uninitialized(sizeof(float) * static_cast<size_t>(tiles * kTileN * mpad)));
  GemmArgs g{&p, at, yt, kpad, mpad};
  par.For(static_cast<size_t>(tiles), GemmTask, &g);
}

// ---------------------------------------------------------------- accuracy_level 4 (int8 activations)
//
// 32 codes per step: 16 bytes of B, nibbles split into 16 even-k and 16 odd-k codes, vpshufb maps them to
// signed bytes round(NF4 * 127). vpmaddubsw needs one unsigned operand, so it multiplies |w| by the
// activation carrying the sign of w (|w|, |a| <= 127: the pair sums cannot saturate), and vpmaddwd adds
// pairs to int32.

constexpr int64_t kGroupI8 = 32;

struct Int8Args {
  const Problem* p;
  const int8_t* qa;     // [M][K_pad] in int8 code order
  const float* ascale;  // [M][k_blocks]
  int64_t kpad;
};

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
void Int8Tile(const Int8Args& g, int64_t m0, int64_t n) {
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
      const float s = Scale(w, n, b0 + j);
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
    float y = HorizontalSum(_mm256_add_ps(tot0[m], tot1[m])) * (1.0f / kInt8Levels);
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
    PortableKernels().matmul_int8(p, par, scratch);
    return;
  }
  const int64_t kb = w.k_blocks, kpad = kb * w.block_size;
  auto* qa = static_cast<int8_t*>(scratch.Zeroed(static_cast<size_t>(p.M * kpad)));
  auto* ascale = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(p.M * kb)));
  QuantizeRowsInt8(p, kGroupI8, qa, ascale, nullptr);  // the signed table needs no per-block sums
  Int8Args g{&p, qa, ascale, kpad};
  par.For(static_cast<size_t>(CeilDiv(w.N, kGemvCols)), Int8Task, &g);
}

}  // namespace

const KernelSet& Avx2Kernels() {
  static const KernelSet set{"avx2", MatMulF32, MatMulInt8};
  return set;
}

}  // namespace onnx_nf4::cpu
